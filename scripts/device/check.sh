#!/usr/bin/env bash
# Everything that needs the lent GPU machine, in three parts that each fit one device call
# (10 minutes). Run scripts/device/pack.sh here first and carry .device; on the device:
#
#   bash scripts/device/check.sh correctness   # NCCL backend tests, CUDA training, 2-rank host staging
#   bash scripts/device/check.sh collectives   # bench collectives: NCCL at world 1, MPI np=2,4,8; planner vs CPU runs
#   bash scripts/device/check.sh throughput    # gpt2-124m vs PyTorch eager; DDP weak scaling np=1..8
#
# Each part writes $OUT/PART.log (every command and its output) and $OUT/PART.tar.gz (JSON, tables,
# plots), and ends with `PART: N passed, M failed`. Without a GPU the CUDA steps are reported as
# skipped, so the script itself can be checked on a CPU machine (QUICK=1 shrinks the sweeps).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PART="${1:-}"
case "$PART" in correctness|collectives|throughput) ;; *)
  echo "error: say which part: correctness, collectives or throughput" >&2; exit 2;; esac
[ -x .device/bin/fabbrica ] || { echo "error: .device/bin/fabbrica is missing: run scripts/device/pack.sh and carry .device" >&2; exit 2; }
OUT="${OUT:-$ROOT/runs/device}"
WORK="$(mktemp -d)"
mkdir -p "$OUT" "$WORK/files"
LOG="$OUT/$PART.log"
: > "$LOG"
if [ -f /opt/torch/.venv/bin/python3 ] || ! [ -d .venv ]; then
  source .device/env.sh >> "$LOG" 2>&1
else  # a CPU machine with the project's venv: the binaries' rpath finds torch
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm="${OMPI_MCA_plm:-isolated}"
fi
PY=/opt/torch/.venv/bin/python3; [ -x "$PY" ] || PY="$ROOT/.venv/bin/python3"; [ -x "$PY" ] || PY=python3
FAB="$ROOT/.device/bin/fabbrica"
DATA="data.path=$ROOT/.device/pystdlib.txt"
MPIRUN=(mpirun --oversubscribe --bind-to none)
GPU=0; nvidia-smi -L >> "$LOG" 2>&1 && GPU=1
QUICK="${QUICK:-0}"
passed=0; failed=0

