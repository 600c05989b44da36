//! The `bench-all` and `bench-merge` commands end to end through the xtask
//! binary, with a stand-in `fastflow` script (a shell script that checks its
//! arguments and writes metrics), so the wiring from flags to cell files,
//! skipping, sharding and the merged report is tested without training.
#![cfg(unix)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A stand-in for `fastflow train`: it insists on the flags bench-all must
/// pass, checks that the data and config exist, and writes metrics that
/// depend on the category so that cells are distinguishable.
const FAKE_FASTFLOW: &str = r#"#!/bin/sh
[ "$1" = "train" ] || { echo "expected the train command, got $1" >&2; exit 2; }
shift
while [ "$#" -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --category) category="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    --weights) weights="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --input-size) input_size="$2"; shift 2 ;;
    *) echo "unexpected argument $1" >&2; exit 2 ;;
  esac
done
[ -f "$config" ] || { echo "no config $config" >&2; exit 3; }
[ "$input_size" = "32" ] || { echo "expected --input-size 32, got '$input_size'" >&2; exit 3; }
[ -d "$data/$category/train/good" ] || { echo "no data in $data/$category" >&2; exit 3; }
[ "$epochs" = "1" ] && [ "$weights" = "random" ] || { echo "wrong epochs/weights" >&2; exit 3; }
[ -n "$out" ] && [ -n "$seed" ] || exit 3
echo "$category" >> "$(dirname "$0")/calls.txt"
case "$category" in
  weave) a=0.91 ;;
  disc) a=0.97 ;;
  *) a=0.5 ;;
esac
printf '{"image_auroc": %s, "pixel_auroc": 0.96, "aupro": 0.9, "image_f1_max": 0.9, "threshold": -0.4, "n_images": 8, "inference_img_per_s": 20.0}' "$a" > "$json"
"#;

fn fake_fastflow(dir: &Path) -> PathBuf {
    let path = dir.join("fastflow");
    fs::write(&path, FAKE_FASTFLOW).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn xtask(args: &[&str]) -> Output {
    // Retry while the kernel reports the fresh script as busy (ETXTBSY: a
    // fork in a parallel test briefly holding its write handle).
    for _ in 0..20 {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&out.stderr).contains("Text file busy") {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the stand-in fastflow stayed busy");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn bench_args<'a>(out: &'a str, fastflow: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "bench-all",
        "--data",
        "synthetic",
        "--categories",
        "weave,disc",
        "--synth-size",
        "32",
        "--n-train",
        "2",
        "--n-test-good",
        "1",
        "--n-test-defect",
        "1",
        "--input-size",
        "32",
        "--epochs",
        "1",
        "--fastflow",
        fastflow,
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn bench_all_runs_skips_and_merges_shards() {
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_fastflow(dir.path());
    let bin_s = bin.to_str().unwrap();
    let full = dir.path().join("full");
    let full_s = full.to_str().unwrap();

    let o = xtask(&bench_args(full_s, bin_s, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("[cell 1/2] resnet18/disc"), "{log}");
    assert!(log.contains("[cell 2/2] resnet18/weave"), "{log}");
    assert!(log.contains("ETA"), "{log}");
    let md = fs::read_to_string(full.join("report.md")).unwrap();
    assert!(
        md.contains("| disc | 97.0 |") && md.contains("| weave | 91.0 |"),
        "{md}"
    );
    assert!(md.contains("| **mean (ours)** | **94.0** |"), "{md}");
    assert!(md.contains("| paper (mean) | 97.9 |"), "{md}");
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["cells"].as_array().unwrap().len(), 2);

    // Rerun: both cells are finished, the program is not called again.
    let o = xtask(&bench_args(full_s, bin_s, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("skipped").count(), 3, "{}", stderr(&o));
    let calls = fs::read_to_string(dir.path().join("calls.txt")).unwrap();
    assert_eq!(calls.lines().count(), 2, "{calls}");

    // Two shards, then a merge: the same report as the full run.
    let mut shard_dirs = Vec::new();
    for i in 0..2 {
        let d = dir.path().join(format!("shard-{i}"));
        let shard = format!("{i}/2");
        let o = xtask(&bench_args(
            d.to_str().unwrap(),
            bin_s,
            &["--shard", &shard],
        ));
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("1 of the matrix's 2 cells"),
            "{}",
            stderr(&o)
        );
        shard_dirs.push(d);
    }
    let merged = dir.path().join("merged");
    let inputs = format!("{},{}", shard_dirs[0].display(), shard_dirs[1].display());
    let o = xtask(&[
        "bench-merge",
        "--inputs",
        &inputs,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Real processes take different times in each run, so timings are left
    // out of the comparison (the unit test with a deterministic fake runner
    // checks byte equality); every metric must agree.
    let metrics_part = |p: PathBuf| {
        let md = fs::read_to_string(p).unwrap();
        md[..md.find("## Time and speed").unwrap()].to_string()
    };
    assert_eq!(
        metrics_part(full.join("report.md")),
        metrics_part(merged.join("report.md"))
    );
    let without_times = |p: PathBuf| {
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
        for cell in v["cells"].as_array_mut().unwrap() {
            let cell = cell.as_object_mut().unwrap();
            cell.remove("train_seconds");
            cell.remove("wall_seconds");
        }
        v["means_percent"]["resnet18"]
            .as_object_mut()
            .unwrap()
            .remove("train_seconds_total");
        v
    };
    assert_eq!(
        without_times(full.join("summary.json")),
        without_times(merged.join("summary.json"))
    );
    // The merged cell files are the shards' files, byte for byte.
    for (shard, cat) in [(0, "disc"), (1, "weave")] {
        let f = format!("resnet18/{cat}.json");
        assert_eq!(
            fs::read(shard_dirs[shard].join(&f)).unwrap(),
            fs::read(merged.join(&f)).unwrap()
        );
    }
}

#[test]
fn a_failing_cell_makes_the_run_fail_and_names_the_cell() {
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_fastflow(dir.path());
    let out = dir.path().join("out");
    // The stand-in rejects the unexpected extra argument.
    let o = xtask(&bench_args(
        out.to_str().unwrap(),
        bin.to_str().unwrap(),
        &["--train-arg=--bogus"],
    ));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("2 cells failed"), "{err}");
    assert!(
        err.contains("resnet18/weave") && err.contains("unexpected argument --bogus"),
        "{err}"
    );
    // The report still exists and shows the cells as missing.
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Cells finished: 0 of 2."), "{md}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let o = xtask(&[
        "bench-all",
        "--data",
        missing.to_str().unwrap(),
        "--fastflow",
        "/bin/true",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("download-mvtec"), "{}", stderr(&o));

    let o = xtask(&["bench-all", "--data", "synthetic", "--shard", "2/2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("0..2"), "{}", stderr(&o));

    let o = xtask(&[
        "bench-all",
        "--data",
        "synthetic",
        "--backbones",
        "vgg16",
        "--synth-size",
        "32",
        "--n-train",
        "1",
        "--categories",
        "weave",
        "--out",
        dir.path().join("o").to_str().unwrap(),
        "--fastflow",
        "/bin/true",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("vgg16.yaml"), "{}", stderr(&o));
}
