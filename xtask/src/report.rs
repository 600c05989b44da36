//! The benchmark report: `report.md` shaped like the paper's tables (one row
//! per category, a mean row, one column per backbone) with the published
//! means and our difference to them, and `summary.json` with the same numbers
//! for machines. Both are pure functions of the matrix and the cell results,
//! so two merged shards render byte-for-byte what one full run renders.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::plan::{backbone_rank, Cell};
use crate::published;
use crate::results::{write_atomic, CellResult, RunSettings, SUMMARY_FILE};

/// Number of categories in MVTec AD; published means average all of them.
const MVTEC_CATEGORY_COUNT: usize = 15;

/// Published MVTec AD means for one backbone, in percent.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Published {
    pub backbone: &'static str,
    /// Yu et al. 2021 (arXiv 2111.07677), image-level AUROC.
    pub paper_image: f64,
    /// Yu et al. 2021, pixel-level AUROC.
    pub paper_pixel: f64,
    /// gathierry/FastFlow (the reference implementation), pixel AUROC of the
    /// last epoch.
    pub repo_pixel_last: f64,
    /// gathierry/FastFlow, pixel AUROC of the best epoch.
    pub repo_pixel_best: f64,
    /// anomalib's FastFlow, image AUROC.
    pub anomalib_image: f64,
    /// anomalib's FastFlow, pixel AUROC.
    pub anomalib_pixel: f64,
    /// Paper inference speed on a GTX 1080Ti, frames per second.
    pub paper_fps: f64,
}

/// Where the published numbers come from. They are copied from the project's
/// reference sheet (`../shared/REFERENCE.md`, "Published numbers"), which
/// records them from the three sources named here. Only means are published
/// there, so only the mean rows carry published columns.
pub const PUBLISHED_SOURCE: &str = "MVTec AD means as recorded in the project's reference sheet \
(shared/REFERENCE.md, \"Published numbers\"): paper = Yu et al. 2021, \"FastFlow: Unsupervised \
Anomaly Detection and Localization via 2D Normalizing Flows\", arXiv 2111.07677; reference repo = \
gathierry/FastFlow README (pixel AUROC, last epoch / best epoch); anomalib = the FastFlow model \
page of openvinotoolkit/anomalib. Paper speed: GTX 1080Ti.";

/// The published means, one entry per paper backbone (see [`PUBLISHED_SOURCE`]).
pub const PUBLISHED: [Published; 4] = [
    Published {
        backbone: "resnet18",
        paper_image: 97.9,
        paper_pixel: 97.2,
        repo_pixel_last: 95.6,
        repo_pixel_best: 97.2,
        anomalib_image: 90.7,
        anomalib_pixel: 96.8,
        paper_fps: 30.8,
    },
    Published {
        backbone: "wide_resnet50_2",
        paper_image: 99.3,
        paper_pixel: 98.1,
        repo_pixel_last: 97.2,
        repo_pixel_best: 98.3,
        anomalib_image: 96.3,
        anomalib_pixel: 97.9,
        paper_fps: 21.8,
    },
    Published {
        backbone: "deit",
        paper_image: 98.7,
        paper_pixel: 98.1,
        repo_pixel_last: 97.3,
        repo_pixel_best: 98.1,
        anomalib_image: 92.5,
        anomalib_pixel: 97.5,
        paper_fps: 30.1,
    },
    Published {
        backbone: "cait",
        paper_image: 99.4,
        paper_pixel: 98.5,
        repo_pixel_last: 97.3,
        repo_pixel_best: 98.3,
        anomalib_image: 94.4,
        anomalib_pixel: 98.0,
        paper_fps: 3.1,
    },
];

fn published(backbone: &str) -> Option<&'static Published> {
    PUBLISHED.iter().find(|p| p.backbone == backbone)
}

/// Our means for one backbone over the categories that finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackboneMeans {
    pub n_categories: usize,
    /// Means in percent, as the paper prints them.
    pub image_auroc: f64,
    pub pixel_auroc: f64,
    pub aupro: f64,
    /// Mean inference throughput (images/s) over the cells that report it.
    pub inference_img_per_s: Option<f64>,
    /// Sum of the cells' training times, seconds.
    pub train_seconds_total: f64,
}

