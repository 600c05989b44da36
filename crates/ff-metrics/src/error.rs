//! The one error type of ff-metrics: every way the inputs of a metric can be unusable.

/// Why a metric could not be computed from the given scores, labels or masks.
///
/// Every variant names the metric (`metric`) that refused the input, so a
/// caller that evaluates several metrics can tell which one failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// No sample at all was given, so no curve exists.
    #[error("{metric}: no samples were given")]
    Empty {
        /// The metric that refused the input.
        metric: &'static str,
    },

    /// Two inputs that must describe the same samples have different lengths,
    /// or a buffer does not hold `n * height * width` values.
    #[error("{metric}: {what} has {found} values, expected {expected}")]
    LengthMismatch {
        /// The metric that refused the input.
        metric: &'static str,
        /// Which input has the wrong length (e.g. `"labels"`, `"masks"`).
        what: &'static str,
        /// The length the other inputs imply.
        expected: usize,
        /// The length that was given.
        found: usize,
    },

    /// A score is NaN or infinite. scikit-learn refuses such scores too; a
    /// NaN would otherwise land at an arbitrary place of the ranking.
    #[error("{metric}: score at index {index} is {value}; scores must be finite")]
    NonFiniteScore {
        /// The metric that refused the input.
        metric: &'static str,
        /// Position of the first offending score in the (flattened) input.
        index: usize,
        /// The offending value.
        value: f32,
    },

    /// Only one class is present, so the curve is undefined (scikit-learn:
    /// "Only one class present in y_true").
    #[error(
        "{metric}: every sample is {present}; the metric needs both normal and anomalous samples"
    )]
    OneClass {
        /// The metric that refused the input.
        metric: &'static str,
        /// The only class that was present: `"normal"` or `"anomalous"`.
        present: &'static str,
    },

    /// The AU-PRO integration limit is not a false-positive rate in (0, 1].
    #[error("au_pro: fpr_limit must lie in (0, 1], got {fpr_limit}")]
    InvalidFprLimit {
        /// The limit that was given.
        fpr_limit: f64,
    },

    /// An image has zero pixels, so it has no maximum score and no regions.
    #[error("{metric}: images of {height}x{width} pixels have no pixels")]
    EmptyImage {
        /// The metric that refused the input.
        metric: &'static str,
        /// Image height that was given.
        height: usize,
        /// Image width that was given.
        width: usize,
    },

    /// `n * height * width` does not fit in `usize`, or a region or image is
    /// too large for the 32-bit counters of the pixel sweep.
    #[error("{metric}: {n} images of {height}x{width} pixels are too many to address")]
    TooLarge {
        /// The metric that refused the input.
        metric: &'static str,
        /// Number of images that was given.
        n: usize,
        /// Image height that was given.
        height: usize,
        /// Image width that was given.
        width: usize,
    },

    /// An [`Evaluator`](crate::Evaluator) got masks for some images and none
    /// for others; pixel metrics must cover every image or none.
    #[error(
        "evaluator: batch {batch} {} masks but earlier batches {}; give masks for every image or for none",
        if *has_masks { "has" } else { "has no" },
        if *has_masks { "had none" } else { "had them" }
    )]
    MixedMasks {
        /// Zero-based index of the offending `update` call.
        batch: usize,
        /// Whether the offending batch carried masks.
        has_masks: bool,
    },
}
