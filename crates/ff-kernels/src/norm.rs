//! Layer normalisation over all of an image's values (FastFlow's
//! `LayerNorm([C, H, W])`), forward and backward, for maps stored in any
//! fixed order (the flows use NHWC) with the affine weight and bias given in
//! the same order.

use rayon::prelude::*;

use crate::error::{shape_error, Result};

/// Values per parallel chunk of an image.
const CHUNK: usize = 16 * 1024;

fn check(x: &[f32], n: usize, weight: &[f32], bias: &[f32], what: &'static str) -> Result<usize> {
    if n == 0 || weight.len() * n != x.len() || bias.len() != weight.len() {
        return Err(shape_error(
            what,
            format!(
                "{n} images of {} values, weight and bias of as many",
                weight.len()
            ),
            format!(
                "{} values, weight {}, bias {}",
                x.len(),
                weight.len(),
                bias.len()
            ),
        ));
    }
    Ok(weight.len())
}

/// Per image of `s` values: the mean and `1 / sqrt(var + eps)` (biased
/// variance, two passes in f64), as [`layer_norm_forward`] uses them.
pub fn layer_norm_statistics(x: &[f32], n: usize, s: usize, eps: f64) -> Vec<(f32, f32)> {
    (0..n)
        .map(|b| {
            let img = &x[b * s..(b + 1) * s];
            // Partial sums collected in order and added in order: the
            // result does not depend on how the pool splits the work.
            let sum: f64 = img
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&v| f64::from(v)).sum::<f64>())
                .collect::<Vec<_>>()
                .iter()
                .sum();
            let mean = sum / s as f64;
            let sq: f64 = img
                .par_chunks(CHUNK)
                .map(|c| {
                    c.iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                })
                .collect::<Vec<_>>()
                .iter()
                .sum();
            let rstd = 1.0 / (sq / s as f64 + eps).sqrt();
            (mean as f32, rstd as f32)
        })
        .collect()
}

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` per image, returning
/// each image's `(mean, 1 / sqrt(var + eps))` for the backward.
///
/// # Shapes
/// `x`, `y`: `n` images of `S` values; `weight`, `bias`: `S`.
pub fn layer_norm_forward(
    x: &[f32],
    n: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    y: &mut [f32],
) -> Result<Vec<(f32, f32)>> {
    let s = check(x, n, weight, bias, "layer norm")?;
    if y.len() != x.len() {
        return Err(shape_error("layer norm output", x.len(), y.len()));
    }
    let stats = layer_norm_statistics(x, n, s, eps);
    // Each image is cut into chunks on its own, so no chunk straddles two.
    y.par_chunks_mut(s).enumerate().for_each(|(b, yi)| {
        let (mean, rstd) = stats[b];
        yi.par_chunks_mut(CHUNK).enumerate().for_each(|(j, yc)| {
            let off = j * CHUNK;
            let xc = &x[b * s + off..b * s + off + yc.len()];
            let (wc, bc) = (&weight[off..off + yc.len()], &bias[off..off + yc.len()]);
            for (((yv, &xv), &wv), &bv) in yc.iter_mut().zip(xc).zip(wc).zip(bc) {
                *yv = (xv - mean) * rstd * wv + bv;
            }
        });
    });
    Ok(stats)
}

/// The gradients of [`layer_norm_forward`] from the output gradient `gy`:
/// the input's (`gx`), and the weight's and bias's summed over images.
///
/// # Shapes
/// `x`, `gy`, `gx`: `n` images of `S` values; `weight`, `gw`, `gb`: `S`;
/// `stats`: `n` (from the forward).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &[f32],
    n: usize,
    weight: &[f32],
    stats: &[(f32, f32)],
    gy: &[f32],
    gx: &mut [f32],
    gw: &mut [f32],
    gb: &mut [f32],
) -> Result<()> {
    let s = check(x, n, weight, gw, "layer norm gradient")?;
    if gy.len() != x.len() || gx.len() != x.len() || gb.len() != s || stats.len() != n {
        return Err(shape_error(
            "layer norm gradients",
            format!("{} values and {n} statistics", x.len()),
            format!("{}, {}, {}", gy.len(), gx.len(), stats.len()),
        ));
    }
    // Per image: mean(g w) and mean(g w xhat).
    let sums: Vec<(f64, f64)> = (0..n)
        .map(|b| {
            let (mean, rstd) = stats[b];
            let (xi, gi) = (&x[b * s..(b + 1) * s], &gy[b * s..(b + 1) * s]);
            let (a, c) = xi
                .par_chunks(CHUNK)
                .zip(gi.par_chunks(CHUNK))
                .zip(weight.par_chunks(CHUNK))
                .map(|((xc, gc), wc)| {
                    let mut a = 0f64;
                    let mut c = 0f64;
                    for ((&xv, &gv), &wv) in xc.iter().zip(gc).zip(wc) {
                        let gw = f64::from(gv * wv);
                        a += gw;
                        c += gw * f64::from((xv - mean) * rstd);
                    }
                    (a, c)
                })
                .collect::<Vec<_>>()
                .iter()
                .fold((0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1));
            (a / s as f64, c / s as f64)
        })
        .collect();
    gx.par_chunks_mut(s).enumerate().for_each(|(b, gxi)| {
        let (mean, rstd) = stats[b];
        let (m_gw, m_gwx) = (sums[b].0 as f32, sums[b].1 as f32);
        gxi.par_chunks_mut(CHUNK).enumerate().for_each(|(j, gxc)| {
            let off = j * CHUNK;
            let len = gxc.len();
            let xc = &x[b * s + off..b * s + off + len];
            let gc = &gy[b * s + off..b * s + off + len];
            let wc = &weight[off..off + len];
            for (((d, &xv), &gv), &wv) in gxc.iter_mut().zip(xc).zip(gc).zip(wc) {
                let xhat = (xv - mean) * rstd;
                *d = rstd * (gv * wv - m_gw - xhat * m_gwx);
            }
        });
    });
    // Weight and bias: sums over images, each chunk of values in its own task.
    gw.par_chunks_mut(CHUNK)
        .zip(gb.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(j, (gwc, gbc))| {
            gwc.fill(0.0);
            gbc.fill(0.0);
            let off = j * CHUNK;
            for (b, &(mean, rstd)) in stats.iter().enumerate() {
                let xc = &x[b * s + off..b * s + off + gwc.len()];
                let gc = &gy[b * s + off..b * s + off + gwc.len()];
                for (((w, bb), &xv), &gv) in gwc.iter_mut().zip(gbc.iter_mut()).zip(xc).zip(gc) {
                    *w += gv * (xv - mean) * rstd;
                    *bb += gv;
                }
            }
        });
    Ok(())
}
