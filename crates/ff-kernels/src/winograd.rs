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
//!
//! F(4x4, 3x3) ([`Variant::F4`]) works the same way on 4x4 output tiles and
//! 6x6 input windows: 36 products per tile instead of 144, 4x fewer
//! multiply-adds than direct, for transforms with coefficients up to 8 (its
//! fp32 error is a few times F(2x2)'s, still well inside the tests' bounds).

use rayon::prelude::*;

use crate::isa::Isa;
use crate::layout::{
    gather_window, load_lanes, Activation, ConvGeometry, Epilogue, NhwcMut, NhwcRef,
};
use crate::micro::{for_each_tile, max_blocks, run_tile, Tile, LANES};

/// The Winograd tile: F(2x2, 3x3) or F(4x4, 3x3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// 2x2 output tiles from 4x4 input windows (16 products).
    F2,
    /// 4x4 output tiles from 6x6 input windows (36 products).
    F4,
}

impl Variant {
    /// The side of an output tile.
    pub(crate) const fn m(self) -> usize {
        match self {
            Variant::F2 => 2,
            Variant::F4 => 4,
        }
    }

    /// The side of an input window.
    pub(crate) const fn alpha(self) -> usize {
        self.m() + 2
    }

    /// The number of transformed planes (independent products).
    pub(crate) const fn planes(self) -> usize {
        self.alpha() * self.alpha()
    }

