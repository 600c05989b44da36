//! One finished cell of the benchmark matrix as it is stored on disk
//! (`<results>/<backbone>/<category>.json`): writing it atomically, deciding
//! whether a stored one is complete and still matches the run's settings, and
//! collecting all of them from a results directory.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::plan::{check_name, Cell, RESERVED};

/// The machine-readable report of a results directory.
pub const SUMMARY_FILE: &str = "summary.json";

/// Version of the cell file layout; a file with another version is redone.
pub const CELL_SCHEMA: u32 = 1;

/// The settings a cell was produced with. A stored cell whose settings differ
/// from the current run's is stale and is run again, so that a results
/// directory never mixes, say, 2-epoch and 500-epoch numbers silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Training epochs (`fastflow train --epochs`).
    pub epochs: usize,
    /// Backbone weights (`hub`, `random` or a file).
    pub weights: String,
    /// Input size override written into a derived config; `None` = the config's own.
    pub input_size: Option<usize>,
    /// `fastflow train --batch-size`; `None` = the CLI's default (the reference's 32).
    pub batch_size: Option<usize>,
    /// `fastflow train --seed`.
    pub seed: u64,
    /// Further arguments passed to `fastflow train` verbatim.
    pub extra_args: Vec<String>,
}

/// What one `fastflow train` run measured, as the cell file stores it.
/// AUROC and AU-PRO values are fractions in [0, 1], as the CLI writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellMetrics {
    pub image_auroc: f64,
    pub pixel_auroc: f64,
    pub aupro: f64,
    pub image_f1_max: Option<f64>,
    /// Inference throughput of the final evaluation, images per second.
    pub inference_img_per_s: Option<f64>,
    /// Number of test images evaluated.
    pub n_images: Option<u64>,
    /// Training time in seconds: the CLI's own figure when its JSON has one,
    /// otherwise the wall time of the whole `train` process.
    pub train_seconds: f64,
    /// Wall time of the whole `fastflow train` process (training, periodic
    /// and final evaluation, checkpoints), seconds.
    pub wall_seconds: f64,
    /// The run continued from a checkpoint of an interrupted attempt: the
    /// wall time covers only the last attempt (fastflow's `train_seconds`
    /// adds up all parts).
    #[serde(default)]
    pub resumed: bool,
}

/// One finished cell: what was run, with which settings, and what came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    pub schema: u32,
    pub backbone: String,
    pub category: String,
    /// `synthetic` or the dataset root as given on the command line.
    pub data: String,
    pub settings: RunSettings,
    #[serde(flatten)]
    pub metrics: CellMetrics,
    /// The metrics JSON exactly as `fastflow train --json` wrote it, so that
    /// nothing the CLI reports is lost.
    pub fastflow_json: serde_json::Value,
}

impl CellResult {
    pub fn cell(&self) -> Cell {
        Cell {
            backbone: self.backbone.clone(),
            category: self.category.clone(),
        }
    }

    /// Checks what "complete" means for a cell file: the current layout,
    /// valid names, and finite metrics in range.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.schema != CELL_SCHEMA {
            bail!("schema {} where {CELL_SCHEMA} is expected", self.schema);
        }
        check_name("backbone", &self.backbone)?;
        check_name("category", &self.category)?;
        for (name, v) in [
            ("image_auroc", self.metrics.image_auroc),
            ("pixel_auroc", self.metrics.pixel_auroc),
            ("aupro", self.metrics.aupro),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} = {v} is not in [0, 1]");
            }
        }
        for (name, v) in [
            ("train_seconds", Some(self.metrics.train_seconds)),
            ("wall_seconds", Some(self.metrics.wall_seconds)),
            ("inference_img_per_s", self.metrics.inference_img_per_s),
            ("image_f1_max", self.metrics.image_f1_max),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    bail!("{name} = {v} is not a finite, non-negative number");
                }
            }
        }
        Ok(())
    }
}

/// Where a cell's files live under a results directory.
pub fn cell_json_path(results: &Path, cell: &Cell) -> PathBuf {
    results
        .join(&cell.backbone)
        .join(format!("{}.json", cell.category))
}

