//! End-to-end tests of the `fastflow` binary on tiny synthetic data (64 px,
//! a seeded random backbone): train -> checkpoint -> resume -> eval -> predict,
//! a reference `.pt` checkpoint evaluated through the CLI, and bad inputs.
//!
//! The reference `.pt` fixture is `tests-fixtures/flow/reference_tiny.pt`,
//! made by `data-scripts/make_flow_fixtures.py` (ff-flow checks its anomaly
//! maps against the reference; here it goes through `fastflow eval`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use ff_data::synth::{generate_category, SynthConfig};

mod common;
use common::{assert_ok, fastflow, read_json, text};

const CATEGORY: &str = "tiny";

/// The tiny model every test trains: ResNet18 FastFlow at 64 px with 2 flow steps.
const TINY_CONFIG: &str = "\
# A tiny FastFlow for CLI tests.
backbone_name: resnet18
input_size: 64
flow_step: 2
hidden_ratio: 0.5
conv3x3_only: True
";

/// Asserts failure with an error message containing every needle.
#[track_caller]
fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "fastflow should have failed:\n{}",
        text(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: "),
        "error not reported on stderr:\n{}",
        text(out)
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks '{n}':\n{}", text(out));
    }
    assert!(
        !stderr.contains("panicked"),
        "fastflow panicked:\n{}",
        text(out)
    );
}

/// Data, config and one finished training run, shared by the tests of this file.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    config: PathBuf,
    /// `train --epochs 2 --eval-every 1` in one go.
    run_a: PathBuf,
    a_json: PathBuf,
    /// `train --epochs 1`, then `--resume` to 2 epochs.
    run_b: PathBuf,
}

fn train_args(f: &Fixture, epochs: &str, out: &Path) -> Vec<OsString> {
    args![
        "train",
        "--config",
        f.config,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--epochs",
        epochs,
        "--batch-size",
        "2",
        "--eval-every",
        "1",
        "--seed",
        "7",
        "--weights",
        "random",
        "--out",
        out,
    ]
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let synth = SynthConfig {
            image_size: 64,
            n_train: 4,
            n_test_good: 2,
            n_test_defect: 2,
            seed: 1,
        };
        generate_category(&data, CATEGORY, &synth).expect("synthetic data");
        let config = root.join("tiny.yaml");
        std::fs::write(&config, TINY_CONFIG).expect("config");
        let f = Fixture {
            run_a: root.join("run_a"),
            a_json: root.join("a.json"),
            run_b: root.join("run_b"),
            _dir: dir,
            root,
            data,
            config,
        };
        let mut a = train_args(&f, "2", &f.run_a);
        a.extend(args!["--json", f.a_json]);
        assert_ok(&fastflow(a));
        assert_ok(&fastflow(train_args(&f, "1", &f.run_b)));
        let resume = f.run_b.join("checkpoints/last.safetensors");
        // Without --config, --batch-size or --eval-every: the checkpoint knows them.
        let out = fastflow(args![
            "train",
            "--data",
            f.data,
            "--category",
            CATEGORY,
            "--epochs",
            "2",
            "--resume",
            resume,
        ]);
        assert_ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("resuming from"),
            "{}",
            text(&out)
        );
        f
    })
}

fn read_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

