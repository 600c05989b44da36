//! The error type of ff-flow: every failure names the config field, tensor key
//! or file it concerns, and keeps the underlying cause.

use std::path::PathBuf;

/// Everything that can go wrong while building, running, training or
/// (de)serialising a FastFlow model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value outside what the model supports.
    #[error("invalid FastFlow config: field '{field}': {message}")]
    Config {
        field: &'static str,
        message: String,
    },

    /// A state dict lacks a tensor that the model needs.
    #[error("the state dict has no tensor '{key}' (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },

    /// A state-dict tensor exists but has the wrong shape.
    #[error("tensor '{key}' has shape {found:?}, but the model expects {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A state dict holds tensors that belong to no part of the model.
    #[error("the state dict has tensors the model does not know: {keys:?}")]
    UnexpectedTensors { keys: Vec<String> },

    /// A `w_perm` / `w_perm_inv` buffer that is not a hard permutation matrix
    /// (or whose inverse does not match it).
    #[error("tensor '{key}' is not a valid hard channel permutation: {message}")]
    InvalidPermutation { key: String, message: String },

    /// Features (or flow outputs) whose number or shapes do not fit the model.
    #[error("{what}: expected {expected}, found {found}")]
    InputShape {
        what: &'static str,
        expected: String,
        found: String,
    },

    /// A trainable parameter that is not a `Var` (the model was built from a
    /// `VarBuilder` not backed by a `VarMap`).
    #[error("parameter '{key}' is not trainable: build the model from a VarMap-backed VarBuilder")]
    NotTrainable { key: String },

    /// Optimizer state that does not fit the optimizer's parameters.
    #[error("optimizer state: {message}")]
    OptimizerState { message: String },

    /// The backbone failed to build or run.
    #[error("backbone")]
    Backbone(#[from] ff_backbone::Error),

    /// A checkpoint file could not be read or parsed.
    #[error("cannot read checkpoint '{}'", path.display())]
    ReadCheckpoint {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    /// A file that parses but holds no state dict.
    #[error(
        "'{}' holds no tensors under 'model_state_dict' (is it a FastFlow checkpoint?)",
        path.display()
    )]
    NotACheckpoint { path: PathBuf },

    /// Any other tensor operation failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of ff-flow.
pub type Result<T> = std::result::Result<T, Error>;
