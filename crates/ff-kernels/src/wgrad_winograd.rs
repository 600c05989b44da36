//! The weight gradient of a 3x3, stride-1, padding-1 convolution through
//! Winograd F(2x2, 3x3): 16 products over the 2x2 output tiles instead of 9
//! over the pixels, 2.25x fewer multiply-adds than the direct weight
//! gradient.
//!
//! The forward pass is `Y = A^T [U . V] A` per tile, with `U = G g G^T` (the
//! weights) and `V = B^T d B` (the tile's 4x4 input window), so
//! `dU[xi][c][o] = sum over tiles of V[xi][c] dM[xi][o]` with
//! `dM = A dY A^T`, and the weight gradient is `dg = G^T dU G`.
//!
//! Work is split into chunks of whole tile rows (about [`CHUNK_TILES`] tiles).
//! For a chunk, `V` is formed with the tiles along the vector lanes, from
//! channel-major copies of the input whose padded rows are stored as their
//! even and odd columns (so each of a tile's four columns is one contiguous
//! load for 16 neighbouring tiles), and `dM` with the output channels along
//! the lanes, straight from the NHWC gradient. Each of the 16 products then
//! runs on the convolution micro-kernel with the input channels as its
//! pixels and the chunk's tiles as its reduction. The chunks are dealt into a
//! fixed number of groups, each with its own accumulator, added in order at
//! the end, so the result does not depend on how the pool schedules them.

use rayon::prelude::*;

use crate::isa::Isa;
use crate::layout::{load_lanes, Activation, NhwcRef};
use crate::micro::{add_product, product_scratch_len, LANES};

/// Tiles per chunk: the reduction length of each product.
const CHUNK_TILES: usize = 128;
/// Accumulators, each summing a fixed run of consecutive chunks.
const GROUPS: usize = 8;

/// One 16-lane vector, written as arrays so the compiler vectorises it.
type V16 = [f32; LANES];

/// A thread's buffers for one chunk: `V`, `dM` and one micro-kernel tile.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    dm: Vec<f32>,
    tile: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// `dW` as `[9 C + 1, O]` (rows `(ky 3 + kx) C + c`, the last row the bias
/// gradient) of a 3x3/1/1 convolution; shapes were checked by the caller
/// (`input`: `[n, h, w, C]`, `grad_out`: `[n, h, w, O]`).
pub(crate) fn weight_grad(
    isa: Isa,
    input: &NhwcRef,
    act: Activation,
    grad_out: &NhwcRef,
    out: &mut [f32],
) {
    let [n, h, w, c] = input.dims();
    let o = grad_out.dims()[3];
    let blocks = o.div_ceil(LANES);
    let tiles = w.div_ceil(2);
    let tile_rows = h.div_ceil(2);
    let planes = Planes::new(isa, input, act, tiles, tile_rows);

    let units = n * tile_rows;
    let units_per_chunk = (CHUNK_TILES / tiles).max(1);
    let chunks = units.div_ceil(units_per_chunk);
    let per_group = chunks.div_ceil(GROUPS);
    let scratch_len = product_scratch_len(isa);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..chunks.div_ceil(per_group))
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![0f32; 16 * c * o];
            let mut bias = vec![0f32; blocks * LANES];
            let max_tc = units_per_chunk * tiles;
            // Every value of v and dm a chunk reads is written first; the
            // buffers are kept per thread, so steps do not fault them in anew.
            let mut buffers = SCRATCH.take();
            let Scratch {
                v,
                dm,
                tile: scratch,
            } = &mut buffers;
            for (buf, len) in [
                (&mut *v, 16 * c * max_tc),
                (&mut *dm, 16 * blocks * max_tc * LANES),
                (&mut *scratch, scratch_len),
            ] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            for chunk in group * per_group..((group + 1) * per_group).min(chunks) {
                let u0 = chunk * units_per_chunk;
                let u1 = (u0 + units_per_chunk).min(units);
                let tc = (u1 - u0) * tiles;
                for u in u0..u1 {
                    let (b, ty) = (u / tile_rows, u % tile_rows);
                    let t_at = (u - u0) * tiles;
                    let row = TileRow {
                        b,
                        ty,
                        tiles,
                        tc,
                        t_at,
                    };
                    transform_input(isa, &planes, &row, v);
                    transform_grad(isa, grad_out, &row, dm, &mut bias);
                }
                for xi in 0..16 {
                    let vx = &v[xi * c * tc..(xi + 1) * c * tc];
                    let dmx = &dm[xi * blocks * tc * LANES..(xi + 1) * blocks * tc * LANES];
                    let accx = &mut acc[xi * c * o..(xi + 1) * c * o];
                    add_product(isa, c, tc, vx, tc, dmx, tc * LANES, o, accx, 0, scratch);
                }
            }
            SCRATCH.set(buffers);
            (acc, bias)
        })
        .collect();

    let mut du = vec![0f32; 16 * c * o];
    let mut bias = vec![0f32; blocks * LANES];
    for (acc, b) in &partials {
        for (d, v) in du.iter_mut().zip(acc) {
            *d += v;
        }
        for (d, v) in bias.iter_mut().zip(b) {
            *d += v;
        }
    }
    // dg = G^T dU G, with G^T u = [u0 + (u1 + u2) / 2, (u1 - u2) / 2,
    // (u1 + u2) / 2 + u3] along each of the two axes; one input channel per
    // task, its 16 rows of dU read and its 9 rows of dg written in order.
    let plane = c * o;
    let (taps, bias_row) = out.split_at_mut(9 * plane);
    let mut rows: Vec<(usize, Vec<&mut [f32]>)> = (0..c).map(|ci| (ci, Vec::new())).collect();
    for (row, dst) in taps.chunks_mut(o).enumerate() {
        rows[row % c].1.push(dst);
    }
    // `oo` indexes the 16 rows read and the 9 rows written alike.
    #[allow(clippy::needless_range_loop)]
    rows.into_par_iter().for_each(|(ci, mut dst)| {
        for oo in 0..o {
            let at = ci * o + oo;
            let mut cols = [[0f32; 3]; 4];
            for (i, col) in cols.iter_mut().enumerate() {
                let u = [
                    du[(i * 4) * plane + at],
                    du[(i * 4 + 1) * plane + at],
                    du[(i * 4 + 2) * plane + at],
                    du[(i * 4 + 3) * plane + at],
                ];
                let s = 0.5 * (u[1] + u[2]);
                *col = [u[0] + s, 0.5 * (u[1] - u[2]), s + u[3]];
            }
            for kx in 0..3 {
                let s = 0.5 * (cols[1][kx] + cols[2][kx]);
                let g = [
                    cols[0][kx] + s,
                    0.5 * (cols[1][kx] - cols[2][kx]),
                    s + cols[3][kx],
                ];
                for (ky, v) in g.into_iter().enumerate() {
                    dst[ky * 3 + kx][oo] = v;
                }
            }
        }
    });
    bias_row.copy_from_slice(&bias[..o]);
}

