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
        /// The config field (its YAML key).
        field: &'static str,
        /// What is wrong, in words.
        message: String,
    },

    /// A state dict lacks a tensor that the model needs.
    #[error("the state dict has no tensor '{key}' (expected shape {expected:?})")]
    MissingTensor {
        /// The full state-dict key.
        key: String,
        /// What was expected.
        expected: Vec<usize>,
    },

    /// A state-dict tensor exists but has the wrong shape.
    #[error("tensor '{key}' has shape {found:?}, but the model expects {expected:?}")]
    ShapeMismatch {
        /// The full state-dict key.
        key: String,
        /// What was expected.
        expected: Vec<usize>,
        /// What was found.
        found: Vec<usize>,
    },

    /// A state dict holds tensors that belong to no part of the model.
    #[error("the state dict has tensors the model does not know: {keys:?}")]
    UnexpectedTensors {
        /// The keys at fault.
        keys: Vec<String>,
    },

    /// A `w_perm` / `w_perm_inv` buffer that is not a hard permutation matrix
    /// (or whose inverse does not match it).
    #[error("tensor '{key}' is not a valid hard channel permutation: {message}")]
    InvalidPermutation {
        /// The full state-dict key.
        key: String,
        /// What is wrong, in words.
        message: String,
    },

    /// Features (or flow outputs) whose number or shapes do not fit the model.
    #[error("{what}: expected {expected}, found {found}")]
    InputShape {
        /// What the input is.
        what: &'static str,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },

    /// A trainable parameter that is not a `Var` (the model was built from a
    /// `VarBuilder` not backed by a `VarMap`).
    #[error("parameter '{key}' is not trainable: build the model from a VarMap-backed VarBuilder")]
    NotTrainable {
        /// The full state-dict key.
        key: String,
    },

    /// Optimizer state that does not fit the optimizer's parameters.
    #[error("optimizer state: {message}")]
    OptimizerState {
        /// What is wrong, in words.
        message: String,
    },

    /// The backbone failed to build or run.
    #[error("backbone")]
    Backbone(#[from] ff_backbone::Error),

    /// A checkpoint file could not be read or parsed.
    #[error("cannot read checkpoint '{}'", path.display())]
    ReadCheckpoint {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: candle_core::Error,
    },

    /// A file that parses but holds no state dict.
    #[error(
        "'{}' holds no tensors under 'model_state_dict' (is it a FastFlow checkpoint?)",
        path.display()
    )]
    NotACheckpoint {
        /// The file or directory at fault.
        path: PathBuf,
    },

    /// Any other tensor operation failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of ff-flow.
pub type Result<T> = std::result::Result<T, Error>;
