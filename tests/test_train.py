"""The trainer (`python -m lavin_fast.train`): the loss falls, a resumed run equals an unbroken
one, exactly the adapters train, and the configuration, log and checkpoints are as documented."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from lavin_fast import recipe
from lavin_fast import train as training
from lavin_fast.models.lavin import LaVINConfig


def tiny_config(out, **overrides) -> training.TrainConfig:
    """A few steps of the tiny model on the fake data (random frozen backbones, made once per out)."""
    values = dict(preset="tiny", fake_data=True, out=str(out), effective_batch=8, micro_batch=4, epochs=1,
                  progress=False, lr=5e-3, warmup_epochs=0.1)
    return training.TrainConfig(**{**values, **overrides})


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.fixture(scope="module")
def shared_inputs(tmp_path_factory):
    """Data, tokenizer and backbones written once; each test's run points at them."""
    out = tmp_path_factory.mktemp("prepared")
    cfg = training.prepare_embedded_default(tiny_config(out))
    return {key: getattr(cfg, key) for key in ("data_root", "tokenizer", "llama", "clip")}


def test_loss_falls_on_the_fake_data(tmp_path, shared_inputs):
    out = tmp_path / "run"
    training.train(tiny_config(out, max_steps=30, **shared_inputs))
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 30
    # The backbones are random (frozen): the adapters alone take ~0.7 nats off in 30 steps;
    # step-to-step noise is under 0.1.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    for name in ("run_config.json", "loss.png", "adapters.safetensors", "checkpoints/latest.json"):
        assert (out / name).is_file(), name


def test_log_records_and_run_config(tmp_path, shared_inputs):
    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=3, **shared_inputs)
    training.train(cfg)
    records = read_log(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert {"step", "loss", "lr", "answer_tokens", "epoch", "seconds"} <= set(record)
        assert math.isfinite(record["loss"]) and record["answer_tokens"] > 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved == dataclasses.asdict(cfg)


def test_trainable_set_is_exactly_adapters_neck_and_modality_embedding(tmp_path, shared_inputs):
    cfg = tiny_config(tmp_path, **shared_inputs)
    model, tokenizer = training.build_model(cfg, torch.device("cpu"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers, blocks = model.config.llama.n_layers, model.config.vit.layers
    parts = ("conv_A.weight", "conv_A.bias", "conv_B.weight", "conv_B.bias", "conv_D.weight", "conv_D.bias",
             "expert_weights.weight", "expert_weights.bias")
    expected = {f"llama.layers.{i}.adapter_attn.{p}" for i in range(layers) for p in parts}
    expected |= {f"vit.blocks.{i}.adapter_attn.{p}" for i in range(blocks) for p in parts}
    expected |= {f"adapter_proj.conv_{x}.{p}" for x in "AB" for p in ("weight", "bias")}
    expected |= {"adapter_modality_embedding.weight"}
    assert trainable == expected
    optimizer = recipe.build_optimizer(model, 1e-3)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    # and training moves exactly those
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = tmp_path / "run"
    training.train(tiny_config(out, max_steps=2, **shared_inputs))
    after = adapter_tensors(out / "adapters.safetensors")
    assert set(after) == expected
    assert any(not torch.equal(after[name], before[name]) for name in expected)


class Interrupted(Exception):
    pass


def test_a_resumed_run_equals_an_unbroken_one(tmp_path, shared_inputs, monkeypatch):
    """Dropout on (RNG state restored), several micro-batches per step, checkpoints every 3 steps;
    the interrupted run dies after logging step 4 (its last checkpoint is step 3)."""
    settings = dict(max_steps=8, save_every=3, adapter_dropout=0.2, **shared_inputs)
    unbroken = tmp_path / "unbroken"
    training.train(tiny_config(unbroken, **settings))

    broken = tmp_path / "broken"
    original = recipe.micro_batches

    def dies_at_step_4(*args, **kwargs):
        for step, micro in original(*args, **kwargs):
            if step == 4:
                raise Interrupted
            yield step, micro

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "micro_batches", dies_at_step_4)
        with pytest.raises(Interrupted):
            training.train(tiny_config(broken, **settings))
    assert [r["step"] for r in read_log(broken)] == [1, 2, 3, 4]
    assert json.loads((broken / "checkpoints" / "latest.json").read_text())["step"] == 3

    training.train(tiny_config(broken, resume=True, **settings))
    expected, resumed = read_log(unbroken), read_log(broken)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(expected, resumed):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a, b)
    final_a, final_b = adapter_tensors(unbroken / "adapters.safetensors"), adapter_tensors(broken / "adapters.safetensors")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    assert len(list((broken / "checkpoints").glob("step-*"))) == 2     # keep_checkpoints


def test_the_global_batch_does_not_depend_on_the_micro_batch(tmp_path, shared_inputs):
    """The loss is the mean over all answer tokens of a step: micro-batches of 8 or of 2 give the
    same step (to rounding)."""
    settings = dict(max_steps=3, adapter_dropout=0.0, **shared_inputs)
    training.train(tiny_config(tmp_path / "a", micro_batch=8, **settings))
    training.train(tiny_config(tmp_path / "b", micro_batch=2, **settings))
    for a, b in zip(read_log(tmp_path / "a"), read_log(tmp_path / "b")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    final_a, final_b = adapter_tensors(tmp_path / "a" / "adapters.safetensors"), adapter_tensors(
        tmp_path / "b" / "adapters.safetensors")
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-4, atol=1e-6, msg=key)


# Three steps of 8 samples without dropout (its masks follow the layout), in micro-batches of 4.
COMPARED = dict(max_steps=3, adapter_dropout=0.0, micro_batch=4)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, shared_inputs):
    """The folder of a packed (default) run of the COMPARED settings, which layouts are held against."""
    out = tmp_path_factory.mktemp("packed") / "run"
    training.train(tiny_config(out, **COMPARED, **shared_inputs))
    return out


