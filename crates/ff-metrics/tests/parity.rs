//! Parity with the references: scikit-learn (`roc_auc_score`, and `precision_recall_curve`
//! with the argmax of F1) and the MVTec AD evaluation code (AU-PRO, SciPy 8-connected
//! labelling), on fixtures written by `data-scripts/make_metrics_fixtures.py` into
//! `tests-fixtures/metrics/`.

use std::path::PathBuf;

use ff_metrics::{au_pro, f1_max, region_sizes, roc_auc, Evaluator, AU_PRO_FPR_LIMIT};
use serde::Deserialize;

/// AUROC and F1 must match scikit-learn to this absolute tolerance.
const RANKING_TOLERANCE: f64 = 1e-6;
/// AU-PRO must match the MVTec AD twin to this absolute tolerance.
const AU_PRO_TOLERANCE: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixture<C> {
    generated_by: String,
    cases: Vec<C>,
}

#[derive(Deserialize)]
struct RankingCase {
    name: String,
    scores_f32_hex: String,
    labels: String,
    roc_auc: f64,
    f1_max: f64,
    f1_threshold_f32_hex: String,
}

#[derive(Deserialize)]
struct AuProCase {
    name: String,
    n: usize,
    height: usize,
    width: usize,
    maps_f32_hex: String,
    masks: String,
    region_sizes: Vec<Vec<usize>>,
    /// AU-PRO by FPR limit, keyed by the limit as Python prints it ("0.3").
    au_pro: std::collections::BTreeMap<String, f64>,
    pixel_auroc: f64,
    pixel_f1_max: f64,
    pixel_f1_threshold_f32_hex: String,
    image_labels: String,
    image_auroc: f64,
    image_f1_max: f64,
    image_f1_threshold_f32_hex: String,
}

fn load<C: for<'de> Deserialize<'de>>(file: &str) -> Vec<C> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests-fixtures/metrics")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let fixture: Fixture<C> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    assert_eq!(
        fixture.generated_by,
        "data-scripts/make_metrics_fixtures.py"
    );
    assert!(!fixture.cases.is_empty(), "{} has no cases", path.display());
    fixture.cases
}

/// Decodes concatenated 8-hex-digit float32 bit patterns (exact values, signed zeros included).
fn f32s(hex: &str) -> Vec<f32> {
    assert_eq!(hex.len() % 8, 0, "hex float list of odd length");
    (0..hex.len())
        .step_by(8)
        .map(|i| f32::from_bits(u32::from_str_radix(&hex[i..i + 8], 16).expect("hex digits")))
        .collect()
}

fn bools(bits: &str) -> Vec<bool> {
    bits.bytes()
        .map(|b| match b {
            b'1' => true,
            b'0' => false,
            other => panic!("unexpected mask character {other}"),
        })
        .collect()
}

fn assert_close(name: &str, what: &str, got: f64, expected: f64, tolerance: f64) {
    assert!(
        (got - expected).abs() <= tolerance,
        "{name}: {what} = {got}, reference {expected} (tolerance {tolerance})"
    );
}

#[test]
fn roc_auc_and_f1_max_match_scikit_learn() {
    let cases: Vec<RankingCase> = load("ranking.json");
    for case in &cases {
        let scores = f32s(&case.scores_f32_hex);
        let labels = bools(&case.labels);
        let auroc = roc_auc(&scores, &labels).unwrap();
        assert_close(
            &case.name,
            "roc_auc",
            auroc,
            case.roc_auc,
            RANKING_TOLERANCE,
        );
        let f1 = f1_max(&scores, &labels).unwrap();
        assert_close(&case.name, "f1_max", f1.f1, case.f1_max, RANKING_TOLERANCE);
        // Thresholds are sample scores, so they must be the very same float
        // (`==`, under which -0.0 and 0.0 are one score, as in NumPy).
        let threshold = f32s(&case.f1_threshold_f32_hex)[0];
        assert!(
            f1.threshold == threshold,
            "{}: threshold {} vs reference {threshold}",
            case.name,
            f1.threshold
        );
    }
}

