//! The one error type of ff-data: every variant names the file or directory at fault.

use std::path::PathBuf;

/// Everything that can go wrong while listing, decoding or writing data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory the dataset layout requires is absent (or is a file).
    #[error("dataset directory {path} does not exist or is not a directory")]
    MissingDir {
        /// The file or directory at fault.
        path: PathBuf,
    },
    /// The training directory exists but holds no image files.
    #[error("no training images found in {path}")]
    EmptyTrainSet {
        /// The file or directory at fault.
        path: PathBuf,
    },
    /// Reading a file or listing a directory failed.
    #[error("cannot read {path}")]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be decoded as an image (unknown format, truncated, corrupt).
    #[error("cannot decode image {path}")]
    Decode {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: image::ImageError,
    },
    /// The image decoded to zero width or height.
    #[error("image {path} is empty ({width}x{height})")]
    EmptyImage {
        /// The file or directory at fault.
        path: PathBuf,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// An anomalous test image has no ground-truth mask where the layout says it must be.
    #[error("defect image {image} has no ground-truth mask (expected {expected})")]
    MissingMask {
        /// The image file.
        image: PathBuf,
        /// What was expected.
        expected: PathBuf,
    },
    /// Masks were requested but an anomalous sample has none recorded.
    #[error("anomalous sample {image} has no ground-truth mask, but masks were requested")]
    NoMaskRecorded {
        /// The image file.
        image: PathBuf,
    },
    /// A ground-truth mask does not have the size of its image.
    #[error(
        "mask {mask} is {mask_width}x{mask_height} but its image {image} is {image_width}x{image_height}"
    )]
    MaskSizeMismatch {
        /// The mask file.
        mask: PathBuf,
        /// The image file.
        image: PathBuf,
        /// The mask's width in pixels.
        mask_width: u32,
        /// The mask's height in pixels.
        mask_height: u32,
        /// The image's width in pixels.
        image_width: u32,
        /// The image's height in pixels.
        image_height: u32,
    },
    /// Writing a generated image failed.
    #[error("cannot write image {path}")]
    Encode {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: image::ImageError,
    },
    /// Writing a file, or creating its directory, failed ([`crate::fs`]).
    #[error("cannot write {path}")]
    Write {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid configuration: {0}")]
    Config(String),
}
