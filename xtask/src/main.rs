//! Project automation, run as `cargo xtask <command>`: the MVTec AD download,
//! synthetic datasets, and the benchmark matrix that reproduces the paper's
//! tables (`bench-all`, sharded with `--shard`, combined by `bench-merge`).
//!
//! ```text
//! cargo xtask download-mvtec --out data/mvtec [--category bottle,screw]
//! cargo xtask synth --out data/synthetic [--categories weave,disc] [--size 256] [--seed 0]
//! cargo xtask bench-all --data data/mvtec [--backbones resnet18,wide_resnet50_2,deit,cait]
//!     [--categories ...] [--epochs 500] [--out results] [--weights hub|random] [--shard i/n]
//! cargo xtask bench-all --data synthetic --epochs 2          # offline, generated data
//! cargo xtask bench-merge --inputs results/shard-0,results/shard-1 --out results
//! ```
//!
//! Results layout: `<out>/<backbone>/<category>.json` (one finished cell,
//! written atomically; its presence means "skip on rerun"),
//! `<out>/runs/<backbone>/<category>/` (the `fastflow train` run directory:
//! checkpoints, `train.log`), `<out>/report.md` and `<out>/summary.json`.

mod bench;
mod download;
mod plan;
mod published;
mod report;
mod results;
mod runner;
mod synth;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};
use ff_data::synth::SynthConfig;

use crate::bench::MatrixRun;
use crate::plan::{Shard, PAPER_BACKBONES};
use crate::results::RunSettings;
use crate::runner::{workspace_root, FastflowRunner};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "fastflow-rs project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download and extract MVTec AD (resumable; checks size and checksum).
    DownloadMvtec(DownloadArgs),
    /// Write synthetic MVTec-layout categories (ff-data's generator).
    Synth(SynthArgs),
    /// Train and evaluate every (backbone, category) cell; write the report.
    BenchAll(Box<BenchArgs>),
    /// Combine the results directories of several shards into one report.
    BenchMerge(MergeArgs),
}

#[derive(Debug, clap::Args)]
struct DownloadArgs {
    /// Where the categories go (`<out>/<category>/train/good`, ...).
    #[arg(long, default_value = "data/mvtec")]
    out: PathBuf,
    /// Fetch only these categories (their own archives); default: the whole
    /// dataset in one archive.
    #[arg(long, value_delimiter = ',')]
    category: Vec<String>,
    /// Fetch `<base-url>/<archive name>` instead of MVTec's links (a mirror).
    /// Also read from FF_MVTEC_BASE_URL.
    #[arg(long)]
    base_url: Option<String>,
    /// Keep the downloaded archives after extraction.
    #[arg(long)]
    keep_archives: bool,
    /// Download and extract again even where a finished extraction is found.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct SynthArgs {
    /// Dataset root to write (`<out>/<category>/...`).
    #[arg(long)]
    out: PathBuf,
    /// Synthetic categories; default: one per kind of texture or object
    /// (weave, grain, tiles, speckle, disc, capsule).
    #[arg(long, value_delimiter = ',')]
    categories: Vec<String>,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    counts: SynthCounts,
}

/// Image counts per synthetic category (the demo's by default).
#[derive(Debug, Clone, clap::Args)]
struct SynthCounts {
    /// Normal training images per category.
    #[arg(long, default_value_t = 32)]
    n_train: usize,
    /// Normal test images per category.
    #[arg(long, default_value_t = 12)]
    n_test_good: usize,
    /// Defective test images per category.
    #[arg(long, default_value_t = 20)]
    n_test_defect: usize,
}

impl SynthCounts {
    fn config(&self, image_size: usize, seed: u64) -> SynthConfig {
        SynthConfig {
            image_size,
            n_train: self.n_train,
            n_test_good: self.n_test_good,
            n_test_defect: self.n_test_defect,
            seed,
        }
    }
}

