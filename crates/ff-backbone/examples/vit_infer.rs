//! Measures memory and time of one DeiT-384 or CaiT-M48-448 inference with
//! weights memory-mapped from a local safetensors file.
//!
//! Two steps, each its own process so the second one's peak RSS is the
//! inference's alone:
//!
//! ```text
//! cargo run --release -p ff-backbone --example vit_infer -- write cait /tmp/cait_det.safetensors
//! cargo run --release -p ff-backbone --example vit_infer -- infer cait /tmp/cait_det.safetensors [batch] [repeats]
//! ```
//!
//! `write` stores the closed-form `det_init` weights of every tensor the
//! extractor asks for, under its timm key (the same keys the hub file has);
//! `infer` loads them through `WeightSource::File` (the memory-mapped path
//! the CLI uses for hub and local weights), runs one batch (of `batch` images,
//! default 1; `repeats` times, default 1, for a steady-state speed) and prints
//! build and forward seconds with the process's peak and current resident
//! memory (split into anonymous and file-backed pages) from `/proc/self/status`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{Device, Tensor};
use ff_backbone::det_init::det_uniform;
use ff_backbone::{Backbone, BackboneKind, WeightSource};

// The fastflow CLI runs on mimalloc; measuring with the same allocator keeps
// these numbers the CLI's (glibc's malloc returns every large buffer to the
// kernel and faults it in again, which costs CaiT seconds of system time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error>;

/// The `Vm*`/`Rss*` lines of `/proc/self/status`, in MiB, joined for printing.
fn memory_report() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            if !matches!(key, "VmHWM" | "VmRSS" | "RssAnon" | "RssFile") {
                return None;
            }
            let kib: f64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(format!("{key} {:.0} MiB", kib / 1024.0))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn kind_of(name: &str) -> Result<BackboneKind, BoxError> {
    match name {
        "deit" => Ok(BackboneKind::DeitBaseDistilled384),
        "cait" => Ok(BackboneKind::CaitM48_448),
        other => Err(format!("unknown model '{other}' (expected deit or cait)").into()),
    }
}

fn write(kind: BackboneKind, path: &Path) -> Result<(), BoxError> {
    let map = ff_backbone::source_tensors(kind, &WeightSource::Deterministic, &Device::Cpu)?;
    let n: usize = map.values().map(|t| t.elem_count()).sum();
    candle_core::safetensors::save(&map, path)?;
    println!(
        "wrote {} tensors, {:.1} M parameters ({:.0} MiB f32) to {}",
        map.len(),
        n as f64 / 1e6,
        n as f64 * 4.0 / 1048576.0,
        path.display()
    );
    Ok(())
}

fn infer(kind: BackboneKind, path: &Path, batch: usize, repeats: usize) -> Result<(), BoxError> {
    let dev = Device::Cpu;
    println!("start: {}", memory_report());
    let t0 = Instant::now();
    let backbone = Backbone::load(kind, &WeightSource::File(path.to_path_buf()), &dev)?;
    println!(
        "built {} in {:.2} s: {}",
        kind.timm_name(),
        t0.elapsed().as_secs_f64(),
        memory_report()
    );
    let side = kind.default_input_size();
    let values: Vec<f32> = det_uniform("vit_infer.input", batch * 3 * side * side)
        .into_iter()
        .map(|u| (u * 4.0) as f32)
        .collect();
    let x = Tensor::from_vec(values, (batch, 3, side, side), &dev)?;
    for _ in 0..repeats {
        let t1 = Instant::now();
        let features = backbone.features(&x)?;
        let mean = features[0].mean_all()?.to_scalar::<f32>()?;
        let seconds = t1.elapsed().as_secs_f64();
        println!(
            "{batch} {side}-px image(s) in {seconds:.2} s ({:.2} img/s), features {:?} (mean {mean:.4}): {}",
            batch as f64 / seconds,
            features[0].dims(),
            memory_report()
        );
    }
    Ok(())
}

fn run() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: vit_infer <write|infer> <deit|cait> <file.safetensors> [batch] [repeats]";
    let (step, model, path, rest) = match args.as_slice() {
        [step, model, path, rest @ ..] if rest.len() <= 2 => (step, model, path, rest),
        _ => return Err(usage.into()),
    };
    let number = |i: usize| -> Result<usize, BoxError> {
        rest.get(i)
            .map_or(Ok(1), |v| {
                v.parse()
                    .map_err(|_| format!("not a count: '{v}'; {usage}"))
            })
            .map_err(Into::into)
    };
    let (batch, repeats) = (number(0)?.max(1), number(1)?.max(1));
    let kind = kind_of(model)?;
    let path = PathBuf::from(path);
    match step.as_str() {
        "write" => write(kind, &path),
        "infer" => infer(kind, &path, batch, repeats),
        other => Err(format!("unknown step '{other}' (expected write or infer)").into()),
    }
}

fn main() -> ExitCode {
    // As `fastflow` does: freed buffers stay mapped for the next layer.
    ff_kernels::alloc::retain_freed_memory();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