/// The input, channel-major and zero-padded by one pixel on every side (to
/// whole tiles), each padded row stored as its even columns then its odd
/// columns: `[n][C][rows][2][half]`, `half = tiles + 1`.
struct Planes {
    data: Vec<f32>,
    c: usize,
    rows: usize,
    half: usize,
    tiles: usize,
}

/// One task of [`Planes::new`]: channels `c0 .. c0 + 16` of image `b`.
struct PlaneJob<'a> {
    input: &'a NhwcRef<'a>,
    act: Activation,
    b: usize,
    c0: usize,
    half: usize,
    plane_len: usize,
}

/// [`fill_planes`] compiled for AVX-512 (its 16-lane arrays and the even and
/// odd selections become vector instructions).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_planes_avx512(job: &PlaneJob, chunk: &mut [f32]) {
    fill_planes(job, chunk);
}

/// [`fill_planes`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fill_planes_avx2(job: &PlaneJob, chunk: &mut [f32]) {
    fill_planes(job, chunk);
}

/// Writes the task's (up to) 16 planes into `chunk`, 32 pixels of a row at a
/// time: their channels are read pixel by pixel into a block, then each
/// channel's even and odd pixels are stored as runs of the odd and even
/// padded columns.
#[inline(always)]
fn fill_planes(job: &PlaneJob, chunk: &mut [f32]) {
    const BLOCK: usize = 2 * LANES;
    let &PlaneJob {
        input,
        act,
        b,
        c0,
        half,
        plane_len,
    } = job;
    let [_, h, w, c] = input.dims();
    let cn = LANES.min(c - c0);
    let mut block = [[0f32; BLOCK]; LANES];
    for y in 0..h {
        let row = (y + 1) * 2 * half;
        let mut x0 = 0;
        while x0 < w {
            let nx = BLOCK.min(w - x0);
            for x in 0..nx {
                let px = &input.pixel_at(b, y, x0 + x)[c0..c0 + cn];
                for (vals, &v) in block.iter_mut().zip(px) {
                    vals[x] = act.apply(v);
                }
            }
            // Padded column x + 1: even x land in the odd half at x / 2,
            // odd x in the even half at (x + 1) / 2.
            let (n_even, n_odd) = (nx.div_ceil(2), nx / 2);
            for (j, vals) in block.iter().enumerate().take(cn) {
                let even: [f32; LANES] = std::array::from_fn(|k| vals[2 * k]);
                let odd: [f32; LANES] = std::array::from_fn(|k| vals[2 * k + 1]);
                let base = j * plane_len + row;
                let at = base + half + x0 / 2;
                chunk[at..at + n_even].copy_from_slice(&even[..n_even]);
                let at = base + x0 / 2 + 1;
                chunk[at..at + n_odd].copy_from_slice(&odd[..n_odd]);
            }
            x0 += nx;
        }
    }
}