#[test]
fn train_writes_checkpoints_logs_report_and_json() {
    let f = fixture();
    let ck = f.run_a.join("checkpoints");
    for name in ["last", "best"] {
        for ext in ["safetensors", "optim.safetensors", "json"] {
            let p = ck.join(format!("{name}.{ext}"));
            assert!(p.is_file(), "missing {}", p.display());
        }
    }
    let meta = read_json(&ck.join("last.json"));
    assert_eq!(meta["epoch"], 2);
    assert_eq!(meta["seed"], 7);
    assert_eq!(meta["backbone_weights"], "random:7");
    assert_eq!(meta["config"]["flow_step"], 2);
    assert_eq!(meta["config"]["input_size"], 64);
    // 4 training images in batches of 2, 2 epochs.
    assert_eq!(meta["optimizer"]["step"], 4);
    assert!(meta["threshold"].is_number());
    assert!(meta["metrics"]["image_auroc"].is_number());

    let log = std::fs::read_to_string(f.run_a.join("eval_log.jsonl")).expect("eval log");
    let epochs: Vec<i64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["epoch"]
                .as_i64()
                .unwrap_or(-1)
        })
        .collect();
    assert_eq!(epochs, vec![1, 2]);
    assert_eq!(
        std::fs::read_to_string(f.run_a.join("train_log.jsonl"))
            .expect("train log")
            .lines()
            .count(),
        2
    );

    let json = read_json(&f.a_json);
    for key in [
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "threshold",
        "n_images",
    ] {
        assert!(json.get(key).is_some(), "--json lacks {key}: {json}");
    }
    assert_eq!(json["n_images"], 4);
    assert_eq!(json["epochs"], 2);
    assert!(
        json["train_seconds"].as_f64().is_some_and(|t| t > 0.0),
        "{json}"
    );
    let auroc = json["image_auroc"].as_f64().expect("number");
    assert!((0.0..=1.0).contains(&auroc));
    let report = std::fs::read_to_string(f.run_a.join("report.md")).expect("report");
    assert!(report.contains("image AUROC"), "{report}");
}

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let f = fixture();
    for file in ["last.safetensors", "last.optim.safetensors"] {
        let a = read_tensors(&f.run_a.join("checkpoints").join(file));
        let b = read_tensors(&f.run_b.join("checkpoints").join(file));
        assert!(!a.is_empty());
        assert_eq!(a.len(), b.len(), "{file}: different tensor sets");
        for (k, va) in &a {
            let vb = b
                .get(k)
                .unwrap_or_else(|| panic!("{file}: resumed run lacks {k}"));
            assert_eq!(va.0, vb.0, "{file}: {k} shape");
            assert!(
                va.1 == vb.1,
                "{file}: {k} differs between the resumed and the uninterrupted run"
            );
        }
    }
    let ma = read_json(&f.run_a.join("checkpoints/last.json"));
    let mb = read_json(&f.run_b.join("checkpoints/last.json"));
    assert_eq!(ma["epoch"], mb["epoch"]);
    assert_eq!(ma["optimizer"], mb["optimizer"]);
    assert_eq!(ma["metrics"]["image_auroc"], mb["metrics"]["image_auroc"]);
    // Both halves of the resumed run logged the same losses as the uninterrupted one.
    let losses = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("train_log.jsonl"))
            .expect("train log")
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json line")["mean_loss"]
                    .clone()
            })
            .collect()
    };
    let (la, lb) = (losses(&f.run_a), losses(&f.run_b));
    assert_eq!(la.len(), 2);
    assert_eq!(la, lb);
    assert_ne!(la[0], la[1], "the loss did not change between epochs");
}

#[test]
fn eval_prints_table_writes_markdown_and_json() {
    let f = fixture();
    let ckpt = f.run_a.join("checkpoints/best.safetensors");
    let json = f.root.join("eval.json");
    let out = fastflow(args![
        &"eval",
        "--checkpoint",
        ckpt,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--config",
        f.config,
        "--json",
        json,
    ]);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for row in ["image AUROC", "pixel AUROC", "AU-PRO", "image F1-max"] {
        assert!(stdout.contains(row), "table lacks {row}:\n{stdout}");
    }
    let v = read_json(&json);
    for key in [
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "threshold",
        "n_images",
        "inference_img_per_s",
    ] {
        assert!(v.get(key).is_some(), "eval --json lacks {key}: {v}");
    }
    // The same weights evaluate to the same numbers as at the end of training.
    let meta = read_json(&f.run_a.join("checkpoints/best.json"));
    assert_eq!(v["image_auroc"], meta["metrics"]["image_auroc"]);
    assert_eq!(v["pixel_auroc"], meta["metrics"]["pixel_auroc"]);
    let md = f.run_a.join(format!("checkpoints/best.eval-{CATEGORY}.md"));
    assert!(std::fs::read_to_string(&md)
        .expect("markdown next to the checkpoint")
        .contains("AU-PRO"));
}

