//! Elementwise passes over NHWC maps.

use rayon::prelude::*;

use crate::conv::{NhwcMut, NhwcRef};
use crate::error::{shape_error, Result};

/// The gradient through a ReLU: `grad = 0` wherever `input <= 0`.
///
/// # Shapes
/// `input`, `grad`: `[n, h, w, C]` (each with its own pixel stride).
pub fn relu_backward(input: NhwcRef, grad: NhwcMut) -> Result<()> {
    if input.dims() != grad.dims() {
        return Err(shape_error(
            "ReLU gradient",
            format!("{:?}", input.dims()),
            format!("{:?}", grad.dims()),
        ));
    }
    let [n, h, w, c] = input.dims();
    let gps = grad.pixel_stride();
    grad.into_data()
        .par_chunks_mut(gps * w.max(1))
        .take(n * h)
        .enumerate()
        .for_each(|(row, g)| {
            let (b, y) = (row / h, row % h);
            for x in 0..w {
                let xs = input.pixel_at(b, y, x);
                for (gv, &xv) in g[x * gps..x * gps + c].iter_mut().zip(xs) {
                    if xv <= 0.0 {
                        *gv = 0.0;
                    }
                }
            }
        });
    Ok(())
}

/// A 64-bit fingerprint of `data`'s bits, to tell whether weights changed
/// since they were last packed: sixteen independent 32-bit multiply-xor
/// lanes (one vector multiply per 16 values where AVX-512 runs it, so a
/// forward pass's weights take well under a millisecond), folded at the end
/// with the length. The same on every instruction set.
pub fn fingerprint(data: &[f32]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() == crate::Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { fingerprint_avx512(data) };
    }
    fingerprint_body(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fingerprint_avx512(data: &[f32]) -> u64 {
    fingerprint_body(data)
}

#[inline(always)]
fn fingerprint_body(data: &[f32]) -> u64 {
    const PRIME: u32 = 0x0100_0193;
    let mut lanes = [0x811c_9dc5u32; 16];
    for (i, h) in lanes.iter_mut().enumerate() {
        *h = h.wrapping_add(i as u32);
    }
    let mut chunks = data.chunks_exact(16);
    for chunk in &mut chunks {
        for (h, v) in lanes.iter_mut().zip(chunk) {
            *h = (*h ^ v.to_bits()).wrapping_mul(PRIME);
        }
    }
    for (h, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *h = (*h ^ v.to_bits()).wrapping_mul(PRIME);
    }
    let mut out = (data.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for h in lanes {
        out = (out ^ u64::from(h))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    out
}

/// `dst[j][i] = src[i][j]` for a row-major `rows x cols` matrix, in 16 x 16
/// blocks (both sides stay in cache lines), parallel over bands of rows of
/// `dst`.
///
/// # Shapes
/// `src`: `[rows, cols]` -> `dst`: `[cols, rows]`.
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) -> Result<()> {
    if src.len() != rows * cols || dst.len() != rows * cols {
        return Err(shape_error(
            "transpose",
            format!("{rows} x {cols} values on both sides"),
            format!("{} and {}", src.len(), dst.len()),
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    const B: usize = 16;
    dst.par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(jb, band)| {
            let j0 = jb * B;
            let jn = B.min(cols - j0);
            for i0 in (0..rows).step_by(B) {
                let i_n = B.min(rows - i0);
                for j in 0..jn {
                    let d = &mut band[j * rows + i0..j * rows + i0 + i_n];
                    for (i, v) in d.iter_mut().enumerate() {
                        *v = src[(i0 + i) * cols + j0 + j];
                    }
                }
            }
        });
    Ok(())
}

/// A zero-filled buffer of `len` values; large ones are filled by the
/// compute pool's threads together rather than by the caller alone.
pub fn zeroed(len: usize) -> Vec<f32> {
    if len < 1 << 16 {
        return vec![0f32; len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len));
    v
}
