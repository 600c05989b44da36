//! Parity of the FastFlow flows, loss, anomaly map, gradients and one Adam
//! step with the PyTorch reference (gathierry/FastFlow on timm 0.5.4 + FrEIA
//! 0.2). Fixtures: `data-scripts/make_flow_fixtures.py`.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use ff_backbone::det_init::det_var_builder;
use ff_backbone::{Backbone, BackboneKind};
use ff_flow::{
    image_scores, loss, Adam, AdamConfig, FastFlow, FastFlowHead, FeatureNorms, FlowOutput,
};
use serde_json::Value;

/// Relative tolerance of every comparison with the reference.
const RTOL: f64 = 1e-4;

/// Checks outputs, gradients and the parameters after one Adam step of one
/// fixture part against the reference.
fn check_part(
    case: &Case,
    part: &str,
    head: &FastFlowHead,
    out: &FlowOutput,
    map: &Tensor,
    what: &str,
) {
    let doc = &case.doc[part];
    let t = |k: &str| {
        case.tensors
            .get(&format!("{part}.{k}"))
            .unwrap_or_else(|| panic!("fixture tensor {part}.{k}"))
    };
    for (i, z) in out.z.iter().enumerate() {
        assert_stats(&format!("{what} z.{i}"), z, &doc[format!("z.{i}")], RTOL);
        assert_close(
            &format!("{what} log_det.{i}"),
            &out.log_det[i],
            t(&format!("log_det.{i}")),
            RTOL,
        );
    }
    let l = loss(out).unwrap();
    assert_close(
        &format!("{what} loss"),
        &l.reshape(1).unwrap(),
        t("loss"),
        RTOL,
    );
    assert_close(&format!("{what} anomaly map"), map, t("anomaly_map"), RTOL);
    let scores = image_scores(map).unwrap();
    let ref_scores = image_scores(t("anomaly_map")).unwrap();
    assert_close(&format!("{what} image scores"), &scores, &ref_scores, RTOL);

    // One training step: gradients, then Adam with the reference's settings.
    let grads = l.backward().unwrap();
    let vars = head.trainable_vars().unwrap();
    for (key, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {key}"));
        match case.tensors.get(&format!("{part}.grad.{key}")) {
            Some(full) => assert_close(&format!("{what} grad {key}"), g, full, RTOL),
            None => assert_stats(
                &format!("{what} grad {key}"),
                g,
                &doc[format!("grad.{key}")],
                RTOL,
            ),
        }
    }
    let mut adam = Adam::new(vars.clone(), AdamConfig::default()).unwrap();
    adam.step(&grads).unwrap();
    for (key, var) in &vars {
        match case.tensors.get(&format!("{part}.after.{key}")) {
            Some(full) => assert_close(&format!("{what} after {key}"), var.as_tensor(), full, RTOL),
            None => assert_stats(
                &format!("{what} after {key}"),
                var.as_tensor(),
                &doc[format!("after.{key}")],
                RTOL,
            ),
        }
    }
}

/// Builds the fixture's head (det weights, fixture permutations) on fresh vars.
fn fixture_head(case: &Case, varmap: &VarMap) -> FastFlowHead {
    let cfg = config_of(&case.doc);
    let mut head = FastFlowHead::new(
        &cfg,
        cfg.feature_shapes().unwrap(),
        FeatureNorms::LayerNorm,
        7,
        fresh_vb(varmap),
    )
    .unwrap();
    let sd = fixture_state_dict(&head, &case.doc["permutations"]);
    head.load_state_dict(&sd).unwrap();
    head
}

/// The flow-only part: closed-form features -> norms -> flows.
fn flow_part(name: &str) {
    let case = load_case(name);
    let cfg = config_of(&case.doc);
    let varmap = VarMap::new();
    let head = fixture_head(&case, &varmap);
    let b = case.doc["batch"].as_u64().unwrap() as usize;
    let features: Vec<Tensor> = cfg
        .feature_shapes()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, [c, h, w])| det_input(&format!("fixture.features.{i}"), &[b, *c, *h, *w], 3.0))
        .collect();
    let out = head.forward(features).unwrap();
    let map = head.anomaly_map(&out).unwrap();
    check_part(&case, "flow", &head, &out, &map, &format!("{name} flow"));
}

