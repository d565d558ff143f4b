"""lavin_fast.checkpoints.adapters: the lavin_fast adapter file (safetensors + metadata), the
reference's checkpoint-E.pth, strictness, safe unpickling and atomic writes.

Reference names are written out here by walking the model's modules, independently of the
mapping functions under test (REFERENCE.md section 8)."""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lavin_fast
from lavin_fast.checkpoints import adapters
from lavin_fast.checkpoints.adapters import (
    FORMAT_TAG,
    from_reference_name,
    load_adapters,
    read_adapter_config,
    read_reference_args,
    save_adapter_state,
    save_adapters,
    to_reference_name,
)
from lavin_fast.checkpoints.strict import CheckpointError
from lavin_fast.models.lavin import LaVIN, LaVINConfig
from lavin_fast.models.llama import LlamaConfig

from helpers import requires_cuda

ADAPTER_PARTS = [f"{conv}.{kind}" for conv in ("conv_A", "conv_B", "conv_D", "expert_weights")
                 for kind in ("weight", "bias")]
NECK_PARTS = [f"{conv}.{kind}" for conv in ("conv_A", "conv_B") for kind in ("weight", "bias")]
TINY = LaVINConfig.from_preset("tiny")  # expected values below follow the preset, whatever it holds


def tiny(**overrides) -> LaVIN:
    return LaVIN(LaVINConfig.from_preset("tiny", **overrides))


def randomize(model: LaVIN, seed: int) -> LaVIN:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def adapter_values(model: LaVIN) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "adapter" in n}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def param(module: torch.nn.Module, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def reference_state(model: LaVIN, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """What the reference's save_model writes for `model`'s values, with its own key names."""
    state = {}
    for n, layer in enumerate(model.llama.layers):
        for part in ADAPTER_PARTS:
            state[f"{prefix}layers.{n}.adapter_attn.{part}"] = param(layer.adapter_attn, part).detach().clone()
    for n, block in enumerate(model.vit.blocks):
        for part in ADAPTER_PARTS:
            state[f"{prefix}backbone.visual.transformer.resblocks.{n}.adapter_attn.{part}"] = (
                param(block.adapter_attn, part).detach().clone())
    for part in NECK_PARTS:
        state[f"{prefix}adapter_proj.{part}"] = param(model.adapter_proj, part).detach().clone()
    state[f"{prefix}adapter_modality_embedding.weight"] = model.adapter_modality_embedding.weight.detach().clone()
    return state


def reference_checkpoint(state: dict[str, torch.Tensor], args: object = "default") -> dict:
    """The reference's checkpoint-E.pth layout: model, optimizer, epoch, scaler, args."""
    if args == "default":
        args = argparse.Namespace(temperature=10.0, adapter_scale=1.0, adapter_dim=TINY.adapter_hidden,
                                  hidden_proj=TINY.neck_hidden,
                                  adapter_type="attn", visual_adapter_type="router", llm_model="7B",
                                  blr=9e-3, output_dir="./LaVIN-7B/", bits="16bit")
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.02,
                          "amsgrad": False, "foreach": None, "maximize": False, "params": [0]}],
    }
    return {"model": state, "optimizer": optimizer, "epoch": 19, "scaler": {"scale": 65536.0}, "args": args}


# ---- the lavin_fast file -----------------------------------------------------------------------------

def test_round_trip_exact_keys_fp32_and_metadata(tmp_path):
    source = randomize(tiny(), seed=1)
    path = save_adapters(source, tmp_path / "adapters.safetensors")
    target = tiny()
    before = adapter_values(target)
    load_adapters(target, path)
    assert_same(adapter_values(target), adapter_values(source))
    assert any(not torch.equal(before[k], adapter_values(target)[k]) for k in before)  # it did load

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
        metadata = handle.metadata()
    assert keys == set(source.trainable_state_dict())                      # exactly the trainables
    assert sum(param(source, k).numel() for k in keys) == source.num_trainable()
    assert dtypes == {torch.float32}
    assert metadata["format"] == FORMAT_TAG and metadata["format_version"] == "1"
    assert metadata["lavin_fast_version"] == lavin_fast.__version__
    assert json.loads(metadata["temperature"]) == 10.0
    assert json.loads(metadata["adapter_scale"]) == 1.0
    assert metadata["neck_activation"] == "silu"
    assert read_adapter_config(path) == source.config
    assert LaVINConfig.from_dict(json.loads(metadata["config"])) == source.config


def test_non_default_config_round_trips_through_metadata(tmp_path):
    config = LaVINConfig.from_preset("tiny", temperature=5.0, adapter_scale=0.5, neck_activation="swiglu",
                                     adapter_hidden=2 * TINY.adapter_hidden, neck_hidden=2 * TINY.neck_hidden)
    source = randomize(LaVIN(config), seed=2)
    path = save_adapters(source, tmp_path / "a.safetensors")
    assert read_adapter_config(path) == config
    target = LaVIN(read_adapter_config(path))      # what load_lavin will do
    load_adapters(target, path)
    assert_same(adapter_values(target), adapter_values(source))
    assert target.llama.layers[0].adapter_attn.temperature == 5.0


