"""Image preprocessing for the CLIP vision tower (REFERENCE.md section 3).

- normalization="imagenet" (compat, the reference's): RGB, resize to size x size bicubic with no
  crop (the aspect ratio is not kept), ImageNet mean/std.
- normalization="clip" (CLIP's own recipe): RGB, resize the shorter side to `size` bicubic,
  center crop size x size, CLIP's mean/std. Same arithmetic as torchvision's Resize(size) /
  CenterCrop(size) on a PIL image (the longer side is truncated, the crop offset rounded).
  CLIP converts to RGB after resizing; here it is before, which is the same for RGB images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lavin_fast.scienceqa import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
# What PIL raises on a damaged file: verify() reports a bad PNG checksum as SyntaxError.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def preprocess(image: Image.Image | str | Path, size: int = 224, normalization: str = "imagenet") -> Tensor:
    """A PIL image or an image file -> float32 tensor [3, size, size], normalised."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"preprocess: normalization must be one of {tuple(NORMALIZATIONS)}, got {normalization!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"preprocess: size must be a positive int, got {size!r}")
    image = _load_rgb(image)
    if normalization == "imagenet":
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    else:
        image = _resize_shorter_and_crop(image, size)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1).div(255)
    mean, std = NORMALIZATIONS[normalization]
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def check_image(path: str | Path) -> None:
    """Raise DataError naming `path` unless it is an intact image that `preprocess` can read.

    verify() reads the container without decoding (PNG chunk checksums, a missing end chunk:
    damage a decode alone lets through); the full decode the collator does then catches a
    truncated JPEG, which verify() passes. About the cost of one collation of the image.
    """
    try:
        with Image.open(path) as opened:
            opened.verify()
    except _UNREADABLE as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    _load_rgb(path)


def _load_rgb(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"preprocess: expected a PIL image or a path, got {type(image).__name__}")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")  # decodes the whole file: a truncated one fails here
    except _UNREADABLE as error:
        raise DataError(f"cannot read image {image}: {error}") from error


def _resize_shorter_and_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = round((new_width - size) / 2), round((new_height - size) / 2)
    return image.crop((left, top, left + size, top + size))
