//! Our checkpoint format and the run-directory layout.
//!
//! A checkpoint `<dir>/<name>` is three files written atomically:
//! `<name>.safetensors` (LayerNorms, flows and permutations under the
//! reference's state-dict keys), `<name>.optim.safetensors` (Adam's moments)
//! and `<name>.json` (config, epoch, seed, metrics, threshold, optimizer step).
//! The JSON is written last and records a hash of the other two, so a run
//! killed between the writes leaves a checkpoint that is reported as
//! inconsistent instead of silently mixing two epochs.
//!
//! A run directory holds `checkpoints/{last,best}.*`, `eval_log.jsonl` (one
//! line per evaluation), `train_log.jsonl` (one line per epoch) and `report.md`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ff_flow::FastFlowConfig;
use serde::{Deserialize, Serialize};

use crate::data::DatasetFormat;
use crate::fsutil::{stage, stage_shared};
use crate::report::Metrics;

/// The `format` value of our checkpoint metadata, so that other JSON files are
/// rejected with a clear message.
pub const FORMAT: &str = "fastflow-rs checkpoint v1";

/// Adam's hyperparameters and progress, as saved with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerMeta {
    /// Always `adam` (PyTorch semantics: L2 weight decay added to the gradient).
    pub kind: String,
    /// Optimizer steps taken so far (Adam's bias correction depends on it).
    pub step: u64,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// What the run was trained on and with, so `--resume` can continue it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainMeta {
    pub data: PathBuf,
    pub category: String,
    pub format: DatasetFormat,
    pub batch_size: usize,
    /// The total number of epochs the run was started for.
    pub epochs: usize,
    pub eval_every: usize,
    /// Whether training images were augmented (`--augment`); absent in
    /// checkpoints from before the flag, which never augmented.
    #[serde(default)]
    pub augment: bool,
}

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    pub format: String,
    pub config: FastFlowConfig,
    /// The backbone's weight source: `hub:<repo>`, `random:<seed>`,
    /// `deterministic` or a `.safetensors` path.
    pub backbone_weights: String,
    /// Epochs completed.
    pub epoch: usize,
    /// The run's seed (flow init, permutations, data order).
    pub seed: u64,
    /// The latest evaluation of these weights, if any.
    pub metrics: Option<Metrics>,
    /// Image-score threshold for `predict` (F1-max threshold of `metrics`).
    pub threshold: Option<f64>,
    /// Pixel-score threshold for predicted masks.
    pub pixel_threshold: Option<f64>,
    /// Lowest and highest anomaly-map value seen in the evaluation: the colour
    /// scale of heatmaps, so that pictures of different images compare.
    pub map_range: Option<[f32; 2]>,
    /// The best `[image AUROC, pixel AUROC]` of the run so far: `best` is
    /// replaced when image AUROC improves, or stays equal while pixel AUROC
    /// improves (image AUROC saturates at 1.0 on easy categories).
    pub best_score: Option<[f64; 2]>,
    pub optimizer: OptimizerMeta,
    pub train: TrainMeta,
    /// Seconds spent training up to this checkpoint, over all resumed parts.
    pub train_seconds: f64,
    /// File names (in the same directory) and FNV-1a 64 hashes of the tensors.
    pub weights_file: String,
    pub weights_hash: String,
    pub optimizer_file: String,
    pub optimizer_hash: String,
}

/// The three files of checkpoint `<dir>/<name>`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPaths {
    pub weights: PathBuf,
    pub optimizer: PathBuf,
    pub meta: PathBuf,
}

