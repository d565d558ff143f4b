"""The offline compile report (benchmarks/compile_report.py) for an A100 (sm_80) and an H100/H200
(sm_90): the kernels the public modules launch at LaVIN-7B training shapes (adapter at micro-batch
4 x 512, d = 4096; neck at M = 24) compile in every dtype, spill nothing, and the launches that move
the activations fill at least one wave and stream through multi-buffered loads (ENGINEERING.md,
"Compiling for a GPU without one"), and the modelled HBM traffic of a training call stays within
10% of the floor in every dtype. A decoding step (8 samples, one token each) is one launch within
10% of the floor with the weights counted. No GPU is needed; ptxas comes with the triton wheel."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
TRAINING = ("7B adapter train", "7B neck train")
CASES = (*TRAINING, "7B adapter decode")
DTYPES = ("bf16", "fp16", "fp32")


def _ptxas_missing(capability: int) -> str | None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compile_report
    except Exception as error:  # triton missing or without its nvidia backend
        return f"compile_report cannot be imported: {error}"
    finally:
        sys.path.remove(str(BENCHMARKS))
    arch = compile_report.ARCHS[capability]
    if compile_report.ptxas_path(arch) is None:
        return f"the triton wheel has no bundled ptxas for {arch.gpu_name} (triton/backends/nvidia/bin)"
    return None


@pytest.fixture(scope="module", params=[80, 90], ids=["sm80", "sm90"])
def report(request, tmp_path_factory):
    capability = request.param
    reason = _ptxas_missing(capability)
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp(f"sm{capability}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LAVIN_FAST_BACKEND")}
    command = [sys.executable, "compile_report.py", "--arch", str(capability), "--dtypes", ",".join(DTYPES),
               "--out", str(out)]
    for case in CASES:
        command += ["--case", case]
    done = subprocess.run(command, cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"a kernel failed to compile or the report broke:\n{done.stderr[-4000:]}"
    with open(out / f"compile_report_sm{capability}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    sms = {80: 108, 90: 132}[capability]
    return capability, sms, rows


def _main_adapter_launches(rows, dtype):
    """The 7B adapter's training launches that read or write at least one activation-sized tensor."""
    activation_mb = 4 * 512 * 4096 * {"bf16": 2, "fp16": 2, "fp32": 4}[dtype] / 1e6
    return [r for r in rows if r["case"] == "7B adapter" and r["phase"] == "train" and r["dtype"] == dtype
            and float(r["launch_MB"]) >= activation_mb]


def test_every_expected_kernel_compiled_with_its_numbers(report):
    capability, _, rows = report
    for case in CASES:
        name, _, phase = case.rpartition(" ")
        for dtype in DTYPES:
            found = [r for r in rows if r["case"] == name and r["phase"] == phase and r["dtype"] == dtype]
            directions = {r["direction"] for r in found}
            expected = {"fwd", "bwd"} if phase == "train" else {"fwd"}
            assert directions == expected, f"sm_{capability} {case} {dtype}: launches {found}"
            for row in found:
                assert int(row["registers"]) > 0 and int(row["warps"]) > 0 and int(row["programs"]) > 0, row
                assert row["device"].startswith("offline compile") and row["commit"] and row["triton"], row
        main = _main_adapter_launches(rows, "bf16")
        assert {r["direction"] for r in main} == {"fwd", "bwd"}, main


def test_no_kernel_spills_registers(report):
    capability, _, rows = report
    spilling = {(r["case"], r["dtype"], r["kernel"]) for r in rows if int(r["spill_bytes"])}
    assert not spilling, f"sm_{capability}: kernels that spill (case, dtype, kernel): {sorted(spilling)}"


def test_main_adapter_launches_fill_a_wave(report):
    capability, sms, rows = report
    short = [(r["dtype"], r["kernel"], r["grid"]) for dtype in DTYPES
             for r in _main_adapter_launches(rows, dtype) if int(r["programs"]) < sms]
    assert not short, f"sm_{capability}: 7B micro-batch-4 launches with fewer programs than {sms} SMs: {short}"


def test_main_adapter_launches_stream_through_multiple_buffers(report):
    capability, _, rows = report
    single = [(r["dtype"], r["kernel"], r["stages"], r["streams"]) for dtype in DTYPES
              for r in _main_adapter_launches(rows, dtype)
              if int(r["stages"]) < 3 or not r["stream_buffers"] or int(r["stream_buffers"]) < 2]
    assert not single, (f"sm_{capability}: launches whose activation loads are not multi-buffered "
                        f"(dtype, kernel, num_stages, streams as tensor:tile/buffers): {single}")


