//! NHWC 2D convolution forward, with weights packed once into blocks of 16
//! output channels and a fused epilogue (bias, residual add, ReLU).
//!
//! One task computes one output row of one image: it gathers the `k` input
//! rows it needs into a small zero-padded window (applying the input
//! activation on the way), then runs the micro-kernel over tiles of pixels x
//! output-channel blocks. The window stays in L1/L2, nothing of im2col size is
//! ever materialised, the padding costs no branches in the inner loop, and the
//! only parallelism is over rows (no nested thread pools).

use rayon::prelude::*;

use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::layout::gather_window;
pub use crate::layout::{Activation, ConvGeometry, Epilogue, NhwcMut, NhwcRef};
use crate::micro::{for_each_tile, max_blocks, max_pixels, run_tile, Tile, LANES};
use crate::winograd;

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// The register-blocked direct convolution (any geometry).
    Direct,
    /// Winograd F(2x2, 3x3) (3x3, stride 1, padding 1 only).
    Winograd,
    /// Winograd F(4x4, 3x3) (3x3, stride 1, padding 1 only): 4x fewer
    /// multiply-adds than direct instead of 2.25x, for a few times the fp32
    /// rounding error of F(2x2, 3x3).
    Winograd4x4,
}

impl Algorithm {
    /// The Winograd variant this algorithm is, if it is one.
    pub(crate) fn winograd(self) -> Option<winograd::Variant> {
        match self {
            Algorithm::Direct => None,
            Algorithm::Winograd => Some(winograd::Variant::F2),
            Algorithm::Winograd4x4 => Some(winograd::Variant::F4),
        }
    }
}

/// Convolution weights packed for the micro-kernel: `[O/16][k][k][C][16]`
/// (output channels padded with zeros to a multiple of 16), the bias padded
/// likewise, and for Winograd the transformed weights.
#[derive(Debug, Clone)]
pub struct PackedConv2d {
    geometry: ConvGeometry,
    blocks: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
    /// The Winograd variant and its `U = G g G^T` as
    /// `[planes][O/16][C][16]`, when Winograd is chosen.
    winograd: Option<(winograd::Variant, Vec<f32>)>,
}

/// Whether Winograd is the default where it applies: yes, unless
/// `FASTFLOW_WINOGRAD=off`.
pub(crate) fn winograd_by_default() -> bool {
    !matches!(
        std::env::var("FASTFLOW_WINOGRAD").as_deref(),
        Ok("off" | "0")
    )
}

/// Whether the default may pick F(4x4, 3x3): yes, unless
/// `FASTFLOW_WINOGRAD=2x2` (F(2x2, 3x3) only, its smaller rounding error
/// and the speeds before F(4x4, 3x3)).
pub(crate) fn four_by_four_by_default() -> bool {
    std::env::var("FASTFLOW_WINOGRAD").as_deref() != Ok("2x2")
}

