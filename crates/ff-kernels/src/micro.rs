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
    /// The packed weights of the tile's first block, `[k][k][C][16]`
    /// (`[k][k][C][w_step]`, the first 16 of each step read).
    pub weights: *const f32,
    /// Distance between two blocks' packed weights (`k k C 16`).
    pub block_stride: usize,
    /// Distance between the weights of two consecutive input channels of a
    /// block: 16 when packed, more for an operand read in place (such as
    /// an NHWC map's pixels, 16 channels of one pixel per step).
    pub w_step: usize,
    /// Distance between two pixels' results in the output (`ob 16` for a
    /// compact `[p][ob][16]` tile).
    pub out_stride: usize,
}

impl Tile {
    /// A 1x1 tile of a matrix product: pixels are the rows of `rows`
    /// (`pix_stride` apart, `depth` values each, from its start), blocks the
    /// packed columns of `packed` (`block_stride` apart, from its start).
    /// Taking the operands as slices at the tile's first row and block keeps
    /// the offsets bounds-checked; [`run_tile`]'s caller still vouches for
    /// the extents the tile reads past them.
    pub(crate) fn rows(
        rows: &[f32],
        pix_stride: usize,
        depth: usize,
        packed: &[f32],
        block_stride: usize,
        out_stride: usize,
    ) -> Tile {
        Tile {
            src: rows.as_ptr(),
            row_stride: 0,
            pix_stride,
            k: 1,
            c: depth,
            weights: packed.as_ptr(),
            block_stride,
            w_step: LANES,
            out_stride,
        }
    }
}

/// The largest pixel count of a tile with `ob` blocks on `isa`, chosen so the
/// accumulators fit in the vector registers. On AVX2 a tile is 6 pixels by
/// one block: 12 ymm accumulators, 2 for the weights and 1 broadcast, the
/// 16 registers' classic 6x16 shape. (2 x 2 blocks, with 8 accumulators,
/// left too little work in flight to hide the FMA latency: the DeiT linear
/// and flow layers measured 10-25% slower, conv_bench best of 5 runs.)
pub(crate) fn max_pixels(isa: Isa, ob: usize) -> usize {
    match (isa, ob) {
        (Isa::Avx512, 4) => 6,
        (Isa::Avx512, _) => 12,
        (Isa::Avx2Fma, _) => 6,
        (_, 1) => 4,
        _ => 2,
    }
}

/// Calls `f(ob0, obn, p0, pn)` for every tile of [`tiles`].
pub(crate) fn for_each_tile(
    isa: Isa,
    blocks: usize,
    ob_max: usize,
    n: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    for (ob0, obn, p0, pn) in tiles(isa, blocks, ob_max, n) {
        f(ob0, obn, p0, pn);
    }
}

/// The tiles `(ob0, obn, p0, pn)` covering `blocks` blocks of 16 output
/// channels (at most `ob_max`, taken 4, 2 or 1 at a time) by `n` pixels (at
/// most [`max_pixels`] for that block count at a time), blocks outermost, so
/// one block group's weights serve all its pixel tiles while they are in
/// cache.
///
/// A loop over this iterator keeps its body in the calling function, so
/// the body compiles with that function's target features: a closure
/// passed to [`for_each_tile`] was outlined and ran the linear layers' GELU
/// epilogue 4 lanes wide (4% of a CaiT forward).
#[inline(always)]
pub(crate) fn tiles(
    isa: Isa,
    blocks: usize,
    ob_max: usize,
    n: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let group = move |ob0: usize| match (blocks - ob0).min(ob_max) {
        4.. => 4,
        2 | 3 => 2,
        _ => 1,
    };
    let (mut ob0, mut p0) = (0, 0);
    std::iter::from_fn(move || {
        if ob0 >= blocks || n == 0 {
            return None;
        }
        let obn = group(ob0);
        let pn = max_pixels(isa, obn).min(n - p0);
        let tile = (ob0, obn, p0, pn);
        p0 += pn;
        if p0 == n {
            (ob0, p0) = (ob0 + obn, 0);
        }
        Some(tile)
    })
}

/// The largest block count of a tile on `isa`.
pub(crate) fn max_blocks(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 4,
        Isa::Avx2Fma => 1,
        _ => 2,
    }
}

