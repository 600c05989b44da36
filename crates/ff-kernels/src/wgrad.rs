//! The weight (and bias) gradient of an NHWC convolution, without the whole
//! im2col matrix: each thread walks its own range of output pixels in tiles
//! whose (transposed) column matrix fits in L2, multiplies each tile into a
//! private accumulator with the convolution micro-kernel (one level of
//! parallelism), and the accumulators are added once at the end.

use rayon::prelude::*;

use crate::conv::{Activation, Algorithm, ConvGeometry, NhwcRef};
use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::layout::{load_lanes, store_lanes};
use crate::micro::{add_product, add_product_of, product_scratch_len, Columns, LANES};
use crate::wgrad_winograd;
use crate::winograd;

/// Target size of one tile's column matrix, in `f32` values (512 KiB).
const TILE_VALUES: usize = 128 * 1024;

/// `out[(ky k + kx) C + c, o] = sum over output pixels of
/// in_act(input)[window tap] * grad[pixel, o]`, and the last row
/// `out[k k C, o]` = the bias gradient (the sum of `grad` over pixels).
///
/// Runs [`conv2d_weight_grad_with`] on the best instruction set this CPU has,
/// with the algorithm it picks by default.
///
/// # Shapes
/// `input`: `[n, h, w, C]`, `grad_out`: `[n, h', w', O]` ->
/// `out`: `[k k C + 1, O]` (overwritten).
pub fn conv2d_weight_grad(
    geometry: ConvGeometry,
    input: NhwcRef,
    input_activation: Activation,
    grad_out: NhwcRef,
    out: &mut [f32],
) -> Result<()> {
    conv2d_weight_grad_with(
        Isa::detect(),
        None,
        geometry,
        input,
        input_activation,
        grad_out,
        out,
    )
}

