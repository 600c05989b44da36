"""Parity fixtures for crates/ff-metrics: AUROC, F1-max threshold and AU-PRO.

Expected numbers come from the references the crate must equal:
- AUROC: scikit-learn `roc_auc_score`.
- F1-max and threshold: anomalib's adaptive threshold, i.e. scikit-learn
  `precision_recall_curve`, F1 = 2PR / (P + R), threshold of the argmax.
- AU-PRO: a twin of the MVTec AD evaluation code (`compute_pro` in
  `pro_curve_util.py` and `trapezoid` in `generic_util.py`, MVTec AD / MVTec
  3D-AD evaluation scripts): connected components with
  `scipy.ndimage.label(mask, structure=np.ones((3, 3)))` (8-connectivity),
  all pixels sorted once by score, FPR and per-region-overlap changes summed
  cumulatively, one curve point kept per distinct score, the curve framed by
  (0, 0) and (1, 1), integrated up to the FPR limit with linear interpolation
  at the limit and divided by the limit. The only deliberate departure from
  the official code is float64 instead of float32 for the FPR (the official
  code casts to float32 to save memory; `max |float32 - float64|` is printed
  for every case). The twin is itself checked here against a brute-force
  evaluation at every distinct threshold.

Every case covers something the Rust side could get wrong: ties inside and
across classes, signed zeros, adjacent floats, one-pixel regions, regions
touching only at corners (8-connectivity), images without a defect, perfect
separation, chance, non-square images.

Scores and thresholds are stored as float32 bit patterns (8 hex digits per
value, concatenated) so the Rust test reads exactly the values Python used;
labels and masks as strings of '0'/'1'.

Run from the repository root (takes a few seconds, needs numpy, scipy, scikit-learn):

    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_metrics_fixtures.py

Writes tests-fixtures/metrics/ranking.json and tests-fixtures/metrics/aupro.json,
read by crates/ff-metrics/tests/parity.rs.
"""
import json
import os
from bisect import bisect
from fractions import Fraction

import numpy as np
from scipy.ndimage import label
from sklearn.metrics import precision_recall_curve, roc_auc_score

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests-fixtures", "metrics")
FPR_LIMITS = [0.3, 1.0, 0.05, 0.01]


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------

def f32_hex(values) -> str:
    a = np.ascontiguousarray(np.asarray(values, dtype=np.float32).ravel())
    return "".join(f"{b:08x}" for b in a.view(np.uint32).tolist())


def bits(values) -> str:
    return "".join("1" if v else "0" for v in np.asarray(values, dtype=bool).ravel().tolist())


# ----------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------

