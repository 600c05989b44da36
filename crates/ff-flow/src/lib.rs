#![doc = include_str!("../README.md")]
//!
//! FastFlow's trainable part in candle: 2D normalizing flows with FrEIA 0.2
//! `AllInOneBlock` semantics, the LayerNorms over CNN features, the model
//! around a frozen backbone, its loss and anomaly map, PyTorch-exact Adam, and
//! checkpoints (ours in safetensors, the reference's `.pt` files read without
//! executing pickle code).
//!
//! Knows nothing about images on disk or the hub: it receives a built
//! backbone and tensors.

#![warn(missing_docs)]

pub mod adam;
pub mod checkpoint;
pub mod config;
mod conv;
pub mod coupling;
mod cpu_op;
pub mod error;
pub mod flow;
mod flow_op;
mod freia;
mod fused;
pub mod model;
pub mod norm;
pub mod param;

pub use adam::{Adam, AdamConfig};
pub use checkpoint::{
    checkpoint_bytes, load_safetensors, load_state_dict, read_reference_pt,
    split_reference_state_dict, ReferenceStateDict,
};
pub use config::FastFlowConfig;
pub use coupling::{AllInOneBlock, Permutation};
pub use error::{Error, Result};
pub use flow::{Flow, FlowConfig};
pub use model::{
    anomaly_map, image_scores, loss, loss_and_grads, FastFlow, FastFlowHead, FeatureNorms,
    FlowOutput,
};
pub use norm::LayerNorm;
pub use param::Param;
