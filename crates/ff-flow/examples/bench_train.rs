//! Times one FastFlow training step (backbone, head forward, loss, backward,
//! Adam) and inference (forward + anomaly map) with a seeded random backbone
//! and random inputs, so that speed changes in this crate can be measured
//! without data or network.
//!
//! `cargo run -p ff-flow --release --example bench_train -- [config] [size] [batch] [iters] [profile-head]`
//! with `config` one of `resnet18` (default) or `wide_resnet50_2`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ff_backbone::{Backbone, WeightSource};
use ff_flow::{Adam, AdamConfig, FastFlow, FastFlowConfig};

// The `fastflow` binary uses mimalloc; so does this benchmark, since the
// allocator changes candle's backward pass markedly.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The best (smallest) of the timings of `f` over `iters` runs, in seconds.
fn best_of<T>(iters: usize, mut f: impl FnMut() -> BoxResult<T>) -> BoxResult<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = match args.first().map(String::as_str) {
        None | Some("resnet18") => FastFlowConfig::resnet18(),
        Some("wide_resnet50_2") => FastFlowConfig::wide_resnet50_2(),
        Some(other) => return Err(format!("unknown config '{other}'").into()),
    };
    if let Some(s) = args.get(1) {
        cfg.input_size = s.parse()?;
    }
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let iters: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let device = Device::Cpu;
    let kind = cfg.backbone_kind()?;
    let backbone = Backbone::load(kind, &WeightSource::Random { seed: 0 }, &device)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = FastFlow::new(&cfg, backbone, vb, 0)?;
    let mut adam = Adam::new(model.trainable_vars()?, AdamConfig::default())?;
    let s = cfg.input_size;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, s, s), &device)?;
    println!(
        "{} @ {s} px, batch {batch}, best of {iters}, {} threads",
        cfg.backbone_name,
        candle_core::utils::get_num_threads()
    );

    // Warm-up: one full step, so allocations and lazy setup are not timed.
    let out = model.forward(&x)?;
    let grads = ff_flow::loss(&out)?.backward()?;
    adam.step(&grads)?;

    // `profile-head` as a fifth argument only repeats the trainable part
    // (norms, flows, loss, backward, Adam) on fixed features, for profilers.
    if args.get(4).map(String::as_str) == Some("profile-head") {
        let features = model.features(&x)?;
        for _ in 0..iters {
            let start = Instant::now();
            let out = model.forward_features(features.clone())?;
            let grads = ff_flow::loss(&out)?.backward()?;
            adam.step(&grads)?;
            println!("head step: {:8.1} ms", start.elapsed().as_secs_f64() * 1e3);
        }
        return Ok(());
    }

    let t_backbone = best_of(iters, || Ok(model.features(&x)?))?;
    let features = model.features(&x)?;
    let t_head = best_of(iters, || Ok(model.forward_features(features.clone())?))?;
    let mut t_backward = f64::INFINITY;
    let mut t_adam = f64::INFINITY;
    let mut t_step = f64::INFINITY;
    for _ in 0..iters {
        let start = Instant::now();
        let out = model.forward(&x)?;
        let loss = ff_flow::loss(&out)?;
        let t0 = Instant::now();
        let grads = loss.backward()?;
        let t1 = Instant::now();
        adam.step(&grads)?;
        let t2 = Instant::now();
        t_backward = t_backward.min((t1 - t0).as_secs_f64());
        t_adam = t_adam.min((t2 - t1).as_secs_f64());
        t_step = t_step.min((t2 - start).as_secs_f64());
    }
    println!(
        "train step: {:8.1} ms  ({:.2} img/s)",
        t_step * 1e3,
        batch as f64 / t_step
    );
    println!("  backbone: {:8.1} ms", t_backbone * 1e3);
    println!("  head fwd: {:8.1} ms", t_head * 1e3);
    println!("  backward: {:8.1} ms", t_backward * 1e3);
    println!("  adam:     {:8.1} ms", t_adam * 1e3);

    for b in [batch, 1] {
        let xb = x.narrow(0, 0, b)?.contiguous()?;
        let infer = |m: &FastFlow| -> BoxResult<Vec<f32>> {
            let out = m.forward(&xb)?;
            Ok(m.anomaly_map(&out)?.flatten_all()?.to_vec1::<f32>()?)
        };
        infer(&model)?;
        let t = best_of(iters, || infer(&model))?;
        println!(
            "inference batch {b}: {:8.1} ms  ({:.2} img/s)",
            t * 1e3,
            b as f64 / t
        );
    }
    Ok(())
}
