//! Winograd F(2x2, 3x3) for 3x3, stride-1, padding-1 convolutions: each 2x2
//! block of outputs costs 16 multiply-adds per input-output channel pair
//! instead of 36 (2.25x fewer).
//!
//! One task computes one row of 2x2 output tiles of one image, all in
//! L1/L2-sized buffers: the 4 input rows it needs are gathered (zero-padded,
//! input activation applied), turned into `V = B^T d B` for every tile and
//! channel, multiplied with the transformed weights `U = G g G^T` as 16
//! independent products over the channels (the direct convolution's
//! micro-kernel, as a 1x1 convolution over tiles), and turned back into
//! outputs with `Y = A^T M A`, where bias, residual and activation are
//! applied. The transforms' coefficients are 0, +-1/2 and +-1, so the fp32
//! error stays at the level of a direct convolution's (measured in the tests).

use rayon::prelude::*;

use crate::isa::Isa;
use crate::layout::{
    gather_window, load_lanes, Activation, ConvGeometry, Epilogue, NhwcMut, NhwcRef,
};
use crate::micro::{for_each_tile, max_blocks, run_tile, Tile, LANES};

/// Whether a convolution is one Winograd F(2x2, 3x3) covers.
pub(crate) fn applies(g: &ConvGeometry) -> bool {
    g.kernel == 3 && g.stride == 1 && g.padding == 1
}

/// Whether Winograd is the faster choice for `g`. With the AVX-512
/// transforms it wins on every 3x3/1 layer measured (conv_bench, batch 8,
/// best of 15: 32 -> 32 channels 1.2x over the direct kernel, 32 -> 64 1.4x,
/// 64 -> 64 1.4x, 64 -> 128 1.7x, 128 -> 256 1.7x, 256 -> 256 1.7x). On AVX2
/// (the transforms compiled for it, 6x16 micro-kernel tiles; Zen 3, best of
/// 3 runs) it wins from 61 input channels up (61 -> 768 1.9x, 64 -> 128
/// 1.4x, 128 -> 256 1.55x, 384 -> 61 1.7x) and ties at 32 (1.03-1.08x), so
/// there it needs at least 48; the portable build, whose transforms the
/// compiler vectorises for the base target, at least 64.
pub(crate) fn pays_off(g: &ConvGeometry) -> bool {
    let min_channels = match Isa::detect() {
        Isa::Avx512 => 0,
        Isa::Avx2Fma => 48,
        Isa::Portable => 64,
    };
    applies(g) && g.in_channels >= min_channels
}

/// The transformed weights `U = G g G^T`, packed `[16][O/16][C][16]`.
pub(crate) fn pack(
    g: &ConvGeometry,
    weight: &impl Fn(usize, usize, usize, usize) -> f32,
) -> Vec<f32> {
    let (c, o) = (g.in_channels, g.out_channels);
    let blocks = o.div_ceil(LANES);
    let plane = blocks * c * LANES;
    let mut out = vec![0f32; 16 * plane];
    // 16 output channels at a time, so that each line below is one vector
    // operation and each of the 16 planes gets one contiguous store.
    for blk in 0..blocks {
        let lanes = LANES.min(o - blk * LANES);
        for ci in 0..c {
            let mut w = [[[0f32; LANES]; 3]; 3];
            for (ky, row) in w.iter_mut().enumerate() {
                for (kx, v) in row.iter_mut().enumerate() {
                    for (l, x) in v.iter_mut().enumerate().take(lanes) {
                        *x = weight(blk * LANES + l, ci, ky, kx);
                    }
                }
            }
            let mut u = [[0f32; LANES]; 16];
            for l in 0..LANES {
                // G g: [4][3], then (G g) G^T: [4][4].
                let mut gg = [[0f32; 3]; 4];
                for kx in 0..3 {
                    let (a, b, cc) = (w[0][kx][l], w[1][kx][l], w[2][kx][l]);
                    gg[0][kx] = a;
                    gg[1][kx] = 0.5 * (a + b + cc);
                    gg[2][kx] = 0.5 * (a - b + cc);
                    gg[3][kx] = cc;
                }
                for (i, r) in gg.iter().enumerate() {
                    let (a, b, cc) = (r[0], r[1], r[2]);
                    u[i * 4][l] = a;
                    u[i * 4 + 1][l] = 0.5 * (a + b + cc);
                    u[i * 4 + 2][l] = 0.5 * (a - b + cc);
                    u[i * 4 + 3][l] = cc;
                }
            }
            let at = (blk * c + ci) * LANES;
            for (xi, v) in u.iter().enumerate() {
                out[xi * plane + at..xi * plane + at + LANES].copy_from_slice(v);
            }
        }
    }
    out
}