def sklearn_f1_max(labels, scores):
    """anomalib's adaptive threshold over scikit-learn's precision-recall curve."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    # anomalib adds 1e-10 to the denominator; it must not move the argmax here.
    f1_eps = (2 * precision * recall) / (precision + recall + 1e-10)
    assert int(np.argmax(f1_eps)) == best, "anomalib's epsilon changes the argmax"
    # The threshold that the Rust side picks by exact arithmetic: the lowest
    # among the thresholds whose F1 equals the maximum as a fraction.
    exact_best = exact_f1_argmax(labels, scores)
    assert np.float32(thresholds[best]) == exact_best, (thresholds[best], exact_best)
    return float(f1[best]), np.float32(thresholds[best])


def exact_f1_argmax(labels, scores):
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float32)
    positives = int(labels.sum())
    best = None
    for t in np.unique(scores):  # increasing, so ties keep the lowest threshold
        flagged = scores >= t
        tp = int((flagged & labels).sum())
        fp = int((flagged & ~labels).sum())
        f1 = Fraction(2 * tp, tp + fp + positives)
        if best is None or f1 > best[0]:
            best = (f1, t)
    return best[1]


def mvtec_pro_curve(maps, masks):
    """Twin of the MVTec AD evaluation code's `compute_pro` (float64 FPR)."""
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels = 0
    num_gt_regions = 0
    fp_changes = np.zeros(maps.shape, dtype=np.uint64)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    for i, gt_map in enumerate(masks):
        labeled, n_components = label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += int(np.sum(ok_mask))
        fp_change = np.zeros_like(gt_map, dtype=np.uint64)
        fp_change[ok_mask] = 1
        pro_change = np.zeros_like(gt_map, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_change[region_mask] = 1.0 / np.sum(region_mask)
        fp_changes[i] = fp_change
        pro_changes[i] = pro_change
    scores = maps.ravel()
    sort_idxs = np.argsort(scores)[::-1]
    scores_sorted = scores[sort_idxs]
    fp_sorted = fp_changes.ravel()[sort_idxs]
    pro_sorted = pro_changes.ravel()[sort_idxs]
    fp_cum = np.cumsum(fp_sorted)
    fprs = fp_cum.astype(np.float64) / num_ok_pixels
    fprs_official_f32 = fp_cum.astype(np.float32) / np.float32(num_ok_pixels)
    pros = np.cumsum(pro_sorted) / num_gt_regions
    keep_mask = np.append(np.diff(scores_sorted) != 0, np.True_)
    fprs, pros, fprs_official_f32 = fprs[keep_mask], pros[keep_mask], fprs_official_f32[keep_mask]
    np.clip(fprs, a_min=None, a_max=1.0, out=fprs)
    np.clip(pros, a_min=None, a_max=1.0, out=pros)
    zero, one = np.array([0.0]), np.array([1.0])
    return (
        np.concatenate((zero, fprs, one)),
        np.concatenate((zero, pros, one)),
        np.concatenate((zero, fprs_official_f32.astype(np.float64), one)),
    )


def mvtec_trapezoid(x, y, x_max=None):
    """The MVTec AD evaluation code's `trapezoid` (generic_util.py)."""
    x = np.array(x)
    y = np.array(y)
    finite_mask = np.logical_and(np.isfinite(x), np.isfinite(y))
    assert finite_mask.all()
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        mask = x <= x_max
        x = x[mask]
        y = y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def mvtec_au_pro(maps, masks, limit):
    fprs, pros, _ = mvtec_pro_curve(maps, masks)
    return float(mvtec_trapezoid(fprs, pros, x_max=limit) / limit)


def brute_force_au_pro(maps, masks, limit):
    """The definition evaluated directly at every distinct threshold."""
    structure = np.ones((3, 3), dtype=int)
    regions = []
    for i, gt_map in enumerate(masks):
        labeled, n = label(gt_map, structure)
        regions += [(i, labeled == k) for k in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        xs.append(float((flagged & normal).sum()) / float(normal.sum()))
        ys.append(min(1.0, float(np.mean([flagged[i][r].mean() for i, r in regions]))))
    xs.append(1.0)
    ys.append(1.0)
    return float(mvtec_trapezoid(xs, ys, x_max=limit) / limit)


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------

def ranking_case(name, scores, labels):
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=bool)
    case = {"name": name, "scores_f32_hex": f32_hex(scores), "labels": bits(labels)}
    if labels.all() or not labels.any():
        raise ValueError(f"{name}: ranking cases need both classes")
    case["roc_auc"] = float(roc_auc_score(labels, scores))
    f1, threshold = sklearn_f1_max(labels, scores)
    case["f1_max"] = f1
    case["f1_threshold_f32_hex"] = f32_hex([threshold])
    return case


def ranking_cases(rng):
    cases = []
    n = 400
    labels = rng.random(n) < 0.3
    cases.append(ranking_case("gaussian_shifted", rng.standard_normal(n) + 1.2 * labels, labels))
    n = 500
    labels = rng.random(n) < 0.4
    scores = np.round((rng.standard_normal(n) + 0.8 * labels) * 4) / 8
    cases.append(ranking_case("quantised_ties_across_classes", scores, labels))
    labels = np.arange(50) >= 35
    scores = np.where(labels, rng.uniform(0.6, 1.0, 50), rng.uniform(0.0, 0.5, 50))
    cases.append(ranking_case("perfect_separation", scores, labels))
    cases.append(ranking_case("reversed", -scores, labels))
    labels = rng.random(40) < 0.5
    cases.append(ranking_case("all_tied", np.full(40, 0.25), labels))
    n = 2000
    cases.append(ranking_case("chance_random", rng.random(n), rng.random(n) < 0.5))
    cases.append(ranking_case("two_samples", [0.3, 0.7], [True, False]))
    # Two thresholds with exactly equal F1 (2/3): the lowest must win.
    cases.append(ranking_case("f1_tie", [0.9, 0.5, 0.5, 0.5, 0.1], [True, True, False, False, False]))
    labels = np.zeros(300, dtype=bool)
    labels[123] = True
    cases.append(ranking_case("single_positive", rng.standard_normal(300), labels))
    cases.append(ranking_case("single_negative", rng.standard_normal(300), ~labels))
    # Signed zeros (must tie), adjacent floats (must not), extreme magnitudes.
    base = np.float32(0.7)
    up = np.nextafter(base, np.float32(1))
    down = np.nextafter(base, np.float32(0))
    tiny = np.float32(1e-45)
    special = np.array(
        [0.0, -0.0, 0.0, -0.0, base, up, down, base, up, down, tiny, -tiny, 3e38, -3e38, -1.5, 1e-30, -0.0, 0.0],
        dtype=np.float32,
    )
    special_labels = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1], dtype=bool)
    cases.append(ranking_case("signed_zeros_adjacent_floats", special, special_labels))
    # FastFlow-like image scores: -exp(-0.5 * mean z^2), close to 0 for
    # anomalies (large z), underflowing to -0.0 for the most anomalous ones.
    n = 1000
    labels = rng.random(n) < 0.25
    energy = rng.gamma(2.0, 2.0, n) * np.where(labels, 40.0, 1.0)
    scores = -np.exp(-0.5 * energy.astype(np.float32)).astype(np.float32)
    scores[rng.random(n) < 0.05] = np.float32(-0.0)
    cases.append(ranking_case("fastflow_like_with_underflow", scores, labels))
    return cases


