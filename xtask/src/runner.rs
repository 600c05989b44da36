//! Running one benchmark cell: the `CellRunner` seam (the real one drives the
//! `fastflow` program; tests use a fake), building `fastflow` once, and
//! reading the metrics JSON that `fastflow train --json` writes.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::plan::Cell;
use crate::results::{write_atomic, CellMetrics, RunSettings};

/// Everything one cell's training run needs.
#[derive(Debug, Clone)]
pub struct CellJob {
    pub cell: Cell,
    /// The model config (`configs/<backbone>.yaml`); `settings.input_size`
    /// may override its input size.
    pub config: PathBuf,
    /// The dataset root holding `<category>/`.
    pub data: PathBuf,
    /// `fastflow train --out`: checkpoints and logs of this cell.
    pub run_dir: PathBuf,
    /// `fastflow train --json`: the final evaluation's metrics.
    pub metrics_json: PathBuf,
    pub settings: RunSettings,
}

/// Runs one cell and reports what it measured. The matrix logic (planning,
/// skipping, sharding, storing) is independent of how a cell is run, so it is
/// tested with a fake runner and used with [`FastflowRunner`].
pub trait CellRunner {
    fn run_cell(&mut self, job: &CellJob) -> anyhow::Result<CellOutput>;
}

/// What a runner hands back for one cell.
#[derive(Debug, Clone)]
pub struct CellOutput {
    pub metrics: CellMetrics,
    /// The CLI's metrics JSON as it wrote it.
    pub raw: serde_json::Value,
}

/// Runs cells with the `fastflow` program:
/// `fastflow train --config C --data D --category K --epochs N --out R --json J
/// --weights W --seed S [--batch-size B] [--device X] [extra args]`.
#[derive(Debug)]
pub struct FastflowRunner {
    pub binary: PathBuf,
    /// `--device` for `fastflow train` (`cpu` or `cuda`).
    pub device: String,
    /// Show fastflow's own output instead of only logging it to `train.log`.
    pub verbose: bool,
}

impl CellRunner for FastflowRunner {
    /// Runs `fastflow train` for the cell. When an earlier attempt with the
    /// same settings was interrupted after writing a checkpoint, training
    /// continues from it (`--resume`, which the CLI makes exact) instead of
    /// starting over; if that fails (say, a checkpoint torn by the kill), the
    /// cell is trained from scratch.
    fn run_cell(&mut self, job: &CellJob) -> anyhow::Result<CellOutput> {
        fs::create_dir_all(&job.run_dir)
            .with_context(|| format!("cannot create {}", job.run_dir.display()))?;
        let stamp_path = job.run_dir.join(STAMP_FILE);
        let stamp = cell_stamp(job, &self.device)?;
        let last = job.run_dir.join("checkpoints").join("last.json");
        let can_resume = last.exists() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
        write_atomic(&stamp_path, stamp.as_bytes())?;
        if can_resume {
            eprintln!(
                "  {}: continuing the interrupted run from {}",
                job.cell,
                last.display()
            );
            match self.attempt(job, Some(&last)) {
                Ok(out) => return Ok(out),
                Err(e) => eprintln!(
                    "  {}: resuming failed ({e:#}); training from scratch",
                    job.cell
                ),
            }
        }
        self.attempt(job, None)
    }
}

/// File in a cell's run directory recording the settings its checkpoints were
/// made with; a later attempt resumes only from checkpoints with equal ones.
const STAMP_FILE: &str = "xtask-cell.json";

fn cell_stamp(job: &CellJob, device: &str) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&serde_json::json!({
        "cell": job.cell,
        "config": job.config,
        "data": job.data,
        "settings": job.settings,
        "device": device,
    }))?)
}