say() { echo "$*" | tee -a "$LOG"; }
# step NAME CMD...: runs CMD, logs it, counts it.
step() {
  local name="$1"; shift
  say "== $name: $*"
  local t0=$SECONDS
  if "$@" >> "$LOG" 2>&1; then
    passed=$((passed + 1)); say "   ok ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1)); say "   FAILED ($((SECONDS - t0)) s)"
  fi
}
gpu_step() {
  if [ "$GPU" = 1 ]; then step "$@"; else say "== $1: skipped (no GPU)"; fi
}

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
sys.exit(0 if len(la) == len(lb) and len(la) > 0 and worst <= tol else 1)
PYEOF
}
# falls DIR: the last logged training loss is below 0.7 x the first (step 10).
falls() {
  "$PY" - "$1" <<'PYEOF'
import json, sys
recs = (json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl"))
l = [r["loss"] for r in recs if r.get("kind") == "train"]
print(f"loss {l[0]:.4f} -> {l[-1]:.4f}")
sys.exit(0 if l[-1] < 0.7 * l[0] else 1)
PYEOF
}

case "$PART" in
correctness)
  gpu_step "NCCL backend tests (world of one)" .device/bin/nccl_test --test-threads=1 --nocapture
  gpu_step "selftest: every op through NCCL" .device/bin/comm_selftest ops cuda
  gpu_step "selftest: 2 ranks, CUDA tensors through MPI host staging" "${MPIRUN[@]}" -np 2 .device/bin/comm_selftest ops cuda-mpi
  tiny=(--preset tiny --set "$DATA" --set train.max_steps=300 --set train.eval_interval=150)
  gpu_step "train tiny on the GPU (bf16, gradients over NCCL at world 1)" \
    "$FAB" train "${tiny[@]}" --set run.device=cuda --set run.out_dir="$WORK/r-cuda"
  gpu_step "  its loss falls" falls "$WORK/r-cuda"
  gpu_step "  its gradients went over NCCL" grep -q "buckets over nccl" "$LOG"
  # A CUDA run starts from the weights a CPU run of the same seed starts from (drawn on the CPU's
  # generator), so its first steps match a CPU fp32 run: in bf16 autocast within bf16's rounding
  # (2e-2 relative), in fp32 within 1e-3. Dropout off: CUDA draws other masks.
  same=(--preset tiny --set "$DATA" --set train.max_steps=20 --set train.log_interval=5 --set model.dropout=0.0)
  step "CPU fp32 reference, 20 steps" "$FAB" train "${same[@]}" --set run.device=cpu --set train.dtype=fp32 --set run.out_dir="$WORK/c32"
  gpu_step "CUDA bf16 autocast, same seed" "$FAB" train "${same[@]}" --set run.device=cuda --set train.dtype=bf16 --set run.out_dir="$WORK/g16"
  gpu_step "  CUDA bf16 matches CPU fp32 (2e-2)" same_losses "$WORK/c32" "$WORK/g16" 2e-2
  gpu_step "CUDA fp32, same seed" "$FAB" train "${same[@]}" --set run.device=cuda --set train.dtype=fp32 --set run.out_dir="$WORK/g32"
  gpu_step "  CUDA fp32 matches CPU fp32 (1e-3)" same_losses "$WORK/c32" "$WORK/g32" 1e-3
  # fp32 on the GPU: 2 ranks (MPI host staging; NCCL refuses two ranks on one GPU) against 1 rank
  # with 2 accumulation steps. Same global batch and dropout seeds, so the same losses up to the
  # GPU's reduction order.
  eq=(--preset tiny --set "$DATA" --set train.max_steps=30 --set train.dtype=fp32 --set run.device=cuda --set model.dropout=0.1)
  gpu_step "fp32, 1 rank x accum 2" "$FAB" train "${eq[@]}" --set train.grad_accum=2 --set run.out_dir="$WORK/r1"
  gpu_step "fp32, 2 ranks x accum 1 (comm.backend=mpi)" \
    "${MPIRUN[@]}" -np 2 "$FAB" train "${eq[@]}" --set comm.backend=mpi --set run.out_dir="$WORK/r2"
  gpu_step "  2 ranks match 1 rank" same_losses "$WORK/r1" "$WORK/r2" 1e-4
  gpu_step "fp32, 2 ranks with ZeRO-1" \
    "${MPIRUN[@]}" -np 2 "$FAB" train "${eq[@]}" --set comm.backend=mpi --set parallel.zero=1 --set run.out_dir="$WORK/r2z"
  gpu_step "  ZeRO-1 matches 1 rank" same_losses "$WORK/r1" "$WORK/r2z" 1e-4
  # Pipeline stages on the GPU: pp = 2 on 2 ranks (CUDA activations and gradients through MPI host
  # staging) against 1 rank with the same 4 micro-batches; dropout off (its masks are per stage).
  eqp=(--preset tiny --set "$DATA" --set train.max_steps=30 --set train.dtype=fp32 --set run.device=cuda --set model.dropout=0.0 --set train.grad_accum=4)
  gpu_step "fp32 pipeline reference, 1 rank x accum 4" "$FAB" train "${eqp[@]}" --set run.out_dir="$WORK/p1"
  gpu_step "fp32, pp=2 on 2 ranks (comm.backend=mpi)" \
    "${MPIRUN[@]}" -np 2 "$FAB" train "${eqp[@]}" --set parallel.pp=2 --set comm.backend=mpi --set run.out_dir="$WORK/p2"
  gpu_step "  the pipeline matches 1 rank" same_losses "$WORK/p1" "$WORK/p2" 1e-4
  ;;
