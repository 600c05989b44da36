//! The weight gradient of a 3x3, stride-1, padding-1 convolution through
//! Winograd: F(2x2, 3x3) (16 products over the 2x2 output tiles instead of 9
//! over the pixels, 2.25x fewer multiply-adds than the direct weight
//! gradient) or F(4x4, 3x3) (36 products over 4x4 tiles, 4x fewer).
//!
//! The forward pass is `Y = A^T [U . V] A` per tile, with `U = G g G^T` (the
//! weights) and `V = B^T d B` (the tile's `alpha x alpha` input window), so
//! `dU[xi][c][o] = sum over tiles of V[xi][c] dM[xi][o]` with
//! `dM = A dY A^T`, and the weight gradient is `dg = G^T dU G`.
//!
//! Work is split into a number of groups of whole tile rows that depends on
//! the shapes only, each with its own accumulator, added in order at the
//! end, so the result does not depend on how the pool schedules the groups; a group runs
//! in chunks of at most [`Variant`]-dependent many tiles. For a chunk, `V`
//! is formed with the tiles along the vector lanes, from channel-major
//! copies of the input whose padded rows are stored as their columns modulo
//! the tile side `m` (so each of a tile's columns is one contiguous load for
//! 16 neighbouring tiles), and `dM` with the output channels along the
//! lanes, straight from the NHWC gradient. Each of the products then runs on
//! the convolution micro-kernel with the input channels as its pixels and
//! the chunk's tiles as its reduction; `G^T dU G` is formed in f64 and
//! rounded once.

use rayon::prelude::*;

use crate::isa::Isa;
use crate::layout::{load_lanes, Activation, NhwcRef};
use crate::micro::{add_product, product_scratch_len, LANES};
use crate::winograd::Variant;

/// Accumulators: the tile rows are dealt into at most this many runs...
const GROUPS: usize = 8;
/// ... of at least about this many tiles each (a shorter reduction per
/// product reads and writes the accumulator more often per multiply-add),
/// but at least two runs, so that two cores share the work...
const GROUP_TILES: usize = 128;
/// ... and no more runs than keep their accumulators within this many
/// values together (16 MB, half of a 32 MB L3): each run's products read
/// and write its whole `planes x C x O` accumulator once per chunk, and
/// DeiT's 61 -> 768 layer with 8 runs of 6.7 MB each was 25% slower than
/// with 2 (conv_bench, batch 32, Zen 3). The count stays a function of
/// the shapes alone, so the sums do not depend on the thread count either.
const GROUP_ACC_VALUES: usize = 4 << 20;

/// Values of the summed accumulator per task of the final sum over runs.
const SUM_CHUNK: usize = 16 * 1024;

/// The most tiles in one chunk (the reduction length of each product):
/// larger chunks read and write the `planes x C x O` accumulator less often
/// per multiply-add, smaller ones keep `V` and `dM` closer to the core.
fn chunk_tiles(variant: Variant) -> usize {
    match variant {
        Variant::F2 => 128,
        Variant::F4 => 160,
    }
}

/// One 16-lane vector, written as arrays so the compiler vectorises it.
type V16 = [f32; LANES];

