//! What a user reads after a run: the metrics table on stdout, the Markdown
//! report, the metrics JSON and the predictions CSV.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The evaluation numbers of one model on one test set. Field names are the
/// JSON keys that scripts (and `cargo xtask bench-all`) read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// `None` when every test image has the same label (a test set of good
    /// parts only): image AUROC is undefined then, as are F1 and threshold.
    pub image_auroc: Option<f64>,
    /// `None` when the test set has no pixel masks (e.g. a folder without masks).
    pub pixel_auroc: Option<f64>,
    pub aupro: Option<f64>,
    pub image_f1_max: Option<f64>,
    /// The image-score threshold that achieves `image_f1_max`; predictions use it.
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_f1_max: Option<f64>,
    /// The pixel-score threshold of `pixel_f1_max`; predicted masks use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_threshold: Option<f64>,
    pub n_images: usize,
    /// How many test images are labelled anomalous (absent in older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_anomalous: Option<usize>,
    /// Images per second through backbone + flows + anomaly map during the evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_img_per_s: Option<f64>,
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{:.2}", 100.0 * v),
        _ => "n/a".to_string(),
    }
}

/// The metrics as an aligned plain-text table for the terminal.
pub fn metrics_table(m: &Metrics) -> String {
    let rows = [
        ("image AUROC (%)", pct(m.image_auroc)),
        ("pixel AUROC (%)", pct(m.pixel_auroc)),
        ("AU-PRO (%)", pct(m.aupro)),
        ("image F1-max (%)", pct(m.image_f1_max)),
        ("threshold", threshold(m.threshold)),
        ("test images", m.n_images.to_string()),
    ];
    let mut out = String::new();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let _ = writeln!(out, "{:-<1$}", "", width + 14);
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v:>10}");
    }
    if let Some(s) = m.inference_img_per_s {
        let _ = writeln!(out, "{:<width$}  {:>10.1}", "inference img/s", s);
    }
    let _ = write!(out, "{:-<1$}", "", width + 14);
    if let Some(note) = undefined_note(m) {
        let _ = write!(out, "\nnote: {note}");
    }
    out
}

fn threshold(t: Option<f64>) -> String {
    t.map(|t| format!("{t:.6}")).unwrap_or_else(|| "n/a".into())
}

/// Why the image metrics are missing, when they are.
fn undefined_note(m: &Metrics) -> Option<String> {
    if m.image_auroc.is_some() {
        return None;
    }
    let class = match m.n_anomalous {
        Some(0) => "normal",
        Some(_) => "anomalous",
        None => "of one class",
    };
    Some(format!(
        "image AUROC, F1-max and threshold are undefined: all {} test images are {class}; \
         add test images of the other class to measure them",
        m.n_images
    ))
}

impl Metrics {
    /// Our metrics from ff-metrics' report, with the measured inference speed.
    pub fn from_report(r: &ff_metrics::EvalReport, inference_img_per_s: Option<f64>) -> Self {
        Self {
            image_auroc: r.image_auroc,
            pixel_auroc: r.pixel_auroc,
            aupro: r.aupro,
            image_f1_max: r.image_f1_max,
            threshold: r.threshold.map(f64::from),
            pixel_f1_max: r.pixel_f1_max,
            pixel_threshold: r.pixel_threshold.map(f64::from),
            n_images: r.n_images,
            n_anomalous: Some(r.n_anomalous),
            inference_img_per_s,
        }
    }
}

/// Context printed at the top of a Markdown report.
#[derive(Debug, Clone, Default)]
pub struct ReportContext {
    pub title: String,
    /// `(label, value)` lines: checkpoint, data, config, epoch, ...
    pub facts: Vec<(String, String)>,
}

/// A Markdown report of one evaluation.
pub fn markdown_report(ctx: &ReportContext, m: &Metrics) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", ctx.title);
    for (k, v) in &ctx.facts {
        let _ = writeln!(out, "- **{k}**: {v}");
    }
    let _ = writeln!(out, "\n| metric | value |\n| --- | ---: |");
    let _ = writeln!(out, "| image AUROC (%) | {} |", pct(m.image_auroc));
    let _ = writeln!(out, "| pixel AUROC (%) | {} |", pct(m.pixel_auroc));
    let _ = writeln!(out, "| AU-PRO (%) | {} |", pct(m.aupro));
    let _ = writeln!(out, "| image F1-max (%) | {} |", pct(m.image_f1_max));
    let _ = writeln!(out, "| threshold | {} |", threshold(m.threshold));
    let _ = writeln!(out, "| test images | {} |", m.n_images);
    if let Some(s) = m.inference_img_per_s {
        let _ = writeln!(out, "| inference img/s | {s:.1} |");
    }
    if let Some(note) = undefined_note(m) {
        let _ = writeln!(out, "\nNote: {note}.");
    }
    out
}