/// The run directory `fastflow train --out` gets for a cell (checkpoints, logs).
pub fn cell_run_dir(results: &Path, cell: &Cell) -> PathBuf {
    results
        .join("runs")
        .join(&cell.backbone)
        .join(&cell.category)
}

/// The state of a cell's file before a run.
#[derive(Debug)]
pub enum StoredCell {
    /// No file: the cell has never finished.
    Missing,
    /// A complete result with the current settings: skip the cell.
    Finished(Box<CellResult>),
    /// A file that cannot be used (unreadable, incomplete, other settings);
    /// the reason is shown and the cell is run again.
    Redo(String),
}

/// Reads a cell's stored result and decides whether the run can skip it.
pub fn check_stored(results: &Path, cell: &Cell, settings: &RunSettings, data: &str) -> StoredCell {
    let path = cell_json_path(results, cell);
    if !path.exists() {
        return StoredCell::Missing;
    }
    let stored = match read_cell(&path) {
        Ok(r) => r,
        Err(e) => return StoredCell::Redo(format!("{:#}", e)),
    };
    if stored.cell() != *cell {
        return StoredCell::Redo(format!(
            "{} holds the result of {}",
            path.display(),
            stored.cell()
        ));
    }
    if stored.settings != *settings {
        return StoredCell::Redo(format!(
            "{} was made with other settings ({:?}, now {:?})",
            path.display(),
            stored.settings,
            settings
        ));
    }
    if stored.data != data {
        return StoredCell::Redo(format!(
            "{} was made on other data ({:?}, now {:?})",
            path.display(),
            stored.data,
            data
        ));
    }
    StoredCell::Finished(Box::new(stored))
}

/// Reads and validates one cell file.
pub fn read_cell(path: &Path) -> anyhow::Result<CellResult> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let result: CellResult = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a complete cell result", path.display()))?;
    result
        .validate()
        .with_context(|| format!("{} is not a valid cell result", path.display()))?;
    Ok(result)
}

/// Writes `bytes` to `path` so that a reader (or a rerun after a crash or a
/// kill) sees either the old file or the whole new one, never a torn write
/// ([`ff_data::fs::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(ff_data::fs::write_atomic(path, bytes)?)
}

