//! Parity of resizing, mode conversion and normalisation with PIL/torchvision.
//!
//! Fixtures: `tests-fixtures/data/`, written by `data-scripts/make_data_fixtures.py`
//! (PIL 13 / torchvision 0.20.1). The large source images are not stored:
//! `pattern` and `mask_pattern` below reproduce the script's integer
//! generators bit for bit.

use std::path::{Path, PathBuf};

use ff_data::{
    binarize_mask, decode_gray, decode_rgb, resize_bilinear_antialias,
    resize_bilinear_antialias_raw, resize_shorter_side, Preprocess,
};
use image::RgbImage;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests-fixtures/data")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

fn noise(x: i64, y: i64, seed: i64) -> i64 {
    let v = ((x * 73856093) ^ (y * 19349663) ^ (seed * 83492791)) as u64 & 0xFFFF_FFFF;
    let v = v.wrapping_mul(2654435761) & 0xFFFF_FFFF;
    let v = v ^ (v >> 15);
    ((v >> 8) % 49) as i64 - 24
}

/// `pattern()` of make_data_fixtures.py.
fn pattern(w: usize, h: usize, seed: i64) -> RgbImage {
    let (wi, hi) = (w as i64, h as i64);
    let rad = wi.min(hi) / 6;
    let mut img = RgbImage::new(w as u32, h as u32);
    for y in 0..hi {
        for x in 0..wi {
            let mut px = [
                (x * 255) / (wi - 1).max(1),
                (y * 255) / (hi - 1).max(1),
                255 - ((x + y) * 255) / (wi + hi - 2).max(1),
            ];
            if 2 * x < wi && 2 * y < hi {
                let v = if ((x / 37) + (y / 37)) % 2 == 1 {
                    230
                } else {
                    25
                };
                px = [v; 3];
            }
            if (4 * x - 3 * wi).pow(2) + (4 * y - hi).pow(2) < (4 * rad).pow(2) {
                px = [250, 40, 120];
            }
            if 2 * x < wi && 2 * y >= hi && x % 11 == 0 {
                px = [0; 3];
            }
            if 2 * x >= wi && 2 * y >= hi {
                for (c, p) in px.iter_mut().enumerate() {
                    *p += noise(x, y, seed * 3 + c as i64);
                }
            }
            img.put_pixel(
                x as u32,
                y as u32,
                image::Rgb(px.map(|v| v.clamp(0, 255) as u8)),
            );
        }
    }
    img
}

/// `mask_pattern()` of make_data_fixtures.py, `[h, w]` uint8.
fn mask_pattern(w: usize, h: usize) -> Vec<u8> {
    let (wi, hi) = (w as i64, h as i64);
    let mut out = Vec::with_capacity(w * h);
    for y in 0..hi {
        for x in 0..wi {
            let ell =
                (3 * (2 * x - wi)).pow(2) + (5 * (2 * y - hi)).pow(2) < (wi * 3 / 2).pow(2) / 4;
            let line = y >= hi / 5 && y < hi / 5 + 2 && x >= wi / 8 && x < wi * 7 / 8;
            let speck = x >= wi - 40 && x < wi - 37 && y >= hi - 40 && y < hi - 37;
            out.push(if ell || line || speck { 255 } else { 0 });
        }
    }
    out
}

/// Largest absolute difference, and how many values differ at all.
fn max_diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold((0, 0), |(m, n), (&x, &y)| {
        let d = x.abs_diff(y);
        (m.max(d), n + usize::from(d > 0))
    })
}

fn load_expected_rgb(rel: &str) -> RgbImage {
    image::open(fixtures().join(rel))
        .expect("expected fixture")
        .into_rgb8()
}

#[test]
fn resize_matches_pil_bit_for_bit() {
    let m = manifest();
    for case in m["resize"].as_array().expect("resize cases") {
        let name = case["name"].as_str().expect("name");
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let size = case["size"].as_u64().unwrap() as usize;
        let src = pattern(w, h, case["seed"].as_i64().unwrap());
        let out = match case["op"].as_str().unwrap() {
            "shorter_side" => resize_shorter_side(&src, size),
            _ => resize_bilinear_antialias(&src, size, size),
        };
        let expected = load_expected_rgb(case["expected"].as_str().unwrap());
        assert_eq!(
            out.dimensions(),
            expected.dimensions(),
            "{name}: output size"
        );
        assert_eq!(
            out.width() as u64,
            case["out_width"].as_u64().unwrap(),
            "{name}: torchvision's output width"
        );
        // Asserts: every value equals PIL's (resize.rs transcribes PIL's
        // antialiased bilinear filter and its fixed-point rounding).
        let (d, n) = max_diff(out.as_raw(), expected.as_raw());
        assert_eq!(
            (d, n),
            (0, 0),
            "{name}: max difference {d} levels ({n} values differ)"
        );
    }
}

