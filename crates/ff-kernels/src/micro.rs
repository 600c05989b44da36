//! The register-blocked convolution micro-kernels: `P` output pixels x `OB`
//! blocks of 16 output channels, accumulated over the `k x k` taps and the
//! `C` input channels of a gathered input window. On AVX-512 the `P x OB`
//! accumulators are zmm registers (at most 24 of the 32), each weight vector
//! is loaded once per input channel and each input value broadcast once, so
//! the inner loop is one FMA per accumulator and FMA-bound on Zen 4.

use crate::isa::Isa;

/// Output channels per block: one AVX-512 vector of f32.
pub(crate) const LANES: usize = 16;

/// The operands of one tile. All offsets are in `f32` elements.
pub(crate) struct Tile {
    /// The input window of the tile's first pixel: tap (0, 0), channel 0.
    pub src: *const f32,
    /// Distance between two kernel rows of the window.
    pub row_stride: usize,
    /// Distance between the windows of two neighbouring output pixels.
    pub pix_stride: usize,
    /// Kernel size.
    pub k: usize,
    /// Input channels (the window's distance between two taps in a row).
    pub c: usize,
    /// The packed weights of the tile's first block, `[k][k][C][16]`.
    pub weights: *const f32,
    /// Distance between two blocks' packed weights (`k k C 16`).
    pub block_stride: usize,
    /// Distance between two pixels' results in the output (`ob 16` for a
    /// compact `[p][ob][16]` tile).
    pub out_stride: usize,
}

/// The largest pixel count of a tile with `ob` blocks on `isa`, chosen so the
/// accumulators fit in the vector registers.
pub(crate) fn max_pixels(isa: Isa, ob: usize) -> usize {
    match (isa, ob) {
        (Isa::Avx512, 4) => 6,
        (Isa::Avx512, _) => 12,
        (_, 1) => 4,
        _ => 2,
    }
}

/// Calls `f(ob0, obn, p0, pn)` for every tile covering `blocks` blocks of 16
/// output channels (at most `ob_max`, taken 4, 2 or 1 at a time) by `n`
/// pixels (at most [`max_pixels`] for that block count at a time), blocks
/// outermost, so one block group's weights serve all its pixel tiles while
/// they are in cache.
pub(crate) fn for_each_tile(
    isa: Isa,
    blocks: usize,
    ob_max: usize,
    n: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let mut ob0 = 0;
    while ob0 < blocks {
        let left = (blocks - ob0).min(ob_max);
        let obn = if left >= 4 {
            4
        } else if left >= 2 {
            2
        } else {
            1
        };
        let pmax = max_pixels(isa, obn);
        let mut p0 = 0;
        while p0 < n {
            let pn = pmax.min(n - p0);
            f(ob0, obn, p0, pn);
            p0 += pn;
        }
        ob0 += obn;
    }
}

/// The largest block count of a tile on `isa`.
pub(crate) fn max_blocks(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 4,
        _ => 2,
    }
}