/// One row of `predictions.csv`.
#[derive(Debug, Clone)]
pub struct PredictionRow {
    pub path: String,
    pub score: Option<f32>,
    pub label: &'static str,
    pub heatmap: String,
    pub mask: String,
    pub error: String,
}

/// Quotes a CSV field when it contains a separator, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The predictions CSV: one row per input, failed inputs included with
/// their error; the threshold column is empty when there is none.
pub fn predictions_csv(rows: &[PredictionRow], threshold: Option<f32>) -> String {
    let mut out = String::from("path,score,threshold,label,heatmap,mask,error\n");
    let threshold = threshold.map(|t| format!("{t:.6}")).unwrap_or_default();
    for r in rows {
        let score = r.score.map(|s| format!("{s:.6}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            csv_field(&r.path),
            score,
            threshold,
            r.label,
            csv_field(&r.heatmap),
            csv_field(&r.mask),
            csv_field(&r.error)
        );
    }
    out
}

/// Writes the metrics JSON (`--json`) atomically.
pub fn write_metrics_json(path: &Path, m: &Metrics) -> Result<()> {
    crate::fsutil::write_json_atomic(path, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        Metrics {
            image_auroc: Some(0.975),
            pixel_auroc: Some(0.9612),
            aupro: None,
            image_f1_max: Some(0.9),
            threshold: Some(-0.25),
            pixel_f1_max: None,
            pixel_threshold: None,
            n_images: 12,
            n_anomalous: Some(5),
            inference_img_per_s: Some(14.25),
        }
    }

    #[test]
    fn table_and_markdown_show_every_metric() {
        let m = sample();
        let t = metrics_table(&m);
        for needle in ["97.50", "96.12", "n/a", "90.00", "-0.250000", "12", "14.2"] {
            assert!(t.contains(needle), "{needle} missing from\n{t}");
        }
        let md = markdown_report(
            &ReportContext {
                title: "Eval".into(),
                facts: vec![("epoch".into(), "3".into())],
            },
            &m,
        );
        assert!(md.starts_with("# Eval"));
        assert!(md.contains("- **epoch**: 3"));
        assert!(md.contains("| image AUROC (%) | 97.50 |"));
        assert!(!t.contains("note") && !md.contains("Note"));
    }

    #[test]
    fn undefined_image_metrics_are_explained_not_nan() -> Result<()> {
        let m = Metrics {
            image_auroc: None,
            image_f1_max: None,
            threshold: None,
            pixel_auroc: None,
            n_anomalous: Some(0),
            ..sample()
        };
        let t = metrics_table(&m);
        let md = markdown_report(&ReportContext::default(), &m);
        for text in [&t, &md] {
            assert!(!text.to_lowercase().contains("nan"), "{text}");
            assert!(
                text.contains("undefined: all 12 test images are normal"),
                "{text}"
            );
        }
        assert!(md.contains("| image AUROC (%) | n/a |"), "{md}");
        let v = serde_json::to_value(&m)?;
        assert!(
            v["image_auroc"].is_null() && v["threshold"].is_null(),
            "{v}"
        );
        Ok(())
    }

    #[test]
    fn json_has_the_documented_keys() -> Result<()> {
        let v = serde_json::to_value(sample())?;
        for key in [
            "image_auroc",
            "pixel_auroc",
            "aupro",
            "image_f1_max",
            "threshold",
            "n_images",
            "inference_img_per_s",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        Ok(())
    }

    #[test]
    fn csv_quotes_awkward_paths() {
        let rows = [PredictionRow {
            path: "a,b\"c.png".into(),
            score: Some(-0.5),
            label: "anomalous",
            heatmap: "h.png".into(),
            mask: "m.png".into(),
            error: String::new(),
        }];
        let csv = predictions_csv(&rows, Some(-0.6));
        assert_eq!(
            csv.lines().nth(1),
            Some("\"a,b\"\"c.png\",-0.500000,-0.600000,anomalous,h.png,m.png,")
        );
        let csv = predictions_csv(&rows, None);
        assert_eq!(
            csv.lines().nth(1),
            Some("\"a,b\"\"c.png\",-0.500000,,anomalous,h.png,m.png,")
        );
    }
}