    /// The weight transform `G` (`alpha x 3`), exact in f64.
    pub(crate) fn g(self) -> &'static [[f64; 3]] {
        match self {
            Variant::F2 => &[
                [1.0, 0.0, 0.0],
                [0.5, 0.5, 0.5],
                [0.5, -0.5, 0.5],
                [0.0, 0.0, 1.0],
            ],
            Variant::F4 => &[
                [0.25, 0.0, 0.0],
                [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
                [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
                [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
                [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
                [0.0, 0.0, 1.0],
            ],
        }
    }
}

/// Whether a convolution is one Winograd covers (3x3, stride 1, padding 1).
pub(crate) fn applies(g: &ConvGeometry) -> bool {
    g.kernel == 3 && g.stride == 1 && g.padding == 1
}

/// The Winograd variant that is the faster choice for `g`, if any.
///
/// F(2x2, 3x3): with the AVX-512 transforms it wins on every 3x3/1 layer
/// measured (conv_bench, batch 8, best of 15: 32 -> 32 channels 1.2x over
/// the direct kernel, 32 -> 64 1.4x, 64 -> 64 1.4x, 64 -> 128 1.7x,
/// 128 -> 256 1.7x, 256 -> 256 1.7x). On AVX2 (the transforms compiled for
/// it, 6x16 micro-kernel tiles; Zen 3, best of 3 runs) it wins from 61
/// input channels up (61 -> 768 1.9x, 64 -> 128 1.4x, 128 -> 256 1.55x,
/// 384 -> 61 1.7x) and ties at 32 (1.03-1.08x), so there it needs at least
/// 48; the portable build, whose transforms the compiler vectorises for the
/// base target, at least 64.
///
/// F(4x4, 3x3) (AVX2; Zen 3, conv_bench batch 8, every flow layer shape
/// of resnet18, DeiT and CaiT, forward and input gradient, three runs):
/// faster than F(2x2, 3x3) on every shape in every run but one (768 -> 61
/// once 1.19x over the direct kernel against F(2x2)'s 1.35x), from 32
/// input channels up (32 -> 32 0.96-1.21x over direct against 0.89-0.97x,
/// 32 -> 64 1.29-1.45x, 128 -> 256 2.43-2.73x, 384 -> 61 1.71-2.05x,
/// 61 -> 768 1.58-2.48x, 768 -> 61 1.19-3.04x).
/// On AVX-512 (Zen 4, conv_bench batch 8, the same shapes, quiet machine)
/// it is the faster from 61 input channels up (61 -> 768 2.27-2.37x over
/// direct against F(2x2)'s 1.94-2.03x, 128 -> 256 2.65-2.78x against 1.98x,
/// 384 -> 61 2.18-2.29x against 1.97-2.03x, 768 -> 61 input gradient
/// 2.23-2.24x against 1.83-1.88x), ties at 64 in resnet18's layer1
/// (1.78-1.95x against 1.81-1.83x) and loses at 32 (32 -> 32 1.24-1.49x
/// against 1.52-1.58x), so there it needs at least 48 input channels. The
/// portable build has not been measured against F(2x2, 3x3) and keeps it;
/// `four_by_four: false` keeps it everywhere.
pub(crate) fn choose(g: &ConvGeometry, four_by_four: bool) -> Option<Variant> {
    if !applies(g) {
        return None;
    }
    let c = g.in_channels;
    match Isa::detect() {
        Isa::Avx512 if four_by_four && c >= 48 => Some(Variant::F4),
        Isa::Avx512 => Some(Variant::F2),
        Isa::Avx2Fma if four_by_four && c >= 32 => Some(Variant::F4),
        Isa::Avx2Fma if c >= 48 => Some(Variant::F2),
        Isa::Portable if c >= 64 => Some(Variant::F2),
        _ => None,
    }
}

/// The transformed weights `U = G g G^T` of `variant`, packed
/// `[planes][O/16][C][16]`, computed in f64 and rounded once.
pub(crate) fn pack(
    g: &ConvGeometry,
    variant: Variant,
    weight: &(impl Fn(usize, usize, usize, usize) -> f32 + Sync),
) -> Vec<f32> {
    let (c, o) = (g.in_channels, g.out_channels);
    let gm = variant.g();
    let a = variant.alpha();
    let blocks = o.div_ceil(LANES);
    let plane = blocks * c * LANES;
    // The weights of each block of 16 output channels, `[blocks][C][9][16]`,
    // gathered once (the closure's layout may put the 16 lanes far apart),
    // one task per block.
    let mut w = vec![0f32; plane * 9];
    w.par_chunks_mut(c * 9 * LANES)
        .enumerate()
        .for_each(|(blk, wb)| {
            let lanes = LANES.min(o - blk * LANES);
            for (ci, wc) in wb.chunks_exact_mut(9 * LANES).enumerate() {
                for (tap, v) in wc.chunks_exact_mut(LANES).enumerate() {
                    for (l, x) in v.iter_mut().enumerate().take(lanes) {
                        *x = weight(blk * LANES + l, ci, tap / 3, tap % 3);
                    }
                }
            }
        });
    let mut out = vec![0f32; variant.planes() * plane];
    // One task per row i of G (the planes i alpha .. i alpha + alpha, one
    // contiguous run), 16 output channels at a time so that the lane loops
    // vectorise and each plane gets one contiguous store.
    out.par_chunks_mut(a * plane)
        .zip(gm)
        .for_each(|(planes_i, gi)| {
            for (bc, wc) in w.chunks_exact(9 * LANES).enumerate() {
                let taps: [V16; 9] = std::array::from_fn(|t| load_lanes(&wc[t * LANES..], LANES));
                // (G g)[i]: [3][16].
                let mut gg = [[0f64; LANES]; 3];
                for (kx, v) in gg.iter_mut().enumerate() {
                    let (t0, t1, t2) = (&taps[kx], &taps[3 + kx], &taps[6 + kx]);
                    for l in 0..LANES {
                        v[l] = gi[0] * f64::from(t0[l])
                            + gi[1] * f64::from(t1[l])
                            + gi[2] * f64::from(t2[l]);
                    }
                }
                for (j, gj) in gm.iter().enumerate() {
                    let mut u = [0f32; LANES];
                    for (l, x) in u.iter_mut().enumerate() {
                        *x = (gj[0] * gg[0][l] + gj[1] * gg[1][l] + gj[2] * gg[2][l]) as f32;
                    }
                    planes_i[j * plane + bc * LANES..][..LANES].copy_from_slice(&u);
                }
            }
        });
    out
}

/// The convolution through Winograd `variant` with its packed weights `u`;
/// shapes were checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d(
    isa: Isa,
    variant: Variant,
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
    let (side, planes) = (variant.m(), variant.planes());
    let blocks = o.div_ceil(LANES);
    let tiles = ow.div_ceil(side);
    let tile_rows = oh.div_ceil(side);
    let wp = side * tiles + 2;
    let ob_max = max_blocks(isa);
    let out_ps = out.pixel_stride();
    let row_len = ow * out_ps;
    let image_len = oh * row_len;
    let data = out.into_data();
    // One task per row of tiles (`side` output rows) of one image; collected
    // first so that the parallel loop is a plain indexed one.
    let mut tasks = Vec::with_capacity(n * tile_rows);
    for (b, image) in data.chunks_mut(image_len).take(n).enumerate() {
        for (ty, rows) in image.chunks_mut(side * row_len).take(tile_rows).enumerate() {
            tasks.push((b, ty, rows));
        }
    }
    tasks.into_par_iter().for_each_init(
        || Buffers {
            window: Vec::new(),
            v: vec![0f32; planes * tiles * c],
            m: vec![0f32; planes * tiles * blocks * LANES],
        },
        |buf, (b, ty, rows)| {
            gather_window(
                input,
                input_activation,
                b,
                side * ty,
                variant.alpha(),
                1,
                wp,
                &mut buf.window,
            );
            let (window, v) = (&buf.window, &mut buf.v);
            match (variant, isa) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F2, Isa::Avx512) => unsafe {
                    input_transform_avx512(window, wp, c, tiles, v)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F2, Isa::Avx2Fma) => unsafe {
                    input_transform_avx2(window, wp, c, tiles, v)
                },
                (Variant::F2, _) => input_transform(window, wp, c, tiles, v),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F4, Isa::Avx512) => unsafe {
                    input_transform4_avx512(window, wp, c, tiles, v)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F4, Isa::Avx2Fma) => unsafe {
                    input_transform4_avx2(window, wp, c, tiles, v)
                },
                (Variant::F4, _) => input_transform4(window, wp, c, tiles, v),
            }
            for xi in 0..planes {
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
            match (variant, isa) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F2, Isa::Avx512) => unsafe { output_transform_avx512(&ot, rows) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F2, Isa::Avx2Fma) => unsafe { output_transform_avx2(&ot, rows) },
                (Variant::F2, _) => output_transform(&ot, rows),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F4, Isa::Avx512) => unsafe { output_transform4_avx512(&ot, rows) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported (checked by conv2d_with).
                (Variant::F4, Isa::Avx2Fma) => unsafe { output_transform4_avx2(&ot, rows) },
                (Variant::F4, _) => output_transform4(&ot, rows),
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
            // Loops, not array::from_fn: its closures stay out-of-line
            // calls inside the target_feature wrappers.
            let mut x = [[[0f32; LANES]; 4]; 4];
            for (i, xi) in x.iter_mut().enumerate() {
                for (j, xij) in xi.iter_mut().enumerate() {
                    *xij = load_lanes(&window[(i * wp + 2 * t + j) * c + ch..], n);
                }
            }
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
        m, tiles, blocks, ..
    } = ot;
    let plane = tiles * blocks * LANES;
    for t in 0..tiles {
        for blk in 0..blocks {
            let at = (t * blocks + blk) * LANES;
            let mut mm = [[0f32; LANES]; 16];
            for (xi, a) in mm.iter_mut().enumerate() {
                a.copy_from_slice(&m[xi * plane + at..xi * plane + at + LANES]);
            }
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
            store_outputs(ot, 2, t, blk, &y, rows);
        }
    }
}

