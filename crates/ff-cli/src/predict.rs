//! `fastflow predict`: per image the anomaly score and label, a heatmap
//! overlay and a binary mask at the image's own size, and one CSV. An
//! unreadable image is reported and skipped; the others are still predicted.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use ff_data::{decode_rgb, Preprocess};
use image::RgbImage;
use rayon::prelude::*;

use crate::cli::PredictArgs;
use crate::engine::{open_model, Engine, OpenedModel};
use crate::heatmap::{binary_mask, overlay, resize_bilinear, save_png};
use crate::report::{predictions_csv, PredictionRow};

/// How images are scored and drawn.
#[derive(Debug, Clone)]
pub struct PredictSettings {
    /// Image-score threshold; `None` leaves labels undecided.
    pub threshold: Option<f32>,
    /// Pixel threshold of the binary masks.
    pub pixel_threshold: Option<f32>,
    /// Colour scale of the heatmaps; `None` scales each image on its own.
    pub map_range: Option<[f32; 2]>,
    pub batch_size: usize,
}

/// What predicting a list of images produced.
#[derive(Debug, Clone)]
pub struct PredictOutcome {
    pub rows: Vec<PredictionRow>,
    pub csv: PathBuf,
}

/// What `fastflow predict` does, resolved from its flags: the model opened,
/// the images to score, where the outputs go, and the thresholds (the
/// flag's, else the checkpoint's).
pub struct PredictPlan {
    pub opened: OpenedModel,
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub settings: PredictSettings,
}

impl PredictPlan {
    /// Checks `--out` first (an unwritable folder fails before the model
    /// loads), opens the model and resolves the thresholds.
    pub fn from_args(args: PredictArgs) -> Result<Self> {
        crate::fsutil::ensure_writable_dir(&args.out, "output directory")?;
        let opened = open_model(&args.model)?;
        let meta = opened.meta.as_ref();
        let threshold = args
            .threshold
            .or(meta.and_then(|m| m.threshold).map(|t| t as f32));
        if threshold.is_none() {
            let source = if meta.is_some() {
                "the checkpoint carries"
            } else {
                "a reference .pt file carries"
            };
            eprintln!("note: {source} no threshold; labels stay 'n/a' unless you pass --threshold");
        }
        let settings = PredictSettings {
            threshold,
            // An explicit --threshold applies to masks too; otherwise the
            // pixel F1-max threshold of the checkpoint's evaluation.
            pixel_threshold: args
                .threshold
                .or(meta.and_then(|m| m.pixel_threshold).map(|t| t as f32))
                .or(threshold),
            map_range: meta.and_then(|m| m.map_range),
            batch_size: args.model.batch_size,
        };
        Ok(Self {
            opened,
            inputs: args.inputs,
            out: args.out,
            settings,
        })
    }
}

/// `fastflow predict`.
pub fn run_predict(args: PredictArgs) -> Result<()> {
    run_predict_plan(&PredictPlan::from_args(args)?)
}

/// Scores the plan's images, writes heatmaps, masks and `predictions.csv`;
/// unreadable inputs become failed rows, and only all of them failing is an
/// error.
pub fn run_predict_plan(plan: &PredictPlan) -> Result<()> {
    let settings = &plan.settings;
    let (images, mut missing) = collect_inputs(&plan.inputs);
    let outcome = predict(&plan.opened.engine, &images, &plan.out, settings)?;
    let mut rows = outcome.rows;
    rows.append(&mut missing);
    let failed = rows.iter().filter(|r| !r.error.is_empty()).count();
    let csv_text = predictions_csv(&rows, settings.threshold);
    crate::fsutil::write_atomic(&outcome.csv, csv_text.as_bytes())?;
    for r in &rows {
        match r.score {
            Some(s) => println!("{:>10}  {:+.6}  {}", r.label, s, r.path),
            None => eprintln!("skipped {}: {}", r.path, r.error),
        }
    }
    println!("predictions: {}", outcome.csv.display());
    println!("heatmaps and masks: {}", plan.out.display());
    anyhow::ensure!(
        rows.len() > failed,
        "none of the {} inputs could be predicted",
        rows.len()
    );
    if failed > 0 {
        eprintln!(
            "warning: {failed} of {} inputs could not be read and were skipped (see the CSV)",
            rows.len()
        );
    }
    Ok(())
}

/// Expands directories (their image files, sorted) and reports missing paths
/// as failed rows.
pub fn collect_inputs(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<PredictionRow>) {
    let mut images = Vec::new();
    let mut failed = Vec::new();
    for input in inputs {
        if input.is_dir() {
            match ff_data::list_images(input) {
                Ok(list) => images.extend(list),
                Err(e) => failed.push(failed_row(input, &format!("{e:#}"))),
            }
        } else if input.exists() {
            images.push(input.clone());
        } else {
            failed.push(failed_row(input, "no such file or directory"));
        }
    }
    (images, failed)
}

