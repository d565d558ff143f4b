"""A run folder belongs to one run (lavin_fast.run_folder): a fresh run never rewrites another
run's files, one trainer at a time, checkpoints rotate by step, a --resume keeps the recipe and
survives what a crash leaves, files honour the umask, the folder can move; and a step with a
non-finite loss or gradient stops the run before the adapters take it."""
from __future__ import annotations

import json
import logging
import math
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from test_train import adapter_tensors, read_log, shared_inputs, tiny_config  # noqa: F401 (a fixture)

from lavin_fast import cli, recipe, run_folder
from lavin_fast import train as training
from lavin_fast.io import atomic_write_text
from lavin_fast.models.lavin import LaVIN

ANOTHER_RUN = {"log.jsonl": '{"step": 1, "loss": 2.5}\n', "adapters.safetensors": "its adapters",
               "run_config.json": "{}", "checkpoints/latest.json": '{"dir": "step-0000009", "step": 9}',
               "checkpoints/step-0000009/extra.pt": "its state"}


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def read_files(folder: Path, names) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in names}


def test_a_fresh_run_into_another_runs_folder_is_refused_and_overwrite_moves_that_run_aside(tmp_path, shared_inputs):
    out = tmp_path / "run"
    write_files(out, ANOTHER_RUN)
    with pytest.raises(ValueError) as refused:
        training.train(tiny_config(out, max_steps=1, **shared_inputs))
    message = str(refused.value)
    assert "\n" not in message and all(way in message for way in ("--resume", "another --out", "--overwrite"))
    assert read_files(out, ANOTHER_RUN) == ANOTHER_RUN
    with pytest.raises(ValueError, match="pass only one"):
        training.train(tiny_config(out, max_steps=1, resume=True, overwrite=True, **shared_inputs))

    training.train(tiny_config(out, max_steps=1, overwrite=True, **shared_inputs))
    [aside] = out.glob("replaced-*")
    assert read_files(aside, ANOTHER_RUN) == ANOTHER_RUN
    assert [r["step"] for r in read_log(out)] == [1]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["dir"] == "step-0000001"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-0000001"]


