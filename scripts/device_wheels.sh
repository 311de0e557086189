#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with exactly the wheels bench/device_check.py needs on the GPU machine:
# Python 3.12, manylinux x86_64, torch/timm/torchvision/scipy/... already installed there, no
# package index reachable. The versions are the ones this checkout's .venv tested (make venv first).
# DeepSpeed is published as source only: its wheel is built here without ops (DS_BUILD_OPS=0).
#
#   bash scripts/device_wheels.sh [--official PATH]
#
# --official PATH also copies the official REG checkout's Python files into .official-REG/
# (git-ignored), for device_check's side-by-side step. Then, with the device tool:
#   run  command: PYTHONUNBUFFERED=1 python3 bench/device_check.py --out $OUT --official .official-REG
#        carry:   [".whl", ".official-REG"]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv/bin/python"
out="$root/.whl"
[[ -x "$venv" ]] || { echo "device_wheels: no $venv; run 'make venv' first" >&2; exit 2; }

# What the check imports that the GPU machine lacks, and what those import in turn (nothing more:
# at most 64 MiB travel). Found by importing the check's modules in a clean target holding only these.
binary=(omegaconf mosaicml-streaming brotli zstd python-snappy cramjam diffusers torch-fidelity
        catalogue hjson pydantic pydantic-core annotated-types typing-inspection)
source_only=(deepspeed)

version() { "$venv" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$out"
mkdir -p "$out"
platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done  # its glibc: 2.39
pins=()
for name in "${binary[@]}"; do pins+=("$name==$(version "$name")"); done
"$venv" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "${pins[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
for name in "${source_only[@]}"; do
    DS_BUILD_OPS=0 "$venv" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$name==$(version "$name")" \
        2> >(grep -v "is ignored: it is neither" >&2)
done

if [[ "${1:-}" == "--official" ]]; then
    src="${2:?--official needs the path of a checkout of the official REG repo}"
    [[ -f "$src/train.py" && -f "$src/models/sit.py" ]] || { echo "device_wheels: $src is not a REG checkout" >&2; exit 2; }
    rm -rf "$root/.official-REG"
    mkdir -p "$root/.official-REG/models"
    cp "$src"/{train,loss,dataset}.py "$root/.official-REG/"
    cp "$src"/models/*.py "$root/.official-REG/models/"
fi
du -sh "$out" ${src:+"$root/.official-REG"} >&2
ls "$out" >&2