/// Adds the bias (and the residual), applies the activation and stores the
/// `side x side` outputs `y[dy side + dx]` of tile `t`, channel block `blk`
/// into the tile row's output `rows` (those inside the image).
#[inline(always)]
fn store_outputs(
    ot: &OutputTile,
    side: usize,
    t: usize,
    blk: usize,
    y: &[[f32; LANES]],
    rows: &mut [f32],
) {
    let o0 = blk * LANES;
    let lanes = LANES.min(ot.o - o0);
    let mut bias16 = [0f32; LANES];
    bias16.copy_from_slice(&ot.bias[o0..o0 + LANES]);
    for dy in 0..side {
        let oy = side * ot.ty + dy;
        if oy >= ot.oh {
            break;
        }
        for dx in 0..side {
            let ox = side * t + dx;
            if ox >= ot.ow {
                break;
            }
            let mut v = y[dy * side + dx];
            for (x, bv) in v.iter_mut().zip(&bias16) {
                *x += bv;
            }
            if let Some(r) = ot.epilogue.residual {
                let r = &r.pixel_at(ot.b, oy, ox)[o0..o0 + lanes];
                for (x, rv) in v.iter_mut().zip(r) {
                    *x += rv;
                }
            }
            if ot.epilogue.activation == Activation::Relu {
                for x in v.iter_mut() {
                    *x = x.max(0.0);
                }
            }
            let dst = &mut rows[(dy * ot.ow + ox) * ot.out_ps + o0..];
            if lanes == LANES {
                dst[..LANES].copy_from_slice(&v);
            } else {
                dst[..lanes].copy_from_slice(&v[..lanes]);
            }
        }
    }
}