collectives)
  max=256M; [ "$QUICK" = 1 ] && max=1M
  gpu_step "NCCL all_reduce, world 1" "$FAB" bench collectives --backend nccl --op all_reduce --max-bytes "$max" \
    --json "$WORK/files/nccl-all_reduce-np1.json" --plot "$WORK/files/nccl-all_reduce-np1.svg"
  gpu_step "NCCL all_gather, world 1" "$FAB" bench collectives --backend nccl --op all_gather --max-bytes "$max" \
    --json "$WORK/files/nccl-all_gather-np1.json"
  nps=(2 4 8); [ "$QUICK" = 1 ] && nps=(2)
  for np in "${nps[@]}"; do
    step "MPI all_reduce, np=$np" "${MPIRUN[@]}" -np "$np" "$FAB" bench collectives --op all_reduce --max-bytes "$max" \
      --rounds 3 --json "$WORK/files/mpi-all_reduce-np$np.json" --plot "$WORK/files/mpi-all_reduce-np$np.svg"
  done
  np8=8; [ "$QUICK" = 1 ] && np8=2
  for op in all_gather reduce_scatter broadcast sendrecv; do
    step "MPI $op, np=$np8" "${MPIRUN[@]}" -np "$np8" "$FAB" bench collectives --op "$op" --max-bytes 64M \
      --json "$WORK/files/mpi-$op-np$np8.json"
  done
  # The planner against real CPU runs with a core per rank, pp × dp on 4 ranks included
  # (docs/PLANNER.md; the 2-core development machine cannot run that layout).
  [ "$QUICK" = 1 ] || step "planner vs measured CPU runs (scripts/plan_validate.sh)" env FAB="$FAB" CORPUS="$ROOT/.device/pystdlib.txt" \
    bash scripts/plan_validate.sh "$WORK/files/plan-validate"
  ;;
throughput)
  if [ "$QUICK" = 1 ]; then b=(--preset tiny --steps 5 --warmup 1); p=(--layers 4 --heads 4 --embd 128 --vocab 128 --block 128 --batch 4 --steps 5 --warmup 1)
  else b=(--preset gpt2-124m --batch 16 --steps 30 --warmup 5); p=(--preset gpt2-124m --batch 16 --steps 30 --warmup 5); fi
  gpu_step "fabbrica bench train ${b[*]}" "$FAB" bench train "${b[@]}" --set run.device=cuda --json "$WORK/files/fabbrica-train.json"
  # The memory estimate (--dry-run, the planner) against CUDA's peak allocated bytes of that run.
  gpu_step "  --dry-run's estimate for it" sh -c "\"$FAB\" train --dry-run ${b[*]:0:2} --set train.batch_size=${b[3]:-16} --set run.device=cuda | grep -i -A6 memory"
  gpu_step "PyTorch eager ${p[*]}" sh -c "\"$PY\" .device/torch_gpt_bench.py ${p[*]} > \"$WORK/files/torch-train.json\""
  if [ "$GPU" = 1 ]; then
    "$PY" - "$WORK/files/fabbrica-train.json" "$WORK/files/torch-train.json" <<'PYEOF' | tee -a "$LOG"
import json, sys
f = json.load(open(sys.argv[1]))
t = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print("fabbrica:", json.dumps(f)); print("pytorch: ", json.dumps(t))
ft, tt = f.get("tokens_per_s"), t.get("tokens_per_s")
if ft and tt: print(f"tokens/s fabbrica / pytorch eager = {ft / tt:.3f}")
PYEOF
  fi
  n=8; [ "$QUICK" = 1 ] && n=2
  step "DDP weak scaling on CPU ranks, np=1..$n" env FABBRICA_BIN="$FAB" bash scripts/scaling.sh "$n" "$WORK/files/scaling" -- \
    --preset tiny --set "$DATA" --set run.device=cpu --set run.threads=1 --steps 10 --rounds 3
  ;;
esac

tar -czf "$OUT/$PART.tar.gz" -C "$WORK/files" . 2>> "$LOG"
rm -rf "$WORK"
say "$PART: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