/// A thread's buffers for one chunk: `V` and `dM`.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    dm: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// `dW` as `[9 C + 1, O]` (rows `(ky 3 + kx) C + c`, the last row the bias
/// gradient) of a 3x3/1/1 convolution through Winograd `variant`; shapes
/// were checked by the caller (`input`: `[n, h, w, C]`, `grad_out`:
/// `[n, h, w, O]`).
pub(crate) fn weight_grad(
    isa: Isa,
    variant: Variant,
    input: &NhwcRef,
    act: Activation,
    grad_out: &NhwcRef,
    out: &mut [f32],
) {
    let [n, h, w, c] = input.dims();
    let o = grad_out.dims()[3];
    let blocks = o.div_ceil(LANES);
    let m = variant.m();
    let np = variant.planes();
    let tiles = w.div_ceil(m);
    let tile_rows = h.div_ceil(m);
    let planes = Planes::new(isa, input, act, m, tiles, tile_rows);

    // Group g sums the tile rows units g / groups .. units (g + 1) / groups
    // (between floor and ceil of units / groups of them), in chunks of as
    // even a size as fits the cap.
    let units = n * tile_rows;
    let by_memory = GROUP_ACC_VALUES / (np * c * o).max(1);
    let by_size = (units * tiles / GROUP_TILES)
        .min(by_memory)
        .clamp(2, GROUPS);
    // A power of two, so that 2, 4 or 8 threads share the groups evenly.
    let groups = (1usize << by_size.ilog2()).min(units);
    let cap = (chunk_tiles(variant) / tiles).max(1);
    let max_tc = units.div_ceil(groups).min(cap) * tiles;
    let slices = Slices::new(np, c, blocks, max_tc);
    let scratch_len = product_scratch_len(isa);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let (g0, g1) = (units * group / groups, units * (group + 1) / groups);
            let per_chunk = (g1 - g0).div_ceil((g1 - g0).div_ceil(cap));
            let mut acc = vec![0f32; np * c * o];
            let mut bias = vec![0f32; blocks * LANES];
            // Every value of v and dm a chunk reads is written first; the
            // buffers are kept per thread, so steps do not fault them in anew.
            let mut buffers = SCRATCH.take();
            let Scratch { v, dm } = &mut buffers;
            for (buf, len) in [
                (&mut *v, np * (slices.chans * (max_tc + LANES) + LANES)),
                (&mut *dm, np * (slices.blocks * max_tc + 1) * LANES),
            ] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            let mut u0 = g0;
            while u0 < g1 {
                let u1 = (u0 + per_chunk).min(g1);
                let tc = (u1 - u0) * tiles;
                // V's rows have room for a whole vector past the chunk's
                // last tile, so every tile group is stored whole: the lanes
                // past a tile row are overwritten by the next row, those
                // past the chunk never read.
                let vs = tc + LANES;
                let base = Chunk {
                    u0,
                    u1,
                    tile_rows,
                    tiles,
                    tc,
                    vs,
                    vp: slices.chans * vs + LANES,
                    dp: (slices.blocks * tc + 1) * LANES,
                    c0: 0,
                    c1: c,
                    blk0: 0,
                    blk1: blocks,
                };
                let (vp, dp) = (base.vp, base.dp);
                // The products of one slice of V with one of dM, added into
                // the accumulator's planes. Each plane's product adds into
                // its own plane in the same order whichever thread runs it,
                // so the planes are shared with the pool too: with fewer
                // runs than threads (the cap on their accumulators) every
                // thread still has work, and the sums stay the same.
                let products = |chunk: &Chunk, v: &[f32], dm: &[f32], acc: &mut [f32]| {
                    let (nc, c0) = (chunk.c1 - chunk.c0, chunk.c0);
                    let nb = chunk.blk1 - chunk.blk0;
                    let (o0, w) = slices.columns(o, chunk.blk0, chunk.blk1);
                    acc.par_chunks_mut(c * o).enumerate().for_each_init(
                        || vec![0f32; scratch_len],
                        |tile, (xi, plane)| {
                            let vx = &v[xi * vp..xi * vp + nc * vs];
                            let dmx = &dm[xi * dp..xi * dp + nb * tc * LANES];
                            let accx = &mut plane[c * o0..c * (o0 + w)];
                            add_product(isa, nc, tc, vx, vs, dmx, tc * LANES, w, accx, c0, tile);
                        },
                    );
                };
                if slices.by_output {
                    // V whole, dM a few blocks at a time.
                    transform_input(isa, variant, &planes, &base, v);
                    for blk0 in (0..blocks).step_by(slices.blocks) {
                        let chunk = Chunk {
                            blk0,
                            blk1: (blk0 + slices.blocks).min(blocks),
                            ..base
                        };
                        for row in chunk.rows() {
                            transform_grad(isa, variant, grad_out, &row, dm, &mut bias);
                        }
                        products(&chunk, v, dm, &mut acc);
                    }
                } else {
                    // dM whole, V a few input channels at a time.
                    for row in base.rows() {
                        transform_grad(isa, variant, grad_out, &row, dm, &mut bias);
                    }
                    for c0 in (0..c).step_by(slices.chans) {
                        let chunk = Chunk {
                            c0,
                            c1: (c0 + slices.chans).min(c),
                            ..base
                        };
                        transform_input(isa, variant, &planes, &chunk, v);
                        products(&chunk, v, dm, &mut acc);
                    }
                }
                u0 = u1;
            }
            SCRATCH.set(buffers);
            (acc, bias)
        })
        .collect();

    let mut du = vec![0f32; np * c * o];
    let mut bias = vec![0f32; blocks * LANES];
    du.par_chunks_mut(SUM_CHUNK).enumerate().for_each(|(i, d)| {
        for (acc, _) in &partials {
            for (d, v) in d.iter_mut().zip(&acc[i * SUM_CHUNK..]) {
                *d += v;
            }
        }
    });
    for (_, b) in &partials {
        for (d, v) in bias.iter_mut().zip(b) {
            *d += v;
        }
    }
    // dg[ky][kx] = sum over i, j of G[i][ky] dU[i alpha + j] G[j][kx], in
    // f64; one input channel per task, its rows of dU read and its 9 rows of
    // dg written in order.
    let gm = variant.g();
    let a = variant.alpha();
    let plane = c * o;
    let (taps, bias_row) = out.split_at_mut(9 * plane);
    let mut rows: Vec<(usize, Vec<&mut [f32]>)> = (0..c).map(|ci| (ci, Vec::new())).collect();
    for (row, dst) in taps.chunks_mut(o).enumerate() {
        rows[row % c].1.push(dst);
    }
    // `oo` indexes the accumulator and the 9 rows written alike.
    #[allow(clippy::needless_range_loop)]
    rows.into_par_iter().for_each(|(ci, mut dst)| {
        for oo in 0..o {
            let at = slices.index(c, o, ci, oo);
            // (dU G)[i][kx], then G^T along i.
            let mut ug = [[0f64; 3]; 6];
            for (i, ugi) in ug.iter_mut().enumerate().take(a) {
                for (j, gj) in gm.iter().enumerate() {
                    let u = f64::from(du[(i * a + j) * plane + at]);
                    for (x, g) in ugi.iter_mut().zip(gj) {
                        *x += u * g;
                    }
                }
            }
            for ky in 0..3 {
                for kx in 0..3 {
                    let v: f64 = gm.iter().zip(&ug).map(|(gi, ugi)| gi[ky] * ugi[kx]).sum();
                    dst[ky * 3 + kx][oo] = v as f32;
                }
            }
        }
    });
    bias_row.copy_from_slice(&bias[..o]);
}

