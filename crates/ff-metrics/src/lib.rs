#![doc = include_str!("../README.md")]
//!
//! ff-metrics: the anomaly-detection metrics of the MVTec AD benchmark, exact
//! and fast enough to run at every evaluation.
//!
//! - [`roc_auc`]: area under the ROC curve, identical to scikit-learn's
//!   `roc_auc_score` (one curve point per distinct score, exact trapezoid), for
//!   image scores and for pixels.
//! - [`f1_max`]: the best F1 over all thresholds and its threshold, i.e.
//!   anomalib's adaptive threshold over scikit-learn's `precision_recall_curve`.
//! - [`au_pro`]: area under the per-region-overlap curve up to a false-positive
//!   rate (0.3 on MVTec AD), divided by that rate, exactly as the MVTec AD
//!   evaluation code defines it: 8-connected ground-truth regions, each region
//!   weighing the same whatever its size, the exact curve at every distinct score,
//!   interpolated at the limit.
//! - [`Evaluator`]: collects anomaly maps, masks and labels batch by batch and
//!   computes every metric at the end as an [`EvalReport`].
//!
//! # Conventions
//! Higher scores mean more anomalous; `true` labels and mask pixels mean
//! anomalous (the positive class). A sample is flagged at threshold `t` when
//! `score >= t`. Tied scores always form a single curve point, and `-0.0`
//! ties with `0.0`. Maps and masks are row-major `[n, height, width]` slices.
//!
//! # How it is computed
//! Each metric sorts all samples once (in parallel, with rayon) by descending
//! score, packed with what the sweep needs (label, or the size of the pixel's
//! ground-truth region) into one `u64`, then sweeps the sorted list once,
//! closing a curve point at each distinct score. Counts stay integers, so the
//! AUROC is one division away from exact and F1 ties are broken exactly (the
//! lowest threshold wins, like `argmax` over scikit-learn's curve). Pixel
//! AUROC, pixel F1-max and AU-PRO share one sort.
//!
//! # Errors
//! Inputs the metrics are undefined for (no samples, one class only, NaN or
//! infinite scores, lengths that do not match the shape) give a
//! [`Error`], never a number and never a panic.
//!
//! # Invariants
//! No candle dependency: inputs are plain `f32` and `bool` slices. Parity with
//! scikit-learn and the MVTec AD definition is tested against fixtures written
//! by `data-scripts/make_metrics_fixtures.py` (`tests-fixtures/metrics/`).

#![warn(missing_docs)]

mod curve;
mod error;
mod evaluator;
mod pixel;
mod regions;
mod sort;

pub use curve::{f1_max, roc_auc, F1Max};
pub use error::Error;
pub use evaluator::{EvalReport, Evaluator, AU_PRO_FPR_LIMIT};
pub use pixel::au_pro;
pub use regions::region_sizes;