impl CheckpointPaths {
    /// The files of the checkpoint called `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            weights: dir.join(format!("{name}.safetensors")),
            optimizer: dir.join(format!("{name}.optim.safetensors")),
            meta: dir.join(format!("{name}.json")),
        }
    }

    /// The files of the checkpoint a user named: any of its files, or a run
    /// directory (or its `checkpoints` folder), which names its checkpoint
    /// `name` (`best` to evaluate, `last` to resume).
    pub fn from_user_path_or_run(path: &Path, name: &str) -> Self {
        if path.is_dir() {
            let inner = path.join("checkpoints");
            let dir = if inner.is_dir() {
                inner
            } else {
                path.to_path_buf()
            };
            return Self::new(&dir, name);
        }
        Self::from_user_path(path)
    }

    /// The files of the checkpoint a user named by any of its files.
    pub fn from_user_path(path: &Path) -> Self {
        let dir = path.parent().unwrap_or(Path::new(""));
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = file
            .strip_suffix(".optim.safetensors")
            .or_else(|| file.strip_suffix(".safetensors"))
            .or_else(|| file.strip_suffix(".json"))
            .unwrap_or(&file);
        Self::new(dir, name)
    }
}

/// Which kind of checkpoint a path names.
pub enum CheckpointKind {
    /// One of ours.
    Ours(CheckpointPaths),
    /// A `torch.save` file of gathierry/FastFlow.
    Reference(PathBuf),
}

impl CheckpointKind {
    /// What `--checkpoint` names: a reference `.pt`, or one of ours by any
    /// of its files or by its run directory (then its `best` checkpoint).
    pub fn of(path: &Path) -> Self {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("pt") | Some("pth") | Some("tar") => Self::Reference(path.to_path_buf()),
            _ => Self::Ours(CheckpointPaths::from_user_path_or_run(path, "best")),
        }
    }
}

/// FNV-1a over a file's bytes, as 16 hex digits: cheap, and enough to notice
/// a torn or foreign file (this is no defence against tampering).
pub fn file_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    Ok(bytes_hash(&bytes))
}

/// [`file_hash`] of a file holding `bytes`.
pub fn bytes_hash(bytes: &[u8]) -> String {
    format!("{:016x}", ff_data::hash::fnv1a64(bytes))
}

/// A checkpoint's two tensor files in memory with their hashes, computed
/// once however many checkpoints (`last`, `best`) they are saved as.
pub struct CheckpointBytes<'a> {
    weights: &'a [u8],
    optimizer: &'a [u8],
    weights_hash: String,
    optimizer_hash: String,
}

impl<'a> CheckpointBytes<'a> {
    pub fn new(weights: &'a [u8], optimizer: &'a [u8]) -> Self {
        Self {
            weights,
            optimizer,
            weights_hash: bytes_hash(weights),
            optimizer_hash: bytes_hash(optimizer),
        }
    }
}

/// Writes checkpoint `paths` without ever damaging the one already there:
/// the tensors and the metadata (made by `meta` from the two tensor-file
/// hashes) are all written and synced under temporary names first; only then
/// do they replace the old files, metadata last. A write that fails (a full
/// disk) leaves the previous checkpoint whole and loadable, and the error
/// names the file and the checkpoint.
///
/// With `shared`, a checkpoint just written from the same `bytes`, the
/// tensor files are hard links to its files where the file system allows
/// (CaiT's and DeiT's flows are 180 MB per checkpoint; `best` is usually
/// the `last` of the same epoch). Each later save renames new files into
/// place, so the two never change together.
pub fn write_checkpoint(
    paths: &CheckpointPaths,
    shared: Option<&CheckpointPaths>,
    bytes: &CheckpointBytes,
    meta: impl FnOnce(String, String) -> CheckpointMeta,
) -> Result<()> {
    let meta = meta(bytes.weights_hash.clone(), bytes.optimizer_hash.clone());
    let mut json = serde_json::to_string_pretty(&meta)
        .with_context(|| format!("cannot serialise '{}'", paths.meta.display()))?;
    json.push('\n');
    let tensor_file = |path: &Path, existing: Option<&PathBuf>, content: &[u8]| match existing {
        Some(existing) => stage_shared(path, existing, content),
        None => stage(path, content),
    };
    let staged = (|| {
        Ok::<_, anyhow::Error>([
            tensor_file(&paths.weights, shared.map(|s| &s.weights), bytes.weights)?,
            tensor_file(
                &paths.optimizer,
                shared.map(|s| &s.optimizer),
                bytes.optimizer,
            )?,
            stage(&paths.meta, json.as_bytes())?,
        ])
    })()
    .with_context(|| {
        let kept = if paths.meta.exists() {
            "; the previous checkpoint there is unchanged"
        } else {
            ""
        };
        format!("cannot save checkpoint '{}'{kept}", paths.meta.display())
    })?;
    for file in staged {
        file.commit()
            .with_context(|| format!("cannot save checkpoint '{}'", paths.meta.display()))?;
    }
    Ok(())
}

