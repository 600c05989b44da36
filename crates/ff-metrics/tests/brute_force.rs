//! Randomised cross-checks of the fast sort-and-sweep metrics against direct
//! evaluations of their definitions (pair counting for AUROC, every threshold
//! for F1 and AU-PRO), on many small seeded inputs full of ties.

use ff_metrics::{au_pro, f1_max, region_sizes, roc_auc, Evaluator};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// AUROC as the Mann-Whitney statistic: the share of (anomalous, normal)
/// pairs ranked correctly, ties counting one half.
fn pairwise_auroc(scores: &[f32], labels: &[bool]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (&sp, _) in scores.iter().zip(labels).filter(|(_, &l)| l) {
        for (&sn, _) in scores.iter().zip(labels).filter(|(_, &l)| !l) {
            pairs += 1.0;
            wins += if sp > sn {
                1.0
            } else if sp == sn {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / pairs
}

/// F1 at every distinct threshold, in increasing order; the first maximum wins.
fn every_threshold_f1(scores: &[f32], labels: &[bool]) -> (f64, f32) {
    let mut thresholds: Vec<f32> = scores.to_vec();
    thresholds.sort_by(f32::total_cmp);
    thresholds.dedup_by(|a, b| a == b);
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let mut best = (-1.0, f32::NAN);
    for &t in &thresholds {
        let tp = scores
            .iter()
            .zip(labels)
            .filter(|(&s, &l)| s >= t && l)
            .count() as f64;
        let fp = scores
            .iter()
            .zip(labels)
            .filter(|(&s, &l)| s >= t && !l)
            .count() as f64;
        let f1 = 2.0 * tp / (tp + fp + positives);
        // A margin keeps float noise from deciding between equal F1 values.
        if f1 > best.0 + 1e-12 {
            best = (f1, t);
        }
    }
    best
}

/// 8-connected labels by repeated propagation of the smallest label.
fn naive_labels(mask: &[bool], height: usize, width: usize) -> Vec<usize> {
    let mut labels: Vec<usize> = (0..mask.len())
        .map(|i| if mask[i] { i + 1 } else { 0 })
        .collect();
    loop {
        let mut changed = false;
        for y in 0..height {
            for x in 0..width {
                let i = y * width + x;
                if !mask[i] {
                    continue;
                }
                for ny in y.saturating_sub(1)..(y + 2).min(height) {
                    for nx in x.saturating_sub(1)..(x + 2).min(width) {
                        let j = ny * width + nx;
                        if mask[j] && labels[j] < labels[i] {
                            labels[i] = labels[j];
                            changed = true;
                        }
                    }
                }
            }
        }
        if !changed {
            return labels;
        }
    }
}

/// AU-PRO from the definition: at every distinct threshold, the mean overlap
/// of every region and the FPR over normal pixels; trapezoid from (0, 0) to
/// (1, 1), cut at the limit with linear interpolation.
fn every_threshold_au_pro(
    maps: &[f32],
    masks: &[bool],
    n: usize,
    h: usize,
    w: usize,
    limit: f64,
) -> f64 {
    let pixels = h * w;
    let mut regions: Vec<Vec<usize>> = Vec::new();
    for image in 0..n {
        let labels = naive_labels(&masks[image * pixels..(image + 1) * pixels], h, w);
        let mut ids: Vec<usize> = labels.iter().copied().filter(|&l| l != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            regions.push(
                (0..pixels)
                    .filter(|&p| labels[p] == id)
                    .map(|p| image * pixels + p)
                    .collect(),
            );
        }
    }
    let normal: Vec<usize> = (0..maps.len()).filter(|&p| !masks[p]).collect();
    let mut thresholds: Vec<f32> = maps.to_vec();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup_by(|a, b| a == b);
    let mut points = vec![(0.0, 0.0)];
    for &t in &thresholds {
        let fpr = normal.iter().filter(|&&p| maps[p] >= t).count() as f64 / normal.len() as f64;
        let pro: f64 = regions
            .iter()
            .map(|r| r.iter().filter(|&&p| maps[p] >= t).count() as f64 / r.len() as f64)
            .sum::<f64>()
            / regions.len() as f64;
        points.push((fpr, pro.min(1.0)));
    }
    points.push((1.0, 1.0));
    let mut area = 0.0;
    for pair in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        if x1 <= limit {
            area += 0.5 * (y0 + y1) * (x1 - x0);
        } else {
            if x0 < limit {
                let y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
                area += 0.5 * (y0 + y) * (limit - x0);
            }
            break;
        }
    }
    area / limit
}

/// Random maps quantised to `levels` values (many ties, signed zeros
/// included) and random masks with blobs and single pixels.
fn random_case(
    rng: &mut ChaCha8Rng,
    n: usize,
    h: usize,
    w: usize,
    levels: i32,
) -> (Vec<f32>, Vec<bool>) {
    let mut maps = Vec::with_capacity(n * h * w);
    let mut masks = Vec::with_capacity(n * h * w);
    for _ in 0..n {
        let density = [0.0, 0.05, 0.2, 0.5][rng.random_range(0..4)];
        for _ in 0..h * w {
            let anomalous = rng.random_bool(density);
            let level = rng.random_range(-levels..=levels) + if anomalous { levels / 2 } else { 0 };
            // Level 0 comes out as -0.0 half of the time.
            let score = if level == 0 && rng.random_bool(0.5) {
                -0.0
            } else {
                level as f32 / 8.0
            };
            maps.push(score);
            masks.push(anomalous);
        }
    }
    (maps, masks)
}

#[test]
fn fast_metrics_equal_their_definitions_on_random_inputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(2021);
    let mut checked = 0;
    for case in 0..300 {
        let n = rng.random_range(1..4);
        let (h, w) = (rng.random_range(1..8), rng.random_range(1..8));
        let levels = [1, 3, 20, 1000][case % 4];
        let (maps, masks) = random_case(&mut rng, n, h, w, levels);
        let anomalous = masks.iter().filter(|&&m| m).count();
        if anomalous == 0 || anomalous == masks.len() {
            continue;
        }
        checked += 1;
        let context = format!("case {case}: n {n}, {h}x{w}, {levels} levels");
        let auroc = roc_auc(&maps, &masks).unwrap();
        assert!(
            (auroc - pairwise_auroc(&maps, &masks)).abs() < 1e-12,
            "{context}"
        );
        let f1 = f1_max(&maps, &masks).unwrap();
        let (best_f1, best_threshold) = every_threshold_f1(&maps, &masks);
        assert!((f1.f1 - best_f1).abs() < 1e-12, "{context}");
        assert!(
            f1.threshold == best_threshold,
            "{context}: {} vs {best_threshold}",
            f1.threshold
        );
        for limit in [0.3, 1.0, 0.05] {
            let fast = au_pro(&maps, &masks, n, h, w, limit).unwrap();
            let slow = every_threshold_au_pro(&maps, &masks, n, h, w, limit);
            assert!(
                (fast - slow).abs() < 1e-10,
                "{context}, limit {limit}: {fast} vs {slow}"
            );
        }
        for image in 0..n {
            let mask = &masks[image * h * w..(image + 1) * h * w];
            let labels = naive_labels(mask, h, w);
            let mut ids: Vec<usize> = labels.into_iter().filter(|&l| l != 0).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(
                region_sizes(mask, h, w).unwrap().len(),
                ids.len(),
                "{context}"
            );
        }
    }
    assert!(checked > 200, "only {checked} usable cases");
}

/// Inputs large enough for the radix sort (>= 4096 samples), still checked
/// against pair counting and every-threshold AU-PRO.
#[test]
fn radix_sorted_inputs_equal_their_definitions() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for levels in [2, 50, 100_000] {
        let (n, h, w) = (3, 40, 45);
        let (maps, masks) = random_case(&mut rng, n, h, w, levels);
        let auroc = roc_auc(&maps, &masks).unwrap();
        assert!(
            (auroc - pairwise_auroc(&maps, &masks)).abs() < 1e-12,
            "{levels} levels"
        );
        let f1 = f1_max(&maps, &masks).unwrap();
        let (best_f1, best_threshold) = every_threshold_f1(&maps, &masks);
        assert!(
            (f1.f1 - best_f1).abs() < 1e-12 && f1.threshold == best_threshold,
            "{levels} levels"
        );
        if levels <= 50 {
            let fast = au_pro(&maps, &masks, n, h, w, 0.3).unwrap();
            let slow = every_threshold_au_pro(&maps, &masks, n, h, w, 0.3);
            assert!(
                (fast - slow).abs() < 1e-10,
                "{levels} levels: {fast} vs {slow}"
            );
        }
    }
}

#[test]
fn any_batch_split_gives_the_same_report() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let (n, h, w) = (12, 9, 11);
    let (maps, masks) = random_case(&mut rng, n, h, w, 20);
    let labels: Vec<bool> = masks.chunks(h * w).map(|m| m.iter().any(|&x| x)).collect();
    let mut one_shot = Evaluator::new();
    one_shot.update(&maps, &masks, &labels, n, h, w).unwrap();
    let expected = one_shot.compute().unwrap();
    for _ in 0..10 {
        let mut evaluator = Evaluator::new();
        let mut start = 0;
        while start < n {
            let end = rng.random_range(start..=n);
            let px = start * h * w..end * h * w;
            evaluator
                .update(
                    &maps[px.clone()],
                    &masks[px],
                    &labels[start..end],
                    end - start,
                    h,
                    w,
                )
                .unwrap();
            start = end;
        }
        assert_eq!(evaluator.compute().unwrap(), expected);
    }
}
