//! Pixel-level metrics from one sort of all pixels: pixel AUROC, pixel F1-max
//! and AU-PRO (the MVTec AD per-region-overlap curve, integrated up to a
//! false-positive-rate limit).
//!
//! Every pixel becomes one `u64`: the descending score key in the high 32
//! bits and, in the low 32 bits, the size of the ground-truth region it
//! belongs to (0 for a normal pixel). The size is all the sweep needs: a
//! normal pixel adds one false positive, a pixel of a region of `s` pixels
//! adds `1 / s` to the sum of region overlaps. So the pixels are labelled per
//! image in parallel, sorted once in parallel, and swept once in order, which
//! gives the exact curve at every distinct score without looping over
//! thresholds and images.

use rayon::prelude::*;

use crate::curve::{check_finite, descending_key, for_each_tie_group, one_class_check, RocF1Sweep};
use crate::regions::{label_regions, RegionScratch};
use crate::{Error, F1Max};

/// The three pixel-level metrics of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PixelMetrics {
    /// Pixel AUROC over all pixels of all images.
    pub(crate) auroc: f64,
    /// Pixel F1-max and its threshold.
    pub(crate) f1: F1Max,
    /// AU-PRO up to the requested FPR limit, divided by that limit.
    pub(crate) aupro: f64,
}

/// A run of images of one shape inside the flat map and mask buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageRun {
    /// Number of images in the run.
    pub(crate) n: usize,
    /// Height of each image.
    pub(crate) height: usize,
    /// Width of each image.
    pub(crate) width: usize,
}

/// Checks `n * height * width` against `u32`-sized images and `usize`
/// buffers, returning the pixel count per image and in total.
pub(crate) fn checked_pixels(
    metric: &'static str,
    n: usize,
    height: usize,
    width: usize,
) -> Result<(usize, usize), Error> {
    let too_large = Error::TooLarge {
        metric,
        n,
        height,
        width,
    };
    let per_image = height.checked_mul(width).ok_or(too_large.clone())?;
    // Region sizes travel in 32 bits, so no image may have more pixels.
    if per_image > u32::MAX as usize {
        return Err(too_large);
    }
    if per_image == 0 && n > 0 {
        return Err(Error::EmptyImage {
            metric,
            height,
            width,
        });
    }
    let total = per_image.checked_mul(n).ok_or(too_large)?;
    Ok((per_image, total))
}

/// Packs one image's pixels into sort keys, returning (regions, anomalous pixels).
fn pack_image(
    keys: &mut [u64],
    map: &[f32],
    mask: &[bool],
    height: usize,
    width: usize,
    scratch: &mut RegionScratch,
) -> (u64, u64) {
    if !mask.iter().any(|&m| m) {
        // Images without a defect (most of them) need no labelling.
        for (key, &score) in keys.iter_mut().zip(map) {
            *key = u64::from(descending_key(score)) << 32;
        }
        return (0, 0);
    }
    label_regions(mask, height, width, scratch);
    let sizes = &scratch.sizes;
    let mut anomalous = 0u64;
    for ((key, &score), &label) in keys.iter_mut().zip(map).zip(&scratch.labels) {
        let region_size = if label == 0 {
            0
        } else {
            anomalous += 1;
            sizes[label as usize - 1]
        };
        *key = (u64::from(descending_key(score)) << 32) | u64::from(region_size);
    }
    (sizes.len() as u64, anomalous)
}

/// Accumulates the trapezoid area under the PRO curve up to `fpr_limit`
/// exactly as the MVTec AD evaluation code's `trapezoid(fprs, pros, x_max)`:
/// the curve starts at (0, 0), gets one point per distinct score, ends at
/// (1, 1), overlaps are clipped at 1, and the segment that crosses the limit
/// is cut there with a linearly interpolated overlap.
#[derive(Debug)]
struct ProIntegral {
    fpr_limit: f64,
    normal_pixels: f64,
    regions: f64,
    /// Normal pixels at or above the current threshold.
    false_positives: u64,
    /// Sum over all regions of the fraction of the region at or above the threshold.
    overlap_sum: f64,
    /// The last curve point taken into the area: (FPR, PRO).
    previous: (f64, f64),
    area: f64,
    /// Set once the limit is reached; later points do not change the area.
    done: bool,
}

