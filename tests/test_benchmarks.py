"""The benchmark scripts run (`--quick`: small shapes on any device) and write what they promise:
CSV, markdown and PNG with the device, date, commit and versions. No timing is judged."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
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


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_results_default_to_the_scripts_own_folder(benchmarks_on_path, monkeypatch):
    """Run from benchmarks/ as the README says, the default output is benchmarks/results, not
    benchmarks/benchmarks/results."""
    import harness
    monkeypatch.chdir(BENCHMARKS)
    monkeypatch.setattr(sys, "argv", ["bench_neck.py", "--quick"])
    assert Path(harness.parse_args("bench").out) == BENCHMARKS / "results"


def test_row_log_keeps_every_row_before_the_run_ends(benchmarks_on_path, tmp_path):
    import harness
    log = harness.RowLog(tmp_path, "rows")
    log.add(dict(name="a", ms=1.5))
    log.add(dict(name="b", ms=2.5))
    with open(tmp_path / "rows.csv", newline="") as handle:   # as a kill now would leave it
        rows = list(csv.DictReader(handle))
    assert [(r["name"], float(r["ms"])) for r in rows] == [("a", 1.5), ("b", 2.5)]
    assert rows[0]["date"] and rows[0]["torch"]
    for row in log.rows:
        row["speedup"] = 1.0                                      # computed at the end
    log.finish("Rows")
    with open(tmp_path / "rows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["speedup"] for r in rows] == ["1.0", "1.0"]
    assert (tmp_path / "rows.md").read_text().startswith("# Rows")


def test_bars_use_a_log_axis_with_room_under_the_smallest(benchmarks_on_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import harness
    fig, ax = plt.subplots()
    harness.grouped_bars(ax, ["small", "large"], {"a": [1e-5, 1.0], "b": [None, 3e3]}, "GB/s",
                         harness.series_colors(["a", "b"]))
    assert ax.get_yscale() == "log"
    assert ax.get_ylim()[0] < 2e-6 and ax.get_ylim()[1] >= 3e3
    assert len(ax.patches) == 3                                  # None leaves a gap
    plt.close(fig)


def test_sweep_keeps_each_setting_that_helps_and_skips_what_fails(benchmarks_on_path):
    """Each setting judged by its own workload's cost: the training shape's, or for the few-rows
    forward's settings ("*small*") the decode shapes' (whose best is measured when first needed)."""
    import sweep_mm_adapter as sweep
    best_block, best_stages, best_small = 64, 3, 256

    def train(config):
        if config["fwd"]["num_warps"] == 16:
            raise RuntimeError("out of resources: shared memory")
        return abs(config["fwd"]["block_m"] - best_block) + abs(config["num_stages"] - best_stages)

    def decode(config):      # blind to the training settings, as the decode shapes are
        return abs(config["block_d_small"] - best_small)

    trials, kept = [], []
    start = {"fwd": {"block_m": 32, "num_warps": 8}, "num_stages": 2, "block_d_small": 128, "dot16": True, "name": "x"}
    found = sweep.coordinate_search(start, dict(train=train, decode=decode), float("inf"),
                                    lambda *trial: trials.append(trial), kept.append)
    assert found == {"fwd": {"block_m": best_block, "num_warps": 8}, "num_stages": best_stages,
                     "block_d_small": best_small, "dot16": True, "name": "x"}
    assert kept[0] == start and kept[-1] == found
    failed = [t for t in trials if t[4]]
    assert len(failed) == 1 and failed[0][1] == ("fwd", "num_warps") and "out of resources" in failed[0][4]
    assert {t[2] for t in trials if t[1] == ("block_d_small",)} == {"decode"}
    assert {t[2] for t in trials if t[1] and t[1] != ("block_d_small",)} == {"train"}
    assert [t[2] for t in trials if t[1] is None] == ["train", "decode"]     # each best measured once
    assert start["fwd"]["block_m"] == 32                        # the caller's table is not modified


def test_sweep_finds_the_table_by_its_shape(benchmarks_on_path):
    import types

    import torch

    import sweep_mm_adapter as sweep
    entry = dict(block_m=16, num_stages=3)
    module = types.SimpleNamespace(SOMETHING={"not": "it"}, TABLE={
        ("sm90", "bfloat16"): entry, ("sm80", "bfloat16"): dict(entry, block_m=32), ("interpreter", "bfloat16"): {}})
    name, table = sweep.find_config_table(module)
    assert name == "TABLE"
    assert sweep.table_entry(table, "sm90", torch.bfloat16) == (("sm90", "bfloat16"), entry)
    assert sweep.table_entry(table, "sm100", torch.bfloat16)[0][0] == "sm80"    # another GPU's, never the interpreter's
    assert sweep.table_entry(table, "sm90", torch.float16) is None
    assert sweep.find_config_table(types.SimpleNamespace(T={"sm90": {}})) is None


def test_sweep_quick_mode_runs(tmp_path):
    done = subprocess.run([sys.executable, "sweep_mm_adapter.py", "--quick", "--out", str(tmp_path)], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tables = list(tmp_path.glob("mm_adapter_configs_sm*_quick.json"))
    if "has no per-arch table" in done.stderr:      # kernels without the table: said, nothing written
        assert not tables
    else:
        assert len(tables) == 1 and json.loads(tables[0].read_text())["entries"]
        assert list(tmp_path.glob("sweep_mm_adapter_sm*_quick.csv"))


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("hang", [False, True], ids=["every-step-runs", "a-hung-step-is-cut"])
def test_run_gpu_writes_as_it_goes_and_keeps_to_its_budget(tmp_path, hang):
    """run_gpu.sh with stand-ins for python3 and nvidia-smi: each step's output lands in $OUT
    while it runs, a step that hangs is cut at what is left of BUDGET_S, and the steps after it
    are skipped and say so."""
    stubs, out = tmp_path / "bin", tmp_path / "out"
    stubs.mkdir()
    _stub(stubs, "nvidia-smi", 'echo "name, driver_version, memory.total"\necho "Stub GPU, 1, 1 MiB"\n')
    _stub(stubs, "python3", 'echo "ran: $*"\n' + ('case "$*" in *pytest*) exec sleep 60;; esac\n' if hang else ""))
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out), "BUDGET_S": "12"}
    started = time.monotonic()
    done = subprocess.run(["bash", str(BENCHMARKS / "run_gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    log = (out / "run_gpu.log").read_text()
    assert "Stub GPU" in (out / "device.txt").read_text()
    assert "ran: -m pytest" in (out / "gpu_tests.log").read_text()
    assert "LAVIN_FAST_HYPOTHESIS" not in done.stdout
    if hang:
        assert "gpu_tests: exit 124" in log and "cut by its budget" in log
        for later in ("bench_mm_adapter", "sweep_mm_adapter", "bench_train_step", "bench_neck"):
            assert f"{later} skipped" in log
        assert elapsed < 12 + 10
    else:
        for name, script in (("bench_mm_adapter", "bench_mm_adapter.py"), ("sweep_mm_adapter", "sweep_mm_adapter.py"),
                             ("bench_train_step", "bench_train_step.py"), ("bench_neck", "bench_neck.py")):
            assert f"{script} --out {out}" in (out / f"{name}.log").read_text()
            assert f"{name}: exit 0" in log
