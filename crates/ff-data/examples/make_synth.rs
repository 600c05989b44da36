//! Writes synthetic MVTec-layout categories and prints how long each took.
//!
//! `cargo run --release -p ff-data --example make_synth -- <out dir> [name ...]`
//! (default names: one per kind). Uses `SynthConfig::demo()` (64 images, 256 px).

use std::path::PathBuf;
use std::time::Instant;

use ff_data::synth::{generate_category, SynthConfig, SynthKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: make_synth <out dir> [name ...]")?,
    );
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names = SynthKind::ALL
            .iter()
            .map(|k| k.name().to_string())
            .collect();
    }
    let cfg = SynthConfig::demo();
    for name in &names {
        let t = Instant::now();
        generate_category(&out, name, &cfg)?;
        let n = cfg.n_train + cfg.n_test_good + cfg.n_test_defect;
        println!(
            "{name} ({:?}): {n} images at {} px in {:.2} s",
            SynthKind::for_name(name),
            cfg.image_size,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