#[test]
fn predict_scores_images_of_any_size_and_skips_unreadable_ones() {
    let f = fixture();
    let inputs = f.root.join("predict_inputs");
    std::fs::create_dir_all(&inputs).expect("dir");
    // A non-square grayscale photo and an RGBA one, sizes unlike the model's.
    let gray =
        image::GrayImage::from_fn(50, 30, |x, y| image::Luma([((x * 5 + y * 3) % 256) as u8]));
    gray.save(inputs.join("gray_50x30.png")).expect("png");
    let rgba = image::RgbaImage::from_fn(70, 90, |x, y| image::Rgba([x as u8, y as u8, 128, 200]));
    rgba.save(inputs.join("rgba_70x90.png")).expect("png");
    std::fs::write(
        inputs.join("broken.png"),
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    )
    .expect("write");
    let defect = f.data.join(CATEGORY).join("test/scratch");
    let missing = f.root.join("no_such_image.png");
    let out_dir = f.root.join("predictions");
    let ckpt = f.run_a.join("checkpoints/best.safetensors");
    let out = fastflow(args![
        "predict",
        "--checkpoint",
        ckpt,
        inputs,
        defect,
        missing,
        "--out",
        out_dir
    ]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.png") && stderr.contains("no_such_image.png"),
        "{}",
        text(&out)
    );

    let csv = std::fs::read_to_string(out_dir.join("predictions.csv")).expect("csv");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let n_defect = std::fs::read_dir(&defect).expect("dir").count();
    assert_eq!(rows.len(), 3 + n_defect + 1, "{csv}");
    let threshold = read_json(&f.run_a.join("checkpoints/best.json"))["threshold"]
        .as_f64()
        .expect("threshold");
    for r in &rows {
        let failed = r[0].ends_with("broken.png") || r[0].ends_with("no_such_image.png");
        if failed {
            assert_eq!(r[3], "error", "{csv}");
            assert!(!r[6].is_empty(), "error row without a message: {csv}");
            continue;
        }
        let score: f64 = r[1].parse().expect("score");
        let expected = if score >= threshold as f32 as f64 {
            "anomalous"
        } else {
            "normal"
        };
        assert_eq!(r[3], expected, "{csv}");
        assert!(
            Path::new(r[4]).is_file() && Path::new(r[5]).is_file(),
            "{csv}"
        );
    }
    // Pictures come at the input's own size; masks are binary.
    let heat = image::open(out_dir.join("gray_50x30_heatmap.png")).expect("heatmap");
    assert_eq!((heat.width(), heat.height()), (50, 30));
    let mask = image::open(out_dir.join("rgba_70x90_mask.png"))
        .expect("mask")
        .to_luma8();
    assert_eq!(mask.dimensions(), (70, 90));
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255));

    // --threshold overrides the checkpoint's: far below every score, all anomalous.
    let out_dir2 = f.root.join("predictions_low");
    let out = fastflow(args![
        "predict",
        "--checkpoint",
        ckpt,
        defect,
        "--out",
        out_dir2,
        "--threshold",
        "-1e9"
    ]);
    assert_ok(&out);
    let csv = std::fs::read_to_string(out_dir2.join("predictions.csv")).expect("csv");
    assert!(
        csv.lines().skip(1).all(|l| l.contains(",anomalous,")),
        "{csv}"
    );
}

/// Writes the config of the reference fixture `reference_tiny.pt`.
fn reference_config(dir: &Path, flow_step: usize) -> PathBuf {
    let path = dir.join(format!("reference_tiny_{flow_step}.yaml"));
    let yaml = format!(
        "backbone_name: resnet18\ninput_size: 32\nflow_step: {flow_step}\nhidden_ratio: 0.05\nconv3x3_only: False\n"
    );
    std::fs::write(&path, yaml).expect("config");
    path
}

/// A copy of the fixture in a temporary folder: `eval` writes its Markdown
/// report next to the checkpoint, which must not land in the repository.
fn reference_pt() -> PathBuf {
    static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("reference_tiny.pt");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests-fixtures/flow/reference_tiny.pt");
        std::fs::copy(&fixture, &path).expect("copy the reference fixture");
        (dir, path)
    });
    path.clone()
}

#[test]
fn reference_pt_checkpoint_evaluates_and_predicts_through_the_cli() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = reference_config(dir.path(), 1);
    let json = dir.path().join("ref.json");
    // The fixture keeps only a few backbone tensors (size budget); the rest are
    // the closed-form det_init values, which `--weights deterministic` rebuilds.
    let out = fastflow(args![
        &"eval",
        "--checkpoint",
        reference_pt(),
        "--config",
        cfg,
        "--weights",
        "deterministic",
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--json",
        json,
    ]);
    assert_ok(&out);
    assert!(reference_pt()
        .with_file_name(format!("reference_tiny.eval-{CATEGORY}.md"))
        .is_file());
    let v = read_json(&json);
    assert_eq!(v["n_images"], 4);
    for key in ["image_auroc", "pixel_auroc", "aupro"] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&x), "{key} = {x}");
    }
    let out_dir = dir.path().join("pred");
    let out = fastflow(args![
        &"predict",
        "--checkpoint",
        reference_pt(),
        "--config",
        cfg,
        "--weights",
        "deterministic",
        "--threshold",
        "-0.5",
        f.data.join(CATEGORY).join("test/good"),
        "--out",
        out_dir,
    ]);
    assert_ok(&out);
    assert!(out_dir.join("predictions.csv").is_file());
}