/// Reads and checks a checkpoint's metadata: format, hashes of its tensor files.
pub fn read_meta(paths: &CheckpointPaths) -> Result<CheckpointMeta> {
    let text = std::fs::read_to_string(&paths.meta).with_context(|| {
        format!(
            "cannot read checkpoint metadata '{}' (a checkpoint of ours is a .safetensors file with a .json beside it; \
             for a reference .pt file pass the .pt path and --config)",
            paths.meta.display()
        )
    })?;
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .with_context(|| format!("corrupt checkpoint metadata '{}'", paths.meta.display()))?;
    if meta.format != FORMAT {
        bail!(
            "'{}' is not a fastflow-rs checkpoint (format '{}', expected '{FORMAT}')",
            paths.meta.display(),
            meta.format
        );
    }
    for (file, expected) in [
        (&paths.weights, &meta.weights_hash),
        (&paths.optimizer, &meta.optimizer_hash),
    ] {
        let found = file_hash(file)
            .with_context(|| format!("checkpoint '{}' is incomplete", paths.meta.display()))?;
        if &found != expected {
            bail!(
                "checkpoint file '{}' does not match its metadata '{}' (hash {found}, expected {expected}): \
                 the checkpoint is corrupt or its files come from different saves",
                file.display(),
                paths.meta.display()
            );
        }
    }
    Ok(meta)
}

/// The paths of a run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn last(&self) -> CheckpointPaths {
        CheckpointPaths::new(&self.checkpoints(), "last")
    }
    pub fn best(&self) -> CheckpointPaths {
        CheckpointPaths::new(&self.checkpoints(), "best")
    }
    pub fn eval_log(&self) -> PathBuf {
        self.root.join("eval_log.jsonl")
    }
    pub fn train_log(&self) -> PathBuf {
        self.root.join("train_log.jsonl")
    }
    pub fn report(&self) -> PathBuf {
        self.root.join("report.md")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_file_of_a_checkpoint_names_all_three() {
        let expected = CheckpointPaths::new(Path::new("runs/x/checkpoints"), "best");
        for p in [
            "best.safetensors",
            "best.json",
            "best.optim.safetensors",
            "best",
        ] {
            let got = CheckpointPaths::from_user_path(&Path::new("runs/x/checkpoints").join(p));
            assert_eq!(got, expected, "{p}");
        }
        assert!(matches!(
            CheckpointKind::of(Path::new("a/b.pt")),
            CheckpointKind::Reference(_)
        ));
        assert!(matches!(
            CheckpointKind::of(Path::new("a/b.safetensors")),
            CheckpointKind::Ours(_)
        ));
    }

    #[test]
    fn a_run_directory_names_its_best_or_last_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("checkpoints"))?;
        let expected = CheckpointPaths::new(&run.join("checkpoints"), "best");
        for p in [run.clone(), run.join("checkpoints")] {
            match CheckpointKind::of(&p) {
                CheckpointKind::Ours(paths) => assert_eq!(paths, expected, "{}", p.display()),
                CheckpointKind::Reference(_) => panic!("{} read as a .pt", p.display()),
            }
        }
        assert_eq!(
            CheckpointPaths::from_user_path_or_run(&run, "last"),
            CheckpointPaths::new(&run.join("checkpoints"), "last")
        );
        Ok(())
    }

    #[test]
    fn hash_changes_with_content() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let a = dir.path().join("a");
        std::fs::write(&a, b"abc")?;
        let h1 = file_hash(&a)?;
        std::fs::write(&a, b"abd")?;
        assert_ne!(h1, file_hash(&a)?);
        Ok(())
    }
}
