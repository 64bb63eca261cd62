#!/usr/bin/env bash
# The planner against fabbrica's own runs on this machine (docs/PLANNER.md, "Against fabbrica's
# own runs"): calibrate a cluster file from `bench collectives` and `bench train` here, then for
# each layout compare the planner's step time (`plan --explain`) with the measured one (the median
# step_ms of a real `fabbrica train` under mpirun, steps after the first 5).
#
#   scripts/plan_validate.sh [OUT_DIR]     # default runs/plan-validate; about 3 minutes on 2 cores
#   FAB=path/to/fabbrica CORPUS=file.txt scripts/plan_validate.sh OUT   # e.g. on the GPU machine (16 cores: pp × dp too)
#
# Writes OUT_DIR/cpu.toml (the calibrated cluster) and OUT_DIR/own_runs.csv
# (layout,ranks,measured_s,predicted_s,error). Every rank gets one core: layouts of at most
# `nproc` ranks are run (more would time-share cores, which the planner does not model).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${FAB:-}" ] || source scripts/env.sh
OUT=${1:-runs/plan-validate}
mkdir -p "$OUT"
B=${FAB:-./target/release/fabbrica}
[ -x "$B" ] || cargo build --release -p fabbrica-cli
CORPUS=${CORPUS:-data/pystdlib.txt}
MPI=(mpirun --oversubscribe --allow-run-as-root)
CORES=$(nproc)
# Any python3 does (json and statistics only): the venv's here, the system's on the GPU machine.
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

# The model every run trains: a 4-layer GPT of width 256, 128 tokens of context, fp32 CPU.
cat > "$OUT/model.toml" <<'EOF'
[model]
n_layer = 4
n_head = 8
n_embd = 256
block_size = 128
vocab_size = 128
EOF
CFG=(--config "$OUT/model.toml")
MB=8

echo "== links: all_reduce and sendrecv between 2 ranks"
"${MPI[@]}" -np 2 "$B" bench collectives --op all_reduce --max-bytes 64M --iters 10 --rounds 3 --json "$OUT/ar2.json" >/dev/null
"${MPI[@]}" -np 2 "$B" bench collectives --op sendrecv --max-bytes 64M --iters 10 --rounds 3 --json "$OUT/p2p2.json" >/dev/null
echo "== compute: one rank on one core"
"$B" bench train "${CFG[@]}" --set run.device=cpu --set run.threads=1 --batch $MB --steps 10 --warmup 2 --json "$OUT/train1.json" >/dev/null
"$B" plan calibrate --collectives "$OUT/ar2.json" --collectives "$OUT/p2p2.json" --train "$OUT/train1.json" --config "$OUT/model.toml" --out "$OUT/cpu.toml"

# name ranks explain global_batch train-sets...
run_layout() {
  local name=$1 np=$2 explain=$3 gb=$4
  shift 4
  if [ "$np" -gt "$CORES" ]; then echo "skip $name: $np ranks on $CORES cores"; return; fi
  local dir="$OUT/$name"
  rm -rf "$dir"
  local sets=(--set run.device=cpu --set run.threads=1 --set "train.batch_size=$MB" --set train.max_steps=25 --set train.log_interval=1
    --set train.eval_interval=1000 --set train.eval_iters=1 --set run.sample_tokens=0 --set run.checkpoint_interval=0
    --set "run.out_dir=$dir" --set "data.path=$CORPUS" "$@")
  if [ "$np" -gt 1 ]; then
    "${MPI[@]}" -np "$np" "$B" train "${CFG[@]}" "${sets[@]}" >/dev/null
  else
    "$B" train "${CFG[@]}" "${sets[@]}" >/dev/null
  fi
  local measured
  measured=$("$PY" - "$dir/metrics.jsonl" <<'PY'
import json, statistics, sys
ms = [r["step_ms"] for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "train" and r.get("step", 0) > 5 and r.get("step_ms")]
print(statistics.median(ms) / 1e3)
PY
)
  "$B" plan "${CFG[@]}" --cluster "$OUT/cpu.toml" --gpus "$np" --global-batch "$gb" --seq 128 --explain "$explain" --json "$dir/plan.json" >/dev/null
  local predicted
  predicted=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['step_s'])" "$dir/plan.json")
  "$PY" -c "import sys; m,p=float(sys.argv[2]),float(sys.argv[3]); print(f'{sys.argv[1]},{sys.argv[4]},{m:.4f},{p:.4f},{(p-m)/m:+.3f}')" "$name" "$measured" "$predicted" "$np" | tee -a "$OUT/own_runs.csv"
}

echo "layout,ranks,measured_s,predicted_s,error" > "$OUT/own_runs.csv"
run_layout single-accum4 1 tp=1,pp=1,dp=1,mb=$MB,recompute=none,zero=0 32 --set train.grad_accum=4
run_layout dp2 2 tp=1,pp=1,dp=2,mb=$MB,recompute=none,zero=0 32 --set train.grad_accum=2 --set parallel.dp=2
run_layout dp2-zero1 2 tp=1,pp=1,dp=2,mb=$MB,recompute=none,zero=1 32 --set train.grad_accum=2 --set parallel.dp=2 --set parallel.zero=1
run_layout pp2-1f1b 2 tp=1,pp=2,dp=1,v=1,mb=$MB,recompute=none,zero=0 64 --set train.grad_accum=8 --set parallel.pp=2
run_layout pp2-interleaved 2 tp=1,pp=2,dp=1,v=2,mb=$MB,recompute=none,zero=0 64 --set train.grad_accum=8 --set parallel.pp=2 --set parallel.schedule=interleaved --set parallel.virtual_stages=2
run_layout pp2-dp2 4 tp=1,pp=2,dp=2,v=1,mb=$MB,recompute=none,zero=0 64 --set train.grad_accum=4 --set parallel.pp=2 --set parallel.dp=2
echo "table: $OUT/own_runs.csv"