impl FastflowRunner {
    /// One run of `fastflow train`, from scratch or resumed.
    fn attempt(&self, job: &CellJob, resume: Option<&Path>) -> anyhow::Result<CellOutput> {
        // A metrics file from an earlier, interrupted attempt must not be
        // mistaken for this run's.
        if job.metrics_json.exists() {
            fs::remove_file(&job.metrics_json)
                .with_context(|| format!("cannot remove {}", job.metrics_json.display()))?;
        }
        let args = train_args(job, &self.device, resume);
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args);
        let log_path = job.run_dir.join("train.log");
        let start = Instant::now();
        let status = if self.verbose {
            cmd.status()
                .with_context(|| format!("cannot start {}", self.binary.display()))?
        } else {
            let log = fs::File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            let log_err = log
                .try_clone()
                .with_context(|| format!("cannot reopen {}", log_path.display()))?;
            cmd.stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err))
                .status()
                .with_context(|| format!("cannot start {}", self.binary.display()))?
        };
        let wall_seconds = start.elapsed().as_secs_f64();
        if !status.success() {
            let tail = if self.verbose {
                String::new()
            } else {
                format!(
                    "\nlast lines of {}:\n{}",
                    log_path.display(),
                    log_tail(&log_path, 15)
                )
            };
            bail!(
                "`{} {}` failed ({status}){tail}",
                self.binary.display(),
                args.join(" ")
            );
        }
        let raw = read_json(&job.metrics_json)?;
        // fastflow reports how far it trained; anything but the requested
        // number of epochs would make the cell incomparable to its row.
        if let Some(done) = raw.get("epochs").and_then(serde_json::Value::as_u64) {
            if done != job.settings.epochs as u64 {
                bail!(
                    "{} reports {done} epochs trained where {} were asked for",
                    job.metrics_json.display(),
                    job.settings.epochs
                );
            }
        }
        let mut metrics = parse_metrics(&raw, wall_seconds)
            .with_context(|| format!("in {}", job.metrics_json.display()))?;
        metrics.resumed = resume.is_some();
        Ok(CellOutput { metrics, raw })
    }
}

/// The `fastflow train` arguments for a cell, with the CLI's flag names.
/// With `resume`, training continues from that checkpoint.
pub fn train_args(job: &CellJob, device: &str, resume: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        job.config.display().to_string(),
        "--data".into(),
        job.data.display().to_string(),
        "--category".into(),
        job.cell.category.clone(),
        "--epochs".into(),
        job.settings.epochs.to_string(),
        "--out".into(),
        job.run_dir.display().to_string(),
        "--json".into(),
        job.metrics_json.display().to_string(),
        "--weights".into(),
        job.settings.weights.clone(),
        "--seed".into(),
        job.settings.seed.to_string(),
    ];
    if let Some(b) = job.settings.batch_size {
        args.extend(["--batch-size".into(), b.to_string()]);
    }
    if let Some(n) = job.settings.input_size {
        args.extend(["--input-size".into(), n.to_string()]);
    }
    if device != "cpu" {
        args.extend(["--device".into(), device.to_string()]);
    }
    if let Some(checkpoint) = resume {
        args.extend(["--resume".into(), checkpoint.display().to_string()]);
    }
    args.extend(job.settings.extra_args.iter().cloned());
    args
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "fastflow train succeeded but wrote no metrics file {}",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Reads the metrics of `fastflow train --json` / `fastflow eval --json`.
/// `image_auroc`, `pixel_auroc` and `aupro` must be there; the rest is
/// optional. The training time is the CLI's own (`train_seconds`) when it
/// reports one, else the wall time of the process.
pub fn parse_metrics(v: &serde_json::Value, wall_seconds: f64) -> anyhow::Result<CellMetrics> {
    let required = |key: &str| -> anyhow::Result<f64> {
        let x = v
            .get(key)
            .with_context(|| format!("the metrics JSON has no {key:?}"))?;
        x.as_f64()
            .with_context(|| format!("metrics JSON: {key:?} = {x} is not a number"))
    };
    let optional = |key: &str| v.get(key).and_then(serde_json::Value::as_f64);
    Ok(CellMetrics {
        image_auroc: required("image_auroc")?,
        pixel_auroc: required("pixel_auroc")?,
        aupro: required("aupro")?,
        image_f1_max: optional("image_f1_max"),
        inference_img_per_s: optional("inference_img_per_s"),
        n_images: v.get("n_images").and_then(serde_json::Value::as_u64),
        train_seconds: optional("train_seconds").unwrap_or(wall_seconds),
        wall_seconds,
        resumed: false,
    })
}

