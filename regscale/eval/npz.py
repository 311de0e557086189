"""ADM-format .npz files, read and written without loading them whole.

A sample batch is `arr_0`: uint8 [N,H,W,3] (NHWC), what the ADM evaluator reads; regscale also
stores the labels as `arr_1`. A reference batch (VIRTUAL_imagenet256_labeled.npz) holds `arr_0`
(10K images) and the precomputed Inception statistics `mu`, `sigma` (pool3) and `mu_s`,
`sigma_s` (mixed_6/conv). Stored (uncompressed) members are memory-mapped; compressed ones are
streamed. Writes go to a temporary name and are renamed into place.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from regscale.errors import UserError
from regscale.eval.inception import POOL_DIM, SPATIAL_DIM, file_sha256
from regscale.fsutil import atomic_path


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class NpzArray:
    """One array of an .npz file: shape and dtype from its header, rows read on demand."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = Path(path), name
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo(f"{name}.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in _HEADER_READERS:
                    raise UserError(f"{path}: array '{name}' uses .npy format {version}; expected 1.0 or 2.0")
                shape, fortran, dtype = _HEADER_READERS[version](f)
                self._header_len = f.tell()
        if fortran:
            raise UserError(f"{path}: array '{name}' is stored in Fortran order; expected C order")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._stored = info.compress_type == zipfile.ZIP_STORED
        self._offset = _data_offset(self.path, info) + self._header_len if self._stored else None

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an in-memory array."""
        stop = min(stop, len(self))
        rows = (stop - start,) + self.shape[1:]
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self._stored:
            mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self._offset + start * row_bytes,
                           shape=rows)
            return np.array(mm)
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.name}.npy") as f:
            f.seek(self._header_len + start * row_bytes)
            data = f.read((stop - start) * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(rows)

    def read_all(self) -> np.ndarray:
        return self.read(0, len(self))


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a member's data: after its local header (whose extra field may differ
    from the central directory's)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise UserError(f"{path}: corrupt zip local header for {info.filename}")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def npz_members(path: Path) -> list[str]:
    """Array names in an .npz (raises a UserError naming the file when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a directory' if path.is_dir() else 'no such file'}; expected an .npz file")
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise UserError(f"{path}: not an .npz file (not a zip archive)") from None


def write_npz(path: Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]]) -> Path:
    """Write name -> (shape, dtype, chunks along axis 0) as an uncompressed .npz, chunk by chunk,
    atomically. The chunks must add up to `shape`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in arrays.items():
                dtype = np.dtype(dtype)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": tuple(shape)}
                    np.lib.format.write_array_header_2_0(f, header)
                    rows = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        if chunk.shape[1:] != tuple(shape[1:]):
                            raise ValueError(f"{name}: chunk of shape {chunk.shape} in an array of {shape}")
                        f.write(chunk.tobytes())
                        rows += chunk.shape[0]
                    if rows != shape[0]:
                        raise ValueError(f"{name}: chunks hold {rows} rows, header says {shape[0]}")
    return path


def open_images(path: Path, name: str = "arr_0", what: str = "samples") -> NpzArray:
    """`arr_0` of an ADM-format .npz, checked: uint8, [N,H,W,3]."""
    members = npz_members(path)
    if name not in members:
        raise UserError(f"{path}: no array '{name}' (has: {', '.join(members) or 'none'}); ADM-format "
                        f"{what} are uint8 [N,H,W,3] images in '{name}'")
    arr = NpzArray(path, name)
    if arr.dtype != np.uint8 or len(arr.shape) != 4 or arr.shape[3] != 3:
        raise UserError(f"{path}: '{name}' is {arr.dtype} {list(arr.shape)}; expected uint8 [N,H,W,3] "
                        "(NHWC, values 0..255)")
    return arr


def check_samples(path: Path, expected: int | None = None) -> NpzArray:
    """The images of a samples .npz; fewer than `expected` is an error, more are all used (as ADM)."""
    arr = open_images(path)
    if expected is not None and len(arr) < expected:
        raise UserError(f"{path}: holds {len(arr)} samples, fewer than the {expected} asked for "
                        "(eval.num_samples); finish sampling or lower eval.num_samples")
    if min(len(arr), expected or len(arr)) < MIN_IMAGES:
        raise UserError(f"{path}: {min(len(arr), expected or len(arr))} samples to score; precision/recall "
                        f"(k=3) and the covariances need at least {MIN_IMAGES}")
    return arr


MIN_IMAGES = 4  # k=3 nearest neighbours need 4 points; a covariance needs more than one


REFERENCE_ARRAYS = {
    "mu": ((POOL_DIM,), "pool3 mean"),
    "sigma": ((POOL_DIM, POOL_DIM), "pool3 covariance"),
    "mu_s": ((SPATIAL_DIM,), "mixed_6/conv mean"),
    "sigma_s": ((SPATIAL_DIM, SPATIAL_DIM), "mixed_6/conv covariance"),
}


@dataclass
class ReferenceBatch:
    """The ADM reference: precomputed statistics (float64) and the images (for precision/recall)."""

    path: Path
    sha256: Optional[str]  # None where the caller skipped hashing (ranks other than 0)
    images: NpzArray
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray


def load_reference(path: str | Path, *, hasher: Callable[[Path], Optional[str]] = file_sha256) -> ReferenceBatch:
    """Read and check an ADM reference batch; errors name each missing or malformed array."""
    path = Path(path)
    members = npz_members(path)
    missing = [f"'{n}' ({what})" for n, (_, what) in REFERENCE_ARRAYS.items() if n not in members]
    if "arr_0" not in members:
        missing.append("'arr_0' (reference images, for precision/recall)")
    if missing:
        raise UserError(f"{path}: not an ADM reference batch: missing {', '.join(missing)} "
                        f"(has: {', '.join(members) or 'none'}); use e.g. VIRTUAL_imagenet256_labeled.npz")
    stats = reference_stats(path)
    images = open_images(path, what="reference images")
    return ReferenceBatch(path=path, sha256=hasher(path), images=images, **stats)


def reference_stats(path: Path) -> dict[str, np.ndarray]:
    """The precomputed statistics a reference .npz holds (all or some), as float64, each checked
    for its shape and for NaN/inf (a corrupt reference would give a NaN or a wrong FID)."""
    stats = {}
    with np.load(path, allow_pickle=False) as npz:
        for name, (shape, what) in REFERENCE_ARRAYS.items():
            if name not in npz.files:
                continue
            try:
                value = npz[name]
            except (ValueError, OSError, zipfile.BadZipFile) as err:
                raise UserError(f"{path}: '{name}' ({what}) is unreadable ({err})") from None
            if value.shape != shape:
                raise UserError(f"{path}: '{name}' ({what}) has shape {list(value.shape)}; expected {list(shape)}")
            if not np.isfinite(value).all():
                raise UserError(f"{path}: '{name}' ({what}) holds NaN or infinite values; the reference "
                                "batch is corrupt (fetch VIRTUAL_imagenet256_labeled.npz again)")
            stats[name] = value.astype(np.float64)
    return stats
