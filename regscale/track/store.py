"""A tracking store checked before it is used: a known URI without credentials in it, a server
that answers (for a command that reads now) and takes this machine's credentials, an SQLite file
that is a database (MLflow would otherwise write its tables into any file it is given) in a
folder that can hold it."""

from __future__ import annotations

import os
import socket
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

from regscale.config import MLFLOW_CREDENTIALS, check_tracking_uri
from regscale.errors import UserError

SQLITE_MAGIC = b"SQLite format 3\x00"
CONNECT_TIMEOUT_S = 5


def _check_sqlite(db: Path, what: str, reading: bool) -> None:
    if not db.exists():
        if reading:
            raise UserError(f"{what}: no MLflow store at {db}")
        from regscale.paths import check_writable

        check_writable(db.parent, f"{what} {db}")
        return
    try:
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as err:
        raise UserError(f"{what}: cannot read the MLflow store {db} ({err.strerror or err})") from None
    if head and head != SQLITE_MAGIC:  # an empty file is an empty database to SQLite
        raise UserError(f"{what}: {db} is not an SQLite database (an MLflow store written by regscale); "
                        "nothing was read or changed")
    tables = 0
    if head:
        try:  # opened read-only: a damaged file stays as it is
            with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.Error as err:
            raise UserError(f"{what}: the MLflow store {db} is damaged ({err}); nothing was changed") from None
    if reading and not tables:  # MLflow would write its tables into it: not for a command that reads
        raise UserError(f"{what}: the MLflow store {db} is empty (no run was tracked in it); nothing was changed")


def _check_credentials(uri: str, what: str) -> None:
    """A tracking server that answers takes this machine's credentials (MLFLOW_TRACKING_USERNAME and
    _PASSWORD, or _TOKEN): a wrong password fails now, not when the job starts. Any other trouble
    (an outage, a 5xx) is the job's to ride out."""
    from mlflow.exceptions import MlflowException

    from regscale.track.client import make_client

    try:
        make_client(uri).search_experiments(max_results=1)
    except MlflowException as err:
        status = err.get_http_status_code()
        if status == 401:
            raise UserError(f"{what} {uri}: the server refuses these credentials (HTTP 401); set "
                            f"{MLFLOW_CREDENTIALS} to an account of it") from None
        if status == 403:
            raise UserError(f"{what} {uri}: the account in MLFLOW_TRACKING_USERNAME may not use this "
                            "server (HTTP 403); ask its admin for access") from None
    except Exception:  # not answering now: the job retries
        return


def check_store(uri: str, what: str, *, reading: bool) -> None:
    """`uri` usable as an MLflow store. reading: the command reads it now, so a server must answer
    and a file must exist; otherwise a run will write it (a server may be away for a while, but one
    that answers must take the credentials)."""
    check_tracking_uri(uri, what)
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            if not reading:
                return
            raise UserError(f"{what} {uri}: no MLflow server answers ({err.strerror or err})") from None
        if reading:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a command, not a training job
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        _check_credentials(uri, what)
    elif parts.scheme == "sqlite":
        _check_sqlite(Path(uri[len("sqlite:///"):]), what, reading)
    elif parts.scheme in ("", "file"):  # MLflow's file store: a folder
        folder = Path(parts.path if parts.scheme == "file" else uri)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {uri}: {folder} is a file; an MLflow file store is a folder")
        if reading and not folder.is_dir():
            raise UserError(f"{what}: no MLflow store at {folder}")
