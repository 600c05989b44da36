//! Ranking curves over scored samples: exact ROC AUC (scikit-learn `roc_auc_score`) and F1-max
//! with its threshold (scikit-learn `precision_recall_curve`, anomalib's adaptive threshold).
//!
//! Every metric here sorts the samples once by descending score and sweeps the
//! sorted list, closing one curve point per distinct score. Samples are packed
//! into one `u64` each (an order-preserving key of the score in the high 32
//! bits, per-sample data in the low 32 bits) so the sort is a parallel radix
//! sort of integers (`sort.rs`) and the sweep reads memory sequentially.

use crate::Error;

/// Maps a finite `f32` to a `u32` whose descending integer order is the
/// descending order of the scores, with `-0.0` and `0.0` made equal.
///
/// Equal scores get equal keys and unequal scores unequal keys, so grouping
/// equal keys groups ties exactly as `np.diff(y_score) != 0` does in
/// scikit-learn and in the MVTec AD evaluation code (where `-0.0 == 0.0`).
pub(crate) fn descending_key(score: f32) -> u32 {
    // Adding 0.0 turns -0.0 into +0.0 and leaves every other value unchanged.
    let bits = (score + 0.0).to_bits();
    let ascending = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    !ascending
}

/// Inverts [`descending_key`] (returns `+0.0` for a zero score).
pub(crate) fn score_of_key(key: u32) -> f32 {
    let ascending = !key;
    let bits = if ascending & 0x8000_0000 != 0 {
        ascending & 0x7fff_ffff
    } else {
        !ascending
    };
    f32::from_bits(bits)
}

/// Calls `on_group(score_key, group)` for every run of equal score keys in
/// `sorted`, in order. `sorted` must be sorted ascending (scores descending).
pub(crate) fn for_each_tie_group(sorted: &[u64], mut on_group: impl FnMut(u32, &[u64])) {
    let mut start = 0;
    while start < sorted.len() {
        let key = sorted[start] >> 32;
        let mut end = start + 1;
        while end < sorted.len() && sorted[end] >> 32 == key {
            end += 1;
        }
        on_group(key as u32, &sorted[start..end]);
        start = end;
    }
}

/// Fails with [`Error::NonFiniteScore`] at the first NaN or infinite score.
pub(crate) fn check_finite(metric: &'static str, scores: &[f32]) -> Result<(), Error> {
    // A branch-free scan over chunks vectorises; the exact position is only
    // looked up once a chunk is known to hold a bad score.
    let bad_chunk = scores
        .chunks(4096)
        .position(|chunk| !chunk.iter().fold(true, |ok, s| ok & s.is_finite()));
    let Some(chunk) = bad_chunk else {
        return Ok(());
    };
    let start = chunk * 4096;
    let offset = scores[start..]
        .iter()
        .position(|s| !s.is_finite())
        .unwrap_or(0);
    let index = start + offset;
    Err(Error::NonFiniteScore {
        metric,
        index,
        value: scores[index],
    })
}

/// The F1-max of a score ranking and the threshold that reaches it.
///
/// A sample counts as anomalous when `score >= threshold`, as in
/// scikit-learn's `precision_recall_curve` and anomalib's adaptive threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct F1Max {
    /// The largest F1 score over all thresholds, in [0, 1].
    pub f1: f64,
    /// The lowest score threshold that achieves [`F1Max::f1`].
    pub threshold: f32,
}

/// Sweeps the curve points of a ranking and accumulates the exact ROC area
/// and the F1-max at the same time.
///
/// Counts stay integers, so the ROC area is the exact trapezoid sum up to one
/// final division, and F1 comparisons are exact (cross-multiplied), which
/// makes the choice among tied F1 values deterministic.
#[derive(Debug)]
pub(crate) struct RocF1Sweep {
    /// Number of anomalous samples in the whole ranking.
    positives: u64,
    /// Number of normal samples in the whole ranking.
    negatives: u64,
    /// True positives so far (anomalous samples with score >= current threshold).
    tp: u64,
    /// False positives so far.
    fp: u64,
    /// Twice the trapezoid area in units of one positive times one negative:
    /// the sum of `(fp_i - fp_{i-1}) * (tp_i + tp_{i-1})`.
    twice_area: u128,
    /// The best point so far as (tp, fp, score key).
    best: Option<(u64, u64, u32)>,
}

