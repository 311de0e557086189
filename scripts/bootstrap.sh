#!/usr/bin/env bash
# Create or update .venv/ for this machine kind (CPU, torch 2.13.0+cpu from local disk).
# Quick when nothing changed: the stamp records the hash of what the venv was built from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
# The interpreter: $PYTHON, else the newest CPython 3.11 found (the local torch wheel's), preferring
# one that forks threaded processes safely (3.11.8+, CPython gh-112275); on an older one the data
# loader spawns its workers instead of forking them (regscale.data.stream.fork_is_safe).
pick_python() {
  local best="" best_v="" c v
  for c in python3.11 "$HOME"/.pyenv/versions/3.11.*/bin/python3.11 /usr/local/bin/python3.11 /usr/bin/python3.11; do
    command -v "$c" > /dev/null 2>&1 || continue
    v=$("$c" -c 'import sys; print("%05d%05d%05d" % sys.version_info[:3])' 2> /dev/null) || continue
    [[ -z "$best_v" || "$v" > "$best_v" ]] && { best="$c"; best_v="$v"; }
  done
  echo "${best:-python3}"
}
py="${PYTHON:-$(pick_python)}"
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
"$venv/bin/python" -c "from regscale.data.stream import fork_is_safe; import sys; fork_is_safe() or print(
    f'[bootstrap] note: Python {sys.version.split()[0]} can deadlock a process forked from a threaded one '
    '(CPython gh-112275, fixed in 3.11.8): DataLoader workers are spawned instead of forked (slower to '
    'start); set PYTHON to a 3.11.8+ interpreter to fork them', file=sys.stderr)"
echo "$want" > "$venv/.regscale-stamp"
echo "[bootstrap] ready: $venv" >&2