#[test]
fn reference_pt_errors_name_what_is_wrong() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    // No --config: we cannot know the model.
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        reference_pt(),
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_fails_with(&out, &["reference_tiny.pt", "--config"]);
    // A config with a different number of flow steps: a key of the checkpoint is missing or extra.
    let wrong = reference_config(dir.path(), 2);
    let out = fastflow(args![
        &"eval",
        "--checkpoint",
        reference_pt(),
        "--config",
        wrong,
        "--weights",
        "deterministic",
        "--data",
        f.data,
        "--category",
        CATEGORY,
    ]);
    assert_fails_with(
        &out,
        &[
            "reference_tiny.pt",
            "flow_step 2",
            "nf_flows.0.module_list.1",
        ],
    );
    // Without --weights the backbone comes from the file, which lacks most of it.
    let cfg = reference_config(dir.path(), 1);
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        reference_pt(),
        "--config",
        cfg,
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_fails_with(&out, &["reference_tiny.pt", "layer1"]);
    // A .pt that is not a torch file at all.
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"not a zip").expect("write");
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        junk,
        "--config",
        cfg,
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_fails_with(&out, &["junk.pt"]);
}

#[test]
fn bad_configs_name_the_key_and_the_file() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "unknown_key.yaml",
            TINY_CONFIG.replace("flow_step:", "flow_steps:"),
            "flow_steps",
        ),
        (
            "wrong_type.yaml",
            TINY_CONFIG.replace("flow_step: 2", "flow_step: eight"),
            "flow_step",
        ),
        (
            "bad_value.yaml",
            TINY_CONFIG.replace("input_size: 64", "input_size: 60"),
            "input_size",
        ),
        (
            "bad_backbone.yaml",
            TINY_CONFIG.replace("resnet18", "vgg16"),
            "vgg16",
        ),
    ];
    for (name, yaml, key) in cases {
        let cfg = dir.path().join(name);
        std::fs::write(&cfg, yaml).expect("write");
        let out = fastflow(args![
            &"train",
            "--config",
            cfg,
            "--data",
            f.data,
            "--category",
            CATEGORY,
            "--epochs",
            "1",
            "--weights",
            "random",
            "--out",
            dir.path().join("run"),
        ]);
        assert_fails_with(&out, &[name, key]);
    }
    let missing = dir.path().join("absent.yaml");
    let out = fastflow(args![
        "train",
        "--config",
        missing,
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_fails_with(&out, &["absent.yaml"]);
}

#[test]
fn missing_paths_are_named() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let nowhere = dir.path().join("nowhere");
    let out = fastflow(args![
        "train",
        "--config",
        f.config,
        "--data",
        nowhere,
        "--category",
        CATEGORY,
        "--weights",
        "random",
        "--out",
        dir.path().join("run"),
    ]);
    assert_fails_with(&out, &["nowhere"]);
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        nowhere.join("last.safetensors"),
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_fails_with(&out, &["last.json"]);
    let ckpt = f.run_a.join("checkpoints/best.safetensors");
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        f.data,
        "--category",
        "no_such_category"
    ]);
    assert_fails_with(&out, &["no_such_category"]);
    let out = fastflow(args![
        "predict",
        "--checkpoint",
        ckpt,
        nowhere.join("a.png"),
        "--out",
        dir.path().join("p")
    ]);
    assert_fails_with(&out, &["none of the 1 inputs"]);
    let out = fastflow(args![
        "train",
        "--config",
        f.config,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--weights",
        "weights.bin"
    ]);
    assert_fails_with(&out, &["weights.bin"]);
}

/// Copies checkpoint `name` of run A into `dir`.
fn copy_checkpoint(f: &Fixture, dir: &Path, name: &str) -> PathBuf {
    for ext in ["safetensors", "optim.safetensors", "json"] {
        std::fs::copy(
            f.run_a.join(format!("checkpoints/{name}.{ext}")),
            dir.join(format!("{name}.{ext}")),
        )
        .expect("copy");
    }
    dir.join(format!("{name}.safetensors"))
}