/// Stores a cell's result at its place under `results`, atomically.
pub fn write_cell(results: &Path, result: &CellResult) -> anyhow::Result<PathBuf> {
    result
        .validate()
        .with_context(|| format!("refusing to store an invalid result for {}", result.cell()))?;
    let path = cell_json_path(results, &result.cell());
    let mut text = serde_json::to_string_pretty(result)?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Every cell file found under a results directory
/// (`<results>/<backbone>/<category>.json`), sorted by cell. A file that is
/// there but broken is an error naming it, so a merge never drops a cell
/// silently. The `runs` folder (training runs) is not a backbone, nor is a
/// folder holding a `summary.json` (a shard's results inside the merged ones).
pub fn collect_cells(results: &Path) -> anyhow::Result<Vec<CellResult>> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(results).with_context(|| format!("cannot read {}", results.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", results.display()))?;
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // A folder with its own summary is a nested results directory (the
        // shards of `bench-merge --out results --inputs results/shard-0,...`),
        // not a backbone.
        if !dir.is_dir()
            || RESERVED.contains(&name.as_str())
            || name.starts_with('.')
            || dir.join(SUMMARY_FILE).exists()
        {
            continue;
        }
        let files = fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for file in files {
            let file = file.with_context(|| format!("cannot read {}", dir.display()))?;
            let path = file.path();
            let fname = file.file_name().to_string_lossy().into_owned();
            if fname.starts_with('.') || path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let result = read_cell(&path)?;
            if result.backbone != name
                || Some(result.category.as_str()) != path.file_stem().and_then(|s| s.to_str())
            {
                bail!(
                    "{} holds the result of {}, which belongs elsewhere",
                    path.display(),
                    result.cell()
                );
            }
            out.push(result);
        }
    }
    out.sort_by_key(|r| r.cell());
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn settings() -> RunSettings {
        RunSettings {
            epochs: 2,
            weights: "random".into(),
            input_size: Some(64),
            batch_size: None,
            seed: 0,
            extra_args: vec![],
        }
    }

    pub(crate) fn fake_result(backbone: &str, category: &str, x: f64) -> CellResult {
        CellResult {
            schema: CELL_SCHEMA,
            backbone: backbone.into(),
            category: category.into(),
            data: "synthetic".into(),
            settings: settings(),
            metrics: CellMetrics {
                image_auroc: 0.9 + x,
                pixel_auroc: 0.95 + x / 2.0,
                aupro: 0.8 + x,
                image_f1_max: Some(0.85),
                inference_img_per_s: Some(12.5),
                n_images: Some(30),
                train_seconds: 10.0 + 100.0 * x,
                wall_seconds: 12.0 + 100.0 * x,
                resumed: false,
            },
            fastflow_json: serde_json::json!({"image_auroc": 0.9 + x}),
        }
    }

    #[test]
    fn write_then_check_skips_only_matching_complete_cells() {
        let dir = tempfile::tempdir().unwrap();
        let r = fake_result("resnet18", "bottle", 0.01);
        let cell = r.cell();
        assert!(matches!(
            check_stored(dir.path(), &cell, &settings(), "synthetic"),
            StoredCell::Missing
        ));
        let path = write_cell(dir.path(), &r).unwrap();
        assert_eq!(path, dir.path().join("resnet18").join("bottle.json"));
        match check_stored(dir.path(), &cell, &settings(), "synthetic") {
            StoredCell::Finished(stored) => assert_eq!(*stored, r),
            other => panic!("expected Finished, got {other:?}"),
        }
        // Other settings or other data: the cell is redone, not reused.
        let mut other = settings();
        other.epochs = 500;
        assert!(matches!(
            check_stored(dir.path(), &cell, &other, "synthetic"),
            StoredCell::Redo(_)
        ));
        assert!(matches!(
            check_stored(dir.path(), &cell, &settings(), "data/mvtec"),
            StoredCell::Redo(_)
        ));
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(dir.path().join("resnet18"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["bottle.json"]);
    }

    #[test]
    fn truncated_or_incomplete_files_are_redone() {
        let dir = tempfile::tempdir().unwrap();
        let r = fake_result("resnet18", "bottle", 0.01);
        let path = write_cell(dir.path(), &r).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        // A torn write (as if killed mid-write without the atomic rename).
        fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            check_stored(dir.path(), &r.cell(), &settings(), "synthetic"),
            StoredCell::Redo(_)
        ));
        // Valid JSON with a metric missing.
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_object_mut().unwrap().remove("aupro");
        fs::write(&path, v.to_string()).unwrap();
        match check_stored(dir.path(), &r.cell(), &settings(), "synthetic") {
            StoredCell::Redo(why) => assert!(why.contains("aupro"), "{why}"),
            other => panic!("expected Redo, got {other:?}"),
        }
        // A metric out of range.
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["image_auroc"] = serde_json::json!(97.5);
        fs::write(&path, v.to_string()).unwrap();
        assert!(matches!(
            check_stored(dir.path(), &r.cell(), &settings(), "synthetic"),
            StoredCell::Redo(_)
        ));
    }

    #[test]
    fn collect_finds_all_cells_and_names_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        for (b, c) in [
            ("resnet18", "cable"),
            ("resnet18", "bottle"),
            ("deit", "bottle"),
        ] {
            write_cell(dir.path(), &fake_result(b, c, 0.0)).unwrap();
        }
        // Run folders and non-JSON files are not cells.
        fs::create_dir_all(dir.path().join("runs/resnet18/bottle")).unwrap();
        fs::write(dir.path().join("resnet18/notes.txt"), "x").unwrap();
        let cells: Vec<String> = collect_cells(dir.path())
            .unwrap()
            .iter()
            .map(|r| r.cell().to_string())
            .collect();
        assert_eq!(cells, ["deit/bottle", "resnet18/bottle", "resnet18/cable"]);

        fs::write(dir.path().join("deit/cable.json"), "{").unwrap();
        let err = format!("{:#}", collect_cells(dir.path()).unwrap_err());
        assert!(err.contains("cable.json"), "{err}");
    }
}
