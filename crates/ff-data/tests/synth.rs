//! The synthetic MVTec-layout generator: layout, determinism, visible defects with matching masks.

use ff_data::synth::{generate_category, SynthConfig, SynthKind, DEFECTS};
use ff_data::{decode_gray, decode_rgb, mvtec_category, Label};

fn small() -> SynthConfig {
    SynthConfig {
        image_size: 64,
        n_train: 4,
        n_test_good: 2,
        n_test_defect: 8,
        seed: 11,
    }
}

#[test]
fn writes_mvtec_layout_that_the_mvtec_loader_reads() {
    let dir = tempfile::tempdir().unwrap();
    generate_category(dir.path(), "weave", &small()).unwrap();
    let split = mvtec_category(dir.path(), "weave").unwrap();
    assert_eq!(split.train.len(), 4);
    assert_eq!(split.test.len(), 10);
    for d in DEFECTS {
        assert_eq!(
            split.test.iter().filter(|s| s.defect == d).count(),
            2,
            "{d}"
        );
    }
    assert!(split.has_masks());
    let img = decode_rgb(&split.test[0].path).unwrap();
    assert_eq!(img.dimensions(), (64, 64));
}

#[test]
fn same_seed_same_bytes_other_seed_other_images() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    generate_category(a.path(), "grain", &small()).unwrap();
    generate_category(b.path(), "grain", &small()).unwrap();
    generate_category(
        c.path(),
        "grain",
        &SynthConfig {
            seed: 12,
            ..small()
        },
    )
    .unwrap();
    for rel in [
        "grain/train/good/003.png",
        "grain/test/stain/001.png",
        "grain/ground_truth/cut/000_mask.png",
    ] {
        let (x, y, z) = (
            std::fs::read(a.path().join(rel)).unwrap(),
            std::fs::read(b.path().join(rel)).unwrap(),
            std::fs::read(c.path().join(rel)).unwrap(),
        );
        assert_eq!(x, y, "{rel}");
        assert_ne!(x, z, "{rel}");
    }
}

/// Mean absolute RGB difference between a defect image and the mean normal
/// image, inside and outside the mask.
fn contrast_inside_outside(root: &std::path::Path, name: &str) -> Vec<(String, f32, f32, f32)> {
    let split = mvtec_category(root, name).unwrap();
    let normals: Vec<_> = split
        .train
        .iter()
        .map(|s| decode_rgb(&s.path).unwrap().into_raw())
        .collect();
    let n = normals[0].len();
    let mean: Vec<f32> = (0..n)
        .map(|i| normals.iter().map(|v| f32::from(v[i])).sum::<f32>() / normals.len() as f32)
        .collect();
    let mut out = Vec::new();
    for s in split.test.iter().filter(|s| s.label == Label::Anomalous) {
        let img = decode_rgb(&s.path).unwrap().into_raw();
        let mask = decode_gray(s.mask.as_ref().unwrap()).unwrap().into_raw();
        let (mut inside, mut n_in, mut outside, mut n_out) = (0f32, 0f32, 0f32, 0f32);
        for (p, &m) in mask.iter().enumerate() {
            let d: f32 = (0..3)
                .map(|c| (f32::from(img[p * 3 + c]) - mean[p * 3 + c]).abs())
                .sum::<f32>()
                / 3.0;
            if m > 127 {
                inside += d;
                n_in += 1.0;
            } else {
                outside += d;
                n_out += 1.0;
            }
        }
        out.push((
            s.defect.clone(),
            inside / n_in.max(1.0),
            outside / n_out,
            n_in / mask.len() as f32,
        ));
    }
    out
}

#[test]
fn defects_are_visible_and_masks_cover_them_for_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        image_size: 96,
        n_train: 6,
        n_test_good: 1,
        n_test_defect: 8,
        seed: 2,
    };
    for kind in SynthKind::ALL {
        generate_category(dir.path(), kind.name(), &cfg).unwrap();
        for (defect, inside, outside, area) in contrast_inside_outside(dir.path(), kind.name()) {
            // Visible: far more change inside the mask than the normal
            // variation outside it; sized: 0.1 % to 5 % of the image area.
            eprintln!(
                "{kind:?}/{defect}: inside {inside:.1}, outside {outside:.1}, area {area:.4}"
            );
            assert!(
                inside > 40.0 && inside > 3.0 * outside,
                "{kind:?}/{defect}: inside {inside}, outside {outside}"
            );
            assert!(
                (0.001..0.05).contains(&area),
                "{kind:?}/{defect}: area {area}"
            );
        }
    }
}

#[test]
fn names_pick_kinds_and_kind_names_select_themselves() {
    for k in SynthKind::ALL {
        assert_eq!(SynthKind::for_name(k.name()), k);
    }
    let kinds: std::collections::HashSet<_> = ff_data::MVTEC_CATEGORIES[..8]
        .iter()
        .map(|n| SynthKind::for_name(n))
        .collect();
    assert!(
        kinds.len() >= 3,
        "names should spread over kinds: {kinds:?}"
    );
}

#[test]
fn bad_synth_config_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(generate_category(
        dir.path(),
        "x",
        &SynthConfig {
            image_size: 4,
            ..small()
        }
    )
    .is_err());
    assert!(generate_category(
        dir.path(),
        "x",
        &SynthConfig {
            n_train: 0,
            ..small()
        }
    )
    .is_err());
}
