//! How the DeiT and CaiT extractors take their weights and inputs: timm key
//! names from a memory-mapped safetensors file (extra keys ignored), clear
//! errors for missing keys, wrong shapes and wrong input sizes, and the seeded
//! timm-style random init.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{small_cait, small_deit};
use ff_backbone::det_init::{det_uniform, det_value, det_var_builder};
use ff_backbone::vit::cait::Cait;
use ff_backbone::vit::deit::Deit;
use ff_backbone::vit::VitConfig;
use ff_backbone::{
    backbone_var_builder, safetensors_var_builder, BackboneKind, Error, WeightSource,
};

/// The timm 0.5.4 state-dict keys and shapes of a small distilled ViT with
/// `depth` blocks, width 64, 4 heads, 64-px input and a 10-class head.
fn deit_state_dict_shapes(depth: usize) -> Vec<(String, Vec<usize>)> {
    let c = 64;
    let mut keys = vec![
        ("cls_token".to_string(), vec![1, 1, c]),
        ("dist_token".to_string(), vec![1, 1, c]),
        ("pos_embed".to_string(), vec![1, 18, c]),
        ("patch_embed.proj.weight".to_string(), vec![c, 3, 16, 16]),
        ("patch_embed.proj.bias".to_string(), vec![c]),
        ("norm.weight".to_string(), vec![c]),
        ("norm.bias".to_string(), vec![c]),
        ("head.weight".to_string(), vec![10, c]),
        ("head.bias".to_string(), vec![10]),
        ("head_dist.weight".to_string(), vec![10, c]),
        ("head_dist.bias".to_string(), vec![10]),
    ];
    for i in 0..depth {
        let p = format!("blocks.{i}");
        for (name, dims) in [
            ("norm1.weight", vec![c]),
            ("norm1.bias", vec![c]),
            ("attn.qkv.weight", vec![3 * c, c]),
            ("attn.qkv.bias", vec![3 * c]),
            ("attn.proj.weight", vec![c, c]),
            ("attn.proj.bias", vec![c]),
            ("norm2.weight", vec![c]),
            ("norm2.bias", vec![c]),
            ("mlp.fc1.weight", vec![4 * c, c]),
            ("mlp.fc1.bias", vec![4 * c]),
            ("mlp.fc2.weight", vec![c, 4 * c]),
            ("mlp.fc2.bias", vec![c]),
        ] {
            keys.push((format!("{p}.{name}"), dims));
        }
    }
    keys
}

fn det_tensors(keys: &[(String, Vec<usize>)]) -> HashMap<String, Tensor> {
    keys.iter()
        .map(|(k, dims)| {
            let t = Tensor::from_vec(det_value(k, dims), dims.as_slice(), &Device::Cpu)
                .expect("tensor");
            (k.clone(), t)
        })
        .collect()
}

fn input(name: &str, dims: (usize, usize, usize, usize)) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    let v: Vec<f32> = det_uniform(name, n)
        .into_iter()
        .map(|u| (u * 4.0) as f32)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("input")
}

#[test]
fn deit_loads_timm_keys_from_a_mapped_safetensors_file() {
    // A whole 3-block timm state dict, heads included: the extractor must take
    // blocks 0..1 and the final norm by their timm names and ignore the rest.
    let tensors = det_tensors(&deit_state_dict_shapes(3));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deit_small.safetensors");
    candle_core::safetensors::save(&tensors, &path).expect("save");

    let from_file = Deit::with_config(
        &small_deit(),
        safetensors_var_builder(&path, &Device::Cpu).expect("vb"),
    )
    .expect("build from file");
    let from_det = Deit::with_config(&small_deit(), det_var_builder(DType::F32, &Device::Cpu))
        .expect("build from det_init");
    let x = input("vit_input.loading", (1, 3, 64, 64));
    let a: Vec<f32> = from_file
        .features(&x)
        .expect("forward")
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("a");
    let b: Vec<f32> = from_det
        .features(&x)
        .expect("forward")
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("b");
    assert_eq!(a, b, "file weights must give exactly the det_init features");
}

