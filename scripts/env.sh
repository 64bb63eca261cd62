# Sourced by the scripts: points the build at the project-local venv's torch (tch 0.24 / libtorch 2.11).
FABBRICA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$FABBRICA_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# OpenMPI refuses root without these; `isolated` launches locally where no ssh/rsh exists.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_plm="${OMPI_MCA_plm:-isolated}"
