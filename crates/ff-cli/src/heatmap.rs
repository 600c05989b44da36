//! Anomaly-map pictures: a turbo colour map blended over the input image at
//! the input's own size, and the binary anomaly mask, both as PNG.

use std::path::Path;

use anyhow::{Context, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};

/// How strongly the colour map covers the photo in the overlay (0 = photo only).
const OVERLAY_ALPHA: f32 = 0.5;

/// Google's polynomial approximation of the "turbo" colour map: perceptually
/// smoother than jet, with the same blue (low) to red (high) reading.
/// `x` is clamped to [0, 1].
pub fn turbo(x: f32) -> [u8; 3] {
    let x = x.clamp(0.0, 1.0) as f64;
    let r = 0.135_721_38
        + x * (4.615_392_6
            + x * (-42.660_322_58
                + x * (132.131_082_34 + x * (-152.942_393_96 + x * 59.286_379_43))));
    let g = 0.091_402_61
        + x * (2.194_188_39
            + x * (4.842_966_58 + x * (-14.185_033_33 + x * (4.277_298_57 + x * 2.829_566_04))));
    let b = 0.106_673_3
        + x * (12.641_946_08
            + x * (-60.582_048_36
                + x * (110.362_767_71 + x * (-89.903_109_12 + x * 27.348_249_73))));
    let to_u8 = |v: f64| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    [to_u8(r), to_u8(g), to_u8(b)]
}

/// Resizes a row-major `src_h x src_w` map to `dst_h x dst_w` bilinearly with
/// half-pixel centres (PyTorch `align_corners=False`), so that heatmaps line up
/// with the image they were computed from.
pub fn resize_bilinear(
    src: &[f32],
    src_h: usize,
    src_w: usize,
    dst_h: usize,
    dst_w: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(dst_h * dst_w);
    let sy = src_h as f32 / dst_h as f32;
    let sx = src_w as f32 / dst_w as f32;
    // Precompute the horizontal taps once: they are the same for every row.
    let taps_x: Vec<(usize, usize, f32)> = (0..dst_w)
        .map(|x| {
            let fx = ((x as f32 + 0.5) * sx - 0.5).max(0.0);
            let x0 = (fx.floor() as usize).min(src_w - 1);
            let x1 = (x0 + 1).min(src_w - 1);
            (x0, x1, fx - x0 as f32)
        })
        .collect();
    for y in 0..dst_h {
        let fy = ((y as f32 + 0.5) * sy - 0.5).max(0.0);
        let y0 = (fy.floor() as usize).min(src_h - 1);
        let y1 = (y0 + 1).min(src_h - 1);
        let wy = fy - y0 as f32;
        let (r0, r1) = (
            &src[y0 * src_w..(y0 + 1) * src_w],
            &src[y1 * src_w..(y1 + 1) * src_w],
        );
        for &(x0, x1, wx) in &taps_x {
            let top = r0[x0] * (1.0 - wx) + r0[x1] * wx;
            let bottom = r1[x0] * (1.0 - wx) + r1[x1] * wx;
            out.push(top * (1.0 - wy) + bottom * wy);
        }
    }
    out
}

/// Blends the colour-mapped `map` (row-major, same size as `photo`) over the
/// photo. Values are mapped linearly from `[lo, hi]` to the colour map's [0, 1].
pub fn overlay(photo: &RgbImage, map: &[f32], lo: f32, hi: f32) -> RgbImage {
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (w, h) = photo.dimensions();
    let mut out = RgbImage::new(w, h);
    for (i, (px, out_px)) in photo.pixels().zip(out.pixels_mut()).enumerate() {
        let c = turbo((map[i] - lo) / span);
        let blend = |a: u8, b: u8| {
            ((1.0 - OVERLAY_ALPHA) * a as f32 + OVERLAY_ALPHA * b as f32).round() as u8
        };
        *out_px = Rgb([blend(px[0], c[0]), blend(px[1], c[1]), blend(px[2], c[2])]);
    }
    out
}

/// The binary anomaly mask: white where the map exceeds `threshold`.
pub fn binary_mask(map: &[f32], w: u32, h: u32, threshold: f32) -> GrayImage {
    let mut out = GrayImage::new(w, h);
    for (px, &v) in out.pixels_mut().zip(map) {
        *px = Luma([if v > threshold { 255 } else { 0 }]);
    }
    out
}

/// Saves a PNG atomically so that a killed run never leaves a truncated picture.
pub fn save_png<P, C>(img: &image::ImageBuffer<P, C>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    crate::fsutil::write_atomic_with(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
    })
    .with_context(|| format!("cannot save PNG '{}'", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_runs_from_dark_blue_to_dark_red() {
        let low = turbo(0.15);
        let high = turbo(0.9);
        assert!(low[2] > low[0], "low values should be blue: {low:?}");
        assert!(high[0] > high[2], "high values should be red: {high:?}");
        // Out-of-range values clamp instead of wrapping.
        assert_eq!(turbo(-3.0), turbo(0.0));
        assert_eq!(turbo(7.0), turbo(1.0));
    }

    #[test]
    fn bilinear_resize_matches_half_pixel_convention() {
        // 1x2 -> 1x4 with align_corners=false: [a, 0.75a+0.25b, 0.25a+0.75b, b].
        let out = resize_bilinear(&[0.0, 4.0], 1, 2, 1, 4);
        assert_eq!(out, vec![0.0, 1.0, 3.0, 4.0]);
        // Same size is the identity.
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize_bilinear(&src, 3, 4, 3, 4), src);
    }

    #[test]
    fn overlay_keeps_size_and_mask_thresholds() {
        let photo = RgbImage::from_pixel(3, 2, Rgb([100, 100, 100]));
        let map = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
        let over = overlay(&photo, &map, 0.0, 1.0);
        assert_eq!(over.dimensions(), (3, 2));
        assert_ne!(over.get_pixel(0, 0), over.get_pixel(2, 1));
        let mask = binary_mask(&map, 3, 2, 0.5);
        let values: Vec<u8> = mask.pixels().map(|p| p[0]).collect();
        assert_eq!(values, vec![0, 0, 0, 255, 255, 255]);
    }
}