/// Accumulates one tile of `p` pixels x `ob` blocks into `out`: pixel `i`,
/// block `j` at `out[i out_stride + j 16 ..][..16]` (overwritten).
///
/// # Safety
/// `t` must describe readable memory: for every pixel `i < p`, tap `(ky, kx)`
/// and channel `ci < t.c`, `t.src + i pix_stride + ky row_stride + kx c + ci`,
/// and for every block `j < ob`, `t.weights + j block_stride + [0, k k C 16)`.
/// `out` must hold at least `(p - 1) out_stride + ob 16` values, with
/// `out_stride >= ob 16`, and `isa` must be supported.
pub(crate) unsafe fn run_tile(isa: Isa, p: usize, ob: usize, t: &Tile, out: &mut [f32]) {
    debug_assert!(t.out_stride >= ob * LANES && out.len() >= (p - 1) * t.out_stride + ob * LANES);
    let out = out.as_mut_ptr();
    macro_rules! pick {
        ($f:ident; $($ob:literal => [$($p:literal)*]),*) => {
            match (ob, p) {
                $($(($ob, $p) => $f::<$p, $ob>(t, out),)*)*
                _ => tile_dyn(p, ob, t, out),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller guarantees the memory and that the CPU has AVX-512.
        Isa::Avx512 => unsafe {
            pick!(tile_avx512;
                4 => [1 2 3 4 5 6],
                2 => [1 2 3 4 5 6 7 8 9 10 11 12],
                1 => [1 2 3 4 5 6 7 8 9 10 11 12])
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller guarantees the memory and that the CPU has AVX2 and FMA.
        Isa::Avx2Fma => unsafe { pick!(tile_avx2; 2 => [1 2], 1 => [1 2 3 4]) },
        // SAFETY: the caller guarantees the memory.
        _ => unsafe { pick!(tile_portable; 2 => [1 2], 1 => [1 2 3 4]) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const P: usize, const OB: usize>(t: &Tile, out: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); OB]; P];
    for ky in 0..t.k {
        for kx in 0..t.k {
            // SAFETY (whole loop): within the window and weights the caller vouched for.
            let x = unsafe { t.src.add(ky * t.row_stride + kx * t.c) };
            let w = unsafe { t.weights.add((ky * t.k + kx) * t.c * LANES) };
            for ci in 0..t.c {
                let mut wv = [_mm512_setzero_ps(); OB];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = unsafe { _mm512_loadu_ps(w.add(j * t.block_stride + ci * LANES)) };
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(unsafe { *x.add(i * t.pix_stride + ci) });
                    for (a, wj) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *wj, *a);
                    }
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            // SAFETY: the caller vouched for the output's extent.
            unsafe { _mm512_storeu_ps(out.add(i * t.out_stride + j * LANES), *a) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const P: usize, const OB: usize>(t: &Tile, out: *mut f32) {
    use std::arch::x86_64::*;
    // Each 16-lane block is two 8-lane vectors.
    let mut acc = [[[_mm256_setzero_ps(); 2]; OB]; P];
    for ky in 0..t.k {
        for kx in 0..t.k {
            // SAFETY (whole loop): within the window and weights the caller vouched for.
            let x = unsafe { t.src.add(ky * t.row_stride + kx * t.c) };
            let w = unsafe { t.weights.add((ky * t.k + kx) * t.c * LANES) };
            for ci in 0..t.c {
                let mut wv = [[_mm256_setzero_ps(); 2]; OB];
                for (j, v) in wv.iter_mut().enumerate() {
                    let p = unsafe { w.add(j * t.block_stride + ci * LANES) };
                    *v = unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] };
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_set1_ps(unsafe { *x.add(i * t.pix_stride + ci) });
                    for (a, wj) in row.iter_mut().zip(&wv) {
                        a[0] = _mm256_fmadd_ps(xv, wj[0], a[0]);
                        a[1] = _mm256_fmadd_ps(xv, wj[1], a[1]);
                    }
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            // SAFETY: the caller vouched for the output's extent.
            unsafe {
                let o = out.add(i * t.out_stride + j * LANES);
                _mm256_storeu_ps(o, a[0]);
                _mm256_storeu_ps(o.add(8), a[1]);
            }
        }
    }
}

/// The portable tile: the same loop nest on arrays, left to the compiler.
unsafe fn tile_portable<const P: usize, const OB: usize>(t: &Tile, out: *mut f32) {
    let mut acc = [[[0f32; LANES]; OB]; P];
    for ky in 0..t.k {
        for kx in 0..t.k {
            // SAFETY (whole loop): within the window and weights the caller vouched for.
            let x = unsafe { t.src.add(ky * t.row_stride + kx * t.c) };
            let w = unsafe { t.weights.add((ky * t.k + kx) * t.c * LANES) };
            for ci in 0..t.c {
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = unsafe { *x.add(i * t.pix_stride + ci) };
                    for (j, a) in row.iter_mut().enumerate() {
                        let wj = unsafe {
                            std::slice::from_raw_parts(
                                w.add(j * t.block_stride + ci * LANES),
                                LANES,
                            )
                        };
                        for (al, &wl) in a.iter_mut().zip(wj) {
                            *al += xv * wl;
                        }
                    }
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            // SAFETY: the caller vouched for the output's extent.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.add(i * t.out_stride + j * LANES), LANES)
            };
            dst.copy_from_slice(a);
        }
    }
}

/// Any tile shape, for shapes no specialised kernel covers.
unsafe fn tile_dyn(p: usize, ob: usize, t: &Tile, out: *mut f32) {
    // SAFETY: the caller vouched for the output's extent.
    let out = unsafe { std::slice::from_raw_parts_mut(out, (p - 1) * t.out_stride + ob * LANES) };
    for i in 0..p {
        out[i * t.out_stride..i * t.out_stride + ob * LANES].fill(0.0);
    }
    for ky in 0..t.k {
        for kx in 0..t.k {
            for ci in 0..t.c {
                for i in 0..p {
                    // SAFETY: within the window the caller vouched for.
                    let xv = unsafe {
                        *t.src
                            .add(i * t.pix_stride + ky * t.row_stride + kx * t.c + ci)
                    };
                    for j in 0..ob {
                        let wo = j * t.block_stride + ((ky * t.k + kx) * t.c + ci) * LANES;
                        for l in 0..LANES {
                            // SAFETY: within the weights the caller vouched for.
                            out[i * t.out_stride + j * LANES + l] +=
                                xv * unsafe { *t.weights.add(wo + l) };
                        }
                    }
                }
            }
        }
    }
}
