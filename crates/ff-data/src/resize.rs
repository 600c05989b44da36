//! PIL-exact bilinear resampling with antialiasing, and torchvision's `Resize` size rules.
//!
//! This is a transcription of Pillow's `libImaging/Resample.c` for 8-bit
//! images (`ImagingResample` with the bilinear filter): a triangle filter
//! whose support is scaled by the downscale factor (that scaling is the
//! antialiasing), coefficients normalised per output pixel and converted to
//! 22-bit fixed point, a horizontal pass first, uint8 rounding and clipping,
//! then a vertical pass. Matching it bit for bit is what lets a model trained
//! by the PyTorch reference see the same pixels here.

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bilinear (triangle) filter, support 1.
fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Per-output-pixel filter windows along one axis.
struct Coeffs {
    /// Maximum taps per output pixel; `weights` holds `ksize` entries per pixel.
    ksize: usize,
    /// First input index and number of taps for every output pixel.
    bounds: Vec<(usize, usize)>,
    /// Fixed-point weights, `ksize` per output pixel.
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 times the scale
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let taps = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(taps) {
            let w = bilinear_filter(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..taps {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, taps));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: drop the fixed-point fraction and clamp to 0..=255.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples an interleaved 8-bit image exactly as PIL's
/// `Image.resize((new_w, new_h), Image.BILINEAR)` does (antialiased when
/// shrinking).
///
/// # Shapes
/// `src`: `[height, width, channels]` interleaved; returns
/// `[new_h, new_w, channels]`. Any channel count works (masks use 1, RGB 3).
///
/// A zero output size gives an empty buffer; an empty source gives a black
/// output (decoded images are never empty: see `Error::EmptyImage`).
///
/// # Panics
/// Panics if `src.len() != width * height * channels`, a programming error
/// rather than user input (decoded images always match their dimensions).
pub fn resize_bilinear_antialias_raw(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_w: usize,
    new_h: usize,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        width * height * channels,
        "buffer/shape mismatch"
    );
    if width == 0 || height == 0 || new_w == 0 || new_h == 0 {
        return vec![0; new_w * new_h * channels];
    }
    let need_horizontal = new_w != width;
    let need_vertical = new_h != height;
    if !need_horizontal && !need_vertical {
        return src.to_vec();
    }
    // Horizontal pass first (as Pillow), over all rows: Pillow restricts it to
    // the rows the vertical pass reads, which gives the same values.
    let (tmp, tmp_w) = if need_horizontal {
        let c = precompute_coeffs(width, new_w);
        let mut out = vec![0u8; new_w * height * channels];
        for y in 0..height {
            let row_in = &src[y * width * channels..(y + 1) * width * channels];
            let row_out = &mut out[y * new_w * channels..(y + 1) * new_w * channels];
            for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + taps];
                for ch in 0..channels {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (x, &w) in k.iter().enumerate() {
                        acc += i32::from(row_in[(xmin + x) * channels + ch]) * w;
                    }
                    row_out[xx * channels + ch] = clip8(acc);
                }
            }
        }
        (out, new_w)
    } else {
        (src.to_vec(), width)
    };
    if !need_vertical {
        return tmp;
    }
    let c = precompute_coeffs(height, new_h);
    let stride = tmp_w * channels;
    let mut out = vec![0u8; new_h * stride];
    let mut acc_row = vec![0i32; stride];
    for (yy, &(ymin, taps)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + taps];
        acc_row.fill(1 << (PRECISION_BITS - 1));
        for (y, &w) in k.iter().enumerate() {
            let row_in = &tmp[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (a, &v) in acc_row.iter_mut().zip(row_in) {
                *a += i32::from(v) * w;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc_row) {
            *o = clip8(a);
        }
    }
    out
}

/// [`resize_bilinear_antialias_raw`] on an [`RgbImage`]: PIL's
/// `img.resize((new_w, new_h), Image.BILINEAR)`, which is also torchvision's
/// `Resize((new_h, new_w))` on a PIL image.
pub fn resize_bilinear_antialias(img: &RgbImage, new_w: usize, new_h: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = resize_bilinear_antialias_raw(img.as_raw(), w, h, 3, new_w, new_h);
    // The buffer length is new_w * new_h * 3 by construction.
    RgbImage::from_raw(new_w as u32, new_h as u32, data).expect("resize output has its shape")
}

/// The output size of torchvision's `Resize(size)` with an `int` size: the
/// shorter side becomes `size`, the longer one `int(size * long / short)`
/// (truncated, as Python's `int()` does).
///
/// Returns `(new_width, new_height)`.
pub fn shorter_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision `Resize(size)` (an `int`) on a PIL RGB image: the shorter side
/// becomes `size`, keeping the aspect ratio; PIL bilinear with antialias.
///
/// An empty image comes back unchanged.
pub fn resize_shorter_side(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let (nw, nh) = shorter_side_size(w, h, size);
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    resize_bilinear_antialias(img, nw, nh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(1024, 256), (900, 256), (256, 448), (7, 3), (3, 7)] {
            let c = precompute_coeffs(i, o);
            for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
                assert!(xmin + taps <= i);
                let s: i64 = c.weights[xx * c.ksize..xx * c.ksize + taps]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= taps as i64,
                    "{i}->{o} px {xx}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 13 * 9 * 3];
        for (w, h) in [(5, 4), (26, 18), (13, 9)] {
            let out = resize_bilinear_antialias_raw(&src, 13, 9, 3, w, h);
            assert_eq!(out.len(), w * h * 3);
            assert!(out.iter().all(|&v| v == 77));
        }
    }

    #[test]
    fn shorter_side_follows_torchvision() {
        assert_eq!(shorter_side_size(700, 500, 256), (358, 256));
        assert_eq!(shorter_side_size(500, 700, 256), (256, 358));
        assert_eq!(shorter_side_size(1024, 1024, 256), (256, 256));
        assert_eq!(shorter_side_size(333, 517, 64), (64, 99));
    }
}
