//! Checkpoints: the reference's `.pt` format (fixture
//! `tests-fixtures/flow/reference_tiny.pt`, written by
//! `data-scripts/make_flow_fixtures.py`), our safetensors round trip, exact
//! resume of training, and the errors for bad files and mismatched models.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use ff_backbone::det_init::det_value;
use ff_backbone::{Backbone, BackboneKind};
use ff_flow::{
    checkpoint_bytes, load_safetensors, load_state_dict, loss, read_reference_pt,
    split_reference_state_dict, Adam, AdamConfig, Error, FastFlow, FastFlowConfig, FastFlowHead,
    FeatureNorms,
};
use serde_json::Value;

fn reference_doc() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference_tiny.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn build_model(
    cfg: &FastFlowConfig,
    backbone_tensors: HashMap<String, Tensor>,
    varmap: &VarMap,
) -> FastFlow {
    let vb = file_then_det(backbone_tensors);
    let backbone = Backbone::new(BackboneKind::ResNet18, vb).unwrap();
    FastFlow::new(cfg, backbone, 3, fresh_vb(varmap)).unwrap()
}

#[test]
fn reference_pt_reproduces_the_reference_anomaly_map() {
    let doc = reference_doc();
    let cfg = config_of(&doc);
    let sd = read_reference_pt(fixture_dir().join("reference_tiny.pt")).unwrap();
    let parts = split_reference_state_dict(sd);

    // The backbone part keeps timm's names; the fixture kept these few.
    let mut kept: Vec<&String> = parts.backbone.keys().collect();
    kept.sort();
    let expected: Vec<String> = doc["kept_backbone_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, expected.iter().collect::<Vec<_>>());
    assert_eq!(
        parts.backbone["bn1.num_batches_tracked"].dtype(),
        DType::I64
    );
    for (k, t) in &parts.backbone {
        if t.dtype() == DType::F32 {
            let want = Tensor::from_vec(det_value(k, t.dims()), t.dims(), &Device::Cpu).unwrap();
            assert_close(&format!("backbone {k}"), t, &want, 0.0);
        }
    }
    assert!(parts
        .flow
        .keys()
        .all(|k| k.starts_with("norms.") || k.starts_with("nf_flows.")));

    let varmap = VarMap::new();
    let mut model = build_model(&cfg, parts.backbone, &varmap);
    load_state_dict(&mut model, &parts.flow).unwrap();
    let b = doc["batch"].as_u64().unwrap() as usize;
    let s = cfg.input_size;
    let images = det_input("fixture.images", &[b, 3, s, s], 4.0);
    let out = model.forward(&images).unwrap();
    let map = model.anomaly_map(&out).unwrap();
    let want: Vec<f32> = doc["anomaly_map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let want = Tensor::from_vec(want, map.dims(), &Device::Cpu).unwrap();
    assert_close("reference .pt anomaly map", &map, &want, 1e-4);
    let l = loss(&out).unwrap().to_scalar::<f32>().unwrap() as f64;
    let want_loss = doc["loss"].as_f64().unwrap();
    assert!(
        (l - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "loss {l} vs {want_loss}"
    );
}

#[test]
fn corrupt_or_missing_reference_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture_dir().join("reference_tiny.pt")).unwrap();
    let truncated = dir.path().join("truncated.pt");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"this is not a torch zip archive").unwrap();
    let missing = dir.path().join("missing.pt");
    for path in [&truncated, &garbage, &missing] {
        let err = read_reference_pt(path).unwrap_err();
        assert!(matches!(err, Error::ReadCheckpoint { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    // Our own safetensors reader reports the same way.
    let err = load_safetensors(&garbage).unwrap_err();
    assert!(err.to_string().contains("garbage.pt"), "{err}");
}

#[test]
fn reference_pt_with_a_mismatched_config_is_rejected_by_key_and_shape() {
    let doc = reference_doc();
    let parts = split_reference_state_dict(
        read_reference_pt(fixture_dir().join("reference_tiny.pt")).unwrap(),
    );
    let base = config_of(&doc);
    let shapes = base.feature_shapes().unwrap();

    // More flow steps than the file has: the first missing key is named.
    let cfg = FastFlowConfig {
        flow_step: 2,
        ..base.clone()
    };
    let varmap = VarMap::new();
    let mut head = FastFlowHead::new(
        &cfg,
        shapes.clone(),
        FeatureNorms::LayerNorm,
        0,
        fresh_vb(&varmap),
    )
    .unwrap();
    let err = head.load_state_dict(&parts.flow).unwrap_err();
    match &err {
        Error::MissingTensor { key, .. } => assert!(key.contains("module_list.1"), "{err}"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    // A different hidden ratio: the key and both shapes are named.
    let cfg = FastFlowConfig {
        hidden_ratio: 0.25,
        ..base.clone()
    };
    let varmap = VarMap::new();
    let mut head = FastFlowHead::new(
        &cfg,
        shapes.clone(),
        FeatureNorms::LayerNorm,
        0,
        fresh_vb(&varmap),
    )
    .unwrap();
    let err = head.load_state_dict(&parts.flow).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::ShapeMismatch { .. }) && msg.contains("subnet"),
        "{msg}"
    );

    // Another input size: the LayerNorm shapes differ.
    let cfg = FastFlowConfig {
        input_size: 64,
        ..base.clone()
    };
    let varmap = VarMap::new();
    let mut head = FastFlowHead::new(
        &cfg,
        cfg.feature_shapes().unwrap(),
        FeatureNorms::LayerNorm,
        0,
        fresh_vb(&varmap),
    )
    .unwrap();
    let err = head.load_state_dict(&parts.flow).unwrap_err();
    assert!(
        err.to_string().contains("norms.0.weight") || err.to_string().contains("norms.0.bias"),
        "{err}"
    );

    // Handing it backbone tensors too is an error naming them.
    let varmap = VarMap::new();
    let mut head =
        FastFlowHead::new(&base, shapes, FeatureNorms::LayerNorm, 0, fresh_vb(&varmap)).unwrap();
    let mut with_backbone = parts.flow.clone();
    with_backbone.insert(
        "feature_extractor.conv1.weight".into(),
        parts.backbone["conv1.weight"].clone(),
    );
    let err = head.load_state_dict(&with_backbone).unwrap_err();
    assert!(
        err.to_string().contains("feature_extractor.conv1.weight"),
        "{err}"
    );
    // A failed load changes nothing: the correct dict still loads afterwards.
    head.load_state_dict(&parts.flow).unwrap();
}

fn small_head(varmap: &VarMap, seed: u64) -> (FastFlowConfig, FastFlowHead) {
    let cfg = FastFlowConfig {
        input_size: 32,
        flow_step: 2,
        hidden_ratio: 0.25,
        conv3x3_only: false,
        ..FastFlowConfig::resnet18()
    };
    let head = FastFlowHead::new(
        &cfg,
        cfg.feature_shapes().unwrap(),
        FeatureNorms::LayerNorm,
        seed,
        fresh_vb(varmap),
    )
    .unwrap();
    (cfg, head)
}

fn small_features(cfg: &FastFlowConfig, tag: &str) -> Vec<Tensor> {
    cfg.feature_shapes()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, [c, h, w])| det_input(&format!("{tag}.{i}"), &[2, *c, *h, *w], 3.0))
        .collect()
}

fn train_step(head: &FastFlowHead, adam: &mut Adam, cfg: &FastFlowConfig, tag: &str) {
    let l = loss(&head.forward(small_features(cfg, tag)).unwrap()).unwrap();
    adam.step(&l.backward().unwrap()).unwrap();
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn safetensors_round_trip_restores_weights_and_permutations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = FastFlowConfig {
        input_size: 64,
        flow_step: 2,
        hidden_ratio: 0.25,
        ..FastFlowConfig::resnet18()
    };
    let backbone = || {
        Backbone::new(
            BackboneKind::ResNet18,
            ff_backbone::det_init::det_var_builder(DType::F32, &dev()),
        )
        .unwrap()
    };
    let varmap_a = VarMap::new();
    let model_a = FastFlow::new(&cfg, backbone(), 11, fresh_vb(&varmap_a)).unwrap();
    std::fs::write(&path, checkpoint_bytes(&model_a, &HashMap::new()).unwrap()).unwrap();
    let sd = load_safetensors(&path).unwrap();
    // Reference keys: norms, trainable flow tensors and both permutation buffers.
    assert!(sd.contains_key("norms.2.weight"));
    assert!(sd.contains_key("nf_flows.1.module_list.1.w_perm_inv"));
    assert_eq!(
        sd["nf_flows.2.module_list.0.w_perm"].dims(),
        &[256, 256, 1, 1]
    );
    assert!(!dir.path().read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("tmp")));

    // A model drawn from another seed becomes identical after loading.
    let varmap_b = VarMap::new();
    let mut model_b = FastFlow::new(&cfg, backbone(), 12, fresh_vb(&varmap_b)).unwrap();
    assert_ne!(
        model_a.head().flows()[0].steps()[0].permutation().indices(),
        model_b.head().flows()[0].steps()[0].permutation().indices()
    );
    load_state_dict(&mut model_b, &sd).unwrap();
    let images = det_input("roundtrip.images", &[1, 3, 64, 64], 4.0);
    let map_a = model_a
        .anomaly_map(&model_a.forward(&images).unwrap())
        .unwrap();
    let map_b = model_b
        .anomaly_map(&model_b.forward(&images).unwrap())
        .unwrap();
    assert_eq!(bits(&map_a), bits(&map_b));
}

#[test]
fn permutations_are_seeded_and_not_trainable() {
    let (va, vb_) = (VarMap::new(), VarMap::new());
    let (_, a) = small_head(&va, 5);
    let (_, b) = small_head(&vb_, 5);
    let (_, c) = small_head(&VarMap::new(), 6);
    let perm = |h: &FastFlowHead| h.flows()[2].steps()[1].permutation().indices().to_vec();
    assert_eq!(perm(&a), perm(&b));
    assert_ne!(perm(&a), perm(&c));
    let vars = a.trainable_vars().unwrap();
    assert!(vars.iter().all(|(k, _)| !k.contains("w_perm")));
    assert_eq!(va.all_vars().len(), vars.len());
    let buffers = a.buffers().unwrap();
    assert_eq!(buffers.len(), 3 * 2 * 2);
    // Same seed, same initial weights.
    for (pa, pb) in a.params().iter().zip(b.params()) {
        assert_eq!(bits(pa.tensor()), bits(pb.tensor()), "{}", pa.key());
    }
}

#[test]
fn resumed_training_equals_uninterrupted_training_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");

    // Uninterrupted: three steps.
    let varmap = VarMap::new();
    let (cfg, head) = small_head(&varmap, 21);
    let mut adam = Adam::new(head.trainable_vars().unwrap(), AdamConfig::default()).unwrap();
    for tag in ["s0", "s1", "s2"] {
        train_step(&head, &mut adam, &cfg, tag);
    }

    // Interrupted after two steps: checkpoint with optimizer state, then a
    // fresh model (another seed) and optimizer resume for the third.
    let varmap_a = VarMap::new();
    let (_, head_a) = small_head(&varmap_a, 21);
    let mut adam_a = Adam::new(head_a.trainable_vars().unwrap(), AdamConfig::default()).unwrap();
    for tag in ["s0", "s1"] {
        train_step(&head_a, &mut adam_a, &cfg, tag);
    }
    let mut tensors = head_a.state_dict().unwrap();
    for (k, v) in adam_a.state_tensors().unwrap() {
        tensors.insert(format!("optimizer.{k}"), v);
    }
    std::fs::write(&path, ff_flow::checkpoint::tensors_bytes(&tensors).unwrap()).unwrap();

    let loaded = load_safetensors(&path).unwrap();
    let (model_sd, opt_sd): (HashMap<_, _>, HashMap<_, _>) = loaded
        .into_iter()
        .partition(|(k, _)| !k.starts_with("optimizer."));
    let opt_sd: HashMap<String, Tensor> = opt_sd
        .into_iter()
        .map(|(k, v)| (k["optimizer.".len()..].to_string(), v))
        .collect();
    let varmap_b = VarMap::new();
    let (_, mut head_b) = small_head(&varmap_b, 99);
    head_b.load_state_dict(&model_sd).unwrap();
    let mut adam_b = Adam::new(head_b.trainable_vars().unwrap(), AdamConfig::default()).unwrap();
    adam_b.load_state(adam_a.step_count(), &opt_sd).unwrap();
    train_step(&head_b, &mut adam_b, &cfg, "s2");

    assert_eq!(adam_b.step_count(), 3);
    for (p, q) in head.params().iter().zip(head_b.params()) {
        assert_eq!(p.key(), q.key());
        assert_eq!(
            bits(p.tensor()),
            bits(q.tensor()),
            "{} differs after resume",
            p.key()
        );
    }

    // Optimizer state missing a tensor is a clear error.
    let mut partial = opt_sd.clone();
    let removed = partial.keys().next().unwrap().clone();
    partial.remove(&removed);
    let err = adam_b.load_state(2, &partial).unwrap_err();
    assert!(err.to_string().contains(&removed), "{err}");
}