def test_bf16_backbone_saves_and_loads_fp32(tmp_path):
    source = randomize(tiny(), seed=3).set_backbone_dtype(torch.bfloat16)
    assert source.llama.layers[0].attention.wq.weight.dtype == torch.bfloat16
    path = save_adapters(source, tmp_path / "a.safetensors")
    target = tiny().set_backbone_dtype(torch.bfloat16)
    load_adapters(target, path)
    assert_same(adapter_values(target), adapter_values(source))
    assert {p.dtype for p in adapter_values(target).values()} == {torch.float32}


@requires_cuda
def test_cuda_parameters_save_and_load_in_place(tmp_path):
    source = randomize(tiny(), seed=4).cuda()
    path = save_adapters(source, tmp_path / "a.safetensors")
    target = tiny().cuda()
    load_adapters(target, path)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in adapter_values(target).values())
    assert_same(adapter_values(target), adapter_values(source))


def test_7b_and_13b_key_sets_sizes_and_reference_names(tmp_path):
    with torch.device("meta"):
        model7 = LaVIN(LaVINConfig.from_preset("7b"))
        model13 = LaVIN(LaVINConfig.from_preset("13b"))
    state7 = model7.trainable_state_dict()
    assert sum(p.numel() for p in state7.values()) == 3_781_296
    assert sum(p.numel() for p in model13.trainable_state_dict().values()) == 5_390_080

    refs = {to_reference_name(name) for name in state7}
    assert len(refs) == len(state7)
    assert sum(r.startswith("layers.") for r in refs) == 32 * 8
    assert sum(r.startswith("backbone.visual.transformer.resblocks.") for r in refs) == 24 * 8
    assert "layers.31.adapter_attn.conv_D.weight" in refs
    assert "backbone.visual.transformer.resblocks.23.adapter_attn.expert_weights.bias" in refs
    assert {"adapter_proj.conv_A.weight", "adapter_modality_embedding.weight"} <= refs
    assert all(from_reference_name("module." + to_reference_name(n)) == n for n in state7)

    # The real 7B file (~15 MB of float32, written in well under a second).
    zeros = {name: torch.zeros(p.shape) for name, p in state7.items()}
    path = save_adapter_state(zeros, model7.config, tmp_path / "lavin-7b.safetensors")
    payload = 3_781_296 * 4
    assert payload <= path.stat().st_size <= payload + 200_000                 # + the JSON header
    assert read_adapter_config(path) == model7.config


def test_save_adapter_state_checks_keys_and_tensors(tmp_path):
    model = tiny()
    state = dict(model.trainable_state_dict())
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): adapter_modality_embedding.weight"):
        save_adapter_state({k: v for k, v in state.items() if "modality" not in k}, model.config, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): module.extra"):
        save_adapter_state({**state, "module.extra": torch.zeros(1)}, model.config, tmp_path / "a")
    with pytest.raises(ValueError, match="meta device"):
        save_adapter_state({**state, "adapter_proj.conv_A.bias": torch.empty(TINY.neck_hidden, device="meta")},
                           model.config, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []                                       # nothing written


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_adapters(randomize(tiny(), seed=5), tmp_path / "a.safetensors")
    old_bytes = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 1000)   # a partly written file ...
        raise OSError("disk full")                   # ... then the writer dies

    monkeypatch.setattr(adapters, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(randomize(tiny(), seed=6), path)
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


# ---- hyper-parameters and bad files ------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"temperature": 5.0}, "file has temperature 10.0, model 5.0"),
    ({"adapter_scale": 0.5}, "file has adapter_scale 1.0, model 0.5"),
    ({"neck_activation": "swiglu"}, "file has neck_activation 'silu', model 'swiglu'"),
    ({"adapter_hidden": 2 * TINY.adapter_hidden},
     f"file has adapter_hidden {TINY.adapter_hidden}, model {2 * TINY.adapter_hidden}"),
    ({"neck_hidden": 2 * TINY.neck_hidden}, f"file has neck_hidden {TINY.neck_hidden}, model {2 * TINY.neck_hidden}"),
    ({"llama": LlamaConfig.from_preset("tiny", dim=2 * TINY.llama.dim)},
     f"file has llama.dim {TINY.llama.dim}, model {2 * TINY.llama.dim}"),
])
def test_mismatched_hyper_parameters_fail_clearly(tmp_path, overrides, message):
    path = save_adapters(tiny(), tmp_path / "a.safetensors")
    target = tiny(**overrides)
    before = adapter_values(target)
    with pytest.raises(CheckpointError) as error:
        load_adapters(target, path)
    assert message in str(error.value)
    assert_same(adapter_values(target), before)                                 # untouched


