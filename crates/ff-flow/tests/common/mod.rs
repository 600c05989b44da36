//! Shared helpers of the ff-flow integration tests: fixture loading (files
//! written by `data-scripts/make_flow_fixtures.py`), closed-form weights and
//! inputs, and tolerance comparisons against the PyTorch reference.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ff_backbone::det_init::{det_uniform, det_value, ClosedForm};
use ff_flow::{FastFlowConfig, FastFlowHead, Permutation};
use serde_json::Value;

#[path = "../../../ff-backbone/tests/route/mod.rs"]
mod route;
#[allow(unused_imports)] // not every test binary names its route
pub use route::{dev, route_note};

/// The folder of the flow fixtures.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests-fixtures/flow")
}

/// A case's JSON document and full tensors.
pub struct Case {
    pub doc: Value,
    pub tensors: HashMap<String, Tensor>,
}

pub fn load_case(name: &str) -> Case {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("fixture json");
    let doc: Value = serde_json::from_str(&text).expect("fixture json parses");
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .expect("fixture safetensors");
    Case { doc, tensors }
}

pub fn config_of(doc: &Value) -> FastFlowConfig {
    serde_json::from_value(doc["config"].clone()).expect("fixture config is a FastFlowConfig")
}

/// `scale * det_uniform(key)` as the fixture script makes its inputs, on the
/// route's device.
pub fn det_input(key: &str, dims: &[usize], scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = det_uniform(key, n)
        .into_iter()
        .map(|u| (scale * u) as f32)
        .collect();
    Tensor::from_vec(v, dims, &dev()).unwrap()
}

/// The state dict the fixture's reference model had before training: det
/// values for every trainable tensor, permutation matrices from the fixture.
pub fn fixture_state_dict(head: &FastFlowHead, perms: &Value) -> HashMap<String, Tensor> {
    let mut sd = HashMap::new();
    for p in head.params() {
        let v = det_value(p.key(), p.tensor().dims());
        sd.insert(
            p.key().to_string(),
            Tensor::from_vec(v, p.tensor().dims(), &dev()).unwrap(),
        );
    }
    for (i, scale) in perms.as_array().unwrap().iter().enumerate() {
        for (k, perm) in scale.as_array().unwrap().iter().enumerate() {
            let idx: Vec<u32> = perm
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let key = format!("nf_flows.{i}.module_list.{k}.w_perm");
            let p = Permutation::new(idx, &dev(), &key).unwrap();
            sd.insert(key.clone(), p.matrix(DType::F32).unwrap());
            sd.insert(format!("{key}_inv"), p.inverse_matrix(DType::F32).unwrap());
        }
    }
    sd
}

/// A trainable builder over a fresh VarMap.
pub fn fresh_vb(varmap: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, DType::F32, &dev())
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("a number")
}

/// Compares a tensor with the reference's statistics: shape, sum (relative
/// to the sum of magnitudes), sum of magnitudes, sum of squares, and the
/// sampled elements (relative to the larger of the element and the tensor's
/// root mean square).
pub fn assert_stats(what: &str, t: &Tensor, s: &Value, rtol: f64) {
    let shape: Vec<usize> = s["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(t.dims(), shape.as_slice(), "{what}: shape");
    let a = to_f64(t);
    let n = a.len() as f64;
    let sum: f64 = a.iter().sum();
    let sum_abs: f64 = a.iter().map(|v| v.abs()).sum();
    let sum_sq: f64 = a.iter().map(|v| v * v).sum();
    let (ref_sum, ref_abs, ref_sq) = (f(&s["sum"]), f(&s["sum_abs"]), f(&s["sum_sq"]));
    assert!(
        (sum - ref_sum).abs() <= rtol * ref_abs + 1e-30,
        "{what}: sum {sum} vs reference {ref_sum} (sum |x| {ref_abs})"
    );
    assert!(
        (sum_abs - ref_abs).abs() <= rtol * ref_abs + 1e-30,
        "{what}: sum |x| {sum_abs} vs {ref_abs}"
    );
    assert!(
        (sum_sq - ref_sq).abs() <= 2.0 * rtol * ref_sq + 1e-30,
        "{what}: sum x^2 {sum_sq} vs {ref_sq}"
    );
    let rms = (ref_sq / n).sqrt();
    let idx = s["idx"].as_array().unwrap();
    let vals = s["values"].as_array().unwrap();
    assert!(!idx.is_empty(), "{what}: no samples");
    for (i, v) in idx.iter().zip(vals) {
        let i = i.as_u64().unwrap() as usize;
        let (got, want) = (a[i], f(v));
        assert!(
            (got - want).abs() <= rtol * want.abs().max(rms),
            "{what}[{i}]: {got} vs reference {want} (rms {rms})"
        );
    }
}

/// Compares whole tensors elementwise, relative to the larger of the element
/// and the reference's root mean square.
pub fn assert_close(what: &str, t: &Tensor, want: &Tensor, rtol: f64) {
    assert_eq!(t.dims(), want.dims(), "{what}: shape");
    let a = to_f64(t);
    let b = to_f64(want);
    let rms = (b.iter().map(|v| v * v).sum::<f64>() / b.len().max(1) as f64).sqrt();
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let tol = rtol * y.abs().max(rms);
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: {x} vs reference {y} (tolerance {tol})"
        );
        worst = worst.max((x - y).abs() / y.abs().max(rms).max(1e-30));
    }
    eprintln!("{what}: worst relative difference {worst:.2e}");
}

/// A `VarBuilder` for a backbone whose weights come from a reference
/// checkpoint, with det_init values for the tensors a size-trimmed fixture
/// leaves out (det_init values in the reference too).
pub fn file_then_det(file: HashMap<String, Tensor>) -> VarBuilder<'static> {
    let values = move |name: &str, dims: &[usize]| match file.get(name) {
        Some(t) => {
            assert_eq!(t.dims(), dims, "{name}");
            t.to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("a float tensor")
        }
        None => det_value(name, dims),
    };
    VarBuilder::from_backend(
        Box::new(ClosedForm::new("file then det_init", values)),
        DType::F32,
        dev(),
    )
}
