"""What every benchmark here shares: timing, the copy-bandwidth ceiling, peak memory, and
results written as CSV + markdown + PNG with the device, date, commit and versions.

Timing follows ENGINEERING.md: CUDA events through `triton.testing.do_bench` (median, after
warm-up) on a GPU; on a CPU the fastest of wall-clock repeats (see `time_ms`; `--quick` only
proves the scripts run). Numbers are never asserted anywhere.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout as well
from lavin_fast.io import atomic_write, atomic_write_text  # noqa: E402


# Results go next to the scripts, wherever they are run from.
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, dtypes: str = "bf16,fp16",
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The flags every benchmark takes (--quick, --out, --dtypes), plus those `extra` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on any device: proves the script runs")
    parser.add_argument("--out", default=str(RESULTS), help=f"folder for the CSV, markdown and PNG (default {RESULTS})")
    parser.add_argument("--dtypes", default=dtypes, help=f"comma-separated: bf16, fp16, fp32 (default {dtypes})")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_dtypes(names: str) -> list[torch.dtype]:
    """'bf16,fp32' -> [torch.bfloat16, torch.float32]; an unknown name is a clear error."""
    unknown = [n for n in names.split(",") if n not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names.split(",")]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment() -> dict[str, str]:
    """Where and when the numbers were taken."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        # Results being regenerated do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):  # a copy without .git (a GPU machine's)
        commit = os.environ.get("LAVIN_FAST_COMMIT", "unknown")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none"}


def time_ms(fn: Callable[[], object], quick: bool = False) -> float:
    """Milliseconds of one call of `fn`: the median on a GPU; on a CPU the fastest of 15 calls,
    because our CPU machines are shared VMs whose speed drifts by tens of percent within a
    minute (measured: the same kernel 5.3 to 8.5 ms across runs), and interference only ever adds
    time, so the minimum is the repeatable number."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100 if not quick else 20, return_mode="median"))
    fn()                                             # warm-up (and compilation, if any)
    samples = []
    for _ in range(3 if quick else 15):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return min(samples)


def copy_bandwidth_gbs(nbytes: int, quick: bool = False) -> float:
    """Measured device-memory bandwidth of a large copy, counting bytes read plus written."""
    n = max(1, nbytes // 2)
    src = torch.randn(n, device=device()).to(torch.float16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), quick)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory (MiB) allocated while `fn` runs; None on CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _markdown(rows: Sequence[dict], meta: dict[str, str], title: str) -> str:
    columns = list(rows[0])
    head = [f"# {title}", "", " | ".join(f"{k}: {v}" for k, v in meta.items()), "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    return "\n".join(head + ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]) + "\n"


def write_results(rows: Sequence[dict], out: str | Path, name: str, title: str,
                  plot: Callable[[dict[str, str]], object] | None = None, device: str | None = None,
                  meta: dict[str, str] | None = None) -> dict[str, str]:
    """Write out/name.csv, out/name.md (with the environment on top) and, with `plot` (the
    environment -> a matplotlib figure), out/name.png. `device` replaces the measured device's
    name (an offline compile names its target); `meta` is the environment taken earlier (a
    `RowLog`'s)."""
    out = Path(out)
    meta = dict(meta or environment())
    if device is not None:
        meta["device"] = device
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(meta) + list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({**meta, **row})
    atomic_write_text(out / f"{name}.csv", buffer.getvalue())
    atomic_write_text(out / f"{name}.md", _markdown(rows, meta, title))
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plot(meta)
        atomic_write(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
    print(_markdown(rows, meta, title))
    return meta


class RowLog:
    """Result rows written to out/name.csv the moment each is measured (appended, flushed and
    synced one by one), so a run killed at any point keeps every row it finished; `finish` then
    rewrites the CSV whole (atomically, with columns computed at the end) with the markdown and
    the plot. Rows must share their columns."""

    def __init__(self, out: str | Path, name: str) -> None:
        self.out, self.name = Path(out), name
        self.meta = environment()
        self.rows: list[dict] = []
        self._file = None
        self._writer: csv.DictWriter | None = None

    def add(self, row: dict) -> None:
        if self._writer is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out / f"{self.name}.csv", "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(self.meta) + list(row))
            self._writer.writeheader()
        self._writer.writerow({**self.meta, **row})
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.append(row)

    def finish(self, title: str, plot: Callable[[dict[str, str]], object] | None = None) -> None:
        if self._file is not None:
            self._file.close()
        if self.rows:
            write_results(self.rows, self.out, self.name, title, plot, meta=self.meta)


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str,
                 colors: dict[str, str], log: bool = True) -> None:
    """One bar per (group, series) on `ax`, each series in its colour of `colors` (the same in
    every panel), a log axis by default: benchmark values span decades (a decode call against a
    13B batch, an interpreter against a GPU), and on a linear axis the small ones vanish. None
    values leave a gap."""
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label, color=colors[label])
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    if log:
        ax.set_yscale("log")
        smallest = min((v for values in series.values() for v in values if v is not None and v > 0), default=None)
        if smallest is not None:      # a decade of room under the smallest bar, so it shows
            ax.set_ylim(bottom=smallest / 10)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", which="major", alpha=0.3)


def series_colors(labels: Sequence[str]) -> dict[str, str]:
    """A fixed colour per series label, in order of first appearance."""
    palette = [f"C{i}" for i in range(10)]
    return {label: palette[i % len(palette)] for i, label in enumerate(dict.fromkeys(labels))}


def figure_legend(fig, axes) -> None:
    """One legend for the whole figure, below the panels (never over a bar)."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(8, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