/// One 16-lane vector, written as an array so the compiler vectorises it.
type V16 = [f32; LANES];

/// `B^T x` for F(4x4, 3x3) along one line of a 6x6 window, 16 lanes at a
/// time (`B^T` rows `[4 0 -5 0 1 0]`, `[0 -4 -4 1 1 0]`, `[0 4 -4 -1 1 0]`,
/// `[0 -2 -1 2 1 0]`, `[0 2 -1 -2 1 0]`, `[0 4 0 -5 0 1]`).
#[inline(always)]
pub(crate) fn bt6(x: [&V16; 6]) -> [V16; 6] {
    let mut r = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let (d0, d1, d2, d3, d4, d5) = (x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]);
        let t1 = d4 - 4.0 * d2;
        let t2 = d3 - 4.0 * d1;
        let t3 = d4 - d2;
        let t4 = 2.0 * (d3 - d1);
        r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][l] = t1 + t2;
        r[2][l] = t1 - t2;
        r[3][l] = t3 + t4;
        r[4][l] = t3 - t4;
        r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `A^T x` for F(4x4, 3x3) along one line of a 6x6 product tile, 16 lanes
/// at a time (`A^T` rows `[1 1 1 1 1 0]`, `[0 1 -1 2 -2 0]`,
/// `[0 1 1 4 4 0]`, `[0 1 -1 8 -8 1]`).
#[inline(always)]
fn at6(x: [&V16; 6]) -> [V16; 4] {
    let mut y = [[0f32; LANES]; 4];
    for l in 0..LANES {
        let a = x[1][l] + x[2][l];
        let b = x[1][l] - x[2][l];
        let c = x[3][l] + x[4][l];
        let d = x[3][l] - x[4][l];
        y[0][l] = x[0][l] + a + c;
        y[1][l] = b + 2.0 * d;
        y[2][l] = a + 4.0 * c;
        y[3][l] = b + 8.0 * d + x[5][l];
    }
    y
}

/// [`input_transform4`] compiled for AVX2 (bit for bit the portable
/// results: Rust contracts no multiply-add).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform4_avx2(window: &[f32], wp: usize, c: usize, tiles: usize, v: &mut [f32]) {
    input_transform4(window, wp, c, tiles, v);
}

/// [`input_transform4`] compiled for AVX-512 (bit for bit the portable
/// results).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform4_avx512(
    window: &[f32],
    wp: usize,
    c: usize,
    tiles: usize,
    v: &mut [f32],
) {
    input_transform4(window, wp, c, tiles, v);
}

