"""Saving and loading LaVIN's trained parameters: the adapters, the neck, the modality embedding.

Two formats are read, one is written:

- **lavin_fast adapter file** (written by `save_adapters` / `save_adapter_state`): one
  safetensors file holding exactly the trainable parameters (every parameter whose name holds
  "adapter", REFERENCE.md section 4), in float32, under the model's own names
  (`llama.layers.N.adapter_attn.*`, `vit.blocks.N.adapter_attn.*`, `adapter_proj.*`,
  `adapter_modality_embedding.weight`): 3,781,296 values, about 15 MB, for 7B. Its string
  metadata holds the whole `LaVINConfig` as JSON (`config`), and, spelled out, the
  hyper-parameters the tensors do not carry: `adapter_scale`, `temperature`,
  `neck_activation`, `vit_routing`; plus a format tag (`format`, `format_version`) and the writing
  `lavin_fast_version`. Written atomically: a crash leaves the previous file or the new one.

- **reference checkpoint** `checkpoint-E.pth` (REFERENCE.md section 8): a `torch.save` of
  `{"model": {"module.<name>": tensor}, "optimizer", "epoch", "scaler", "args"}`, where "args"
  is the training script's `argparse.Namespace`. Read with `torch.load(weights_only=True)`,
  allowing `argparse.Namespace` and nothing else beyond torch's own safe set: a file that
  needs any other global (a class, a function) is refused, naming it, before anything in it
  can run. Only keys holding "adapter" are considered (the reference saves nothing else);
  the "module." prefix of DistributedDataParallel is optional.

Name mapping, ours <- reference (N = layer / block index):

| ours                                       | reference (after the optional `module.`)              |
|--------------------------------------------|-------------------------------------------------------|
| llama.layers.N.adapter_attn.<p>            | layers.N.adapter_attn.<p>                             |
| vit.blocks.N.adapter_attn.<p>              | backbone.visual.transformer.resblocks.N.adapter_attn.<p> |
| adapter_proj.{conv_A,conv_B}.{weight,bias} | adapter_proj.{conv_A,conv_B}.{weight,bias}            |
| adapter_modality_embedding.weight          | adapter_modality_embedding.weight                     |

with <p> one of conv_A / conv_B / conv_D / expert_weights, each .weight and .bias.

Scale and temperature: the reference's tensors do not carry them. Its "args" usually do
(`args.temperature`, `args.adapter_scale`, and the widths `args.adapter_dim`,
`args.hidden_proj`; the reference builds its routers from exactly these), and when present
they are checked against the model's config like a lavin_fast file's metadata. When absent,
the model keeps its own: the caller must build the config with the temperature the
checkpoint was trained with (10 for 7B, 5 for 13B: `LaVINConfig.from_preset("7b" | "13b")`).
The reference's neck is the SiLU one, so a reference file loads only into
`neck_activation="silu"`.

ViT routing (`LaVINConfig.vit_routing`): a lavin_fast file records the mode its adapters were
trained with; files written before the mode was recorded have none and were trained with
"cls" (each image routed by its CLS token), which is what they are read as. A reference
checkpoint was trained with the reference's routing, which is "token" at batch size 1 and
"batch0" at larger ones: it loads into a model of either. Loading into a model of any other
mode is refused, whatever `strict` says, unless the caller names the mode explicitly
(`load_adapters(..., vit_routing=model's mode)`).

Strictness (`strict=True`, the default): every missing, unexpected or mis-shaped key is an
error that lists them all in the file's own spelling, and so is every hyper-parameter that
differs. `strict=False` turns missing/unexpected keys and hyper-parameter differences into
warnings (the keys present are loaded, the model keeps its own hyper-parameters); a
mis-shaped key is an error either way (the reference's `strict=False` loading silently skips
them, REFERENCE.md section 9). Everything is checked before the first value is copied, so a
failed load leaves the model as it was. Values are copied into the existing parameters
(which keep their dtype, float32, and device).

Distributed training: `save_adapters` needs ordinary tensors. With DTensor parameters, gather
a full state dict first (e.g. `torch.distributed.checkpoint.state_dict.get_model_state_dict`
with `StateDictOptions(full_state_dict=True, cpu_offload=True)`), keep the "adapter" keys and
call `save_adapter_state` on one rank. Likewise load into the model before it is sharded.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lavin_fast._version import __version__
from lavin_fast.checkpoints.strict import CheckpointError, check_state_dict, torch_load
from lavin_fast.io import atomic_write
from lavin_fast.models.lavin import TRAINABLE_MARK, LaVIN, LaVINConfig

FORMAT_TAG = "lavin_fast.adapters"
FORMAT_VERSION = 1
# What a lavin_fast file without a recorded vit_routing was trained with (the only routing then).
UNRECORDED_VIT_ROUTING = "cls"
# The modes a reference checkpoint's ViT adapters saw: "token" is its routing at batch size 1.
REFERENCE_VIT_ROUTINGS = ("token", "batch0")

# The reference's globals that `torch.load(weights_only=True)` must let through: the
# training script's arguments. Nothing that can execute code on unpickling.
REFERENCE_SAFE_GLOBALS = (argparse.Namespace,)

# Reference "args" attribute -> LaVINConfig field: what the reference builds its adapters from.
REFERENCE_ARGS = {
    "temperature": "temperature",
    "adapter_scale": "adapter_scale",
    "adapter_dim": "adapter_hidden",
    "hidden_proj": "neck_hidden",
}

_LLAMA = re.compile(r"llama\.layers\.(\d+)\.(adapter_attn\..+)")
_VIT = re.compile(r"vit\.blocks\.(\d+)\.(adapter_attn\..+)")
_REF_LLAMA = re.compile(r"layers\.(\d+)\.(adapter_attn\..+)")
_REF_VIT = re.compile(r"backbone\.visual\.transformer\.resblocks\.(\d+)\.(adapter_attn\..+)")
_SHARED = ("adapter_proj.", "adapter_modality_embedding.")


# ---- names ----------------------------------------------------------------------------------------

def to_reference_name(name: str) -> str:
    """Our parameter name -> the reference's (without the "module." prefix)."""
    if match := _LLAMA.fullmatch(name):
        return f"layers.{match[1]}.{match[2]}"
    if match := _VIT.fullmatch(name):
        return f"backbone.visual.transformer.resblocks.{match[1]}.{match[2]}"
    if name.startswith(_SHARED):
        return name
    raise ValueError(f"{name!r} is not a LaVIN adapter parameter")


