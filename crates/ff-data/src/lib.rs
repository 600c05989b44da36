#![doc = include_str!("../README.md")]
//!
//! ff-data: datasets (MVTec AD, user folders), torchvision-faithful preprocessing, parallel batch loading, synthetic defects.
//!
//! The crate knows nothing about candle: it hands out `f32` buffers in NCHW
//! order with explicit shapes (see ARCHITECTURE.md for why).
//!
//! ```text
//! mvtec_category / folder_dataset -> Split { train, test: Vec<Sample> }
//! Loader::new(samples, Preprocess, LoaderConfig).epoch(e) -> Batch { images [n,3,s,s], masks [n,s,s], .. }
//! ```

#![warn(missing_docs)]

pub mod augment;
pub mod dataset;
pub mod error;
pub mod fs;
pub mod hash;
pub mod loader;
pub mod preprocess;
pub mod resize;
pub mod synth;

pub use augment::AugmentConfig;
pub use dataset::{
    folder_dataset, is_image_file, list_images, mvtec_category, FolderConfig, Label, Sample, Split,
    IMAGE_EXTENSIONS, MVTEC_CATEGORIES,
};
pub use error::Error;
pub use loader::{Batch, EpochIter, Loader, LoaderConfig};
pub use preprocess::{
    binarize_mask, decode_gray, decode_rgb, ImageTensor, Preprocess, IMAGENET_MEAN, IMAGENET_STD,
    MASK_THRESHOLD_U8,
};
pub use resize::{
    resize_bilinear_antialias, resize_bilinear_antialias_raw, resize_shorter_side,
    shorter_side_size,
};