/// `V[xi][t][c] = (B^T d B)[xi]` for the 6x6 input window `d` of every
/// 4x4 output tile `t` in the window (`[6][wp][C]`), F(4x4, 3x3).
#[inline(always)]
fn input_transform4(window: &[f32], wp: usize, c: usize, tiles: usize, v: &mut [f32]) {
    let plane = tiles * c;
    for t in 0..tiles {
        let mut ch = 0;
        while ch < c {
            let n = LANES.min(c - ch);
            // Loops and array literals, not array::from_fn: its closures
            // stay out-of-line calls inside the target_feature wrappers.
            let mut x = [[[0f32; LANES]; 6]; 6];
            for (i, xi) in x.iter_mut().enumerate() {
                for (j, xij) in xi.iter_mut().enumerate() {
                    *xij = load_lanes(&window[(i * wp + 4 * t + j) * c + ch..], n);
                }
            }
            // B^T d, one column at a time; then (B^T d) B, one row at a time.
            let mut r = [[[0f32; LANES]; 6]; 6];
            for j in 0..6 {
                let col = bt6([&x[0][j], &x[1][j], &x[2][j], &x[3][j], &x[4][j], &x[5][j]]);
                for (i, vi) in col.into_iter().enumerate() {
                    r[i][j] = vi;
                }
            }
            for (i, ri) in r.iter().enumerate() {
                let row = bt6([&ri[0], &ri[1], &ri[2], &ri[3], &ri[4], &ri[5]]);
                for (j, o) in row.iter().enumerate() {
                    let dst = &mut v[(i * 6 + j) * plane + t * c + ch..];
                    if n == LANES {
                        dst[..LANES].copy_from_slice(o);
                    } else {
                        dst[..n].copy_from_slice(&o[..n]);
                    }
                }
            }
            ch += n;
        }
    }
}

/// [`output_transform4`] compiled for AVX2 (bit for bit the portable
/// results).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform4_avx2(ot: &OutputTile, rows: &mut [f32]) {
    output_transform4(ot, rows);
}

/// [`output_transform4`] compiled for AVX-512 (bit for bit the portable
/// results).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform4_avx512(ot: &OutputTile, rows: &mut [f32]) {
    output_transform4(ot, rows);
}

/// `Y = A^T M A` for every 4x4 tile and output channel (`ot.m`:
/// `[36][tiles][blocks][16]`), then bias, residual and activation, stored
/// into the (up to) four output rows of tile row `ot.ty`, F(4x4, 3x3).
#[inline(always)]
fn output_transform4(ot: &OutputTile, rows: &mut [f32]) {
    let &OutputTile {
        m, tiles, blocks, ..
    } = ot;
    let plane = tiles * blocks * LANES;
    for t in 0..tiles {
        for blk in 0..blocks {
            let at = (t * blocks + blk) * LANES;
            // Loops and array literals, not array::from_fn (as in
            // input_transform4).
            let mut mm = [[0f32; LANES]; 36];
            for (xi, a) in mm.iter_mut().enumerate() {
                a.copy_from_slice(&m[xi * plane + at..xi * plane + at + LANES]);
            }
            // M A, one row at a time: s[i][dx]; then A^T (M A), one column
            // at a time: y[dy 4 + dx].
            let mut s = [[[0f32; LANES]; 4]; 6];
            for (i, si) in s.iter_mut().enumerate() {
                let r = &mm[i * 6..i * 6 + 6];
                *si = at6([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
            }
            let mut y = [[0f32; LANES]; 16];
            for dx in 0..4 {
                let col = at6([
                    &s[0][dx], &s[1][dx], &s[2][dx], &s[3][dx], &s[4][dx], &s[5][dx],
                ]);
                for (dy, v) in col.into_iter().enumerate() {
                    y[dy * 4 + dx] = v;
                }
            }
            store_outputs(ot, 4, t, blk, &y, rows);
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
                // Loops, not array::from_fn (whose closures may stay
                // out-of-line calls in a target_feature function).
                let mut d = [[_mm512_setzero_ps(); 4]; 4];
                for (i, di) in d.iter_mut().enumerate() {
                    for (j, dij) in di.iter_mut().enumerate() {
                        *dij = _mm512_maskz_loadu_ps(mask, w.add((i * wp + 2 * t + j) * c + ch));
                    }
                }
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