/// How a chunk's products are cut so that the transformed values they read
/// stay in the core's cache: `V` (all input channels) with `dM` a few
/// output blocks at a time when there are more output channels than input
/// ones, else `dM` whole with `V` a few input channels at a time. The
/// accumulator's planes are `[slice][C][width]` by output columns in the
/// first case (each slice's `C` rows of its width, one after the other),
/// `[C][O]` in the second.
struct Slices {
    by_output: bool,
    /// Input channels per slice of `V` (all of them when `by_output`).
    chans: usize,
    /// Output blocks per slice of `dM` (all of them unless `by_output`).
    blocks: usize,
}

/// Transformed values a slice aims at (a quarter of a Zen 4 core's 1 MiB
/// L2 cache, the rest left to the whole side and the micro-kernel).
const SLICE_VALUES: usize = 64 * 1024;

impl Slices {
    fn new(np: usize, c: usize, blocks: usize, tc: usize) -> Self {
        if c <= blocks * LANES {
            // At least 4 blocks, the micro-kernel's widest tile.
            let per = (SLICE_VALUES / (np * tc * LANES)).max(4);
            Self {
                by_output: true,
                chans: c,
                blocks: per.min(blocks),
            }
        } else {
            let per = (SLICE_VALUES / (np * (tc + LANES))).max(LANES);
            Self {
                by_output: false,
                chans: per.min(c),
                blocks,
            }
        }
    }

    /// The first output column and the width of the slice of blocks
    /// `blk0 .. blk1` (all `o` columns unless slicing by output).
    fn columns(&self, o: usize, blk0: usize, blk1: usize) -> (usize, usize) {
        if self.by_output {
            (blk0 * LANES, (blk1 * LANES).min(o) - blk0 * LANES)
        } else {
            (0, o)
        }
    }

    /// Where `(ci, oo)` of one plane of the accumulator is.
    fn index(&self, c: usize, o: usize, ci: usize, oo: usize) -> usize {
        let width = self.blocks * LANES;
        let (o0, w) = self.columns(o, oo / width * self.blocks, (oo / width + 1) * self.blocks);
        c * o0 + ci * w + (oo - o0)
    }
}

/// The input, channel-major and zero-padded by one pixel on every side (to
/// whole tiles), each padded row stored as its columns `m k + r` for
/// `r = 0 .. m`, one run of `seg` values per `r`:
/// `[n][C][rows][m][seg]`, `seg = tiles + 1`.
struct Planes {
    key: PlaneKey,
    data: Vec<f32>,
    c: usize,
    rows: usize,
    m: usize,
    seg: usize,
    tiles: usize,
}

/// What fixes a [`Planes`] buffer's layout and the positions its fill
/// writes: the input's dimensions and the tile side.
#[derive(Clone, Copy, PartialEq, Eq)]
struct PlaneKey {
    dims: [usize; 4],
    m: usize,
}

/// Buffers kept per thread for [`Planes`]: a flow step's few layer shapes.
const PLANE_BUFFERS_KEPT: usize = 4;

thread_local! {
    static PLANE_BUFFERS: std::cell::RefCell<Vec<(PlaneKey, Vec<f32>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for Planes {
    /// Keeps the buffer for the next call with the same shape (the oldest
    /// kept one makes room).
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        PLANE_BUFFERS.with_borrow_mut(|cache| {
            if cache.len() >= PLANE_BUFFERS_KEPT {
                cache.remove(0);
            }
            cache.push((self.key, data));
        });
    }
}

/// One task of [`Planes::new`]: channels `c0 .. c0 + 16` of image `b`.
struct PlaneJob<'a> {
    input: &'a NhwcRef<'a>,
    act: Activation,
    b: usize,
    c0: usize,
    seg: usize,
    plane_len: usize,
}

/// [`fill_planes`] compiled for AVX-512 (its 16-lane arrays become vector
/// instructions).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_planes_avx512<const M: usize>(job: &PlaneJob, chunk: &mut [f32]) {
    fill_planes::<M>(job, chunk);
}

/// [`fill_planes`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fill_planes_avx2<const M: usize>(job: &PlaneJob, chunk: &mut [f32]) {
    fill_planes::<M>(job, chunk);
}

