#!/usr/bin/env bash
# The benchmark matrix on a real Slurm: installs and starts a single-node
# cluster (Debian's slurm-wlm and munge; root required, the packages come from
# the Debian mirror), submits data-scripts/bench_slurm.sbatch as a 2-task
# array over a tiny synthetic matrix, waits for it, merges the shards with
# `xtask bench-merge`, runs the same matrix in one process, and checks that
# the two summary.json files agree on everything except timings.
#
#   data-scripts/slurm_smoke.sh            # from a fresh machine with the Rust toolchain
#
# Environment: XTASK and FASTFLOW (built binaries; default target/debug/*,
# built here when missing), SMOKE_DIR (work folder, default
# target/slurm-smoke), SMOKE_TIMEOUT (seconds to wait for the jobs, 900).
# The daemons run from SMOKE_DIR with their own config (SLURM_CONF), talk only
# over loopback, and are stopped on exit; /etc is touched only to create a
# munge key when the package did not.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(realpath -m "${SMOKE_DIR:-target/slurm-smoke}")
xtask_bin=$(realpath -m "${XTASK:-target/debug/xtask}")
fastflow_bin=$(realpath -m "${FASTFLOW:-target/debug/fastflow}")
timeout_s=${SMOKE_TIMEOUT:-900}

say() { echo "slurm-smoke: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it installs packages and starts munged, slurmctld and slurmd"

# --- packages ----------------------------------------------------------------
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; } ||
    die "cannot install ${need[*]} with apt-get"
fi

if [ ! -x "$xtask_bin" ] || [ ! -x "$fastflow_bin" ]; then
  say "building xtask and fastflow"
  cargo build -q -p xtask -p ff-cli
fi

# --- munge ---------------------------------------------------------------------
started_munged=0
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  started_munged=1
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# --- a one-node cluster --------------------------------------------------------
rm -rf "$work"
mkdir -p "$work/etc" "$work/spool/ctld" "$work/spool/d" "$work/log" "$work/results"
node=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
export SLURM_CONF="$work/etc/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=smoke
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$work/spool/ctld
SlurmdSpoolDir=$work/spool/d
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=smoke Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # A munged this script started goes too; one that was running stays.
  if [ "$started_munged" = 1 ] && [ -s /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
}
trap cleanup EXIT
slurmctld -D -i -f "$SLURM_CONF" >"$work/log/slurmctld.stdout" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" -N "$node" >"$work/log/slurmd.stdout" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle && break
  sleep 0.5
done
if ! sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
  tail -n 20 "$work"/log/*.log >&2 || true
  die "the node did not come up (logs above, all in $work/log)"
fi
say "cluster up: node $node, $cpus CPUs, ${mem_mb} MiB"

# --- the matrix through sbatch ---------------------------------------------------
# Two backbone/category cells per shard: shard k owns cells k, k+2, ...
matrix=(--categories weave,disc --synth-size 64 --n-train 8 --n-test-good 4 --n-test-defect 4
  --input-size 64 --weights random)
backbones=resnet18
epochs=1
# The settings travel as the environment (--export=ALL): values with commas
# cannot go through --export's own list.
jobid=$(cd "$repo" &&
  SHARDS=2 DATA=synthetic EPOCHS=$epochs BACKBONES=$backbones DEVICE=cpu \
  FASTFLOW="$fastflow_bin" XTASK="$xtask_bin" OUT="$work/results" BENCH_ARGS="${matrix[*]}" \
  sbatch --parsable --export=ALL --array=0-1 \
  --gres=none --cpus-per-task=1 --mem=2G --time=30:00 \
  --output="$work/results/slurm-%A_%a.out" \
  data-scripts/bench_slurm.sbatch)
say "submitted array job $jobid"
deadline=$((SECONDS + timeout_s))
while [ -n "$(squeue -h -j "$jobid" 2>/dev/null)" ]; do
  [ $SECONDS -lt $deadline ] || { scancel "$jobid"; die "job $jobid still running after ${timeout_s}s"; }
  sleep 2
done
for task in 0 1; do
  out="$work/results/slurm-${jobid}_$task.out"
  [ -f "$out" ] || die "task $task wrote no log ($out)"
  if [ ! -s "$work/results/shard-$task/summary.json" ]; then
    cat "$out" >&2
    die "task $task of job $jobid did not finish its shard (its log is above)"
  fi
done
say "both shards finished; merging"
"$xtask_bin" bench-merge --inputs "$work/results/shard-0,$work/results/shard-1" --out "$work/results"

# --- the same matrix in one process ----------------------------------------------
say "running the same matrix in one process"
"$xtask_bin" bench-all --data synthetic --backbones "$backbones" --epochs "$epochs" --device cpu \
  --fastflow "$fastflow_bin" --out "$work/single" "${matrix[@]}"

# Everything but timings (which no two runs share) must be equal.
strip='walk(if type == "object" then
  del(.wall_seconds, .train_seconds, .train_seconds_total, .inference_img_per_s)
  else . end)'
jq -S "$strip" "$work/results/summary.json" >"$work/merged.json"
jq -S "$strip" "$work/single/summary.json" >"$work/single.json"
if ! diff -u "$work/single.json" "$work/merged.json"; then
  die "the merged summary differs from the single-process run (diff above)"
fi
cells=$(jq '.cells | length' "$work/merged.json")
[ "$cells" -eq 2 ] || die "expected 2 cells in the merged summary, found $cells"
say "ok: the Slurm array's merged summary equals the single-process run ($cells cells)"
