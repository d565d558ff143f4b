"""The benchmark scripts run (`--quick`: small shapes on any device) and write what they promise:
CSV, markdown and PNG with the device, date, commit and versions. No timing is judged."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script, name, columns", [
    ("bench_mm_adapter.py", "mm_adapter", {"provider", "mode", "ms", "GBps", "frac_copy_bw", "speedup_vs_reference"}),
    ("bench_neck.py", "neck", {"provider", "mode", "ms"}),
    ("bench_train_step.py", "train_step", {"kernels", "checkpointing", "attention", "forward_ms", "backward_ms",
                                           "optimizer_ms", "tokens_per_s", "MFU", "peak_GiB"}),
])
def test_quick_mode_writes_csv_markdown_and_plot(tmp_path, script, name, columns):
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / f"{name}_quick"
    with open(f"{stem}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and columns <= set(rows[0])
    for row in rows:
        assert row["device"] and row["date"] and row["commit"] and row["torch"] and row["triton"]
        assert float(row.get("ms") or row.get("step_ms")) > 0
    markdown = Path(f"{stem}.md").read_text()
    assert markdown.startswith("# ") and "device:" in markdown and "commit:" in markdown
    assert Path(f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
