//! NHWC max-pooling.

use rayon::prelude::*;

use crate::conv::{NhwcMut, NhwcRef};
use crate::error::{shape_error, Result};

/// `k x k` max-pooling with stride `s` and padding `p` that never wins (as
/// PyTorch's `MaxPool2d`, which pads with -inf).
///
/// # Shapes
/// `input`: `[n, h, w, C]` -> `out`: `[n, (h + 2p - k) / s + 1, .., C]`.
pub fn max_pool2d(input: NhwcRef, k: usize, s: usize, p: usize, out: NhwcMut) -> Result<()> {
    let [n, h, w, c] = input.dims();
    if k == 0 || s == 0 || p * 2 > k || h + 2 * p < k || w + 2 * p < k {
        return Err(shape_error(
            "max-pool",
            format!("kernel {k}, stride {s}, padding {p} on {h}x{w}"),
            "an impossible window",
        ));
    }
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    if out.dims() != [n, oh, ow, c] {
        return Err(shape_error(
            "max-pool output",
            format!("{:?}", [n, oh, ow, c]),
            format!("{:?}", out.dims()),
        ));
    }
    let ops = out.pixel_stride();
    out.into_data()
        .par_chunks_mut(ow * ops)
        .take(n * oh)
        .enumerate()
        .for_each(|(row, orow)| {
            let (b, oy) = (row / oh, row % oh);
            let ys = (oy * s).saturating_sub(p)..(oy * s + k - p).min(h);
            for ox in 0..ow {
                let dst = &mut orow[ox * ops..ox * ops + c];
                dst.fill(f32::NEG_INFINITY);
                for iy in ys.clone() {
                    for ix in (ox * s).saturating_sub(p)..(ox * s + k - p).min(w) {
                        for (d, &v) in dst.iter_mut().zip(input.pixel_at(b, iy, ix)) {
                            *d = d.max(v);
                        }
                    }
                }
            }
        });
    Ok(())
}
