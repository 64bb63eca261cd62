#!/usr/bin/env bash
# Installs what is missing, and nothing else: Debian packages (OpenMPI, libclang for bindgen),
# a project-local .venv with torch==2.11.0 (the libtorch tch 0.24 links), and the default corpus.
# Safe to re-run: every step checks first. Sourced or run by quickstart.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

pkgs=(libopenmpi-dev openmpi-bin libclang-dev clang pkg-config)
# A python3 that can already make venvs (Debian's with python3-venv, pyenv, conda) is enough.
if ! { command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; }; then
  pkgs+=(python3 python3-venv)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A single-node Slurm for crates/cli/tests/slurm.rs (scripts/slurm/cluster.sh starts it): munge,
# the daemons, srun/sbatch, and libpmix.so for Slurm's pmix plugin. No recommends: they would pull
# in every Slurm plugin and its -dev package.
slurm_missing=()
for p in munge slurmctld slurmd slurm-client libpmix-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || slurm_missing+=("$p")
done
if [ "${#slurm_missing[@]}" -gt 0 ]; then
  echo "setup: installing ${slurm_missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${slurm_missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "setup: no Rust toolchain found: install one with rustup (https://rustup.rs), then re-run" >&2
  exit 1
fi

# The test suite checks formatting and lints: rustup's minimal profile has neither component.
export PATH="$HOME/.cargo/bin:$PATH"
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    echo "setup: installing the Rust $c component"
    rustup component add "$c" || { echo "setup: cannot install $c: run 'rustup component add $c', then re-run" >&2; exit 1; }
  fi
done

if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.11.0") else 1)' 2>/dev/null; then
  echo "setup: creating .venv with torch==2.11.0 (about 4.6 GB, once)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.11.0 numpy
fi
# Test references for checkpoint interop (the Hugging Face safetensors reader).
if ! .venv/bin/python -c 'import safetensors.torch' 2>/dev/null; then
  echo "setup: installing safetensors into .venv (test reference)"
  .venv/bin/pip install -q safetensors==0.7.0 packaging
fi
# Test references for Hugging Face interop: transformers' GPT-2 and Llama, and the tokenizers
# package (tokenizer files made offline in the tests; nothing is downloaded from the Hub).
if ! .venv/bin/python -c 'import transformers, tokenizers, sys; sys.exit(0 if transformers.__version__ == "5.24.0" else 1)' 2>/dev/null; then
  echo "setup: installing transformers into .venv (test reference)"
  .venv/bin/pip install -q transformers==5.24.0 tokenizers==0.23.3
fi

if [ ! -s data/pystdlib.txt ]; then
  .venv/bin/python scripts/make_corpus.py --out data/pystdlib.txt
fi