def from_reference_name(name: str) -> str:
    """The reference's parameter name (with or without "module.") -> ours."""
    name = name.removeprefix("module.")
    if match := _REF_LLAMA.fullmatch(name):
        return f"llama.layers.{match[1]}.{match[2]}"
    if match := _REF_VIT.fullmatch(name):
        return f"vit.blocks.{match[1]}.{match[2]}"
    if name.startswith(_SHARED):
        return name
    raise ValueError(f"{name!r} is not a reference LaVIN adapter parameter")


def adapter_parameters(model: LaVIN) -> dict[str, Tensor]:
    """The parameters a LaVIN adapter file holds, by name: all whose name holds "adapter".

    Chosen by name, not by requires_grad (the same set after `freeze_backbone`), so that a
    file stays complete when a caller freezes some adapters for an experiment."""
    return {name: param for name, param in model.named_parameters() if TRAINABLE_MARK in name}


@functools.lru_cache(maxsize=8)
def _expected_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    # A model built on the meta device is the one source of truth for names and shapes (no
    # second copy of the architecture here); for 7B this takes well under a second.
    with torch.device("meta"):
        model = LaVIN(LaVINConfig.from_dict(json.loads(config_json)))
    return {name: tuple(param.shape) for name, param in adapter_parameters(model).items()}