#[test]
fn corrupt_and_mismatched_checkpoints_are_clear_errors() {
    let f = fixture();
    let eval = |ckpt: &Path, extra: Vec<OsString>| {
        let mut a = args![
            "eval",
            "--checkpoint",
            ckpt,
            "--data",
            f.data,
            "--category",
            CATEGORY
        ];
        a.extend(extra);
        fastflow(a)
    };

    // Truncated weights: the metadata's hash no longer matches.
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = copy_checkpoint(f, dir.path(), "last");
    let bytes = std::fs::read(&ckpt).expect("read");
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).expect("write");
    assert_fails_with(&eval(&ckpt, vec![]), &["last.safetensors", "corrupt"]);

    // Garbage metadata.
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = copy_checkpoint(f, dir.path(), "last");
    std::fs::write(dir.path().join("last.json"), b"{ not json").expect("write");
    assert_fails_with(
        &eval(&ckpt, vec![]),
        &["corrupt checkpoint metadata", "last.json"],
    );

    // A --config that differs from the checkpoint's.
    let other = dir.path().join("other.yaml");
    std::fs::write(&other, TINY_CONFIG.replace("flow_step: 2", "flow_step: 3")).expect("write");
    let ckpt = f.run_a.join("checkpoints/best.safetensors");
    assert_fails_with(
        &eval(&ckpt, args!["--config", other]),
        &["other.yaml", "flow_step 3", "flow_step 2"],
    );
    let out = fastflow(args![
        &"train",
        "--config",
        other,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--epochs",
        "3",
        "--resume",
        f.run_a.join("checkpoints/last.safetensors"),
    ]);
    assert_fails_with(&out, &["other.yaml", "does not match"]);

    // Metadata edited to another model: the weights do not fit it.
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = copy_checkpoint(f, dir.path(), "best");
    let meta_path = dir.path().join("best.json");
    let mut meta = read_json(&meta_path);
    meta["config"]["flow_step"] = serde_json::json!(3);
    std::fs::write(&meta_path, serde_json::to_string(&meta).expect("json")).expect("write");
    assert_fails_with(
        &eval(&ckpt, vec![]),
        &[
            "best.safetensors",
            "does not fit",
            "nf_flows.0.module_list.2",
        ],
    );

    // CUDA asked of a CPU-only build.
    if !cfg!(feature = "cuda") {
        let ckpt = f.run_a.join("checkpoints/best.safetensors");
        assert_fails_with(&eval(&ckpt, args!["--device", "cuda"]), &["CUDA"]);
    }
}

/// Copies every image file of `from` into `to`, prefixing names with `prefix`.
fn copy_images(from: &Path, to: &Path, prefix: &str) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let p = entry.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        std::fs::copy(&p, to.join(format!("{prefix}{name}"))).expect("copy");
    }
}

#[test]
fn folder_dataset_trains_and_evaluates() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    // A user's folder: good/ and bad/ with masks/<stem>_mask.png, no test split
    // of the good images (20 % are held out for testing, seeded).
    let mine = dir.path().join("parts/mine");
    let cat = f.data.join(CATEGORY);
    copy_images(&cat.join("train/good"), &mine.join("good"), "train_");
    copy_images(&cat.join("test/good"), &mine.join("good"), "test_");
    for defect in ["scratch", "hole"] {
        copy_images(
            &cat.join("test").join(defect),
            &mine.join("bad"),
            &format!("{defect}_"),
        );
        copy_images(
            &cat.join("ground_truth").join(defect),
            &mine.join("masks"),
            &format!("{defect}_"),
        );
    }
    let json = dir.path().join("folder.json");
    let out = fastflow(args![
        "train",
        "--config",
        f.config,
        "--data",
        dir.path().join("parts"),
        "--category",
        "mine",
        "--format",
        "folder",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--weights",
        "random",
        "--seed",
        "5",
        "--out",
        dir.path().join("run"),
        "--json",
        json,
    ]);
    assert_ok(&out);
    let v = read_json(&json);
    // 6 good images -> round(1.2) = 1 held out; 2 defective ones.
    assert_eq!(v["n_images"], 3, "{v}");
    assert!(v["pixel_auroc"].is_number(), "masks were not used: {v}");
    // `eval` holds out the same good image (the run's seed), so it reproduces
    // the training run's final numbers.
    let eval_json = dir.path().join("folder_eval.json");
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        dir.path().join("run/checkpoints/last.safetensors"),
        "--data",
        dir.path().join("parts"),
        "--category",
        "mine",
        "--format",
        "folder",
        "--json",
        eval_json,
    ]);
    assert_ok(&out);
    let e = read_json(&eval_json);
    for key in [
        "n_images",
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "threshold",
    ] {
        assert_eq!(e[key], v[key], "{key}: eval {e} vs train {v}");
    }
}

