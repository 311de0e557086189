"""What `regscale prepare` reads: an ImageFolder tree or the official REG layout, as a sorted list.

ImageFolder: SRC/<class>/**/<image> (any format PIL reads); label = index of the sorted class folder.
REG layout (what the REG/REPA preprocessing writes): SRC/images/**/<image> and SRC/vae-sd/**/*.npy
with SRC/vae-sd/dataset.json ({"labels": [[npy path, label], ...]}); the i-th sorted image pairs
with the i-th sorted .npy, whose moments (8x32x32) are used as they are (no VAE needed).
The order is deterministic, so sample i is the same file for every process and every retry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

from regscale.errors import UserError


def image_extensions() -> set[str]:
    """File extensions PIL can open (lower case, with the dot)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the source root
    label: int
    moments: Optional[str] = None  # REG layout: relative path of the .npy with the moments


@dataclass
class Source:
    root: Path
    kind: str  # "imagefolder" | "reg"
    classes: list[str]
    samples: list[Sample]

    def fingerprint(self) -> str:
        """Hash of the sorted (path, label) list: the identity of the dataset being prepared."""
        h = hashlib.sha256(self.kind.encode())
        for s in self.samples:
            h.update(f"\0{s.path}\0{s.label}".encode())
        return h.hexdigest()[:16]


def _walk(root: Path, extensions: set[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _scan_reg(root: Path) -> Source:
    images_dir, feats_dir = root / "images", root / "vae-sd"
    meta = feats_dir / "dataset.json"
    if not meta.is_file():
        raise UserError(f"{root}: REG layout needs {meta} (labels of the .npy files)")
    try:
        labels = dict(json.loads(meta.read_text())["labels"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{meta}: expected {{\"labels\": [[npy path, label], ...]}}: {err}") from None
    images = _walk(images_dir, image_extensions())
    feats = _walk(feats_dir, {".npy"})
    if len(images) != len(feats):
        raise UserError(f"{root}: {len(images)} images under images/ but {len(feats)} .npy files under "
                        "vae-sd/; the REG layout pairs them one to one in sorted order")
    samples = []
    for img, feat in zip(images, feats):
        key = feat.replace(os.sep, "/")
        if key not in labels:
            raise UserError(f"{meta}: no label for {key}")
        samples.append(Sample(img, int(labels[key]), os.path.join("vae-sd", feat)))
    samples = [Sample(os.path.join("images", s.path), s.label, s.moments) for s in samples]
    num_classes = max((s.label for s in samples), default=-1) + 1
    return Source(root, "reg", [str(i) for i in range(num_classes)], samples)


def _scan_imagefolder(root: Path) -> Source:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    extensions = image_extensions()
    samples = []
    for label, name in enumerate(classes):
        samples += [Sample(os.path.join(name, p), label) for p in _walk(root / name, extensions)]
    return Source(root, "imagefolder", classes, samples)


def scan_source(src: str | Path) -> Source:
    """The samples under SRC in a fixed order; UserError when SRC is missing or holds no images."""
    root = Path(src)
    if not root.is_dir():
        raise UserError(f"source not found: {root} (expected an ImageFolder tree of class folders, or "
                        "the REG layout: images/ + vae-sd/dataset.json)")
    reg = (root / "images").is_dir() and (root / "vae-sd").is_dir()
    source = _scan_reg(root) if reg else _scan_imagefolder(root)
    if not source.samples:
        what = "images/ (REG layout)" if reg else "class sub-folders (ImageFolder: SRC/<class>/<image>)"
        raise UserError(f"no images found in {root}: expected image files PIL can read in {what}")
    return source
