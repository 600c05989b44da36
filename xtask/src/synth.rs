//! `synth`: several synthetic MVTec-layout categories from ff-data's
//! generator, for offline benchmarks and demos. A category that was already
//! generated with the same settings is left as it is.

use std::fs;
use std::path::Path;

use anyhow::Context;
use ff_data::synth::{generate_category, SynthConfig, SynthKind};

use crate::plan::check_name;

/// Marker holding the settings a category was generated with.
const MARKER: &str = ".xtask-synth";

/// One category per kind of texture or object the generator draws, named
/// after the kind, so that no synthetic category poses as an MVTec one.
pub fn default_categories() -> Vec<String> {
    SynthKind::ALL
        .iter()
        .map(|k| k.name().to_string())
        .collect()
}

/// Writes each category under `out` (MVTec layout) unless it is there already
/// with the same settings. Returns how many were generated.
pub fn generate(out: &Path, categories: &[String], cfg: &SynthConfig) -> anyhow::Result<usize> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let stamp = format!("{cfg:?}\n");
    let mut made = 0;
    for cat in categories {
        check_name("category", cat)?;
        let marker = out.join(cat).join(MARKER);
        if fs::read_to_string(&marker).is_ok_and(|s| s == stamp) {
            eprintln!("synthetic {cat}: already in {}", out.join(cat).display());
            continue;
        }
        generate_category(out, cat, cfg)
            .with_context(|| format!("cannot generate synthetic category {cat}"))?;
        fs::write(&marker, &stamp).with_context(|| format!("cannot write {}", marker.display()))?;
        eprintln!(
            "synthetic {cat}: {} train, {} good + {} defective test images of {} px in {}",
            cfg.n_train,
            cfg.n_test_good,
            cfg.n_test_defect,
            cfg.image_size,
            out.join(cat).display()
        );
        made += 1;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_mvtec_layout_once_per_setting() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            image_size: 32,
            n_train: 2,
            n_test_good: 1,
            n_test_defect: 2,
            seed: 3,
        };
        let cats = vec!["weave".to_string(), "disc".to_string()];
        assert_eq!(generate(dir.path(), &cats, &cfg).unwrap(), 2);
        for cat in &cats {
            let split = ff_data::mvtec_category(dir.path(), cat).unwrap();
            assert_eq!(split.train.len(), 2);
            assert_eq!(split.test.len(), 3);
        }
        // Same settings: nothing to do; another seed: generated again.
        assert_eq!(generate(dir.path(), &cats, &cfg).unwrap(), 0);
        let other = SynthConfig { seed: 4, ..cfg };
        assert_eq!(generate(dir.path(), &cats[..1], &other).unwrap(), 1);
        assert!(generate(dir.path(), &["../x".to_string()], &cfg).is_err());
    }

    #[test]
    fn default_categories_cover_every_kind() {
        let cats = default_categories();
        assert_eq!(cats.len(), SynthKind::ALL.len());
        for (c, k) in cats.iter().zip(SynthKind::ALL) {
            assert_eq!(SynthKind::for_name(c), k);
        }
    }
}
