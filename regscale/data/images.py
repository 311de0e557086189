"""Image preprocessing for ImageNet-256: the ADM centre crop, and reading a file into uint8 CHW."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 256


class UnreadableImage(Exception):
    """A source file PIL cannot open or decode (truncated, corrupted, not an image)."""


def center_crop_arr(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """The ADM centre crop: halve with BOX while the short side >= 2*size, bicubic-resize the
    short side to `size`, crop the centre. RGB in, uint8 [size, size, 3] out."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def load_image(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Read any image PIL decodes, convert to RGB, ADM-crop: uint8 [3, size, size].

    Raises `UnreadableImage` with PIL's reason when the file is truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: a truncated file fails here, not later
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(str(err)) from None
    return np.ascontiguousarray(center_crop_arr(rgb, size).transpose(2, 0, 1))
