//! End-to-end runs of the `fastflow` binary with the transformer configs
//! `configs/deit.yaml` (DeiT-base distilled, 384 px) and `configs/cait.yaml`
//! (CaiT-M48, 448 px) as they are (20 flow steps, hidden ratio 0.16,
//! alternating kernels, no extra LayerNorm): train -> eval -> predict on a
//! tiny synthetic category with a seeded random backbone.
//!
//! The reference `.pt` fixtures of these backbones
//! (`tests-fixtures/vit_pt/`, made by `data-scripts/make_vit_pt_fixtures.py`)
//! are checked against the reference's anomaly maps in ff-flow
//! (`tests/vit_reference_pt.rs`); here `fastflow eval` and `predict` are
//! pointed at them to show that the CLI reads them (once the permutation
//! buffers the fixtures leave out are restored), names what it cannot use,
//! and gives the reference's scores and AUROCs on a synthetic category
//! (`tests-fixtures/vit_cli/`, made by `data-scripts/make_vit_cli_fixtures.py`).

use std::path::{Path, PathBuf};

use ff_data::synth::{generate_category, SynthConfig};
use sha2::Digest;

mod common;
use common::{assert_ok, fastflow, read_json, text};

const CATEGORY: &str = "tiny";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Asserts that every metric of an eval JSON is a number in [0, 1].
#[track_caller]
fn assert_metrics_sane(v: &serde_json::Value, what: &str) {
    for key in ["image_auroc", "pixel_auroc", "aupro", "image_f1_max"] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&x), "{what}: {key} = {x} in {v}");
    }
    let t = v["threshold"].as_f64().unwrap_or(f64::NAN);
    assert!(t.is_finite(), "{what}: threshold {t} in {v}");
}

