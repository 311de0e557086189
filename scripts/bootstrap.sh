#!/usr/bin/env bash
# Create or update .venv/ for this machine kind (CPU, torch 2.13.0+cpu from local disk).
# Quick when nothing changed: the stamp records the hash of what the venv was built from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
want="$(cat "$root/pyproject.toml" "$root/constraints/cpu.txt" "$root/scripts/bootstrap.sh" \
        "$root/scripts/torchvision_cpu_shim.py" | sha256sum | cut -c1-16)"
stamp_ok() { [[ -f "$venv/.regscale-stamp" && "$(cat "$venv/.regscale-stamp")" == "$want" ]]; }
stamp_ok && exit 0
# One installer at a time (parallel test runs, several shells): wait for the other, then re-check.
mkdir -p "$venv"
exec 9>"$venv/.bootstrap.lock"
flock 9
stamp_ok && exit 0
echo "[bootstrap] setting up $venv (a few minutes the first time)" >&2
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first, alone: the CPU build on local disk. Then everything else constrained to it.
"${pip[@]}" install "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
"${pip[@]}" install -c "$root/constraints/cpu.txt" -e "$root[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$root/scripts/torchvision_cpu_shim.py" "$site/_regscale_torchvision_cpu_shim.py"
echo "import _regscale_torchvision_cpu_shim" > "$site/_regscale_torchvision_cpu_shim.pth"
"$venv/bin/python" -c "import torchvision, timm, streaming, diffusers, deepspeed, mlflow, submitit" \
    || { echo "[bootstrap] the environment does not import; see above" >&2; exit 1; }
echo "$want" > "$venv/.regscale-stamp"
echo "[bootstrap] ready: $venv" >&2