def smooth(noise, passes=2):
    """Cheap box blur so maps have blobs and ties are rare but values correlate."""
    out = noise
    for _ in range(passes):
        out = (out + np.roll(out, 1, -1) + np.roll(out, -1, -1) + np.roll(out, 1, -2) + np.roll(out, -1, -2)) / 5
    return out


def ellipse(h, w, cy, cx, ry, rx):
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def blob_masks(rng, n, h, w, defective):
    masks = np.zeros((n, h, w), dtype=bool)
    for i in defective:
        for _ in range(rng.integers(1, 4)):
            masks[i] |= ellipse(h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, h / 4), rng.uniform(1, w / 4))
    return masks


def structured_masks():
    h, w = 20, 28
    masks = np.zeros((4, h, w), dtype=bool)
    m = masks[0]
    m[2:9, 2:9] = True  # a ring ...
    m[4:7, 4:7] = False
    m[5, 5] = True  # ... with a one-pixel island in its hole (separate region)
    for k in range(8):  # a diagonal line, connected only through corners
        m[11 + k, 1 + k] = True
    m[12:18, 14:22] = np.indices((6, 8)).sum(0) % 2 == 0  # a checkerboard: one region
    m[0, 27] = m[19, 27] = m[19, 0] = True  # corner pixels
    m = masks[1]
    m[:, 10] = True  # a full-height line
    m[3:6, 15:18] = True
    m[6, 18] = True  # touches the square at a corner
    m[10:19, 20:27] = True  # large region next to the small ones
    m = masks[2]
    m[1:12, 1:3] = m[10:12, 1:12] = m[1:12, 10:12] = True  # a U shape
    m[15, 15] = m[15, 17] = m[17, 15] = m[17, 17] = True  # four isolated pixels
    return masks  # masks[3] stays normal


def one_pixel_masks():
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 0, 0] = masks[0, 15, 15] = masks[0, 7, 7] = masks[0, 8, 8] = True  # corner pair merges
    masks[0, 3, 12] = masks[0, 3, 14] = True  # gap of one pixel: separate
    masks[1, 0, 9] = masks[1, 9, 0] = masks[1, 12, 5] = True
    return masks  # masks[2] stays normal