#[test]
fn region_sizes_match_scipy_8_connectivity() {
    let cases: Vec<AuProCase> = load("aupro.json");
    for case in &cases {
        let masks = bools(&case.masks);
        let pixels = case.height * case.width;
        for (image, expected) in case.region_sizes.iter().enumerate() {
            let mask = &masks[image * pixels..(image + 1) * pixels];
            let sizes = region_sizes(mask, case.height, case.width).unwrap();
            assert_eq!(&sizes, expected, "{} image {image}", case.name);
        }
    }
}

#[test]
fn au_pro_matches_the_mvtec_definition() {
    let cases: Vec<AuProCase> = load("aupro.json");
    for case in &cases {
        let maps = f32s(&case.maps_f32_hex);
        let masks = bools(&case.masks);
        assert!(
            case.au_pro.contains_key("0.3"),
            "{}: no AU-PRO at 0.3",
            case.name
        );
        for (limit, &expected) in &case.au_pro {
            let limit_value: f64 = limit.parse().unwrap();
            let got = au_pro(&maps, &masks, case.n, case.height, case.width, limit_value).unwrap();
            assert_close(
                &case.name,
                &format!("au_pro({limit})"),
                got,
                expected,
                AU_PRO_TOLERANCE,
            );
        }
    }
}

/// Feeds each case to an [`Evaluator`] in uneven batches and checks the whole
/// report against the references (image scores are the max of each map).
#[test]
fn evaluator_reports_match_the_references() {
    let cases: Vec<AuProCase> = load("aupro.json");
    for case in &cases {
        let maps = f32s(&case.maps_f32_hex);
        let masks = bools(&case.masks);
        let image_labels = bools(&case.image_labels);
        let (h, w) = (case.height, case.width);
        let pixels = h * w;
        let mut evaluator = Evaluator::new();
        let mut start = 0;
        let mut batch = 1;
        while start < case.n {
            let end = (start + batch).min(case.n);
            let range = start * pixels..end * pixels;
            evaluator
                .update(
                    &maps[range.clone()],
                    &masks[range],
                    &image_labels[start..end],
                    end - start,
                    h,
                    w,
                )
                .unwrap();
            start = end;
            batch += 1;
        }
        let report = evaluator.compute().unwrap();
        let name = &case.name;
        assert_eq!(report.n_images, case.n, "{name}");
        assert_close(
            name,
            "image_auroc",
            report.image_auroc.expect("both classes give image AUROC"),
            case.image_auroc,
            RANKING_TOLERANCE,
        );
        assert_close(
            name,
            "image_f1_max",
            report.image_f1_max.expect("both classes give image F1"),
            case.image_f1_max,
            RANKING_TOLERANCE,
        );
        assert!(
            report.threshold == Some(f32s(&case.image_f1_threshold_f32_hex)[0]),
            "{name}: image threshold"
        );
        let pixel_auroc = report
            .pixel_auroc
            .expect("masks with defects give pixel AUROC");
        assert_close(
            name,
            "pixel_auroc",
            pixel_auroc,
            case.pixel_auroc,
            RANKING_TOLERANCE,
        );
        let pixel_f1 = report
            .pixel_f1_max
            .expect("masks with defects give pixel F1");
        assert_close(
            name,
            "pixel_f1_max",
            pixel_f1,
            case.pixel_f1_max,
            RANKING_TOLERANCE,
        );
        assert!(
            report.pixel_threshold == Some(f32s(&case.pixel_f1_threshold_f32_hex)[0]),
            "{name}: pixel threshold"
        );
        let aupro = report.aupro.expect("masks with defects give AU-PRO");
        assert_eq!(AU_PRO_FPR_LIMIT, 0.3);
        assert_close(name, "aupro", aupro, case.au_pro["0.3"], AU_PRO_TOLERANCE);
    }
}
