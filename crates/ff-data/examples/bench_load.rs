//! Benchmark: decode + preprocess throughput for large PNGs, one thread vs the parallel loader, and data-wait share.
//!
//! `cargo run --release -p ff-data --example bench_load -- [n_images] [image_px] [input_size] [batch] [compute_ms_per_image]`
//! (defaults 48 1024 256 8 160). It writes `n_images` synthetic PNGs of
//! `image_px` pixels to a temp dir, then measures:
//! 1. one thread: `Preprocess::load_image` in a loop (decode + resize + normalise);
//! 2. the `Loader` on rayon's default pool (one thread per core), no cache;
//! 3. a second epoch served from the cache;
//! 4. a simulated training loop: per batch, `compute_ms_per_image` of busy
//!    work on two threads (the model's share of the cores), timing how long
//!    `next()` blocks, i.e. the share of wall time spent waiting for data.
//!    160 ms/image is about what ResNet18 FastFlow training at 256 px costs
//!    on these 2 cores (PyTorch: 6-6.5 img/s).

use std::time::{Duration, Instant};

use ff_data::synth::{generate_category, SynthConfig};
use ff_data::{mvtec_category, Loader, LoaderConfig, Preprocess};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Keeps `threads` cores busy for `d` (stands in for the model's compute).
fn busy(d: Duration, threads: usize) {
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let t = Instant::now();
                let mut x = 1u64;
                while t.elapsed() < d {
                    for _ in 0..1000 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    std::hint::black_box(x);
                }
            });
        }
    });
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, px, input, batch, compute_ms) = (
        arg(1, 48),
        arg(2, 1024),
        arg(3, 256),
        arg(4, 8),
        arg(5, 160),
    );
    let dir = std::env::temp_dir().join(format!("ff-data-bench-{}", std::process::id()));
    let t = Instant::now();
    generate_category(
        &dir,
        "speckle",
        &SynthConfig {
            image_size: px,
            n_train: n,
            n_test_good: 0,
            n_test_defect: 0,
            seed: 1,
        },
    )?;
    let samples = mvtec_category(&dir, "speckle")?.train;
    let bytes: u64 = samples
        .iter()
        .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "{n} PNGs of {px}x{px} ({:.2} MB each), written in {:.1} s; input size {input}, batch {batch}, {} rayon threads",
        bytes as f64 / n as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    let pre = Preprocess::imagenet(input);

    // 1. One thread, decode only and decode + preprocess.
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let (decode_s, full_s) = one.install(|| -> Result<(f64, f64), ff_data::Error> {
        let t = Instant::now();
        for s in &samples {
            std::hint::black_box(ff_data::decode_rgb(&s.path)?);
        }
        let decode = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for s in &samples {
            std::hint::black_box(pre.load_image(&s.path)?);
        }
        Ok((decode, t.elapsed().as_secs_f64()))
    })?;
    println!(
        "single thread: decode {:.1} img/s, decode+resize+normalise {:.1} img/s ({:.1} ms/img, resize+normalise {:.1} ms)",
        n as f64 / decode_s,
        n as f64 / full_s,
        1e3 * full_s / n as f64,
        1e3 * (full_s - decode_s) / n as f64
    );

    // 2./3. The parallel loader, then a cached epoch.
    let mut cfg = LoaderConfig::new(batch);
    cfg.cache = true;
    let loader = Loader::new(samples.clone(), pre.clone(), cfg);
    for epoch in 0..2 {
        let t = Instant::now();
        let mut count = 0;
        for b in loader.epoch(epoch) {
            count += b?.n;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "loader epoch {epoch} ({}): {:.1} img/s",
            if epoch == 0 {
                "decoding, parallel"
            } else {
                "from cache"
            },
            count as f64 / s
        );
    }

    // 4. Waiting for data while the model computes.
    let compute = Duration::from_millis(compute_ms as u64);
    for cache in [false, true] {
        let mut cfg = LoaderConfig::new(batch);
        cfg.cache = cache;
        cfg.shuffle_seed = Some(0);
        let loader = Loader::new(samples.clone(), pre.clone(), cfg);
        for epoch in 0..2 {
            let (start, mut wait) = (Instant::now(), Duration::ZERO);
            let mut it = loader.epoch(epoch);
            loop {
                let t = Instant::now();
                let Some(b) = it.next() else { break };
                wait += t.elapsed();
                busy(compute * b?.n as u32, 2);
            }
            let total = start.elapsed();
            println!(
                "training sim (cache {cache}, epoch {epoch}, {compute_ms} ms/img compute): waited {:.2} s of {:.2} s = {:.1}%",
                wait.as_secs_f64(),
                total.as_secs_f64(),
                100.0 * wait.as_secs_f64() / total.as_secs_f64()
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