/// Writes the task's (up to) 16 planes into `chunk`, 64 pixels of a row at a
/// time: their channels are read pixel by pixel into a block, then each
/// channel's pixels are stored as runs of the padded columns modulo `M`.
#[inline(always)]
fn fill_planes<const M: usize>(job: &PlaneJob, chunk: &mut [f32]) {
    const BLOCK: usize = 4 * LANES;
    let &PlaneJob {
        input,
        act,
        b,
        c0,
        seg,
        plane_len,
    } = job;
    let [_, h, w, c] = input.dims();
    let cn = LANES.min(c - c0);
    let mut block = [[0f32; BLOCK]; LANES];
    for y in 0..h {
        let row = (y + 1) * M * seg;
        let mut x0 = 0;
        while x0 < w {
            let nx = BLOCK.min(w - x0);
            for x in 0..nx {
                let px = &input.pixel_at(b, y, x0 + x)[c0..c0 + cn];
                for (vals, &v) in block.iter_mut().zip(px) {
                    vals[x] = act.apply(v);
                }
            }
            // Pixel x0 + k is padded column x0 + k + 1: residue r holds the
            // pixels k = (r + M - 1) mod M + M l at x0 / M + l (+ 1 for
            // r = 0, whose first column is the padding).
            for (j, vals) in block.iter().enumerate().take(cn) {
                let base = j * plane_len + row;
                for r in 0..M {
                    let k = (r + M - 1) % M;
                    if nx <= k {
                        continue;
                    }
                    let count = (nx - k).div_ceil(M);
                    let at = base + r * seg + x0 / M + usize::from(r == 0);
                    for (l, dst) in chunk[at..at + count].iter_mut().enumerate() {
                        *dst = vals[k + M * l];
                    }
                }
            }
            x0 += nx;
        }
    }
}

impl Planes {
    fn new(
        isa: Isa,
        input: &NhwcRef,
        act: Activation,
        m: usize,
        tiles: usize,
        tile_rows: usize,
    ) -> Self {
        let [n, _, _, c] = input.dims();
        let rows = m * tile_rows + 2;
        let seg = tiles + 1;
        let plane_len = rows * m * seg;
        // A full vector read from the last row's last residue may run past
        // the end; those lanes are never stored. A buffer of the same input
        // shape from an earlier call has its padding zero already (the fill
        // writes the same interior every time), so only a new shape is
        // zeroed: 36 MB for DeiT's 384-channel layer at batch 32.
        let key = PlaneKey {
            dims: input.dims(),
            m,
        };
        let mut data = PLANE_BUFFERS
            .with_borrow_mut(|cache| {
                let at = cache.iter().position(|(k, _)| *k == key)?;
                Some(cache.swap_remove(at).1)
            })
            .unwrap_or_else(|| crate::zeroed(n * c * plane_len + LANES));
        let tasks = crate::layout::plane_groups(&mut data[..n * c * plane_len], c, plane_len);
        debug_assert_eq!(tasks.len(), n * c.div_ceil(LANES));
        tasks.into_par_iter().for_each(|(b, gi, chunk)| {
            let job = PlaneJob {
                input,
                act,
                b,
                c0: gi * LANES,
                seg,
                plane_len,
            };
            match (isa, m) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (the caller's), so AVX-512F is
                // present.
                (Isa::Avx512, 2) => unsafe { fill_planes_avx512::<2>(&job, chunk) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Avx512, _) => unsafe { fill_planes_avx512::<4>(&job, chunk) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA
                // are present.
                (Isa::Avx2Fma, 2) => unsafe { fill_planes_avx2::<2>(&job, chunk) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Avx2Fma, _) => unsafe { fill_planes_avx2::<4>(&job, chunk) },
                (_, 2) => fill_planes::<2>(&job, chunk),
                _ => fill_planes::<4>(&job, chunk),
            }
        });
        Self {
            key,
            data,
            c,
            rows,
            m,
            seg,
            tiles,
        }
    }

    /// The values of one padded row.
    fn row_len(&self) -> usize {
        self.m * self.seg
    }

    fn plane(&self, b: usize, ci: usize) -> &[f32] {
        let len = self.rows * self.row_len();
        let at = (b * self.c + ci) * len;
        // The slack after the last plane belongs to every plane's reads.
        &self.data[at..(at + len + LANES).min(self.data.len())]
    }
}

/// A chunk: the tile rows `u0 .. u1` (`b tile_rows + ty`) of `tiles` tiles
/// each, `tc` tiles in all, whose rows of `V` are `vs >= tc + 16` values
/// apart; the planes of `V` are `vp` values apart and those of `dM` `dp`,
/// each one vector more than they hold, so that a tile's many planes do not
/// all fall on the same cache sets (conv_bench showed no difference either
/// way on DeiT's layers; it costs one vector per plane).
struct Chunk {
    u0: usize,
    u1: usize,
    tile_rows: usize,
    tiles: usize,
    tc: usize,
    vs: usize,
    vp: usize,
    dp: usize,
    /// The input channels `c0 .. c1` whose `V` is formed (stored from row 0).
    c0: usize,
    c1: usize,
    /// The blocks of 16 output channels `blk0 .. blk1` whose `dM` is formed
    /// (stored from block 0).
    blk0: usize,
    blk1: usize,
}

impl Chunk {
    /// The chunk's tile rows, in order.
    fn rows(&self) -> impl Iterator<Item = TileRow> + '_ {
        (self.u0..self.u1).map(|u| TileRow {
            b: u / self.tile_rows,
            ty: u % self.tile_rows,
            tiles: self.tiles,
            tc: self.tc,
            dp: self.dp,
            blk0: self.blk0,
            blk1: self.blk1,
            t_at: (u - self.u0) * self.tiles,
        })
    }
}

