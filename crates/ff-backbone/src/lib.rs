#![doc = include_str!("../README.md")]
//!
//! Frozen feature extractors for FastFlow: ResNet18, WideResNet50-2, DeiT and
//! CaiT with timm 0.5.4 key names, and the weight sources that feed them
//! (Hugging Face hub, local safetensors, seeded random init, closed-form
//! fixture weights).

pub mod backbone;
pub mod det_init;
pub mod error;
pub mod hub;
pub mod kind;
pub mod resnet;
pub mod vit;
pub mod weights;
mod weights_mmap;

pub use backbone::Backbone;
pub use error::{Error, Result};
pub use kind::BackboneKind;
pub use resnet::{ResNet, ResNetFeatures};
pub use weights::{backbone_var_builder, get_checked, WeightSource};
pub use weights_mmap::safetensors_var_builder;
