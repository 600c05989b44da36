//! The one error type of the kernel crate: a shape that does not fit.

/// A kernel's inputs do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer or a geometry has the wrong size.
    #[error("{what}: expected {expected}, found {found}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// What the other arguments imply.
        expected: String,
        /// What was passed.
        found: String,
    },
    /// A CUDA driver call failed (module loading or a kernel launch).
    #[cfg(feature = "cuda")]
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn shape_error(
    what: &'static str,
    expected: impl ToString,
    found: impl ToString,
) -> Error {
    Error::Shape {
        what,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}
