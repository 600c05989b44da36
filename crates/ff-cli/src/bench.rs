//! `fastflow bench`: training-step and inference throughput of a config at a
//! batch size, with a seeded random backbone and random inputs, so that runs
//! on different machines or builds compare side by side without data or network.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use ff_backbone::WeightSource;
use ff_flow::{AdamConfig, FastFlowConfig};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::config::load_model_config;
use crate::engine::{describe_config, device, load_backbone, Engine};

/// The measurements `--json` writes.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub config: FastFlowConfig,
    pub device: String,
    pub batch_size: usize,
    pub iters: usize,
    pub train_img_per_s: f64,
    pub inference_img_per_s: f64,
    pub threads: usize,
}

/// `fastflow bench`.
pub fn run_bench(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.batch_size > 0 && args.iters > 0,
        "--batch-size and --iters must be at least 1"
    );
    let device = device(args.device)?;
    let mut cfg = load_model_config(&args.config)?;
    if let Some(s) = args.input_size {
        cfg.input_size = s;
    }
    cfg.validate()?;
    let kind = cfg.backbone_kind()?;
    let backbone = load_backbone(kind, &WeightSource::Random { seed: 0 }, &device)?;
    let engine = Engine::new(&cfg, backbone, 0, &device)?;
    let mut adam = engine.optimizer(AdamConfig::default())?;
    let s = cfg.input_size;
    let x = Tensor::randn(0f32, 1f32, (args.batch_size, 3, s, s), &device)?.to_dtype(DType::F32)?;
    println!(
        "bench: {} | batch {} | {:?}",
        describe_config(&cfg),
        args.batch_size,
        args.device
    );

    for _ in 0..args.warmup {
        engine.train_step(&mut adam, &x)?;
    }
    let start = Instant::now();
    for _ in 0..args.iters {
        engine.train_step(&mut adam, &x)?;
    }
    device.synchronize()?;
    let train = (args.iters * args.batch_size) as f64 / start.elapsed().as_secs_f64();

    for _ in 0..args.warmup {
        engine.anomaly_maps(&x)?;
    }
    let start = Instant::now();
    for _ in 0..args.iters {
        engine.anomaly_maps(&x)?;
    }
    device.synchronize()?;
    let infer = (args.iters * args.batch_size) as f64 / start.elapsed().as_secs_f64();

    println!("train:     {train:.2} img/s");
    println!("inference: {infer:.2} img/s");
    let result = BenchResult {
        config: cfg,
        device: format!("{:?}", args.device).to_lowercase(),
        batch_size: args.batch_size,
        iters: args.iters,
        train_img_per_s: train,
        inference_img_per_s: infer,
        threads: rayon::current_num_threads(),
    };
    if let Some(json) = &args.json {
        crate::fsutil::write_json_atomic(json, &result)?;
    }
    Ok(())
}