/// The whole-model part: closed-form images -> det backbone -> norms -> flows.
fn model_part(name: &str) {
    let case = load_case(name);
    let cfg = config_of(&case.doc);
    let kind = BackboneKind::from_timm_name(&cfg.backbone_name).unwrap();
    let backbone = Backbone::new(kind, det_var_builder(DType::F32, &dev())).unwrap();
    let varmap = VarMap::new();
    let mut model = FastFlow::new(&cfg, backbone, 7, fresh_vb(&varmap)).unwrap();
    let sd = fixture_state_dict(model.head(), &case.doc["permutations"]);
    ff_flow::load_state_dict(&mut model, &sd).unwrap();
    let b = case.doc["batch"].as_u64().unwrap() as usize;
    let s = cfg.input_size;
    let images = det_input("fixture.images", &[b, 3, s, s], 4.0);
    assert_stats("images", &images, &case.doc["image_samples"], 1e-7);
    let features = model.features(&images).unwrap();
    for (i, f) in features.iter().enumerate() {
        assert_stats(
            &format!("{name} features.{i}"),
            f,
            &case.doc["model"][format!("features.{i}")],
            RTOL,
        );
    }
    let out = model.forward_features(features).unwrap();
    let map = model.anomaly_map(&out).unwrap();
    check_part(
        &case,
        "model",
        model.head(),
        &out,
        &map,
        &format!("{name} model"),
    );
}

#[test]
fn flow_parity_resnet18_64_conv3x3_only() {
    flow_part("resnet18_64_c3");
}

#[test]
fn flow_parity_resnet18_96_alternating_kernels() {
    flow_part("resnet18_96_alt");
}

#[test]
fn flow_parity_wide_resnet50_2_64_alternating_kernels() {
    flow_part("wide_resnet50_2_64_alt");
}

#[test]
fn flow_parity_wide_resnet50_2_96_conv3x3_only() {
    flow_part("wide_resnet50_2_96_c3");
}

#[test]
fn model_parity_wide_resnet50_2_96_conv3x3_only() {
    model_part("wide_resnet50_2_96_c3");
}

#[test]
fn model_parity_resnet18_64_conv3x3_only() {
    model_part("resnet18_64_c3");
}

#[test]
fn model_parity_resnet18_96_alternating_kernels() {
    model_part("resnet18_96_alt");
}

#[test]
fn model_parity_wide_resnet50_2_64_alternating_kernels() {
    model_part("wide_resnet50_2_64_alt");
}

/// Every trainable tensor, the LayerNorm weights and biases included, gets a
/// non-zero gradient from the loss (candle_nn's fused LayerNorm would give
/// them none).
#[test]
fn gradients_reach_every_trainable_tensor() {
    let case = load_case("resnet18_96_alt");
    let cfg = config_of(&case.doc);
    let varmap = VarMap::new();
    let head = fixture_head(&case, &varmap);
    let features: Vec<Tensor> = cfg
        .feature_shapes()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, [c, h, w])| det_input(&format!("fixture.features.{i}"), &[2, *c, *h, *w], 3.0))
        .collect();
    let l = loss(&head.forward(features).unwrap()).unwrap();
    let grads = l.backward().unwrap();
    let vars = head.trainable_vars().unwrap();
    // 3 norms x (weight, bias) + 3 scales x 3 steps x 6 tensors.
    assert_eq!(vars.len(), 6 + 3 * 3 * 6);
    assert_eq!(
        varmap.all_vars().len(),
        vars.len(),
        "the VarMap holds exactly the trainable tensors"
    );
    let mut norm_keys = 0;
    for (key, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let norm = to_f64(g).iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "gradient of {key} has norm {norm}"
        );
        norm_keys += usize::from(key.starts_with("norms."));
    }
    assert_eq!(norm_keys, 6);
}