/// Where one row of tiles comes from and goes: tile row `ty` of image `b`
/// (`tiles` tiles), stored from tile `t_at` of a chunk of `tc` tiles (planes
/// of `dM` `dp` values apart).
struct TileRow {
    b: usize,
    ty: usize,
    tiles: usize,
    tc: usize,
    dp: usize,
    blk0: usize,
    blk1: usize,
    t_at: usize,
}

/// `V[xi][c][t_at + t] = (B^T d B)[xi]` for the tiles `t` of each tile row
/// of the chunk (`v`: `[planes][C][vs]`), one input channel at a time (its
/// rows of `V` are written whole before the next channel's); the lanes of a
/// last tile group past a row are stored too (garbage, for the next row or
/// nothing to overwrite).
fn transform_input(isa: Isa, variant: Variant, planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    match (variant, isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX-512F is present.
        (Variant::F2, Isa::Avx512) => unsafe { transform_input_avx512(planes, chunk, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA are present.
        (Variant::F2, Isa::Avx2Fma) => unsafe { transform_input_avx2(planes, chunk, v) },
        (Variant::F2, _) => transform_input_body(planes, chunk, v),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX-512F is present.
        (Variant::F4, Isa::Avx512) => unsafe { transform_input4_avx512(planes, chunk, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA are present.
        (Variant::F4, Isa::Avx2Fma) => unsafe { transform_input4_avx2(planes, chunk, v) },
        (Variant::F4, _) => transform_input4(planes, chunk, v),
    }
}

/// [`transform_input_body`] with AVX-512 intrinsics, 16 tiles per vector.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_input_avx512(planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    use std::arch::x86_64::*;
    let (tc, vs, vp) = (chunk.tc, chunk.vs, chunk.vp);
    let (c, half, tiles) = (planes.c, planes.seg, planes.tiles);
    let row_len = 2 * half;
    assert!(v.len() >= 16 * vp && vp >= (chunk.c1 - chunk.c0) * vs && chunk.c1 <= c);
    assert!((chunk.u1 - chunk.u0) * tiles == tc && tc < vs);
    for (ci, row) in (chunk.c0..chunk.c1).flat_map(|ci| chunk.rows().map(move |row| (ci, row))) {
        let (b, ty, t_at) = (row.b, row.ty, row.t_at);
        let plane = planes.plane(b, ci);
        // The last read of the row below starts at (2 ty + 3) row_len + half
        // + t0 + 1 with t0 < tiles, and plane() holds 16 values past that
        // row's end (half = tiles + 1).
        assert!(plane.len() >= (2 * ty + 4) * row_len + LANES);
        let p = plane.as_ptr();
        let out = v.as_mut_ptr();
        let mut t0 = 0;
        while t0 < tiles {
            let nt = LANES.min(tiles - t0);
            let mask = crate::winograd::lane_mask(nt);
            // SAFETY (block): the loads read plane[base .. base + half + 1 +
            // 16) with base = (2 ty + i) row_len + t0, i < 4, inside the
            // asserted length; the stores write the nt lanes of
            // v[((xi c + ci) vs + t_at + t0) ..], inside the asserted length.
            unsafe {
                let mut d = [[_mm512_setzero_ps(); 4]; 4];
                for (i, row) in d.iter_mut().enumerate() {
                    let base = (2 * ty + i) * row_len + t0;
                    *row = [
                        _mm512_loadu_ps(p.add(base)),
                        _mm512_loadu_ps(p.add(base + half)),
                        _mm512_loadu_ps(p.add(base + 1)),
                        _mm512_loadu_ps(p.add(base + half + 1)),
                    ];
                }
                for (xi, val) in crate::winograd::input_tile_avx512(d)
                    .into_iter()
                    .enumerate()
                {
                    let at = xi * vp + (ci - chunk.c0) * vs + t_at + t0;
                    _mm512_mask_storeu_ps(out.add(at), mask, val);
                }
            }
            t0 += nt;
        }
    }
}

/// [`transform_input_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_input_avx2(planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    transform_input_body(planes, chunk, v);
}

#[inline(always)]
fn transform_input_body(planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    let (vs, vp) = (chunk.vs, chunk.vp);
    let (half, tiles) = (planes.seg, planes.tiles);
    let row_len = 2 * half;
    for (ci, row) in (chunk.c0..chunk.c1).flat_map(|ci| chunk.rows().map(move |row| (ci, row))) {
        let (b, ty, t_at) = (row.b, row.ty, row.t_at);
        let plane = planes.plane(b, ci);
        let mut t0 = 0;
        while t0 < tiles {
            // d[i][j]: padded row 2 ty + i, column 2 t + j of 16 tiles.
            let ld = |at: usize| -> V16 {
                let mut a = [0f32; LANES];
                a.copy_from_slice(&plane[at..at + LANES]);
                a
            };
            let mut d = [[[0f32; LANES]; 4]; 4];
            for (i, row) in d.iter_mut().enumerate() {
                let base = (2 * ty + i) * row_len + t0;
                *row = [ld(base), ld(base + half), ld(base + 1), ld(base + half + 1)];
            }
            for (xi, val) in crate::winograd::input_tile(&d).iter().enumerate() {
                let at = xi * vp + (ci - chunk.c0) * vs + t_at + t0;
                v[at..at + LANES].copy_from_slice(val);
            }
            t0 += LANES;
        }
    }
}

/// `dM[xi][blk][t_at + t][16] = (A dY A^T)[xi]` for the tiles of tile row
/// `ty` of image `b` (`dY` zero outside the image and past `O`), into a
/// chunk of `tc` tiles, and the tiles' gradient summed into `bias`.
fn transform_grad(
    isa: Isa,
    variant: Variant,
    grad: &NhwcRef,
    row: &TileRow,
    dm: &mut [f32],
    bias: &mut [f32],
) {
    match (variant, isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX-512F is present.
        (Variant::F2, Isa::Avx512) => unsafe { transform_grad_avx512(grad, row, dm, bias) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA are present.
        (Variant::F2, Isa::Avx2Fma) => unsafe { transform_grad_avx2(grad, row, dm, bias) },
        (Variant::F2, _) => transform_grad_body(grad, row, dm, bias),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX-512F is present.
        (Variant::F4, Isa::Avx512) => unsafe { transform_grad4_avx512(grad, row, dm, bias) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA are present.
        (Variant::F4, Isa::Avx2Fma) => unsafe { transform_grad4_avx2(grad, row, dm, bias) },
        (Variant::F4, _) => transform_grad4(grad, row, dm, bias),
    }
}

/// [`transform_grad_body`] with AVX-512 intrinsics, 16 output channels per
/// vector.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_grad_avx512(grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    use std::arch::x86_64::*;
    let (b, ty, tiles) = (row.b, row.ty, row.tiles);
    let (tc, t_at) = (row.tc, row.t_at);
    let [_, h, w, o] = grad.dims();
    let blocks = o.div_ceil(LANES);
    let dp = row.dp;
    assert!(dm.len() >= 16 * dp && dp >= (row.blk1 - row.blk0) * tc * LANES && t_at + tiles <= tc);
    assert!(row.blk1 <= blocks);
    assert!(bias.len() >= blocks * LANES);
    let out = dm.as_mut_ptr();
    for t in 0..tiles {
        for blk in row.blk0..row.blk1 {
            let o0 = blk * LANES;
            let lanes = LANES.min(o - o0);
            let mask = crate::winograd::lane_mask(lanes);
            let ld = |dy: usize, dx: usize| {
                let (y, x) = (2 * ty + dy, 2 * t + dx);
                if y < h && x < w {
                    let px = &grad.pixel_at(b, y, x)[o0..o0 + lanes];
                    // SAFETY: the mask covers the `lanes` values of `px`.
                    unsafe { _mm512_maskz_loadu_ps(mask, px.as_ptr()) }
                } else {
                    _mm512_setzero_ps()
                }
            };
            let (g00, g01, g10, g11) = (ld(0, 0), ld(0, 1), ld(1, 0), ld(1, 1));
            // A dY (rows): [g0, g0 + g1, g0 - g1, -g1]; then the same along
            // the columns.
            let r = [
                [g00, g01],
                [_mm512_add_ps(g00, g10), _mm512_add_ps(g01, g11)],
                [_mm512_sub_ps(g00, g10), _mm512_sub_ps(g01, g11)],
                [
                    _mm512_sub_ps(_mm512_setzero_ps(), g10),
                    _mm512_sub_ps(_mm512_setzero_ps(), g11),
                ],
            ];
            // SAFETY (block): bias[o0 .. o0 + 16) and dm[(((xi blocks + blk)
            // tc + t_at + t) 16 ..) + 16) lie inside the asserted lengths.
            unsafe {
                let sum = _mm512_add_ps(_mm512_add_ps(g00, g01), _mm512_add_ps(g10, g11));
                let bp = bias.as_mut_ptr().add(o0);
                _mm512_storeu_ps(bp, _mm512_add_ps(_mm512_loadu_ps(bp), sum));
                for (i, [a, c]) in r.into_iter().enumerate() {
                    let vals = [
                        a,
                        _mm512_add_ps(a, c),
                        _mm512_sub_ps(a, c),
                        _mm512_sub_ps(_mm512_setzero_ps(), c),
                    ];
                    for (j, val) in vals.into_iter().enumerate() {
                        let at = (i * 4 + j) * dp + ((blk - row.blk0) * tc + t_at + t) * LANES;
                        _mm512_storeu_ps(out.add(at), val);
                    }
                }
            }
        }
    }
}

/// [`transform_grad_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_grad_avx2(grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    transform_grad_body(grad, row, dm, bias);
}

#[inline(always)]
fn transform_grad_body(grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    let (b, ty, tiles) = (row.b, row.ty, row.tiles);
    let (tc, t_at) = (row.tc, row.t_at);
    let o = grad.dims()[3];
    for t in 0..tiles {
        for blk in row.blk0..row.blk1 {
            let o0 = blk * LANES;
            let lanes = LANES.min(o - o0);
            let ld = |dy: usize, dx: usize| grad_lanes(grad, b, 2 * ty + dy, 2 * t + dx, o0, lanes);
            let g = [[ld(0, 0), ld(0, 1)], [ld(1, 0), ld(1, 1)]];
            // A dY (rows): [g0, g0 + g1, g0 - g1, -g1]; then the same along
            // the columns.
            let mut r = [[[0f32; LANES]; 2]; 4];
            for dx in 0..2 {
                for l in 0..LANES {
                    let (g0, g1) = (g[0][dx][l], g[1][dx][l]);
                    r[0][dx][l] = g0;
                    r[1][dx][l] = g0 + g1;
                    r[2][dx][l] = g0 - g1;
                    r[3][dx][l] = -g1;
                }
            }
            let bsum = &mut bias[o0..o0 + LANES];
            for l in 0..LANES {
                bsum[l] += (g[0][0][l] + g[0][1][l]) + (g[1][0][l] + g[1][1][l]);
            }
            for (i, ri) in r.iter().enumerate() {
                let mut vals = [[0f32; LANES]; 4];
                for l in 0..LANES {
                    let (a, c) = (ri[0][l], ri[1][l]);
                    vals[0][l] = a;
                    vals[1][l] = a + c;
                    vals[2][l] = a - c;
                    vals[3][l] = -c;
                }
                for (j, val) in vals.iter().enumerate() {
                    let at = (i * 4 + j) * row.dp + ((blk - row.blk0) * tc + t_at + t) * LANES;
                    dm[at..at + LANES].copy_from_slice(val);
                }
            }
        }
    }
}

/// [`transform_input4`] compiled for AVX-512 (bit for bit the portable
/// results: Rust contracts no multiply-add).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_input4_avx512(planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    transform_input4(planes, chunk, v);
}

/// [`transform_input4`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_input4_avx2(planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    transform_input4(planes, chunk, v);
}