def test_non_strict_warns_on_hyper_parameters_and_keeps_the_models(tmp_path):
    source = randomize(tiny(), seed=7)
    path = save_adapters(source, tmp_path / "a.safetensors")
    target = tiny(temperature=5.0)
    with pytest.warns(UserWarning, match="file has temperature 10.0, model 5.0"):
        load_adapters(target, path, strict=False)
    assert_same(adapter_values(target), adapter_values(source))
    assert target.llama.layers[0].adapter_attn.temperature == 5.0


def test_wrong_and_missing_files_fail_clearly(tmp_path):
    model = tiny()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapters(model, tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_adapters(model, tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a lavin_fast adapter file"):
        load_adapters(model, text)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a lavin_fast adapter file"):
        load_adapters(model, foreign)
    with pytest.raises(CheckpointError, match="not a lavin_fast adapter file"):
        read_adapter_config(foreign)
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a reference LaVIN checkpoint"):
        load_adapters(model, plain)
    with pytest.raises(CheckpointError, match="stores no LaVINConfig"):
        read_adapter_config(plain)


def test_future_format_and_inconsistent_metadata_are_refused(tmp_path):
    model = tiny()
    state = {k: v.detach() for k, v in model.trainable_state_dict().items()}
    metadata = adapters._metadata(model.config)
    newer = tmp_path / "newer.safetensors"
    save_file(state, str(newer), metadata={**metadata, "format_version": "2"})
    with pytest.raises(CheckpointError, match="format version 2"):
        load_adapters(model, newer)
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd), metadata={**metadata, "temperature": "5.0"})
    with pytest.raises(CheckpointError, match="inconsistent: metadata temperature 5.0"):
        read_adapter_config(odd)



@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_the_tensor(tmp_path, value):
    """In both formats: a diverged run's NaN/Inf adapters would make every answer NaN. Refused
    before anything is copied: the model keeps its values."""
    donor = randomize(tiny(), seed=11)
    with torch.no_grad():
        donor.vit.blocks[2].adapter_attn.conv_B.weight[0, 0] = value
    ours = save_adapters(donor, tmp_path / "diverged.safetensors")
    reference = tmp_path / "checkpoint-3.pth"
    torch.save(reference_checkpoint(reference_state(donor)), reference)
    for path, named in [(ours, "vit.blocks.2.adapter_attn.conv_B.weight"),
                        (reference, "module.backbone.visual.transformer.resblocks.2.adapter_attn.conv_B.weight")]:
        model = tiny()
        before = adapter_values(model)
        message = re.escape(str(path)) + ".*" + re.escape(named) + ".* 1 NaN or infinite"
        with pytest.raises(CheckpointError, match=message):
            load_adapters(model, path)
        assert_same(adapter_values(model), before)

def test_loading_into_a_meta_model_is_refused(tmp_path):
    path = save_adapters(tiny(), tmp_path / "a.safetensors")
    with torch.device("meta"):
        model = tiny()
    with pytest.raises(ValueError, match="meta device"):
        load_adapters(model, path)


# ---- the reference's checkpoint-E.pth -----------------------------------------------------------------

def test_reference_checkpoint_lands_in_the_right_parameters(tmp_path):
    donor = randomize(tiny(), seed=8)
    ref = reference_state(donor)
    ref["module.adapter_modality_embedding.weight"] = ref["module.adapter_modality_embedding.weight"].half()
    path = tmp_path / "checkpoint-19.pth"
    torch.save(reference_checkpoint(ref), path)

    model = tiny()
    load_adapters(model, path)
    checks = {
        "module.layers.2.adapter_attn.conv_D.weight": model.llama.layers[2].adapter_attn.conv_D.weight,
        "module.layers.0.adapter_attn.expert_weights.weight": model.llama.layers[0].adapter_attn.expert_weights.weight,
        "module.backbone.visual.transformer.resblocks.3.adapter_attn.expert_weights.bias":
            model.vit.blocks[3].adapter_attn.expert_weights.bias,
        "module.backbone.visual.transformer.resblocks.5.adapter_attn.conv_A.weight":
            model.vit.blocks[5].adapter_attn.conv_A.weight,
        "module.adapter_proj.conv_B.weight": model.adapter_proj.conv_B.weight,
        "module.adapter_modality_embedding.weight": model.adapter_modality_embedding.weight,
    }
    for key, target in checks.items():
        assert torch.equal(target, ref[key].float()), key
    assert model.adapter_modality_embedding.weight.dtype == torch.float32   # kept fp32 though stored fp16
    expected = adapter_values(donor)
    expected["adapter_modality_embedding.weight"] = ref["module.adapter_modality_embedding.weight"].float()
    assert_same(adapter_values(model), expected)
    assert read_reference_args(path)["temperature"] == 10.0