fn or_default_synth(categories: &[String]) -> Vec<String> {
    if categories.is_empty() {
        synth::default_categories()
    } else {
        categories.to_vec()
    }
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// MVTec-layout dataset root, or `synthetic` to generate the data first
    /// (into `<out>/data/synthetic`).
    #[arg(long)]
    data: String,
    /// Backbones (config names under `--configs`); default: the paper's four
    /// (resnet18 only for `--data synthetic`).
    #[arg(long, value_delimiter = ',')]
    backbones: Vec<String>,
    /// Categories; default: the 15 of MVTec AD (the generated ones for
    /// `--data synthetic`).
    #[arg(long, value_delimiter = ',')]
    categories: Vec<String>,
    /// Training epochs per cell (reference: 500).
    #[arg(long, default_value_t = 500)]
    epochs: usize,
    /// Results directory.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Backbone weights for `fastflow train --weights` (`hub`, `random` or a
    /// file); default: `hub` (`random` for `--data synthetic`).
    #[arg(long)]
    weights: Option<String>,
    /// Run only a slice of the matrix: cell k of the sorted list goes to shard
    /// k mod n; i counts from 0 (e.g. `--shard $SLURM_ARRAY_TASK_ID/4`).
    #[arg(long)]
    shard: Option<Shard>,
    /// Use this `fastflow` binary instead of building it.
    #[arg(long)]
    fastflow: Option<PathBuf>,
    /// Cargo profile to build `fastflow` with when `--fastflow` is not given
    /// (`dev` reuses the artifacts of `cargo test`, e.g. in CI).
    #[arg(long, default_value = "release")]
    build_profile: String,
    /// Directory of the model configs (`<backbone>.yaml`).
    #[arg(long)]
    configs: Option<PathBuf>,
    /// Train at this input size instead of the config's (CNN backbones;
    /// passed to `fastflow train --input-size`).
    #[arg(long)]
    input_size: Option<usize>,
    /// `fastflow train --batch-size`; default: fastflow's (the reference's 32).
    #[arg(long)]
    batch_size: Option<usize>,
    /// `fastflow train --seed`.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `fastflow train --device` (`cpu` or `cuda`; `cuda` builds fastflow with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// One more argument for `fastflow train`, passed verbatim (repeatable),
    /// e.g. `--train-arg=--eval-every --train-arg=50`.
    #[arg(long = "train-arg", allow_hyphen_values = true)]
    train_args: Vec<String>,
    /// Show fastflow's own output instead of logging it to each cell's `train.log`.
    #[arg(long)]
    verbose: bool,
    /// Image side of the generated data for `--data synthetic`.
    #[arg(long, default_value_t = 256)]
    synth_size: usize,
    /// Generator seed for `--data synthetic`.
    #[arg(long, default_value_t = 0)]
    synth_seed: u64,
    /// Image counts of the generated data for `--data synthetic`.
    #[command(flatten)]
    synth_counts: SynthCounts,
}

#[derive(Debug, clap::Args)]
struct MergeArgs {
    /// The shards' results directories.
    #[arg(long, value_delimiter = ',', required = true)]
    inputs: Vec<PathBuf>,
    /// Where the merged cells, `report.md` and `summary.json` go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::DownloadMvtec(a) => download::download_mvtec(&download::DownloadOptions {
            out: a.out,
            categories: a.category,
            base_url: a.base_url,
            keep_archives: a.keep_archives,
            force: a.force,
        }),
        Command::Synth(a) => {
            synth::generate(
                &a.out,
                &or_default_synth(&a.categories),
                &a.counts.config(a.size, a.seed),
            )?;
            Ok(())
        }
        Command::BenchAll(a) => bench_all(*a),
        Command::BenchMerge(a) => {
            let n = bench::merge(&a.inputs, &a.out)?;
            eprintln!("merged {n} cells into {}", a.out.display());
            Ok(())
        }
    }
}