/// The rendered report.
#[derive(Debug, Clone)]
pub struct Report {
    pub markdown: String,
    pub summary: serde_json::Value,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn pct(v: f64) -> String {
    format!("{:.1}", v)
}

/// A signed difference in percentage points. Rounding first keeps the sign
/// consistent with the printed numbers (no "-0.0").
fn delta(ours: f64, theirs: f64) -> String {
    let d = (ours * 10.0).round() / 10.0 - theirs;
    let d = (d * 10.0).round() / 10.0;
    if d == 0.0 {
        "0.0".to_string()
    } else {
        format!("{:+.1}", d)
    }
}

/// Which metric a table shows, and how to read it from a cell.
#[derive(Clone, Copy)]
enum Metric {
    ImageAuroc,
    PixelAuroc,
    Aupro,
}

impl Metric {
    fn of(self, r: &CellResult) -> f64 {
        100.0
            * match self {
                Metric::ImageAuroc => r.metrics.image_auroc,
                Metric::PixelAuroc => r.metrics.pixel_auroc,
                Metric::Aupro => r.metrics.aupro,
            }
    }

    fn title(self) -> &'static str {
        match self {
            Metric::ImageAuroc => "Image AUROC (%)",
            Metric::PixelAuroc => "Pixel AUROC (%)",
            Metric::Aupro => "AU-PRO (%, integrated to FPR 0.3)",
        }
    }

    /// The published mean rows for this metric: (row label, value).
    fn published_rows(self, p: &Published) -> Vec<(&'static str, f64)> {
        match self {
            Metric::ImageAuroc => vec![("paper", p.paper_image), ("anomalib", p.anomalib_image)],
            Metric::PixelAuroc => vec![
                ("paper", p.paper_pixel),
                ("reference repo, last epoch", p.repo_pixel_last),
                ("reference repo, best epoch", p.repo_pixel_best),
                ("anomalib", p.anomalib_pixel),
            ],
            Metric::Aupro => vec![],
        }
    }

    /// The labels of the published rows, whichever backbone has them.
    fn published_labels(self) -> Vec<&'static str> {
        self.published_rows(&PUBLISHED[0])
            .into_iter()
            .map(|(l, _)| l)
            .collect()
    }
}

