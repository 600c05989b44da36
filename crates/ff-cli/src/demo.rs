//! `fastflow demo`: the offline end-to-end tour. It writes a synthetic
//! MVTec-layout category, trains a reduced ResNet18 FastFlow briefly, evaluates
//! it, predicts a few test images and says where everything is.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use ff_backbone::{BackboneKind, WeightSource};
use ff_data::synth::{generate_category, SynthConfig};
use ff_flow::FastFlowConfig;

use crate::checkpoint::read_meta;
use crate::cli::FeatureCacheArg;
use crate::cli::{DataArgs, DemoArgs};
use crate::data::DatasetFormat;
use crate::engine::{device, load_backbone, load_our_checkpoint};
use crate::predict::{predict, PredictSettings};
use crate::report::{metrics_table, predictions_csv};
use crate::train::{train, TrainPlan};

/// The demo's data and schedule (its epochs and input size are the defaults
/// of `fastflow demo`'s flags). The reference trains 500 epochs at 256 px;
/// the demo must finish in minutes on two cores, so it trains a smaller input
/// for a few epochs. Measured figures are in the README.
pub const DEMO_CATEGORY: &str = "demo";
pub const DEMO_BATCH: usize = 8;
pub const DEMO_SEED: u64 = 0;

/// `fastflow demo`.
pub fn run_demo(args: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let device = device(args.run_on.device)?;
    let data_root = args.out.join("data");
    let synth = SynthConfig {
        image_size: 256,
        ..SynthConfig::demo()
    };
    println!(
        "[1/4] writing a synthetic category ({} train, {} good + {} defective test images) to {}",
        synth.n_train,
        synth.n_test_good,
        synth.n_test_defect,
        data_root.join(DEMO_CATEGORY).display()
    );
    generate_category(&data_root, DEMO_CATEGORY, &synth).with_context(|| {
        format!(
            "cannot write the synthetic data under '{}'",
            data_root.display()
        )
    })?;

    let kind = BackboneKind::ResNet18;
    let weights = if args.weights.trim() == "random" {
        WeightSource::Random { seed: DEMO_SEED }
    } else {
        let hub = crate::engine::parse_weights(&args.weights, kind, DEMO_SEED)?;
        match load_backbone(kind, &hub, &device) {
            Ok(_) => hub,
            Err(e) => {
                println!(
                    "NOTICE: pretrained weights unavailable ({e:#}).\n\
                     NOTICE: continuing with a seeded RANDOM ResNet18 backbone; the numbers below are not \
                     comparable to the paper's (run with the hub reachable, or HF_HOME pointing at a cache, \
                     for pretrained weights)."
                );
                WeightSource::Random { seed: DEMO_SEED }
            }
        }
    };
    let cfg = FastFlowConfig {
        input_size: args.input_size,
        ..FastFlowConfig::resnet18()
    };
    let run_dir = args.out.join("run");
    let plan = TrainPlan {
        cfg,
        data: DataArgs {
            data: data_root.clone(),
            category: DEMO_CATEGORY.to_string(),
            format: DatasetFormat::Mvtec,
            normal_dir: PathBuf::from("good"),
            abnormal_dir: PathBuf::from("bad"),
            normal_test_dir: None,
            mask_dir: None,
        },
        epochs: args.epochs,
        batch_size: DEMO_BATCH,
        lr: 1e-3,
        weight_decay: 1e-5,
        eval_every: args.epochs.max(1),
        seed: DEMO_SEED,
        weights,
        run_dir,
        resume: None,
        json: Some(args.out.join("metrics.json")),
        device: device.clone(),
        feature_cache: FeatureCacheArg::Auto,
        feature_cache_mb: None,
        augment: false,
    };
    println!(
        "[2/4] training ResNet18 FastFlow at {} px for {} epochs (backbone: {})",
        args.input_size,
        args.epochs,
        plan.weights.describe()
    );
    let outcome = train(&plan)?;
    println!("[3/4] evaluation on the synthetic test set:");
    println!("{}", metrics_table(&outcome.evaluation.metrics));

    let best = outcome.run.best();
    let meta = read_meta(&best)?;
    let (_, engine) = load_our_checkpoint(&best, None, &device)?;
    let test_root = data_root.join(DEMO_CATEGORY).join("test");
    let mut images = Vec::new();
    for defect in ["good", "scratch", "hole", "stain", "cut"] {
        if let Ok(list) = ff_data::list_images(&test_root.join(defect)) {
            images.extend(list.into_iter().take(1));
        }
    }
    let heatmaps = args.out.join("heatmaps");
    println!(
        "[4/4] predicting {} test images into {}",
        images.len(),
        heatmaps.display()
    );
    let settings = PredictSettings {
        threshold: meta.threshold.map(|t| t as f32),
        pixel_threshold: meta.pixel_threshold.or(meta.threshold).map(|t| t as f32),
        map_range: meta.map_range,
        batch_size: DEMO_BATCH,
    };
    let pred = predict(&engine, &images, &heatmaps, &settings)?;
    crate::fsutil::write_atomic(
        &pred.csv,
        predictions_csv(&pred.rows, settings.threshold).as_bytes(),
    )?;
    for r in &pred.rows {
        println!(
            "  {:>10}  {:+.4}  {}",
            r.label,
            r.score.unwrap_or(f32::NAN),
            r.heatmap
        );
    }
    println!();
    println!(
        "demo finished in {:.1} s (training {:.1} s)",
        t0.elapsed().as_secs_f64(),
        outcome.train_seconds
    );
    println!("report:      {}", outcome.run.report().display());
    println!("metrics:     {}", args.out.join("metrics.json").display());
    println!("checkpoint:  {}", best.weights.display());
    println!("heatmaps:    {}", heatmaps.display());
    println!("predictions: {}", pred.csv.display());
    Ok(())
}
