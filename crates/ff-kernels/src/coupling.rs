//! The elementwise part of one flow step (FrEIA `AllInOneBlock`): clamped
//! affine coupling, global affine, hard permutation and the per-pixel
//! log-det, forward and backward, each one parallel pass over the map.
//!
//! The transcendental functions are branch-free polynomials
//! ([`exp`], [`tanh`]) that the compiler vectorises inside the
//! instruction-set wrappers; libm's scalar `expf`/`tanhf` were 15% of a
//! training step.

use rayon::prelude::*;

use crate::conv::NhwcRef;
use crate::error::{shape_error, Result};
use crate::isa::Isa;
pub use crate::math::{erf, exp, gelu_erf, tanh};

/// Pixels per parallel task.
const ROWS_PER_TASK: usize = 64;

/// One step's coupling parameters.
#[derive(Debug, Clone, Copy)]
pub struct Coupling<'a> {
    /// `perm[j]`: the pre-permutation channel of output channel `j` (`C` entries).
    pub perm: &'a [u32],
    /// The global affine scale per pre-permutation channel (`C`).
    pub scale: &'a [f32],
    /// The global affine offset per pre-permutation channel (`C`).
    pub offset: &'a [f32],
    /// `s = clamp tanh(subnet_scale a_s)` (FrEIA: 2.0).
    pub clamp: f32,
    /// The subnet output's factor (FrEIA: 0.1).
    pub subnet_scale: f32,
}

impl Coupling<'_> {
    fn channels(&self) -> usize {
        self.perm.len()
    }

    fn check(&self, x: &NhwcRef, a: &[f32]) -> Result<(usize, usize)> {
        let c = self.channels();
        let [n, h, w, x_c] = x.dims();
        let pixels = n * h * w;
        if self.scale.len() != c
            || self.offset.len() != c
            || self.perm.iter().any(|&p| p as usize >= c)
        {
            return Err(shape_error(
                "coupling parameters",
                format!("{c} scales, offsets and permutation entries below {c}"),
                format!("{} scales, {} offsets", self.scale.len(), self.offset.len()),
            ));
        }
        if x_c != c && x_c != c + 1 {
            return Err(shape_error(
                "coupling input channels",
                format!("{c} or {}", c + 1),
                x_c,
            ));
        }
        if a.len() != pixels * 2 * (c / 2) {
            return Err(shape_error(
                "subnet output",
                format!("[{pixels}, {}]", 2 * (c / 2)),
                a.len(),
            ));
        }
        Ok((pixels, x_c))
    }
}

/// `out[p] = [perm(concat(x1, x2 exp(s) + t) scale + offset), log_det]` per
/// pixel, with `s = clamp tanh(subnet_scale a[.., :C/2])`,
/// `t = subnet_scale a[.., C/2:]` and `log_det` = the input's carried log-det
/// (its channel `C`, if it has one) `+ sum s`.
///
/// # Shapes
/// `x`: `[n, h, w, C]` or `[n, h, w, C + 1]`, `a`: `[n h w, 2 (C/2)]` ->
/// `out`: `[n h w, C + 1]`.
pub fn coupling_forward(cp: &Coupling, x: NhwcRef, a: &[f32], out: &mut [f32]) -> Result<()> {
    let (pixels, x_c) = cp.check(&x, a)?;
    let c = cp.channels();
    let oc = c + 1;
    if out.len() != pixels * oc {
        return Err(shape_error(
            "coupling output",
            format!("[{pixels}, {oc}]"),
            out.len(),
        ));
    }
    let isa = Isa::detect();
    let rows = Rows {
        cp,
        x: x.data(),
        xs: x.pixel_stride(),
        x_c,
        a,
        // The affine gathered through the permutation once per call.
        scale_p: cp.perm.iter().map(|&p| cp.scale[p as usize]).collect(),
        offset_p: cp.perm.iter().map(|&p| cp.offset[p as usize]).collect(),
    };
    out.par_chunks_mut(oc * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, dst)| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is the detected one, so the CPU has AVX-512F.
            Isa::Avx512 => unsafe { forward_rows_avx512(&rows, chunk * ROWS_PER_TASK, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is the detected one, so the CPU has AVX2 and FMA.
            Isa::Avx2Fma => unsafe { forward_rows_avx2(&rows, chunk * ROWS_PER_TASK, dst) },
            _ => forward_rows::<1>(&rows, chunk * ROWS_PER_TASK, dst),
        });
    Ok(())
}