#[test]
fn load_state_dict_rejects_bad_permutations() {
    let varmap = VarMap::new();
    let (_, mut head) = small_head(&varmap, 1);
    let mut sd = head.state_dict().unwrap();
    let key = "nf_flows.0.module_list.0.w_perm".to_string();
    let c = 64;
    // Two ones in a row is not a permutation.
    let mut w = vec![0f32; c * c];
    for i in 0..c {
        w[i * c + i] = 1.0;
    }
    w[1] = 1.0;
    sd.insert(
        key.clone(),
        Tensor::from_vec(w, (c, c, 1, 1), &Device::Cpu).unwrap(),
    );
    let err = head.load_state_dict(&sd).unwrap_err();
    assert!(
        matches!(err, Error::InvalidPermutation { .. }) && err.to_string().contains(&key),
        "{err}"
    );

    // w_perm_inv that is not the transpose of w_perm.
    let mut sd = head.state_dict().unwrap();
    let inv = "nf_flows.1.module_list.1.w_perm_inv".to_string();
    let other = sd["nf_flows.1.module_list.0.w_perm"].clone();
    sd.insert(inv.clone(), other);
    let err = head.load_state_dict(&sd).unwrap_err();
    assert!(err.to_string().contains(&inv), "{err}");
}

#[test]
fn model_rejects_a_backbone_of_another_kind() {
    let cfg = FastFlowConfig {
        input_size: 64,
        flow_step: 1,
        ..FastFlowConfig::wide_resnet50_2()
    };
    let backbone = Backbone::new(
        BackboneKind::ResNet18,
        ff_backbone::det_init::det_var_builder(DType::F32, &dev()),
    )
    .unwrap();
    let err = FastFlow::new(&cfg, backbone, 0, fresh_vb(&VarMap::new())).unwrap_err();
    assert!(
        err.to_string().contains("resnet18") && err.to_string().contains("wide_resnet50_2"),
        "{err}"
    );
}

