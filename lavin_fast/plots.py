"""Pictures a reader would rather look at than read: loss curves and routing weights.

matplotlib runs headless (Agg) and every PNG is written atomically.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from lavin_fast.io import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _figure()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSONL training log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curve(log_path: str | Path, png_path: str | Path) -> Path:
    """Training loss (and learning rate, if logged) per optimizer step, from `log.jsonl`."""
    records = read_log(log_path)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:blue", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)", color="tab:blue")
    ax.grid(alpha=0.3)
    if records and "lr" in records[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in records], [r["lr"] for r in records], color="tab:orange", lw=1, ls="--")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("LaVIN training loss")
    return _save(fig, png_path)


def routing_weights(weights: Mapping[str, Sequence[float]], png_path: str | Path, title: str) -> Path:
    """The paper's Fig. 4: the weight of the first expert per layer, one line per modality.

    weights: modality name ("text", "image") -> per-layer mean routing weight of expert 0.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (name, values), marker in zip(weights.items(), "os^v"):
        ax.plot(range(len(values)), values, marker=marker, ms=4, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("routing weight of expert 0")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title)
    return _save(fig, png_path)
