//! Fully connected layers (`x W^T + b`) on the convolution micro-kernel:
//! weights packed once as a 1x1 convolution, rows in parallel chunks.

use rayon::prelude::*;

use crate::conv::{Activation, PackedConv2d};
use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::micro::{for_each_tile, max_blocks, max_pixels, run_tile, Tile, LANES};

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
    let ob_max = max_blocks(isa);
    let blocks = o.div_ceil(LANES);
    let (weights, bias) = (packed.direct_weights(), packed.bias_padded());
    out.par_chunks_mut(ROWS_PER_TASK * o)
        .enumerate()
        .for_each_init(
            || vec![0f32; max_pixels(isa, 1).max(max_pixels(isa, ob_max) * ob_max) * LANES],
            |tile, (chunk, dst)| {
                let r0 = chunk * ROWS_PER_TASK;
                let rows = dst.len() / o;
                for_each_tile(isa, blocks, ob_max, rows, |ob0, obn, p0, pn| {
                    let t = Tile {
                        // SAFETY: row r0 + p0 < x.len() / c.
                        src: unsafe { x.as_ptr().add((r0 + p0) * c) },
                        row_stride: 0,
                        pix_stride: c,
                        k: 1,
                        c,
                        // SAFETY: ob0 < blocks blocks of c 16 values.
                        weights: unsafe { weights.as_ptr().add(ob0 * c * LANES) },
                        block_stride: c * LANES,
                        out_stride: obn * LANES,
                    };
                    // SAFETY: rows r0 + p0 .. + pn of x hold c values each;
                    // blocks ob0 .. ob0 + obn hold c 16 packed weights; `tile`
                    // holds pmax obn 16 values; `isa` is the detected one.
                    unsafe { run_tile(isa, pn, obn, &t, tile) };
                    for i in 0..pn {
                        for j in 0..obn {
                            let o0 = (ob0 + j) * LANES;
                            let lanes = LANES.min(o - o0);
                            let acc = &tile[(i * obn + j) * LANES..][..lanes];
                            let d = &mut dst[(p0 + i) * o + o0..][..lanes];
                            for ((dv, &av), &bv) in d.iter_mut().zip(acc).zip(&bias[o0..o0 + lanes])
                            {
                                *dv = activation.apply(av + bv);
                            }
                        }
                    }
                });
            },
        );
    Ok(())
}
