"""Strict state-dict loading with errors that name every problem at once, and the safe reading
of torch and JSON files that every checkpoint format here shares.

`torch.nn.Module.load_state_dict(strict=True)` already refuses missing and unexpected keys, but
stops at the first shape mismatch and names the module, not the file. Here every missing,
unexpected and mis-shaped key is listed together with the checkpoint it came from.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of `found`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(found)
        if tuple(found[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mismatched shapes", mismatched)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{title} ({len(items)}): {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, assign: bool = True) -> None:
    """Check `state_dict` against `module` (every key, every shape) and load it.

    assign=True keeps the checkpoint's tensors (mmap-backed ones included) instead of copying
    them into freshly allocated parameters, so a model built on the meta device is materialised
    without a second full copy in memory.
    """
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=assign)


def torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)` on the CPU, memory-mapped when the file is in the zip
    format (torch >= 1.6); files in the older pickle format cannot be mapped and are read whole.
    Callers wrap failures in a message about what the file should have been."""
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def flat_state_dict(state: object, source: str) -> dict[str, Tensor]:
    """`state` as a {name: tensor} dict, or a CheckpointError saying what it is instead."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{source} is not a flat state dict: key {key!r} holds a {type(value).__name__}")
    return dict(state)


def read_json(file: Path) -> dict:
    """A JSON object from `file` (a config, an index, a params.json), or CheckpointError naming it."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a {type(value).__name__}, not a JSON object")
    return value