impl RocF1Sweep {
    /// Starts a sweep over a ranking with the given class counts.
    pub(crate) fn new(positives: u64, negatives: u64) -> Self {
        Self {
            positives,
            negatives,
            tp: 0,
            fp: 0,
            twice_area: 0,
            best: None,
        }
    }

    /// Closes the curve point of one distinct score that added `new_tp`
    /// anomalous and `new_fp` normal samples. Points must come by descending score.
    pub(crate) fn add_point(&mut self, score_key: u32, new_tp: u64, new_fp: u64) {
        let tp = self.tp + new_tp;
        let fp = self.fp + new_fp;
        self.twice_area += u128::from(new_fp) * u128::from(self.tp + tp);
        self.tp = tp;
        self.fp = fp;
        // F1 = 2 tp / (tp + fp + P). Comparing a / b >= c / d as a d >= c b is
        // exact. `>=` keeps the later point on ties: scikit-learn returns the
        // curve by increasing threshold and `argmax` takes the first maximum,
        // i.e. the lowest threshold among equal F1 values.
        let better = match self.best {
            None => true,
            Some((best_tp, best_fp, _)) => {
                let lhs = u128::from(tp) * u128::from(best_tp + best_fp + self.positives);
                let rhs = u128::from(best_tp) * u128::from(tp + fp + self.positives);
                lhs >= rhs
            }
        };
        if better {
            self.best = Some((tp, fp, score_key));
        }
    }

    /// The ROC AUC: the trapezoid area under (FPR, TPR) from (0, 0) to (1, 1).
    pub(crate) fn auroc(&self) -> f64 {
        // One division of exact integers: the only rounding is the final one
        // (and the u128 -> f64 conversion for astronomically large inputs).
        self.twice_area as f64 / (2.0 * self.positives as f64 * self.negatives as f64)
    }

    /// The F1-max and its threshold.
    ///
    /// # Errors
    /// [`Error::OneClass`] when the ranking had no anomalous sample,
    /// so recall (and F1) is undefined at every threshold.
    pub(crate) fn f1_max(&self, metric: &'static str) -> Result<F1Max, Error> {
        match self.best {
            Some((tp, fp, key)) if self.positives > 0 => Ok(F1Max {
                f1: 2.0 * tp as f64 / (tp + fp + self.positives) as f64,
                threshold: score_of_key(key),
            }),
            _ => Err(Error::OneClass {
                metric,
                present: "normal",
            }),
        }
    }
}

/// Validates scores and labels and sorts them into packed keys
/// (score key << 32 | label), returning the keys and the class counts.
fn sorted_labelled_keys(
    metric: &'static str,
    scores: &[f32],
    labels: &[bool],
) -> Result<(Vec<u64>, u64, u64), Error> {
    if scores.len() != labels.len() {
        return Err(Error::LengthMismatch {
            metric,
            what: "labels",
            expected: scores.len(),
            found: labels.len(),
        });
    }
    if scores.is_empty() {
        return Err(Error::Empty { metric });
    }
    check_finite(metric, scores)?;
    let positives = labels.iter().filter(|&&l| l).count() as u64;
    let negatives = labels.len() as u64 - positives;
    let mut keys: Vec<u64> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &l)| (u64::from(descending_key(s)) << 32) | u64::from(l))
        .collect();
    crate::sort::sort_by_score_key(&mut keys);
    Ok((keys, positives, negatives))
}

/// Sweeps sorted labelled keys (see [`sorted_labelled_keys`]).
fn sweep_labelled(keys: &[u64], positives: u64, negatives: u64) -> RocF1Sweep {
    let mut sweep = RocF1Sweep::new(positives, negatives);
    for_each_tie_group(keys, |key, group| {
        let tp = group.iter().filter(|&&k| k & 1 == 1).count() as u64;
        sweep.add_point(key, tp, group.len() as u64 - tp);
    });
    sweep
}