def test_modelled_hbm_traffic_of_every_training_call_is_near_the_floor(report):
    """Forward and backward of the 7B adapter at micro-batch 4 and of the neck, in every dtype:
    x and dy read from HBM once (their second reads L2 hits by the chunking), within 10% of the
    floor (adapter 5 M d e)."""
    capability, _, rows = report
    for case in TRAINING:
        name, _, phase = case.rpartition(" ")
        for dtype in DTYPES:
            ratios = {float(r["HBM_over_floor"]) for r in rows
                      if r["case"] == name and r["phase"] == phase and r["dtype"] == dtype}
            assert len(ratios) == 1, (case, dtype, ratios)
            assert 1.0 <= ratios.pop() <= 1.10, f"sm_{capability} {case} {dtype}: modelled HBM bytes over the floor"


def test_a_decoding_step_is_one_launch_near_the_floor_with_its_weights(report):
    """LaVIN-7B decoding, 8 samples of one token, routing weights given (from the KV cache): one
    launch (a launch costs more than the step's bytes take), and its modelled HBM bytes within
    10% of x and y plus the weights it reads: no partials, no re-read of x from HBM."""
    capability, _, rows = report
    for dtype in DTYPES:
        found = [r for r in rows if r["case"] == "7B adapter" and r["phase"] == "decode" and r["dtype"] == dtype]
        assert len(found) == 1, f"sm_{capability} {dtype}: decode launches {[r['kernel'] for r in found]}"
        ratio = float(found[0]["HBM_over_floor_with_weights"])
        assert 1.0 <= ratio <= 1.10, f"sm_{capability} {dtype}: decode HBM over the floor with weights {ratio}"


def _model():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compile_report
    except Exception as error:  # triton missing or without its nvidia backend
        pytest.skip(f"compile_report cannot be imported: {error}")
    finally:
        sys.path.remove(str(BENCHMARKS))
    return compile_report


def test_hbm_model_counts_a_reread_by_what_was_touched_since_and_a_view_by_its_own_bytes():
    """The L2 model behind HBM_over_floor, on hand-made launches (A100: 40 MiB L2, 30 MiB of it
    assumed usable)."""
    model = _model()
    arch, mib = model.ARCHS[80], 1 << 20

    def launch(**args):
        return model.Launch("kernel", (1, 1, 1), args, None)

    small, big = torch.empty(mib, dtype=torch.uint8), torch.empty(29 * mib, dtype=torch.uint8)
    assert model.hbm_bytes([launch(t=small), launch(t=small)], 1, arch) == mib
    assert model.hbm_bytes([launch(t=small), launch(t=big), launch(t=small)], 1, arch) == mib + 29 * mib
    other = torch.empty(mib, dtype=torch.uint8)
    assert model.hbm_bytes([launch(t=small), launch(t=big), launch(t=other), launch(t=small)], 1, arch) == 32 * mib
    # Re-reading part of `big` is a hit and adds no new bytes: what was touched since `small` is
    # exactly the 30 MiB, so `small` still hits.
    assert model.hbm_bytes([launch(t=small), launch(t=big), launch(t=big[:mib]), launch(t=small)], 1, arch) \
        == 30 * mib
    # A buffer written a chunk at a time as views, then read whole: each byte once.
    part = torch.empty(4 * mib, dtype=torch.uint8)
    assert model.hbm_bytes([launch(t=part[:mib]), launch(t=part[mib:]), launch(t=part)], 1, arch) == 4 * mib
    # The first half fell out of L2 before the whole is read: it alone is read again.
    halves = [launch(t=part[:mib]), launch(t=big), launch(t=part[mib:2 * mib]), launch(t=part[:2 * mib])]
    assert model.hbm_bytes(halves, 1, arch) == 3 * mib + 29 * mib
    # A launch over a chunk of rows touches those rows of a [rows, ...] tensor only.
    x = torch.empty(8, mib // 8, dtype=torch.uint8)
    chunks = [launch(t=x, row0=0, row1=4), launch(t=x, row0=4, row1=8), launch(t=x)]
    assert model.hbm_bytes(chunks, 8, arch) == mib