def aupro_case(name, maps, masks):
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    n, h, w = maps.shape
    case = {
        "name": name,
        "n": n,
        "height": h,
        "width": w,
        "maps_f32_hex": f32_hex(maps),
        "masks": bits(masks),
    }
    structure = np.ones((3, 3), dtype=int)
    sizes = []
    for gt in masks:
        labeled, k = label(gt, structure)
        sizes.append([int(np.sum(labeled == j)) for j in range(1, k + 1)])
    case["region_sizes"] = sizes
    case["au_pro"] = {}
    for limit in FPR_LIMITS:
        twin = mvtec_au_pro(maps, masks, limit)
        brute = brute_force_au_pro(maps, masks, limit)
        assert abs(twin - brute) < 1e-9, (name, limit, twin, brute)
        case["au_pro"][str(limit)] = twin
    fprs, _, fprs_f32 = mvtec_pro_curve(maps, masks)
    print(f"  {name}: AU-PRO(0.3) = {case['au_pro']['0.3']:.6f}, official float32 FPR differs by "
          f"{np.max(np.abs(fprs - fprs_f32)):.2e}")
    flat_scores, flat_masks = maps.ravel(), masks.ravel()
    case["pixel_auroc"] = float(roc_auc_score(flat_masks, flat_scores))
    f1, threshold = sklearn_f1_max(flat_masks, flat_scores)
    case["pixel_f1_max"] = f1
    case["pixel_f1_threshold_f32_hex"] = f32_hex([threshold])
    image_scores = maps.reshape(n, -1).max(axis=1)
    image_labels = masks.reshape(n, -1).any(axis=1)
    case["image_labels"] = bits(image_labels)
    case["image_auroc"] = float(roc_auc_score(image_labels, image_scores))
    f1, threshold = sklearn_f1_max(image_labels, image_scores)
    case["image_f1_max"] = f1
    case["image_f1_threshold_f32_hex"] = f32_hex([threshold])
    return case


def aupro_cases(rng):
    cases = []
    masks = blob_masks(rng, 4, 32, 32, defective=[1, 2, 3])
    maps = smooth(rng.standard_normal(masks.shape)) + 1.5 * smooth(masks.astype(float), 1)
    cases.append(aupro_case("blobs_continuous", maps, masks))
    masks = blob_masks(rng, 4, 24, 24, defective=[0, 2])
    maps = np.floor((smooth(rng.standard_normal(masks.shape)) + masks) * 4) / 16
    cases.append(aupro_case("blobs_quantised_ties", maps, masks))
    masks = one_pixel_masks()
    maps = rng.integers(0, 8, masks.shape) / 8 + 0.5 * masks
    cases.append(aupro_case("one_pixel_regions", maps, masks))
    masks = structured_masks()
    maps = smooth(rng.standard_normal(masks.shape), 1) + 0.8 * masks + 0.3 * smooth(masks.astype(float), 2)
    cases.append(aupro_case("structured_non_square", maps, masks))
    masks = blob_masks(rng, 3, 16, 16, defective=[0, 1])
    maps = np.where(masks, rng.uniform(0.6, 1.0, masks.shape), rng.uniform(0.0, 0.5, masks.shape))
    cases.append(aupro_case("perfect_separation", maps, masks))
    masks = blob_masks(rng, 3, 16, 16, defective=[1, 2])
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = 0.25  # one image scores lower, so the image AUROC is defined and perfect
    cases.append(aupro_case("constant_maps", maps, masks))
    masks = blob_masks(rng, 6, 16, 16, defective=[0, 3, 5])
    cases.append(aupro_case("chance_random", rng.random(masks.shape), masks))
    # FastFlow-like maps: -exp(-0.5 * z^2) of a smooth field, near 0 on
    # defects (large z), underflowing to -0.0 on the strongest ones and on a
    # band of normal pixels (ties across classes at the top score).
    masks = blob_masks(rng, 4, 32, 32, defective=[0, 2])
    energy = np.abs(smooth(rng.standard_normal(masks.shape))) * 4 + 0.5
    energy = np.where(masks, energy * 60, energy)
    energy[:, :2, :] *= 300
    maps = -np.exp(-0.5 * energy.astype(np.float32))
    assert np.any(np.signbit(maps) & (maps == 0)), "expected some -0.0 pixels"
    cases.append(aupro_case("fastflow_like_with_underflow", maps, masks))
    masks = np.zeros((8, 12, 12), dtype=bool)
    masks[5, 4:7, 2:9] = True
    maps = smooth(rng.standard_normal(masks.shape), 1) + masks
    cases.append(aupro_case("mostly_normal_images", maps, masks))
    return cases


def main():
    rng = np.random.default_rng(20211115)
    os.makedirs(OUT_DIR, exist_ok=True)
    print("ranking cases")
    ranking = ranking_cases(rng)
    print("AU-PRO cases")
    aupro = aupro_cases(rng)
    for file, cases in [("ranking.json", ranking), ("aupro.json", aupro)]:
        doc = {
            "generated_by": "data-scripts/make_metrics_fixtures.py",
            "cases": cases,
        }
        path = os.path.join(OUT_DIR, file)
        with open(path, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
