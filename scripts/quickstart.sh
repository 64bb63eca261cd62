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
exec ./target/release/fabbrica train --preset tiny "$@"
