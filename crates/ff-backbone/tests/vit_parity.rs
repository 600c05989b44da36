//! Parity of the DeiT and CaiT feature extractors with timm 0.5.4 (small
//! same-architecture configs and the full-size models), with fixture weights
//! from `det_init` and targets written by `data-scripts/make_vit_fixtures.py`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{dev, route_note, small_cait, small_deit};
use ff_backbone::det_init::{det_uniform, det_var_builder};
use ff_backbone::vit::cait::Cait;
use ff_backbone::vit::deit::Deit;

/// Largest accepted |rust - timm| over the largest |timm| of the compared values.
const REL_TOL: f64 = 1e-4;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests-fixtures/vit")
        .join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

fn values(t: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    t[key]
        .flatten_all()
        .and_then(|x| x.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("fixture tensor {key}: {e}"))
}

/// The twin of `vit_input` in the fixture script: `det_uniform(name) * 4`.
fn vit_input(name: &str, dims: (usize, usize, usize, usize)) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    let v: Vec<f32> = det_uniform(name, n)
        .into_iter()
        .map(|u| (u * 4.0) as f32)
        .collect();
    Tensor::from_vec(v, dims, &dev()).expect("input tensor")
}

/// Asserts max |actual - expected| <= REL_TOL * max |expected|.
fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected
        .iter()
        .fold(0f64, |m, &e| m.max(f64::from(e).abs()));
    let (worst, diff) = actual
        .iter()
        .zip(expected)
        .map(|(&a, &e)| (f64::from(a) - f64::from(e)).abs())
        .enumerate()
        .fold(
            (0, 0f64),
            |(wi, wd), (i, d)| if d > wd { (i, d) } else { (wi, wd) },
        );
    assert!(
        diff <= REL_TOL * scale,
        "{what}: max |diff| {diff:.3e} at {worst} (rust {}, timm {}) exceeds {REL_TOL} x {scale:.3}",
        actual[worst],
        expected[worst]
    );
}

/// Compares a full-size map with the stored strided subsample and per-channel stats.
fn assert_matches_full(features: &Tensor, fx: &HashMap<String, Tensor>, what: &str) {
    let shape: Vec<i64> = fx["shape"].to_vec1().expect("shape");
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    assert_eq!(features.dims(), dims.as_slice(), "{what}: shape");
    let stride = fx["stride"].to_vec1::<i64>().expect("stride")[0] as usize;
    let flat: Vec<f32> = features
        .flatten_all()
        .and_then(|x| x.to_vec1())
        .expect("features");
    let sub: Vec<f32> = flat.iter().step_by(stride).copied().collect();
    assert_close(
        &sub,
        &values(fx, "output_sub"),
        &format!("{what} subsample"),
    );

    let (c, hw) = (dims[1], dims[2] * dims[3]);
    let mut mean = Vec::with_capacity(c);
    let mut std = Vec::with_capacity(c);
    for ch in flat.chunks(hw).take(c) {
        let m = ch.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64;
        let var = ch.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / hw as f64;
        mean.push(m as f32);
        std.push(var.sqrt() as f32);
    }
    assert_close(
        &mean,
        &values(fx, "channel_mean"),
        &format!("{what} channel mean"),
    );
    assert_close(
        &std,
        &values(fx, "channel_std"),
        &format!("{what} channel std"),
    );
}

#[test]
fn deit_small_matches_timm() {
    let vb = det_var_builder(DType::F32, &dev());
    let deit = Deit::with_config(&small_deit(), vb).expect("build");
    let x = vit_input("vit_input.deit_small", (2, 3, 64, 64));
    let y = deit.features(&x).expect("forward");
    assert_eq!(y.dims(), &[2, 64, 4, 4]);
    let flat: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("y");
    assert_close(
        &flat,
        &values(&fixture("deit_small.safetensors"), "output"),
        "deit small",
    );
}

#[test]
fn cait_small_matches_timm() {
    let vb = det_var_builder(DType::F32, &dev());
    let cait = Cait::with_config(&small_cait(), vb).expect("build");
    let x = vit_input("vit_input.cait_small", (2, 3, 64, 64));
    let y = cait.features(&x).expect("forward");
    assert_eq!(y.dims(), &[2, 64, 4, 4]);
    let flat: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("y");
    assert_close(
        &flat,
        &values(&fixture("cait_small.safetensors"), "output"),
        "cait small",
    );
}

#[test]
fn deit_base_distilled_384_matches_timm() {
    let vb = det_var_builder(DType::F32, &dev());
    let deit = Deit::new(vb).expect("build");
    let x = vit_input("vit_input.deit_full", (1, 3, 384, 384));
    let y = deit.features(&x).expect("forward");
    assert_matches_full(
        &y,
        &fixture("deit_full.safetensors"),
        "deit_base_distilled_384",
    );
}

#[test]
fn cait_m48_448_matches_timm() {
    let vb = det_var_builder(DType::F32, &dev());
    let cait = Cait::new(vb).expect("build");
    let x = vit_input("vit_input.cait_full", (1, 3, 448, 448));
    let y = cait.features(&x).expect("forward");
    assert_matches_full(&y, &fixture("cait_full.safetensors"), "cait_m48_448");
}

/// Names the route this run checks (run with `--nocapture` to see it).
#[test]
fn route_of_this_run() {
    let note = route_note();
    println!("ff-backbone parity {note}");
    assert!(note.starts_with("route: "));
}