#[test]
fn a_non_trainable_builder_is_refused() {
    let cfg = FastFlowConfig {
        input_size: 32,
        flow_step: 1,
        ..FastFlowConfig::resnet18()
    };
    let vb = ff_backbone::det_init::det_var_builder(DType::F32, &dev());
    let err = FastFlowHead::new(
        &cfg,
        cfg.feature_shapes().unwrap(),
        FeatureNorms::LayerNorm,
        0,
        vb,
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotTrainable { .. }), "{err}");
}

#[test]
fn a_bare_state_dict_pt_is_read_too() {
    let sd = read_reference_pt(fixture_dir().join("bare_state_dict.pt")).unwrap();
    let mut keys: Vec<&String> = sd.keys().collect();
    keys.sort();
    assert_eq!(keys, ["norms.0.bias", "norms.0.weight"]);
    for (k, t) in &sd {
        assert_eq!(t.dims(), &[2, 2, 2]);
        let want = Tensor::from_vec(det_value(k, t.dims()), t.dims(), &Device::Cpu).unwrap();
        assert_close(k, t, &want, 0.0);
    }
}

/// Tensors a VarMap already holds are taken as they are, not re-initialised,
/// so a model can be built over a VarMap filled beforehand.
#[test]
fn existing_varmap_tensors_are_kept() {
    let varmap = VarMap::new();
    let (_, a) = small_head(&varmap, 1);
    let key = "nf_flows.1.module_list.0.subnet.0.weight";
    let p = a
        .params()
        .into_iter()
        .find(|p| p.key() == key)
        .unwrap()
        .clone();
    p.var()
        .unwrap()
        .set(&p.tensor().ones_like().unwrap())
        .unwrap();
    let (_, b) = small_head(&varmap, 2);
    let q = b
        .params()
        .into_iter()
        .find(|q| q.key() == key)
        .unwrap()
        .clone();
    assert!(to_f64(q.tensor()).iter().all(|&v| v == 1.0));
    assert_eq!(varmap.all_vars().len(), a.params().len());
}
