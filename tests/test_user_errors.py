"""A user's mistake gets one line, `lavin-fast: error: ...` on stderr with exit code 2, before
anything loads; values that can only train on NaN are refused; the modules refuse what would
divide by zero and handle empty inputs (issue 10, sections 3 and 5)."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavin_fast import MMAdapter, cli, mm_adapter, scienceqa
from lavin_fast import evaluate as evaluation
from lavin_fast import train as training
from lavin_fast.collate import IGNORE, Batch
from lavin_fast.errors import UserError
from lavin_fast.models.lavin import LaVIN, LaVINConfig

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", "triton"]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make every way to a model (or to the files the tiny preset writes) fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built (or its files written) before the mistake was refused")

    monkeypatch.delenv("LAVIN_FAST_DEBUG", raising=False)
    monkeypatch.setattr(training, "prepare_embedded_default", refuse)
    monkeypatch.setattr(training, "build_model", refuse)
    monkeypatch.setattr(cli, "_load", refuse)


def one_line_error(capsys, run) -> str:
    """Run `run()`, expect exit code 2 and a single `lavin-fast: error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lavin-fast: error: "), lines
    return lines[0]


# ---- section 3: refused before any model is built ------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-2"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "1e30"], "--lr"),
    (["--base-lr", "1e30"], "--base-lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--max-steps", "0"], "--max-steps"),
    (["--save-every", "-1"], "--save-every"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    (["--effective-batch", "0"], "--effective-batch"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--micro-batch", "3"], "--micro-batch"),            # 32 is not a multiple of 3
    (["--adapter-dropout", "1"], "--adapter-dropout"),
    (["--max-len", "0"], "--max-len"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "511"], "--max-len"),                 # a 512-token sample would fit no micro-batch
    (["--max-tokens", "1024", "--no-packing"], "--packing"),
    (["--max-tokens", "1025", "--tp", "2", "--sequence-parallel"], "--tp"),
    (["--max-tokens", "1024", "--dp", "3"], "--dp"),        # 32 samples do not split over 3 ranks
])
def test_train_refuses_values_that_cannot_train_before_building_anything(flags, named, tmp_path, capsys,
                                                                          nothing_loads):
    out = tmp_path / "run"
    line = one_line_error(capsys, lambda: training.main(
        ["--preset", "tiny", "--fake-data", "--no-progress", "--out", str(out), *flags]))
    assert named in line
    assert not out.exists()


def test_lavin_fast_train_refuses_the_same_way(tmp_path, capsys, nothing_loads):
    line = one_line_error(capsys, lambda: cli.main(
        ["train", "--preset", "tiny", "--fake-data", "--out", str(tmp_path / "run"), "--lr", "inf"]))
    assert "--lr must be a finite number > 0, got inf" in line


def test_a_config_file_value_is_checked_like_a_flag(tmp_path, capsys, nothing_loads):
    config = tmp_path / "recipe.json"
    config.write_text('{"preset": "tiny", "fake_data": true, "temperature": 0.0}')
    line = one_line_error(capsys, lambda: training.main(["--config", str(config), "--out", str(tmp_path / "run")]))
    assert "--temperature" in line
    with pytest.raises(UserError, match="--warmup-epochs"):
        training.TrainConfig(warmup_epochs=math.inf)


@pytest.mark.parametrize("argv, named", [
    (["eval", "--limit", "-1"], "--limit"),
    (["eval", "--limit", "0"], "--limit"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--sampling-temperature", "-1"], "--sampling-temperature"),
    (["eval", "--top-p", "0"], "--top-p"),
    (["eval", "--split", "tset"], "--split"),
    (["generate", "--prompt", "hi", "--sampling-temperature", "nan"], "--sampling-temperature"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
])
def test_eval_and_generate_refuse_bad_values_before_loading_a_model(argv, named, tmp_path, capsys, nothing_loads):
    line = one_line_error(capsys, lambda: cli.main([*argv, "--run", str(tmp_path)]))
    assert named in line


# ---- section 3: the modules -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(groups=0), "groups"), (dict(groups=-2), "groups"),
])
def test_mm_adapter_refuses_a_temperature_or_groups_that_cannot_work(kwargs, named):
    with pytest.raises(ValueError, match=f"MMAdapter: {named}"):
        MMAdapter(16, hidden_dim=8, **kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_tokens_give_an_empty_output_and_zero_gradients(backend, dtype):
    torch.manual_seed(0)
    adapter = MMAdapter(16, hidden_dim=8, groups=2)
    for conv in (adapter.conv_B, adapter.conv_D):   # non-zero up-projections: not the identity
        torch.nn.init.normal_(conv.weight)
    params = [adapter.conv_A.weight, adapter.conv_A.bias, adapter.conv_B.weight, adapter.conv_B.bias,
              adapter.conv_D.weight, adapter.conv_D.bias]
    x = torch.randn(3, 0, 16, dtype=dtype, requires_grad=True)
    routing = torch.full((3, 2), 0.5, requires_grad=True)

    y = mm_adapter(x, *params, routing, groups=2, dropout=0.1)
    assert y.shape == (3, 0, 16) and y.dtype == dtype
    y.float().sum().backward()
    for tensor in (*params, routing):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor)), "a gradient of nothing must be zero"

    for weights in (None, routing):                    # the module, routed by itself or given weights
        y = adapter(x, weights)
        assert y.shape == (3, 0, 16) and y.dtype == dtype
        y.float().sum().backward()
    assert adapter.last_routing is not None and torch.equal(adapter.last_routing, routing.detach())
    adapter(x)
    assert adapter.last_routing is None                # nothing was routed


def test_loss_of_a_batch_without_answer_tokens_is_an_error_not_nan():
    torch.manual_seed(0)
    model = LaVIN(LaVINConfig.from_preset("tiny"))
    tokens = torch.randint(1, 100, (2, 12))
    batch = Batch(tokens=tokens, targets=torch.full_like(tokens, IGNORE), has_image=torch.tensor([False, False]),
                  images=None, image_start=2)
    with pytest.raises(ValueError, match="no answer tokens"):
        model.loss(batch)
    batch.targets[0, 5] = 7                            # one answer token: a finite loss
    assert torch.isfinite(model.loss(batch))


# ---- section 5: the command line speaks one line -------------------------------------------------------

@pytest.mark.parametrize("run", [
    lambda: cli.main(["train", "--preset", "tiny", "--fake-dat", "--max-steps", "2"]),
    lambda: training.main(["--preset", "tiny", "--fake-data", "--max-step", "2"]),
    lambda: cli.main(["eval", "--run", "somewhere", "--lim", "3"]),
], ids=["--fake-dat", "--max-step", "--lim"])
def test_abbreviated_flags_are_refused(run, capsys, nothing_loads):
    assert "unrecognized arguments: --" in one_line_error(capsys, run)


def test_a_run_folder_that_is_not_one_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LAVIN_FAST_DEBUG", raising=False)
    line = one_line_error(capsys, lambda: cli.main(["generate", "--run", str(tmp_path), "--prompt", "hi"]))
    assert f"{tmp_path} is not a training run folder" in line


def test_debug_shows_the_traceback_and_internal_bugs_keep_theirs(tmp_path, monkeypatch, nothing_loads):
    monkeypatch.setenv("LAVIN_FAST_DEBUG", "1")
    with pytest.raises(UserError, match="--max-steps"):
        training.main(["--max-steps", "0"])
    monkeypatch.delenv("LAVIN_FAST_DEBUG")

    def bug(cfg):
        raise ZeroDivisionError("a bug of lavin_fast")

    monkeypatch.setattr(training, "train", bug)
    with pytest.raises(ZeroDivisionError):
        training.main(["--preset", "tiny", "--fake-data", "--out", str(tmp_path)])


def test_python_m_lavin_fast_train_with_a_bad_flag_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LAVIN_FAST_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "lavin_fast.train", "--preset", "tiny", "--fake-data",
                           "--max-step", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "lavin-fast: error: unrecognized arguments: --max-step 2 (see python -m lavin_fast.train --help)"]
    assert not any(tmp_path.iterdir()), "nothing is written"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_lists_the_choices_and_says_one_sentence_per_flag(capsys):
    parsers = subcommands()
    expected = {"train": {"--preset": ("7b", "13b", "tiny"), "--data": training.DATASETS,
                          "--dtype": ("auto", "bf16", "fp16", "fp32"), "--neck-activation": ("silu", "swiglu"),
                          "--split": scienceqa.SPLITS},
                "eval": {"--preset": ("7b", "13b", "tiny"), "--dtype": ("auto", "bf16", "fp16", "fp32"),
                         "--split": scienceqa.SPLITS},
                "generate": {"--preset": ("7b", "13b", "tiny"), "--dtype": ("auto", "bf16", "fp16", "fp32")}}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            assert action.help and action.help[0].isupper() and "." in action.help, f"{name} {flag}: {action.help!r}"
        flags = {action.option_strings[0]: action for action in parser._actions}
        for flag, choices in expected.get(name, {}).items():
            assert tuple(flags[flag].choices) == choices, (name, flag)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    for choices in expected["train"].values():
        assert "{" + ",".join(choices) + "}" in printed


def test_router_and_sampling_temperatures_have_names_that_say_which(capsys, tmp_path, nothing_loads):
    parsers = subcommands()
    train_flags = {a.option_strings[0]: a for a in parsers["train"]._actions}
    assert "router" in train_flags["--temperature"].help.lower()
    for name in ("eval", "generate"):
        flags = {a.option_strings[0]: a for a in parsers[name]._actions}
        assert "--temperature" not in flags
        assert "sampling" in flags["--sampling-temperature"].help.lower()
    line = one_line_error(capsys, lambda: cli.main(["eval", "--run", str(tmp_path), "--temperature", "10"]))
    assert "unrecognized arguments: --temperature" in line


@pytest.mark.parametrize("parsed", [0, 1])
def test_eval_says_plainly_when_the_model_answered_nothing_parseable(parsed, tmp_path, capsys, monkeypatch):
    """The evaluation is scripted (all 5 answers unparsed, or one parsed): the CLI's summary
    follows from its result alone."""
    cfg = training.TrainConfig(preset="tiny", data_root=str(tmp_path / "sqa"))
    monkeypatch.setattr(cli, "_load", lambda args: (None, None, cfg))
    predictions = {f"q{i}": (0 if i < parsed else None) for i in range(5)}

    def scripted(*args, **kwargs):
        return evaluation.EvalResult({c: 0.0 for c in scienceqa.CATEGORIES}, 5 - parsed, predictions)

    monkeypatch.setattr(evaluation, "evaluate_scienceqa", scripted)
    cli.main(["eval", "--run", str(tmp_path), "--limit", "5"])
    printed = capsys.readouterr().out
    said = "The model answered none of the 5 questions" in printed and "untrained or barely trained" in printed
    assert said == (parsed == 0), printed