impl PackedConv2d {
    /// Packs `weight(o, c, ky, kx)` and `bias(o)` for `algorithm`; `None`
    /// picks Winograd where it applies (3x3, stride 1, padding 1) and pays
    /// off (F(4x4, 3x3) from 48 input channels on AVX-512, F(2x2, 3x3)
    /// below; F(4x4, 3x3) from 32 on AVX2; F(2x2, 3x3) from 64 on the
    /// portable build) unless
    /// `FASTFLOW_WINOGRAD=off` (direct only) or `=2x2` (F(2x2, 3x3) in
    /// place of F(4x4, 3x3)), else the direct convolution. Asking for
    /// Winograd where it does not apply is an error.
    pub fn from_fn(
        geometry: ConvGeometry,
        algorithm: Option<Algorithm>,
        weight: impl Fn(usize, usize, usize, usize) -> f32 + Sync,
        bias: impl Fn(usize) -> f32,
    ) -> Result<Self> {
        geometry.check()?;
        let algorithm = match algorithm {
            Some(a) if a.winograd().is_some() && !winograd::applies(&geometry) => {
                return Err(shape_error(
                    "Winograd convolution",
                    "kernel 3, stride 1, padding 1",
                    format!("{geometry:?}"),
                ))
            }
            Some(a) => a,
            None => match winograd::choose(&geometry, four_by_four_by_default())
                .filter(|_| winograd_by_default())
            {
                Some(winograd::Variant::F2) => Algorithm::Winograd,
                Some(winograd::Variant::F4) => Algorithm::Winograd4x4,
                None => Algorithm::Direct,
            },
        };
        let ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: k,
            ..
        } = geometry;
        let blocks = o.div_ceil(LANES);
        let direct_len = if algorithm == Algorithm::Direct {
            blocks * k * k * c * LANES
        } else {
            0
        };
        let mut weights = vec![0f32; direct_len];
        for blk in (0..blocks).filter(|_| direct_len > 0) {
            let lanes = LANES.min(o - blk * LANES);
            for ky in 0..k {
                for kx in 0..k {
                    for ci in 0..c {
                        let at = (((blk * k + ky) * k + kx) * c + ci) * LANES;
                        for (l, v) in weights[at..at + lanes].iter_mut().enumerate() {
                            *v = weight(blk * LANES + l, ci, ky, kx);
                        }
                    }
                }
            }
        }
        let mut b = vec![0f32; blocks * LANES];
        for (oo, v) in b.iter_mut().enumerate().take(o) {
            *v = bias(oo);
        }
        let winograd = algorithm
            .winograd()
            .map(|variant| (variant, winograd::pack(&geometry, variant, &weight)));
        Ok(Self {
            geometry,
            blocks,
            weights,
            bias: b,
            winograd,
        })
    }

    /// The direct kernel's packed weights `[O/16][k][k][C][16]` (empty when
    /// Winograd was chosen).
    pub(crate) fn direct_weights(&self) -> &[f32] {
        &self.weights
    }

    /// The bias padded to a multiple of 16 channels.
    pub(crate) fn bias_padded(&self) -> &[f32] {
        &self.bias
    }

    /// The algorithm [`conv2d`] will use.
    pub fn algorithm(&self) -> Algorithm {
        match &self.winograd {
            Some((winograd::Variant::F2, _)) => Algorithm::Winograd,
            Some((winograd::Variant::F4, _)) => Algorithm::Winograd4x4,
            None => Algorithm::Direct,
        }
    }

    /// Packs PyTorch-layout weights `[O, C, k, k]` and an optional bias `[O]`
    /// (`algorithm` as in [`Self::from_fn`]).
    pub fn from_oihw(
        geometry: ConvGeometry,
        algorithm: Option<Algorithm>,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: k,
            ..
        } = geometry;
        if weight.len() != o * c * k * k {
            return Err(shape_error(
                "convolution weight",
                format!("[{o}, {c}, {k}, {k}]"),
                weight.len(),
            ));
        }
        if let Some(b) = bias {
            if b.len() != o {
                return Err(shape_error("convolution bias", format!("[{o}]"), b.len()));
            }
        }
        Self::from_fn(
            geometry,
            algorithm,
            |oo, ci, ky, kx| weight[((oo * c + ci) * k + ky) * k + kx],
            |oo| bias.map_or(0.0, |b| b[oo]),
        )
    }

    /// Packs a weight matrix in rows `(ky k + kx) C + c` by columns `o`, with
    /// the bias as one more row (`[k k C + 1, O]`, the flows' layout).
    pub fn from_rows(
        geometry: ConvGeometry,
        algorithm: Option<Algorithm>,
        rows: &[f32],
    ) -> Result<Self> {
        let (c, o, k) = (geometry.in_channels, geometry.out_channels, geometry.kernel);
        check_rows(rows, k, c, o)?;
        Self::from_fn(
            geometry,
            algorithm,
            |oo, ci, ky, kx| rows[((ky * k + kx) * c + ci) * o + oo],
            |oo| rows[k * k * c * o + oo],
        )
    }

    /// The convolution whose forward maps the output gradient of the
    /// stride-1 convolution `geometry` (weights as in [`Self::from_rows`]) to
    /// its input gradient: the kernel flipped, input and output channels
    /// swapped, padding `k - 1 - p`, no bias.
    pub fn input_gradient_from_rows(
        geometry: ConvGeometry,
        algorithm: Option<Algorithm>,
        rows: &[f32],
    ) -> Result<Self> {
        let transposed = input_gradient_geometry(geometry)?;
        let (c, o, k) = (geometry.in_channels, geometry.out_channels, geometry.kernel);
        check_rows(rows, k, c, o)?;
        Self::from_fn(
            transposed,
            algorithm,
            |ci, oo, ky, kx| rows[(((k - 1 - ky) * k + (k - 1 - kx)) * c + ci) * o + oo],
            |_| 0.0,
        )
    }

    /// [`Self::input_gradient_from_rows`] for PyTorch-layout weights
    /// `[O, C, k, k]`.
    pub fn input_gradient_from_oihw(
        geometry: ConvGeometry,
        algorithm: Option<Algorithm>,
        weight: &[f32],
    ) -> Result<Self> {
        let transposed = input_gradient_geometry(geometry)?;
        let (c, o, k) = (geometry.in_channels, geometry.out_channels, geometry.kernel);
        if weight.len() != o * c * k * k {
            return Err(shape_error(
                "convolution weight",
                format!("[{o}, {c}, {k}, {k}]"),
                weight.len(),
            ));
        }
        Self::from_fn(
            transposed,
            algorithm,
            |ci, oo, ky, kx| weight[((oo * c + ci) * k + (k - 1 - ky)) * k + (k - 1 - kx)],
            |_| 0.0,
        )
    }

    /// The convolution's shape.
    pub fn geometry(&self) -> ConvGeometry {
        self.geometry
    }
}

