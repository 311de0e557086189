"""`regscale ui`: the MLflow UI on 127.0.0.1 for a runs folder's SQLite store.

The server (`mlflow server`, its uvicorn workers and helpers) runs in a session of its own; Ctrl-C
or SIGTERM stops that whole tree, so nothing is left holding the port. "ready" is said only once
the server answers. Its output, without per-request lines, goes to a log file beside the store.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any, Optional

from regscale.errors import UserError
from regscale.rundir import MLARTIFACTS, MLFLOW_UI_LOG

HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # ~15 s on 2 idle cores; more when the machine is busy
STOP_TIMEOUT_S = 10.0
# MLflow 3 opens an experiment on its GenAI pages unless the address asks for the training view
# (the UI decides by this query parameter, or a toggle remembered in the browser).
TRAINING_VIEW = "runs?workflowType=machine_learning"


def check_port(port: int) -> None:
    """A port number that 127.0.0.1 can listen on now (the server binds it the same way)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: expected a port number from 1 to 65535")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind((HOST, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {HOST} is in use; choose another with --port") from None
            raise UserError(f"--port {port}: cannot listen on {HOST}:{port} ({err.strerror})") from None


def check_workers(workers: int) -> None:
    """From 1 to twice the CPU cores: each worker is a process holding the whole app."""
    most = 2 * (os.cpu_count() or 1)
    if not 1 <= workers <= most:
        raise UserError(f"--workers {workers}: expected 1 to {most} (2 x the {os.cpu_count()} CPU cores)")


def server_command(uri: str, artifacts: Path, port: int, workers: int) -> list[str]:
    """`mlflow server` on 127.0.0.1 for the store, artifacts proxied, no per-request log lines."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--artifacts-destination", str(artifacts), "--host", HOST, "--port", str(port),
            "--workers", str(workers), "--uvicorn-opts", "--no-access-log"]


def server_env() -> dict[str, str]:
    """Without MLflow's GenAI job runner (scorers, trace archival: nothing a training run uses) and
    its dependencies' deprecation warnings."""
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                PYTHONWARNINGS="ignore::DeprecationWarning")


def wait_until_answers(url: str, proc: Optional[subprocess.Popen], timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200; UserError if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the MLflow server exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise UserError(f"{url} did not answer within {timeout:.0f} s")


def stop_tree(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process, its descendants and its session's group; SIGKILL what is left after
    `timeout` s."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the session's group, leader = proc
        for p in tree:
            with suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        _, tree = psutil.wait_procs(tree, timeout=timeout)
        if not tree:
            break
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def experiment_pages(url: str) -> list[tuple[str, str]]:
    """(name, address of its runs table) of every experiment that holds runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}/{TRAINING_VIEW}")
            for e in client.search_experiments()
            if client.search_runs([e.experiment_id], max_results=1)]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(uri: str, port: int, workers: int) -> int:
    """Run the MLflow UI for the SQLite store `uri` until Ctrl-C or SIGTERM; then stop it whole."""
    check_workers(workers)
    check_port(port)
    store_dir = Path(uri[len("sqlite:///"):]).parent
    log_path = store_dir / MLFLOW_UI_LOG
    url = f"http://{HOST}:{port}"
    stops = (signal.SIGINT, signal.SIGTERM)  # SIGINT too: a shell's background job starts with it ignored
    previous = [signal.signal(sig, _interrupt) for sig in stops]
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(server_command(uri, store_dir / MLARTIFACTS, port, workers),
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=server_env(), start_new_session=True)
        try:
            try:
                wait_until_answers(f"{url}/health", proc)
            except UserError as err:
                raise UserError(f"{err}; its log: {log_path}") from None
            pages = experiment_pages(url)
            print(f"MLflow UI ready at {url}  (store {uri}; server log {log_path}; Ctrl-C stops it)")
            for name, page in pages:
                print(f"  {name}: {page}")
            sys.stdout.flush()
            code = proc.wait()
            raise UserError(f"the MLflow server exited with code {code}; see {log_path}")
        except KeyboardInterrupt:
            print("MLflow UI stopped", flush=True)
            return 0
        finally:
            stop_tree(proc)
    finally:
        for sig, handler in zip(stops, previous):
            signal.signal(sig, handler)
