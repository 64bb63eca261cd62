#!/usr/bin/env bash
# Everything that needs the lent GPU machine, as ONE run whose steps go in order of importance and
# whose results are written as they go (a run cut off by its limit keeps what it wrote). Run
# scripts/device/pack.sh here first and carry .device; on the device:
#
#   bash scripts/device/check.sh            # all parts, in this order, until DEADLINE:
#     correctness   NCCL backend tests, `ops cuda`, foreach kernels, the TF32 flag and pinned copies,
#                   `ops cuda-mpi` (2 ranks through MPI host staging), tiny preset on CUDA in bf16,
#                   CUDA (bf16, fp32, TF32) vs CPU fp32
#     throughput    gpt2-124m (batch 16) and gpt2-774m (batch 8) against PyTorch eager, with a
#                   phase profile of both sides
#     mpi           CUDA training through MPI host staging: 2 ranks vs 1, ZeRO-1, pp = 2
#     collectives   bench collectives: NCCL at world 1, MPI at np = 2, 4, 8
#     issues        what issues 10 and 12 wait for: planner vs measured CPU runs (pp x dp on 4
#                   ranks), pipeline bubble and layouts on 16 cores
#     scaling       DDP weak scaling on CPU ranks, np = 1..8
#   bash scripts/device/check.sh mpi collectives   # only those parts (a rerun picks up the rest)
#
# DEADLINE (seconds, default 420): a step that could not finish within it is skipped. Each step has
# its own time limit. Writes $OUT/check.log (every command and its output) and, after every step,
# $OUT/results.tar.gz (JSON, tables, plots, the runs' metrics). Ends with `N passed, M failed, K
# skipped` and exits non-zero if any step failed. On a machine without a GPU (the CPU machine,
# QUICK=1 shrinks the sweeps) the GPU steps are skipped, so the script itself can be checked here;
# on the GPU machine a GPU that cannot be used is a failure, not a skip.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PARTS=("$@"); [ ${#PARTS[@]} -gt 0 ] || PARTS=(correctness throughput mpi collectives issues scaling)
for p in "${PARTS[@]}"; do
  case "$p" in correctness|throughput|mpi|collectives|issues|scaling) ;; *)
    echo "error: unknown part '$p': say correctness, throughput, mpi, collectives, issues or scaling (none: all)" >&2; exit 2;; esac
done
[ -x .device/bin/fabbrica ] || { echo "error: .device/bin/fabbrica is missing: run scripts/device/pack.sh and carry .device" >&2; exit 2; }
OUT="${OUT:-$ROOT/runs/device}"
DEADLINE="${DEADLINE:-420}"
QUICK="${QUICK:-0}"
WORK="$(mktemp -d)"
FILES="$WORK/files"
mkdir -p "$OUT" "$FILES"
LOG="$OUT/check.log"
: > "$LOG"
ON_DEVICE=0
if [ -f /opt/torch/.venv/bin/python3 ] || ! [ -d .venv ]; then
  ON_DEVICE=1
  source .device/env.sh >> "$LOG" 2>&1
  # Our Open MPI runtime and the libraries the image may lack (scripts/device/pack_mpi.sh).
  [ -f .device/mpi/env.sh ] && source .device/mpi/env.sh >> "$LOG" 2>&1