/// Trains `configs/<name>.yaml` for one epoch, evaluates the best checkpoint
/// and predicts one test image, checking what each command writes.
fn train_eval_predict(name: &str, backbone_name: &str, input_size: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let data = root.join("data");
    // As few images as a run needs: one batch of two to train on, one good
    // and one defective image to evaluate (both AUROCs are defined).
    let synth = SynthConfig {
        image_size: 64,
        n_train: 2,
        n_test_good: 1,
        n_test_defect: 1,
        seed: 3,
    };
    generate_category(&data, CATEGORY, &synth).expect("synthetic data");
    let config = repo_root().join("configs").join(format!("{name}.yaml"));
    let run = root.join("run");
    let train_json = root.join("train.json");
    let out = fastflow(args![
        "train",
        "--config",
        config,
        "--data",
        data,
        "--category",
        CATEGORY,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--eval-every",
        "1",
        "--seed",
        "5",
        "--weights",
        "random",
        "--out",
        run,
        "--json",
        train_json,
    ]);
    assert_ok(&out);
    let ck = run.join("checkpoints");
    for stem in ["last", "best"] {
        for ext in ["safetensors", "optim.safetensors", "json"] {
            let p = ck.join(format!("{stem}.{ext}"));
            assert!(p.is_file(), "{name}: missing {}", p.display());
        }
    }
    let meta = read_json(&ck.join("last.json"));
    assert_eq!(meta["epoch"], 1, "{name}: {meta}");
    assert_eq!(meta["config"]["backbone_name"], backbone_name, "{meta}");
    assert_eq!(meta["config"]["input_size"], input_size, "{meta}");
    assert_eq!(meta["config"]["flow_step"], 20, "{meta}");
    assert_eq!(meta["config"]["hidden_ratio"], 0.16, "{meta}");
    assert_eq!(meta["config"]["conv3x3_only"], false, "{meta}");
    assert_eq!(meta["optimizer"]["step"], 1, "{name}: one batch of two");
    // Flows only: the weights hold no LayerNorm (the reference has none for
    // transformer backbones) and one flow of 20 steps over 768 channels.
    let bytes = std::fs::read(ck.join("last.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let names = st.names();
    assert!(!names.is_empty(), "{name}: empty checkpoint");
    assert!(
        names.iter().all(|k| k.starts_with("nf_flows.0.")),
        "{name}: unexpected tensors {names:?}"
    );
    let last_step = "nf_flows.0.module_list.19.global_scale";
    assert!(names.contains(&last_step), "{name}: {last_step} missing");
    let scale = st.tensor(last_step).expect("global_scale");
    assert_eq!(scale.shape(), &[1, 768, 1, 1], "{name}: global_scale shape");
    let train = read_json(&train_json);
    assert_metrics_sane(&train, &format!("{name} train --json"));
    let losses = std::fs::read_to_string(run.join("train_log.jsonl")).expect("train log");
    let loss = serde_json::from_str::<serde_json::Value>(losses.lines().next().expect("a line"))
        .expect("json line")["mean_loss"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!(loss.is_finite(), "{name}: training loss {loss}");

    let eval_json = root.join("eval.json");
    let best = ck.join("best.safetensors");
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        best,
        "--data",
        data,
        "--category",
        CATEGORY,
        "--json",
        eval_json,
    ]);
    assert_ok(&out);
    let v = read_json(&eval_json);
    assert_eq!(v["n_images"], 2, "{name}: {v}");
    assert_metrics_sane(&v, &format!("{name} eval"));
    // The same weights give the same numbers as at the end of training.
    let best_meta = read_json(&ck.join("best.json"));
    assert_eq!(v["image_auroc"], best_meta["metrics"]["image_auroc"]);
    assert_eq!(v["pixel_auroc"], best_meta["metrics"]["pixel_auroc"]);

    let defect_dir = data.join(CATEGORY).join("test/scratch");
    let image = std::fs::read_dir(&defect_dir)
        .expect("defect folder")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .expect("a defective test image");
    let pred = root.join("pred");
    let out = fastflow(args!["predict", "--checkpoint", best, image, "--out", pred]);
    assert_ok(&out);
    let csv = std::fs::read_to_string(pred.join("predictions.csv")).expect("csv");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 1, "{name}: {csv}");
    let score: f64 = rows[0][1].parse().expect("score");
    assert!(score.is_finite(), "{name}: score {score}");
    assert!(
        rows[0][3] == "anomalous" || rows[0][3] == "normal",
        "{name}: {csv}"
    );
    let stem = image.file_stem().expect("stem").to_string_lossy();
    let heat = image::open(pred.join(format!("{stem}_heatmap.png"))).expect("heatmap");
    assert_eq!(
        (heat.width(), heat.height()),
        (64, 64),
        "{name}: heatmap size"
    );
    let mask = image::open(pred.join(format!("{stem}_mask.png")))
        .expect("mask")
        .to_luma8();
    assert_eq!(mask.dimensions(), (64, 64), "{name}: mask size");
}

#[test]
fn deit_config_trains_evaluates_and_predicts() {
    train_eval_predict("deit", "deit_base_distilled_patch16_384", 384);
}

#[test]
fn cait_config_trains_evaluates_and_predicts() {
    train_eval_predict("cait", "cait_m48_448", 448);
}

/// Writes the reduced config a `tests-fixtures/vit_pt/` checkpoint was made
/// with (stored in its JSON) as a reference YAML file.
fn vit_pt_config(name: &str, dir: &Path) -> PathBuf {
    let doc = read_json(&repo_root().join(format!("tests-fixtures/vit_pt/{name}.json")));
    let c = &doc["config"];
    let yaml = format!(
        "backbone_name: {}\ninput_size: {}\nflow_step: {}\nhidden_ratio: {}\nconv3x3_only: {}\n",
        c["backbone_name"].as_str().expect("backbone_name"),
        c["input_size"],
        c["flow_step"],
        c["hidden_ratio"],
        if c["conv3x3_only"].as_bool().expect("conv3x3_only") {
            "True"
        } else {
            "False"
        },
    );
    let path = dir.join(format!("{name}_reduced.yaml"));
    std::fs::write(&path, yaml).expect("config");
    path
}

/// The arguments of `fastflow <command>` on reference checkpoint `pt` with
/// its reduced config and the fixture backbone weights, then `rest`.
fn reference_pt_args(
    command: &str,
    pt: &Path,
    cfg: &Path,
    rest: Vec<std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut all = args![
        command,
        "--checkpoint",
        pt,
        "--config",
        cfg,
        "--weights",
        "deterministic"
    ];
    all.extend(rest);
    all
}