impl ProIntegral {
    fn new(fpr_limit: f64, normal_pixels: u64, regions: u64) -> Self {
        Self {
            fpr_limit,
            normal_pixels: normal_pixels as f64,
            regions: regions as f64,
            false_positives: 0,
            overlap_sum: 0.0,
            previous: (0.0, 0.0),
            area: 0.0,
            done: false,
        }
    }

    /// Adds the point of one distinct score that added `new_fp` normal pixels
    /// and `overlap_gain` to the sum of region overlaps.
    fn add_point(&mut self, new_fp: u64, overlap_gain: f64) {
        self.false_positives += new_fp;
        self.overlap_sum += overlap_gain;
        if !self.done {
            let fpr = self.false_positives as f64 / self.normal_pixels;
            let pro = (self.overlap_sum / self.regions).min(1.0);
            self.step_to(fpr, pro);
        }
    }

    fn step_to(&mut self, fpr: f64, pro: f64) {
        let (x0, y0) = self.previous;
        if fpr <= self.fpr_limit {
            self.area += 0.5 * (pro + y0) * (fpr - x0);
            self.previous = (fpr, pro);
            self.done = fpr == self.fpr_limit;
        } else {
            // This segment crosses the limit; x0 < limit here because a point
            // exactly at the limit sets `done`.
            let pro_at_limit = y0 + (pro - y0) * (self.fpr_limit - x0) / (fpr - x0);
            self.area += 0.5 * (pro_at_limit + y0) * (self.fpr_limit - x0);
            self.done = true;
        }
    }

    /// Closes the curve at (1, 1) and normalises by the limit.
    fn finish(mut self) -> f64 {
        if !self.done {
            self.step_to(1.0, 1.0);
        }
        self.area / self.fpr_limit
    }
}

