"""The package is layered: a module imports only from its own layer or the ones below (lazy imports
inside functions count too). Read from the source with `ast`, no import needed.

    6  regscale.cli, cliargs, every area's commands.py   the verbs
    5  regscale.launch                                    jobs, submission, requeue
    4  regscale.train, regscale.eval                      the training and evaluation processes
    3  regscale.engine, regscale.track                    parallelism + checkpoint files; MLflow delivery
    2  regscale.checkpoints, models, objective, sampling, data, reliability
    1  regscale.fsutil, paths, dist, config              files, processes, configuration
    0  regscale (version), errors, outcome, faults, metrics, rundir   names shared by all
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "regscale"
LAYERS = [
    {"regscale", "regscale.errors", "regscale.outcome", "regscale.faults", "regscale.metrics", "regscale.rundir"},
    {"regscale.fsutil", "regscale.paths", "regscale.dist", "regscale.config"},
    {"regscale.checkpoints", "regscale.models", "regscale.objective", "regscale.sampling", "regscale.data",
     "regscale.reliability"},
    {"regscale.engine", "regscale.track"},
    {"regscale.train", "regscale.eval"},
    {"regscale.launch"},
    {"regscale.cli", "regscale.cliargs", "commands"},
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _area(module: str) -> str:
    """The layered unit: a top-level module or subpackage; an area's commands.py is a verb."""
    parts = module.split(".")
    return "commands" if parts[-1] == "commands" else ".".join(parts[:2])


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "regscale":
            out |= {f"regscale.{a.name}" for a in node.names} if node.module == "regscale" else {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "regscale"}
    return out


def _layer(area: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if area in layer)


def test_every_area_has_a_layer() -> None:
    areas = {_area(_module(p)) for p in PACKAGE.rglob("*.py")}
    placed = set().union(*LAYERS)
    assert areas <= placed, f"put these in a layer: {sorted(areas - placed)}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _area(_module(path))
        for target in _imports(path):
            dst = _area(target)
            if dst in set().union(*LAYERS) and _layer(dst) > _layer(src):
                upward.append(f"{_module(path)} (layer {_layer(src)}) imports {target} (layer {_layer(dst)})")
    assert not upward, "\n".join(upward)


# Inside regscale.track, the tracker's parts are layered too: the MLflow client helpers, then the
# lineage's policy (which run, whether this job may go on with it), then delivery (the outbox and
# its worker), then the Tracker that joins them. Policy never reaches into delivery.
TRACKER_PARTS = ["regscale.track.client", "regscale.track.lineage", "regscale.track.delivery",
                 "regscale.track.mlflow"]


def test_tracker_policy_sits_below_its_delivery() -> None:
    upward = []
    for i, part in enumerate(TRACKER_PARTS):
        path = PACKAGE.parent / (part.replace(".", "/") + ".py")
        above = set(TRACKER_PARTS[i + 1:])
        upward += [f"{part} imports {target}" for target in _imports(path) if target in above]
    assert not upward, "\n".join(upward)