/// The convolution through Winograd; shapes were checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d(
    isa: Isa,
    g: &ConvGeometry,
    u: &[f32],
    bias: &[f32],
    input: &NhwcRef,
    input_activation: Activation,
    epilogue: &Epilogue,
    out: NhwcMut,
) {
    let [n, h, w, c] = input.dims();
    let o = g.out_channels;
    let (oh, ow) = (h, w);
    let blocks = o.div_ceil(LANES);
    let tiles = ow.div_ceil(2);
    let tile_rows = oh.div_ceil(2);
    let wp = 2 * tiles + 2;
    let ob_max = max_blocks(isa);
    let out_ps = out.pixel_stride();
    let row_len = ow * out_ps;
    let image_len = oh * row_len;
    let data = out.into_data();
    // One task per row of tiles (two output rows) of one image; collected
    // first so that the parallel loop is a plain indexed one.
    let mut tasks = Vec::with_capacity(n * tile_rows);
    for (b, image) in data.chunks_mut(image_len).take(n).enumerate() {
        for (ty, rows) in image.chunks_mut(2 * row_len).take(tile_rows).enumerate() {
            tasks.push((b, ty, rows));
        }
    }
    tasks.into_par_iter().for_each_init(
        || Buffers {
            window: Vec::new(),
            v: vec![0f32; 16 * tiles * c],
            m: vec![0f32; 16 * tiles * blocks * LANES],
        },
        |buf, (b, ty, rows)| {
            gather_window(
                input,
                input_activation,
                b,
                2 * ty,
                4,
                1,
                wp,
                &mut buf.window,
            );
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                Isa::Avx512 => unsafe {
                    input_transform_avx512(&buf.window, wp, c, tiles, &mut buf.v)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                Isa::Avx2Fma => unsafe {
                    input_transform_avx2(&buf.window, wp, c, tiles, &mut buf.v)
                },
                _ => input_transform(&buf.window, wp, c, tiles, &mut buf.v),
            }
            for xi in 0..16 {
                let v = &buf.v[xi * tiles * c..(xi + 1) * tiles * c];
                let uxi = &u[xi * blocks * c * LANES..(xi + 1) * blocks * c * LANES];
                let m = &mut buf.m[xi * tiles * blocks * LANES..(xi + 1) * tiles * blocks * LANES];
                for_each_tile(isa, blocks, ob_max, tiles, |ob0, obn, t0, pn| {
                    let t = Tile::rows(
                        &v[t0 * c..],
                        c,
                        c,
                        &uxi[ob0 * c * LANES..],
                        c * LANES,
                        blocks * LANES,
                    );
                    // SAFETY: tiles t0 .. t0 + pn of v hold c values
                    // each; blocks ob0 .. ob0 + obn of u[xi] hold
                    // c 16 values each; m from (t0 blocks + ob0) 16
                    // holds (pn - 1) blocks 16 + obn 16 values since
                    // t0 + pn <= tiles and ob0 + obn <= blocks; `isa`
                    // is supported (checked by conv2d_with).
                    unsafe { run_tile(isa, pn, obn, &t, &mut m[(t0 * blocks + ob0) * LANES..]) };
                });
            }
            let ot = OutputTile {
                m: &buf.m,
                tiles,
                blocks,
                o,
                bias,
                epilogue,
                b,
                ty,
                oh,
                ow,
                out_ps,
            };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                Isa::Avx512 => unsafe { output_transform_avx512(&ot, rows) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                Isa::Avx2Fma => unsafe { output_transform_avx2(&ot, rows) },
                _ => output_transform(&ot, rows),
            }
        },
    );
}

