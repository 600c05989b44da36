//! Times the flows' training step alone (forward, loss, backward, Adam) on
//! fixed random features: the whole of a `fastflow train` epoch once the
//! feature cache is full.
//!
//! ```text
//! cargo run --release -p ff-flow --example flow_train_step -- [config] [batch] [steps] [one-pass|graph]
//! ```
//!
//! `config`: resnet18 (default), wide_resnet50_2, deit or cait (the paper's
//! flow settings and feature shapes of that backbone); `batch`: 32; `steps`:
//! 10 timed steps after 2 untimed ones; `one-pass`: one backward pass over
//! the summed loss instead of `loss_and_grads`' one per scale, or `graph`:
//! the flows step by step through candle's autograd instead of the training
//! op (what `FastFlowHead::forward` builds). Prints the median and best step
//! time, images per second, and the peak resident memory.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ff_flow::{Adam, AdamConfig, FastFlowConfig, FastFlowHead, FeatureNorms};

// The fastflow CLI runs on mimalloc with freed memory retained; measuring
// with the same allocator keeps these numbers the CLI's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn config(name: &str) -> Result<(FastFlowConfig, Vec<[usize; 3]>, FeatureNorms), BoxError> {
    Ok(match name {
        "resnet18" => (
            FastFlowConfig::resnet18(),
            vec![[64, 64, 64], [128, 32, 32], [256, 16, 16]],
            FeatureNorms::LayerNorm,
        ),
        "wide_resnet50_2" => (
            FastFlowConfig::wide_resnet50_2(),
            vec![[256, 64, 64], [512, 32, 32], [1024, 16, 16]],
            FeatureNorms::LayerNorm,
        ),
        "deit" => (
            FastFlowConfig::deit(),
            vec![[768, 24, 24]],
            FeatureNorms::None,
        ),
        "cait" => (
            FastFlowConfig::cait(),
            vec![[768, 28, 28]],
            FeatureNorms::None,
        ),
        other => return Err(format!("unknown config '{other}'").into()),
    })
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn run() -> Result<(), BoxError> {
    ff_kernels::alloc::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("resnet18", String::as_str);
    let batch: usize = args.get(1).map_or(Ok(32), |s| s.parse())?;
    let steps: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let mode = args.get(3).map_or("", String::as_str);
    if !matches!(mode, "" | "one-pass" | "graph") {
        return Err(format!("unknown mode '{mode}' (expected one-pass or graph)").into());
    }
    let one_pass = mode == "one-pass";
    let (cfg, shapes, norms) = config(name)?;
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let head = FastFlowHead::new(&cfg, shapes.clone(), norms, 0, vb)?;
    let mut adam = Adam::new(head.trainable_vars()?, AdamConfig::default())?;
    let features: Vec<Tensor> = shapes
        .iter()
        .map(|&[c, h, w]| Tensor::randn(0f32, 1.0, (batch, c, h, w), &device))
        .collect::<candle_core::Result<_>>()?;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let mut times = Vec::with_capacity(steps);
    pool.install(|| -> Result<(), BoxError> {
        for i in 0..steps + 2 {
            let t = Instant::now();
            let out = if mode == "graph" {
                head.forward(features.clone())?
            } else {
                head.forward_for_training(features.clone())?
            };
            let (loss, grads) = if one_pass {
                let loss = ff_flow::loss(&out)?;
                let grads = loss.backward()?;
                (loss, grads)
            } else {
                ff_flow::loss_and_grads(&out)?
            };
            adam.step(&grads)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(format!("step {i}: loss {value}").into());
            }
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{name} flows, batch {batch}: median {:.1} ms ({:.1} img/s), best {:.1} ms, peak RSS {:.0} MiB",
        median * 1e3,
        batch as f64 / median,
        times[0] * 1e3,
        peak_rss_mib()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
