//! Weight sources: local safetensors files with timm keys (and their errors),
//! the seeded timm-style random init, and backbone names.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{det_input, det_tensors, rel_err, write_safetensors};
use ff_backbone::det_init::det_var_builder;
use ff_backbone::{backbone_var_builder, Backbone, BackboneKind, Error, WeightSource};

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to_vec")
}

/// A file with timm's key names (plus layer4/fc tensors the features never
/// use, as in a hub `model.safetensors`) loads and gives the same features
/// as the same values handed over directly.
#[test]
fn timm_named_safetensors_file_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    let mut tensors = det_tensors(BackboneKind::ResNet18);
    let extra = |dims: &[usize]| Tensor::ones(dims, DType::F32, &Device::Cpu).expect("ones");
    tensors.insert("layer4.0.conv1.weight".into(), extra(&[512, 256, 3, 3]));
    tensors.insert("fc.weight".into(), extra(&[1000, 512]));
    tensors.insert("fc.bias".into(), extra(&[1000]));
    write_safetensors(&tensors, &path);

    let kind = BackboneKind::ResNet18;
    let from_file = Backbone::load(kind, &WeightSource::File(path.clone()), &Device::Cpu)
        .expect("load from file");
    let direct = Backbone::new(kind, det_var_builder(DType::F32, &Device::Cpu)).expect("det");
    let x = det_input("file", &[1, 3, 64, 64]);
    let a = from_file.features(&x).expect("forward file");
    let b = direct.features(&x).expect("forward det");
    for (fa, fb) in a.iter().zip(&b) {
        assert_eq!(rel_err(fa, fb), 0.0);
    }
    // The parsed CLI form reaches the same file.
    let parsed = WeightSource::parse(path.to_str().expect("utf-8 path"), kind).expect("parse");
    assert_eq!(parsed, WeightSource::File(path));
}

#[test]
fn missing_key_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.safetensors");
    let mut tensors = det_tensors(BackboneKind::ResNet18);
    assert!(tensors.remove("layer2.1.bn1.running_var").is_some());
    write_safetensors(&tensors, &path);
    let err = Backbone::load(
        BackboneKind::ResNet18,
        &WeightSource::File(path),
        &Device::Cpu,
    )
    .expect_err("a missing tensor must fail");
    match &err {
        Error::MissingTensor { key } => assert_eq!(key, "layer2.1.bn1.running_var"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(err.to_string().contains("layer2.1.bn1.running_var"));
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shape.safetensors");
    let mut tensors = det_tensors(BackboneKind::WideResNet50_2);
    // A resnet50 (base width 64) block where wide_resnet50_2 has width 256.
    tensors.insert(
        "layer1.0.conv2.weight".into(),
        Tensor::zeros((64, 64, 3, 3), DType::F32, &Device::Cpu).expect("zeros"),
    );
    write_safetensors(&tensors, &path);
    let err = Backbone::load(
        BackboneKind::WideResNet50_2,
        &WeightSource::File(path),
        &Device::Cpu,
    )
    .expect_err("a wrong shape must fail");
    match &err {
        Error::ShapeMismatch {
            key,
            expected,
            found,
        } => {
            assert_eq!(key, "layer1.0.conv2.weight");
            assert_eq!(expected, &[128, 128, 3, 3]);
            assert_eq!(found, &[64, 64, 3, 3]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("[128, 128, 3, 3]") && msg.contains("[64, 64, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn unreadable_weights_file_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"this is not a safetensors file").expect("write");
    let absent = dir.path().join("absent.safetensors");
    for path in [corrupt, absent] {
        let err = Backbone::load(
            BackboneKind::ResNet18,
            &WeightSource::File(path.clone()),
            &Device::Cpu,
        )
        .expect_err("must fail");
        match &err {
            Error::WeightsFile { path: p, .. } => assert_eq!(p, &path),
            other => panic!("expected WeightsFile, got {other:?}"),
        }
        assert!(err.to_string().contains(&*path.to_string_lossy()));
    }
}

/// Half-precision files (hub weights are sometimes stored as f16 or bf16)
/// load through the memory-mapped source and are converted to the f32 the
/// backbone asks for: every value equals the stored half value widened.
#[test]
fn half_precision_files_are_converted_to_f32() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kind = BackboneKind::ResNet18;
    for dtype in [DType::F16, DType::BF16] {
        let path = dir.path().join(format!("half_{dtype:?}.safetensors"));
        let full = det_tensors(kind);
        let half: std::collections::HashMap<String, Tensor> = full
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype).expect("to half")))
            .collect();
        write_safetensors(&half, &path);
        let vb = ff_backbone::safetensors_var_builder(&path, &Device::Cpu).expect("vb");
        for key in ["conv1.weight", "layer3.1.conv2.weight", "bn1.running_var"] {
            let want = half[key].to_dtype(DType::F32).expect("widen");
            let got = vb.get(want.dims(), key).expect("get");
            assert_eq!(got.dtype(), DType::F32, "{dtype:?} {key}");
            assert_eq!(to_vec(&got), to_vec(&want), "{dtype:?} {key}");
            // Without a shape the stored shape comes back, converted too.
            let unchecked = vb.get_unchecked(key).expect("get_unchecked");
            assert_eq!(unchecked.dims(), want.dims());
            assert_eq!(to_vec(&unchecked), to_vec(&want), "{dtype:?} {key}");
        }
        // The whole backbone builds and runs from the half-precision file.
        let backbone =
            Backbone::load(kind, &WeightSource::File(path), &Device::Cpu).expect("load half");
        let feats = backbone
            .features(&det_input("half", &[1, 3, 64, 64]))
            .expect("forward");
        assert!(feats
            .iter()
            .all(|f| to_vec(f).iter().all(|v| v.is_finite())));
    }
}

/// A tensor stored as a type that is no number (here bool) is refused with a
/// message naming the key, its stored type and the file.
#[test]
fn non_numeric_tensor_is_refused_naming_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bool.safetensors");
    let bytes = [0u8, 1, 1, 0];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BOOL, vec![4], &bytes)
        .expect("view");
    safetensors::serialize_to_file([("bn1.bias", view)], None, &path).expect("write");
    let vb = ff_backbone::safetensors_var_builder(&path, &Device::Cpu).expect("vb");
    assert!(vb.contains_tensor("bn1.bias"));
    let err = vb.get(4, "bn1.bias").expect_err("bool must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("bn1.bias") && msg.contains("BOOL") && msg.contains("bool.safetensors"),
        "{msg}"
    );
}