def _config_json(config: LaVINConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def expected_adapter_shapes(config: LaVINConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a lavin_fast adapter file for `config` holds."""
    return dict(_expected_shapes(_config_json(config)))


def _shape_stand_ins(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    # check_state_dict compares `.shape`s only; meta tensors carry a shape for free.
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


# ---- saving -------------------------------------------------------------------------------------------

def _metadata(config: LaVINConfig) -> dict[str, str]:
    return {
        "format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "lavin_fast_version": __version__,
        "config": _config_json(config),
        # Spelled out although `config` has them too: they are what a reader must agree with,
        # and a reader should not need to parse the whole config to see them.
        "adapter_scale": json.dumps(float(config.adapter_scale)),
        "temperature": json.dumps(float(config.temperature)),
        "neck_activation": config.neck_activation,
        "vit_routing": config.vit_routing,
    }


def _is_dtensor(value: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without torch.distributed have no DTensor either
        return False
    return isinstance(value, DTensor)


def save_adapter_state(state: Mapping[str, Tensor], config: LaVINConfig, path: str | Path) -> Path:
    """Write `state` (our names, exactly the adapter parameters of a model built from `config`,
    ordinary tensors on any device in any floating dtype) as a lavin_fast adapter file.

    The tensors are checked against `config` (every key, every shape) before anything is
    written, stored as float32, and the file is replaced atomically. Returns the path."""
    for name, value in state.items():
        if _is_dtensor(value):
            raise TypeError(
                f"save_adapter_state: {name} is a DTensor; gather a full state dict first (see the "
                f"docstring of lavin_fast.checkpoints.adapters) and pass ordinary tensors")
        if not isinstance(value, Tensor):
            raise TypeError(f"save_adapter_state: {name} holds a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise ValueError(f"save_adapter_state: {name} is on the meta device (it has no values to save)")
        if not value.is_floating_point():
            raise TypeError(f"save_adapter_state: {name} has dtype {value.dtype}, expected a floating dtype")
    check_state_dict(_shape_stand_ins(_expected_shapes(_config_json(config))), state, "the adapter state to save")
    # copy=True: independent, contiguous storage per tensor, as safetensors requires (a plain
    # `.to` returns a CPU float32 parameter itself, and views of one buffer would be refused).
    tensors = {name: value.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
               for name, value in state.items()}
    metadata = _metadata(config)
    # `save_file` is looked up at call time so that tests can make it fail mid-write.
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_adapters(model: LaVIN, path: str | Path) -> Path:
    """Save `model`'s adapters, neck and modality embedding (float32) with its config."""
    return save_adapter_state(adapter_parameters(model), model.config, path)


# ---- reading files ------------------------------------------------------------------------------------

def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"adapter checkpoint {path} is not a file")
    return path


def _kind(path: Path) -> str:
    """"safetensors", "torch" or "unknown", from the file's first bytes (not its suffix)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
        return "torch"                                   # torch.save's zip format
    if len(head) == 9 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")      # safetensors: u64 header size, JSON header
        if 0 < header <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch"                                   # torch.save's legacy (pickle) format
    return "unknown"


def is_lavin_fast_file(path: str | Path) -> bool:
    """True for a safetensors file (a lavin_fast adapter file), False for a torch checkpoint
    (the reference's); a missing or unrecognised file is an error."""
    path = _existing_file(path)
    kind = _kind(path)
    if kind == "unknown":
        raise _unknown_kind(path)
    return kind == "safetensors"


def _unknown_kind(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is neither a lavin_fast adapter file (safetensors) nor a reference LaVIN checkpoint "
        f"(torch.save of {{'model': ..., 'args': ...}})")


def _read_lavin_fast(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    for key, value in tensors.items():
        if not value.is_floating_point():  # copy_ would silently turn integers into floats
            raise CheckpointError(f"{path}: {key} has dtype {value.dtype}, expected float32")
        _check_finite(value, key, path)
    return metadata, tensors


def _check_finite(value: Tensor, key: str, path: Path) -> None:
    """NaN or Inf in a trained parameter (a diverged run) would make every output NaN: refused."""
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise CheckpointError(f"{path}: {key} holds {bad} NaN or infinite values (of {value.numel()})")


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> LaVINConfig:
    """The LaVINConfig a lavin_fast file was written with, after checking its format tag and
    that its spelled-out hyper-parameters agree with its config."""
    if metadata.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is a safetensors file but not a lavin_fast adapter file "
                              f"(its metadata has format {metadata.get('format')!r}, expected {FORMAT_TAG!r})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{path}: unreadable format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has adapter format version {version}, written by lavin_fast "
                              f"{metadata.get('lavin_fast_version', '?')}; this lavin_fast reads up to {FORMAT_VERSION}")
    try:
        values = json.loads(metadata["config"])
        if "vit_routing" not in metadata:   # written before the mode was recorded: trained with "cls"
            values = {**values, "vit_routing": UNRECORDED_VIT_ROUTING}
        config = LaVINConfig.from_dict(values)
        spelled = {"adapter_scale": float(json.loads(metadata["adapter_scale"])),
                   "temperature": float(json.loads(metadata["temperature"])),
                   "neck_activation": metadata["neck_activation"],
                   "vit_routing": metadata.get("vit_routing", UNRECORDED_VIT_ROUTING)}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the lavin_fast metadata is incomplete or unreadable: {error!r}") from error
    for field_name, value in spelled.items():
        if getattr(config, field_name) != value:
            raise CheckpointError(f"{path} is inconsistent: metadata {field_name} {value!r}, "
                                  f"its config {getattr(config, field_name)!r}")
    return config


def read_adapter_config(path: str | Path) -> LaVINConfig:
    """The LaVINConfig stored in a lavin_fast adapter file (to build the matching model).

    A reference checkpoint stores no LaVINConfig: build one with `LaVINConfig.from_preset`
    ("7b": temperature 10, "13b": temperature 5); `read_reference_args` shows its "args"."""
    path = _existing_file(path)
    kind = _kind(path)
    if kind == "torch":
        raise CheckpointError(
            f"{path} is a torch checkpoint (the reference's format), which stores no LaVINConfig; build "
            f"the config with LaVINConfig.from_preset('7b' or '13b') and the temperature it was trained with")
    if kind != "safetensors":
        raise _unknown_kind(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return _config_from_metadata(metadata, path)


def _blocked_globals(path: Path, error: Exception) -> list[str]:
    """The globals a weights_only load refused, as "module.name" strings."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in REFERENCE_SAFE_GLOBALS}
    if zipfile.is_zipfile(path):
        try:  # exact: every global the pickle references that torch does not allow by default
            return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                    if name not in allowed]
        except Exception:  # noqa: BLE001 - fall back to the error message below
            pass
    return re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))


def _torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)` with argparse.Namespace allowed; never weights_only=False."""
    with torch.serialization.safe_globals(list(REFERENCE_SAFE_GLOBALS)):
        try:
            return torch_load(path)
        except pickle.UnpicklingError as error:
            blocked = _blocked_globals(path, error)
            if blocked:
                raise CheckpointError(
                    f"{path} needs Python globals that are not allowed when loading weights safely: "
                    f"{', '.join(blocked)}. Only argparse.Namespace is allowed besides tensors and plain "
                    f"containers; the file is not a plain reference LaVIN checkpoint (it is not loaded with "
                    f"weights_only=False, which could run code from it)") from error
            raise CheckpointError(f"{path} could not be read as a torch checkpoint (weights_only): {error}") from error
        except Exception as error:
            raise CheckpointError(f"{path} could not be read as a torch checkpoint (weights_only): {error}") from error


def _read_reference(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The reference checkpoint's adapter tensors (file spelling) and its "args" as a dict."""
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is a torch checkpoint but not a reference LaVIN checkpoint: expected a "
                              f"dict with a 'model' state dict, found {found}")
    tensors = {}
    for key, value in checkpoint["model"].items():
        if not isinstance(key, str) or TRAINABLE_MARK not in key:
            continue  # the reference saves only adapter keys; anything else is not ours to load
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{path}: model[{key!r}] holds "
                                  f"{value.dtype if isinstance(value, Tensor) else type(value).__name__}, "
                                  f"expected a floating-point tensor")
        _check_finite(value, f"model[{key!r}]", path)
        tensors[key] = value
    if not tensors:
        raise CheckpointError(f"{path}: its 'model' holds no adapter parameters (no key contains 'adapter')")
    return tensors, _args_dict(checkpoint.get("args"))


def _args_dict(args: object) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):  # some forks save dataclasses.asdict(args)
        return dict(args)
    return {}


def read_reference_args(path: str | Path) -> dict[str, Any]:
    """The training arguments stored in a reference checkpoint ("args"), as a dict (empty if
    none). `temperature` and `adapter_scale` there are the routers' (what the reference builds
    its adapters with)."""
    path = _existing_file(path)
    if _kind(path) != "torch":
        raise CheckpointError(f"{path} is not a torch checkpoint, so not a reference LaVIN checkpoint")
    return _read_reference(path)[1]


# ---- loading --------------------------------------------------------------------------------------------

def _differences(found: Mapping[str, object], config: LaVINConfig,
                 labels: Mapping[str, str] | None = None) -> list[str]:
    """"file has X a, model b" for every value of `found` (config field -> value) that differs
    from `config`'s; `labels` adds where the file keeps it, e.g. "(args.adapter_dim)"."""
    problems = []
    for name, value in found.items():
        mine = _config_value(config, name)
        same = (math.isclose(float(value), float(mine), rel_tol=1e-9, abs_tol=0.0)
                if isinstance(value, (int, float)) and isinstance(mine, (int, float)) else value == mine)
        if not same:
            where = f" ({labels[name]})" if labels and name in labels else ""
            problems.append(f"file has {name} {value!r}{where}, model {mine!r}")
    return problems


def _config_value(config: LaVINConfig, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# What a lavin_fast file must agree with the model on: the values the tensors do not carry,
# and the widths/depths that fix the tensors' shapes (named before the keys that follow).
_CHECKED = ("adapter_scale", "temperature", "neck_activation", "adapter_hidden", "adapter_groups",
            "neck_hidden", "llama.dim", "llama.n_layers", "vit.width", "vit.layers")


def _report(problems: list[str], source: str, strict: bool, what: str) -> None:
    if not problems:
        return
    message = f"{source}: {what} differ from the model's: " + "; ".join(problems)
    if strict:
        raise CheckpointError(message)
    warnings.warn(message + " (strict=False: the model keeps its own)", stacklevel=3)


def _check_keys(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str, strict: bool) -> None:
    if strict:
        check_state_dict(expected, found, source)
        return
    # Non-strict: only the keys both sides have must agree; the rest is reported, not fatal.
    common = set(expected) & set(found)
    check_state_dict({k: expected[k] for k in common}, {k: found[k] for k in common}, source)
    missing, unexpected = sorted(set(expected) - common), sorted(set(found) - common)
    if missing or unexpected:
        warnings.warn(f"{source} (strict=False): not loaded, missing in the file: {missing}; "
                      f"ignored, unknown to the model: {unexpected}", stacklevel=3)


def _check_vit_routing(model: LaVIN, trained: tuple[str, ...], source: str, override: str | None) -> None:
    """Refuse adapters trained with another ViT routing than the model's, unless `override`
    names the model's mode (the caller's explicit choice)."""
    mode = model.config.vit_routing
    if override is not None:
        if override != mode:
            raise ValueError(f"load_adapters: vit_routing={override!r} was asked for but the model routes its "
                             f"ViT with {mode!r}; build it with vit_routing={override!r}")
        return
    if mode not in trained:
        raise CheckpointError(
            f"{source}: its ViT adapters were trained with vit_routing {' or '.join(map(repr, trained))}, the model "
            f"routes with {mode!r}; build the model with the file's mode, or pass vit_routing={mode!r} "
            f"(--vit-routing {mode}) to load them anyway (a lavin_fast file that records no mode was "
            f"trained with {UNRECORDED_VIT_ROUTING!r})")


def load_adapters(model: LaVIN, path: str | Path, *, strict: bool = True, vit_routing: str | None = None) -> None:
    """Load a lavin_fast adapter file or a reference `checkpoint-E.pth` into `model`.

    Every check (format, hyper-parameters, ViT routing, keys, shapes) runs before the first
    value is copied; values go into the existing parameters under torch.no_grad, which keep
    their dtype and device. See the module docstring for the formats, the mapping, `strict`
    and `vit_routing` (the model's mode, named to load adapters trained with another)."""
    path = _existing_file(path)
    params = adapter_parameters(model)
    on_meta = [name for name, param in params.items() if param.device.type == "meta"]
    if on_meta:
        raise ValueError(f"load_adapters: the model's {on_meta[0]} (and {len(on_meta) - 1} more) are on the "
                         f"meta device; materialise the model (e.g. to_empty) before loading values into it")
    kind = _kind(path)
    if kind == "safetensors":
        source = f"lavin_fast adapter file {path}"
        metadata, found = _read_lavin_fast(path)
        stored = _config_from_metadata(metadata, path)
        _report(_differences({name: _config_value(stored, name) for name in _CHECKED}, model.config),
                source, strict, "hyper-parameters")
        _check_vit_routing(model, (stored.vit_routing,), source, vit_routing)
        _check_keys(params, found, source, strict)
        mapping = {key: key for key in found if key in params}
    elif kind == "torch":
        source = f"reference LaVIN checkpoint {path}"
        found, args = _read_reference(path)
        present = [arg for arg in REFERENCE_ARGS
                   if isinstance(args.get(arg), (int, float)) and not isinstance(args.get(arg), bool)]
        stored: dict[str, object] = {"neck_activation": "silu"}  # the reference's neck is the SiLU one
        stored.update({REFERENCE_ARGS[arg]: args[arg] for arg in present})
        labels = {"neck_activation": "the reference's neck", **{REFERENCE_ARGS[arg]: f"args.{arg}" for arg in present}}
        _report(_differences(stored, model.config, labels), source, strict, "hyper-parameters")
        _check_vit_routing(model, REFERENCE_VIT_ROUTINGS, source, vit_routing)
        # Compare in the file's own spelling, so that every error names the file's keys.
        prefix = "module." if any(key.startswith("module.") for key in found) else ""
        expected = {prefix + to_reference_name(name): param for name, param in params.items()}
        _check_keys(expected, found, source, strict)
        mapping = {key: from_reference_name(key) for key in found if key in expected}
    else:
        raise _unknown_kind(path)
    with torch.no_grad():
        for key, ours in mapping.items():
            params[ours].copy_(found[key])  # copy_ converts dtype and device; the parameter keeps both
