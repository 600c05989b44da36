//! Benchmark of the pixel metrics on an MVTec-sized test set: 150 anomaly maps
//! of 256x256 with elliptical defects in two thirds of the images.
//!
//! Run with `cargo run --release -p ff-metrics --example bench_metrics [-- n_images size repeats]`.
//! Set `RAYON_NUM_THREADS` to pin the thread count. Besides the best wall time
//! it prints the mean CPU time of the process (Linux `/proc/self/stat`), which
//! stays meaningful when other programs share the cores.

use std::time::Instant;

use ff_metrics::{au_pro, roc_auc, Evaluator, AU_PRO_FPR_LIMIT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Maps, masks and image labels for `n` images of `size x size`, row-major `[n, size, size]`.
fn synthetic_test_set(n: usize, size: usize, seed: u64) -> (Vec<f32>, Vec<bool>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pixels = size * size;
    let mut maps = Vec::with_capacity(n * pixels);
    let mut masks = Vec::with_capacity(n * pixels);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let defective = i % 3 != 0;
        let blobs: Vec<(f32, f32, f32, f32)> = if defective {
            (0..rng.random_range(1..4))
                .map(|_| {
                    let s = size as f32;
                    (
                        rng.random_range(0.0..s),
                        rng.random_range(0.0..s),
                        rng.random_range(2.0..s / 6.0),
                        rng.random_range(2.0..s / 6.0),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        for y in 0..size {
            for x in 0..size {
                let inside = blobs.iter().any(|&(cy, cx, ry, rx)| {
                    let (dy, dx) = ((y as f32 - cy) / ry, (x as f32 - cx) / rx);
                    dy * dy + dx * dx <= 1.0
                });
                masks.push(inside);
                // FastFlow maps are -p with p in (0, 1]; defects push them towards 0.
                let p: f32 = rng.random_range(0.0..1.0) * if inside { 0.4 } else { 1.0 };
                maps.push(-p);
            }
        }
        labels.push(defective);
    }
    (maps, masks, labels)
}

/// User + system CPU seconds of this process so far (0 where `/proc` is missing).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 per second on Linux).
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("arguments are n_images size repeats (integers)")
        })
        .collect();
    let n = args.first().copied().unwrap_or(150);
    let size = args.get(1).copied().unwrap_or(256);
    let repeats = args.get(2).copied().unwrap_or(3);
    println!(
        "{n} images of {size}x{size} ({} pixels), {} rayon threads, best of {repeats}",
        n * size * size,
        rayon::current_num_threads()
    );
    let (maps, masks, labels) = synthetic_test_set(n, size, 42);

    let mut best = [f64::INFINITY; 4];
    let mut cpu = [0.0f64; 4];
    let mut report = None;
    for _ in 0..repeats {
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        let mut evaluator = Evaluator::new();
        // Batches of 32 images, as an evaluation loop would deliver them.
        let pixels = size * size;
        for (batch, (maps, masks)) in maps
            .chunks(32 * pixels)
            .zip(masks.chunks(32 * pixels))
            .enumerate()
        {
            let images = maps.len() / pixels;
            let labels = &labels[batch * 32..batch * 32 + images];
            evaluator
                .update(maps, masks, labels, images, size, size)
                .expect("valid batch");
        }
        best[0] = best[0].min(start.elapsed().as_secs_f64());
        cpu[0] += process_cpu_seconds() - cpu_start;
        report = Some(evaluator.compute().expect("both classes present"));
        best[1] = best[1].min(start.elapsed().as_secs_f64());
        cpu[1] += process_cpu_seconds() - cpu_start;

        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        au_pro(&maps, &masks, n, size, size, AU_PRO_FPR_LIMIT).expect("defects present");
        best[2] = best[2].min(start.elapsed().as_secs_f64());
        cpu[2] += process_cpu_seconds() - cpu_start;

        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        roc_auc(&maps, &masks).expect("both classes present");
        best[3] = best[3].min(start.elapsed().as_secs_f64());
        cpu[3] += process_cpu_seconds() - cpu_start;
    }
    println!("{report:#?}");
    let names = [
        "Evaluator::update, all batches",
        "Evaluator update + compute (all metrics)",
        "au_pro alone",
        "roc_auc over all pixels alone",
    ];
    for ((name, wall), cpu) in names.iter().zip(best).zip(cpu) {
        println!(
            "{name:<42} best wall {wall:.3} s, mean CPU {:.3} s",
            cpu / repeats as f64
        );
    }
}
