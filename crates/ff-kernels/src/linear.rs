//! Fully connected layers (`x W^T + b`) on the convolution micro-kernel:
//! weights packed once as a 1x1 convolution, rows in parallel chunks.

use rayon::prelude::*;

use crate::conv::{Activation, PackedConv2d};
use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::layout::store_lanes;
use crate::micro::{max_blocks, product_scratch_len, run_tile, tiles, Tile, LANES};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 48;

/// `out = act(x W^T + b)` for a layer packed as a 1x1 convolution
/// ([`PackedConv2d::from_oihw`] with `[out, in, 1, 1]` weights).
///
/// # Shapes
/// `x`: `[rows, in]` -> `out`: `[rows, out]`.
pub fn linear(
    packed: &PackedConv2d,
    x: &[f32],
    activation: Activation,
    out: &mut [f32],
) -> Result<()> {
    let g = packed.geometry();
    let (c, o) = (g.in_channels, g.out_channels);
    if g.kernel != 1 || g.stride != 1 || g.padding != 0 || packed.direct_weights().is_empty() {
        return Err(shape_error(
            "linear layer",
            "a direct 1x1 convolution",
            format!("{g:?}"),
        ));
    }
    if !x.len().is_multiple_of(c) || out.len() != x.len() / c * o {
        return Err(shape_error(
            "linear layer",
            format!("[rows, {c}] in and [rows, {o}] out"),
            format!("{} and {} values", x.len(), out.len()),
        ));
    }
    let isa = Isa::detect();
    let job = Rows {
        isa,
        x,
        c,
        o,
        weights: packed.direct_weights(),
        bias: packed.bias_padded(),
        activation,
    };
    out.par_chunks_mut(ROWS_PER_TASK * o)
        .enumerate()
        .for_each_init(
            || vec![0f32; product_scratch_len(isa)],
            |tile, (chunk, dst)| match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the detected instruction set is present.
                Isa::Avx512 => unsafe { rows_avx512(&job, chunk * ROWS_PER_TASK, dst, tile) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the detected instruction set is present.
                Isa::Avx2Fma => unsafe { rows_avx2(&job, chunk * ROWS_PER_TASK, dst, tile) },
                _ => rows(&job, chunk * ROWS_PER_TASK, dst, tile),
            },
        );
    Ok(())
}

/// What every task of [`linear`] shares.
struct Rows<'a> {
    isa: Isa,
    x: &'a [f32],
    c: usize,
    o: usize,
    weights: &'a [f32],
    /// Padded to whole blocks.
    bias: &'a [f32],
    activation: Activation,
}

/// [`rows`] compiled for AVX-512, so that the bias-and-activation epilogue
/// (GELU's erf and exp) is 16 lanes wide instead of the base target's 4; the
/// same operations in the same order, so the same results.
///
/// # Safety
/// The CPU must have AVX-512F; the arguments as [`rows`] needs them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(job: &Rows, r0: usize, dst: &mut [f32], tile: &mut [f32]) {
    rows(job, r0, dst, tile);
}

/// [`rows`] compiled for AVX2 (8-lane epilogue).
///
/// # Safety
/// The CPU must have AVX2 and FMA; the arguments as [`rows`] needs them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(job: &Rows, r0: usize, dst: &mut [f32], tile: &mut [f32]) {
    rows(job, r0, dst, tile);
}

/// Output rows `r0 ..` (`dst`: whole rows of `o` values) of one task, tile by
/// tile on the micro-kernel, then bias and activation; `tile` is scratch of
/// [`product_scratch_len`] values.
#[inline(always)]
fn rows(job: &Rows, r0: usize, dst: &mut [f32], tile: &mut [f32]) {
    let &Rows {
        isa,
        x,
        c,
        o,
        weights,
        bias,
        activation,
    } = job;
    let rows = dst.len() / o;
    assert!(x.len() >= (r0 + rows) * c && tile.len() >= product_scratch_len(isa));
    let blocks = o.div_ceil(LANES);
    // A loop, not a closure, so the epilogue compiles with this function's
    // target features.
    for (ob0, obn, p0, pn) in tiles(isa, blocks, max_blocks(isa), rows) {
        let t = Tile::rows(
            &x[(r0 + p0) * c..],
            c,
            c,
            &weights[ob0 * c * LANES..],
            c * LANES,
            obn * LANES,
        );
        // SAFETY: rows r0 + p0 .. + pn of x hold c values each (asserted);
        // blocks ob0 .. ob0 + obn hold c 16 packed weights; `tile` holds
        // pmax obn 16 values (asserted); `isa` is the detected one.
        unsafe { run_tile(isa, pn, obn, &t, tile) };
        for i in 0..pn {
            for j in 0..obn {
                let o0 = (ob0 + j) * LANES;
                let lanes = LANES.min(o - o0);
                let acc = &tile[(i * obn + j) * LANES..][..LANES];
                let d = &mut dst[(p0 + i) * o + o0..][..lanes];
                epilogue(activation, acc, &bias[o0..o0 + LANES], d);
            }
        }
    }
}

/// `out = act(acc + bias)` for one block (`acc`, `bias`: 16 values; `out`:
/// the block's real lanes), as one vector pass.
#[inline(always)]
fn epilogue(act: Activation, acc: &[f32], bias: &[f32], out: &mut [f32]) {
    // Sliced to 16 so that the sum's index checks fold away.
    let (acc, bias) = (&acc[..LANES], &bias[..LANES]);
    let v = act.apply_block(std::array::from_fn(|l| acc[l] + bias[l]));
    store_lanes(&v, out);
}