/// [`conv2d_weight_grad`] on instruction set `isa` (which must be
/// [supported](Isa::is_supported); an unsupported one falls back to the
/// portable kernels) with `algorithm`: `None`
/// picks Winograd where it applies (3x3, stride 1, padding 1) and pays off:
/// on AVX-512 F(4x4, 3x3) where the image is at least 24 pixels wide and
/// F(2x2, 3x3) on narrower ones (conv_bench, every flow layer of resnet18,
/// DeiT and CaiT, batches 8 and 32, two runs each: F(4x4, 3x3) 1.5-2.7x
/// faster than the direct weight gradient against F(2x2, 3x3)'s 1.2-2.0x
/// from 24 pixels up, but 1.2-1.5x against 1.4-1.8x on resnet18's 16x16
/// layers with 128-256 channels at batch 8), and the same on AVX2 (Zen 3,
/// the same shapes and batches: F(4x4, 3x3) 1.3-2.2x, F(2x2, 3x3)
/// 1.2-1.8x; the portable build was not measured faster, so it stays
/// direct), unless `FASTFLOW_WINOGRAD=off` (the direct weight gradient) or `=2x2`
/// (F(2x2, 3x3) only); else the direct weight gradient.
/// `Algorithm::Winograd` asks for the F(2x2, 3x3) weight gradient,
/// `Algorithm::Winograd4x4` for the F(4x4, 3x3) one. Winograd needs 2.25x
/// (F(2x2)) or 4x (F(4x4)) fewer multiply-adds; its sums differ from the
/// direct ones by rounding only (the tests bound each against a float64
/// reference).
///
/// # Errors
/// A shape error when the shapes disagree, or Winograd is asked for where it
/// does not apply.
///
/// # Shapes
/// As [`conv2d_weight_grad`].
pub fn conv2d_weight_grad_with(
    isa: Isa,
    algorithm: Option<Algorithm>,
    geometry: ConvGeometry,
    input: NhwcRef,
    input_activation: Activation,
    grad_out: NhwcRef,
    out: &mut [f32],
) -> Result<()> {
    let isa = if isa.is_supported() {
        isa
    } else {
        Isa::Portable
    };
    let winograd = match algorithm {
        Some(a) if a.winograd().is_some() && !winograd::applies(&geometry) => {
            return Err(shape_error(
                "Winograd weight gradient",
                "kernel 3, stride 1, padding 1",
                format!("{geometry:?}"),
            ))
        }
        Some(a) => a.winograd(),
        None => {
            // conv_bench, every flow shape, batch 8 and 32: since the
            // weight gradient's products were cut to L2-sized slices
            // (session 12), Winograd wins on every one on Zen 4 and on Zen 3
            // (AVX2: F(2x2) 1.2-1.8x, F(4x4) 1.3-2.2x over direct; the two
            // tie on DeiT's 384 -> 61 and 61 -> 768 at one batch or the
            // other). Before that, on AVX2 it lost where the output had
            // fewer channels than the input.
            let pays_off = isa != Isa::Portable;
            let four_by_four =
                pays_off && input.dims()[2] >= 24 && crate::conv::four_by_four_by_default();
            let variant = if four_by_four {
                winograd::Variant::F4
            } else {
                winograd::Variant::F2
            };
            (winograd::applies(&geometry) && pays_off && crate::conv::winograd_by_default())
                .then_some(variant)
        }
    };
    let ConvGeometry {
        in_channels: c,
        out_channels: o,
        kernel: k,
        ..
    } = geometry;
    let [n, h, w, ic] = input.dims();
    if ic != c {
        return Err(shape_error("weight-gradient input channels", c, ic));
    }
    let (oh, ow) = geometry.output_size(h, w).ok_or_else(|| {
        shape_error(
            "weight-gradient input",
            format!("at least {k}x{k} after padding"),
            format!("{h}x{w}"),
        )
    })?;
    if grad_out.dims() != [n, oh, ow, o] {
        return Err(shape_error(
            "output gradient",
            format!("{:?}", [n, oh, ow, o]),
            format!("{:?}", grad_out.dims()),
        ));
    }
    let ncols = k * k * c + 1;
    if out.len() != ncols * o {
        return Err(shape_error(
            "weight gradient",
            format!("[{ncols}, {o}]"),
            out.len(),
        ));
    }
    let pixels = n * oh * ow;
    out.fill(0.0);
    if pixels == 0 {
        return Ok(());
    }
    if let Some(variant) = winograd {
        wgrad_winograd::weight_grad(isa, variant, &input, input_activation, &grad_out, out);
        return Ok(());
    }
    if geometry.stride == 1 {
        weight_grad_stride1(isa, geometry, &input, input_activation, &grad_out, out);
        return Ok(());
    }
    let tasks = rayon::current_num_threads().clamp(1, pixels);
    let per_task = pixels.div_ceil(tasks);
    let tile_px = (TILE_VALUES / ncols).clamp(16, 1024);
    let gps = grad_out.pixel_stride();
    let grad = grad_out.data();
    let blocks = o.div_ceil(LANES);
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0f32; ncols * o];
            let mut cols_t = Vec::new();
            let mut g_packed = Vec::new();
            let mut tile = vec![0f32; product_scratch_len(isa)];
            let end = ((t + 1) * per_task).min(pixels);
            let mut p0 = t * per_task;
            while p0 < end {
                let tp = tile_px.min(end - p0);
                gather_columns_t(
                    &input,
                    input_activation,
                    geometry,
                    oh,
                    ow,
                    p0,
                    tp,
                    &mut cols_t,
                );
                // The output gradient of these pixels in blocks of 16
                // channels: [blocks][tp][16], zero-padded.
                g_packed.clear();
                g_packed.resize(blocks * tp * LANES, 0.0);
                for (i, px) in (p0..p0 + tp).enumerate() {
                    let src = &grad[px * gps..px * gps + o];
                    for (blk, chunk) in src.chunks(LANES).enumerate() {
                        g_packed[(blk * tp + i) * LANES..][..chunk.len()].copy_from_slice(chunk);
                    }
                }
                // acc[r, o] += sum_t cols_t[r, t] g[t, o]: the micro-kernel
                // with the rows r as its pixels and the tile's pixels t as
                // its input channels (a 1x1 "convolution" over t).
                add_product(
                    isa,
                    ncols,
                    tp,
                    &cols_t,
                    tp,
                    &g_packed,
                    tp * LANES,
                    o,
                    &mut acc,
                    0,
                    &mut tile,
                );
                p0 += tp;
            }
            acc
        })
        .collect();
    out.par_chunks_mut(o).enumerate().for_each(|(r, dst)| {
        for part in &partials {
            for (d, v) in dst.iter_mut().zip(&part[r * o..(r + 1) * o]) {
                *d += v;
            }
        }
    });
    Ok(())
}

/// The transposed column matrix `[k k C + 1, tp]` of output pixels
/// `p0 .. p0 + tp` (linear over images, rows and columns): row
/// `(ky k + kx) C + c` holds tap `(ky, kx)`, channel `c` of each pixel's
/// zero-padded window, the last row 1s for the bias.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn gather_columns_t(
    input: &NhwcRef,
    act: Activation,
    g: ConvGeometry,
    oh: usize,
    ow: usize,
    p0: usize,
    tp: usize,
    cols_t: &mut Vec<f32>,
) {
    let [_, h, w, c] = input.dims();
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    let ncols = k * k * c + 1;
    cols_t.clear();
    cols_t.resize(ncols * tp, 0.0);
    for t in 0..tp {
        let pix = p0 + t;
        let (b, oy, ox) = (pix / (oh * ow), (pix / ow) % oh, pix % ow);
        for ky in 0..k {
            let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&v| v < h) else {
                continue;
            };
            for kx in 0..k {
                let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&v| v < w) else {
                    continue;
                };
                let src = input.pixel_at(b, iy, ix);
                let r0 = (ky * k + kx) * c;
                for (ci, &v) in src.iter().enumerate() {
                    cols_t[(r0 + ci) * tp + t] = act.apply(v);
                }
            }
        }
        cols_t[(ncols - 1) * tp + t] = 1.0;
    }
}

