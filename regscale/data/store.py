"""Where a prepared dataset lives: a local directory, or a remote URI staged through a local one.

Everything is written under `local` first; for a remote OUT each finished file is then uploaded
with streaming's CloudUploader (s3://, gs://, oci://, ...) and read back with its downloader.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from regscale.config import is_remote
from regscale.errors import UserError, first_line
from regscale.fsutil import write_atomic

CHUNK_RE = re.compile(r"(?:^|/)chunk-(\d{6})/chunk\.json$")

# Where each object store's client looks for credentials (streaming uses these clients).
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login, or GCS_KEY + GCS_SECRET",
    "oci": "~/.oci/config",
    "azure": "AZURE_ACCOUNT_NAME + AZURE_ACCOUNT_ACCESS_KEY",
    "az": "AZURE_ACCOUNT_NAME + AZURE_ACCOUNT_ACCESS_KEY",
    "hf": "HF_TOKEN",
}
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


def is_not_found(err: BaseException) -> bool:
    """An object store's answer that the object does not exist (not: no access, no network)."""
    response = getattr(err, "response", None)  # botocore's ClientError
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return isinstance(err, FileNotFoundError) or code in _NOT_FOUND


def remote_failure(uri: str, err: BaseException) -> UserError:
    """One line for a remote store that cannot be used: what failed and where credentials come from."""
    scheme = uri.split("://", 1)[0]
    reason = first_line(err)
    hint = f"; check the network and the credentials ({CREDENTIALS[scheme]})" if scheme in CREDENTIALS else ""
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


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


class Store:
    """A dataset root: `local` always; `remote` (a URI) when OUT is in object storage."""

    def __init__(self, out: str, stage: Optional[str] = None) -> None:
        self.out = out
        self.remote = out if is_remote(out) else None
        if self.remote is None:
            self.local = Path(out)
        else:
            digest = hashlib.sha256(out.encode()).hexdigest()[:12]
            self.local = Path(stage or Path(tempfile.gettempdir()) / f"regscale-stage-{digest}")
        self._uploader: Any = None

    def uploader(self) -> Any:
        if self._uploader is None:
            from streaming.base.storage.upload import CloudUploader

            with remote_access(str(self.remote)):
                self._uploader = CloudUploader.get((str(self.local), self.remote), keep_local=True,
                                                   exist_ok=True)
        return self._uploader

    def list_remote(self) -> list[str]:
        """Every object name under the remote OUT."""
        with remote_access(str(self.remote)):
            return self.uploader().list_objects() or []

    def publish(self, relpath: str) -> None:
        """Upload one file already written under `local` (no-op for a local OUT)."""
        if self.remote is not None:
            with remote_access(f"{self.remote.rstrip('/')}/{relpath}"):
                self.uploader().upload_file(relpath)

    def fetch(self, relpath: str) -> Optional[Path]:
        """The local copy of `relpath`, downloaded first for a remote OUT; None when absent."""
        path = self.local / relpath
        if path.is_file() or self.remote is None:
            return path if path.is_file() else None
        from streaming.base.storage.download import CloudDownloader

        uri = f"{self.remote.rstrip('/')}/{relpath}"
        try:
            CloudDownloader.direct_download(uri, str(path))
        except Exception as err:
            if is_not_found(err):
                return None
            raise remote_failure(uri, err) from None
        return path if path.is_file() else None

    def read_json(self, relpath: str) -> Optional[Any]:
        """The parsed JSON file, None when absent; a UserError naming it when it is not JSON."""
        path = self.fetch(relpath)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{self.out.rstrip('/')}/{relpath}: unreadable ({err})") from None

    def write_json(self, relpath: str, obj: Any) -> None:
        write_atomic(self.local / relpath, json.dumps(obj, indent=1) + "\n")
        self.publish(relpath)

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
        if Store(uri, tmp).fetch("index.json") is None:
            raise UserError(f"{uri}: no index.json there (expected MDS shards written by `regscale prepare`)")