else  # a CPU machine with the project's venv: the binaries' rpath finds torch
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm="${OMPI_MCA_plm:-isolated}"
fi
# A hung collective ends the step within this, not the call's whole limit.
export FABBRICA_COMM_TIMEOUT="${FABBRICA_COMM_TIMEOUT:-120}"
# Tests that skip (no CUDA device, CPU-only libtorch) say so here.
export FABBRICA_SKIP_LOG="$WORK/skips"
PY=/opt/torch/.venv/bin/python3; [ -x "$PY" ] || PY="$ROOT/.venv/bin/python3"; [ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
FAB="$ROOT/.device/bin/fabbrica"
DATA="data.path=$ROOT/.device/pystdlib.txt"
MPIRUN=(mpirun --oversubscribe --bind-to none)
passed=0; failed=0; skipped=0

say() { echo "$*" | tee -a "$LOG"; }
save() { tar -czf "$OUT/results.tar.gz.tmp" -C "$FILES" . 2>> "$LOG" && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }

# ---- preflight: what this machine has, printed first so a missing piece costs one run ----------
say "== preflight ($(date -u +%FT%TZ))"
say "pack: $(cat .device/commit 2>/dev/null || echo unknown); parts: ${PARTS[*]}; deadline ${DEADLINE} s"
say "host: $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB"}'), $(ldd --version 2>&1 | head -1), /dev/shm $(df -h /dev/shm 2>/dev/null | awk 'NR==2{print $2}')"
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2)"
say "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.__file__)' 2>&1 | tail -1)"
say "mpirun: $(command -v mpirun || echo none) $(mpirun --version 2>/dev/null | head -1)"
missing=$(ldd .device/bin/* 2>&1 | grep "not found" | sort -u)
[ -z "$missing" ] || say "MISSING LIBRARIES: $missing"
GPU=0
if nvidia-smi -L >> "$LOG" 2>&1 && "$PY" -c 'import torch; assert torch.cuda.is_available()' >> "$LOG" 2>&1; then GPU=1; fi
if ! "$FAB" --version >> "$LOG" 2>&1; then
  say "error: .device/bin/fabbrica does not start here (see check.log): nothing can run"; save; exit 1
fi
# EXPECT_GPU=0: a bare-image rehearsal on the CPU machine (crates/cli/tests/device_pack.rs).
if [ "${EXPECT_GPU:-$ON_DEVICE}" = 1 ] && [ "$GPU" = 0 ]; then
  say "error: this is the GPU machine but no usable GPU was found (nvidia-smi or torch.cuda): the GPU steps would only be skipped"
  save; exit 1
fi

# step NAME LIMIT_S CMD...: runs CMD (its output in $WORK/last.out and the log) within LIMIT_S
# seconds, unless the deadline would pass first; counts it; on failure prints the output's end.
step() {
  local name="$1" limit="$2"; shift 2
  if [ $((SECONDS + limit)) -gt "$DEADLINE" ]; then
    skipped=$((skipped + 1)); say "== $name: skipped (needs up to ${limit} s, $((DEADLINE - SECONDS)) s left)"; return 1
  fi
  echo "== $name: $*" >> "$LOG"
  local t0=$SECONDS rc
  if declare -F "$1" > /dev/null; then
    timeout -k 10 "$limit" bash -c '"$@"' step "$@" > "$WORK/last.out" 2>&1; rc=$?
  else
    timeout -k 10 "$limit" "$@" > "$WORK/last.out" 2>&1; rc=$?
  fi
  cat "$WORK/last.out" >> "$LOG"
  if [ $rc -eq 0 ]; then
    passed=$((passed + 1)); say "ok     $name ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    [ $rc -eq 124 ] && say "FAILED $name: no result within ${limit} s" || say "FAILED $name (exit $rc, $((SECONDS - t0)) s):"
    tail -n 8 "$WORK/last.out" | sed 's/^/       | /'
  fi
  save
  return $rc
}
gpu_step() {
  if [ "$GPU" = 1 ]; then step "$@"; else skipped=$((skipped + 1)); say "== $1: skipped (no GPU)"; return 1; fi
}
# needs FILE... -- STEP_FUNCTION NAME LIMIT CMD...: the step, or a skip where the run it checks
# left nothing to check (skipped or failed: that step already counted).
needs() {
  local missing=()
  while [ "$1" != "--" ]; do [ -e "$1" ] || missing+=("$1"); shift; done; shift
  if [ ${#missing[@]} -gt 0 ]; then
    skipped=$((skipped + 1)); say "== $2: skipped (nothing to check: ${missing[*]##*/} missing)"; return 1
  fi
  "$@"
}
# keep RUN_DIR NAME: its metrics and config go into the results.
keep() { mkdir -p "$FILES/runs/$2" && cp "$1"/metrics.jsonl "$1"/config.toml "$FILES/runs/$2/" 2>/dev/null; true; }

