//! The accumulating evaluator: anomaly maps, masks and labels arrive batch by
//! batch during an evaluation; all metrics are computed once at the end.

use rayon::prelude::*;

use crate::curve::{check_finite, roc_auc_and_f1_max};
use crate::pixel::{checked_pixels, pixel_metrics, ImageRun};
use crate::Error;

/// The MVTec AD integration limit of AU-PRO: false-positive rates up to 30 %.
pub const AU_PRO_FPR_LIMIT: f64 = 0.3;

/// Everything one evaluation reports.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// AUROC of the image scores (max of each anomaly map) against the image
    /// labels; `None` when every image has the same label (a test set of
    /// good parts only), for which AUROC is undefined.
    pub image_auroc: Option<f64>,
    /// AUROC over all pixels of all images; `None` without masks or without
    /// any anomalous pixel.
    pub pixel_auroc: Option<f64>,
    /// AU-PRO up to FPR [`AU_PRO_FPR_LIMIT`], divided by it; `None` like `pixel_auroc`.
    pub aupro: Option<f64>,
    /// F1-max over the image scores; `None` like `image_auroc`.
    pub image_f1_max: Option<f64>,
    /// The image-score threshold of `image_f1_max` (anomalib's adaptive
    /// threshold): an image is anomalous when its score is `>= threshold`;
    /// `None` like `image_auroc`.
    pub threshold: Option<f32>,
    /// F1-max over all pixels; `None` like `pixel_auroc`.
    pub pixel_f1_max: Option<f64>,
    /// The pixel threshold of `pixel_f1_max`; `None` like `pixel_auroc`.
    pub pixel_threshold: Option<f32>,
    /// Number of images evaluated.
    pub n_images: usize,
    /// How many of them are labelled anomalous.
    pub n_anomalous: usize,
}

/// Collects one evaluation's scores batch by batch and computes an
/// [`EvalReport`] at the end.
///
/// It keeps exactly the buffers the metrics need: one score and one label per
/// image, and, when masks are given, the anomaly maps and masks themselves
/// (4 + 1 bytes per pixel). Every metric is exact over all accumulated data,
/// so any split into batches gives the same report as one batch.
///
/// ```
/// use ff_metrics::Evaluator;
/// let mut evaluator = Evaluator::new();
/// // Two 1x2 images: a normal one and one with its right pixel anomalous.
/// let maps = [0.1, 0.2, 0.1, 0.9];
/// let masks = [false, false, false, true];
/// evaluator.update(&maps, &masks, &[false, true], 2, 1, 2)?;
/// let report = evaluator.compute()?;
/// assert_eq!(report.image_auroc, Some(1.0));
/// assert_eq!(report.pixel_auroc, Some(1.0));
/// assert_eq!(report.n_images, 2);
/// # Ok::<(), ff_metrics::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Evaluator {
    image_scores: Vec<f32>,
    image_labels: Vec<bool>,
    /// Anomaly maps of all images, kept only when masks are given.
    maps: Vec<f32>,
    /// Ground-truth masks matching `maps`.
    masks: Vec<bool>,
    /// The shapes of the images in `maps`, in order.
    runs: Vec<ImageRun>,
    /// Whether the batches so far carried masks (`None` before the first one).
    has_masks: Option<bool>,
    /// Number of update calls so far, for error messages.
    batches: usize,
}

impl Evaluator {
    /// An evaluator with no data yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of images accumulated so far.
    pub fn n_images(&self) -> usize {
        self.image_scores.len()
    }

