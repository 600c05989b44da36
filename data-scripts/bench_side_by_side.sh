#!/usr/bin/env bash
# Side-by-side CPU speed on this machine: `fastflow bench`, the PyTorch
# reference (bench_reference.py) and the same reference model exported to
# ONNX under ONNX Runtime and OpenVINO (bench_onnx.py), interleaved for
# `rounds` rounds so that load changes hit all of them alike; then the
# medians over rounds and the ratios. Writes each run's JSON under the output
# folder and prints a Markdown table.
#
#   data-scripts/bench_side_by_side.sh [config] [batch] [rounds] [out-dir]
#
# config: resnet18 (default) or wide_resnet50_2; batch: 8; rounds: 2.
# Environment: PYTHON (a venv with torch 2.5.1, timm 0.5.4, FrEIA, onnx,
# onnxruntime, openvino; default python3), FASTFLOW (default
# target/release/fastflow, built with `cargo build --release -p ff-cli`),
# ITERS (timed iterations per measurement, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-resnet18}
batch=${2:-8}
rounds=${3:-2}
out=${4:-target/side-by-side/$config-b$batch}
python=${PYTHON:-python3}
fastflow=${FASTFLOW:-target/release/fastflow}
iters=${ITERS:-10}
size=256
mkdir -p "$out"
test -x "$fastflow" || { echo "error: $fastflow not found; cargo build --release -p ff-cli" >&2; exit 1; }
for r in $(seq 1 "$rounds"); do
  echo "== round $r: fastflow" >&2
  "$fastflow" bench --config "configs/$config.yaml" --batch-size "$batch" --iters "$iters" \
    --warmup 2 --json "$out/fastflow-$r.json" >&2
  echo "== round $r: PyTorch reference" >&2
  "$python" data-scripts/bench_reference.py "$config" "$size" "$batch" "$iters" "$out/pytorch-$r.json" >&2
  echo "== round $r: ONNX Runtime / OpenVINO" >&2
  "$python" data-scripts/bench_onnx.py "$config" "$size" "$batch" "$iters" "$out/onnx-$r.json" \
    "$out/$config-$size.onnx" >&2
done
"$python" - "$out" "$rounds" "$config" "$batch" <<'PY'
import json, os, statistics, sys
out, rounds, config, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def load(name):
    return [json.load(open(os.path.join(out, f"{name}-{r}.json"))) for r in range(1, rounds + 1)]
ours, torch, onnx = load("fastflow"), load("pytorch"), load("onnx")
def med(runs, *path):
    vals = []
    for run in runs:
        v = run
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None
cpu = ours[0].get("cpu_model") or "unknown CPU"
print(f"{config} @ 256, batch {batch}, {ours[0]['threads']} threads, {cpu}, kernels {ours[0]['cpu_kernels']}; "
      f"median img/s over {rounds} rounds (each the median of its timed iterations)\n")
rows = [
    ("training step, batch " + batch, med(ours, "train", "median_img_per_s"), med(torch, "train", "median_img_per_s"), None, None),
    ("inference, batch " + batch, med(ours, "inference", "median_img_per_s"), med(torch, "inference", "median_img_per_s"),
     med(onnx, "onnxruntime", "inference", "median_img_per_s"), med(onnx, "openvino", "inference", "median_img_per_s")),
    ("inference, batch 1", med(ours, "inference_batch1", "median_img_per_s"), med(torch, "inference_batch1", "median_img_per_s"),
     med(onnx, "onnxruntime", "inference_batch1", "median_img_per_s"), med(onnx, "openvino", "inference_batch1", "median_img_per_s")),
]
def f(v):
    return "-" if v is None else f"{v:.1f}"
def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"
print("| | fastflow-rs | PyTorch | ONNX Runtime | OpenVINO | vs PyTorch | vs ONNX Runtime | vs OpenVINO |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, a, t, o, v in rows:
    print(f"| {name} | {f(a)} | {f(t)} | {f(o)} | {f(v)} | {ratio(a, t)} | {ratio(a, o)} | {ratio(a, v)} |")
rss_ours = med(ours, "train", "peak_rss_mib")
rss_torch = med(torch, "train", "peak_rss_mib")
print(f"\npeak RSS during training: fastflow-rs {f(rss_ours)} MiB, PyTorch {f(rss_torch)} MiB")
PY