#[test]
fn mask_resize_matches_pil_and_binarises_at_half() {
    let m = manifest();
    for case in m["masks"].as_array().expect("mask cases") {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let size = case["size"].as_u64().unwrap() as usize;
        let out = resize_bilinear_antialias_raw(&mask_pattern(w, h), w, h, 1, size, size);
        let expected = image::open(fixtures().join(case["expected"].as_str().unwrap()))
            .expect("expected mask")
            .into_luma8();
        // Asserts: the resized mask equals PIL's value for value, and
        // binarising it (> 127) flags exactly the pixels the reference's
        // `ToTensor() > 0.5` flags.
        let (d, _) = max_diff(&out, expected.as_raw());
        assert_eq!(d, 0, "mask {w}x{h}->{size}: max difference {d}");
        let ours = binarize_mask(&out);
        let theirs: Vec<bool> = expected
            .as_raw()
            .iter()
            .map(|&v| f32::from(v) / 255.0 > 0.5)
            .collect();
        let disagree = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(disagree, 0, "mask {w}x{h}->{size}: binarisation differs");
        // Asserts the case tests something: the resize produced intermediate
        // values (so the threshold decides) and both classes occur.
        assert!(out.iter().any(|&v| v > 0 && v < 255));
        assert!(ours.iter().any(|&b| b) && ours.iter().any(|&b| !b));
    }
}

#[test]
fn full_pipeline_matches_torchvision_normalisation() {
    let m = manifest();
    let p = &m["pipeline"];
    let (w, h) = (
        p["width"].as_u64().unwrap() as usize,
        p["height"].as_u64().unwrap() as usize,
    );
    let pre = Preprocess::imagenet(p["size"].as_u64().unwrap() as usize);
    let t = pre.preprocess_rgb(&pattern(w, h, p["seed"].as_i64().unwrap()));
    let shape: Vec<usize> = p["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(vec![t.channels, t.height, t.width], shape);
    // Asserts: with the resize bit-exact (tested above), ToTensor + Normalize
    // in f32 agree with torchvision's at every sampled index to 1e-6 (float
    // rounding; one 8-bit level is 1/255/std, about 0.017), and each
    // channel's sum to 1e-3.
    for (i, v) in p["index"]
        .as_array()
        .unwrap()
        .iter()
        .zip(p["value"].as_array().unwrap())
    {
        let (i, v) = (i.as_u64().unwrap() as usize, v.as_f64().unwrap() as f32);
        assert!(
            (t.data[i] - v).abs() <= 1e-6,
            "value {i}: {} vs {v}",
            t.data[i]
        );
    }
    let plane = t.height * t.width;
    for (c, s) in p["channel_sum"].as_array().unwrap().iter().enumerate() {
        let ours: f64 = t.data[c * plane..(c + 1) * plane]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        let theirs = s.as_f64().unwrap();
        assert!(
            (ours - theirs).abs() <= 1e-3,
            "channel {c}: {ours} vs {theirs}"
        );
    }
}

#[test]
fn input_modes_convert_to_rgb_like_pil() {
    let m = manifest();
    for case in m["modes"].as_array().expect("mode cases") {
        let name = case["name"].as_str().unwrap();
        let tol = case["tolerance"].as_u64().unwrap() as u8;
        let rgb = decode_rgb(&fixtures().join(case["source"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = resize_shorter_side(&rgb, 32);
        let expected = load_expected_rgb(case["expected"].as_str().unwrap());
        assert_eq!(out.dimensions(), expected.dimensions(), "{name}");
        // Asserts: the decoded RGB (after the same resize) is within the
        // manifest's per-mode tolerance of PIL's `convert("RGB")`: 1 level
        // for lossless modes, 6 for JPEG, whose decoders may differ (the
        // lossless ones measure 0 levels today, 16-bit RGB 1).
        let (d, n) = max_diff(out.as_raw(), expected.as_raw());
        eprintln!("{name}: max diff {d}, {n} values differ");
        assert!(d <= tol, "{name}: max difference {d} > {tol}");
    }
}

#[test]
fn masks_decode_with_pil_luma() {
    // Asserts: an RGB mask decodes to PIL's `convert("L")` of its pure
    // colours, exactly.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.png");
    let img = RgbImage::from_fn(4, 1, |x, _| {
        image::Rgb([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]][x as usize])
    });
    img.save(&path).unwrap();
    let g = decode_gray(&path).unwrap();
    // PIL: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16 -> 76, 150, 29, 255.
    assert_eq!(g.as_raw(), &[76, 150, 29, 255]);
}