@pytest.mark.parametrize("variant", ["no_module_prefix", "args_as_dict", "no_args", "legacy_format"])
def test_reference_checkpoint_variants(tmp_path, variant):
    donor = randomize(tiny(), seed=9)
    prefix = "" if variant == "no_module_prefix" else "module."
    args = {"args_as_dict": {"temperature": 10.0}, "no_args": None}.get(variant, "default")
    checkpoint = reference_checkpoint(reference_state(donor, prefix), args)
    checkpoint["model"]["module.layers.0.attention.wq.weight"] = torch.zeros(3)   # not an adapter: ignored
    path = tmp_path / "checkpoint-0.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=variant != "legacy_format")
    model = tiny()
    load_adapters(model, path)
    assert_same(adapter_values(model), adapter_values(donor))


def test_reference_missing_key_is_named(tmp_path):
    ref = reference_state(randomize(tiny(), seed=10))
    del ref["module.layers.1.adapter_attn.conv_B.bias"]
    path = tmp_path / "checkpoint-1.pth"
    torch.save(reference_checkpoint(ref), path)
    model = tiny()
    before = adapter_values(model)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): module.layers.1.adapter_attn.conv_B.bias"):
        load_adapters(model, path)
    assert_same(adapter_values(model), before)                                 # nothing half-loaded

    # strict=False: the rest loads, the missing one is reported.
    with pytest.warns(UserWarning, match="module.layers.1.adapter_attn.conv_B.bias"):
        load_adapters(model, path, strict=False)
    assert torch.equal(model.llama.layers[1].adapter_attn.conv_B.weight,
                       ref["module.layers.1.adapter_attn.conv_B.weight"])
    assert torch.equal(model.llama.layers[1].adapter_attn.conv_B.bias, before["llama.layers.1.adapter_attn.conv_B.bias"])


def test_reference_misshaped_and_unexpected_keys_are_named(tmp_path):
    ref = reference_state(tiny())
    key = "module.backbone.visual.transformer.resblocks.2.adapter_attn.conv_A.weight"
    ref[key] = torch.zeros(2 * TINY.adapter_hidden, ref[key].shape[1], 1)
    ref["module.layers.9.adapter_attn.conv_A.bias"] = torch.zeros(8)
    path = tmp_path / "checkpoint-2.pth"
    torch.save(reference_checkpoint(ref), path)
    with pytest.raises(CheckpointError) as error:
        load_adapters(tiny(), path)
    message = str(error.value)
    assert f"{key}: checkpoint ({2 * TINY.adapter_hidden}, " in message
    assert "unexpected keys (1): module.layers.9.adapter_attn.conv_A.bias" in message
    with pytest.raises(CheckpointError, match="mismatched shapes"):              # even when not strict
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_adapters(tiny(), path, strict=False)


@pytest.mark.parametrize("args, overrides, message", [
    (argparse.Namespace(temperature=5.0), {}, "file has temperature 5.0 (args.temperature), model 10.0"),
    (argparse.Namespace(adapter_scale=0.1), {}, "file has adapter_scale 0.1 (args.adapter_scale), model 1.0"),
    (argparse.Namespace(adapter_dim=2 * TINY.adapter_hidden), {},
     f"file has adapter_hidden {2 * TINY.adapter_hidden} (args.adapter_dim), model {TINY.adapter_hidden}"),
    (argparse.Namespace(temperature=10.0), {"neck_activation": "swiglu"}, "file has neck_activation 'silu'"),
])
def test_reference_hyper_parameters_from_args_are_checked(tmp_path, args, overrides, message):
    path = tmp_path / "checkpoint-3.pth"
    torch.save(reference_checkpoint(reference_state(tiny()), args), path)
    with pytest.raises(CheckpointError) as error:
        load_adapters(tiny(**overrides), path)
    assert message in str(error.value)


_RAN: list[str] = []


def _side_effect(what: str) -> str:
    _RAN.append(what)
    return what


class Payload:
    """Unpickling this calls `_side_effect`: what weights_only=False would let happen."""

    def __reduce__(self):
        return (_side_effect, ("code ran",))


def test_reference_loading_is_weights_only(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    good = tmp_path / "checkpoint-4.pth"
    torch.save(reference_checkpoint(reference_state(tiny())), good)
    load_adapters(tiny(), good)
    assert calls and all(flag is True for flag in calls)

    bad = tmp_path / "checkpoint-5.pth"
    torch.save(reference_checkpoint(reference_state(tiny()), args=Payload()), bad)
    with pytest.raises(CheckpointError, match=r"not allowed .*_side_effect"):
        load_adapters(tiny(), bad)
    assert _RAN == []
    assert all(flag is True for flag in calls)
