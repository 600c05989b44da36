//! Row-wise softmax and layer norm over the last dimension (the transformer
//! backbones' per-token operations), parallel over rows, vectorised within.

use rayon::prelude::*;

use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::math::exp;

/// Rows per parallel task (at least this many values' worth).
const VALUES_PER_TASK: usize = 16 * 1024;

fn rows_per_task(cols: usize) -> usize {
    (VALUES_PER_TASK / cols.max(1)).max(1)
}

/// Softmax of every row of `x` (`[rows, cols]`), in place.
pub fn softmax_rows(x: &mut [f32], cols: usize) -> Result<()> {
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(shape_error(
            "softmax rows",
            format!("a multiple of {cols} values"),
            x.len(),
        ));
    }
    let isa = Isa::detect();
    x.par_chunks_mut(rows_per_task(cols) * cols)
        .for_each(|chunk| {
            for row in chunk.chunks_exact_mut(cols) {
                softmax_row(isa, row);
            }
        });
    Ok(())
}

/// `row = softmax(row)` on `isa`.
pub(crate) fn softmax_row(isa: Isa, row: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is a detected one, so the CPU has AVX-512F.
        Isa::Avx512 => unsafe { softmax_row_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is a detected one, so the CPU has AVX2 and FMA.
        Isa::Avx2Fma => unsafe { softmax_row_avx2(row) },
        _ => softmax_row_body(row),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn softmax_row_avx512(row: &mut [f32]) {
    softmax_row_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_body(row)
}

/// `row = softmax(row * scale)` on `isa` (attention logits to weights; the
/// product rounded first, as a separate scaling op would).
pub(crate) fn scaled_softmax_row(isa: Isa, row: &mut [f32], scale: f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is a detected one, so the CPU has AVX-512F.
        Isa::Avx512 => unsafe { scaled_softmax_row_avx512(row, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is a detected one, so the CPU has AVX2 and FMA.
        Isa::Avx2Fma => unsafe { scaled_softmax_row_avx2(row, scale) },
        _ => scaled_softmax_row_body(row, scale),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn scaled_softmax_row_avx512(row: &mut [f32], scale: f32) {
    scaled_softmax_row_body(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_softmax_row_avx2(row: &mut [f32], scale: f32) {
    scaled_softmax_row_body(row, scale)
}

#[inline(always)]
fn scaled_softmax_row_body(row: &mut [f32], scale: f32) {
    for v in row.iter_mut() {
        *v *= scale;
    }
    softmax_row_body(row)
}

#[inline(always)]
fn softmax_row_body(row: &mut [f32]) {
    // Sixteen partial maxima and sums: vector lanes, and an order that does
    // not depend on the thread. Whole 16-value chunks first, then the
    // remainder into the first lanes: with `chunks(16)` the inner loop's trip
    // count was unknown and the accumulators lived on the stack, one
    // store-to-load round trip per chunk (most of CaiT's softmax time).
    let mut m = [f32::NEG_INFINITY; 16];
    let mut whole = row.chunks_exact(16);
    for chunk in &mut whole {
        for (a, &v) in m.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    for (a, &v) in m.iter_mut().zip(whole.remainder()) {
        *a = a.max(v);
    }
    let max = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = [0f32; 16];
    let mut whole = row.chunks_exact_mut(16);
    for chunk in &mut whole {
        for (a, v) in s.iter_mut().zip(chunk.iter_mut()) {
            *v = exp(*v - max);
            *a += *v;
        }
    }
    for (a, v) in s.iter_mut().zip(whole.into_remainder()) {
        *v = exp(*v - max);
        *a += *v;
    }
    let inv = 1.0 / s.iter().sum::<f32>();
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Layer norm of every row of `x` (`[rows, cols]`) with a per-column affine:
/// `out = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance).
pub fn layer_norm_rows(
    x: &[f32],
    cols: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    if cols == 0
        || !x.len().is_multiple_of(cols)
        || out.len() != x.len()
        || weight.len() != cols
        || bias.len() != cols
    {
        return Err(shape_error(
            "layer norm rows",
            format!("[rows, {cols}] in and out, weight and bias of {cols}"),
            format!(
                "{} in, {} out, {} weight, {} bias",
                x.len(),
                out.len(),
                weight.len(),
                bias.len()
            ),
        ));
    }
    let isa = Isa::detect();
    let per = rows_per_task(cols) * cols;
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(oc, xc)| {
            for (orow, xrow) in oc.chunks_exact_mut(cols).zip(xc.chunks_exact(cols)) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `isa` is the detected one, so the CPU has AVX-512F.
                    Isa::Avx512 => unsafe { layer_norm_row_avx512(xrow, weight, bias, eps, orow) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `isa` is the detected one, so the CPU has AVX2 and FMA.
                    Isa::Avx2Fma => unsafe { layer_norm_row_avx2(xrow, weight, bias, eps, orow) },
                    _ => layer_norm_row(xrow, weight, bias, eps, orow),
                }
            }
        });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn layer_norm_row_avx512(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    layer_norm_row(x, w, b, eps, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_row_avx2(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    layer_norm_row(x, w, b, eps, out)
}

#[inline(always)]
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    // Whole 16-value chunks, then the remainder (as in the softmax: the
    // accumulators stay in a register).
    let mut s = [0f32; 16];
    let mut whole = x.chunks_exact(16);
    for chunk in &mut whole {
        for (a, &v) in s.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    for (a, &v) in s.iter_mut().zip(whole.remainder()) {
        *a += v;
    }
    let mean = s.iter().sum::<f32>() / n;
    let mut q = [0f32; 16];
    let mut whole = x.chunks_exact(16);
    for chunk in &mut whole {
        for (a, &v) in q.iter_mut().zip(chunk) {
            *a += (v - mean) * (v - mean);
        }
    }
    for (a, &v) in q.iter_mut().zip(whole.remainder()) {
        *a += (v - mean) * (v - mean);
    }
    let rstd = 1.0 / (q.iter().sum::<f32>() / n + eps).sqrt();
    for (((o, &v), &wv), &bv) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * rstd * wv + bv;
    }
}