/// The last `n` lines of a log file, for error messages.
fn log_tail(path: &Path, n: usize) -> String {
    match fs::File::open(path) {
        Ok(f) => {
            let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// The workspace root, for `configs/` and for building `fastflow`. xtask lives
/// one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Builds the `fastflow` program once with the given cargo profile (`release`
/// for real benchmarks; `dev` reuses a test build's artifacts, for CI) in the
/// main target directory (not xtask's), and returns the path cargo reports.
pub fn build_fastflow(profile: &str, features: &[String]) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args([
        "build",
        "--profile",
        profile,
        "-p",
        "ff-cli",
        "--bin",
        "fastflow",
        "--message-format=json-render-diagnostics",
    ]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    // `cargo xtask` runs us with xtask's own target dir; the program belongs
    // in the main one, so a target dir inherited from our own build must not
    // leak into this one.
    cmd.env_remove("CARGO_TARGET_DIR");
    eprintln!(
        "building fastflow: cargo build --profile {profile} -p ff-cli{} (in {})",
        if features.is_empty() {
            String::new()
        } else {
            format!(" --features {}", features.join(","))
        },
        root.display()
    );
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {cargo:?}"))?;
    if !out.status.success() {
        bail!(
            "building fastflow failed ({}); see the compiler output above",
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    find_executable(&stdout).context("cargo built ff-cli but reported no `fastflow` executable")
}

/// Picks the `fastflow` executable out of cargo's JSON messages.
fn find_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "fastflow")
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_arguments_use_the_cli_flag_names() {
        let job = CellJob {
            cell: Cell {
                backbone: "resnet18".into(),
                category: "bottle".into(),
            },
            config: "configs/resnet18.yaml".into(),
            data: "data/mvtec".into(),
            run_dir: "results/runs/resnet18/bottle".into(),
            metrics_json: "results/runs/resnet18/bottle/metrics.json".into(),
            settings: RunSettings {
                epochs: 3,
                weights: "hub".into(),
                input_size: None,
                batch_size: Some(8),
                seed: 7,
                extra_args: vec!["--eval-every".into(), "1".into()],
            },
        };
        assert_eq!(
            train_args(&job, "cuda", None).join(" "),
            "train --config configs/resnet18.yaml --data data/mvtec --category bottle \
             --epochs 3 --out results/runs/resnet18/bottle \
             --json results/runs/resnet18/bottle/metrics.json --weights hub --seed 7 \
             --batch-size 8 --device cuda --eval-every 1"
        );
        assert!(!train_args(&job, "cpu", None).contains(&"--device".to_string()));
        let resumed = train_args(&job, "cpu", Some(Path::new("r/checkpoints/last.json")));
        assert_eq!(
            resumed[resumed.len() - 4..],
            ["--resume", "r/checkpoints/last.json", "--eval-every", "1"].map(String::from)[..]
        );
    }

    #[test]
    fn metrics_json_is_read_with_required_and_optional_keys() {
        let v = serde_json::json!({
            "image_auroc": 0.97, "pixel_auroc": 0.96, "aupro": 0.9,
            "image_f1_max": 0.93, "threshold": -0.5, "n_images": 83,
            "inference_img_per_s": 14.5
        });
        let m = parse_metrics(&v, 120.0).unwrap();
        assert_eq!(m.image_auroc, 0.97);
        assert_eq!(m.n_images, Some(83));
        assert_eq!(m.inference_img_per_s, Some(14.5));
        assert_eq!(m.train_seconds, 120.0);
        let mut with_time = v.clone();
        with_time["train_seconds"] = serde_json::json!(100.5);
        assert_eq!(
            parse_metrics(&with_time, 120.0).unwrap().train_seconds,
            100.5
        );

        let mut broken = v.clone();
        broken.as_object_mut().unwrap().remove("pixel_auroc");
        let err = format!("{:#}", parse_metrics(&broken, 1.0).unwrap_err());
        assert!(err.contains("pixel_auroc"), "{err}");
        broken["pixel_auroc"] = serde_json::json!("high");
        assert!(parse_metrics(&broken, 1.0).is_err());
    }

    #[test]
    fn the_fastflow_executable_is_found_in_cargo_messages() {
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"ff_data"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"fastflow"},"executable":"/w/target/release/fastflow"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            find_executable(msgs),
            Some(PathBuf::from("/w/target/release/fastflow"))
        );
        assert_eq!(find_executable("not json"), None);
    }

    /// Writes an executable shell script standing in for `fastflow`.
    #[cfg(unix)]
    fn fake_fastflow(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fastflow");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Runs a cell, retrying while the kernel reports the fresh script as
    /// busy: another test thread forking at the moment the script was written
    /// briefly holds its write handle (ETXTBSY), a known race of tests that
    /// write and then execute files.
    #[cfg(unix)]
    fn run(runner: &mut FastflowRunner, job: &CellJob) -> anyhow::Result<CellOutput> {
        for _ in 0..20 {
            match runner.run_cell(job) {
                Err(e) if format!("{e:#}").contains("Text file busy") => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => return other,
            }
        }
        runner.run_cell(job)
    }

    #[cfg(unix)]
    fn job(dir: &Path) -> CellJob {
        let run_dir = dir.join("runs/resnet18/bottle");
        CellJob {
            cell: Cell {
                backbone: "resnet18".into(),
                category: "bottle".into(),
            },
            config: "configs/resnet18.yaml".into(),
            data: "data".into(),
            metrics_json: run_dir.join("metrics.json"),
            run_dir,
            settings: RunSettings {
                epochs: 1,
                weights: "random".into(),
                input_size: None,
                batch_size: None,
                seed: 0,
                extra_args: vec![],
            },
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_runner_reads_what_the_program_wrote_and_logs_its_output() {
        let dir = tempfile::tempdir().unwrap();
        // The script finds the value after `--json` and writes metrics there.
        let bin = fake_fastflow(
            dir.path(),
            r#"echo "epoch 1/1 loss -3.2"
while [ "$#" -gt 0 ]; do
  if [ "$1" = "--json" ]; then out="$2"; fi
  shift
done
printf '{"image_auroc": 0.75, "pixel_auroc": 0.5, "aupro": 0.25, "n_images": 4, "epochs": 1}' > "$out""#,
        );
        let mut runner = FastflowRunner {
            binary: bin,
            device: "cpu".into(),
            verbose: false,
        };
        let j = job(dir.path());
        // A stale metrics file of an interrupted attempt is not taken for this run's.
        fs::create_dir_all(&j.run_dir).unwrap();
        fs::write(&j.metrics_json, "{}").unwrap();
        let out = run(&mut runner, &j).unwrap();
        assert_eq!(out.metrics.image_auroc, 0.75);
        assert_eq!(out.metrics.aupro, 0.25);
        assert_eq!(out.metrics.n_images, Some(4));
        assert!(out.metrics.wall_seconds >= 0.0);
        assert_eq!(out.metrics.train_seconds, out.metrics.wall_seconds);
        let log = fs::read_to_string(j.run_dir.join("train.log")).unwrap();
        assert!(log.contains("epoch 1/1"), "{log}");
    }

    #[cfg(unix)]
    #[test]
    fn a_failing_program_is_reported_with_its_last_log_lines() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_fastflow(
            dir.path(),
            "echo 'error: unknown field `flow_steps`' >&2\nexit 3",
        );
        let mut runner = FastflowRunner {
            binary: bin,
            device: "cpu".into(),
            verbose: false,
        };
        let err = format!("{:#}", run(&mut runner, &job(dir.path())).unwrap_err());
        assert!(
            err.contains("flow_steps") && err.contains("train.log"),
            "{err}"
        );
        assert!(err.contains("--category bottle"), "{err}");

        // Success without a metrics file is an error too, not an empty result.
        let bin = fake_fastflow(dir.path(), "exit 0");
        let mut runner = FastflowRunner {
            binary: bin,
            device: "cpu".into(),
            verbose: false,
        };
        let err = format!("{:#}", run(&mut runner, &job(dir.path())).unwrap_err());
        assert!(err.contains("wrote no metrics file"), "{err}");

        // A run that reports fewer epochs than asked for is not a finished cell.
        let bin = fake_fastflow(
            dir.path(),
            r#"while [ "$#" -gt 0 ]; do [ "$1" = "--json" ] && out="$2"; shift; done
printf '{"image_auroc": 0.7, "pixel_auroc": 0.5, "aupro": 0.2, "epochs": 0}' > "$out""#,
        );
        let mut runner = FastflowRunner {
            binary: bin,
            device: "cpu".into(),
            verbose: false,
        };
        let err = format!("{:#}", run(&mut runner, &job(dir.path())).unwrap_err());
        assert!(
            err.contains("0 epochs trained where 1 were asked for"),
            "{err}"
        );
    }

    /// A stand-in that records its arguments, fails (like a killed run) after
    /// writing a checkpoint when `FAIL_ONCE` exists, and refuses to resume
    /// when `BAD_RESUME` exists.
    #[cfg(unix)]
    const RESUMABLE: &str = r#"dir=$(dirname "$0")
echo "$@" >> "$dir/calls.txt"
resume=no
while [ "$#" -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --json) json="$2"; shift ;;
    --resume) resume="$2"; shift ;;
  esac
  shift
done
if [ "$resume" != no ] && [ -e "$dir/BAD_RESUME" ]; then echo "corrupt checkpoint" >&2; exit 1; fi
mkdir -p "$out/checkpoints" && echo '{}' > "$out/checkpoints/last.json"
if [ -e "$dir/FAIL_ONCE" ]; then rm "$dir/FAIL_ONCE"; echo "killed" >&2; exit 137; fi
printf '{"image_auroc": 0.75, "pixel_auroc": 0.5, "aupro": 0.25}' > "$json""#;

    #[cfg(unix)]
    #[test]
    fn an_interrupted_cell_resumes_from_its_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_fastflow(dir.path(), RESUMABLE);
        let calls = || fs::read_to_string(dir.path().join("calls.txt")).unwrap();
        let mut runner = FastflowRunner {
            binary: bin,
            device: "cpu".into(),
            verbose: false,
        };
        let j = job(dir.path());
        fs::write(dir.path().join("FAIL_ONCE"), "").unwrap();
        assert!(run(&mut runner, &j).is_err());
        assert!(!calls().contains("--resume"));
        // Same settings: the second attempt continues from the checkpoint.
        let out = run(&mut runner, &j).unwrap();
        assert!(out.metrics.resumed);
        let last_call = calls().lines().last().unwrap().to_string();
        assert!(
            last_call.ends_with(&format!(
                "--resume {}",
                j.run_dir.join("checkpoints/last.json").display()
            )),
            "{last_call}"
        );
        // Other settings: the old checkpoint is not used.
        let mut other = j.clone();
        other.settings.epochs = 5;
        let out = run(&mut runner, &other).unwrap();
        assert!(!out.metrics.resumed);
        assert!(!calls().lines().last().unwrap().contains("--resume"));
        // A checkpoint that cannot be resumed: the cell is trained from scratch.
        fs::write(dir.path().join("BAD_RESUME"), "").unwrap();
        let out = run(&mut runner, &other).unwrap();
        assert!(!out.metrics.resumed);
        let lines: Vec<String> = calls().lines().map(String::from).collect();
        assert!(lines[lines.len() - 2].contains("--resume"));
        assert!(!lines[lines.len() - 1].contains("--resume"));
    }
}
