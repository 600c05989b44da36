//! Helpers shared by the ff-backbone integration tests: fixture access, the
//! fixture inputs, error measures and weight files written from det_init.

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use ff_backbone::det_init::{det_backend, det_uniform};
use ff_backbone::{Backbone, BackboneKind};

#[path = "../route/mod.rs"]
mod route;
#[allow(unused_imports)] // not every test binary names its route
pub use route::{dev, route_note};

/// The fixture written by `data-scripts/make_backbone_fixtures.py`.
pub fn resnet_fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests-fixtures/backbone/resnet.safetensors")
}

/// The input of fixture case `case`: `4 * det_uniform("input.<case>")` cast
/// to f32, as `cnn_input` in the fixture script computes it, on the route's
/// device.
pub fn det_input(case: &str, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = det_uniform(&format!("input.{case}"), n)
        .into_iter()
        .map(|u| (4.0 * u) as f32)
        .collect();
    Tensor::from_vec(values, dims, &dev()).expect("input tensor")
}

/// `max |a - b| / max |b|`, the relative error the parity tests bound
/// (computed on the CPU, wherever `a` lives).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = &a.to_device(&Device::Cpu).expect("to the CPU");
    let b = &b.to_device(&Device::Cpu).expect("to the CPU");
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    let scale = b
        .abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("scale");
    diff / scale
}

/// A tensor key with its shape.
pub type KeyShape = (String, Vec<usize>);

/// A det_init backend that records every (key, shape) a model asks for.
#[derive(Clone, Default)]
pub struct Recording {
    pub requests: Arc<Mutex<Vec<KeyShape>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requests
            .lock()
            .expect("lock")
            .push((name.to_string(), s.dims().to_vec()));
        det_backend().get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        det_backend().get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        det_backend().contains_tensor(name)
    }
}

/// Every (key, shape) the backbone of `kind` asks for, in request order.
pub fn requested_keys(kind: BackboneKind) -> Vec<KeyShape> {
    let rec = Recording::default();
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    Backbone::new(kind, vb).expect("build with det weights");
    let out = rec.requests.lock().expect("lock").clone();
    out
}

/// The det_init tensors of every key `kind` asks for, as a hub file would
/// hold them.
pub fn det_tensors(kind: BackboneKind) -> HashMap<String, Tensor> {
    ff_backbone::source_tensors(
        kind,
        &ff_backbone::WeightSource::Deterministic,
        &Device::Cpu,
    )
    .expect("det tensors")
}

/// Writes `tensors` as a safetensors file at `path`.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).expect("write safetensors");
}

/// The small DeiT that `data-scripts/make_vit_fixtures.py` builds in timm
/// (same architecture as deit_base_distilled_patch16_384, 64 wide, 64 px).
pub fn small_deit() -> ff_backbone::vit::VitConfig {
    ff_backbone::vit::VitConfig {
        embed_dim: 64,
        depth: 3,
        n_heads: 4,
        mlp_ratio: 4.0,
        patch: 16,
        img_size: 64,
        n_blocks_used: 2,
    }
}

/// The small CaiT that `data-scripts/make_vit_fixtures.py` builds in timm:
/// the same numbers as [`small_deit`] (the script gives both one size).
pub fn small_cait() -> ff_backbone::vit::VitConfig {
    small_deit()
}
