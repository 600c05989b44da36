//! Decoding any image file to RGB, and the reference's preprocessing: resize, `ToTensor`, `Normalize`.
//!
//! The model input rule: both sides are resized to `input_size`
//! (torchvision `Resize((s, s))`, PIL bilinear with antialias). On MVTec AD,
//! whose images are square, this equals the reference's `Resize(int)`; on a
//! user's non-square photo it keeps every part of the photo in the heatmap
//! (a centre crop would drop the borders) at the price of a slight stretch.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, GrayImage, RgbImage};

use crate::error::Error;
use crate::resize::resize_bilinear_antialias_raw;

/// ImageNet channel means, as in the reference's `Normalize`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations, as in the reference's `Normalize`.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A resized mask pixel (uint8, 0..=255) is anomalous iff it is greater than
/// this value, i.e. iff `v / 255 > 0.5` (`v > 127.5`, so `v >= 128`).
pub const MASK_THRESHOLD_U8: u8 = 127;

/// A normalised image in CHW order.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTensor {
    /// `[channels, height, width]`, row-major.
    pub data: Vec<f32>,
    /// Always 3 (RGB) for images produced by ff-data.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// The reference's test-time transform: resize to `input_size` square, scale
/// to [0, 1], subtract `mean`, divide by `std`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Side of the square model input in pixels.
    pub input_size: usize,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}

impl Preprocess {
    /// ImageNet normalisation at the given input size (all reference configs).
    pub fn imagenet(input_size: usize) -> Self {
        Self {
            input_size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Decodes `path` (any supported format and mode), converts it to RGB and
    /// preprocesses it.
    ///
    /// # Shapes
    /// Returns `[3, input_size, input_size]`.
    pub fn load_image(&self, path: &Path) -> Result<ImageTensor, Error> {
        self.check()?;
        let img = decode_rgb(path)?;
        Ok(self.preprocess_rgb(&img))
    }

    /// Decodes a ground-truth mask, resizes it like an image and binarises it
    /// at 0.5 (see [`MASK_THRESHOLD_U8`]).
    ///
    /// # Shapes
    /// Returns `input_size * input_size` booleans, row-major.
    pub fn load_mask(&self, path: &Path) -> Result<Vec<bool>, Error> {
        self.check()?;
        let mask = decode_gray(path)?;
        Ok(self.resize_mask(&mask))
    }

    /// Rejects an input size of zero (a config error, reported before any work).
    pub fn check(&self) -> Result<(), Error> {
        if self.input_size == 0 {
            return Err(Error::Config("input_size must be at least 1".into()));
        }
        Ok(())
    }

    /// Resizes an RGB image to `input_size x input_size` (PIL bilinear with
    /// antialias), without normalising.
    pub fn resize_rgb(&self, img: &RgbImage) -> RgbImage {
        let s = self.input_size;
        if (img.width() as usize, img.height() as usize) == (s, s) {
            return img.clone();
        }
        crate::resize::resize_bilinear_antialias(img, s, s)
    }

    /// Resizes a grayscale mask to `input_size x input_size` like an image,
    /// then binarises it at 0.5.
    pub fn resize_mask(&self, mask: &GrayImage) -> Vec<bool> {
        let s = self.input_size;
        let (w, h) = (mask.width() as usize, mask.height() as usize);
        let resized = resize_bilinear_antialias_raw(mask.as_raw(), w, h, 1, s, s);
        binarize_mask(&resized)
    }

    /// Preprocesses an in-memory RGB image of any size.
    ///
    /// # Shapes
    /// Returns `[3, input_size, input_size]`.
    pub fn preprocess_rgb(&self, img: &RgbImage) -> ImageTensor {
        self.normalize(&self.resize_rgb(img))
    }

    /// `ToTensor` + `Normalize` on an already resized image of any size, in
    /// f32 arithmetic as torch does it (`v / 255`, then `(x - mean) / std`).
    ///
    /// # Shapes
    /// `img`: `[h, w, 3]` interleaved; returns `[3, h, w]`.
    pub fn normalize(&self, img: &RgbImage) -> ImageTensor {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        self.normalize_into(img.as_raw(), &mut data);
        ImageTensor {
            data,
            channels: 3,
            height: h,
            width: w,
        }
    }

    /// Writes the normalised CHW planes of an interleaved RGB buffer into `out`
    /// (length `3 * pixels`).
    pub(crate) fn normalize_into(&self, rgb: &[u8], out: &mut [f32]) {
        let plane = rgb.len() / 3;
        debug_assert_eq!(out.len(), rgb.len());
        for c in 0..3 {
            let (mean, std) = (self.mean[c], self.std[c]);
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (d, px) in dst.iter_mut().zip(rgb.chunks_exact(3)) {
                *d = (f32::from(px[c]) / 255.0 - mean) / std;
            }
        }
    }
}

/// Binarises a resized uint8 mask: `v > 127` (i.e. `v / 255 > 0.5`).
pub fn binarize_mask(resized: &[u8]) -> Vec<bool> {
    resized.iter().map(|&v| v > MASK_THRESHOLD_U8).collect()
}

/// Reads and decodes an image file, guessing the format from its content.
pub fn decode(path: &Path) -> Result<DynamicImage, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decode_err = |source| Error::Decode {
        path: path.to_path_buf(),
        source,
    };
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(image::ImageError::IoError(e)))?;
    let img = reader.decode().map_err(decode_err)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::EmptyImage {
            path: path.to_path_buf(),
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(img)
}

/// Decodes an image file to 8-bit RGB.
///
/// Grayscale is replicated to three channels, alpha is dropped without
/// compositing, palettes are expanded (all as PIL's `convert("RGB")`), and
/// 16-bit samples are scaled to 8 bits with rounding (`v * 255 / 65535`).
/// PIL keeps the high byte of 16-bit RGB (at most 1 level apart) and clips
/// 16-bit grayscale at 255 (nearly all white), which we do not copy.
/// EXIF orientation is ignored, as PIL and torchvision ignore it.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, Error> {
    Ok(decode(path)?.into_rgb8())
}

/// Decodes an image file to 8-bit grayscale (for masks).
///
/// RGB is converted with PIL's ITU-R 601-2 luma in PIL's fixed point
/// (`(19595 R + 38470 G + 7471 B + 32768) >> 16`); alpha is dropped; 16-bit
/// samples are scaled to 8 bits with rounding.
pub fn decode_gray(path: &Path) -> Result<GrayImage, Error> {
    Ok(to_gray_pil(decode(path)?))
}

/// Converts any decoded image to 8-bit grayscale the way PIL's `convert("L")` does.
fn to_gray_pil(img: DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g,
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLumaA16(_) => img.into_luma8(),
        other => {
            let rgb = other.into_rgb8();
            let (w, h) = rgb.dimensions();
            let data = rgb
                .as_raw()
                .chunks_exact(3)
                .map(|p| {
                    let l =
                        19595 * u32::from(p[0]) + 38470 * u32::from(p[1]) + 7471 * u32::from(p[2]);
                    ((l + 0x8000) >> 16) as u8
                })
                .collect();
            // `data` has one byte per pixel of `rgb` by construction.
            GrayImage::from_raw(w, h, data).expect("gray buffer has its shape")
        }
    }
}