struct Buffers {
    window: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
}

/// [`input_transform`] compiled for AVX2 (its 16-lane arrays become pairs
/// of 256-bit vectors; Rust contracts no multiply-add, so the results are
/// the portable ones bit for bit).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform_avx2(window: &[f32], wp: usize, c: usize, tiles: usize, v: &mut [f32]) {
    input_transform(window, wp, c, tiles, v);
}

/// `V[xi][t][c] = (B^T d B)[xi]` for the 4x4 input tile `d` of every output
/// tile `t` in the window (`[4][wp][C]`).
///
/// Left to the compiler, for the base target and (inlined into
/// [`input_transform_avx2`]) for AVX2.
#[inline(always)]
fn input_transform(window: &[f32], wp: usize, c: usize, tiles: usize, v: &mut [f32]) {
    let plane = tiles * c;
    for t in 0..tiles {
        let mut ch = 0;
        while ch < c {
            // 16 channels at a time: every line below is one vector operation.
            let n = LANES.min(c - ch);
            let x: [[[f32; LANES]; 4]; 4] = std::array::from_fn(|i| {
                std::array::from_fn(|j| load_lanes(&window[(i * wp + 2 * t + j) * c + ch..], n))
            });
            for (xi, o) in input_tile(&x).iter().enumerate() {
                let dst = &mut v[xi * plane + t * c + ch..];
                if n == LANES {
                    dst[..LANES].copy_from_slice(o);
                } else {
                    dst[..n].copy_from_slice(&o[..n]);
                }
            }
            ch += n;
        }
    }
}

/// What the output transform of one row of tiles needs.
struct OutputTile<'a> {
    /// `[16][tiles][blocks][16]`.
    m: &'a [f32],
    tiles: usize,
    blocks: usize,
    o: usize,
    /// Padded to `blocks 16`.
    bias: &'a [f32],
    epilogue: &'a Epilogue<'a>,
    b: usize,
    ty: usize,
    oh: usize,
    ow: usize,
    out_ps: usize,
}

/// [`output_transform`] compiled for AVX2, bit for bit the portable results.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform_avx2(ot: &OutputTile, rows: &mut [f32]) {
    output_transform(ot, rows);
}

/// `Y = A^T M A` for every tile and output channel, then bias, residual and
/// activation, stored into the (up to) two output rows of tile row `ty`.
///
/// Left to the compiler, for the base target and (inlined into
/// [`output_transform_avx2`]) for AVX2; AVX-512 has its own intrinsics.
#[inline(always)]
fn output_transform(ot: &OutputTile, rows: &mut [f32]) {
    let &OutputTile {
        m,
        tiles,
        blocks,
        o,
        bias,
        epilogue,
        b,
        ty,
        oh,
        ow,
        out_ps,
    } = ot;
    let plane = tiles * blocks * LANES;
    for t in 0..tiles {
        for blk in 0..blocks {
            let at = (t * blocks + blk) * LANES;
            let mm: [[f32; LANES]; 16] = std::array::from_fn(|xi| {
                let mut a = [0f32; LANES];
                a.copy_from_slice(&m[xi * plane + at..xi * plane + at + LANES]);
                a
            });
            // y[dy * 2 + dx] = (A^T M A)[dy][dx], 16 channels at a time.
            let mut y = [[0f32; LANES]; 4];
            for l in 0..LANES {
                let mut s = [[0f32; 4]; 2];
                for i in 0..4 {
                    let (a0, a1, a2, a3) = (
                        mm[i * 4][l],
                        mm[i * 4 + 1][l],
                        mm[i * 4 + 2][l],
                        mm[i * 4 + 3][l],
                    );
                    s[0][i] = a0 + a1 + a2;
                    s[1][i] = a1 - a2 - a3;
                }
                y[0][l] = s[0][0] + s[0][1] + s[0][2];
                y[1][l] = s[1][0] + s[1][1] + s[1][2];
                y[2][l] = s[0][1] - s[0][2] - s[0][3];
                y[3][l] = s[1][1] - s[1][2] - s[1][3];
            }
            let o0 = blk * LANES;
            let lanes = LANES.min(o - o0);
            let mut bias16 = [0f32; LANES];
            bias16.copy_from_slice(&bias[o0..o0 + LANES]);
            for dy in 0..2 {
                let oy = 2 * ty + dy;
                if oy >= oh {
                    break;
                }
                for dx in 0..2 {
                    let ox = 2 * t + dx;
                    if ox >= ow {
                        break;
                    }
                    let mut v = y[dy * 2 + dx];
                    for (x, bv) in v.iter_mut().zip(&bias16) {
                        *x += bv;
                    }
                    if let Some(r) = epilogue.residual {
                        let r = &r.pixel_at(b, oy, ox)[o0..o0 + lanes];
                        for (x, rv) in v.iter_mut().zip(r) {
                            *x += rv;
                        }
                    }
                    if epilogue.activation == Activation::Relu {
                        for x in v.iter_mut() {
                            *x = x.max(0.0);
                        }
                    }
                    let dst = &mut rows[(dy * ow + ox) * out_ps + o0..];
                    if lanes == LANES {
                        dst[..LANES].copy_from_slice(&v);
                    } else {
                        dst[..lanes].copy_from_slice(&v[..lanes]);
                    }
                }
            }
        }
    }
}

