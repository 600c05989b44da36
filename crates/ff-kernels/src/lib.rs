//! CPU kernels shared by the backbone and the flows: NHWC convolutions with
//! weights packed once and a fused epilogue, their input and weight gradients,
//! max-pooling, layer normalisation, the transformers' attention, and the
//! elementwise coupling of a flow step.
//!
//! The API takes and returns plain `f32` slices with explicit shapes; it knows
//! nothing about candle, images or models. This is the only crate of the
//! workspace with `unsafe` code: the SIMD micro-kernels, the raw-pointer
//! matrix products and the memory-mapped file the weights are read through
//! ([`mapped`]), each block with a `SAFETY` comment.
//!
//! Every kernel picks the best instruction set this CPU has at run time
//! ([`Isa::detect`]): AVX-512, AVX2 with FMA, or portable Rust; the `_with`
//! variants take one explicitly, so the tests compare every path the CPU
//! supports with a naive implementation.

#![warn(missing_docs)]
#![allow(unsafe_code)]

#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod attention;
pub mod conv;
pub mod coupling;
#[cfg(feature = "cuda")]
pub mod cuda;
mod elementwise;
mod error;
mod isa;
mod layout;
pub mod linear;
pub mod mapped;
mod math;
mod micro;
pub mod norm;
pub mod pool;
pub mod rows;
pub mod wgrad;
mod wgrad_winograd;
mod winograd;

pub use attention::{attention, talking_heads_attention, AttentionShape, HeadMix};
pub use conv::{
    conv2d, conv2d_with, Activation, Algorithm, ConvGeometry, Epilogue, NhwcMut, NhwcRef,
    PackedConv2d,
};
pub use coupling::{coupling_backward, coupling_forward, Coupling};
pub use elementwise::{fingerprint, relu_backward, transpose, zeroed};
pub use error::{Error, Result};
pub use isa::{Isa, Route};
pub use linear::linear;
pub use norm::{layer_norm_backward, layer_norm_forward, layer_norm_statistics};
pub use pool::max_pool2d;
pub use rows::{layer_norm_rows, softmax_rows};
pub use wgrad::{conv2d_weight_grad, conv2d_weight_grad_with};