/// The stride-1 weight gradient without any column matrix.
///
/// With the input stored channel-major and zero-padded (`plane[c][y' Wp +
/// x']`, `Wp = w + 2p`) and the output gradient laid out over the same padded
/// width (zero in the `2p` extra columns of each row), tap `(ky, kx)` of every
/// output pixel `q = y Wp + x` reads `plane[c][q + shift(tap)]`: each tap is a
/// plain shifted view. So `dW[tap][c][o] = sum_q plane[c][q + shift(tap)]
/// g[q][o]` is, for each tap, one product over a contiguous reduction, run on
/// the convolution micro-kernel with the channels as its pixels.
///
/// A 1x1 kernel needs no padding, so one of the two maps can be read in
/// place as the product's columns (pixel by pixel, 16 channels a step)
/// where its channels fill whole blocks: the gradient, or else the input
/// (when no activation applies to it), whose product `dW^T` is then
/// transposed into place. Only the other map is copied into planes: DeiT's
/// 1x1 flow layers copied 56 MB of gradient, or 28 MB of input, per call.
fn weight_grad_stride1(
    isa: Isa,
    g: ConvGeometry,
    input: &NhwcRef,
    act: Activation,
    grad_out: &NhwcRef,
    out: &mut [f32],
) {
    let ConvGeometry {
        in_channels: c,
        out_channels: o,
        kernel: k,
        padding: p,
        ..
    } = g;
    let [n, h, w, _] = input.dims();
    let (oh, ow) = (h + 2 * p + 1 - k, w + 2 * p + 1 - k);
    let wp = w + 2 * p;
    let pointwise = k == 1 && p == 0;
    let grad_in_place = pointwise && o % LANES == 0;
    let swap = pointwise && !grad_in_place && c % LANES == 0 && act == Activation::Identity;
    // The map copied into planes (the product's rows) and the one read as
    // its columns, with their channel counts.
    let (rows_map, rows_act, cols_map) = if swap {
        (grad_out, Activation::Identity, input)
    } else {
        (input, act, grad_out)
    };
    let (rc, cc) = (rows_map.dims()[3], cols_map.dims()[3]);
    let cols_in_place = grad_in_place || swap;
    // Rows of the padded plane, plus room for the last tap's overrun.
    let plane_len = (h + 2 * p) * wp + k;
    let q_len = oh * wp;
    let blocks = cc.div_ceil(LANES);

    // The planes [n][rc][plane_len] and, unless read in place, the packed
    // gradient [n][blocks][q_len][16].
    let mut planes = crate::zeroed(n * rc * plane_len);
    let group_tasks = crate::layout::plane_groups(&mut planes, rc, plane_len);
    debug_assert_eq!(group_tasks.len(), n * rc.div_ceil(LANES));
    group_tasks.into_par_iter().for_each(|(b, gi, chunk)| {
        let job = PlaneRows {
            input: rows_map,
            act: rows_act,
            b,
            c0: gi * LANES,
            p,
            wp,
            plane_len,
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is supported (checked by the caller), so AVX-512F is present.
            Isa::Avx512 => unsafe { fill_plane_rows_avx512(&job, chunk) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is supported (checked by the caller), so AVX2 and FMA are present.
            Isa::Avx2Fma => unsafe { fill_plane_rows_avx2(&job, chunk) },
            _ => fill_plane_rows(&job, chunk),
        }
    });
    let gps = grad_out.pixel_stride();
    let grad = grad_out.data();
    let mut g_packed = if cols_in_place {
        Vec::new()
    } else {
        crate::zeroed(n * blocks * q_len * LANES)
    };
    g_packed
        .par_chunks_mut(q_len * LANES)
        .enumerate()
        .for_each(|(bb, dst)| {
            let (b, blk) = (bb / blocks, bb % blocks);
            let lanes = LANES.min(o - blk * LANES);
            for y in 0..oh {
                for x in 0..ow {
                    let px = (b * oh + y) * ow + x;
                    // A whole block is one fixed-size copy, not a memcpy call.
                    let v = load_lanes(&grad[px * gps + blk * LANES..], lanes);
                    store_lanes(&v, &mut dst[(y * wp + x) * LANES..][..lanes]);
                }
            }
        });

    // Tasks: (image, chunk of the reduction), dealt into a fixed number of
    // groups of consecutive tasks; each group accumulates privately and the
    // groups are added in order, so the sums do not depend on how the pool
    // schedules them (resumed training stays bit-identical).
    const CHUNK: usize = 1024;
    const GROUPS: usize = 8;
    let chunks = q_len.div_ceil(CHUNK);
    let n_tasks = n * chunks;
    let per_group = n_tasks.div_ceil(GROUPS);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..n_tasks.div_ceil(per_group))
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![0f32; k * k * rc * cc];
            let mut bias = vec![0f32; o];
            let mut tile = vec![0f32; product_scratch_len(isa)];
            for task in group * per_group..((group + 1) * per_group).min(n_tasks) {
                let (b, q0) = (task / chunks, (task % chunks) * CHUNK);
                let ql = CHUNK.min(q_len - q0);
                // The bias gradient of the task's pixels (the padded
                // columns past each row's ow are not pixels).
                for q in (q0..q0 + ql).filter(|q| q % wp < ow) {
                    let px = (b * oh + q / wp) * ow + q % wp;
                    for (d, v) in bias.iter_mut().zip(&grad[px * gps..px * gps + o]) {
                        *d += v;
                    }
                }
                let plane = &planes[b * rc * plane_len..(b + 1) * rc * plane_len];
                let cols = if cols_in_place {
                    // Pixel b q_len + q0 on (q_len = h w here).
                    let at = (b * q_len + q0) * cols_map.pixel_stride();
                    Columns::nhwc(&cols_map.data()[at..], cols_map.pixel_stride())
                } else {
                    let gb = &g_packed[b * blocks * q_len * LANES..];
                    Columns {
                        data: &gb[q0 * LANES..],
                        block_stride: q_len * LANES,
                        step: LANES,
                    }
                };
                for ky in 0..k {
                    for kx in 0..k {
                        let shift = ky * wp + kx;
                        let r_base = (ky * k + kx) * rc;
                        add_product_of(
                            isa,
                            rc,
                            ql,
                            &plane[shift + q0..],
                            plane_len,
                            &cols,
                            cc,
                            &mut acc,
                            r_base,
                            &mut tile,
                        );
                    }
                }
            }
            (acc, bias)
        })
        .collect();
    // Rows then the bias gradient (the output gradient summed over pixels,
    // by group like the rows).
    let (rows_out, bias_out) = out.split_at_mut(k * k * c * o);
    rows_out.fill(0.0);
    bias_out.fill(0.0);
    for (part, bias) in &partials {
        if swap {
            // part is dW^T: [o][c].
            for (ci, dst) in rows_out.chunks_exact_mut(o).enumerate() {
                for (oo, d) in dst.iter_mut().enumerate() {
                    *d += part[oo * c + ci];
                }
            }
        } else {
            for (d, v) in rows_out.iter_mut().zip(part) {
                *d += v;
            }
        }
        for (d, v) in bias_out.iter_mut().zip(bias) {
            *d += v;
        }
    }
}
/// One task of [`weight_grad_stride1`]'s plane fill: image `b`'s channels
/// `c0 .. c0 + 16` (fewer at the end) as padded planes.
struct PlaneRows<'a> {
    input: &'a NhwcRef<'a>,
    act: Activation,
    b: usize,
    c0: usize,
    p: usize,
    wp: usize,
    plane_len: usize,
}