/// The geometry of the convolution that computes the input gradient of the
/// stride-1 convolution `g`: channels swapped, padding `k - 1 - p`.
fn input_gradient_geometry(g: ConvGeometry) -> Result<ConvGeometry> {
    if g.stride != 1 || g.padding >= g.kernel {
        return Err(shape_error(
            "input-gradient convolution",
            "stride 1 and padding < kernel",
            format!("{g:?}"),
        ));
    }
    Ok(ConvGeometry {
        in_channels: g.out_channels,
        out_channels: g.in_channels,
        kernel: g.kernel,
        stride: 1,
        padding: g.kernel - 1 - g.padding,
    })
}

fn check_rows(rows: &[f32], k: usize, c: usize, o: usize) -> Result<()> {
    if rows.len() != (k * k * c + 1) * o {
        return Err(shape_error(
            "convolution weight rows",
            format!("[{} , {o}]", k * k * c + 1),
            rows.len(),
        ));
    }
    Ok(())
}

/// `out = act(conv(in_act(input)) + bias + residual)` with the best
/// instruction set of this CPU.
///
/// # Shapes
/// `input`: `[n, h, w, C]` -> `out`: `[n, h', w', O]` with `(h', w')` =
/// [`ConvGeometry::output_size`]; `residual`: `[n, h', w', O]`.
pub fn conv2d(
    conv: &PackedConv2d,
    input: NhwcRef,
    input_activation: Activation,
    epilogue: Epilogue,
    out: NhwcMut,
) -> Result<()> {
    conv2d_with(Isa::detect(), conv, input, input_activation, epilogue, out)
}