/// What [`forward_rows`] reads.
struct Rows<'a> {
    cp: &'a Coupling<'a>,
    x: &'a [f32],
    xs: usize,
    x_c: usize,
    a: &'a [f32],
    scale_p: Vec<f32>,
    offset_p: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn forward_rows_avx512(r: &Rows, row0: usize, dst: &mut [f32]) {
    forward_rows::<16>(r, row0, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_rows_avx2(r: &Rows, row0: usize, dst: &mut [f32]) {
    forward_rows::<8>(r, row0, dst)
}

/// [`coupling_forward`] for the pixels `row0 ..` whose outputs `dst` holds;
/// `GATHER`: the lanes of one gather through the permutation (see [`gather`]).
#[inline(always)]
fn forward_rows<const GATHER: usize>(r: &Rows, row0: usize, dst: &mut [f32]) {
    let cp = r.cp;
    let c = cp.channels();
    let (c1, c2) = (c - c / 2, c / 2);
    let oc = c + 1;
    let mut pre = vec![0f32; c];
    let mut gathered = vec![0f32; c];
    let mut th = vec![0f32; c2];
    let mut e = vec![0f32; c2];
    for (i, o) in dst.chunks_mut(oc).enumerate() {
        let row = row0 + i;
        let xr = &r.x[row * r.xs..row * r.xs + r.x_c];
        let ar = &r.a[row * 2 * c2..(row + 1) * 2 * c2];
        log_scales_body(cp.subnet_scale, cp.clamp, &ar[..c2], &mut th, &mut e);
        let carried = if r.x_c > c { xr[c] } else { 0.0 };
        let log_det = carried + cp.clamp * lane_sum(&th);
        pre[..c1].copy_from_slice(&xr[..c1]);
        for (((p, &xv), &ev), &tv) in pre[c1..].iter_mut().zip(&xr[c1..c]).zip(&e).zip(&ar[c2..]) {
            *p = xv * ev + cp.subnet_scale * tv;
        }
        // Gathered through the permutation into an L1 buffer, then the affine
        // as one vector pass into the output row (a scalar loop storing
        // straight into the freshly allocated output was a third of the pass).
        // SAFETY: `check` found every entry of `perm` below C = pre.len(), and
        // GATHER is 16 or 8 only in the AVX-512 or AVX2 wrapper, dispatched
        // on detection.
        unsafe { gather::<GATHER>(&pre, cp.perm, &mut gathered) };
        for (((ov, &g), &sv), &fv) in o[..c]
            .iter_mut()
            .zip(&gathered)
            .zip(&r.scale_p)
            .zip(&r.offset_p)
        {
            *ov = g * sv + fv;
        }
        o[c] = log_det;
    }
}

/// The backward of [`coupling_forward`]: from the output gradient `grad`,
/// writes the input gradient `gx` (the carried log-det's gradient passes
/// through to channel `C` when the input has one) and the subnet-output
/// gradient `ga`, and returns the gradients of the global scale and offset
/// (`[2 C]`: scales first), summed in f64.
///
/// # Shapes
/// `x`: `[n, h, w, x_c]`, `a`: `[n h w, 2 (C/2)]`, `grad`: `[n h w, C + 1]` ->
/// `gx`: `[n h w, x_c]`, `ga`: `[n h w, 2 (C/2)]`.
pub fn coupling_backward(
    cp: &Coupling,
    x: NhwcRef,
    a: &[f32],
    grad: &[f32],
    gx: &mut [f32],
    ga: &mut [f32],
) -> Result<Vec<f64>> {
    let (pixels, x_c) = cp.check(&x, a)?;
    let c = cp.channels();
    let c2 = c / 2;
    let oc = c + 1;
    if grad.len() != pixels * oc || gx.len() != pixels * x_c || ga.len() != a.len() {
        return Err(shape_error(
            "coupling gradients",
            format!(
                "[{pixels}, {oc}], [{pixels}, {x_c}], [{pixels}, {}]",
                2 * c2
            ),
            format!("{}, {}, {}", grad.len(), gx.len(), ga.len()),
        ));
    }
    let isa = Isa::detect();
    let mut inverse = vec![0u32; c];
    for (j, &p) in cp.perm.iter().enumerate() {
        inverse[p as usize] = j as u32;
    }
    let rows = BackRows {
        cp,
        x: x.data(),
        xs: x.pixel_stride(),
        x_c,
        a,
        grad,
        inverse,
    };
    let partials: Vec<Vec<f64>> = gx
        .par_chunks_mut(x_c * ROWS_PER_TASK)
        .zip(ga.par_chunks_mut(2 * c2 * ROWS_PER_TASK))
        .enumerate()
        .map(|(chunk, (gx_c, ga_c))| {
            let row0 = chunk * ROWS_PER_TASK;
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is the detected one, so the CPU has AVX-512F.
                Isa::Avx512 => unsafe { backward_rows_avx512(&rows, row0, gx_c, ga_c) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is the detected one, so the CPU has AVX2 and FMA.
                Isa::Avx2Fma => unsafe { backward_rows_avx2(&rows, row0, gx_c, ga_c) },
                _ => backward_rows::<1>(&rows, row0, gx_c, ga_c),
            }
        })
        .collect();
    let mut g_affine = vec![0f64; 2 * c];
    for p in &partials {
        for (t, v) in g_affine.iter_mut().zip(p) {
            *t += v;
        }
    }
    Ok(g_affine)
}

/// What [`backward_rows`] reads.
struct BackRows<'a> {
    cp: &'a Coupling<'a>,
    x: &'a [f32],
    xs: usize,
    x_c: usize,
    a: &'a [f32],
    grad: &'a [f32],
    /// `inverse[p]`: the output channel of pre-permutation channel `p`.
    inverse: Vec<u32>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn backward_rows_avx512(
    r: &BackRows,
    row0: usize,
    gx: &mut [f32],
    ga: &mut [f32],
) -> Vec<f64> {
    backward_rows::<16>(r, row0, gx, ga)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_rows_avx2(
    r: &BackRows,
    row0: usize,
    gx: &mut [f32],
    ga: &mut [f32],
) -> Vec<f64> {
    backward_rows::<8>(r, row0, gx, ga)
}

/// [`coupling_backward`] for the pixels `row0 ..` whose gradients `gx` and
/// `ga` hold; returns their share of the global affine's gradients. Those are
/// summed in f32 over the (at most 64) pixels of the chunk, then in f64.
#[inline(always)]
fn backward_rows<const GATHER: usize>(
    r: &BackRows,
    row0: usize,
    gx: &mut [f32],
    ga: &mut [f32],
) -> Vec<f64> {
    let cp = r.cp;
    let c = cp.channels();
    let (c1, c2) = (c - c / 2, c / 2);
    let (oc, x_c) = (c + 1, r.x_c);
    let mut acc = vec![0f32; 2 * c];
    let mut gperm = vec![0f32; c];
    let mut grow = vec![0f32; c];
    let mut pre = vec![0f32; c];
    let mut th = vec![0f32; c2];
    let mut e = vec![0f32; c2];
    let ds_factor = cp.clamp * cp.subnet_scale;
    for (i, (gxr, gar)) in gx.chunks_mut(x_c).zip(ga.chunks_mut(2 * c2)).enumerate() {
        let row = row0 + i;
        let xr = &r.x[row * r.xs..row * r.xs + c];
        let ar = &r.a[row * 2 * c2..(row + 1) * 2 * c2];
        let gr = &r.grad[row * oc..(row + 1) * oc];
        let gl = gr[c];
        if x_c > c {
            // The accumulated log-det passes straight through.
            gxr[c] = gl;
        }
        log_scales_body(cp.subnet_scale, cp.clamp, &ar[..c2], &mut th, &mut e);
        pre[..c1].copy_from_slice(&xr[..c1]);
        for (((p, &xv), &ev), &tv) in pre[c1..].iter_mut().zip(&xr[c1..c]).zip(&e).zip(&ar[c2..]) {
            *p = xv * ev + cp.subnet_scale * tv;
        }
        // The output gradient in pre-permutation order: one gather, after
        // which every channel loop runs on contiguous, vectorisable data
        // (scattering through the permutation kept them scalar). The row is
        // first copied in order, which the hardware prefetcher streams from
        // memory; gathering straight from it waited on a cache miss per line.
        grow.copy_from_slice(&gr[..c]);
        // SAFETY: `inverse` holds output channels j < C = grow.len() (built
        // from the checked `perm`); GATHER as in the forward pass.
        unsafe { gather::<GATHER>(&grow, &r.inverse, &mut gperm) };
        let (acc_scale, acc_offset) = acc.split_at_mut(c);
        for (((a_s, a_o), &go), &p) in acc_scale
            .iter_mut()
            .zip(acc_offset.iter_mut())
            .zip(&gperm)
            .zip(&pre)
        {
            *a_s += go * p;
            *a_o += go;
        }
        for ((gx, &go), &sv) in gxr[..c1].iter_mut().zip(&gperm).zip(cp.scale) {
            *gx = go * sv;
        }
        for k in 0..c2 {
            let gp = gperm[c1 + k] * cp.scale[c1 + k];
            gxr[c1 + k] = gp * e[k];
            let ds = gp * xr[c1 + k] * e[k] + gl;
            gar[k] = ds * ds_factor * (1.0 - th[k] * th[k]);
            gar[c2 + k] = cp.subnet_scale * gp;
        }
    }
    acc.iter().map(|&v| f64::from(v)).collect()
}

/// `dst[j] = src[idx[j]]`, `GATHER` lanes per instruction: 16 (only from
/// inside an AVX-512 wrapper), 8 (only from inside an AVX2 wrapper) or 1 (a
/// scalar loop). The scalar loop, a bounds check and a store per channel,
/// was a quarter of the coupling passes with AVX-512 and a fifth on Zen 3.
///
/// # Safety
/// Every `idx` value must index `src` (the permutations are checked once per
/// call of [`coupling_forward`] / [`coupling_backward`], not per pixel), and
/// `GATHER` may be 16 only where the CPU has AVX-512F, 8 only where it has
/// AVX2.
#[inline(always)]
unsafe fn gather<const GATHER: usize>(src: &[f32], idx: &[u32], dst: &mut [f32]) {
    assert_eq!(idx.len(), dst.len());
    debug_assert!(idx.iter().all(|&i| (i as usize) < src.len()));
    #[cfg(target_arch = "x86_64")]
    match GATHER {
        // SAFETY: the caller's contract.
        16 => return unsafe { gather_avx512(src, idx, dst) },
        // SAFETY: the caller's contract.
        8 => return unsafe { gather_avx2(src, idx, dst) },
        _ => {}
    }
    for (d, &i) in dst.iter_mut().zip(idx) {
        *d = src[i as usize];
    }
}

/// [`gather`]'s AVX2 body.
///
/// # Safety
/// The CPU must have AVX2; every `idx` value must index `src`, and `dst`
/// must be as long as `idx`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_avx2(src: &[f32], idx: &[u32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = idx.len();
    let whole = n - n % 8;
    for j in (0..whole).step_by(8) {
        // SAFETY: j + 8 <= n values of idx and dst; the indices are inside
        // src (the caller's contract).
        unsafe {
            let vi = _mm256_loadu_si256(idx.as_ptr().add(j).cast());
            let v = _mm256_i32gather_ps::<4>(src.as_ptr(), vi);
            _mm256_storeu_ps(dst.as_mut_ptr().add(j), v);
        }
    }
    for j in whole..n {
        // SAFETY: as above, one lane at a time.
        unsafe { *dst.get_unchecked_mut(j) = *src.get_unchecked(*idx.get_unchecked(j) as usize) };
    }
}

/// [`gather`]'s AVX-512 body.
///
/// # Safety
/// The CPU must have AVX-512F; every `idx` value must index `src`, and `dst`
/// must be as long as `idx`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_avx512(src: &[f32], idx: &[u32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = idx.len();
    let whole = n - n % 16;
    for j in (0..whole).step_by(16) {
        // SAFETY: j + 16 <= n values of idx and dst; the indices are inside
        // src (the caller's contract).
        unsafe {
            let vi = _mm512_loadu_si512(idx.as_ptr().add(j).cast());
            let v = _mm512_i32gather_ps::<4>(vi, src.as_ptr());
            _mm512_storeu_ps(dst.as_mut_ptr().add(j), v);
        }
    }
    for j in whole..n {
        // SAFETY: as above, one lane at a time.
        unsafe { *dst.get_unchecked_mut(j) = *src.get_unchecked(*idx.get_unchecked(j) as usize) };
    }
}

/// `sum v` in sixteen lane partials (whole 16-value chunks, then the
/// remainder into the first lanes), added up at the end: vector adds
/// instead of one chain of scalar adds, a sixth of the forward pass.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut whole = v.chunks_exact(16);
    for chunk in &mut whole {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(whole.remainder()) {
        *a += x;
    }
    acc.iter().sum()
}

/// `th = tanh(subnet_scale a_s)` and `e = exp(clamp th)`; vectorised where
/// the row functions' instruction-set wrappers inline it.
#[inline(always)]
fn log_scales_body(k: f32, clamp: f32, a_s: &[f32], th: &mut [f32], e: &mut [f32]) {
    for ((t, ev), &a) in th.iter_mut().zip(e.iter_mut()).zip(a_s) {
        let v = tanh(k * a);
        *t = v;
        *ev = exp(clamp * v);
    }
}
