//! The command-line surface of `fastflow`: every subcommand and flag, with the
//! reference's training defaults. Flag names are part of the public interface
//! (scripts and `cargo xtask bench-all` depend on them).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::data::DataArgs;

/// FastFlow anomaly detection (Yu et al. 2021): train, evaluate and apply
/// models on MVTec AD or your own images.
#[derive(Debug, Parser)]
#[command(name = "fastflow", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a FastFlow model on the normal images of one category.
    Train(TrainArgs),
    /// Evaluate a checkpoint (ours or a reference `.pt`) on a test set.
    Eval(EvalArgs),
    /// Score images, write heatmap overlays, binary masks and a CSV summary.
    Predict(PredictArgs),
    /// Offline end-to-end demo: synthetic data, brief training, evaluation, heatmaps.
    Demo(DemoArgs),
    /// Measure training-step and inference throughput (images/s) with random weights.
    Bench(BenchArgs),
}

/// Where tensors live. CUDA needs the binary built with `--features cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// `--device`: every command that runs a model takes it.
#[derive(Debug, Clone, Copy, Args)]
pub struct DeviceFlag {
    /// Where the model runs (`cuda`: the first GPU; needs a build with
    /// `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// `--json`: every command with results to report takes it.
#[derive(Debug, Clone, Args)]
pub struct JsonFlag {
    /// Also write the results as JSON to this file (`train`: the final
    /// evaluation's metrics; `eval`: the metrics; `bench`: the measurements).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Where `train` keeps the backbone features it computes once and reuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FeatureCacheArg {
    /// In memory when the features fit the budget, else on disk.
    Auto,
    /// In memory; an error when the features do not fit the budget.
    Ram,
    /// In a file of the run directory, removed at the end.
    Disk,
    /// Run the backbone on every batch of every epoch.
    Off,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Model config with the reference YAML keys (e.g. `configs/resnet18.yaml`);
    /// optional with `--resume` (then checked against the checkpoint's).
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Number of epochs (reference: 500).
    #[arg(long, default_value_t = 500)]
    pub epochs: usize,
    /// Images per training batch [default: 32, the reference's; with `--resume`:
    /// the checkpoint's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Adam learning rate [default: 1e-3; with `--resume`: the checkpoint's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Adam L2 weight decay, added to the gradient as PyTorch does [default:
    /// 1e-5; with `--resume`: the checkpoint's].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Evaluate and checkpoint every N epochs; training always ends with an
    /// evaluation [default: 10; with `--resume`: the checkpoint's].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Seed for the flow initialisation, permutations, random backbone and data
    /// order (a resumed run keeps the checkpoint's).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Backbone weights: `hub` (Hugging Face, cached), `random` (seeded timm-style
    /// init) or a path to a `.safetensors` file.
    #[arg(long, default_value = "hub")]
    pub weights: String,
    /// Run directory (checkpoints, logs, report). Default: `runs/<config>-<category>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue exactly from a checkpoint written by `fastflow train` (or from
    /// a run directory's last checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub report: JsonFlag,
    #[command(flatten)]
    pub run_on: DeviceFlag,
    /// Compute each image's backbone features once and reuse them in every
    /// later epoch and evaluation (the backbone is frozen). The results are
    /// bit-identical to `off`.
    #[arg(long, value_enum, default_value_t = FeatureCacheArg::Auto)]
    pub feature_cache: FeatureCacheArg,
    /// Memory budget of the feature cache in MiB [default: half of the
    /// memory available when training starts].
    #[arg(long)]
    pub feature_cache_mb: Option<u64>,
    /// Augment the training images: random flips, 90-degree turns and a
    /// colour jitter of 0.1, drawn from (seed, epoch, image). Off by default,
    /// as in the reference; turns the feature cache off. For textures and
    /// parts without a preferred orientation.
    #[arg(long)]
    pub augment: bool,
    /// Side of the square input in pixels, instead of the config's
    /// `input_size` (CNN backbones only; a multiple of 16). Recorded in the
    /// checkpoint's config.
    #[arg(long)]
    pub input_size: Option<usize>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub report: JsonFlag,
}

/// The model a command applies, and how: the flags `eval` and `predict`
/// share.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A checkpoint of ours (`.safetensors`, with its `.json` beside it; or a
    /// run directory, for its best checkpoint) or a reference `.pt` file
    /// (then `--config` is required).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model config; required for a reference `.pt`, checked against ours otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Backbone weights (`hub`, `random`, a `.safetensors` file). Default: what the
    /// checkpoint was trained with; `hub` for a reference `.pt`.
    #[arg(long)]
    pub weights: Option<String>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub run_on: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images, or folders of images, to score.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Where heatmaps, masks and `predictions.csv` go.
    #[arg(long)]
    pub out: PathBuf,
    /// Anomaly-score threshold; default: the one stored in the checkpoint.
    #[arg(long, allow_hyphen_values = true)]
    pub threshold: Option<f32>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the synthetic data, the run and the heatmaps go.
    #[arg(long, default_value = "fastflow-demo")]
    pub out: PathBuf,
    /// Backbone weights: `hub` tries the hub and falls back to a seeded random
    /// backbone when it cannot be reached; `random` skips the hub.
    #[arg(long, default_value = "hub")]
    pub weights: String,
    /// Training epochs (the demo's measured default finishes in minutes on 2 cores;
    /// the reference trains 500).
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Model input size in pixels (a multiple of 16; the reference uses 256).
    #[arg(long, default_value_t = 128)]
    pub input_size: usize,
    #[command(flatten)]
    pub run_on: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model config to measure (e.g. `configs/resnet18.yaml`).
    #[arg(long)]
    pub config: PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Timed iterations for each of training and inference.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed iterations before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Measure inference only (no training step), e.g. for the large
    /// transformer backbones.
    #[arg(long)]
    pub inference_only: bool,
    /// Override the config's input size (pixels) for quick comparisons.
    #[arg(long)]
    pub input_size: Option<usize>,
    #[command(flatten)]
    pub report: JsonFlag,
    #[command(flatten)]
    pub run_on: DeviceFlag,
}
