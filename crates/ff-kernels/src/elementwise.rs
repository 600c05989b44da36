//! Elementwise passes over NHWC maps.

use rayon::prelude::*;

use crate::conv::{NhwcMut, NhwcRef};
use crate::error::{shape_error, Result};

/// The gradient through a ReLU: `grad = 0` wherever `input <= 0`.
///
/// # Shapes
/// `input`, `grad`: `[n, h, w, C]` (each with its own pixel stride).
pub fn relu_backward(input: NhwcRef, grad: NhwcMut) -> Result<()> {
    if input.dims() != grad.dims() {
        return Err(shape_error(
            "ReLU gradient",
            format!("{:?}", input.dims()),
            format!("{:?}", grad.dims()),
        ));
    }
    let [n, h, w, c] = input.dims();
    let gps = grad.pixel_stride();
    grad.into_data()
        .par_chunks_mut(gps * w.max(1))
        .take(n * h)
        .enumerate()
        .for_each(|(row, g)| {
            let (b, y) = (row / h, row % h);
            for x in 0..w {
                let xs = input.pixel_at(b, y, x);
                for (gv, &xv) in g[x * gps..x * gps + c].iter_mut().zip(xs) {
                    if xv <= 0.0 {
                        *gv = 0.0;
                    }
                }
            }
        });
    Ok(())
}
