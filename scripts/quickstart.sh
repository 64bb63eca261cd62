#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is missing, build in release, then train
# the tiny reference model on the default corpus (GPU if visible, else CPU) and print the
# train/val loss and a generated sample. Extra arguments go to `fabbrica train`, e.g.
#   scripts/quickstart.sh --set train.max_steps=2000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
cargo build --release -p fabbrica-cli
# Re-runnable: an earlier quickstart's run in runs/tiny is moved to runs/tiny/archive/ (the
# trainer refuses to mix two runs in one directory otherwise). Later --set arguments win.
exec ./target/release/fabbrica train --preset tiny --set run.if_exists=archive "$@"
