"""What MLflow tracking costs the training loop, and how fast it delivers.

Prints: the time one `log_metrics` call takes in the loop (it only queues), with the default
SQLite store and with an unreachable tracking server; and how long delivering N logged steps
takes with the SQLite store. Usage: python bench/bench_tracking.py [--steps 2000] [--keys 15]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from regscale.config import load_config
from regscale.track.mlflow import Tracker

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


def run(uri: str | None, root: Path, steps: int, keys: int) -> tuple[float, float, bool]:
    overrides = [f"run.dir={root}"] + ([f"mlflow.tracking_uri={uri}"] if uri else [])
    tracker = Tracker.open(load_config(RECIPE, overrides), root / "bench")
    metrics = {f"m{i}": float(i) for i in range(keys)}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        tracker.log_metrics(metrics, step)
    per_call = (time.perf_counter() - t0) / steps
    t1 = time.perf_counter()
    delivered = tracker.flush(timeout=600 if uri is None else 1)
    flush_s = time.perf_counter() - t1
    tracker.finish("FINISHED", timeout=600 if uri is None else 1)
    return per_call, flush_s, delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=15)
    args = parser.parse_args()
    logging.getLogger("regscale.track").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        per_call, flush_s, ok = run(None, Path(tmp) / "sqlite", args.steps, args.keys)
        print(f"sqlite store: log_metrics {per_call * 1e6:.0f} us/call ({args.keys} keys); "
              f"delivering {args.steps} steps x {args.keys} keys took {flush_s:.2f} s after the "
              f"last call ({'all delivered' if ok else 'NOT delivered'})")
        per_call, _, ok = run("http://127.0.0.1:9", Path(tmp) / "away", args.steps, args.keys)
        print(f"unreachable server: log_metrics {per_call * 1e6:.0f} us/call; "
              f"buffered and saved for later: {not ok}")


if __name__ == "__main__":
    main()