/// [`input_transform`] with AVX-512 intrinsics, 16 channels per vector
/// (masked loads and stores for the last partial group).
///
/// # Safety
/// The CPU must have AVX-512F; `window` must hold `[4][wp][c]` and `v`
/// `[16][tiles][c]` values with `2 tiles + 2 <= wp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// The 4 x 4 tile is indexed both ways; the index loop says so most plainly.
#[allow(clippy::needless_range_loop)]
unsafe fn input_transform_avx512(window: &[f32], wp: usize, c: usize, tiles: usize, v: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(window.len() >= 4 * wp * c && v.len() >= 16 * tiles * c && 2 * tiles + 2 <= wp);
    let plane = tiles * c;
    let w = window.as_ptr();
    let out = v.as_mut_ptr();
    for t in 0..tiles {
        let mut ch = 0;
        while ch < c {
            let n = LANES.min(c - ch);
            let mask = lane_mask(n);
            // SAFETY (block): every offset is (i wp + 2 t + j) c + ch + lane
            // with i, j < 4, lane < n, inside the asserted window; the stores
            // go to (xi plane + t c + ch + lane) inside the asserted v.
            unsafe {
                let ld = |i: usize, j: usize| {
                    _mm512_maskz_loadu_ps(mask, w.add((i * wp + 2 * t + j) * c + ch))
                };
                let d = std::array::from_fn(|i| std::array::from_fn(|j| ld(i, j)));
                for (xi, val) in input_tile_avx512(d).into_iter().enumerate() {
                    _mm512_mask_storeu_ps(out.add(xi * plane + t * c + ch), mask, val);
                }
            }
            ch += n;
        }
    }
}

/// `V = B^T d B` of one 4x4 input tile, 16 lanes at a time (`d[i][j]`: row
/// `i`, column `j`): element `i 4 + j` is `V[i][j]`. The portable twin of
/// [`input_tile_avx512`], the same operations in the same order.
#[inline(always)]
pub(crate) fn input_tile(d: &[[[f32; LANES]; 4]; 4]) -> [[f32; LANES]; 16] {
    let mut v = [[0f32; LANES]; 16];
    for l in 0..LANES {
        // B^T d (rows), then (B^T d) B (columns).
        let mut bt = [[0f32; 4]; 4];
        for j in 0..4 {
            bt[0][j] = d[0][j][l] - d[2][j][l];
            bt[1][j] = d[1][j][l] + d[2][j][l];
            bt[2][j] = d[2][j][l] - d[1][j][l];
            bt[3][j] = d[1][j][l] - d[3][j][l];
        }
        for (i, r) in bt.iter().enumerate() {
            v[i * 4][l] = r[0] - r[2];
            v[i * 4 + 1][l] = r[1] + r[2];
            v[i * 4 + 2][l] = r[2] - r[1];
            v[i * 4 + 3][l] = r[1] - r[3];
        }
    }
    v
}

