//! `fastflow bench`: training-step and inference throughput of a config, with
//! a seeded random backbone and random inputs, so that runs on different
//! machines or builds compare side by side without data or network.
//!
//! Each measurement is a list of timed iterations after untimed warm-up ones;
//! it reports the best and the median. Inference is measured at the batch
//! size and at batch 1; the peak resident memory of each part is read from
//! `/proc/self/status` (Linux) after resetting it through
//! `/proc/self/clear_refs`.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use ff_backbone::WeightSource;
use ff_flow::{AdamConfig, FastFlowConfig};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::config::load_model_config;
use crate::engine::{describe_config, device, load_backbone, Engine};

/// One timed measurement: throughput of the best and of the median iteration.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub batch_size: usize,
    pub best_img_per_s: f64,
    pub median_img_per_s: f64,
    /// Peak resident memory during this part (MiB), where the OS reports it.
    pub peak_rss_mib: Option<f64>,
}

/// The measurements `--json` writes.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub config: FastFlowConfig,
    pub device: String,
    pub batch_size: usize,
    pub iters: usize,
    /// Median training throughput at the batch size (absent with `--inference-only`).
    pub train_img_per_s: Option<f64>,
    /// Median inference throughput at the batch size.
    pub inference_img_per_s: f64,
    pub train: Option<Throughput>,
    pub inference: Throughput,
    pub inference_batch1: Throughput,
    pub threads: usize,
    /// The CPU kernels' instruction set (`avx512`, `avx2+fma`, `portable`), or
    /// `generic` when `FASTFLOW_KERNELS=generic` selects candle's operations.
    pub cpu_kernels: String,
    pub cpu_model: Option<String>,
}

/// `fastflow bench`.
pub fn run_bench(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.batch_size > 0 && args.iters > 0,
        "--batch-size and --iters must be at least 1"
    );
    let device = device(args.run_on.device)?;
    let mut cfg = load_model_config(&args.config)?;
    if let Some(s) = args.input_size {
        cfg.input_size = s;
    }
    cfg.validate()?;
    let kind = cfg.backbone_kind()?;
    let backbone = load_backbone(kind, &WeightSource::Random { seed: 0 }, &device)?;
    let engine = Engine::new(&cfg, backbone, 0, &device)?;
    let s = cfg.input_size;
    let x = Tensor::randn(0f32, 1f32, (args.batch_size, 3, s, s), &device)?.to_dtype(DType::F32)?;
    let x1 = x.narrow(0, 0, 1)?.contiguous()?;
    let cpu_kernels = match ff_kernels::Route::current() {
        ff_kernels::Route::Kernels => ff_kernels::Isa::detect().name().to_string(),
        ff_kernels::Route::Generic => "generic".to_string(),
    };
    let cpu_model = cpu_model();
    println!(
        "bench: {} | batch {} | {:?} | {} threads | CPU {} | kernels {cpu_kernels}",
        describe_config(&cfg),
        args.batch_size,
        args.run_on.device,
        rayon::current_num_threads(),
        cpu_model.as_deref().unwrap_or("unknown"),
    );

    let train = if args.inference_only {
        None
    } else {
        let mut adam = engine.optimizer(AdamConfig::default())?;
        let t = measure(&args, &device, args.batch_size, || {
            engine.train_step(&mut adam, &x).map(|_| ())
        })?;
        report("train", &t);
        Some(t)
    };
    let inference = measure(&args, &device, args.batch_size, || {
        engine.anomaly_maps(&x).map(|_| ())
    })?;
    report("inference", &inference);
    let inference_batch1 = measure(&args, &device, 1, || engine.anomaly_maps(&x1).map(|_| ()))?;
    report("inference", &inference_batch1);

    let result = BenchResult {
        config: cfg,
        device: format!("{:?}", args.run_on.device).to_lowercase(),
        batch_size: args.batch_size,
        iters: args.iters,
        train_img_per_s: train.as_ref().map(|t| t.median_img_per_s),
        inference_img_per_s: inference.median_img_per_s,
        train,
        inference,
        inference_batch1,
        threads: rayon::current_num_threads(),
        cpu_kernels,
        cpu_model,
    };
    if let Some(json) = &args.report.json {
        crate::fsutil::write_json_atomic(json, &result)?;
    }
    Ok(())
}

/// Runs `step` `warmup` times untimed, then `iters` times timed.
fn measure(
    args: &BenchArgs,
    device: &Device,
    batch: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<Throughput> {
    reset_peak_rss();
    for _ in 0..args.warmup {
        step()?;
    }
    device.synchronize()?;
    let mut secs = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let start = Instant::now();
        step()?;
        device.synchronize()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    let median = if secs.len() % 2 == 1 {
        secs[secs.len() / 2]
    } else {
        0.5 * (secs[secs.len() / 2 - 1] + secs[secs.len() / 2])
    };
    Ok(Throughput {
        batch_size: batch,
        best_img_per_s: batch as f64 / secs[0],
        median_img_per_s: batch as f64 / median,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn report(what: &str, t: &Throughput) {
    let rss = t
        .peak_rss_mib
        .map(|m| format!(" | peak RSS {m:.0} MiB"))
        .unwrap_or_default();
    println!(
        "{what:9} batch {:>2}: best {:7.2} img/s | median {:7.2} img/s{rss}",
        t.batch_size, t.best_img_per_s, t.median_img_per_s
    );
}

/// Resets the kernel's peak-RSS counter of this process (Linux; elsewhere
/// nothing happens and the peak covers the whole run).
fn reset_peak_rss() {
    // A failed reset only makes the next peak cover more of the run; the
    // report stays a true upper bound, so the error is not worth stopping for.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident memory since the last reset, in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The CPU's model name (Linux `/proc/cpuinfo`).
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}
