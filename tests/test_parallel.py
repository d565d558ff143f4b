"""Data and tensor parallelism on torch.distributed (gloo, CPU, several processes inside pytest),
judged on the results the processes write, against one process.

- parallel_worker.py: one forward + backward of a tiny LaVIN parallelized from outside
  (TP=2, TP=2 with sequence parallel, DP=2, and a 2 x 2 mesh on 4 processes): the loss and every
  trainable gradient equal one process's; exactly the adapters, neck and modality embedding
  train; frozen weights are never data-parallel.
- the `torchrun -m lavin_fast.train` entry point itself: --tp 2 and --dp 2 runs log the same
  losses as a one-process run, and a checkpoint written at TP=2 resumes in one process exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import parallel_worker
from lavin_fast import train as training

HERE = Path(__file__).parent
TIMEOUT = 240


def torchrun(processes: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAVIN_FAST_LOG": "WARNING"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=HERE.parent)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def one_process():
    """The reference: parallel_worker's forward + backward in this process, unparallelized."""
    model = parallel_worker.build_model()
    batch = parallel_worker.global_batch()
    loss = model.loss(batch)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("dp, tp, sequence_parallel, packed",
                         [(1, 2, False, False), (1, 2, True, False), (2, 1, False, False), (2, 2, False, False),
                          (1, 2, False, True), (2, 1, False, True)],
                         ids=["tp2", "tp2-sequence-parallel", "dp2", "dp2xtp2", "tp2-packed", "dp2-packed"])
def test_parallel_forward_and_gradients_equal_one_process(tmp_path, one_process, dp, tp, sequence_parallel, packed):
    """Packed: each rank's share concatenated into one row, against the padded one process."""
    torchrun(dp * tp, str(HERE / "parallel_worker.py"), str(tmp_path), str(dp), str(tp), str(int(sequence_parallel)),
             str(int(packed)))
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    torch.testing.assert_close(result["loss"], one_process["loss"], rtol=1e-5, atol=0)
    assert result["trainable"] == sorted(one_process["grads"])        # norms re-frozen after SequenceParallel
    for name, grad in one_process["grads"].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-5 * max(scale, 1e-6), msg=name)
    placements = result["placements"]
    trainable = set(result["trainable"])
    for name, placed in placements.items():
        if name in trainable:   # sharded over the data-parallel ranks by FSDP2 only, never split by TP
            assert (placed is not None and "dp" in placed[0]) == (dp > 1), (name, placed)
            assert placed is None or "tp" not in placed[0], (name, placed)
        else:                   # frozen: never data-parallel; the LLaMA's projections split by TP
            assert placed is None or "dp" not in placed[0], (name, placed)
    if tp > 1:
        assert placements["llama.layers.0.attention.wq.weight"][1] == "(Shard(dim=0),)"
        assert placements["llama.layers.0.attention.wo.weight"][1] == "(Shard(dim=1),)"
        assert placements["llama.tok_embeddings.weight"][1] == "(Shard(dim=0),)"
        assert placements["vit.blocks.0.attn.in_proj.weight"] is None              # the ViT is replicated


# ---- the training entry point -------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Fake data, tokenizer and tiny backbones made once; every run below points at them."""
    cfg = training.prepare_embedded_default(training.TrainConfig(preset="tiny", fake_data=True,
                                                                 out=str(tmp_path_factory.mktemp("prepared"))))
    return ["--data-root", cfg.data_root, "--tokenizer", cfg.tokenizer, "--llama", cfg.llama, "--clip", cfg.clip]


def run_args(out: Path, prepared: list[str], *extra: str) -> list[str]:
    return ["--preset", "tiny", *prepared, "--out", str(out), "--effective-batch", "8", "--micro-batch", "2",
            "--max-steps", "4", "--save-every", "2", "--lr", "5e-3", "--warmup-epochs", "0.05", "--no-progress",
            *extra]