/// The ViT reference fixtures leave out their 768 x 768 permutation buffers
/// (size budget; ff-flow's test rebuilds them from the fixture's JSON), so
/// `fastflow eval` must refuse them by naming the file and the missing key,
/// after reading the file and matching the reduced config up to that key.
#[test]
fn trimmed_vit_reference_pts_are_refused_naming_the_missing_permutation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let synth = SynthConfig {
        image_size: 32,
        n_train: 1,
        n_test_good: 1,
        n_test_defect: 1,
        seed: 4,
    };
    generate_category(&data, CATEGORY, &synth).expect("synthetic data");
    for name in ["deit", "cait"] {
        // A copy, so that nothing the CLI writes lands in the repository.
        let pt = dir.path().join(format!("{name}.pt"));
        std::fs::copy(
            repo_root().join(format!("tests-fixtures/vit_pt/{name}.pt")),
            &pt,
        )
        .expect("copy the fixture");
        let cfg = vit_pt_config(name, dir.path());
        let out = fastflow(reference_pt_args(
            "eval",
            &pt,
            &cfg,
            args!["--data", data, "--category", CATEGORY],
        ));
        assert!(
            !out.status.success(),
            "{name}: should fail:\n{}",
            text(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in [
            "error: ",
            &format!("{name}.pt"),
            "nf_flows.0.module_list.0.w_perm",
        ] {
            assert!(
                stderr.contains(needle),
                "{name}: stderr lacks '{needle}':\n{}",
                text(&out)
            );
        }
        assert!(!stderr.contains("panicked"), "{name}:\n{}", text(&out));
    }
}

/// CRC-32 (IEEE), as zip entries carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Appends a pickle BINUNICODE string.
fn pickle_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a pickle tuple of BININTs.
fn pickle_int_tuple(out: &mut Vec<u8>, values: &[usize]) {
    out.push(b'(');
    for &v in values {
        out.push(b'J');
        out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    out.push(b't');
}

/// Writes float32 tensors as `torch.save({"model_state_dict": {...}})` does:
/// a stored (uncompressed) zip holding `archive/data.pkl`, whose pickle
/// rebuilds each tensor with `torch._utils._rebuild_tensor_v2` from the
/// storage `archive/data/<i>`, plus `archive/version`.
fn write_torch_pt(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut pkl = vec![0x80, 2, b'}', b'('];
    pickle_str(&mut pkl, "model_state_dict");
    pkl.extend_from_slice(b"}(");
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, (key, dims, values)) in tensors.iter().enumerate() {
        pickle_str(&mut pkl, key);
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        pickle_str(&mut pkl, "storage");
        pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
        pickle_str(&mut pkl, &i.to_string());
        pickle_str(&mut pkl, "cpu");
        pkl.push(b'J');
        pkl.extend_from_slice(&(values.len() as i32).to_le_bytes());
        pkl.extend_from_slice(b"tQ");
        pkl.push(b'J');
        pkl.extend_from_slice(&0i32.to_le_bytes());
        pickle_int_tuple(&mut pkl, dims);
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        pickle_int_tuple(&mut pkl, &strides);
        pkl.push(0x89); // NEWFALSE: requires_grad
        pkl.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        pkl.extend_from_slice(b"tR");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        files.push((format!("archive/data/{i}"), bytes));
    }
    pkl.extend_from_slice(b"uu.");
    files.insert(0, ("archive/data.pkl".to_string(), pkl));
    files.push(("archive/version".to_string(), b"3\n".to_vec()));

    let mut zip = Vec::new();
    let mut central = Vec::new();
    for (name, data) in &files {
        let offset = zip.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        let mut common = Vec::new();
        common.extend_from_slice(&20u16.to_le_bytes()); // version needed
        common.extend_from_slice(&0u16.to_le_bytes()); // flags
        common.extend_from_slice(&0u16.to_le_bytes()); // stored
        common.extend_from_slice(&0u32.to_le_bytes()); // time, date
        common.extend_from_slice(&crc.to_le_bytes());
        common.extend_from_slice(&size.to_le_bytes());
        common.extend_from_slice(&size.to_le_bytes());
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes()); // extra length
        zip.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        zip.extend_from_slice(&common);
        zip.extend_from_slice(name.as_bytes());
        zip.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        central.extend_from_slice(&common);
        central.extend_from_slice(&[0u8; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let central_offset = zip.len() as u32;
    zip.extend_from_slice(&central);
    zip.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    zip.extend_from_slice(&[0u8; 4]); // disk numbers
    zip.extend_from_slice(&(files.len() as u16).to_le_bytes());
    zip.extend_from_slice(&(files.len() as u16).to_le_bytes());
    zip.extend_from_slice(&(central.len() as u32).to_le_bytes());
    zip.extend_from_slice(&central_offset.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes()); // comment length
    std::fs::write(path, zip).expect("write the .pt");
}

/// The fixture's flow tensors plus the permutation buffers it left out,
/// rebuilt from its JSON, written as a complete reference `.pt` (the
/// backbone comes from `--weights deterministic`, the det_init values the
/// fixture's backbone holds).
fn complete_vit_pt(name: &str, dir: &Path) -> PathBuf {
    let doc = read_json(&repo_root().join(format!("tests-fixtures/vit_pt/{name}.json")));
    let sd =
        ff_flow::read_reference_pt(repo_root().join(format!("tests-fixtures/vit_pt/{name}.pt")))
            .expect("read the fixture");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = sd
        .into_iter()
        .filter(|(k, _)| k.starts_with("nf_flows."))
        .map(|(k, t)| {
            let dims = t.dims().to_vec();
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("float32 tensor");
            (k, dims, v)
        })
        .collect();
    for (k, perm) in doc["permutations"][0]
        .as_array()
        .expect("permutations")
        .iter()
        .enumerate()
    {
        let p: Vec<u32> = perm
            .as_array()
            .expect("a permutation")
            .iter()
            .map(|v| v.as_u64().expect("index") as u32)
            .collect();
        let c = p.len();
        let key = format!("nf_flows.0.module_list.{k}.w_perm");
        let perm = ff_flow::Permutation::new(p, &candle_core::Device::Cpu, &key).expect("perm");
        let values = |t: ff_flow::Result<candle_core::Tensor>| {
            t.expect("permutation matrix")
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32 values")
        };
        let (w, w_inv) = (
            values(perm.matrix(candle_core::DType::F32)),
            values(perm.inverse_matrix(candle_core::DType::F32)),
        );
        tensors.push((format!("{key}_inv"), vec![c, c, 1, 1], w_inv));
        tensors.push((key, vec![c, c, 1, 1], w));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let path = dir.join(format!("{name}_complete.pt"));
    write_torch_pt(&path, &tensors);
    path
}

/// With the permutation buffers restored, the ViT reference checkpoints
/// evaluate and predict through the CLI with their reduced configs, and give
/// the reference's numbers: each image's score (the maximum of its anomaly
/// map) and the image and pixel AUROCs equal what the reference model
/// computes on the same files (`tests-fixtures/vit_cli/`, written by
/// `data-scripts/make_vit_cli_fixtures.py`).
#[test]
fn vit_reference_pts_match_the_reference_scores_and_metrics_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // The category make_vit_cli_fixtures.py was run on (its docstring's
    // `cargo xtask synth` line).
    let synth = SynthConfig {
        image_size: 32,
        n_train: 1,
        n_test_good: 2,
        n_test_defect: 2,
        seed: 6,
    };
    generate_category(&data, CATEGORY, &synth).expect("synthetic data");
    let category = data.join(CATEGORY);
    for name in ["deit", "cait"] {
        let want = read_json(&repo_root().join(format!("tests-fixtures/vit_cli/{name}.json")));
        let images = want["images"].as_array().expect("images");
        assert_eq!(images.len(), 4, "{name}: fixture images");
        for image in images {
            let rel = image["path"].as_str().expect("path");
            let bytes = std::fs::read(category.join(rel)).expect("generated test image");
            let digest: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                image["sha256"].as_str(),
                Some(digest.as_str()),
                "{rel}: the synthetic generator no longer makes the image the fixture \
                 was computed on; rerun data-scripts/make_vit_cli_fixtures.py"
            );
        }
        let pt = complete_vit_pt(name, dir.path());
        let cfg = vit_pt_config(name, dir.path());
        let json = dir.path().join(format!("{name}_eval.json"));
        let out = fastflow(reference_pt_args(
            "eval",
            &pt,
            &cfg,
            args!["--data", data, "--category", CATEGORY, "--json", json],
        ));
        assert_ok(&out);
        let v = read_json(&json);
        assert_eq!(v["n_images"], 4, "{name}: {v}");
        assert_metrics_sane(&v, &format!("{name} reference .pt eval"));
        for key in ["image_auroc", "pixel_auroc"] {
            let (got, exp) = (
                v[key].as_f64().expect("metric"),
                want[key].as_f64().expect("reference metric"),
            );
            // f32 maps against the f64 reference: a pixel pair closer than
            // float rounding may rank the other way, nothing more.
            assert!(
                (got - exp).abs() <= 1e-4,
                "{name}: {key} {got} vs the reference's {exp}"
            );
        }

        let pred = dir.path().join(format!("{name}_pred"));
        let mut rest = args!["--threshold", "-0.5", "--out", pred];
        for folder in ["good", "hole", "scratch"] {
            rest.push(category.join("test").join(folder).into());
        }
        let out = fastflow(reference_pt_args("predict", &pt, &cfg, rest));
        assert_ok(&out);
        let csv = std::fs::read_to_string(pred.join("predictions.csv")).expect("csv");
        let rows: Vec<Vec<&str>> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len(), 4, "{name}: {csv}");
        for image in images {
            let rel = image["path"].as_str().expect("path");
            let row = rows
                .iter()
                .find(|r| Path::new(r[0]).ends_with(rel))
                .unwrap_or_else(|| panic!("{name}: no row for {rel} in {csv}"));
            let got: f64 = row[1].parse().expect("score");
            let exp = image["score"].as_f64().expect("reference score");
            // The CSV prints 6 decimals (0.5e-6 of rounding) of an f32 map;
            // the scores of different images differ by 1e-5 and more.
            eprintln!("{name}: {rel}: {got} vs {exp}");
            assert!(
                (got - exp).abs() <= 5e-6,
                "{name}: {rel} scores {got}, the reference {exp}"
            );
        }
    }
}

/// The feature cache with a transformer backbone: DeiT at its native 384 px
/// (ViTs take no other size) with 2 flow steps, 3 images in batches of 2
/// over 3 epochs (the third image is first used in epoch 2, whose batches
/// then mix cached and fresh features). Cache on and off give bit-identical
/// checkpoints.
#[test]
fn deit_feature_cache_gives_bit_identical_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let data = root.join("data");
    let synth = SynthConfig {
        image_size: 64,
        n_train: 3,
        n_test_good: 1,
        n_test_defect: 1,
        seed: 4,
    };
    generate_category(&data, CATEGORY, &synth).expect("synthetic data");
    let config = root.join("deit-2.yaml");
    std::fs::write(
        &config,
        "backbone_name: deit_base_distilled_patch16_384\ninput_size: 384\nflow_step: 2\n\
         hidden_ratio: 0.16\nconv3x3_only: False\n",
    )
    .expect("config");
    let run = |mode: &str| {
        let out_dir = root.join(mode);
        let out = fastflow(args![
            "train",
            "--config",
            config,
            "--data",
            data,
            "--category",
            CATEGORY,
            "--epochs",
            "3",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
            "--seed",
            "5",
            "--weights",
            "random",
            "--out",
            out_dir,
            "--feature-cache",
            mode,
        ]);
        assert_ok(&out);
        ["last.safetensors", "last.optim.safetensors"]
            .map(|f| std::fs::read(out_dir.join("checkpoints").join(f)).expect("checkpoint file"))
    };
    let cached = run("ram");
    assert!(
        cached == run("off"),
        "the cache changed the DeiT checkpoint"
    );
}
