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

/// A 64-bit fingerprint of `data`'s bits, to tell whether weights changed
/// since they were last packed: eight independent multiply-xor lanes (so it
/// runs at memory speed), folded at the end.
pub fn fingerprint(data: &[f32]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut lanes = [0xcbf2_9ce4_8422_2325u64; 8];
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        for (h, v) in lanes.iter_mut().zip(chunk) {
            *h = (*h ^ u64::from(v.to_bits())).wrapping_mul(PRIME);
        }
    }
    for (h, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *h = (*h ^ u64::from(v.to_bits())).wrapping_mul(PRIME);
    }
    let mut out = data.len() as u64;
    for h in lanes {
        out = (out ^ h).wrapping_mul(PRIME).rotate_left(29);
    }
    out
}