def test_a_packed_run_logs_the_losses_of_a_padded_one(tmp_path, shared_inputs, packed_run):
    """Packing (the default) changes the layout of each micro-batch, not the step: the same
    losses and adapters as --no-packing."""
    training.train(tiny_config(tmp_path / "padded", packing=False, **COMPARED, **shared_inputs))
    packed, padded = read_log(packed_run), read_log(tmp_path / "padded")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-5)
    assert [r["answer_tokens"] for r in packed] == [r["answer_tokens"] for r in padded]
    final_packed = adapter_tensors(packed_run / "adapters.safetensors")
    final_padded = adapter_tensors(tmp_path / "padded" / "adapters.safetensors")
    for key in final_padded:
        torch.testing.assert_close(final_packed[key], final_padded[key], rtol=1e-4, atol=1e-6, msg=key)


def test_micro_batches_by_token_budget_log_the_losses_of_fixed_ones(tmp_path, shared_inputs, packed_run):
    """--max-tokens cuts each step's samples by tokens, not by count (here all 8 samples of
    about 70 tokens in one row of 600): the step keeps its --effective-batch samples, so its
    loss (the mean over the step's answer tokens) and the adapters are those of fixed
    micro-batches; the log records how full they were."""
    training.train(tiny_config(tmp_path / "budget", **{**COMPARED, "max_tokens": 600}, **shared_inputs))
    fixed, budget = read_log(packed_run), read_log(tmp_path / "budget")
    assert [r["loss"] for r in budget] == pytest.approx([r["loss"] for r in fixed], rel=1e-5)
    assert [r["answer_tokens"] for r in budget] == [r["answer_tokens"] for r in fixed]
    assert all(0 < r["fill"] <= 1 for r in budget) and "fill" not in fixed[0]
    final_fixed = adapter_tensors(packed_run / "adapters.safetensors")
    final_budget = adapter_tensors(tmp_path / "budget" / "adapters.safetensors")
    for key in final_fixed:
        torch.testing.assert_close(final_budget[key], final_fixed[key], rtol=1e-4, atol=1e-6, msg=key)


def test_config_file_with_command_line_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"preset": "tiny", "micro_batch": 2, "epochs": 3, "fake_data": True}))
    args = training.build_parser().parse_args(["--config", str(path), "--epochs", "5", "--no-fake-data",
                                               "--lr", "0.002"])
    cfg = training.config_from_args(args)
    assert (cfg.preset, cfg.micro_batch, cfg.epochs, cfg.fake_data, cfg.lr) == ("tiny", 2, 5, False, 0.002)
    assert cfg.effective_batch == 32 and cfg.base_lr == 9e-3 and cfg.weight_decay == 0.02   # the paper's recipe
    path.write_text(json.dumps({"preset": "tiny", "epoch": 3}))
    with pytest.raises(ValueError, match=r"unknown keys: \['epoch'\]"):
        training.config_from_args(training.build_parser().parse_args(["--config", str(path)]))
    path.write_text(json.dumps({"epochs": "5"}))
    with pytest.raises(ValueError, match=r"epochs should be int, got '5'"):
        training.config_from_args(training.build_parser().parse_args(["--config", str(path)]))
    path.write_text(json.dumps({"lr": 1, "fake_data": True}))      # an int where a float goes is fine
    assert training.config_from_args(training.build_parser().parse_args(["--config", str(path)])).lr == 1
    with pytest.raises(ValueError, match="data must be one of"):
        training.TrainConfig(data="coco")


def test_missing_checkpoints_and_data_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="missing --llama, --clip, --tokenizer"):
        training.build_model(training.TrainConfig(preset="7b"), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs --data-root"):
        training.build_dataset(training.TrainConfig())
    with pytest.raises(ValueError, match="needs --alpaca"):
        training.build_dataset(training.TrainConfig(data="chatbot"))


def test_tiny_preset_matches_the_written_backbones(shared_inputs):
    cfg = tiny_config("unused", **shared_inputs)
    model, tokenizer = training.build_model(cfg, torch.device("cpu"))
    tiny = LaVINConfig.from_preset("tiny")
    assert model.config.llama.vocab_size == tokenizer.n_words
    assert (model.config.llama.dim, model.config.vit.width) == (tiny.llama.dim, tiny.vit.width)
    assert model.config.image_tokens == 6