/// [`transform_input`] for F(4x4, 3x3): 6x6 windows `d` of 16 tiles at a
/// time (tile `t`'s column `j` is padded column `4 t + j`, residue `j mod 4`
/// at `t + j / 4`), `B^T d B` along both axes.
#[inline(always)]
// Column `j` is read from every row; the index says so most plainly.
#[allow(clippy::needless_range_loop)]
fn transform_input4(planes: &Planes, chunk: &Chunk, v: &mut [f32]) {
    let (vs, vp) = (chunk.vs, chunk.vp);
    let (seg, tiles) = (planes.seg, planes.tiles);
    let row_len = planes.row_len();
    for (ci, row) in (chunk.c0..chunk.c1).flat_map(|ci| chunk.rows().map(move |row| (ci, row))) {
        let (b, ty, t_at) = (row.b, row.ty, row.t_at);
        let plane = planes.plane(b, ci);
        let mut t0 = 0;
        while t0 < tiles {
            // d B, one window row at a time (array literals, not
            // array::from_fn, whose closures would not inline into the
            // vector-feature wrappers); then B^T (d B), one column at a time.
            let at = |i: usize| (4 * ty + i) * row_len + t0;
            let e = [
                window_row4(plane, at(0), seg),
                window_row4(plane, at(1), seg),
                window_row4(plane, at(2), seg),
                window_row4(plane, at(3), seg),
                window_row4(plane, at(4), seg),
                window_row4(plane, at(5), seg),
            ];
            for j in 0..6 {
                let col = crate::winograd::bt6([
                    &e[0][j], &e[1][j], &e[2][j], &e[3][j], &e[4][j], &e[5][j],
                ]);
                for (i, val) in col.iter().enumerate() {
                    let at = (i * 6 + j) * vp + (ci - chunk.c0) * vs + t_at + t0;
                    v[at..at + LANES].copy_from_slice(val);
                }
            }
            t0 += LANES;
        }
    }
}