#[test]
fn bench_reports_train_and_inference_throughput() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let out = fastflow(args![
        "bench",
        "--config",
        f.config,
        "--batch-size",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
        json,
    ]);
    assert_ok(&out);
    let v = read_json(&json);
    for key in ["train_img_per_s", "inference_img_per_s"] {
        let x = v[key].as_f64().unwrap_or(0.0);
        assert!(x.is_finite() && x > 0.0, "{key} = {x}: {v}");
    }
    assert_eq!(v["batch_size"], 2);
    assert_eq!(v["config"]["input_size"], 64);
}

#[test]
fn demo_runs_end_to_end_offline_at_a_reduced_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("demo");
    // The real demo trains longer at 128 px; the command path is the same.
    let out = fastflow(args![
        "demo",
        "--out",
        out_dir,
        "--epochs",
        "1",
        "--input-size",
        "64"
    ]);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // HF_HUB_OFFLINE=1 (set by `fastflow()`) makes the hub unavailable: the
    // demo must say that it falls back to a random backbone.
    assert!(
        stdout.contains("NOTICE") && stdout.contains("RANDOM"),
        "{}",
        text(&out)
    );
    for needle in ["report:", "heatmaps:", "image AUROC"] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle}:\n{}",
            text(&out)
        );
    }
    assert!(out_dir.join("run/report.md").is_file());
    assert!(out_dir.join("run/checkpoints/best.safetensors").is_file());
    let v = read_json(&out_dir.join("metrics.json"));
    assert_eq!(v["n_images"], 32);
    let csv = std::fs::read_to_string(out_dir.join("heatmaps/predictions.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 5, "{csv}");
    assert!(out_dir.join("heatmaps/scratch_000_heatmap.png").is_file());
}

/// A run that diverges stops with the epoch, the batch or optimizer step and
/// the last good checkpoint named; that checkpoint is left byte-identical and
/// still evaluates; a run that diverges before its first save writes nothing.
#[test]
fn diverging_training_never_writes_a_non_finite_checkpoint() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = dir.path().join("run/checkpoints");
    std::fs::create_dir_all(&checkpoints).expect("mkdir");
    let ckpt = copy_checkpoint(f, &checkpoints, "last");
    let files = || -> Vec<Vec<u8>> {
        ["last.safetensors", "last.optim.safetensors", "last.json"]
            .iter()
            .map(|n| std::fs::read(checkpoints.join(n)).expect("checkpoint file"))
            .collect()
    };
    let before = files();
    let out = fastflow(args![
        "train",
        "--resume",
        ckpt,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--epochs",
        "4",
        "--lr",
        "1000",
    ]);
    let last_json = checkpoints.join("last.json").display().to_string();
    assert_fails_with(
        &out,
        &[
            "in epoch 3",
            "optimizer step",
            "the training diverged",
            "try a lower --lr",
            "no checkpoint was written after epoch 2",
            &last_json,
        ],
    );
    assert_eq!(files(), before, "the last good checkpoint was changed");
    let eval = fastflow(args![
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_ok(&eval);

    // Diverging before the first save: nothing is written at all.
    let fresh = dir.path().join("fresh");
    let mut a = train_args(f, "2", &fresh);
    a.extend(args!["--lr", "1e30"]);
    let out = fastflow(a);
    assert_fails_with(
        &out,
        &[
            "in epoch 1",
            "the training diverged",
            "no checkpoint of this run had been written yet",
        ],
    );
    assert!(
        !fresh.join("checkpoints/last.json").exists(),
        "a checkpoint was written"
    );
}

/// Data as users bring it: a category and file names with spaces and
/// non-ASCII letters, a 16-bit PNG and a CMYK JPEG among the training images,
/// and a test set of good parts only. Training, evaluation and prediction
/// work; the undefined image AUROC is said to be undefined, never printed as
/// NaN, and written as null.
#[test]
fn odd_but_valid_data_trains_evaluates_and_predicts() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let category = "odd parts ü";
    let c = dir.path().join(category);
    let src = f.data.join(CATEGORY);
    let good: Vec<PathBuf> = {
        let mut v: Vec<_> = std::fs::read_dir(src.join("train/good"))
            .expect("train/good")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    };
    std::fs::create_dir_all(c.join("train/good")).expect("mkdir");
    std::fs::create_dir_all(c.join("test/good")).expect("mkdir");
    std::fs::copy(&good[0], c.join("train/good/gut 1 ä.png")).expect("copy");
    // The same picture as 16-bit RGB.
    let rgb = image::open(&good[1]).expect("decode").into_rgb16();
    rgb.save(c.join("train/good/sixteen bit.png"))
        .expect("16-bit png");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests-fixtures/data/modes");
    std::fs::copy(
        fixtures.join("cmyk.jpg"),
        c.join("train/good/cmyk 写真.jpg"),
    )
    .expect("copy");
    std::fs::copy(&good[2], c.join("test/good/prüfung 1.png")).expect("copy");
    std::fs::copy(&good[3], c.join("test/good/test 2.png")).expect("copy");

    let run = dir.path().join("run ü");
    let json = dir.path().join("metrics ü.json");
    let out = fastflow(args![
        "train",
        "--config",
        f.config,
        "--data",
        dir.path(),
        "--category",
        category,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--weights",
        "random",
        "--out",
        run,
        "--json",
        json,
    ]);
    assert_ok(&out);
    let undefined = "undefined: all 2 test images are normal";
    for text in [
        text(&out),
        std::fs::read_to_string(run.join("report.md")).expect("report"),
    ] {
        assert!(text.contains(undefined), "{text}");
        assert!(!text.to_lowercase().contains("nan"), "{text}");
    }
    let m = read_json(&json);
    assert!(m["image_auroc"].is_null(), "{m}");
    assert!(m["threshold"].is_null(), "{m}");
    assert_eq!(m["n_images"], 2);

    let ckpt = run.join("checkpoints/last.json");
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        dir.path(),
        "--category",
        category
    ]);
    assert_ok(&out);
    assert!(text(&out).contains(undefined), "{}", text(&out));

    let pred = dir.path().join("pred ü");
    let input = c.join("test/good/prüfung 1.png");
    let out = fastflow(args!["predict", "--checkpoint", ckpt, "--out", pred, input]);
    assert_ok(&out);
    let csv = std::fs::read_to_string(pred.join("predictions.csv")).expect("csv");
    let row = csv.lines().nth(1).expect("a row");
    assert!(row.contains("prüfung 1.png"), "{csv}");
    assert!(!csv.to_lowercase().contains("nan"), "{csv}");
    let heatmaps = std::fs::read_dir(&pred)
        .expect("pred dir")
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().ends_with("_heatmap.png"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(heatmaps, 1);
}