/// Builds the report from the matrix that was asked for (cells without a
/// result show as "—" and are listed as missing) and the finished cells.
pub fn build(matrix: &[Cell], results: &[CellResult]) -> Report {
    let by_cell: BTreeMap<Cell, &CellResult> = results.iter().map(|r| (r.cell(), r)).collect();
    let mut backbones: Vec<String> = matrix
        .iter()
        .map(|c| c.backbone.clone())
        .chain(results.iter().map(|r| r.backbone.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    backbones.sort_by_key(|b| backbone_rank(b));
    let categories: Vec<String> = matrix
        .iter()
        .map(|c| c.category.clone())
        .chain(results.iter().map(|r| r.category.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let all_cells: BTreeSet<Cell> = matrix
        .iter()
        .cloned()
        .chain(results.iter().map(CellResult::cell))
        .collect();
    let missing: Vec<String> = all_cells
        .iter()
        .filter(|c| !by_cell.contains_key(c))
        .map(|c| c.to_string())
        .collect();

    let means: BTreeMap<String, BackboneMeans> = backbones
        .iter()
        .filter_map(|b| {
            let cells: Vec<&CellResult> = results.iter().filter(|r| &r.backbone == b).collect();
            let m = |metric: Metric| mean(cells.iter().map(|r| metric.of(r)));
            Some((
                b.clone(),
                BackboneMeans {
                    n_categories: cells.len(),
                    image_auroc: m(Metric::ImageAuroc)?,
                    pixel_auroc: m(Metric::PixelAuroc)?,
                    aupro: m(Metric::Aupro)?,
                    inference_img_per_s: mean(
                        cells.iter().filter_map(|r| r.metrics.inference_img_per_s),
                    ),
                    train_seconds_total: cells.iter().map(|r| r.metrics.train_seconds).sum(),
                },
            ))
        })
        .collect();

    let data: BTreeSet<&str> = results.iter().map(|r| r.data.as_str()).collect();
    let mut settings: Vec<&RunSettings> = Vec::new();
    for r in results {
        if !settings.contains(&&r.settings) {
            settings.push(&r.settings);
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# FastFlow benchmark: fastflow-rs against published numbers\n"
    );
    let _ = writeln!(
        md,
        "Made by `cargo xtask bench-all` / `cargo xtask bench-merge`. Cells finished: {} of {}.",
        by_cell.len(),
        all_cells.len()
    );
    if !missing.is_empty() {
        let _ = writeln!(md, "Missing cells (shown as —): {}.", missing.join(", "));
    }
    let _ = writeln!(
        md,
        "Data: {}.",
        if data.is_empty() {
            "none yet".to_string()
        } else {
            data.iter()
                .map(|d| format!("`{d}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    for s in &settings {
        let _ = writeln!(md, "Settings: {}.", describe_settings(s));
    }
    if settings.len() > 1 {
        let _ = writeln!(
            md,
            "\n> Warning: the cells were made with {} different settings; means mix them.",
            settings.len()
        );
    }
    if data.contains("synthetic") {
        let _ = writeln!(
            md,
            "\n> The data is synthetic. The published numbers are MVTec AD means and are shown \
             for orientation only; the differences mean nothing here."
        );
    }
    if means
        .values()
        .any(|m| m.n_categories < MVTEC_CATEGORY_COUNT)
    {
        let _ = writeln!(
            md,
            "\n> Our means average the categories that finished (row \"categories\"); the \
             published means average all {MVTEC_CATEGORY_COUNT} MVTec AD categories."
        );
    }

    for metric in [Metric::ImageAuroc, Metric::PixelAuroc, Metric::Aupro] {
        let _ = writeln!(md, "\n## {}\n", metric.title());
        let _ = writeln!(md, "| category | {} |", backbones.join(" | "));
        let _ = writeln!(md, "| --- |{}", " ---: |".repeat(backbones.len()));
        for cat in &categories {
            let row: Vec<String> = backbones
                .iter()
                .map(|b| {
                    let cell = Cell {
                        backbone: b.clone(),
                        category: cat.clone(),
                    };
                    match by_cell.get(&cell) {
                        Some(r) => pct(metric.of(r)),
                        None if all_cells.contains(&cell) => "—".into(),
                        None => "".into(),
                    }
                })
                .collect();
            let _ = writeln!(md, "| {cat} | {} |", row.join(" | "));
        }
        let our_mean = |b: &String| -> Option<f64> {
            means.get(b).map(|m| match metric {
                Metric::ImageAuroc => m.image_auroc,
                Metric::PixelAuroc => m.pixel_auroc,
                Metric::Aupro => m.aupro,
            })
        };
        let row: Vec<String> = backbones
            .iter()
            .map(|b| {
                our_mean(b)
                    .map(|v| format!("**{}**", pct(v)))
                    .unwrap_or("—".into())
            })
            .collect();
        let _ = writeln!(md, "| **mean (ours)** | {} |", row.join(" | "));
        let row: Vec<String> = backbones
            .iter()
            .map(|b| means.get(b).map_or(0, |m| m.n_categories).to_string())
            .collect();
        let _ = writeln!(md, "| categories | {} |", row.join(" | "));
        for label in metric.published_labels() {
            let value = |b: &String| {
                published(b).and_then(|p| {
                    metric
                        .published_rows(p)
                        .into_iter()
                        .find(|(l, _)| *l == label)
                        .map(|(_, v)| v)
                })
            };
            let row: Vec<String> = backbones
                .iter()
                .map(|b| value(b).map(pct).unwrap_or_default())
                .collect();
            let _ = writeln!(md, "| {label} (mean) | {} |", row.join(" | "));
            let row: Vec<String> = backbones
                .iter()
                .map(|b| match (our_mean(b), value(b)) {
                    (Some(o), Some(t)) => delta(o, t),
                    _ => String::new(),
                })
                .collect();
            let _ = writeln!(md, "| Δ ours − {label} | {} |", row.join(" | "));
        }
    }

    per_category_section(&mut md, &backbones, &categories, &by_cell, &all_cells);

    let _ = writeln!(md, "\n## Time and speed\n");
    let _ = writeln!(
        md,
        "| backbone | categories | training time, total (s) | training time per category (s) | inference (img/s, mean) | paper (FPS, GTX 1080Ti) |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |");
    for b in &backbones {
        let paper_fps = published(b).map(|p| pct(p.paper_fps)).unwrap_or_default();
        match means.get(b) {
            Some(m) => {
                let _ = writeln!(
                    md,
                    "| {b} | {} | {:.0} | {:.1} | {} | {paper_fps} |",
                    m.n_categories,
                    m.train_seconds_total,
                    m.train_seconds_total / m.n_categories as f64,
                    m.inference_img_per_s
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or("n/a".into()),
                );
            }
            None => {
                let _ = writeln!(md, "| {b} | 0 | — | — | — | {paper_fps} |");
            }
        }
    }
    let _ = writeln!(
        md,
        "\nOur training time is per cell as `fastflow train` reports it (the whole train \
         process when it reports none); inference speed is that of the final evaluation \
         on this machine, not a 1080Ti."
    );
    if !results.is_empty() {
        let _ = writeln!(
            md,
            "\n| cell | wall time (s) | training time (s) |\n| --- | ---: | ---: |"
        );
        let mut cells: Vec<&CellResult> = results.iter().collect();
        cells.sort_by_key(|r| (backbone_rank(&r.backbone), r.category.clone()));
        for r in cells {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} |",
                r.cell(),
                r.metrics.wall_seconds,
                r.metrics.train_seconds
            );
        }
        let _ = writeln!(
            md,
            "\nWall time is the whole `fastflow train` process of the cell (its last attempt), \
             evaluations and the feature cache's first epoch included."
        );
    }
    let resumed: Vec<String> = results
        .iter()
        .filter(|r| r.metrics.resumed)
        .map(|r| r.cell().to_string())
        .collect();
    if !resumed.is_empty() {
        let _ = writeln!(
            md,
            "Resumed after an interruption: {}. Their training time is fastflow's own, \
             which adds up the resumed parts; their wall time covers only the last attempt.",
            resumed.join(", ")
        );
    }
    let _ = writeln!(md, "\n## Sources\n\nMeans: {PUBLISHED_SOURCE}\n");
    let _ = writeln!(md, "Per category ({DAGGER} = selected on the test set):\n");
    for src in published::SOURCES {
        let mark = if src.selected_on_test_set { DAGGER } else { "" };
        let caveat = if src.caveat.is_empty() {
            String::new()
        } else {
            format!("; {}", src.caveat)
        };
        let _ = writeln!(md, "- **{}{mark}**: {}{caveat}.", src.key, src.origin);
    }

    let summary = serde_json::json!({
        "schema": 1,
        "matrix": all_cells.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "missing": missing,
        "data": data,
        "settings": settings,
        "cells": results.iter().map(|r| serde_json::json!({
            "backbone": r.backbone,
            "category": r.category,
            "image_auroc": r.metrics.image_auroc,
            "pixel_auroc": r.metrics.pixel_auroc,
            "aupro": r.metrics.aupro,
            "image_f1_max": r.metrics.image_f1_max,
            "inference_img_per_s": r.metrics.inference_img_per_s,
            "n_images": r.metrics.n_images,
            "train_seconds": r.metrics.train_seconds,
            "wall_seconds": r.metrics.wall_seconds,
            "resumed": r.metrics.resumed,
            "published_thousandths": published::lookup(&r.backbone, &r.category),
        })).collect::<Vec<_>>(),
        "means_percent": means,
        "published_percent": PUBLISHED,
        "published_source": PUBLISHED_SOURCE,
        "published_per_category_sources": published::SOURCES,
    });
    Report {
        markdown: md,
        summary,
    }
}

/// Marks a published number that was selected on the test set.
const DAGGER: &str = "†";

/// One table per backbone: our last-epoch numbers beside the published ones
/// for every MVTec AD category of the matrix. Nothing for other categories.
fn per_category_section(
    md: &mut String,
    backbones: &[String],
    categories: &[String],
    by_cell: &BTreeMap<Cell, &CellResult>,
    all_cells: &BTreeSet<Cell>,
) {
    let mut header_written = false;
    for b in backbones {
        let rows: Vec<(&String, published::Published)> = categories
            .iter()
            .filter(|c| {
                all_cells.contains(&Cell {
                    backbone: b.clone(),
                    category: (*c).clone(),
                })
            })
            .filter_map(|c| published::lookup(b, c).map(|p| (c, p)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        if !header_written {
            header_written = true;
            let _ = writeln!(
                md,
                "\n## Per category against published numbers\n\n\
                 Percent. Ours is the last epoch of this run, with no selection. \
                 {DAGGER} marks numbers selected on the test set (the reference's best epoch; \
                 anomalib's early stopping, checkpoint and F1 threshold). The paper's \
                 per-category values are attributed to CaiT by inference. Sources below."
            );
        }
        let paper = b == "cait";
        let _ = writeln!(md, "\n### {b}\n");
        let mut head = vec![
            "category".to_string(),
            "image AUROC: ours".into(),
            format!("anomalib{DAGGER}"),
        ];
        if paper {
            head.push("paper".into());
        }
        head.extend([
            "pixel AUROC: ours".to_string(),
            "ref last".into(),
            format!("ref best{DAGGER}"),
            format!("anomalib{DAGGER}"),
        ]);
        if paper {
            head.push("paper".into());
        }
        head.extend(["image F1: ours".to_string(), format!("anomalib{DAGGER}")]);
        let _ = writeln!(md, "| {} |", head.join(" | "));
        let _ = writeln!(md, "| --- |{}", " ---: |".repeat(head.len() - 1));
        for (cat, p) in rows {
            let r = by_cell.get(&Cell {
                backbone: b.clone(),
                category: cat.clone(),
            });
            let ours = |f: fn(&CellResult) -> Option<f64>| {
                r.and_then(|r| f(r))
                    .map(|v| pct(100.0 * v))
                    .unwrap_or_else(|| "—".into())
            };
            let mut row = vec![
                cat.clone(),
                ours(|r| Some(r.metrics.image_auroc)),
                published::pct(p.row.anomalib_image),
            ];
            if let Some(v) = p.paper_image.filter(|_| paper) {
                row.push(published::pct(v));
            }
            row.extend([
                ours(|r| Some(r.metrics.pixel_auroc)),
                published::pct(p.row.repo_pixel_last),
                published::pct(p.row.repo_pixel_best),
                published::pct(p.row.anomalib_pixel),
            ]);
            if let Some(v) = p.paper_pixel.filter(|_| paper) {
                row.push(published::pct(v));
            }
            row.extend([
                ours(|r| r.metrics.image_f1_max),
                published::pct(p.row.anomalib_image_f1),
            ]);
            let _ = writeln!(md, "| {} |", row.join(" | "));
        }
    }
}

fn describe_settings(s: &RunSettings) -> String {
    let mut parts = vec![
        format!("epochs {}", s.epochs),
        format!("weights `{}`", s.weights),
        match s.input_size {
            Some(n) => format!("input size {n} (overrides the config)"),
            None => "input size from the config".into(),
        },
        match s.batch_size {
            Some(n) => format!("batch size {n}"),
            None => "batch size: fastflow's default (32)".into(),
        },
        format!("seed {}", s.seed),
    ];
    if !s.extra_args.is_empty() {
        parts.push(format!("extra train args `{}`", s.extra_args.join(" ")));
    }
    parts.join(", ")
}

/// Writes `report.md` and `summary.json` into `out`, each atomically.
pub fn write(out: &Path, report: &Report) -> anyhow::Result<()> {
    write_atomic(&out.join("report.md"), report.markdown.as_bytes())?;
    let mut json = serde_json::to_string_pretty(&report.summary)?;
    json.push('\n');
    write_atomic(&out.join(SUMMARY_FILE), json.as_bytes())?;
    Ok(())
}

/// The matrix recorded in a results directory's `summary.json` (every cell the
/// run was asked for, including other shards' cells); empty when the file does
/// not exist, so that a merge still works on bare cell files.
pub fn read_matrix(results: &Path) -> anyhow::Result<Vec<Cell>> {
    let path = results.join(SUMMARY_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let ids = v["matrix"]
        .as_array()
        .with_context(|| format!("{} has no \"matrix\" list", path.display()))?;
    ids.iter()
        .map(|id| {
            let s = id.as_str().with_context(|| {
                format!("{}: matrix entry {id} is not a string", path.display())
            })?;
            let (b, c) = s.split_once('/').with_context(|| {
                format!(
                    "{}: matrix entry {s:?} is not backbone/category",
                    path.display()
                )
            })?;
            Ok(Cell {
                backbone: b.into(),
                category: c.into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::fake_result;

    #[test]
    fn published_numbers_match_the_reference_sheet() {
        // The same numbers as ../shared/REFERENCE.md, "Published numbers".
        let p = published("wide_resnet50_2").unwrap();
        assert_eq!((p.paper_image, p.paper_pixel), (99.3, 98.1));
        assert_eq!((p.repo_pixel_last, p.repo_pixel_best), (97.2, 98.3));
        assert_eq!((p.anomalib_image, p.anomalib_pixel), (96.3, 97.9));
        assert_eq!(published("cait").unwrap().paper_fps, 3.1);
        assert!(published("vgg").is_none());
    }

    #[test]
    fn deltas_are_rounded_and_signed() {
        assert_eq!(delta(97.94, 97.9), "0.0");
        assert_eq!(delta(98.26, 97.9), "+0.4");
        assert_eq!(delta(90.0, 90.7), "-0.7");
    }

    #[test]
    fn report_has_category_rows_mean_rows_and_published_columns() {
        let results = vec![
            fake_result("resnet18", "bottle", 0.02),
            fake_result("resnet18", "cable", 0.04),
            fake_result("wide_resnet50_2", "bottle", 0.06),
        ];
        let matrix = crate::plan::plan(
            &["resnet18".into(), "wide_resnet50_2".into()],
            &["bottle".into(), "cable".into()],
        )
        .unwrap();
        let r = build(&matrix, &results);
        let md = &r.markdown;
        assert!(
            md.contains("| category | resnet18 | wide_resnet50_2 |"),
            "{md}"
        );
        // image AUROC: 0.92 and 0.94 -> mean 93.0; wide: 96.0; missing cell as —.
        assert!(md.contains("| bottle | 92.0 | 96.0 |"), "{md}");
        assert!(md.contains("| cable | 94.0 | — |"), "{md}");
        assert!(
            md.contains("| **mean (ours)** | **93.0** | **96.0** |"),
            "{md}"
        );
        assert!(md.contains("| paper (mean) | 97.9 | 99.3 |"), "{md}");
        assert!(md.contains("| Δ ours − paper | -4.9 | -3.3 |"), "{md}");
        assert!(md.contains("| anomalib (mean) | 90.7 | 96.3 |"), "{md}");
        assert!(md.contains("| Δ ours − anomalib | +2.3 | -0.3 |"), "{md}");
        // Pixel AUROC carries the reference repo's last/best means.
        assert!(
            md.contains("| reference repo, last epoch (mean) | 95.6 | 97.2 |"),
            "{md}"
        );
        assert!(
            md.contains("| reference repo, best epoch (mean) | 97.2 | 98.3 |"),
            "{md}"
        );
        assert!(
            md.contains("Missing cells (shown as —): wide_resnet50_2/cable."),
            "{md}"
        );
        assert!(md.contains("The data is synthetic"), "{md}");
        assert!(md.contains(PUBLISHED_SOURCE));
        let s = &r.summary;
        assert_eq!(s["missing"][0], "wide_resnet50_2/cable");
        assert_eq!(s["means_percent"]["resnet18"]["n_categories"], 2);
        let m = s["means_percent"]["resnet18"]["image_auroc"]
            .as_f64()
            .unwrap();
        assert!((m - 93.0).abs() < 1e-9, "{m}");
        assert_eq!(s["cells"].as_array().unwrap().len(), 3);
        assert_eq!(s["matrix"].as_array().unwrap().len(), 4);
    }

    /// MVTec categories get a table per backbone with the published
    /// per-category numbers beside ours, test-set selections marked; CaiT
    /// also shows the paper's values; other categories get no such table.
    #[test]
    fn per_category_tables_show_published_numbers_with_sources() {
        let results = vec![
            fake_result("resnet18", "wood", 0.02),
            fake_result("cait", "screw", 0.04),
        ];
        let matrix = crate::plan::plan(
            &["resnet18".into(), "cait".into()],
            &["wood".into(), "screw".into()],
        )
        .unwrap();
        let r = build(&matrix, &results);
        let md = &r.markdown;
        assert!(
            md.contains("## Per category against published numbers"),
            "{md}"
        );
        assert!(
            md.contains(
                "| category | image AUROC: ours | anomalib† | pixel AUROC: ours | ref last | ref best† | anomalib† | image F1: ours | anomalib† |"
            ),
            "{md}"
        );
        // resnet18/wood: ours 92.0 / 96.0 / 85.0; G 0.894/0.954, A 0.956, 0.978, F1 0.983.
        assert!(
            md.contains("| wood | 92.0 | 97.8 | 96.0 | 89.4 | 95.4 | 95.6 | 85.0 | 98.3 |"),
            "{md}"
        );
        // resnet18/screw has no result of ours: dashes, published numbers still shown.
        assert!(
            md.contains("| screw | — | 52.1 | — | 95.2 | 95.7 | 92.6 | — | 85.3 |"),
            "{md}"
        );
        // cait/screw with the paper's columns: image 0.978, pixel 0.994.
        assert!(
            md.contains(
                "| screw | 94.0 | 79.1 | 97.8 | 97.0 | 99.1 | 99.3 | 97.9 | 99.4 | 85.0 | 97.9 |"
            ),
            "{md}"
        );
        for src in published::SOURCES {
            assert!(md.contains(src.origin), "source {} missing", src.key);
        }
        assert!(md.contains("- **ref best†**"), "{md}");
        assert!(md.contains("- **ref last**"), "{md}");
        // fake_result(x = 0.02): wall 12 + 100x seconds, training 10 + 100x.
        assert!(md.contains("| resnet18/wood | 14.0 | 12.0 |"), "{md}");
        let cells = r.summary["cells"].as_array().unwrap();
        let wood = cells.iter().find(|c| c["category"] == "wood").unwrap();
        assert_eq!(wood["published_thousandths"]["repo_pixel_last"], 894);

        // Synthetic categories: no per-category published table.
        let r = build(
            &crate::plan::plan(&["resnet18".into()], &["weave".into()]).unwrap(),
            &[fake_result("resnet18", "weave", 0.0)],
        );
        assert!(!r
            .markdown
            .contains("## Per category against published numbers"));
    }

    #[test]
    fn matrix_round_trips_through_summary_json() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_matrix(dir.path()).unwrap().is_empty());
        let matrix = crate::plan::plan(&["resnet18".into()], &["a".into(), "b".into()]).unwrap();
        write(dir.path(), &build(&matrix, &[])).unwrap();
        assert_eq!(read_matrix(dir.path()).unwrap(), matrix);
    }
}