/// Mean and population standard deviation of a tensor's values.
fn mean_std(t: &Tensor) -> (f64, f64) {
    let v = to_vec(t);
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// timm's `ResNet.init_weights`: kaiming-normal fan-out convolutions,
/// BatchNorm 1/0 with fresh running statistics, the last BatchNorm of each
/// residual block zeroed.
#[test]
fn random_init_follows_timms_resnet_scheme() {
    let dev = Device::Cpu;
    for (kind, zeroed, kept) in [
        (BackboneKind::ResNet18, "bn2", "bn1"),
        (BackboneKind::WideResNet50_2, "bn3", "bn2"),
    ] {
        let vb = backbone_var_builder(kind, &WeightSource::Random { seed: 3 }, &dev).expect("vb");
        let c = kind.channels()[2];
        let mid = if kind == BackboneKind::ResNet18 {
            c
        } else {
            c / 2
        };
        let bn_last = vb
            .get(c, &format!("layer3.1.{zeroed}.weight"))
            .expect("get");
        assert!(
            to_vec(&bn_last).iter().all(|&v| v == 0.0),
            "{kind} {zeroed}"
        );
        let bn_kept = vb
            .get(mid, &format!("layer3.1.{kept}.weight"))
            .expect("get");
        assert!(to_vec(&bn_kept).iter().all(|&v| v == 1.0), "{kind} {kept}");
        let ds_bn = vb.get(c, "layer3.0.downsample.1.weight").expect("get");
        assert!(
            to_vec(&ds_bn).iter().all(|&v| v == 1.0),
            "{kind} downsample bn"
        );
        let bias = vb.get(64, "bn1.bias").expect("get");
        let mean = vb.get(64, "bn1.running_mean").expect("get");
        let var = vb.get(64, "bn1.running_var").expect("get");
        assert!(to_vec(&bias).iter().all(|&v| v == 0.0));
        assert!(to_vec(&mean).iter().all(|&v| v == 0.0));
        assert!(to_vec(&var).iter().all(|&v| v == 1.0));
    }

    // Kaiming normal, mode fan_out, ReLU gain: std = sqrt(2 / (out * kh * kw)).
    let vb = backbone_var_builder(
        BackboneKind::ResNet18,
        &WeightSource::Random { seed: 11 },
        &dev,
    )
    .expect("vb");
    for (key, dims) in [
        ("layer3.1.conv2.weight", [256usize, 256, 3, 3]),
        ("conv1.weight", [64, 3, 7, 7]),
    ] {
        let w = vb.get(&dims, key).expect("get");
        let (mean, std) = mean_std(&w);
        let want = (2.0 / (dims[0] * dims[2] * dims[3]) as f64).sqrt();
        assert!(
            (std / want - 1.0).abs() < 0.03,
            "{key}: std {std} vs {want}"
        );
        assert!(mean.abs() < 0.05 * want, "{key}: mean {mean}");
    }
}

#[test]
fn random_init_is_reproducible_from_the_seed() {
    let dev = Device::Cpu;
    let kind = BackboneKind::ResNet18;
    let get = |seed: u64| {
        let vb = backbone_var_builder(kind, &WeightSource::Random { seed }, &dev).expect("vb");
        to_vec(
            &vb.get((128, 64, 3, 3), "layer2.0.conv1.weight")
                .expect("get"),
        )
    };
    assert_eq!(get(5), get(5));
    assert_ne!(get(5), get(6));

    // A randomly initialised backbone runs and gives finite, non-trivial features.
    let backbone = Backbone::load(kind, &WeightSource::Random { seed: 5 }, &dev).expect("load");
    let feats = backbone
        .features(&det_input("random", &[1, 3, 64, 64]))
        .expect("forward");
    for f in &feats {
        let v = to_vec(f);
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(v.iter().any(|&x| x > 0.0));
    }
}

#[test]
fn backbone_kinds_round_trip_their_timm_names() {
    for kind in BackboneKind::ALL {
        assert_eq!(
            BackboneKind::from_timm_name(kind.timm_name()).expect("name"),
            kind
        );
        assert!(kind
            .hub_repo()
            .starts_with(&format!("timm/{}.", kind.timm_name())));
        assert_eq!(kind.channels().len(), kind.strides().len());
        assert_eq!(kind.is_cnn(), kind.channels().len() == 3);
    }
    assert_eq!(
        BackboneKind::WideResNet50_2.hub_repo(),
        "timm/wide_resnet50_2.racm_in1k"
    );
    match BackboneKind::from_timm_name("resnet50") {
        Err(Error::UnknownBackbone { name }) => assert_eq!(name, "resnet50"),
        other => panic!("expected UnknownBackbone, got {other:?}"),
    }
}