/// The feature cache changes nothing but speed: runs with it in memory, on
/// disk and off write bit-identical checkpoints, equal to the fixture's
/// uninterrupted run (cache on by default) and to its resumed run (cache
/// rebuilt after the resume). With 3-image batches over 4 images the last
/// image is first needed in epoch 2, which then fills it.
#[test]
fn the_feature_cache_gives_bit_identical_checkpoints() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = ["last.safetensors", "last.optim.safetensors"];
    let read = |run: &Path, file: &str| {
        std::fs::read(run.join("checkpoints").join(file)).expect("checkpoint file")
    };
    for mode in ["off", "disk", "ram"] {
        let run = dir.path().join(mode);
        let mut a = train_args(f, "2", &run);
        a.extend(args!["--feature-cache", mode]);
        let out = fastflow(a);
        assert_ok(&out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        match mode {
            "off" => assert!(stdout.contains("feature cache: off"), "{stdout}"),
            "disk" => assert!(stdout.contains("on disk in"), "{stdout}"),
            _ => assert!(stdout.contains("in memory (budget"), "{stdout}"),
        }
        if mode != "off" {
            assert!(
                stdout.contains("epoch 1/2 (filling the feature cache)"),
                "{stdout}"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(&run)
            .expect("run dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("feature-cache"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{mode}: cache files left: {leftovers:?}"
        );
        for file in files {
            assert!(
                read(&run, file) == read(&f.run_a, file),
                "{mode}: {file} differs from the uninterrupted run"
            );
            assert!(
                read(&run, file) == read(&f.run_b, file),
                "{mode}: {file} differs from the resumed run"
            );
        }
    }

    let batches_of_3 = |mode: &str| {
        let run = dir.path().join(format!("b3-{mode}"));
        let mut a = train_args(f, "3", &run);
        let at = a
            .iter()
            .position(|x| x == "--batch-size")
            .expect("--batch-size")
            + 1;
        a[at] = "3".into();
        a.extend(args!["--feature-cache", mode]);
        assert_ok(&fastflow(a));
        files.map(|file| read(&run, file))
    };
    assert!(batches_of_3("off") == batches_of_3("auto"));
}

#[test]
fn a_feature_cache_budget_below_one_batch_is_refused_before_training() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let mut a = train_args(f, "1", &run);
    a.extend(args!["--feature-cache-mb", "0"]);
    let out = fastflow(a);
    assert_fails_with(
        &out,
        &["--feature-cache-mb 0 cannot hold one batch of features (2 images x"],
    );
    assert!(!run.join("checkpoints/last.json").exists());
}

/// `--checkpoint` takes a run directory (its best checkpoint) and `--resume`
/// one too (its last).
#[test]
fn run_directories_stand_for_their_checkpoints() {
    let f = fixture();
    let out = fastflow(args![
        "eval",
        "--checkpoint",
        f.run_a,
        "--data",
        f.data,
        "--category",
        CATEGORY
    ]);
    assert_ok(&out);
    let report = f.run_a.join("checkpoints/best.eval-tiny.md");
    assert!(
        text(&out).contains(&report.display().to_string()),
        "{}",
        text(&out)
    );
    assert!(report.exists());
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    copy_dir(&f.run_a.join("checkpoints"), &run.join("checkpoints"));
    let out = fastflow(args![
        "train",
        "--resume",
        run,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--epochs",
        "3",
    ]);
    assert_ok(&out);
    assert!(
        text(&out).contains("after epoch 2"),
        "did not resume from the last checkpoint:\n{}",
        text(&out)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// `--augment` trains on augmented images: the feature cache is off with a
/// note, the checkpoint records it, and the first epoch's loss differs from
/// the same run without augmentation.
#[test]
fn augment_is_reachable_and_recorded() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("aug");
    let mut a = train_args(f, "1", &run);
    a.extend(args!["--augment"]);
    let out = fastflow(a);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("augmentation is on"), "{stdout}");
    assert!(stdout.contains("feature cache: off"), "{stdout}");
    let meta = read_json(&run.join("checkpoints/last.json"));
    assert_eq!(meta["train"]["augment"], true);
    let first_loss = |run: &Path| -> serde_json::Value {
        let log = std::fs::read_to_string(run.join("train_log.jsonl")).expect("train log");
        let line = log.lines().next().expect("one epoch");
        serde_json::from_str::<serde_json::Value>(line).expect("json")["mean_loss"].clone()
    };
    assert_ne!(first_loss(&run), first_loss(&f.run_a));
}

/// `--input-size` replaces the config's input size (recorded in the
/// checkpoint); a transformer refuses a size other than its own, and a resume
/// refuses a size other than the checkpoint's.
#[test]
fn input_size_overrides_the_config() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let train = |config: PathBuf, size: &str, out: &Path| {
        fastflow(args![
            "train",
            "--config",
            config,
            "--data",
            f.data,
            "--category",
            CATEGORY,
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--weights",
            "random",
            "--input-size",
            size,
            "--out",
            out,
        ])
    };
    assert_ok(&train(reference.join("resnet18.yaml"), "64", &run));
    let meta = read_json(&run.join("checkpoints/last.json"));
    assert_eq!(meta["config"]["input_size"], 64);
    assert_eq!(
        meta["config"]["flow_step"], 8,
        "the rest of the config is kept"
    );
    let out = train(reference.join("deit.yaml"), "64", &dir.path().join("deit"));
    assert_fails_with(&out, &["--input-size", "input_size", "384"]);
    let out = fastflow(args![
        "train",
        "--resume",
        run,
        "--data",
        f.data,
        "--category",
        CATEGORY,
        "--epochs",
        "2",
        "--input-size",
        "96",
    ]);
    assert_fails_with(
        &out,
        &["--input-size 96 differs from the checkpoint's input size 64"],
    );
}