/// The reference's Adam over three steps with weight decay (bias
/// corrections beyond the first step).
#[test]
fn adam_matches_torch_over_three_steps() {
    let text = std::fs::read_to_string(fixture_dir().join("adam.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let keys = ["a", "b.weight"];
    let varmap = VarMap::new();
    let vb = fresh_vb(&varmap);
    let mut vars = Vec::new();
    for k in keys {
        let dims: Vec<usize> = doc["shapes"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let t = vb
            .get_with_hints(dims.as_slice(), k, candle_nn::Init::Const(0.0))
            .unwrap();
        let var = candle_core::Var::from_tensor(&t).unwrap();
        var.set(&det_input(&format!("adam.{k}"), &dims, 2.0))
            .unwrap();
        vars.push((k.to_string(), var));
    }
    let cfg = AdamConfig {
        lr: doc["lr"].as_f64().unwrap(),
        weight_decay: doc["weight_decay"].as_f64().unwrap(),
        ..AdamConfig::default()
    };
    assert_eq!(
        cfg,
        AdamConfig::default(),
        "the reference settings are the defaults"
    );
    let mut adam = Adam::new(vars.clone(), cfg).unwrap();
    for (step, expected) in doc["steps"].as_array().unwrap().iter().enumerate() {
        let mut total: Option<Tensor> = None;
        for (k, var) in &vars {
            let c = det_input(&format!("adam.coef.{step}.{k}"), var.dims(), 2.0);
            let term = (var.as_tensor() * c).unwrap().sum_all().unwrap();
            total = Some(match total {
                None => term,
                Some(t) => (t + term).unwrap(),
            });
        }
        let grads = total.unwrap().backward().unwrap();
        adam.step(&grads).unwrap();
        for (k, var) in &vars {
            let want: Vec<f32> = expected[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let want = Tensor::from_vec(want, var.dims(), &Device::Cpu).unwrap();
            assert_close(
                &format!("adam step {step} {k}"),
                var.as_tensor(),
                &want,
                1e-6,
            );
        }
    }
    assert_eq!(adam.step_count(), 3);
}

/// Transformer features get no extra LayerNorm: the head has flows only, and
/// its keys are the reference's `nf_flows.0.*`.
#[test]
fn transformer_head_has_flows_only() {
    let cfg = ff_flow::FastFlowConfig {
        flow_step: 2,
        ..ff_flow::FastFlowConfig::deit()
    };
    let shapes = cfg.feature_shapes().unwrap();
    assert_eq!(shapes, vec![[768, 24, 24]]);
    let varmap = VarMap::new();
    let head = FastFlowHead::new(&cfg, shapes, FeatureNorms::None, 0, fresh_vb(&varmap)).unwrap();
    assert!(head.norms().is_empty());
    let sd = head.state_dict().unwrap();
    assert!(sd.keys().all(|k| k.starts_with("nf_flows.0.module_list.")));
    // hidden = int(384 * 0.16) = 61; step 1 uses 1x1 kernels.
    assert_eq!(
        sd["nf_flows.0.module_list.0.subnet.0.weight"].dims(),
        &[61, 384, 3, 3]
    );
    assert_eq!(
        sd["nf_flows.0.module_list.1.subnet.2.weight"].dims(),
        &[768, 61, 1, 1]
    );
    let x = det_input("vit.features", &[1, 768, 24, 24], 1.0);
    let out = head.forward(vec![x]).unwrap();
    assert_eq!(out.z[0].dims(), &[1, 768, 24, 24]);
    assert_eq!(head.anomaly_map(&out).unwrap().dims(), &[1, 1, 384, 384]);
}

/// Names the route this run checks (run with `--nocapture` to see it).
#[test]
fn route_of_this_run() {
    let note = route_note();
    println!("ff-flow parity {note}");
    assert!(note.starts_with("route: "));
}
