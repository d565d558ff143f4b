"""Output allocation shared by the kernels' host functions.

With `LAVIN_FAST_POISON=1` (the test suite sets it) every buffer a kernel is meant to fill
starts as NaN, so an element a kernel forgot to write fails the comparison instead of passing
on whatever the allocator left there.
"""
from __future__ import annotations

import os

import torch


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty`, NaN-filled when `LAVIN_FAST_POISON=1`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("LAVIN_FAST_POISON") == "1":
        out.fill_(float("nan"))
    return out