def log_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def adapters(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def assert_same_adapters(a: Path, b: Path, tolerance: float) -> None:
    first, second = adapters(a), adapters(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=tolerance, msg=key)


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    """The one-process run every parallel run is compared with (dropout on: tensor-parallel
    ranks draw the same masks as one process, which the TP comparison checks too)."""
    out = tmp_path_factory.mktemp("single")
    training.main(run_args(out, prepared))
    return out


def test_torchrun_tensor_parallel_logs_the_losses_of_one_process(tmp_path, prepared, single):
    torchrun(2, "-m", "lavin_fast.train", *run_args(tmp_path, prepared, "--tp", "2"))
    assert log_losses(tmp_path) == pytest.approx(log_losses(single), rel=1e-5)
    assert_same_adapters(single / "adapters.safetensors", tmp_path / "adapters.safetensors", 1e-5)


@pytest.fixture(scope="module")
def single_no_dropout(prepared, tmp_path_factory):
    """One process without dropout, for the layouts whose dropout masks cannot be the same:
    data-parallel ranks draw their own, and sequence parallelism pads the length. Padded, so
    that the packed parallel runs (the default) are judged against the padded layout."""
    out = tmp_path_factory.mktemp("single-no-dropout")
    training.main(run_args(out, prepared, "--adapter-dropout", "0", "--no-packing"))
    return out


def test_torchrun_sequence_parallel_logs_the_losses_of_one_process(tmp_path, prepared, single_no_dropout):
    """Norms on sequence shards (the collator pads the length to a multiple of tp)."""
    torchrun(2, "-m", "lavin_fast.train", *run_args(tmp_path, prepared, "--tp", "2", "--sequence-parallel",
                                                    "--adapter-dropout", "0"))
    assert log_losses(tmp_path) == pytest.approx(log_losses(single_no_dropout), rel=1e-5)
    assert_same_adapters(single_no_dropout / "adapters.safetensors", tmp_path / "adapters.safetensors", 1e-5)


def test_torchrun_data_parallel_keeps_the_global_batch(tmp_path, prepared, single_no_dropout):
    """DP=2 x micro 2 x accumulation 2 == 1 process x micro 2 x accumulation 4."""
    one = single_no_dropout
    torchrun(2, "-m", "lavin_fast.train", *run_args(tmp_path, prepared, "--dp", "2", "--adapter-dropout", "0"))
    assert log_losses(tmp_path) == pytest.approx(log_losses(one), rel=1e-5)
    assert_same_adapters(one / "adapters.safetensors", tmp_path / "adapters.safetensors", 1e-5)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["answer_tokens"] for r in records] == [
        json.loads(line)["answer_tokens"] for line in (one / "log.jsonl").read_text().splitlines()]


def test_torchrun_data_parallel_token_budget_logs_the_losses_of_one_process(tmp_path, prepared, single_no_dropout):
    """DP=2 with --max-tokens: each rank cuts its half of a step by tokens (samples of about 70
    tokens, so two or three micro-batches a rank, evened out across ranks for FSDP); the step's
    loss is still the mean over all its answer tokens, that of one padded process."""
    torchrun(2, "-m", "lavin_fast.train", *run_args(tmp_path, prepared, "--dp", "2", "--adapter-dropout", "0",
                                                    "--max-len", "150", "--max-tokens", "150"))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(log_losses(single_no_dropout), rel=1e-5)
    assert all(0 < r["fill"] <= 1 and r["truncated"] == 0 for r in records)
    assert_same_adapters(single_no_dropout / "adapters.safetensors", tmp_path / "adapters.safetensors", 1e-5)


def test_a_tensor_parallel_checkpoint_resumes_in_one_process(tmp_path, prepared, single):
    """Written at TP=2 (DCP, sharded), read back by one process at step 2: steps 3-4 then equal
    the unbroken one-process run's."""
    torchrun(2, "-m", "lavin_fast.train", *run_args(tmp_path, prepared, "--tp", "2"))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "latest.json").write_text(json.dumps({"dir": "step-0000002", "step": 2}))  # "crashed" after step 2
    training.main(run_args(tmp_path, prepared, "--resume"))
    assert log_losses(tmp_path) == pytest.approx(log_losses(single), rel=1e-5)
    assert_same_adapters(single / "adapters.safetensors", tmp_path / "adapters.safetensors", 1e-5)
    # and the adapter file a TP=2 checkpoint exports is the single file of a one-process run
    assert adapters(checkpoints / "step-0000002" / "adapters.safetensors").keys() == adapters(
        single / "adapters.safetensors").keys()


def test_bad_layouts_are_clear_errors():
    from lavin_fast.models.llama import LlamaConfig
    from lavin_fast.parallel import build_mesh, check_tensor_parallel

    with pytest.raises(ValueError, match=r"--tp 3 must divide the number of processes \(1\)"):
        build_mesh(None, 3)
    with pytest.raises(ValueError, match=r"--dp 2 x --tp 1 = 2 processes, but torchrun started 1"):
        build_mesh(2, 1)
    with pytest.raises(ValueError, match=r"does not divide the LLaMA's n_heads \(4\)"):
        check_tensor_parallel(LlamaConfig.from_preset("tiny"), 3)
