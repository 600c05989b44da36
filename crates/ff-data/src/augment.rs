//! Seeded training augmentations (off by default, the reference uses none): flips, rot90, colour jitter.
//!
//! They run on the resized uint8 image before normalisation, so the cache
//! of preprocessed images stays valid across epochs. A geometric transform
//! is applied identically to the image and its mask.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which augmentations to draw, per image, from a seeded generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
    /// Mirror top-bottom with probability 0.5.
    pub vflip: bool,
    /// Rotate by a uniform multiple of 90 degrees.
    pub rot90: bool,
    /// Maximum relative change of brightness, contrast and saturation
    /// (each factor drawn from `[1 - j, 1 + j]`); 0 disables; at most 0.5.
    pub color_jitter: f32,
    /// Seed; the draw for an image depends on (seed, epoch, sample index).
    pub seed: u64,
}

impl AugmentConfig {
    /// Flips, rot90 and a small colour jitter (0.1), for textures without a
    /// preferred orientation.
    pub fn standard(seed: u64) -> Self {
        Self {
            hflip: true,
            vflip: true,
            rot90: true,
            color_jitter: 0.1,
            seed,
        }
    }
}

/// The transform drawn for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentDraw {
    /// Mirror left-right.
    pub hflip: bool,
    /// Mirror top-bottom.
    pub vflip: bool,
    /// Quarter turns counter-clockwise (0..4).
    pub quarter_turns: u8,
    /// Brightness, contrast and saturation factors.
    pub brightness: f32,
    /// See `brightness`.
    pub contrast: f32,
    /// See `brightness`.
    pub saturation: f32,
}

impl AugmentConfig {
    /// Draws the transform for one image.
    pub fn draw(&self, rng: &mut impl Rng) -> AugmentDraw {
        let j = self.color_jitter.clamp(0.0, 0.5);
        // Always consume the same number of draws so one setting does not
        // shift the randomness of the others.
        let h: bool = rng.random();
        let v: bool = rng.random();
        let k: u8 = rng.random_range(0..4);
        let mut factor = || 1.0 + j * (2.0 * rng.random::<f32>() - 1.0);
        let (b, c, s) = (factor(), factor(), factor());
        AugmentDraw {
            hflip: self.hflip && h,
            vflip: self.vflip && v,
            quarter_turns: if self.rot90 { k } else { 0 },
            brightness: b,
            contrast: c,
            saturation: s,
        }
    }
}

/// Moves the pixels of a square `size x size` image with `channels`
/// interleaved values per pixel.
fn geometric<T: Copy>(src: &[T], size: usize, channels: usize, d: &AugmentDraw) -> Vec<T> {
    let mut out = src.to_vec();
    let last = size - 1;
    for y in 0..size {
        for x in 0..size {
            // Source pixel of output (y, x): undo rotation, then flips.
            let (mut sy, mut sx) = match d.quarter_turns % 4 {
                0 => (y, x),
                1 => (x, last - y),
                2 => (last - y, last - x),
                _ => (last - x, y),
            };
            if d.hflip {
                sx = last - sx;
            }
            if d.vflip {
                sy = last - sy;
            }
            let (o, i) = ((y * size + x) * channels, (sy * size + sx) * channels);
            out[o..o + channels].copy_from_slice(&src[i..i + channels]);
        }
    }
    out
}

/// Applies a drawn transform to a square RGB image (`[size, size, 3]`,
/// uint8) and its optional mask (`[size, size]`).
pub fn apply(
    d: &AugmentDraw,
    rgb: &[u8],
    mask: Option<&[bool]>,
    size: usize,
) -> (Vec<u8>, Option<Vec<bool>>) {
    let geo = d.hflip || d.vflip || d.quarter_turns & 3 != 0;
    let mut img = if geo {
        geometric(rgb, size, 3, d)
    } else {
        rgb.to_vec()
    };
    let mask = mask.map(|m| {
        if geo {
            geometric(m, size, 1, d)
        } else {
            m.to_vec()
        }
    });
    if (d.brightness, d.contrast, d.saturation) != (1.0, 1.0, 1.0) {
        color_jitter(&mut img, d);
    }
    (img, mask)
}

/// Brightness, contrast (towards the mean gray) and saturation (towards each
/// pixel's gray), in that order, as torchvision's `ColorJitter` blends do.
fn color_jitter(img: &mut [u8], d: &AugmentDraw) {
    let gray = |p: &[f32]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let mut f: Vec<f32> = img
        .iter()
        .map(|&v| (f32::from(v) * d.brightness).clamp(0.0, 255.0))
        .collect();
    let n = (f.len() / 3).max(1) as f32;
    let mean = f.chunks_exact(3).map(gray).sum::<f32>() / n;
    for v in f.iter_mut() {
        *v = ((*v - mean) * d.contrast + mean).clamp(0.0, 255.0);
    }
    for p in f.chunks_exact_mut(3) {
        let g = gray(p);
        for v in p.iter_mut() {
            *v = ((*v - g) * d.saturation + g).clamp(0.0, 255.0);
        }
    }
    for (o, v) in img.iter_mut().zip(f) {
        *o = v.round() as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(h: bool, v: bool, k: u8) -> AugmentDraw {
        AugmentDraw {
            hflip: h,
            vflip: v,
            quarter_turns: k,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
        }
    }

    #[test]
    fn four_quarter_turns_are_identity_and_flips_mirror() {
        let size = 5;
        let img: Vec<u8> = (0..size * size * 3).map(|i| i as u8).collect();
        let mut cur = img.clone();
        for _ in 0..4 {
            cur = apply(&draw(false, false, 1), &cur, None, size).0;
        }
        assert_eq!(cur, img);
        let h = apply(&draw(true, false, 0), &img, None, size).0;
        // Pixel (0, 0) comes from (0, size - 1).
        assert_eq!(&h[0..3], &img[(size - 1) * 3..size * 3]);
        let v = apply(&draw(false, true, 0), &img, None, size).0;
        assert_eq!(
            &v[0..3],
            &img[(size - 1) * size * 3..(size - 1) * size * 3 + 3]
        );
    }
}