impl Planes {
    fn new(isa: Isa, input: &NhwcRef, act: Activation, tiles: usize, tile_rows: usize) -> Self {
        let [n, _, _, c] = input.dims();
        let rows = 2 * tile_rows + 2;
        let half = tiles + 1;
        let plane_len = rows * 2 * half;
        // A full vector read from the last row's odd columns may run past
        // the end; those lanes are never stored.
        let mut data = crate::zeroed(n * c * plane_len + LANES);
        let tasks = crate::layout::plane_groups(&mut data[..n * c * plane_len], c, plane_len);
        debug_assert_eq!(tasks.len(), n * c.div_ceil(LANES));
        tasks.into_par_iter().for_each(|(b, gi, chunk)| {
            let job = PlaneJob {
                input,
                act,
                b,
                c0: gi * LANES,
                half,
                plane_len,
            };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (the caller's), so AVX-512F is
                // present.
                Isa::Avx512 => unsafe { fill_planes_avx512(&job, chunk) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA
                // are present.
                Isa::Avx2Fma => unsafe { fill_planes_avx2(&job, chunk) },
                _ => fill_planes(&job, chunk),
            }
        });
        Self {
            data,
            c,
            rows,
            half,
            tiles,
        }
    }

    fn plane(&self, b: usize, ci: usize) -> &[f32] {
        let len = self.rows * 2 * self.half;
        let at = (b * self.c + ci) * len;
        // The slack after the last plane belongs to every plane's reads.
        &self.data[at..(at + len + LANES).min(self.data.len())]
    }
}

/// Where one row of tiles comes from and goes: tile row `ty` of image `b`
/// (`tiles` tiles), stored from tile `t_at` of a chunk of `tc` tiles.
struct TileRow {
    b: usize,
    ty: usize,
    tiles: usize,
    tc: usize,
    t_at: usize,
}

/// `V[xi][c][t_at + t] = (B^T d B)[xi]` for the tiles `t` of tile row `ty`
/// of image `b`, into a chunk of `tc` tiles (`v`: `[16][C][tc]`).
fn transform_input(isa: Isa, planes: &Planes, row: &TileRow, v: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX-512F is present.
        Isa::Avx512 => unsafe { transform_input_avx512(planes, row, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA are present.
        Isa::Avx2Fma => unsafe { transform_input_avx2(planes, row, v) },
        _ => transform_input_body(planes, row, v),
    }
}

/// [`transform_input_body`] with AVX-512 intrinsics, 16 tiles per vector.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_input_avx512(planes: &Planes, row: &TileRow, v: &mut [f32]) {
    use std::arch::x86_64::*;
    let (b, ty, tc, t_at) = (row.b, row.ty, row.tc, row.t_at);
    let (c, half, tiles) = (planes.c, planes.half, planes.tiles);
    let row_len = 2 * half;
    assert!(v.len() >= 16 * c * tc && t_at + tiles <= tc);
    for ci in 0..c {
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
            // v[((xi c + ci) tc + t_at + t0) ..], inside the asserted length.
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
                    let at = (xi * c + ci) * tc + t_at + t0;
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
unsafe fn transform_input_avx2(planes: &Planes, row: &TileRow, v: &mut [f32]) {
    transform_input_body(planes, row, v);
}

#[inline(always)]
fn transform_input_body(planes: &Planes, row: &TileRow, v: &mut [f32]) {
    let (b, ty, tc, t_at) = (row.b, row.ty, row.tc, row.t_at);
    let (c, half, tiles) = (planes.c, planes.half, planes.tiles);
    let row_len = 2 * half;
    for ci in 0..c {
        let plane = planes.plane(b, ci);
        let mut t0 = 0;
        while t0 < tiles {
            let nt = LANES.min(tiles - t0);
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
                let at = (xi * c + ci) * tc + t_at + t0;
                if nt == LANES {
                    v[at..at + LANES].copy_from_slice(val);
                } else {
                    v[at..at + nt].copy_from_slice(&val[..nt]);
                }
            }
            t0 += nt;
        }
    }
}

/// `dM[xi][blk][t_at + t][16] = (A dY A^T)[xi]` for the tiles of tile row
/// `ty` of image `b` (`dY` zero outside the image and past `O`), into a
/// chunk of `tc` tiles, and the tiles' gradient summed into `bias`.
fn transform_grad(isa: Isa, grad: &NhwcRef, row: &TileRow, dm: &mut [f32], bias: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX-512F is present.
        Isa::Avx512 => unsafe { transform_grad_avx512(grad, row, dm, bias) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (the caller's), so AVX2 and FMA are present.
        Isa::Avx2Fma => unsafe { transform_grad_avx2(grad, row, dm, bias) },
        _ => transform_grad_body(grad, row, dm, bias),
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
    assert!(dm.len() >= 16 * blocks * tc * LANES && t_at + tiles <= tc);
    assert!(bias.len() >= blocks * LANES);
    let out = dm.as_mut_ptr();
    for t in 0..tiles {
        for blk in 0..blocks {
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
                        let at = (((i * 4 + j) * blocks + blk) * tc + t_at + t) * LANES;
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
    let blocks = o.div_ceil(LANES);
    for t in 0..tiles {
        for blk in 0..blocks {
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
                    let at = (((i * 4 + j) * blocks + blk) * tc + t_at + t) * LANES;
                    dm[at..at + LANES].copy_from_slice(val);
                }
            }
        }
    }
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
