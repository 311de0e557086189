"""Where a prepared dataset lives: a local directory, or a remote URI (s3://, gs://, oci://, ...).

For a remote OUT the object store is the truth: every read (manifest, chunk records, index,
listing) asks the store, and files are uploaded with streaming's CloudUploader and read back with
its downloader. The local stage only holds what this machine is writing (chunks in `.tmp/`
before their upload), never a record of what the store holds: a stage left by another run, for
a bucket since emptied or for another dataset, changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from regscale.config import STORE_CREDENTIALS, is_remote
from regscale.errors import UserError, first_line
from regscale.fsutil import write_atomic

CHUNK_RE = re.compile(r"(?:^|/)chunk-(\d{6})/chunk\.json$")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_TRANSIENT_WORDS = ("Connection", "Timeout", "IncompleteRead", "ResponseStreaming", "RetriesExceeded",
                    "ServiceUnavailable", "TooManyRequests", "Throttl")


def is_not_found(err: BaseException) -> bool:
    """An object store's answer that the object does not exist (not: no access, no network)."""
    response = getattr(err, "response", None)  # botocore's ClientError
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return isinstance(err, FileNotFoundError) or code in _NOT_FOUND


def is_transient(err: BaseException) -> bool:
    """A failure that may pass if retried: no connection, a timeout, a cut transfer, a 5xx or
    throttling answer (HTTP 503 SlowDown). Not: a missing object, no or refused credentials, a bad
    request. (Each store's client has its own classes: judged by the HTTP status, else by name.)"""
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore: the store answered
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return isinstance(status, int) and (status >= 500 or status in (408, 429))
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return any(word in cls.__name__ for cls in type(err).__mro__ for word in _TRANSIENT_WORDS)


def remote_failure(uri: str, err: BaseException) -> UserError:
    """One line for a remote store that cannot be used: what failed and where credentials come from."""
    scheme = uri.split("://", 1)[0]
    reason = first_line(err)
    hint = (f"; check the network and the credentials ({STORE_CREDENTIALS[scheme]})"
            if scheme in STORE_CREDENTIALS else "")
    return UserError(f"cannot access {uri} ({type(err).__name__}: {reason}){hint}")


@contextmanager
def remote_access(uri: str) -> Iterator[None]:
    """Turn a remote client's failure (no credentials, no network, no permission) into one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # botocore, google.auth, oci, azure...: each client has its own classes
        raise remote_failure(uri, err) from None


@contextmanager
def _quiet_streaming() -> Iterator[None]:
    """streaming's storage clients warn about reusing a non-empty folder and about temp folders."""
    logger = logging.getLogger("streaming")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_downloaders: dict[tuple[str, int], Any] = {}
log = logging.getLogger("regscale.data")
MAX_BACKOFF_S = 30.0
T = TypeVar("T")


def patiently(what: str, retry_s: float, attempt: Callable[[], T], give_up: Callable[[], bool] = lambda: False) -> T:
    """attempt(), retried with exponential backoff (1 s, doubling up to 30 s) while it fails for a
    reason that may pass (`is_transient`), for up to `retry_s` in all or until give_up(); the first
    failure and the recovery are logged (WARNING, naming `what`)."""
    start = time.monotonic()
    delay, failures = 1.0, 0
    while True:
        try:
            result = attempt()
        except Exception as err:
            if not is_transient(err) or give_up() or time.monotonic() - start + delay > retry_s:
                raise
            if not failures:
                log.warning("%s failed (%s: %s); retrying with backoff for up to %.0f s (data.download_retry_s)",
                            what, type(err).__name__, first_line(err), retry_s)
            failures += 1
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
            continue
        if failures:
            log.warning("%s went through after %d failed attempts in %.0f s", what, failures,
                        time.monotonic() - start)
        return result


def _fetch(uri: str, dest: Path) -> bool:
    """One download attempt of `uri` to `dest` (overwritten); False when there is no such object.
    One client per scheme and process (making a boto3 client costs ~0.5 s)."""
    from streaming.base.storage.download import CloudDownloader

    key = (uri.split("://", 1)[0], os.getpid())
    if key not in _downloaders:
        _downloaders[key] = CloudDownloader.get(uri)
    dest.unlink(missing_ok=True)  # the downloader keeps a file that is already there
    try:
        _downloaders[key].download(uri, str(dest))
    except Exception as err:
        if is_not_found(err):
            return False
        _downloaders.pop(key).clean_up()  # a fresh client next time
        raise
    return dest.is_file()


def download(uri: str, dest: Path, retry_s: float = 0.0) -> bool:
    """Download one object to `dest` (overwritten), retried for up to retry_s through failures that
    may pass; False when there is no such object; a UserError naming it when it cannot be read."""
    try:
        return patiently(f"download of {uri}", retry_s, lambda: _fetch(uri, dest))
    except Exception as err:
        raise remote_failure(uri, err) from None


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