/// `(d B)` of one row of 16 6x6 windows whose first column starts at
/// `plane[base]` (columns `4 t + j` at residue `j mod 4`, `seg` apart).
#[inline(always)]
fn window_row4(plane: &[f32], base: usize, seg: usize) -> [V16; 6] {
    let ld = |at: usize| -> V16 {
        let mut a = [0f32; LANES];
        a.copy_from_slice(&plane[at..at + LANES]);
        a
    };
    let x = [
        ld(base),
        ld(base + seg),
        ld(base + 2 * seg),
        ld(base + 3 * seg),
        ld(base + 1),
        ld(base + seg + 1),
    ];
    crate::winograd::bt6([&x[0], &x[1], &x[2], &x[3], &x[4], &x[5]])
}

/// `A x` for F(4x4, 3x3) along one line of a 4x4 gradient tile, 16 lanes
/// at a time (`A` rows `[1 0 0 0]`, `[1 1 1 1]`, `[1 -1 1 -1]`,
/// `[1 2 4 8]`, `[1 -2 4 -8]`, `[0 0 0 1]`: the transpose of the forward
/// pass's `A^T`).
#[inline(always)]
fn a6(x: [&V16; 4]) -> [V16; 6] {
    let mut r = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let (g0, g1, g2, g3) = (x[0][l], x[1][l], x[2][l], x[3][l]);
        let even = g0 + g2;
        let odd = g1 + g3;
        let even4 = g0 + 4.0 * g2;
        let odd4 = 2.0 * g1 + 8.0 * g3;
        r[0][l] = g0;
        r[1][l] = even + odd;
        r[2][l] = even - odd;
        r[3][l] = even4 + odd4;
        r[4][l] = even4 - odd4;
        r[5][l] = g3;
    }
    r
}

