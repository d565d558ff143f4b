"""Strict state-dict loading with errors that name every problem at once.

`torch.nn.Module.load_state_dict(strict=True)` already refuses missing and unexpected keys, but
stops at the first shape mismatch and names the module, not the file. Here every missing,
unexpected and mis-shaped key is listed together with the checkpoint it came from.
"""
from __future__ import annotations

from collections.abc import Mapping

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
