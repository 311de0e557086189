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
from typing import Any, Optional

from regscale.config import is_remote
from regscale.fsutil import write_atomic

CHUNK_RE = re.compile(r"(?:^|/)chunk-(\d{6})/chunk\.json$")


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

            self._uploader = CloudUploader.get((str(self.local), self.remote), keep_local=True, exist_ok=True)
        return self._uploader

    def publish(self, relpath: str) -> None:
        """Upload one file already written under `local` (no-op for a local OUT)."""
        if self.remote is not None:
            self.uploader().upload_file(relpath)

    def fetch(self, relpath: str) -> Optional[Path]:
        """The local copy of `relpath`, downloaded first for a remote OUT; None when absent."""
        path = self.local / relpath
        if path.is_file() or self.remote is None:
            return path if path.is_file() else None
        from streaming.base.storage.download import CloudDownloader

        try:
            CloudDownloader.direct_download(f"{self.remote.rstrip('/')}/{relpath}", str(path))
        except Exception:  # absent or unreachable: the caller decides what that means
            return None
        return path if path.is_file() else None

    def read_json(self, relpath: str) -> Optional[dict]:
        path = self.fetch(relpath)
        return json.loads(path.read_text()) if path is not None else None

    def write_json(self, relpath: str, obj: Any) -> None:
        write_atomic(self.local / relpath, json.dumps(obj, indent=1) + "\n")
        self.publish(relpath)

    def done_chunks(self) -> set[int]:
        """Chunks that are complete (their chunk.json is written last, after the shards)."""
        if self.remote is None:
            return {int(m.group(1)) for p in self.local.glob("chunk-*/chunk.json")
                    if (m := CHUNK_RE.search(p.relative_to(self.local).as_posix()))}
        keys = self.uploader().list_objects() or []
        return {int(m.group(1)) for k in keys if (m := CHUNK_RE.search(k))}

    def is_empty(self) -> bool:
        """Nothing but our scratch folder here (for a remote OUT: nothing listed under it)."""
        if self.remote is not None:
            return not (self.uploader().list_objects() or [])
        return not self.local.exists() or all(p.name == ".tmp" for p in self.local.iterdir())
