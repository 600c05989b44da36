#!/usr/bin/env bash
# The GPU check, in two halves so that scarce GPU minutes go to running only.
#
#   data-scripts/gpu_check.sh build      # on any Linux machine, no GPU needed
#   data-scripts/gpu_check.sh run        # on the GPU machine, in a copy of this checkout
#
# build: compiles `fastflow` with `--features cudnn` (CUDA + cuDNN) and the
# CUDA builds of the parity tests of ff-backbone and ff-flow, into
# target-cuda/ (its own target directory), and copies the executables to
# target-cuda/gpu-check/. It needs nvcc: set CUDA_HOME (a CUDA toolkit, or
# the PyPI wheels `nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt
# nvidia-nvvm nvidia-cuda-cccl` unpacked into one folder, as
# `pip install --target` leaves them under nvidia/cu13) and
# CUDA_COMPUTE_CAP (default 90: H100/H200). candle links the CUDA libraries
# at build time: the link also needs libcuda.so (driver or toolkit stub),
# cuBLAS(Lt), cuRAND, NVRTC, cudart and cuDNN in CUDA_HOME/lib64 or on
# LIBRARY_PATH; without them everything compiles and only the link fails.
#
# run: (under 8 minutes on an H100/H200) the parity tests on CUDA device 0
# (same fixtures and tolerances as the CPU routes), `fastflow bench --device
# cuda` for the four configs at the reference batch size (32) with batch 1
# inference, and a 2-epoch `fastflow train --device cuda` on synthetic data;
# writes everything to ${OUT:-target-cuda/gpu-check-out}/. The machine needs
# the NVIDIA driver and the CUDA 13 runtime libraries candle loads at run time
# (libcublas, libcublasLt, libcurand, libnvrtc, libcudnn). The test
# executables look for tests-fixtures/ at the path they were built in; `run`
# links that path to this checkout when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mode=${1:-}
bundle=target-cuda/gpu-check

build() {
  [ -n "${CUDA_HOME:-}" ] || { echo "error: set CUDA_HOME to a CUDA toolkit (nvcc in \$CUDA_HOME/bin)" >&2; exit 1; }
  export PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  export LIBRARY_PATH="$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs:$CUDA_HOME/lib:${LIBRARY_PATH:-}"
  export CARGO_TARGET_DIR=$repo/target-cuda
  cargo build --release -p ff-cli -p xtask --features ff-cli/cudnn
  local tests
  tests=$(cargo test --release --no-run --features cuda -p ff-backbone -p ff-flow \
      --test resnet_parity --test vit_parity --test parity --test checkpoint --test vit_reference_pt \
      --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
  rm -rf "$bundle" && mkdir -p "$bundle/tests"
  cp target-cuda/release/fastflow target-cuda/release/xtask "$bundle/"
  for t in $tests; do cp "$t" "$bundle/tests/"; done
  echo "$repo" >"$bundle/built-in"
  echo "bundle: $bundle ($(du -sh "$bundle" | cut -f1)): fastflow, xtask, $(ls "$bundle/tests" | wc -l) test executables"
}

run() {
  [ -x "$bundle/fastflow" ] || { echo "error: no $bundle; run '$0 build' first" >&2; exit 1; }
  local out=${OUT:-target-cuda/gpu-check-out}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  local built_in
  built_in=$(cat "$bundle/built-in")
  if [ ! -e "$built_in/tests-fixtures" ]; then
    mkdir -p "$(dirname "$built_in")"
    ln -sfn "$repo" "$built_in"
  fi
  local failed=0
  echo "== parity on CUDA" | tee "$out/parity.txt"
  for t in "$bundle"/tests/*; do
    # Each executable prints its route; a CUDA build without a device would
    # silently test the CPU, so the route line is checked.
    if ! "$t" --test-threads=1 --nocapture >>"$out/parity.txt" 2>&1; then failed=1; fi
  done
  if grep -q "CUDA route skipped" "$out/parity.txt"; then
    echo "error: the parity tests did not run on CUDA:" >&2
    grep "CUDA route skipped" "$out/parity.txt" | head -3 >&2
    failed=1
  fi
  grep -E "^test result|route:" "$out/parity.txt"
  echo "== bench --device cuda"
  for config in resnet18 wide_resnet50_2 deit cait; do
    timeout 120 "$bundle/fastflow" bench --device cuda --config "configs/$config.yaml" \
      --batch-size 32 --iters 10 --warmup 3 --json "$out/bench-$config.json" | tee -a "$out/bench.txt" || failed=1
  done
  echo "== 2-epoch train --device cuda"
  rm -rf "$out/synth" "$out/run"
  "$bundle/xtask" synth --out "$out/synth" --categories weave --size 256 --n-train 64 \
    --n-test-good 16 --n-test-defect 16 >/dev/null
  timeout 180 "$bundle/fastflow" train --device cuda --config configs/resnet18.yaml --data "$out/synth" \
    --category weave --epochs 2 --weights random --out "$out/run" --json "$out/train.json" |
    tee "$out/train.txt" || failed=1
  echo "outputs in $out"
  exit "$failed"
}

case "$mode" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
