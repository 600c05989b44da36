#!/usr/bin/env bash
# End-to-end training time on this machine: `fastflow train` (feature cache
# on, its default) against the reference's training loop
# (data-scripts/train_reference.py) on the same synthetic category, one after
# the other in one run. Prints wall times, their ratio and peak RSS.
#
#   data-scripts/train_side_by_side.sh [config] [train-images] [epochs] [out-dir]
#
# config: resnet18 (default), wide_resnet50_2, deit or cait; train-images: 48;
# epochs: 10. The category has train-images good training images and a third
# as many test images (half good, half defective), 256 px, made by
# `xtask synth`. Both sides use the reference's batch size (32; all images
# when fewer), evaluation every 10 epochs and at the end, and random
# backbone weights.
# Environment: REF_WORKERS (the reference DataLoader's num_workers; default
# 0, its fastest setting on 2 cores: main.py's 4 worker processes, forked
# anew every epoch, made its resnet18 loop 2.8x slower here), PYTHON (a venv
# with torch 2.5.1, timm 0.5.4, FrEIA, scikit-learn; default python3),
# FASTFLOW and XTASK (default
# target/release/{fastflow,xtask}, built with
# `cargo build --release -p ff-cli -p xtask`).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-resnet18}
n_train=${2:-48}
epochs=${3:-10}
out=${4:-target/train-side-by-side/$config-n$n_train-e$epochs}
python=${PYTHON:-python3}
workers=${REF_WORKERS:-0}
fastflow=${FASTFLOW:-target/release/fastflow}
xtask=${XTASK:-target/release/xtask}
for bin in "$fastflow" "$xtask"; do
  test -x "$bin" || { echo "error: $bin not found; cargo build --release -p ff-cli -p xtask" >&2; exit 1; }
done
test -x /usr/bin/time || { echo "error: /usr/bin/time (GNU time) is needed for the peak RSS" >&2; exit 1; }
n_test=$(( (n_train + 2) / 3 ))
n_good=$(( n_test / 2 ))
rm -rf "$out"
mkdir -p "$out"
"$xtask" synth --out "$out/data" --categories weave --size 256 --n-train "$n_train" \
  --n-test-good "$n_good" --n-test-defect "$(( n_test - n_good ))" >&2

echo "== fastflow train" >&2
/usr/bin/time -f "%e %M" -o "$out/fastflow.time" \
  "$fastflow" train --config "configs/$config.yaml" --data "$out/data" --category weave \
  --epochs "$epochs" --weights random --out "$out/fastflow-run" --json "$out/fastflow.json" >&2
echo "== reference training loop" >&2
/usr/bin/time -f "%e %M" -o "$out/reference.time" \
  "$python" data-scripts/train_reference.py "$config" "$out/data" weave "$epochs" 32 \
  "$out/reference.json" "$workers" >&2

"$python" - "$out" "$config" "$n_train" "$epochs" <<'PY'
import json, sys
out, config, n_train, epochs = sys.argv[1:]
ff_wall, ff_rss = map(float, open(f"{out}/fastflow.time").read().split())
ref_wall, ref_rss = map(float, open(f"{out}/reference.time").read().split())
ff = json.load(open(f"{out}/fastflow.json"))
ref = json.load(open(f"{out}/reference.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"{config}, {n_train} training images, {epochs} epochs, 2 threads, {cpu}; "
      f"reference DataLoader num_workers={ref['workers']}\n")
print("| | fastflow-rs (feature cache) | reference loop | ratio |")
print("| --- | ---: | ---: | ---: |")
print(f"| training loop incl. evaluations (s) | {ff['train_seconds']:.1f} | {ref['loop_seconds']:.1f} "
      f"| {ff['train_seconds'] / ref['loop_seconds']:.2f} |")
print(f"| whole process, wall (s) | {ff_wall:.1f} | {ref_wall:.1f} | {ff_wall / ref_wall:.2f} |")
print(f"| peak RSS (MiB) | {ff_rss / 1024:.0f} | {ref_rss / 1024:.0f} | |")
PY
