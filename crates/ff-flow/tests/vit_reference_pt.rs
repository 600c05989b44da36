//! Reference-format `.pt` checkpoints with the transformer backbones (DeiT-base
//! distilled 384, CaiT-M48 448): loading them the way the CLI does reproduces
//! the anomaly map the reference computes. Fixtures `tests-fixtures/vit_pt/`,
//! written by `data-scripts/make_vit_pt_fixtures.py`.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use common::*;
use ff_backbone::det_init::det_value;
use ff_backbone::Backbone;
use ff_flow::{load_state_dict, loss, read_reference_pt, split_reference_state_dict, FastFlow};
use serde_json::Value;

fn vit_pt_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests-fixtures/vit_pt")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The one-hot `w_perm` (`w[i, p[i]] = 1`) and its transpose `w_perm_inv`,
/// as FrEIA stores them: `[C, C, 1, 1]`.
fn permutation_matrices(p: &[usize]) -> (Tensor, Tensor) {
    let c = p.len();
    let mut w = vec![0f32; c * c];
    let mut w_inv = vec![0f32; c * c];
    for (i, &j) in p.iter().enumerate() {
        w[i * c + j] = 1.0;
        w_inv[j * c + i] = 1.0;
    }
    let dims = (c, c, 1, 1);
    (
        Tensor::from_vec(w, dims, &Device::Cpu).unwrap(),
        Tensor::from_vec(w_inv, dims, &Device::Cpu).unwrap(),
    )
}

/// Loads `<name>.pt` as the CLI's `Engine::from_reference_pt` does
/// (`read_reference_pt`, `split_reference_state_dict`, the backbone from the
/// file's `feature_extractor.*` tensors, `load_state_dict` for the flows) and
/// compares the anomaly map of the det image with the reference's.
fn check_reference_pt(name: &str) {
    let text = std::fs::read_to_string(vit_pt_dir().join(format!("{name}.json"))).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cfg = config_of(&doc);
    let kind = cfg.backbone_kind().unwrap();
    assert!(!kind.is_cnn(), "{name}: a transformer config");

    let sd = read_reference_pt(vit_pt_dir().join(format!("{name}.pt"))).unwrap();
    let mut parts = split_reference_state_dict(sd);

    // The backbone part keeps timm's names; the fixture kept these few, and
    // they are det_init values.
    let mut kept: Vec<String> = parts.backbone.keys().cloned().collect();
    kept.sort();
    assert_eq!(kept, strings(&doc["kept_backbone_keys"]), "{name}");
    for (k, t) in &parts.backbone {
        let want = Tensor::from_vec(det_value(k, t.dims()), t.dims(), &Device::Cpu).unwrap();
        assert_close(&format!("{name} backbone {k}"), t, &want, 0.0);
    }
    // No LayerNorms for transformer backbones: only flow tensors remain.
    assert!(
        parts.flow.keys().all(|k| k.starts_with("nf_flows.0.")),
        "{name}: {:?}",
        parts.flow.keys().collect::<Vec<_>>()
    );

    // The fixture left out the 768 x 768 permutation buffers; they are
    // rebuilt from the permutations the script drew.
    for (k, perm) in doc["permutations"][0]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let p: Vec<usize> = perm
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let (w, w_inv) = permutation_matrices(&p);
        let key = format!("nf_flows.0.module_list.{k}.w_perm");
        assert!(
            !parts.flow.contains_key(&key),
            "{key} was expected to be trimmed"
        );
        parts.flow.insert(format!("{key}_inv"), w_inv);
        parts.flow.insert(key, w);
    }

    let vb = file_then_det(parts.backbone);
    let backbone = Backbone::new(kind, vb).unwrap();
    let varmap = VarMap::new();
    let mut model = FastFlow::new(&cfg, backbone, 0, fresh_vb(&varmap)).unwrap();
    assert!(
        model.head().norms().is_empty(),
        "{name}: no extra LayerNorm"
    );
    load_state_dict(&mut model, &parts.flow).unwrap();

    let s = cfg.input_size;
    let images = det_input("fixture.images", &[1, 3, s, s], 4.0);
    let out = model.forward(&images).unwrap();
    let map = model.anomaly_map(&out).unwrap();
    let shape: Vec<usize> = doc["anomaly_map_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(map.dims(), shape.as_slice(), "{name}: map shape");
    let got = to_f64(&map);

    // The strided subsample, element by element.
    let stride = doc["anomaly_map_stride"].as_u64().unwrap() as usize;
    let want_sub = f64s(&doc["anomaly_map_sub"]);
    let got_sub: Vec<f64> = got.iter().step_by(stride).copied().collect();
    assert_eq!(got_sub.len(), want_sub.len(), "{name}: subsample length");
    let n_sub = want_sub.len();
    let got_sub = Tensor::from_vec(got_sub, n_sub, &Device::Cpu).unwrap();
    let want_sub = Tensor::from_vec(want_sub, n_sub, &Device::Cpu).unwrap();
    assert_close(
        &format!("{name} anomaly map (every {stride}th value)"),
        &got_sub,
        &want_sub,
        1e-4,
    );

    // Exact statistics of the whole map.
    let n = got.len() as f64;
    let mean = got.iter().sum::<f64>() / n;
    let mean_sq = got.iter().map(|v| v * v).sum::<f64>() / n;
    let min = got.iter().copied().fold(f64::INFINITY, f64::min);
    let max = got.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let checks = [
        ("mean", mean, doc["anomaly_map_sum"].as_f64().unwrap() / n),
        (
            "mean square",
            mean_sq,
            doc["anomaly_map_sum_sq"].as_f64().unwrap() / n,
        ),
        ("min", min, doc["anomaly_map_min"].as_f64().unwrap()),
        ("max", max, doc["anomaly_map_max"].as_f64().unwrap()),
    ];
    for (what, got, want) in checks {
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "{name} anomaly map {what}: {got} vs reference {want}"
        );
    }

    let l = f64::from(loss(&out).unwrap().to_scalar::<f32>().unwrap());
    let want_loss = doc["loss"].as_f64().unwrap();
    assert!(
        (l - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "{name} loss {l} vs reference {want_loss}"
    );
}

#[test]
fn deit_reference_pt_reproduces_the_reference_anomaly_map() {
    check_reference_pt("deit");
}

#[test]
fn cait_reference_pt_reproduces_the_reference_anomaly_map() {
    check_reference_pt("cait");
}
