#!/bin/sh
# The tensor-parallel benchmark's training run (docs/BENCHMARKS.md, "Tensor and sequence
# parallelism on the CPU"): scripts/tp_bench.sh MODEL NP THREADS OUT [--set key=value ...]
#   MODEL M: GPT 4 layers, width 512, 8 heads, context 512, micro-batch 4, 12 steps
#   MODEL A: GPT 4 layers, width 256, 4 heads, context 1024, micro-batch 8, 6 steps (activation-heavy)
#   NP ranks (1: no launcher) of THREADS threads each; metrics in OUT/metrics.jsonl (tp_traffic).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
model=$1; np=$2; th=$3; out=$4; shift 4
case $model in
  M) shape="--set model.n_layer=4 --set model.n_head=8 --set model.n_embd=512 --set model.block_size=512 --set train.batch_size=4 --set train.max_steps=12 --set train.log_interval=4" ;;
  A) shape="--set model.n_layer=4 --set model.n_head=4 --set model.n_embd=256 --set model.block_size=1024 --set train.batch_size=8 --set train.max_steps=6 --set train.log_interval=3" ;;
  *) echo "error: MODEL must be M or A, not '$model'" >&2; exit 2 ;;
esac
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# shellcheck disable=SC2086 # $shape is a list of arguments
set -- --set model.arch=gpt $shape --set model.vocab_size=104 --set model.dropout=0.0 --set train.grad_accum=1 \
  --set train.eval_interval=1000 --set train.eval_iters=1 --set run.sample_tokens=0 --set run.threads="$th" \
  --set run.if_exists=archive --set data.path="$here/data/pystdlib.txt" --set run.out_dir="$out" "$@"
bin=${FAB:-$here/target/release/fabbrica}
if [ "$np" = 1 ]; then exec "$bin" train "$@"; fi
exec mpirun -np "$np" --oversubscribe --bind-to none "$bin" train "$@"
