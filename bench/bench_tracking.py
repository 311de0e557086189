"""What MLflow tracking costs the training loop, and how fast it delivers.

Prints: the time one `log_metrics` call takes in the loop (it only queues), with the default
SQLite store and with an unreachable tracking server; how long delivering N logged steps takes
with the SQLite store; and, with --backlog, how long a backlog of N steps takes to reach a store
in log_batch calls of 1000 points sent one by one or all in flight (MLflow's async logging), on
the SQLite store, a local `mlflow server`, and that server behind an added round trip (what
regscale.track.delivery chooses from). Compare figures within one run only.
Usage: python bench/bench_tracking.py [--steps 2000] [--keys 15] [--backlog] [--rtt-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_name
from regscale.config import load_config
from regscale.track.client import BATCH, make_client
from regscale.track.mlflow import Tracker
from regscale.track.ui import server_command, server_env, wait_until_answers

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delayed_proxy(target: int, one_way_s: float) -> int:
    """A TCP proxy on 127.0.0.1 (in a thread) that delays every chunk by one_way_s each way."""
    port, ready = free_port(), threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(one_way_s)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, server_writer), pipe(server_reader, writer), return_exceptions=True)

    async def serve() -> None:
        async with await asyncio.start_server(handle, "127.0.0.1", port):
            ready.set()
            await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    ready.wait(30)
    return port


def backlog_seconds(uri: str, steps: int, keys: int, in_flight: bool) -> float:
    """Seconds to log steps x keys points to a new run in log_batch calls of BATCH points."""
    from mlflow.entities import Metric

    client = make_client(uri)
    run_id = client.create_run(client.create_experiment(f"bench-{time.time_ns()}")).info.run_id
    points = [Metric(f"m{k}", float(s), 1000 + s, s) for s in range(1, steps + 1) for k in range(keys)]
    chunks = [points[i:i + BATCH] for i in range(0, len(points), BATCH)]
    t0 = time.perf_counter()
    if in_flight:
        for operation in [client.log_batch(run_id, metrics=c, synchronous=False) for c in chunks]:
            operation.wait()
    else:
        for chunk in chunks:
            client.log_batch(run_id, metrics=chunk)
    return time.perf_counter() - t0


def backlog(root: Path, steps: int, keys: int, rtt_ms: float) -> None:
    port = free_port()
    server = subprocess.Popen(server_command(f"sqlite:///{root / 'server.db'}", root / "artifacts", port, 1),
                              env=server_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/health", server)
        stores = {"sqlite store": f"sqlite:///{root / 'backlog.db'}",
                  "local server": f"http://127.0.0.1:{port}",
                  f"server, {rtt_ms:g} ms round trip": f"http://127.0.0.1:{delayed_proxy(port, rtt_ms / 2000)}"}
        for name, uri in stores.items():
            backlog_seconds(uri, 100, keys, False)  # warm up: tables, connections
            one = min(backlog_seconds(uri, steps, keys, False) for _ in range(2))
            many = min(backlog_seconds(uri, steps, keys, True) for _ in range(2))
            print(f"backlog of {steps} steps x {keys} keys to the {name}: one by one {one:.2f} s, "
                  f"in flight {many:.2f} s (in flight is {one / many:.2f}x as fast)")
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=15)
    parser.add_argument("--backlog", action="store_true", help="also time a backlog, one by one vs in flight")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip added to the server (--backlog)")
    args = parser.parse_args()
    logging.getLogger("regscale.track").setLevel(logging.ERROR)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        per_call, flush_s, ok = run(None, Path(tmp) / "sqlite", args.steps, args.keys)
        print(f"sqlite store: log_metrics {per_call * 1e6:.0f} us/call ({args.keys} keys); "
              f"delivering {args.steps} steps x {args.keys} keys took {flush_s:.2f} s after the "
              f"last call ({'all delivered' if ok else 'NOT delivered'})")
        per_call, _, ok = run("http://127.0.0.1:9", Path(tmp) / "away", args.steps, args.keys)
        print(f"unreachable server: log_metrics {per_call * 1e6:.0f} us/call; "
              f"buffered and saved for later: {not ok}")
        if args.backlog:
            backlog(Path(tmp), args.steps, args.keys, args.rtt_ms)


if __name__ == "__main__":
    main()