#[test]
fn missing_key_is_named() {
    let mut tensors = det_tensors(&deit_state_dict_shapes(3));
    tensors.remove("blocks.1.attn.qkv.weight");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    match Deit::with_config(&small_deit(), vb) {
        Err(Error::MissingTensor { key }) => assert_eq!(key, "blocks.1.attn.qkv.weight"),
        other => panic!("expected MissingTensor, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn position_embedding_of_another_size_is_a_shape_error() {
    // Weights for 64-px inputs (18 tokens) cannot serve a 128-px model (66 tokens).
    let tensors = det_tensors(&deit_state_dict_shapes(2));
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let cfg = VitConfig {
        img_size: 128,
        ..small_deit()
    };
    match Deit::with_config(&cfg, vb) {
        Err(Error::ShapeMismatch {
            key,
            expected,
            found,
        }) => {
            assert_eq!(key, "pos_embed");
            assert_eq!(expected, vec![1, 66, 64]);
            assert_eq!(found, vec![1, 18, 64]);
        }
        other => panic!("expected ShapeMismatch, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn wrong_input_size_is_an_input_shape_error() {
    let vb = det_var_builder(DType::F32, &Device::Cpu);
    let cait = Cait::with_config(&small_cait(), vb).expect("build");
    let x = input("vit_input.wrong", (1, 3, 48, 64));
    match cait.features(&x) {
        Err(Error::InputShape { found, message }) => {
            assert_eq!(found, vec![1, 3, 48, 64]);
            assert!(message.contains("64"), "{message}");
        }
        other => panic!("expected InputShape, got {:?}", other.map(|_| ())),
    }
    let gray = input("vit_input.gray", (1, 1, 64, 64));
    assert!(matches!(
        cait.features(&gray),
        Err(Error::InputShape { .. })
    ));
}

#[test]
fn inconsistent_config_is_rejected() {
    let vb = det_var_builder(DType::F32, &Device::Cpu);
    let cfg = VitConfig {
        n_blocks_used: 4,
        ..small_cait()
    };
    let err = Cait::with_config(&cfg, vb).expect_err("must fail");
    assert!(
        err.to_string().contains("n_blocks_used 4 exceeds depth 3"),
        "{err}"
    );
}

#[test]
fn random_init_source_builds_both_transformers() {
    let dev = Device::Cpu;
    let x = input("vit_input.random", (1, 3, 64, 64));
    let run_cait = |seed| {
        let vb = backbone_var_builder(
            BackboneKind::CaitM48_448,
            &WeightSource::Random { seed },
            &dev,
        )
        .expect("vb");
        let cait = Cait::with_config(&small_cait(), vb).expect("build");
        let y: Vec<f32> = cait
            .features(&x)
            .expect("forward")
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("y");
        y
    };
    let a = run_cait(5);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, run_cait(5), "same seed, same features");
    assert_ne!(a, run_cait(6), "another seed, other features");

    let vb = backbone_var_builder(
        BackboneKind::DeitBaseDistilled384,
        &WeightSource::Random { seed: 5 },
        &dev,
    )
    .expect("vb");
    let deit = Deit::with_config(&small_deit(), vb).expect("build");
    let y = deit.features(&x).expect("forward");
    assert_eq!(y.dims(), &[1, 64, 4, 4]);
    let v: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("y");
    assert!(v.iter().all(|v| v.is_finite()));
    // The final LayerNorm (weight 1, bias 0 at init) makes every token zero-mean, unit-variance.
    let token0: Vec<f32> = (0..64).map(|c| v[c * 16]).collect();
    let mean = token0.iter().sum::<f32>() / 64.0;
    assert!(mean.abs() < 1e-4, "mean {mean}");
}