/// Pixel AUROC, pixel F1-max and AU-PRO over consecutive runs of images.
///
/// `maps` and `masks` hold the images of `runs` one after another, each
/// row-major `[n, height, width]`. The caller has checked the buffer lengths.
///
/// # Errors
/// [`Error::NonFiniteScore`] for a NaN or infinite score,
/// [`Error::OneClass`] when there is no anomalous or no normal pixel.
pub(crate) fn pixel_metrics(
    metric: &'static str,
    maps: &[f32],
    masks: &[bool],
    runs: &[ImageRun],
    fpr_limit: f64,
) -> Result<PixelMetrics, Error> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(Error::InvalidFprLimit { fpr_limit });
    }
    if maps.is_empty() {
        return Err(Error::Empty { metric });
    }
    check_finite(metric, maps)?;

    let mut keys = vec![0u64; maps.len()];
    let mut regions = 0u64;
    let mut anomalous = 0u64;
    let mut offset = 0;
    for run in runs {
        let pixels = run.height * run.width;
        let end = offset + run.n * pixels;
        if pixels == 0 {
            continue;
        }
        let (run_regions, run_anomalous) = keys[offset..end]
            .par_chunks_mut(pixels)
            .zip(maps[offset..end].par_chunks(pixels))
            .zip(masks[offset..end].par_chunks(pixels))
            .map_init(RegionScratch::default, |scratch, ((keys, map), mask)| {
                pack_image(keys, map, mask, run.height, run.width, scratch)
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        regions += run_regions;
        anomalous += run_anomalous;
        offset = end;
    }
    let normal = maps.len() as u64 - anomalous;
    one_class_check(metric, anomalous, normal)?;

    crate::sort::sort_by_score_key(&mut keys);

    let mut roc = RocF1Sweep::new(anomalous, normal);
    let mut pro = ProIntegral::new(fpr_limit, normal, regions);
    for_each_tie_group(&keys, |score_key, group| {
        let mut new_tp = 0u64;
        let mut overlap_gain = 0.0f64;
        for &key in group {
            let region_size = key as u32;
            if region_size != 0 {
                new_tp += 1;
                overlap_gain += 1.0 / f64::from(region_size);
            }
        }
        let new_fp = group.len() as u64 - new_tp;
        roc.add_point(score_key, new_tp, new_fp);
        pro.add_point(new_fp, overlap_gain);
    });
    Ok(PixelMetrics {
        auroc: roc.auroc(),
        f1: roc.f1_max(metric)?,
        aupro: pro.finish(),
    })
}

/// Area under the per-region-overlap (PRO) curve up to `fpr_limit`, divided
/// by `fpr_limit`: the AU-PRO of the MVTec AD benchmark (`fpr_limit = 0.3`).
///
/// `maps` are anomaly maps (higher = more anomalous) and `masks` their ground
/// truth (`true` = anomalous), both row-major `[n_images, height, width]`.
/// Each mask is split into 8-connected regions. At each distinct score `t`,
/// the PRO is the mean over all regions of all images of the fraction of the
/// region's pixels with score `>= t`, and the FPR is the fraction of all
/// normal pixels of all images with score `>= t`. Tied scores form one curve
/// point. The curve runs from (0, 0) to (1, 1); the segment that crosses
/// `fpr_limit` is cut there with a linearly interpolated PRO. This is the
/// exact curve of the MVTec AD evaluation code (`compute_pro` + `trapezoid`),
/// not a curve sampled at a fixed number of thresholds.
///
/// # Shapes
/// `maps`: `[n_images, height, width]`, `masks`: `[n_images, height, width]`.
///
/// # Errors
/// [`Error::LengthMismatch`] for buffers of the wrong length,
/// [`Error::Empty`] for no pixels, [`Error::EmptyImage`] for a
/// zero height or width, [`Error::NonFiniteScore`],
/// [`Error::OneClass`] when no pixel (or every pixel) is anomalous,
/// [`Error::InvalidFprLimit`] unless `0 < fpr_limit <= 1`.
pub fn au_pro(
    maps: &[f32],
    masks: &[bool],
    n_images: usize,
    height: usize,
    width: usize,
    fpr_limit: f64,
) -> Result<f64, Error> {
    const METRIC: &str = "au_pro";
    let (_, total) = checked_pixels(METRIC, n_images, height, width)?;
    for (what, found) in [("maps", maps.len()), ("masks", masks.len())] {
        if found != total {
            return Err(Error::LengthMismatch {
                metric: METRIC,
                what,
                expected: total,
                found,
            });
        }
    }
    let run = ImageRun {
        n: n_images,
        height,
        width,
    };
    Ok(pixel_metrics(METRIC, maps, masks, &[run], fpr_limit)?.aupro)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_maps_give_one() {
        let masks = [false, true, true, false, false, false, false, true, false];
        let maps: Vec<f32> = masks.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        assert_eq!(au_pro(&maps, &masks, 1, 3, 3, 0.3).unwrap(), 1.0);
        assert_eq!(au_pro(&maps, &masks, 1, 3, 3, 1.0).unwrap(), 1.0);
    }

    #[test]
    fn constant_maps_give_the_diagonal() {
        // One tied group: the curve is (0, 0) -> (1, 1), whose area up to 0.3
        // is 0.045, i.e. 0.15 after dividing by 0.3.
        let masks = [false, true, true, false, false, false, false, true, false];
        let au = au_pro(&[0.5; 9], &masks, 1, 3, 3, 0.3).unwrap();
        assert!((au - 0.15).abs() < 1e-12, "{au}");
        let au = au_pro(&[0.5; 9], &masks, 1, 3, 3, 1.0).unwrap();
        assert!((au - 0.5).abs() < 1e-12, "{au}");
    }

    #[test]
    fn every_region_weighs_the_same() {
        // Two images 1x4: image 0 has a 1-pixel region found first, image 1 a
        // 2-pixel region found half at the second threshold.
        let masks = [true, false, false, false, false, true, true, false];
        let maps = [0.9, 0.1, 0.2, 0.3, 0.0, 0.8, 0.4, 0.5];
        // Distinct scores descending and the points they make (5 normal pixels):
        // 0.9: PRO (1 + 0) / 2 = 0.5, FPR 0 -> (0, 0.5)
        // 0.8: PRO (1 + 0.5) / 2 = 0.75, FPR 0 -> (0, 0.75)
        // 0.5: FPR 1/5 -> (0.2, 0.75)
        // 0.4: PRO 1 -> (0.2, 1)
        // below: FPR rises to 1 with PRO 1.
        // Area up to 0.3: 0.75 * 0.2 + 1 * 0.1 = 0.25.
        let expected = 0.25 / 0.3;
        let au = au_pro(&maps, &masks, 2, 1, 4, 0.3).unwrap();
        assert!((au - expected).abs() < 1e-12, "{au} vs {expected}");
    }

    #[test]
    fn interpolates_at_the_limit() {
        // One 1-pixel region scored below all 4 normal pixels: the PRO stays 0
        // until the FPR reaches 1, so nothing is gained below the limit.
        let masks = [false, false, false, false, true];
        let maps = [0.9, 0.8, 0.7, 0.6, 0.1];
        assert_eq!(au_pro(&maps, &masks, 1, 1, 5, 0.3).unwrap(), 0.0);
        // Region pixel tied with the second normal pixel: points (0.25, 0),
        // (0.5, 1); at FPR 0.3 the PRO is interpolated to 0.2, so the area is
        // 0.5 * 0.2 * 0.05 = 0.005 and AU-PRO 0.005 / 0.3.
        let maps = [0.9, 0.8, 0.7, 0.6, 0.8];
        let au = au_pro(&maps, &masks, 1, 1, 5, 0.3).unwrap();
        assert!((au - 0.005 / 0.3).abs() < 1e-12, "{au}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let masks = [false, true];
        assert!(matches!(
            au_pro(&[0.1, f32::NAN], &masks, 1, 1, 2, 0.3),
            Err(Error::NonFiniteScore { index: 1, .. })
        ));
        assert!(matches!(
            au_pro(&[0.1, 0.2], &[false, false], 1, 1, 2, 0.3),
            Err(Error::OneClass {
                present: "normal",
                ..
            })
        ));
        assert!(matches!(
            au_pro(&[0.1, 0.2], &[true, true], 1, 1, 2, 0.3),
            Err(Error::OneClass {
                present: "anomalous",
                ..
            })
        ));
        for limit in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(matches!(
                au_pro(&[0.1, 0.2], &masks, 1, 1, 2, limit),
                Err(Error::InvalidFprLimit { .. })
            ));
        }
        assert!(matches!(
            au_pro(&[0.1, 0.2, 0.3], &masks, 1, 1, 2, 0.3),
            Err(Error::LengthMismatch {
                what: "maps",
                expected: 2,
                found: 3,
                ..
            })
        ));
        assert!(matches!(
            au_pro(&[0.1, 0.2], &masks[..1], 1, 1, 2, 0.3),
            Err(Error::LengthMismatch { what: "masks", .. })
        ));
        assert!(matches!(
            au_pro(&[], &[], 0, 4, 4, 0.3),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            au_pro(&[], &[], 3, 0, 4, 0.3),
            Err(Error::EmptyImage { .. })
        ));
        assert!(matches!(
            au_pro(&[], &[], usize::MAX, 2, 2, 0.3),
            Err(Error::TooLarge { .. })
        ));
    }
}