    /// Adds a batch of anomaly maps with their masks and image labels.
    ///
    /// The image score of each image is the maximum of its map (anomalib's
    /// choice). `masks` may be empty when the dataset has no pixel ground
    /// truth; then the maps are not kept and the report has no pixel metrics.
    /// Either every batch has masks or none has.
    ///
    /// # Shapes
    /// `anomaly_maps`: `[n, height, width]` row-major, higher = more anomalous;
    /// `masks`: `[n, height, width]` (`true` = anomalous pixel) or empty;
    /// `image_labels`: `[n]` (`true` = anomalous image).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for a buffer of the wrong length,
    /// [`Error::EmptyImage`], [`Error::TooLarge`],
    /// [`Error::NonFiniteScore`] (index within this batch's maps),
    /// [`Error::MixedMasks`]. A failed update adds nothing.
    pub fn update(
        &mut self,
        anomaly_maps: &[f32],
        masks: &[bool],
        image_labels: &[bool],
        n: usize,
        height: usize,
        width: usize,
    ) -> Result<(), Error> {
        const METRIC: &str = "evaluator";
        let (pixels, total) = checked_pixels(METRIC, n, height, width)?;
        let lengths = [
            ("anomaly_maps", anomaly_maps.len(), total),
            ("image_labels", image_labels.len(), n),
        ];
        for (what, found, expected) in lengths {
            if found != expected {
                return Err(Error::LengthMismatch {
                    metric: METRIC,
                    what,
                    expected,
                    found,
                });
            }
        }
        if total == 0 {
            // An empty batch (n = 0) carries nothing, not even the choice of
            // having masks or not.
            return Ok(());
        }
        let batch_has_masks = !masks.is_empty();
        if batch_has_masks && masks.len() != total {
            return Err(Error::LengthMismatch {
                metric: METRIC,
                what: "masks",
                expected: total,
                found: masks.len(),
            });
        }
        self.check_mask_consistency(batch_has_masks)?;
        check_finite(METRIC, anomaly_maps)?;

        self.image_scores.par_extend(
            anomaly_maps
                .par_chunks(pixels)
                .map(|map| map.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
        );
        self.image_labels.extend_from_slice(image_labels);
        if batch_has_masks {
            self.maps.extend_from_slice(anomaly_maps);
            self.masks.extend_from_slice(masks);
            match self.runs.last_mut() {
                Some(run) if (run.height, run.width) == (height, width) => run.n += n,
                _ => self.runs.push(ImageRun { n, height, width }),
            }
        }
        self.has_masks = Some(batch_has_masks);
        self.batches += 1;
        Ok(())
    }

    /// Adds image scores and labels without maps, for image-level evaluation only.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`], [`Error::NonFiniteScore`], and
    /// [`Error::MixedMasks`] after batches with masks.
    pub fn update_image_scores(&mut self, scores: &[f32], labels: &[bool]) -> Result<(), Error> {
        const METRIC: &str = "evaluator";
        if scores.len() != labels.len() {
            return Err(Error::LengthMismatch {
                metric: METRIC,
                what: "labels",
                expected: scores.len(),
                found: labels.len(),
            });
        }
        self.check_mask_consistency(false)?;
        check_finite(METRIC, scores)?;
        self.image_scores.extend_from_slice(scores);
        self.image_labels.extend_from_slice(labels);
        self.has_masks = Some(false);
        self.batches += 1;
        Ok(())
    }

    fn check_mask_consistency(&self, batch_has_masks: bool) -> Result<(), Error> {
        match self.has_masks {
            Some(had) if had != batch_has_masks => Err(Error::MixedMasks {
                batch: self.batches,
                has_masks: batch_has_masks,
            }),
            _ => Ok(()),
        }
    }

    /// Computes every metric over all batches so far.
    ///
    /// Image metrics are `None` when all images have the same label; pixel
    /// metrics are `None` when no masks were given or no pixel is anomalous.
    ///
    /// # Errors
    /// [`Error::Empty`] before any image, [`Error::OneClass`]
    /// when masks mark every pixel anomalous.
    pub fn compute(&self) -> Result<EvalReport, Error> {
        const IMAGE: &str = "image metrics";
        if self.image_scores.is_empty() {
            return Err(Error::Empty { metric: IMAGE });
        }
        let n_anomalous = self.image_labels.iter().filter(|&&l| l).count();
        let image = if n_anomalous == 0 || n_anomalous == self.image_labels.len() {
            None
        } else {
            Some(roc_auc_and_f1_max(
                IMAGE,
                &self.image_scores,
                &self.image_labels,
            )?)
        };
        let any_anomalous_pixel = self.masks.par_iter().any(|&m| m);
        let pixel = if any_anomalous_pixel {
            Some(pixel_metrics(
                "pixel metrics",
                &self.maps,
                &self.masks,
                &self.runs,
                AU_PRO_FPR_LIMIT,
            )?)
        } else {
            None
        };
        Ok(EvalReport {
            image_auroc: image.map(|(auroc, _)| auroc),
            pixel_auroc: pixel.map(|p| p.auroc),
            aupro: pixel.map(|p| p.aupro),
            image_f1_max: image.map(|(_, f1)| f1.f1),
            threshold: image.map(|(_, f1)| f1.threshold),
            pixel_f1_max: pixel.map(|p| p.f1.f1),
            pixel_threshold: pixel.map(|p| p.f1.threshold),
            n_images: self.image_scores.len(),
            n_anomalous,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Random maps with rectangular defects on every other image.
    fn synthetic(
        n: usize,
        height: usize,
        width: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<bool>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut maps = Vec::new();
        let mut masks = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let defect = i % 2 == 1;
            let (y0, x0) = (
                rng.random_range(0..height / 2),
                rng.random_range(0..width / 2),
            );
            let (dy, dx) = (
                rng.random_range(1..=height / 2),
                rng.random_range(1..=width / 2),
            );
            for y in 0..height {
                for x in 0..width {
                    let inside = defect && (y0..y0 + dy).contains(&y) && (x0..x0 + dx).contains(&x);
                    masks.push(inside);
                    // Coarse quantisation makes many ties, across classes too.
                    let noise: f32 = rng.random_range(0..16) as f32 / 16.0;
                    maps.push(noise + if inside { 0.5 } else { 0.0 });
                }
            }
            labels.push(defect);
        }
        (maps, masks, labels)
    }

    #[test]
    fn accumulation_across_batches_equals_one_shot() {
        let (n, h, w) = (9, 12, 10);
        let (maps, masks, labels) = synthetic(n, h, w, 7);
        let mut one_shot = Evaluator::new();
        one_shot.update(&maps, &masks, &labels, n, h, w).unwrap();
        let expected = one_shot.compute().unwrap();
        assert!(expected.pixel_auroc.is_some() && expected.aupro.is_some());

        let pixels = h * w;
        let mut batched = Evaluator::new();
        let mut start = 0;
        for size in [1, 3, 0, 2, 3] {
            let end = start + size;
            batched
                .update(
                    &maps[start * pixels..end * pixels],
                    &masks[start * pixels..end * pixels],
                    &labels[start..end],
                    size,
                    h,
                    w,
                )
                .unwrap();
            start = end;
        }
        assert_eq!(start, n);
        assert_eq!(batched.compute().unwrap(), expected);
        assert_eq!(batched.n_images(), n);
    }

    #[test]
    fn report_matches_the_standalone_functions() {
        let (n, h, w) = (6, 8, 9);
        let (maps, masks, labels) = synthetic(n, h, w, 11);
        let mut evaluator = Evaluator::new();
        evaluator.update(&maps, &masks, &labels, n, h, w).unwrap();
        let report = evaluator.compute().unwrap();
        let image_scores: Vec<f32> = maps
            .chunks(h * w)
            .map(|m| m.iter().copied().fold(f32::MIN, f32::max))
            .collect();
        assert_eq!(
            report.image_auroc,
            Some(crate::roc_auc(&image_scores, &labels).unwrap())
        );
        let f1 = crate::f1_max(&image_scores, &labels).unwrap();
        assert_eq!(
            (report.image_f1_max, report.threshold),
            (Some(f1.f1), Some(f1.threshold))
        );
        assert_eq!(report.n_anomalous, labels.iter().filter(|&&l| l).count());
        assert_eq!(
            report.pixel_auroc,
            Some(crate::roc_auc(&maps, &masks).unwrap())
        );
        let pixel_f1 = crate::f1_max(&maps, &masks).unwrap();
        assert_eq!(report.pixel_f1_max, Some(pixel_f1.f1));
        assert_eq!(report.pixel_threshold, Some(pixel_f1.threshold));
        assert_eq!(
            report.aupro,
            Some(crate::au_pro(&maps, &masks, n, h, w, AU_PRO_FPR_LIMIT).unwrap())
        );
    }

    #[test]
    fn images_of_different_sizes_accumulate() {
        let (maps_a, masks_a, labels_a) = synthetic(3, 8, 8, 1);
        let (maps_b, masks_b, labels_b) = synthetic(4, 5, 7, 2);
        let mut evaluator = Evaluator::new();
        evaluator
            .update(&maps_a, &masks_a, &labels_a, 3, 8, 8)
            .unwrap();
        evaluator
            .update(&maps_b, &masks_b, &labels_b, 4, 5, 7)
            .unwrap();
        let report = evaluator.compute().unwrap();
        let maps: Vec<f32> = maps_a.iter().chain(&maps_b).copied().collect();
        let masks: Vec<bool> = masks_a.iter().chain(&masks_b).copied().collect();
        assert_eq!(
            report.pixel_auroc,
            Some(crate::roc_auc(&maps, &masks).unwrap())
        );
        assert_eq!(report.n_images, 7);
    }

    #[test]
    fn pixel_metrics_are_absent_without_masks_or_defects() {
        let (n, h, w) = (4, 3, 3);
        let (maps, _, labels) = synthetic(n, h, w, 3);
        let mut no_masks = Evaluator::new();
        no_masks.update(&maps, &[], &labels, n, h, w).unwrap();
        no_masks
            .update_image_scores(&[0.3, 0.9], &[false, true])
            .unwrap();
        let report = no_masks.compute().unwrap();
        assert_eq!(
            (report.pixel_auroc, report.aupro, report.pixel_f1_max),
            (None, None, None)
        );
        assert_eq!(report.n_images, 6);

        let mut empty_masks = Evaluator::new();
        empty_masks
            .update(&maps, &vec![false; n * h * w], &labels, n, h, w)
            .unwrap();
        let report = empty_masks.compute().unwrap();
        assert_eq!((report.pixel_auroc, report.aupro), (None, None));
        assert_eq!(
            report.image_auroc,
            Some(no_masks_image_auroc(&maps, &labels, h * w))
        );
    }

    fn no_masks_image_auroc(maps: &[f32], labels: &[bool], pixels: usize) -> f64 {
        let scores: Vec<f32> = maps
            .chunks(pixels)
            .map(|m| m.iter().copied().fold(f32::MIN, f32::max))
            .collect();
        crate::roc_auc(&scores, labels).unwrap()
    }

    #[test]
    fn bad_batches_are_errors_and_add_nothing() {
        let mut evaluator = Evaluator::new();
        assert!(matches!(evaluator.compute(), Err(Error::Empty { .. })));
        let maps = [0.1, 0.2, 0.3, 0.4];
        let masks = [false, false, true, false];
        assert!(matches!(
            evaluator.update(&maps, &masks, &[false], 2, 1, 2),
            Err(Error::LengthMismatch {
                what: "image_labels",
                expected: 2,
                found: 1,
                ..
            })
        ));
        assert!(matches!(
            evaluator.update(&maps, &masks[..3], &[false, true], 2, 1, 2),
            Err(Error::LengthMismatch { what: "masks", .. })
        ));
        assert!(matches!(
            evaluator.update(&maps, &masks, &[false, true], 2, 2, 2),
            Err(Error::LengthMismatch {
                what: "anomaly_maps",
                ..
            })
        ));
        assert!(matches!(
            evaluator.update(&[0.1, f32::NAN, 0.3, 0.4], &masks, &[false, true], 2, 1, 2),
            Err(Error::NonFiniteScore { index: 1, .. })
        ));
        assert_eq!(evaluator.n_images(), 0);
        evaluator
            .update(&maps, &masks, &[false, true], 2, 1, 2)
            .unwrap();
        assert_eq!(
            evaluator.update(&maps, &[], &[false, true], 2, 1, 2),
            Err(Error::MixedMasks {
                batch: 1,
                has_masks: false
            })
        );
        assert!(matches!(
            evaluator.update_image_scores(&[0.5], &[true]),
            Err(Error::MixedMasks { .. })
        ));
        assert_eq!(evaluator.n_images(), 2);
    }

    /// A test set of one class (good parts only, or defects only): the image
    /// metrics are undefined and say so with `None`, never NaN; pixel metrics
    /// still come from the masks when both kinds of pixel exist.
    #[test]
    fn one_class_test_sets_leave_image_metrics_undefined() {
        for label in [false, true] {
            let mut one_class = Evaluator::new();
            one_class
                .update_image_scores(&[0.1, 0.2], &[label, label])
                .unwrap();
            let report = one_class.compute().unwrap();
            assert_eq!(
                (report.image_auroc, report.image_f1_max, report.threshold),
                (None, None, None)
            );
            assert_eq!(report.n_images, 2);
            assert_eq!(report.n_anomalous, if label { 2 } else { 0 });
        }
        // Defects only, with masks that mark some pixels.
        let maps = [0.1, 0.9, 0.2, 0.8];
        let masks = [false, true, false, true];
        let mut defects = Evaluator::new();
        defects
            .update(&maps, &masks, &[true, true], 2, 1, 2)
            .unwrap();
        let report = defects.compute().unwrap();
        assert_eq!(report.image_auroc, None);
        assert_eq!(report.pixel_auroc, Some(1.0));
    }
}