def test_under_torchrun_every_rank_refuses_another_runs_folder(tmp_path, shared_inputs):
    """Rank 0 checks the folder; rank 1 raises the same refusal instead of waiting for it."""
    out = tmp_path / "run"
    write_files(out, ANOTHER_RUN)
    paths = [arg for key, value in shared_inputs.items() for arg in (f"--{key.replace('_', '-')}", value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "lavin_fast.train", "--preset", "tiny", *paths, "--out", str(out), "--max-steps", "1", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LAVIN_FAST_LOG": "WARNING"})
    assert done.returncode != 0
    # Each rank prints the one-line refusal itself (rank 1 does not wait for rank 0 to die).
    assert done.stderr.count(f"lavin-fast: error: {out} holds another run") == 2, done.stderr
    assert read_files(out, ANOTHER_RUN) == ANOTHER_RUN


def test_a_second_trainer_is_refused_and_a_dead_trainers_lock_is_taken_over(tmp_path, shared_inputs, monkeypatch,
                                                                           caplog):
    """A trainer started while another writes the folder (here: from inside the first one's
    loop) refuses at once; the lock file a killed trainer left is taken over. Every file the
    run writes has the umask's mode."""
    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=1, **shared_inputs)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / ".trainer.lock").write_text(f"{dead.pid}\n")
    refusals = []
    original = recipe.micro_batches

    def second_trainer_at_the_first_step(*args, **kwargs):
        try:
            training.train(cfg)
        except ValueError as error:
            refusals.append(str(error))
        yield from original(*args, **kwargs)

    monkeypatch.setattr(recipe, "micro_batches", second_trainer_at_the_first_step)
    umask = os.umask(0o002)
    try:
        with caplog.at_level(logging.WARNING, logger="lavin_fast.train"):
            training.train(cfg)
    finally:
        os.umask(umask)
    assert refusals == [f"{out} is in use by another trainer (pid {os.getpid()}): wait for it to finish, "
                        "or choose another --out"]
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert [r["step"] for r in read_log(out)] == [1]
    assert (out / ".trainer.lock").read_text() == ""        # released
    for name in ("run_config.json", "log.jsonl", "adapters.safetensors", "checkpoints/latest.json",
                 "checkpoints/step-0000001/extra.pt", "checkpoints/step-0000001/adapters.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


def test_atomic_writes_honour_the_umask(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        previous = os.umask(umask)
        try:
            path = atomic_write_text(tmp_path / f"file-{umask:o}.txt", "text")
        finally:
            os.umask(previous)
        assert stat.S_IMODE(path.stat().st_mode) == mode


class FolderOnlySession:
    """What `_save` needs of a session, writing a checkpoint folder with nothing in it but extra.pt."""
    is_main = True

    def gather_objects(self, obj):
        return [obj]

    def save_checkpoint(self, folder, model, optimizer, extra) -> None:
        folder.mkdir(parents=True)
        (folder / "extra.pt").write_text(str(extra["step"]))


def test_rotation_orders_checkpoints_by_step_and_keeps_the_one_latest_json_names(tmp_path):
    scheduler = types.SimpleNamespace(state_dict=dict)
    for step in (99_999_998, 99_999_999, 100_000_000):      # "step-100000000" sorts first by name
        training._save(FolderOnlySession(), tmp_path, None, None, scheduler, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-100000000", "step-99999999"]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["dir"] == "step-100000000"
    # latest.json naming an older checkpoint (a run resumed from it) keeps it too
    atomic_write_text(tmp_path / "checkpoints" / "latest.json", json.dumps({"dir": "step-99999999", "step": 1}))
    for step in (100_000_001, 100_000_002):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir()
    run_folder.rotate(tmp_path, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-100000002", "step-99999999"]


def test_resume_with_another_recipe_is_refused_naming_the_keys(tmp_path, shared_inputs):
    out = tmp_path / "run"
    training.train(tiny_config(out, max_steps=2, save_every=2, **shared_inputs))
    stored = (out / "run_config.json").read_text()
    with pytest.raises(ValueError) as refused:
        training.train(tiny_config(out, max_steps=2, resume=True, save_every=2, lr=1e-3, seed=3, **shared_inputs))
    message = str(refused.value)
    assert "\n" not in message
    assert "lr (stored 0.005, given 0.001), seed (stored 0, given 3)" in message
    assert (out / "run_config.json").read_text() == stored
    # a longer run (and another checkpoint interval) is the same recipe
    training.train(tiny_config(out, max_steps=3, resume=True, save_every=1, **shared_inputs))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 3


def test_resume_with_only_resume_and_out_continues_the_stored_recipe(tmp_path, shared_inputs):
    """`--resume --out RUN` alone takes every value it is not given from run_config.json (a
    flag that differs from it is still refused)."""
    out = tmp_path / "run"
    training.train(tiny_config(out, max_steps=2, save_every=1, **shared_inputs))
    training.main(["--resume", "--out", str(out), "--max-steps", "3"])
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    stored = json.loads((out / "run_config.json").read_text())
    assert stored["lr"] == 5e-3 and stored["max_steps"] == 3 and stored["micro_batch"] == 4
    with pytest.raises(SystemExit):
        training.main(["--resume", "--out", str(out), "--max-steps", "4", "--micro-batch", "8"])


def test_resume_survives_a_torn_log_a_damaged_pointer_and_a_damaged_newest_checkpoint(tmp_path, shared_inputs,
                                                                                      caplog):
    out = tmp_path / "run"
    settings = dict(save_every=1, keep_checkpoints=3, micro_batch=8, **shared_inputs)
    training.train(tiny_config(out, max_steps=4, **settings))
    unbroken = read_log(out)
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 1.')                                  # torn
    (out / "checkpoints" / "latest.json").write_text('{"dir": "step-00')      # torn
    for shard in (out / "checkpoints" / "step-0000004" / "dcp").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])                             # truncated
    (out / "checkpoints" / "step-0000005" / "dcp").mkdir(parents=True)          # killed before extra.pt
    leftovers = [out / ".adapters.safetensors.k1lled.tmp", out / "checkpoints" / "step-0000003" / ".extra.pt.x.tmp"]
    for path in leftovers:
        path.write_text("half")

    with caplog.at_level(logging.WARNING, logger="lavin_fast.train"):
        training.train(tiny_config(out, max_steps=5, resume=True, **settings))
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed[:3] == unbroken[:3] and resumed[3]["loss"] == unbroken[3]["loss"]   # step 4 replayed from 3
    assert "latest.json is damaged" in caplog.text
    assert ("resuming from step-0000003; skipped step-0000005: incomplete (no extra.pt); step-0000004: damaged"
            in caplog.text)
    assert "dropped unreadable line(s) 5" in caplog.text
    assert not any(path.exists() for path in leftovers)


def test_a_run_folder_moves_and_evaluates_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    training.train(tiny_config("runs/tiny", max_steps=1, micro_batch=8))   # its own data and backbones, inside
    saved = json.loads(Path("runs/tiny/run_config.json").read_text())
    assert saved["data_root"] == "data" and saved["tokenizer"].startswith("backbones/")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    os.replace(tmp_path / "runs" / "tiny", moved)
    (tmp_path / "another-cwd").mkdir()
    monkeypatch.chdir(tmp_path / "another-cwd")
    cli.main(["eval", "--run", str(moved), "--split", "test", "--limit", "2", "--max-new-tokens", "2",
              "--batch-size", "2"])
    assert len(json.loads((moved / "eval-test" / "predictions.json").read_text())) == 2


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, shared_inputs, monkeypatch):
    original, calls = LaVIN.loss, []

    def nan_at_the_third_step(self, batch):       # one micro-batch per step
        calls.append(batch)
        loss = original(self, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(LaVIN, "loss", nan_at_the_third_step)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^step 3: the loss is nan; .*step-0000002, is kept"):
        training.train(tiny_config(out, max_steps=4, save_every=2, micro_batch=8, **shared_inputs))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert not (out / "adapters.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000002"]
    kept = adapter_tensors(out / "checkpoints" / "step-0000002" / "adapters.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_a_non_finite_gradient_stops_the_run_before_the_adapters_take_it(tmp_path, shared_inputs, monkeypatch):
    original = training.build_model

    def with_a_nan_gradient(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        model.llama.layers[0].adapter_attn.conv_A.weight.register_hook(lambda grad: torch.full_like(grad, math.nan))
        return model, tokenizer

    monkeypatch.setattr(training, "build_model", with_a_nan_gradient)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^step 1: 1 gradient\(s\) are not finite; .*no checkpoint was written"):
        training.train(tiny_config(out, max_steps=1, micro_batch=8, **shared_inputs))
    assert not (out / "adapters.safetensors").exists() and not (out / "checkpoints").exists()
