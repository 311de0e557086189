#!/usr/bin/env bash
# The test suite: the venv, then pytest. Services the tests need (SLURM, MLflow) are started by
# the tests' own fixtures from scripts under slurm/ and regscale/, and stopped at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/regscale/torch_extensions}"
exec .venv/bin/python -m pytest "$@"