fn bench_all(a: BenchArgs) -> anyhow::Result<()> {
    let synthetic = a.data == "synthetic";
    let (data_root, data_label, categories) = if synthetic {
        let root = a.out.join("data").join("synthetic");
        let cats = or_default_synth(&a.categories);
        synth::generate(
            &root,
            &cats,
            &a.synth_counts.config(a.synth_size, a.synth_seed),
        )?;
        (root, "synthetic".to_string(), cats)
    } else {
        let root = PathBuf::from(&a.data);
        if !root.is_dir() {
            bail!(
                "dataset root {} does not exist; get MVTec AD with `cargo xtask download-mvtec \
                 --out {}` or pass --data synthetic",
                root.display(),
                root.display()
            );
        }
        let cats = if a.categories.is_empty() {
            ff_data::MVTEC_CATEGORIES.map(String::from).to_vec()
        } else {
            a.categories.clone()
        };
        for c in &cats {
            if !root.join(c).is_dir() {
                bail!("category folder {} does not exist", root.join(c).display());
            }
        }
        (root, a.data.clone(), cats)
    };
    let backbones: Vec<String> = if !a.backbones.is_empty() {
        a.backbones.clone()
    } else if synthetic {
        eprintln!("--data synthetic: backbones default to resnet18 (pass --backbones for more)");
        vec!["resnet18".into()]
    } else {
        PAPER_BACKBONES.map(String::from).to_vec()
    };
    let weights = a.weights.clone().unwrap_or_else(|| {
        if synthetic {
            "random".into()
        } else {
            "hub".into()
        }
    });
    let matrix = plan::plan(&backbones, &categories)?;
    let configs_dir = a
        .configs
        .clone()
        .unwrap_or_else(|| workspace_root().join("configs"));
    let mut configs = Vec::new();
    for b in &backbones {
        let base = configs_dir.join(format!("{b}.yaml"));
        if !base.is_file() {
            bail!(
                "no config for backbone {b}: {} does not exist",
                base.display()
            );
        }
        configs.push((b.clone(), base));
    }
    let run = MatrixRun {
        matrix,
        shard: a.shard.unwrap_or(Shard::FULL),
        out: a.out.clone(),
        data_root,
        data_label,
        configs,
        settings: RunSettings {
            epochs: a.epochs,
            weights,
            input_size: a.input_size,
            batch_size: a.batch_size,
            seed: a.seed,
            extra_args: a.train_args.clone(),
        },
    };
    let binary = match &a.fastflow {
        Some(p) => {
            if !p.is_file() {
                bail!("--fastflow {} is not a file", p.display());
            }
            p.clone()
        }
        None => {
            let features: Vec<String> = if a.device == "cuda" {
                vec!["cuda".into()]
            } else {
                vec![]
            };
            runner::build_fastflow(&a.build_profile, &features)?
        }
    };
    let mut runner = FastflowRunner {
        binary,
        device: a.device.clone(),
        verbose: a.verbose,
    };
    let outcome = bench::run_matrix(&run, &mut runner)?;
    eprintln!(
        "bench: {} cells run, {} skipped as finished, {} failed",
        outcome.ran.len(),
        outcome.skipped.len(),
        outcome.failed.len()
    );
    if !outcome.failed.is_empty() {
        let list: Vec<String> = outcome
            .failed
            .iter()
            .map(|(c, e)| format!("  {c}: {e}"))
            .collect();
        bail!(
            "{} cells failed (rerun the same command to retry only them):\n{}",
            outcome.failed.len(),
            list.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_has_every_paper_config() {
        for b in PAPER_BACKBONES {
            let path = workspace_root().join("configs").join(format!("{b}.yaml"));
            assert!(path.is_file(), "{}", path.display());
        }
    }

    #[test]
    fn the_cli_parses_the_documented_commands() {
        let cli = Cli::try_parse_from([
            "xtask",
            "bench-all",
            "--data",
            "synthetic",
            "--epochs",
            "1",
            "--shard",
            "1/3",
            "--backbones",
            "resnet18,wide_resnet50_2",
            "--train-arg=--eval-every",
            "--train-arg",
            "5",
        ])
        .unwrap();
        let Command::BenchAll(a) = cli.command else {
            panic!("not bench-all")
        };
        assert_eq!(a.shard, Some(Shard { index: 1, count: 3 }));
        assert_eq!(a.backbones, ["resnet18", "wide_resnet50_2"]);
        assert_eq!(a.train_args, ["--eval-every", "5"]);
        assert!(
            Cli::try_parse_from(["xtask", "bench-all", "--data", "d", "--shard", "3/3"]).is_err()
        );
        assert!(Cli::try_parse_from(["xtask", "bench-merge", "--inputs", "a,b"]).is_ok());
        assert!(
            Cli::try_parse_from(["xtask", "download-mvtec", "--category", "bottle,screw"]).is_ok()
        );
        assert!(Cli::try_parse_from([
            "xtask", "synth", "--out", "x", "--size", "64", "--seed", "2"
        ])
        .is_ok());
    }
}