class Store:
    """A dataset root: `local` (the directory, or the stage of a remote OUT); `remote`, a URI,
    when OUT is in object storage (then the truth; see the module docstring)."""

    def __init__(self, out: str, stage: Optional[str] = None) -> None:
        self.out = out
        self.remote = out.rstrip("/") if is_remote(out) else None
        if self.remote is None:
            self.local = Path(out)
        else:
            digest = hashlib.sha256(out.encode()).hexdigest()[:12]
            self.local = Path(stage or Path(tempfile.gettempdir()) / f"regscale-stage-{digest}")
        self._uploader: Any = None

    def uri(self, relpath: str) -> str:
        return f"{self.remote}/{relpath}"

    def upload_dir(self) -> Path:
        """This process's folder of files to upload (a remote OUT), laid out as under OUT."""
        return self.local / ".tmp" / f"up.{socket.gethostname()}.{os.getpid()}"

    def _client(self) -> Any:
        """streaming's uploader for the remote OUT (uploading from upload_dir()), made once. It
        makes its local folder at once: a temporary one, so that listing or a refusal leaves no
        stage behind (writing a file makes the upload folder)."""
        from streaming.base.storage.upload import CloudUploader

        if self._uploader is None:
            with remote_access(str(self.remote)), _quiet_streaming(), tempfile.TemporaryDirectory() as tmp:
                uploader = CloudUploader.get((tmp, self.remote), keep_local=True, exist_ok=True)
            uploader.local = str(self.upload_dir())
            self._uploader = uploader
        return self._uploader

    def publish(self, relpaths: list[str]) -> None:
        """Upload these files of `upload_dir()` to the same paths under the remote OUT, in order."""
        uploader = self._client()
        for relpath in relpaths:
            with remote_access(self.uri(relpath)):
                uploader.upload_file(relpath)

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A fresh folder for downloads, removed afterwards: in the stage when there is one (a
        --stage on a large disk), else in the system's temp folder."""
        with tempfile.TemporaryDirectory(prefix="regscale-io-", dir=self.local if self.local.is_dir() else None) as tmp:
            yield Path(tmp)

    def tidy(self) -> None:
        """Remove this process's upload folder when empty (the stage and its .tmp/ stay: parts of
        a SLURM array on this host share them)."""
        with contextlib.suppress(OSError):
            self.upload_dir().rmdir()

    def list_remote(self) -> list[str]:
        """Every object name under the remote OUT."""
        uploader = self._client()
        with remote_access(str(self.remote)):
            return uploader.list_objects() or []

    def read_bytes(self, relpath: str) -> Optional[bytes]:
        """The file's bytes (downloaded from a remote OUT), None when absent."""
        if self.remote is None:
            path = self.local / relpath
            return path.read_bytes() if path.is_file() else None
        with self.scratch() as folder:
            dest = folder / Path(relpath).name
            return dest.read_bytes() if download(self.uri(relpath), dest) else None

    def read_json(self, relpath: str) -> Optional[Any]:
        """The parsed JSON file, None when absent; a UserError naming it when it is not JSON."""
        data = self.read_bytes(relpath)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as err:
            raise UserError(f"{self.out.rstrip('/')}/{relpath}: unreadable ({err})") from None

    def write(self, relpath: str, data: bytes | str) -> None:
        """Write a file of OUT atomically (for a remote OUT: upload it)."""
        if self.remote is None:
            write_atomic(self.local / relpath, data)
            return
        path = self.upload_dir() / relpath
        write_atomic(path, data)
        try:
            self.publish([relpath])
        finally:
            path.unlink(missing_ok=True)
            self.tidy()

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write(relpath, json.dumps(obj, indent=1) + "\n")

    def done_chunks(self) -> set[int]:
        """Chunks that are complete (their chunk.json is written last, after the shards)."""
        if self.remote is None:
            return {int(m.group(1)) for p in self.local.glob("chunk-*/chunk.json")
                    if (m := CHUNK_RE.search(p.relative_to(self.local).as_posix()))}
        return {int(m.group(1)) for k in self.list_remote() if (m := CHUNK_RE.search(k))}

    def is_empty(self) -> bool:
        """Nothing but our scratch folder here (for a remote OUT: nothing listed under it)."""
        if self.remote is not None:
            return not self.list_remote()
        return not self.local.exists() or all(p.name == ".tmp" for p in self.local.iterdir())


def check_remote_index(uri: str) -> None:
    """A remote dataset answers with its index.json (credentials, network, the path itself)."""
    with tempfile.TemporaryDirectory(prefix="regscale-index-") as tmp:
        if Store(uri, tmp).read_bytes("index.json") is None:
            raise UserError(f"{uri}: no index.json there (expected MDS shards written by `regscale prepare`)")
