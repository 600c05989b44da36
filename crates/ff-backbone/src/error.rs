//! The error type of ff-backbone: every failure names the key, file or hub
//! repository it concerns.

use std::path::PathBuf;

/// Everything that can go wrong while choosing, loading or running a backbone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The weights have no tensor under `key` (the full timm state-dict key).
    #[error("the backbone weights have no tensor '{key}'")]
    MissingTensor {
        /// The full state-dict key.
        key: String,
    },

    /// The tensor under `key` exists but has the wrong shape.
    #[error("tensor '{key}' has shape {found:?}, but the backbone expects {expected:?}")]
    ShapeMismatch {
        /// The full state-dict key.
        key: String,
        /// What was expected.
        expected: Vec<usize>,
        /// What was found.
        found: Vec<usize>,
    },

    /// The Hugging Face hub (or its local cache) could not provide the weights of `repo`.
    #[error("cannot get the weights of hub repository '{repo}': {message}")]
    Hub {
        /// The hub repository (`owner/name`).
        repo: String,
        /// What is wrong, in words.
        message: String,
    },

    /// A local weights file could not be opened or parsed.
    #[error("cannot read the weights file '{}'", path.display())]
    WeightsFile {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: candle_core::Error,
    },

    /// A backbone name that is none of the four timm names FastFlow uses.
    #[error(
        "unknown backbone '{name}' (expected one of: resnet18, wide_resnet50_2, \
         deit_base_distilled_patch16_384, cait_m48_448)"
    )]
    UnknownBackbone {
        /// The name as given.
        name: String,
    },

    /// A `--weights` value that is neither `hub`, `hub:<owner/name>`, `random`,
    /// `random:<seed>` nor a `.safetensors` path.
    #[error(
        "invalid weight source '{value}': expected 'hub', 'hub:<owner/name>', 'random', \
         'random:<seed>' or a path to a .safetensors file"
    )]
    InvalidWeightSource {
        /// The value as given.
        value: String,
    },

    /// A model configuration whose numbers do not fit together (a
    /// transformer's dimensions), or weights a route cannot run.
    #[error("invalid backbone configuration: {message}")]
    Config {
        /// What is wrong, in words.
        message: String,
    },

    /// An input tensor whose shape the backbone cannot process.
    #[error("backbone input has shape {found:?}: {message}")]
    InputShape {
        /// What was found.
        found: Vec<usize>,
        /// What is wrong, in words.
        message: String,
    },

    /// A CPU kernel refused its arguments.
    #[error(transparent)]
    Kernel(#[from] ff_kernels::Error),

    /// Any other tensor operation failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of ff-backbone.
pub type Result<T> = std::result::Result<T, Error>;
