#!/usr/bin/env bash
# Pipeline benchmarks with `fabbrica train` (fp32, CPU unless run.device says otherwise):
#   1. the bubble: pp = 2, 1F1B at m = 2, 4, 8, 16 micro-batches, GPipe and interleaved (v = 2)
#      at m = 8, measured by the executor against (p-1)/(m+p-1) (divided by v when interleaved);
#   2. the overhead: pp = 2 on 2 ranks against one process on the same work (same global batch);
#   3. layouts of 4 ranks: pp × dp = 1 × 4, 2 × 2, 4 × 1 on one model;
#   with 8 cores or more (WIDE=1 forces it): pp = 4 (1F1B at m = 8, 16; interleaved v = 2 at 16)
#   and pp = 8 (1F1B at m = 16, 32) in the bubble table.
# Writes OUT/{bubble,layouts}.md and .svg (from `fabbrica bench pipeline`) and the run directories.
#
#   scripts/pipeline_bench.sh [OUT=runs/pipeline] [-- extra --set arguments]
#
# Ranks beyond the core count are oversubscribed: the layout figures then measure the machine.
# FABBRICA_BIN names another fabbrica binary (scripts/device/check.sh runs the carried one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-runs/pipeline}"
shift $(( $# < 1 ? $# : 1 )) || true
[ "${1:-}" = "--" ] && shift
source scripts/env.sh
FAB="${FABBRICA_BIN:-target/release/fabbrica}"
if [ -z "${FABBRICA_BIN:-}" ] && [ ! -x "$FAB" ]; then cargo build --release -q -p fabbrica-cli; fi
# CORPUS names another text file (the GPU machine has the pack's copy).
CORPUS="${CORPUS:-data/pystdlib.txt}"
[ -s "$CORPUS" ] || python3 scripts/make_corpus.py --out "$CORPUS"
mkdir -p "$OUT"
STEPS="${STEPS:-12}"
# A model whose stages compute for milliseconds, so that the bubble, not message latency, shows.
common=(--set model.n_layer=8 --set model.n_head=4 --set model.n_embd=256 --set model.block_size=128
        --set model.dropout=0.0 --set train.batch_size=4 --set train.max_steps="$STEPS"
        --set train.log_interval=2 --set train.eval_interval=100000 --set train.eval_iters=1
        --set run.sample_tokens=0 --set run.threads=1 --set run.checkpoint_interval=0
        --set run.async_checkpoint=false --set run.if_exists=archive --set data.path="$CORPUS")
extra=("$@")
train() { # NAME NP SETS...
  local name="$1" np="$2"; shift 2
  echo "== $name (np=$np)" >&2
  if [ "$np" -eq 1 ]; then
    "$FAB" train "${common[@]}" "$@" "${extra[@]}" --set run.out_dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  else
    mpirun -np "$np" --oversubscribe "$FAB" train "${common[@]}" "$@" "${extra[@]}" --set run.out_dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  fi
}
bubble=()
for m in 2 4 8 16; do
  train "1f1b-m$m" 2 --set parallel.pp=2 --set parallel.schedule=1f1b --set train.grad_accum=$m; bubble+=("$OUT/1f1b-m$m")
done
train gpipe-m8 2 --set parallel.pp=2 --set parallel.schedule=gpipe --set train.grad_accum=8; bubble+=("$OUT/gpipe-m8")
train interleaved-v2-m8 2 --set parallel.pp=2 --set parallel.schedule=interleaved --set parallel.virtual_stages=2 --set train.grad_accum=8
bubble+=("$OUT/interleaved-v2-m8")
train one-process-m8 1 --set train.grad_accum=8; bubble+=("$OUT/one-process-m8")
# Deeper pipelines where every stage has a core of its own (the GPU machine's 16 cores; WIDE=1
# forces them): pp = 4 and 8 on the same 8 layers.
if [ "$(nproc)" -ge 8 ] || [ "${WIDE:-0}" = 1 ]; then
  for m in 8 16; do train "pp4-1f1b-m$m" 4 --set parallel.pp=4 --set parallel.schedule=1f1b --set train.grad_accum=$m; bubble+=("$OUT/pp4-1f1b-m$m"); done
  train pp4-interleaved-v2-m16 4 --set parallel.pp=4 --set parallel.schedule=interleaved --set parallel.virtual_stages=2 --set train.grad_accum=16
  bubble+=("$OUT/pp4-interleaved-v2-m16")
  for m in 16 32; do train "pp8-1f1b-m$m" 8 --set parallel.pp=8 --set parallel.schedule=1f1b --set train.grad_accum=$m; bubble+=("$OUT/pp8-1f1b-m$m"); done
fi
"$FAB" bench pipeline --runs "${bubble[@]}" --table "$OUT/bubble.md" --plot "$OUT/bubble.svg"
layouts=()
train pp1xdp4 4 --set parallel.pp=1 --set parallel.dp=4 --set train.grad_accum=2; layouts+=("$OUT/pp1xdp4")
train pp2xdp2 4 --set parallel.pp=2 --set parallel.dp=2 --set train.grad_accum=4; layouts+=("$OUT/pp2xdp2")
train pp4xdp1 4 --set parallel.pp=4 --set parallel.dp=1 --set train.grad_accum=8; layouts+=("$OUT/pp4xdp1")
"$FAB" bench pipeline --runs "${layouts[@]}" --table "$OUT/layouts.md" --plot "$OUT/layouts.svg"
echo "tables: $OUT/bubble.md $OUT/layouts.md  plots: $OUT/bubble.svg $OUT/layouts.svg" >&2