/// [`transform_grad4`] compiled for AVX-512 (bit for bit the portable
/// results).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_grad4_avx512(grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    transform_grad4(grad, row, dm, bias);
}

/// [`transform_grad4`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_grad4_avx2(grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    transform_grad4(grad, row, dm, bias);
}

/// [`transform_grad`] for F(4x4, 3x3): `A dY A^T` of each 4x4 gradient
/// tile, 16 output channels at a time.
#[inline(always)]
// Column `j` is read from every row; the index says so most plainly.
#[allow(clippy::needless_range_loop)]
fn transform_grad4(grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    let (b, ty, tiles) = (row.b, row.ty, row.tiles);
    let (tc, t_at) = (row.tc, row.t_at);
    let o = grad.dims()[3];
    for t in 0..tiles {
        for blk in row.blk0..row.blk1 {
            let o0 = blk * LANES;
            let lanes = LANES.min(o - o0);
            // dY A^T, one tile row at a time (array literals: see
            // transform_input4), summed into the bias on the way; then
            // A (dY A^T), one column at a time.
            let bsum = &mut bias[o0..o0 + LANES];
            let (y, x) = (4 * ty, 4 * t);
            let e = [
                grad_row4(grad, [b, y, x, o0, lanes], bsum),
                grad_row4(grad, [b, y + 1, x, o0, lanes], bsum),
                grad_row4(grad, [b, y + 2, x, o0, lanes], bsum),
                grad_row4(grad, [b, y + 3, x, o0, lanes], bsum),
            ];
            for j in 0..6 {
                let col = a6([&e[0][j], &e[1][j], &e[2][j], &e[3][j]]);
                for (i, val) in col.iter().enumerate() {
                    let at = (i * 6 + j) * row.dp + ((blk - row.blk0) * tc + t_at + t) * LANES;
                    dm[at..at + LANES].copy_from_slice(val);
                }
            }
        }
    }
}

/// `dY A^T` of the gradient's pixels `(y, x .. x + 4)` of image `b`,
/// channels `o0 .. o0 + lanes` (`at = [b, y, x, o0, lanes]`), their sum
/// added into `bsum`.
#[inline(always)]
fn grad_row4(grad: &NhwcRef, at: [usize; 5], bsum: &mut [f32]) -> [V16; 6] {
    let [b, y, x, o0, lanes] = at;
    let g = [
        grad_lanes(grad, b, y, x, o0, lanes),
        grad_lanes(grad, b, y, x + 1, o0, lanes),
        grad_lanes(grad, b, y, x + 2, o0, lanes),
        grad_lanes(grad, b, y, x + 3, o0, lanes),
    ];
    for (l, s) in bsum.iter_mut().enumerate() {
        *s += (g[0][l] + g[1][l]) + (g[2][l] + g[3][l]);
    }
    a6([&g[0], &g[1], &g[2], &g[3]])
}

/// Channels `o0 .. o0 + lanes` of pixel `(y, x)` of image `b` of `grad`, zero
/// past `lanes` and outside the image.
#[inline(always)]
fn grad_lanes(grad: &NhwcRef, b: usize, y: usize, x: usize, o0: usize, lanes: usize) -> V16 {
    let [_, h, w, _] = grad.dims();
    if y >= h || x >= w {
        return [0f32; LANES];
    }
    load_lanes(&grad.pixel_at(b, y, x)[o0..], lanes)
}