fn failed_row(path: &Path, error: &str) -> PredictionRow {
    PredictionRow {
        path: path.display().to_string(),
        score: None,
        label: "error",
        heatmap: String::new(),
        mask: String::new(),
        error: error.to_string(),
    }
}

/// Output names per input: the file stem; when stems repeat (e.g. `000.png`
/// in several defect folders), `<parent>_<stem>`, then a numeric suffix.
fn output_stems(images: &[PathBuf]) -> Vec<String> {
    let stem_of = |p: &PathBuf| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    };
    let mut counts = std::collections::HashMap::new();
    for p in images {
        *counts.entry(stem_of(p)).or_insert(0usize) += 1;
    }
    let mut seen = HashSet::new();
    images
        .iter()
        .map(|p| {
            let stem = stem_of(p);
            let base = match p.parent().and_then(|d| d.file_name()) {
                Some(parent) if counts[&stem] > 1 => format!("{}_{stem}", parent.to_string_lossy()),
                _ => stem,
            };
            let mut name = base.clone();
            let mut k = 2;
            while !seen.insert(name.clone()) {
                name = format!("{base}-{k}");
                k += 1;
            }
            name
        })
        .collect()
}

/// Scores `images`, writes `<stem>_heatmap.png` and `<stem>_mask.png` into
/// `out`, and returns one row per image (the CSV is the caller's to write at
/// `PredictOutcome::csv`).
pub fn predict(
    engine: &Engine,
    images: &[PathBuf],
    out: &Path,
    settings: &PredictSettings,
) -> Result<PredictOutcome> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory '{}'", out.display()))?;
    let size = engine.config().input_size;
    let preprocess = Preprocess::imagenet(size);
    let stems = output_stems(images);
    let mut rows = Vec::with_capacity(images.len());
    let batch_size = settings.batch_size.max(1);
    for (chunk, chunk_stems) in images.chunks(batch_size).zip(stems.chunks(batch_size)) {
        // Decoding is the slow part for large photos: in parallel.
        let decoded: Vec<Result<RgbImage, String>> = chunk
            .par_iter()
            .map(|p| decode_rgb(p).map_err(|e| format!("{e:#}")))
            .collect();
        let ok: Vec<usize> = (0..chunk.len()).filter(|&i| decoded[i].is_ok()).collect();
        let mut maps = Vec::new();
        if !ok.is_empty() {
            let mut data = Vec::with_capacity(ok.len() * 3 * size * size);
            for &i in &ok {
                if let Ok(img) = &decoded[i] {
                    data.extend_from_slice(&preprocess.preprocess_rgb(img).data);
                }
            }
            let x = Tensor::from_vec(data, (ok.len(), 3, size, size), &engine.device)?;
            maps = engine.anomaly_maps(&x)?;
        }
        let mut k = 0;
        for (i, (path, stem)) in chunk.iter().zip(chunk_stems).enumerate() {
            let img = match &decoded[i] {
                Ok(img) => img,
                Err(e) => {
                    rows.push(failed_row(path, e));
                    continue;
                }
            };
            let map = &maps[k * size * size..(k + 1) * size * size];
            k += 1;
            let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let label = match settings.threshold {
                Some(t) if score >= t => "anomalous",
                Some(_) => "normal",
                None => "n/a",
            };
            let (w, h) = img.dimensions();
            // The model saw the image squeezed to a square; stretching the map
            // back to the original size undoes exactly that.
            let full = resize_bilinear(map, size, size, h as usize, w as usize);
            let [lo, hi] = settings.map_range.unwrap_or_else(|| {
                let lo = full.iter().copied().fold(f32::INFINITY, f32::min);
                [lo, score]
            });
            let heatmap = out.join(format!("{stem}_heatmap.png"));
            let mask = out.join(format!("{stem}_mask.png"));
            save_png(&overlay(img, &full, lo, hi), &heatmap)?;
            let mask_threshold = settings.pixel_threshold.unwrap_or(f32::INFINITY);
            save_png(&binary_mask(&full, w, h, mask_threshold), &mask)?;
            rows.push(PredictionRow {
                path: path.display().to_string(),
                score: Some(score),
                label,
                heatmap: heatmap.display().to_string(),
                mask: mask.display().to_string(),
                error: String::new(),
            });
        }
    }
    Ok(PredictOutcome {
        rows,
        csv: out.join("predictions.csv"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_are_unique_and_readable() {
        let images: Vec<PathBuf> = [
            "t/good/000.png",
            "t/hole/000.png",
            "t/hole/001.png",
            "u/hole/000.png",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(
            output_stems(&images),
            vec!["good_000", "hole_000", "001", "hole_000-2"]
        );
    }
}