/// Accumulates one tile of `p` pixels x `ob` blocks into `out`: pixel `i`,
/// block `j` at `out[i out_stride + j 16 ..][..16]` (overwritten).
///
/// # Safety
/// `t` must describe readable memory: for every pixel `i < p`, tap `(ky, kx)`
/// and channel `ci < t.c`, `t.src + i pix_stride + ky row_stride + kx c + ci`,
/// and for every block `j < ob` and step `s < k k C`, `t.weights + j
/// block_stride + s w_step + [0, 16)`.
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
        Isa::Avx2Fma => unsafe { pick!(tile_avx2; 1 => [1 2 3 4 5 6]) },
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
            let w = unsafe { t.weights.add((ky * t.k + kx) * t.c * t.w_step) };
            for ci in 0..t.c {
                let mut wv = [_mm512_setzero_ps(); OB];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = unsafe { _mm512_loadu_ps(w.add(j * t.block_stride + ci * t.w_step)) };
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
            let w = unsafe { t.weights.add((ky * t.k + kx) * t.c * t.w_step) };
            for ci in 0..t.c {
                let mut wv = [[_mm256_setzero_ps(); 2]; OB];
                for (j, v) in wv.iter_mut().enumerate() {
                    let p = unsafe { w.add(j * t.block_stride + ci * t.w_step) };
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
            let w = unsafe { t.weights.add((ky * t.k + kx) * t.c * t.w_step) };
            for ci in 0..t.c {
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = unsafe { *x.add(i * t.pix_stride + ci) };
                    for (j, a) in row.iter_mut().enumerate() {
                        let wj = unsafe {
                            std::slice::from_raw_parts(
                                w.add(j * t.block_stride + ci * t.w_step),
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
                        let wo = j * t.block_stride + ((ky * t.k + kx) * t.c + ci) * t.w_step;
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

/// `acc[(r0 + r) o + oo] += sum over k < len of rows[r row_stride + k]
/// packed[(oo / 16) block_stride + k 16 + oo % 16]` for every row `r <
/// n_rows` and output channel `oo < o`: a product with a reduction of `len`
/// on the micro-kernel (the rows as its pixels, the reduction as its input
/// channels), added into a `[rows, o]` accumulator. `tile` is scratch of at
/// least [`product_scratch_len`] values. The weight gradients run on it.
///
/// # Panics
/// When `rows`, `packed`, `acc` or `tile` are shorter than that needs, or
/// `isa` is not supported.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_product(
    isa: Isa,
    n_rows: usize,
    len: usize,
    rows: &[f32],
    row_stride: usize,
    packed: &[f32],
    block_stride: usize,
    o: usize,
    acc: &mut [f32],
    r0: usize,
    tile: &mut [f32],
) {
    let cols = Columns {
        data: packed,
        block_stride,
        step: LANES,
    };
    add_product_of(isa, n_rows, len, rows, row_stride, &cols, o, acc, r0, tile);
}

/// The second operand of [`add_product_of`]: block `j`'s values for
/// reduction index `k` are `data[j block_stride + k step ..][..16]`.
pub(crate) struct Columns<'a> {
    pub data: &'a [f32],
    pub block_stride: usize,
    pub step: usize,
}

impl<'a> Columns<'a> {
    /// An NHWC map read in place as the columns of a product over its
    /// pixels: pixel `k`'s channels `16 j ..` are block `j`'s values for
    /// reduction index `k` (so the channel count must fill whole blocks
    /// for every read to stay inside the map).
    pub(crate) fn nhwc(data: &'a [f32], pixel_stride: usize) -> Self {
        Self {
            data,
            block_stride: LANES,
            step: pixel_stride,
        }
    }
}

/// [`add_product`] with its second operand in any [`Columns`] layout.
///
/// # Panics
/// As [`add_product`], and when `cols` is shorter than its `o` columns of
/// `len` steps need.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_product_of(
    isa: Isa,
    n_rows: usize,
    len: usize,
    rows: &[f32],
    row_stride: usize,
    cols: &Columns,
    o: usize,
    acc: &mut [f32],
    r0: usize,
    tile: &mut [f32],
) {
    if n_rows == 0 || len == 0 || o == 0 {
        return;
    }
    let blocks = o.div_ceil(LANES);
    let Columns {
        data: packed,
        block_stride,
        step,
    } = *cols;
    assert!(isa.is_supported());
    assert!(row_stride >= len && rows.len() >= (n_rows - 1) * row_stride + len);
    assert!(packed.len() >= (blocks - 1) * block_stride + (len - 1) * step + LANES);
    assert!(acc.len() >= (r0 + n_rows) * o && tile.len() >= product_scratch_len(isa));
    let p = Product {
        n_rows,
        len,
        rows,
        row_stride,
        packed,
        block_stride,
        step,
        o,
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (asserted), so AVX-512F is present.
        Isa::Avx512 => unsafe { add_tiles_avx512(isa, &p, acc, r0, tile) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (asserted), so AVX2 and FMA are present.
        Isa::Avx2Fma => unsafe { add_tiles_avx2(isa, &p, acc, r0, tile) },
        _ => add_tiles(isa, &p, acc, r0, tile),
    }
}

/// `out[i out_stride + j 16 ..][..16] = sum_k rows[i row_stride + k]
/// packed[j block_stride + k 16 ..][..16]` for `n_rows` rows of `depth`
/// values and `blocks` packed blocks: a product written (not accumulated)
/// into a strided output, such as one head's columns of a wider matrix.
///
/// Panics unless the rows, blocks and output hold those extents.
pub(crate) fn write_product(isa: Isa, p: &StridedProduct, out: &mut [f32]) {
    let StridedProduct {
        rows,
        n_rows,
        row_stride,
        depth,
        packed,
        blocks,
        block_stride,
        out_stride,
    } = *p;
    if n_rows == 0 || blocks == 0 {
        return;
    }
    assert!(
        isa.is_supported()
            && row_stride >= depth
            && rows.len() >= (n_rows - 1) * row_stride + depth
            && block_stride >= depth * LANES
            && packed.len() >= (blocks - 1) * block_stride + depth * LANES
            && out_stride >= blocks * LANES
            && out.len() >= (n_rows - 1) * out_stride + blocks * LANES
    );
    for_each_tile(isa, blocks, max_blocks(isa), n_rows, |ob0, obn, p0, pn| {
        let t = Tile::rows(
            &rows[p0 * row_stride..],
            row_stride,
            depth,
            &packed[ob0 * block_stride..],
            block_stride,
            out_stride,
        );
        // SAFETY: rows p0 .. p0 + pn and blocks ob0 .. ob0 + obn lie in
        // their slices, and the output from row p0, block ob0 holds
        // (pn - 1) out_stride + obn 16 values (all asserted); `isa` is
        // supported (asserted).
        unsafe { run_tile(isa, pn, obn, &t, &mut out[p0 * out_stride + ob0 * LANES..]) };
    });
}

/// The operands of [`write_product`].
#[derive(Clone, Copy)]
pub(crate) struct StridedProduct<'a> {
    pub rows: &'a [f32],
    pub n_rows: usize,
    pub row_stride: usize,
    pub depth: usize,
    pub packed: &'a [f32],
    pub blocks: usize,
    pub block_stride: usize,
    pub out_stride: usize,
}

/// The operands of [`add_product`], their bounds checked.
struct Product<'a> {
    n_rows: usize,
    len: usize,
    rows: &'a [f32],
    row_stride: usize,
    packed: &'a [f32],
    block_stride: usize,
    step: usize,
    o: usize,
}

/// [`add_tiles`] compiled for AVX2, so that adding each tile into the
/// accumulator is 256-bit wide (it was a sixth of the DeiT flows' weight
/// gradient time with SSE2 adds).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_tiles_avx2(isa: Isa, p: &Product, acc: &mut [f32], r0: usize, tile: &mut [f32]) {
    add_tiles(isa, p, acc, r0, tile);
}

/// [`add_tiles`] compiled for AVX-512 (16-lane adds).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_tiles_avx512(isa: Isa, p: &Product, acc: &mut [f32], r0: usize, tile: &mut [f32]) {
    add_tiles(isa, p, acc, r0, tile);
}

/// The body of [`add_product`].
#[inline(always)]
fn add_tiles(isa: Isa, p: &Product, acc: &mut [f32], r0: usize, tile: &mut [f32]) {
    let (n_rows, len, rows, row_stride) = (p.n_rows, p.len, p.rows, p.row_stride);
    let (packed, block_stride, o) = (p.packed, p.block_stride, p.o);
    let blocks = o.div_ceil(LANES);
    let ob_max = max_blocks(isa);
    // A loop, not a closure, so the adds compile with the wrapper's features.
    for (ob0, obn, p0, pn) in tiles(isa, blocks, ob_max, n_rows) {
        let t = Tile {
            w_step: p.step,
            ..Tile::rows(
                &rows[p0 * row_stride..],
                row_stride,
                len,
                &packed[ob0 * block_stride..],
                block_stride,
                obn * LANES,
            )
        };
        // SAFETY: rows p0 .. p0 + pn hold len values each and blocks ob0 ..
        // ob0 + obn hold len steps of 16 values each (asserted bounds); `tile` holds
        // pmax obn 16 values; `isa` is supported (asserted).
        unsafe { run_tile(isa, pn, obn, &t, tile) };
        add_tile(acc, o, tile, r0 + p0, pn, ob0, obn);
    }
}

/// The scratch [`add_product`] needs on `isa`: its largest tile.
pub(crate) fn product_scratch_len(isa: Isa) -> usize {
    let ob_max = max_blocks(isa);
    max_pixels(isa, 1).max(max_pixels(isa, ob_max)) * ob_max * LANES
}

/// Adds a compact `[pn][obn][16]` tile into rows `r0 ..` of the `[rows, o]`
/// accumulator, channels `ob0 16 ..` (the last block's padding dropped).
#[inline(always)]
fn add_tile(acc: &mut [f32], o: usize, tile: &[f32], r0: usize, pn: usize, ob0: usize, obn: usize) {
    for i in 0..pn {
        for j in 0..obn {
            let o0 = (ob0 + j) * LANES;
            let lanes = LANES.min(o - o0);
            let dst = &mut acc[(r0 + i) * o + o0..][..lanes];
            let src = &tile[(i * obn + j) * LANES..][..lanes];
            for (d, v) in dst.iter_mut().zip(src) {
                *d += v;
            }
        }
    }
}