# same_losses A B TOL: two runs logged the same losses within a relative tolerance.
same_losses() {
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import json, sys
a, b, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
def train_losses(run):
    recs = (json.loads(l) for l in open(run + "/metrics.jsonl"))
    return [r["loss"] for r in recs if r.get("kind") == "train"]
la, lb = train_losses(a), train_losses(b)
worst = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
print(f"{len(la)} logged losses, worst relative difference {worst:.2e} (tolerance {tol:g})")
for x, y in zip(la, lb): print(f"  {x:.6f} {y:.6f}")
sys.exit(0 if len(la) == len(lb) and len(la) > 0 and worst <= tol else 1)
PYEOF
}
# falls DIR: the last logged training loss is below 0.7 x the first.
falls() {
  "$PY" - "$1" <<'PYEOF'
import json, sys
recs = (json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl"))
l = [r["loss"] for r in recs if r.get("kind") == "train"]
print(f"loss {l[0]:.4f} -> {l[-1]:.4f}")
sys.exit(0 if l[-1] < 0.7 * l[0] else 1)
PYEOF
}
# no_skips: the tests just run skipped nothing (on the GPU machine a skip hides a missing piece).
no_skips() { if [ -s "$FABBRICA_SKIP_LOG" ]; then cat "$FABBRICA_SKIP_LOG"; rm -f "$FABBRICA_SKIP_LOG"; return 1; fi; }
nccl_tests() { .device/bin/nccl_test --test-threads=1 --nocapture && no_skips; }
foreach_tests() { .device/bin/foreach_test --test-threads=1 --nocapture && no_skips; }
precision_tests() { .device/bin/precision_test --test-threads=1 --nocapture && no_skips; }
# compare NAME: fabbrica's and PyTorch's JSON for NAME side by side, ratios in NAME-compare.json.
compare() {
  "$PY" - "$FILES/$1-fabbrica.json" "$FILES/$1-pytorch.json" "$FILES/$1-compare.json" <<'PYEOF'
import json, sys
f = json.load(open(sys.argv[1]))
t = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
fpeak, tpeak = f.get("peak_allocated_bytes"), t.get("peak_mem_gb")
rows = {
    "tokens_per_s": (f["tokens_per_s"], t["tokens_per_s"]),
    "step_ms": (f["step_ms"], t["step_ms"]),
    "mfu": (f.get("mfu"), t.get("mfu")),
    "peak_allocated_GB": (fpeak / 1e9 if fpeak else None, tpeak),
}
print(f"{'':20} {'fabbrica':>12} {'pytorch':>12} {'ratio':>8}")
out = {"fabbrica": f, "pytorch": t}
for k, (a, b) in rows.items():
    r = a / b if a and b else None
    out[k + "_ratio"] = r
    print(f"{k:20} {a if a is not None else float('nan'):12.4g} {b if b is not None else float('nan'):12.4g} {r if r else float('nan'):8.3f}")
json.dump(out, open(sys.argv[3], "w"), indent=1)
PYEOF
}

# `timeout` runs programs, not shell functions: the steps that are functions run in a child bash.
export -f same_losses falls no_skips nccl_tests foreach_tests precision_tests compare
export PY FILES WORK

has() { local p; for p in "${PARTS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

# ---- 1. correctness on the GPU ------------------------------------------------------------------
if has correctness; then
  gpu_step "NCCL backend tests (world of one), none skipped" 60 nccl_tests
  gpu_step "selftest: every op through NCCL" 60 .device/bin/comm_selftest ops cuda
  gpu_step "foreach kernels on CUDA give what the CPU gives, none skipped" 60 foreach_tests
  gpu_step "TF32 flag reaches cuBLAS; pinned micro-batch copies arrive intact, none skipped" 60 precision_tests
  gpu_step "selftest: 2 ranks, CUDA tensors through MPI host staging" 60 "${MPIRUN[@]}" -np 2 .device/bin/comm_selftest ops cuda-mpi
  tiny=(--preset tiny --set "$DATA" --set train.max_steps=300 --set train.eval_interval=150 --set run.sample_tokens=100)
  gpu_step "train tiny on the GPU (bf16, gradients over NCCL at world 1)" 120 \
    "$FAB" train "${tiny[@]}" --set run.device=cuda --set run.out_dir="$WORK/r-cuda" \
    && { cp "$WORK/last.out" "$WORK/r-cuda.out"; keep "$WORK/r-cuda" tiny-cuda-bf16; }
  needs "$WORK/r-cuda/metrics.jsonl" -- gpu_step "  its loss falls" 30 falls "$WORK/r-cuda"
  needs "$WORK/r-cuda.out" -- gpu_step "  its gradients went over NCCL" 10 grep -q "buckets over nccl" "$WORK/r-cuda.out"
  # A CUDA run starts from the weights a CPU run of the same seed starts from (drawn on the CPU's
  # generator), so its first steps match a CPU fp32 run: in bf16 autocast within bf16's rounding
  # (2e-2 relative), in fp32 with IEEE matmuls (train.tf32=false) within 1e-3, with TF32 matmuls
  # (the default) within 1e-2. Dropout off: CUDA draws other masks.
  same=(--preset tiny --set "$DATA" --set train.max_steps=20 --set train.log_interval=5 --set model.dropout=0.0 --set run.sample_tokens=0)
  step "CPU fp32 reference, 20 steps" 90 "$FAB" train "${same[@]}" --set run.device=cpu --set train.dtype=fp32 --set run.out_dir="$WORK/c32" \
    && keep "$WORK/c32" same-cpu-fp32
  if [ "$QUICK" = 1 ]; then  # here: the comparison itself, on two CPU runs of the same seed
    step "CPU fp32 again, same seed" 90 "$FAB" train "${same[@]}" --set run.device=cpu --set train.dtype=fp32 --set run.out_dir="$WORK/c32b"
    needs "$WORK/c32/metrics.jsonl" "$WORK/c32b/metrics.jsonl" -- step "  the two CPU runs match (1e-6)" 30 same_losses "$WORK/c32" "$WORK/c32b" 1e-6
  fi
  gpu_step "CUDA bf16 autocast, same seed" 60 "$FAB" train "${same[@]}" --set run.device=cuda --set train.dtype=bf16 --set run.out_dir="$WORK/g16" \
    && keep "$WORK/g16" same-cuda-bf16
  needs "$WORK/c32/metrics.jsonl" "$WORK/g16/metrics.jsonl" -- gpu_step "  CUDA bf16 matches CPU fp32 (2e-2)" 30 same_losses "$WORK/c32" "$WORK/g16" 2e-2
  gpu_step "CUDA fp32 (IEEE matmuls), same seed" 60 "$FAB" train "${same[@]}" --set run.device=cuda --set train.dtype=fp32 --set train.tf32=false \
    --set run.out_dir="$WORK/g32" && keep "$WORK/g32" same-cuda-fp32
  needs "$WORK/c32/metrics.jsonl" "$WORK/g32/metrics.jsonl" -- gpu_step "  CUDA fp32 matches CPU fp32 (1e-3)" 30 same_losses "$WORK/c32" "$WORK/g32" 1e-3
  gpu_step "CUDA fp32 with TF32 matmuls (the default), same seed" 60 "$FAB" train "${same[@]}" --set run.device=cuda --set train.dtype=fp32 \
    --set run.out_dir="$WORK/gtf" && keep "$WORK/gtf" same-cuda-tf32
  needs "$WORK/c32/metrics.jsonl" "$WORK/gtf/metrics.jsonl" -- gpu_step "  CUDA TF32 matches CPU fp32 (1e-2)" 30 same_losses "$WORK/c32" "$WORK/gtf" 1e-2
fi

# ---- 2. throughput against PyTorch eager, same model, batch, block, bf16 ------------------------
if has throughput; then
  # name fabbrica-args... -- pytorch-args...
  versus() {
    local name="$1"; shift
    local fa=() pa=()
    while [ "$1" != "--" ]; do fa+=("$1"); shift; done; shift; pa=("$@")
    # Gradients freed after each step as the PyTorch side's zero_grad(set_to_none=True); then 10
    # profiled steps (device synchronised after each phase) on both sides.
    gpu_step "fabbrica bench train $name" 150 "$FAB" bench train "${fa[@]}" --free-grads --profile 10 --set run.device=cuda \
      --json "$FILES/$name-fabbrica.json" && cat "$WORK/last.out"
    gpu_step "PyTorch eager $name" 150 sh -c "\"$PY\" .device/torch_gpt_bench.py ${pa[*]} > \"$FILES/$name-pytorch.json\"" \
      && cat "$FILES/$name-pytorch.json"
    needs "$FILES/$name-fabbrica.json" "$FILES/$name-pytorch.json" -- gpu_step "  $name: fabbrica / PyTorch eager" 30 compare "$name" \
      && cat "$WORK/last.out"
    needs "$FILES/$name-fabbrica.json" -- gpu_step "  $name: phase profile of both sides" 120 "$PY" scripts/device/torch_phases.py --anchor .device/torch_gpt_bench.py \
      --fabbrica "$FILES/$name-fabbrica.json" --json "$FILES/$name-phases.json" "${pa[@]}" --profile-steps 10 && cat "$WORK/last.out"
  }
  if [ "$QUICK" = 1 ]; then
    versus tiny --preset tiny --set model.vocab_size=128 --batch 4 --steps 5 --warmup 1 -- --layers 4 --heads 4 --embd 128 --vocab 128 --block 128 --batch 4 --steps 5 --warmup 1
  else
    versus gpt2-124m --preset gpt2-124m --batch 16 --steps 30 --warmup 5 -- --preset gpt2-124m --batch 16 --steps 30 --warmup 5
    versus gpt2-774m --preset gpt2-774m --batch 8 --steps 20 --warmup 5 -- --preset gpt2-774m --batch 8 --steps 20 --warmup 5
    # The trainer's own step (gradients kept in their buckets) and the memory estimate for it.
    gpu_step "fabbrica bench train gpt2-124m, gradients kept (the trainer's step)" 120 "$FAB" bench train --preset gpt2-124m --batch 16 \
      --steps 30 --warmup 5 --set run.device=cuda --json "$FILES/gpt2-124m-fabbrica-kept.json" && cat "$WORK/last.out"
    gpu_step "  --dry-run's memory estimate for it" 30 sh -c "\"$FAB\" train --dry-run --preset gpt2-124m --set train.batch_size=16 --set run.device=cuda | grep -i -A6 memory" \
      && cat "$WORK/last.out"
  fi
fi

# ---- 3. CUDA tensors through MPI host staging (NCCL refuses two ranks on one GPU) ---------------
if has mpi; then
  # fp32: 2 ranks against 1 rank with 2 accumulation steps. Same global batch and dropout seeds,
  # so the same losses up to the GPU's reduction order.
  eq=(--preset tiny --set "$DATA" --set train.max_steps=30 --set train.dtype=fp32 --set train.tf32=false --set run.device=cuda --set model.dropout=0.1 --set run.sample_tokens=0)
  gpu_step "fp32, 1 rank x accum 2" 60 "$FAB" train "${eq[@]}" --set train.grad_accum=2 --set run.out_dir="$WORK/r1"
  gpu_step "fp32, 2 ranks x accum 1 (comm.backend=mpi)" 90 \
    "${MPIRUN[@]}" -np 2 "$FAB" train "${eq[@]}" --set comm.backend=mpi --set run.out_dir="$WORK/r2"
  needs "$WORK/r1/metrics.jsonl" "$WORK/r2/metrics.jsonl" -- gpu_step "  2 ranks match 1 rank" 30 same_losses "$WORK/r1" "$WORK/r2" 1e-4
  gpu_step "fp32, 2 ranks with ZeRO-1" 90 \
    "${MPIRUN[@]}" -np 2 "$FAB" train "${eq[@]}" --set comm.backend=mpi --set parallel.zero=1 --set run.out_dir="$WORK/r2z"
  needs "$WORK/r1/metrics.jsonl" "$WORK/r2z/metrics.jsonl" -- gpu_step "  ZeRO-1 matches 1 rank" 30 same_losses "$WORK/r1" "$WORK/r2z" 1e-4
  # Pipeline stages on the GPU: pp = 2 (CUDA activations and gradients through MPI host staging)
  # against 1 rank with the same 4 micro-batches; dropout off (its masks are per stage).
  eqp=(--preset tiny --set "$DATA" --set train.max_steps=30 --set train.dtype=fp32 --set train.tf32=false --set run.device=cuda --set model.dropout=0.0 --set train.grad_accum=4 --set run.sample_tokens=0)
  gpu_step "fp32 pipeline reference, 1 rank x accum 4" 60 "$FAB" train "${eqp[@]}" --set run.out_dir="$WORK/p1"
  gpu_step "fp32, pp=2 on 2 ranks (comm.backend=mpi)" 90 \
    "${MPIRUN[@]}" -np 2 "$FAB" train "${eqp[@]}" --set parallel.pp=2 --set comm.backend=mpi --set run.out_dir="$WORK/p2"
  needs "$WORK/p1/metrics.jsonl" "$WORK/p2/metrics.jsonl" -- gpu_step "  the pipeline matches 1 rank" 30 same_losses "$WORK/p1" "$WORK/p2" 1e-4
fi

# ---- 4. collectives -----------------------------------------------------------------------------
if has collectives; then
  max=256M mpimax=64M; [ "$QUICK" = 1 ] && max=1M mpimax=1M
  gpu_step "NCCL all_reduce, world 1" 60 "$FAB" bench collectives --backend nccl --op all_reduce --max-bytes "$max" \
    --json "$FILES/nccl-all_reduce-np1.json" --plot "$FILES/nccl-all_reduce-np1.svg"
  nps=(2 4 8); [ "$QUICK" = 1 ] && nps=(2)
  for np in "${nps[@]}"; do
    step "MPI all_reduce, np=$np" 90 "${MPIRUN[@]}" -np "$np" "$FAB" bench collectives --op all_reduce --max-bytes "$mpimax" \
      --rounds 3 --json "$FILES/mpi-all_reduce-np$np.json" --plot "$FILES/mpi-all_reduce-np$np.svg"
  done
fi

# ---- 5. what issues 10 and 12 wait for: a core per rank -----------------------------------------
if has issues; then
  if [ "$QUICK" != 1 ]; then
    # The planner against real CPU runs with a core per rank, pp x dp on 4 ranks included.
    step "planner vs measured CPU runs (scripts/plan_validate.sh)" 240 env FAB="$FAB" CORPUS="$ROOT/.device/pystdlib.txt" \
      bash scripts/plan_validate.sh "$FILES/plan-validate" && cat "$FILES/plan-validate/own_runs.csv"
    # The pipeline bubble at m >= 8 on dedicated cores, and pp = 4 and 8.
    step "pipeline bubble and layouts (scripts/pipeline_bench.sh)" 240 env FABBRICA_BIN="$FAB" STEPS=8 CORPUS="$ROOT/.device/pystdlib.txt" \
      bash scripts/pipeline_bench.sh "$FILES/pipeline" && cat "$FILES/pipeline/bubble.md" "$FILES/pipeline/layouts.md"
  fi
fi

# ---- 6. DDP weak scaling ------------------------------------------------------------------------
if has scaling; then
  n=8; [ "$QUICK" = 1 ] && n=2
  step "DDP weak scaling on CPU ranks, np=1..$n" 200 env FABBRICA_BIN="$FAB" bash scripts/scaling.sh "$n" "$FILES/scaling" -- \
    --preset tiny --set "$DATA" --set run.device=cpu --set run.threads=1 --steps 10 --rounds 2
fi

save
rm -rf "$WORK"
say "check (${PARTS[*]}): $passed passed, $failed failed, $skipped skipped, $SECONDS s"
[ "$failed" -eq 0 ]
