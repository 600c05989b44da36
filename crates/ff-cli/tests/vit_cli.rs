//! End-to-end runs of the `fastflow` binary with the transformer configs
//! `configs/deit.yaml` (DeiT-base distilled, 384 px) and `configs/cait.yaml`
//! (CaiT-M48, 448 px) as they are (20 flow steps, hidden ratio 0.16,
//! alternating kernels, no extra LayerNorm): train -> eval -> predict on a
//! tiny synthetic category with a seeded random backbone.
//!
//! The reference `.pt` fixtures of these backbones
//! (`tests-fixtures/vit_pt/`, made by `data-scripts/make_vit_pt_fixtures.py`)
//! are checked against the reference's anomaly maps in ff-flow
//! (`tests/vit_reference_pt.rs`); here `fastflow eval` is pointed at them to
//! show that the CLI reads them and names what it cannot use.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ff_data::synth::{generate_category, SynthConfig};

const CATEGORY: &str = "tiny";

/// Command-line arguments of mixed types (`&str`, paths) as `OsString`s.
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        vec![$(std::ffi::OsString::from(AsRef::<std::ffi::OsStr>::as_ref(&$x))),*]
    };
}

fn fastflow(args: Vec<OsString>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastflow"));
    cmd.args(&args);
    // Tests never touch the network.
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd.env(
        "HF_HOME",
        std::env::temp_dir().join("fastflow-cli-tests-empty-hf-home"),
    );
    cmd.output().expect("cannot start the fastflow binary")
}

fn text(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(out.status.success(), "fastflow failed:\n{}", text(out));
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

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
        let out = fastflow(args![
            "eval",
            "--checkpoint",
            pt,
            "--config",
            cfg,
            "--weights",
            "deterministic",
            "--data",
            data,
            "--category",
            CATEGORY,
        ]);
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