/// [`conv2d`] on an explicit instruction set (which must be
/// [supported](Isa::is_supported); an unsupported one falls back to the
/// portable kernels).
pub fn conv2d_with(
    isa: Isa,
    conv: &PackedConv2d,
    input: NhwcRef,
    input_activation: Activation,
    epilogue: Epilogue,
    out: NhwcMut,
) -> Result<()> {
    let isa = if isa.is_supported() {
        isa
    } else {
        Isa::Portable
    };
    let g = conv.geometry;
    let [n, h, w, c] = input.dims;
    if c != g.in_channels {
        return Err(shape_error("convolution input channels", g.in_channels, c));
    }
    let (oh, ow) = g.output_size(h, w).ok_or_else(|| {
        shape_error(
            "convolution input",
            format!("at least {0}x{0} after padding", g.kernel),
            format!("{h}x{w}"),
        )
    })?;
    let o = g.out_channels;
    if out.dims != [n, oh, ow, o] {
        return Err(shape_error(
            "convolution output",
            format!("{:?}", [n, oh, ow, o]),
            format!("{:?}", out.dims),
        ));
    }
    if let Some(r) = &epilogue.residual {
        if r.dims != [n, oh, ow, o] {
            return Err(shape_error(
                "residual",
                format!("{:?}", [n, oh, ow, o]),
                format!("{:?}", r.dims),
            ));
        }
    }
    if n * oh * ow == 0 {
        return Ok(());
    }
    if let Some((variant, u)) = &conv.winograd {
        winograd::conv2d(
            isa,
            *variant,
            &g,
            u,
            &conv.bias,
            &input,
            input_activation,
            &epilogue,
            out,
        );
        return Ok(());
    }
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    // The window is wide enough for the padded input and for the last
    // output pixel's taps.
    let wp = (w + 2 * p).max((ow - 1) * s + k);
    let ob_max = max_blocks(isa);
    let block_stride = k * k * c * LANES;
    let out_ps = out.pixel_stride;
    let row_len = ow * out_ps;
    let rows = n * oh;
    out.data
        .par_chunks_mut(row_len)
        .take(rows)
        .enumerate()
        .for_each_init(
            || {
                (
                    Vec::new(),
                    vec![0f32; max_pixels(isa, 1).max(max_pixels(isa, ob_max) * ob_max) * LANES],
                )
            },
            |(window, tile), (row, orow)| {
                let (b, oy) = (row / oh, row % oh);
                gather_window(&input, input_activation, b, oy * s, k, p, wp, window);
                for_each_tile(isa, conv.blocks, ob_max, ow, |ob0, obn, ox0, pn| {
                    let t = Tile {
                        // SAFETY: ox0 s c < wp c <= window.len().
                        src: unsafe { window.as_ptr().add(ox0 * s * c) },
                        row_stride: wp * c,
                        pix_stride: s * c,
                        k,
                        c,
                        // SAFETY: ob0 < blocks, so the offset is inside the weights.
                        weights: unsafe { conv.weights.as_ptr().add(ob0 * block_stride) },
                        block_stride,
                        w_step: LANES,
                        out_stride: obn * LANES,
                    };
                    // SAFETY: the window holds k rows of wp pixels of c
                    // channels and (ox0 + pn - 1) s + k <= wp, so every
                    // tap of every pixel is inside it; blocks ob0..ob0 +
                    // obn exist; `tile` holds pmax obn 16 values; `isa`
                    // was checked above.
                    unsafe { run_tile(isa, pn, obn, &t, tile) };
                    let at = TileStore {
                        conv,
                        tile,
                        epilogue: &epilogue,
                        pn,
                        obn,
                        ob0,
                        b,
                        oy,
                        ox0,
                        out_ps,
                    };
                    store_tile(isa, &at, orow);
                });
            },
        );
    Ok(())
}

/// One computed tile and where [`store_tile`] writes it: the tile's pixels
/// and blocks, the output row they belong to and the fused epilogue.
struct TileStore<'a> {
    conv: &'a PackedConv2d,
    tile: &'a [f32],
    epilogue: &'a Epilogue<'a>,
    pn: usize,
    obn: usize,
    ob0: usize,
    b: usize,
    oy: usize,
    ox0: usize,
    out_ps: usize,
}

/// Bias, residual and activation on one tile, stored into the output row,
/// 16 lanes wide where the CPU has AVX-512 and 8 with AVX2 (the closure
/// that calls this is compiled for the base target).
fn store_tile(isa: Isa, t: &TileStore, orow: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (checked by conv2d_with), so AVX-512F is present.
        Isa::Avx512 => unsafe { store_tile_avx512(t, orow) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (checked by conv2d_with), so AVX2 and FMA are present.
        Isa::Avx2Fma => unsafe { store_tile_avx2(t, orow) },
        _ => store_tile_body(t, orow),
    }
}

/// [`store_tile_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile_avx512(t: &TileStore, orow: &mut [f32]) {
    store_tile_body(t, orow)
}

/// [`store_tile_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_tile_avx2(t: &TileStore, orow: &mut [f32]) {
    store_tile_body(t, orow)
}

#[inline(always)]
fn store_tile_body(t: &TileStore, orow: &mut [f32]) {
    let (conv, tile, epilogue) = (t.conv, t.tile, t.epilogue);
    let o = conv.geometry.out_channels;
    for i in 0..t.pn {
        let res = epilogue.residual.map(|r| r.pixel_at(t.b, t.oy, t.ox0 + i));
        for j in 0..t.obn {
            let o0 = (t.ob0 + j) * LANES;
            let lanes = LANES.min(o - o0);
            let acc = &tile[(i * t.obn + j) * LANES..][..lanes];
            let bias = &conv.bias[o0..o0 + lanes];
            let dst = &mut orow[(t.ox0 + i) * t.out_ps + o0..][..lanes];
            match res {
                Some(r) => {
                    let r = &r[o0..o0 + lanes];
                    for l in 0..lanes {
                        dst[l] = epilogue.activation.apply(acc[l] + bias[l] + r[l]);
                    }
                }
                None => {
                    for l in 0..lanes {
                        dst[l] = epilogue.activation.apply(acc[l] + bias[l]);
                    }
                }
            }
        }
    }
}