/// Area under the ROC curve, identical to scikit-learn's `roc_auc_score`.
///
/// `labels[i]` is `true` for an anomalous (positive) sample. The curve has one
/// point per distinct score (tied scores are grouped, as in scikit-learn) and
/// the area is the exact trapezoid sum, so a tie between a positive and a
/// negative counts one half.
///
/// # Errors
/// [`Error::LengthMismatch`] when the lengths differ,
/// [`Error::Empty`] for no samples, [`Error::NonFiniteScore`]
/// for a NaN or infinite score, [`Error::OneClass`] when all labels are equal.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Result<f64, Error> {
    const METRIC: &str = "roc_auc";
    let (keys, positives, negatives) = sorted_labelled_keys(METRIC, scores, labels)?;
    one_class_check(METRIC, positives, negatives)?;
    Ok(sweep_labelled(&keys, positives, negatives).auroc())
}

/// The largest F1 score over all thresholds and the threshold that gives it.
///
/// This is anomalib's adaptive threshold: scikit-learn's
/// `precision_recall_curve` (one point per distinct score, a sample is
/// positive when `score >= threshold`), F1 = 2PR / (P + R) at each point, and
/// the threshold of the maximum. Among equal F1 values the lowest threshold
/// wins, as `argmax` over scikit-learn's increasing thresholds does.
///
/// Only normal samples is an error (recall is undefined); only anomalous
/// samples is fine (F1 = 1 at the lowest score).
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::Empty`],
/// [`Error::NonFiniteScore`], and [`Error::OneClass`] when no
/// label is `true`.
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Result<F1Max, Error> {
    const METRIC: &str = "f1_max";
    let (keys, positives, negatives) = sorted_labelled_keys(METRIC, scores, labels)?;
    sweep_labelled(&keys, positives, negatives).f1_max(METRIC)
}

/// Fails with [`Error::OneClass`] unless both classes are present.
pub(crate) fn one_class_check(
    metric: &'static str,
    positives: u64,
    negatives: u64,
) -> Result<(), Error> {
    match (positives, negatives) {
        (0, _) => Err(Error::OneClass {
            metric,
            present: "normal",
        }),
        (_, 0) => Err(Error::OneClass {
            metric,
            present: "anomalous",
        }),
        _ => Ok(()),
    }
}

/// Both image-level metrics from one sort: (AUROC, F1-max).
pub(crate) fn roc_auc_and_f1_max(
    metric: &'static str,
    scores: &[f32],
    labels: &[bool],
) -> Result<(f64, F1Max), Error> {
    let (keys, positives, negatives) = sorted_labelled_keys(metric, scores, labels)?;
    one_class_check(metric, positives, negatives)?;
    let sweep = sweep_labelled(&keys, positives, negatives);
    Ok((sweep.auroc(), sweep.f1_max(metric)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_scores_descending_and_round_trip() {
        let scores = [
            f32::MAX,
            3.5,
            1.0,
            f32::MIN_POSITIVE,
            0.0,
            -f32::MIN_POSITIVE,
            -1.0,
            -3.5,
            f32::MIN,
        ];
        for pair in scores.windows(2) {
            assert!(
                descending_key(pair[0]) < descending_key(pair[1]),
                "{pair:?}"
            );
        }
        for &s in &scores {
            assert_eq!(score_of_key(descending_key(s)), s);
        }
        assert_eq!(descending_key(-0.0), descending_key(0.0));
    }

    #[test]
    fn perfect_separation_gives_one_and_the_lowest_positive_threshold() {
        let scores = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9];
        let labels = [false, false, false, true, true, true];
        assert_eq!(roc_auc(&scores, &labels).unwrap(), 1.0);
        let f1 = f1_max(&scores, &labels).unwrap();
        assert_eq!(f1.f1, 1.0);
        assert_eq!(f1.threshold, 0.7);
        // Reversed ranking: every positive scores below every negative.
        let reversed: Vec<bool> = labels.iter().map(|l| !l).collect();
        assert_eq!(roc_auc(&scores, &reversed).unwrap(), 0.0);
    }

    #[test]
    fn chance_gives_one_half() {
        // All scores tied: the curve is the diagonal.
        let labels = [true, false, false, true, false, true, false];
        assert_eq!(roc_auc(&[0.5; 7], &labels).unwrap(), 0.5);
        // Alternating labels over distinct scores, arranged symmetrically.
        let scores = [4.0, 3.0, 2.0, 1.0];
        assert_eq!(roc_auc(&scores, &[true, false, false, true]).unwrap(), 0.5);
        // With all scores tied, F1 is that of flagging everything: 2P / (N + 2P).
        let f1 = f1_max(&[0.5; 7], &labels).unwrap();
        assert!((f1.f1 - 6.0 / 10.0).abs() < 1e-15);
        assert_eq!(f1.threshold, 0.5);
    }

    #[test]
    fn ties_between_classes_count_one_half() {
        // Pairs (pos, neg): (0.9 vs 0.5) wins, (0.9 vs 0.9) ties, (0.5 vs 0.5) ties,
        // (0.5 vs 0.9) loses -> (1 + 0.5 + 0.5 + 0) / 4.
        let scores = [0.9, 0.5, 0.9, 0.5];
        let labels = [true, true, false, false];
        assert_eq!(roc_auc(&scores, &labels).unwrap(), 0.5);
        let scores = [0.9, 0.5, 0.5, 0.1];
        let labels = [true, true, false, false];
        // (0.9: beats 0.5, 0.1) (0.5: ties 0.5, beats 0.1) -> 3.5 / 4.
        assert_eq!(roc_auc(&scores, &labels).unwrap(), 0.875);
        // Signed zeros are the same score.
        assert_eq!(roc_auc(&[0.0, -0.0], &[true, false]).unwrap(), 0.5);
    }

    #[test]
    fn f1_ties_take_the_lowest_threshold() {
        // Threshold 0.9: tp 1, fp 0 -> F1 = 2/3. Threshold 0.5: tp 2, fp 2 ->
        // F1 = 4/6 = 2/3 as well; the lower threshold wins.
        let scores = [0.9, 0.5, 0.5, 0.5, 0.1];
        let labels = [true, true, false, false, false];
        let f1 = f1_max(&scores, &labels).unwrap();
        assert!((f1.f1 - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(f1.threshold, 0.5);
    }

    #[test]
    fn one_class_only_is_an_error() {
        let err = roc_auc(&[0.1, 0.2], &[true, true]).unwrap_err();
        assert_eq!(
            err,
            Error::OneClass {
                metric: "roc_auc",
                present: "anomalous"
            }
        );
        let err = roc_auc(&[0.1, 0.2], &[false, false]).unwrap_err();
        assert!(matches!(
            err,
            Error::OneClass {
                present: "normal",
                ..
            }
        ));
        assert!(matches!(
            f1_max(&[0.1, 0.2], &[false, false]),
            Err(Error::OneClass { .. })
        ));
        // Only anomalous samples: flagging everything is perfect.
        let f1 = f1_max(&[0.1, 0.2], &[true, true]).unwrap();
        assert_eq!((f1.f1, f1.threshold), (1.0, 0.1));
    }

    #[test]
    fn nan_empty_and_mismatched_inputs_are_errors() {
        let err = roc_auc(&[0.1, f32::NAN, 0.3], &[true, false, true]).unwrap_err();
        assert!(
            matches!(err, Error::NonFiniteScore { index: 1, .. }),
            "{err}"
        );
        let err = f1_max(&[f32::INFINITY], &[true]).unwrap_err();
        assert!(
            matches!(err, Error::NonFiniteScore { index: 0, .. }),
            "{err}"
        );
        assert_eq!(
            roc_auc(&[], &[]).unwrap_err(),
            Error::Empty { metric: "roc_auc" }
        );
        assert_eq!(
            roc_auc(&[0.1, 0.2], &[true]).unwrap_err(),
            Error::LengthMismatch {
                metric: "roc_auc",
                what: "labels",
                expected: 2,
                found: 1
            }
        );
    }
}