/// The AVX-512 mask of the first `n` of 16 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) fn lane_mask(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= LANES {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// `V = B^T d B` of one 4x4 input tile of 16-lane vectors (`d[i][j]`: row
/// `i`, column `j`): element `i 4 + j` is `V[i][j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn input_tile_avx512(
    d: [[std::arch::x86_64::__m512; 4]; 4],
) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mut bt = [[_mm512_setzero_ps(); 4]; 4];
    for j in 0..4 {
        bt[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
        bt[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
        bt[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
        bt[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
    }
    let mut v = [_mm512_setzero_ps(); 16];
    for (i, r) in bt.iter().enumerate() {
        v[i * 4] = _mm512_sub_ps(r[0], r[2]);
        v[i * 4 + 1] = _mm512_add_ps(r[1], r[2]);
        v[i * 4 + 2] = _mm512_sub_ps(r[2], r[1]);
        v[i * 4 + 3] = _mm512_sub_ps(r[1], r[3]);
    }
    v
}

/// [`output_transform`] with AVX-512 intrinsics, one 16-channel block per
/// vector.
///
/// # Safety
/// The CPU must have AVX-512F; `ot.m` must hold `[16][tiles][blocks][16]`,
/// `ot.bias` `blocks 16` values, and `rows` the tile row's output rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform_avx512(ot: &OutputTile, rows: &mut [f32]) {
    use std::arch::x86_64::*;
    let &OutputTile {
        m,
        tiles,
        blocks,
        o,
        bias,
        epilogue,
        b,
        ty,
        oh,
        ow,
        out_ps,
    } = ot;
    let plane = tiles * blocks * LANES;
    assert!(m.len() >= 16 * plane && bias.len() >= blocks * LANES);
    let relu = epilogue.activation == Activation::Relu;
    for t in 0..tiles {
        for blk in 0..blocks {
            let at = (t * blocks + blk) * LANES;
            let o0 = blk * LANES;
            let lanes = LANES.min(o - o0);
            let mask = lane_mask(lanes);
            // SAFETY (block): m reads at xi plane + at + [0, 16) with xi < 16
            // and at + 16 <= plane (asserted); bias at o0 + [0, 16) <
            // blocks 16 (asserted); residual and output accesses are masked
            // to `lanes` values of a pixel that exists (oy < oh, ox < ow),
            // the residual's bounds checked by slicing.
            unsafe {
                let mm = |xi: usize| _mm512_loadu_ps(m.as_ptr().add(xi * plane + at));
                let mut s0 = [_mm512_setzero_ps(); 4];
                let mut s1 = [_mm512_setzero_ps(); 4];
                for i in 0..4 {
                    let (a0, a1, a2, a3) = (mm(i * 4), mm(i * 4 + 1), mm(i * 4 + 2), mm(i * 4 + 3));
                    s0[i] = _mm512_add_ps(_mm512_add_ps(a0, a1), a2);
                    s1[i] = _mm512_sub_ps(_mm512_sub_ps(a1, a2), a3);
                }
                let bv = _mm512_loadu_ps(bias.as_ptr().add(o0));
                let y = [
                    _mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]),
                    _mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]),
                    _mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]),
                    _mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]),
                ];
                for dy in 0..2 {
                    let oy = 2 * ty + dy;
                    if oy >= oh {
                        break;
                    }
                    for dx in 0..2 {
                        let ox = 2 * t + dx;
                        if ox >= ow {
                            break;
                        }
                        let mut v = _mm512_add_ps(y[dy * 2 + dx], bv);
                        if let Some(r) = epilogue.residual {
                            let r = &r.pixel_at(b, oy, ox)[o0..o0 + lanes];
                            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, r.as_ptr()));
                        }
                        if relu {
                            v = _mm512_max_ps(v, _mm512_setzero_ps());
                        }
                        let dst = &mut rows[(dy * ow + ox) * out_ps + o0..][..lanes];
                        _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, v);
                    }
                }
            }
        }
    }
}
