#![doc = include_str!("../README.md")]
//!
//! Frozen feature extractors for FastFlow: ResNet18, WideResNet50-2, DeiT and
//! CaiT with timm 0.5.4 key names, and the weight sources that feed them
//! (Hugging Face hub, local safetensors, seeded random init).
//!
//! The `test-support` feature adds `det_init`'s closed-form fixture
//! weights (the `deterministic` weight source), which the parity tests share
//! with the PyTorch fixture scripts.

#![warn(missing_docs)]

pub mod backbone;
mod checked;
mod closed_form;
#[cfg(feature = "test-support")]
pub mod det_init;
pub mod error;
pub mod hub;
pub mod kind;
pub mod resnet;
pub mod vit;
pub mod weights;
mod weights_mmap;

pub use backbone::{source_tensors, Backbone};
pub use checked::{full_key, get_checked};
pub use error::{Error, Result};
pub use kind::BackboneKind;
pub use resnet::{ResNet, ResNetFeatures};
pub use weights::{backbone_var_builder, WeightSource};
pub use weights_mmap::safetensors_var_builder;