/// [`fill_plane_rows`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_plane_rows_avx512(job: &PlaneRows, chunk: &mut [f32]) {
    fill_plane_rows(job, chunk);
}

/// [`fill_plane_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fill_plane_rows_avx2(job: &PlaneRows, chunk: &mut [f32]) {
    fill_plane_rows(job, chunk);
}

/// Writes the task's planes into `chunk` (`[16][plane_len]`), 16 pixels of a
/// row at a time: their channels read pixel by pixel into a block (one
/// vector each, activation applied), then each channel's run stored at once.
/// (Pixel by pixel, one scalar store per channel, this fill was 3% of a
/// DeiT flow training step.)
#[inline(always)]
fn fill_plane_rows(job: &PlaneRows, chunk: &mut [f32]) {
    let &PlaneRows {
        input,
        act,
        b,
        c0,
        p,
        wp,
        plane_len,
    } = job;
    let [_, h, w, c] = input.dims();
    let cn = LANES.min(c - c0);
    let mut block = [[0f32; LANES]; LANES];
    for y in 0..h {
        let row0 = (y + p) * wp + p;
        let mut x0 = 0;
        while x0 < w {
            let nx = LANES.min(w - x0);
            for (x, px) in block.iter_mut().enumerate().take(nx) {
                *px = act.apply_block(load_lanes(&input.pixel_at(b, y, x0 + x)[c0..], cn));
            }
            for j in 0..cn {
                let run: [f32; LANES] = std::array::from_fn(|x| block[x][j]);
                store_lanes(&run, &mut chunk[j * plane_len + row0 + x0..][..nx]);
            }
            x0 += nx;
        }
    }
}
