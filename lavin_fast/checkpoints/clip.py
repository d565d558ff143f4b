"""Load CLIP's vision trunk from an OpenAI or a Hugging Face checkpoint into `VisionTransformer`.

Formats (REFERENCE.md section 8):
- a file: OpenAI's TorchScript archive (`ViT-L-14.pt`), or a plain state dict with OpenAI's
  key names saved by `torch.save` (.pt/.pth) or as .safetensors;
- a folder: Hugging Face `CLIPVisionModel` or `CLIPModel` (config.json + model.safetensors or
  pytorch_model.bin), keys with or without the `vision_model.` prefix (transformers 5 saves a
  CLIPVisionModel without it).

Key mapping, ours <- checkpoint (N = block index):

| ours                        | OpenAI (`visual.` + ...)                   | Hugging Face (`vision_model.` + ...)          |
|-----------------------------|--------------------------------------------|-----------------------------------------------|
| conv1.weight                | conv1.weight                               | embeddings.patch_embedding.weight             |
| class_embedding             | class_embedding                            | embeddings.class_embedding                    |
| positional_embedding        | positional_embedding                       | embeddings.position_embedding.weight          |
| ln_pre.{weight,bias}        | ln_pre.*                                   | pre_layrnorm.* (sic)                          |
| blocks.N.ln_1.*             | transformer.resblocks.N.ln_1.*             | encoder.layers.N.layer_norm1.*                |
| blocks.N.attn.in_proj.weight| transformer.resblocks.N.attn.in_proj_weight| encoder.layers.N.self_attn.{q,k,v}_proj.weight (stacked q; k; v) |
| blocks.N.attn.in_proj.bias  | transformer.resblocks.N.attn.in_proj_bias  | encoder.layers.N.self_attn.{q,k,v}_proj.bias  |
| blocks.N.attn.out_proj.*    | transformer.resblocks.N.attn.out_proj.*    | encoder.layers.N.self_attn.out_proj.*         |
| blocks.N.ln_2.*             | transformer.resblocks.N.ln_2.*             | encoder.layers.N.layer_norm2.*                |
| blocks.N.mlp.c_fc.*         | transformer.resblocks.N.mlp.c_fc.*         | encoder.layers.N.mlp.fc1.*                    |
| blocks.N.mlp.c_proj.*       | transformer.resblocks.N.mlp.c_proj.*       | encoder.layers.N.mlp.fc2.*                    |

Keys LaVIN does not use are dropped by an exact list (`ln_post`/`post_layernorm`, `proj`, the
text tower, logit scale, bookkeeping buffers); every other key must match the model in name and
shape, or a `CheckpointError` names it in the checkpoint's own spelling.

A TorchScript archive is never run (torch.jit.load would run code from the file): its pickled
module tree is read as inert records (`strict.torchscript_tensors`) and only the `visual.*`
tensors are taken; a module of the vision tower that keeps its state through its own
`__getstate__` is refused, naming it.

Memory: the model is built on the meta device and takes the checkpoint's tensors by assignment;
safetensors and zip-format torch files are memory-mapped and only the keys used are read. Of a
TorchScript archive only the vision tower's storages are read, into memory.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from lavin_fast.checkpoints.strict import (
    CheckpointError,
    check_floating,
    check_state_dict,
    flat_state_dict,
    is_torchscript_archive,
    load_strict,
    open_safetensors,
    read_json,
    torch_load,
    torchscript_tensors,
)
from lavin_fast.io import atomic_write
from lavin_fast.models.vit import ACTIVATIONS, ViTConfig, VisionTransformer, default_taps

# ours -> checkpoint, for the parameters outside the blocks and inside block N.
OPENAI_GLOBAL = {
    "conv1.weight": "visual.conv1.weight",
    "class_embedding": "visual.class_embedding",
    "positional_embedding": "visual.positional_embedding",
    "ln_pre.weight": "visual.ln_pre.weight",
    "ln_pre.bias": "visual.ln_pre.bias",
}
OPENAI_BLOCK = "visual.transformer.resblocks.{n}."
OPENAI_IN_BLOCK = {
    "attn.in_proj.weight": ("attn.in_proj_weight",),
    "attn.in_proj.bias": ("attn.in_proj_bias",),
    **{f"{part}.{p}": (f"{part}.{p}",) for part in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
       for p in ("weight", "bias")},
}
HF_GLOBAL = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
}
HF_BLOCK = "encoder.layers.{n}."
HF_IN_BLOCK = {
    **{f"attn.in_proj.{p}": tuple(f"self_attn.{x}_proj.{p}" for x in "qkv") for p in ("weight", "bias")},
    **{f"{ours}.{p}": (f"{theirs}.{p}",) for ours, theirs in (
        ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")) for p in ("weight", "bias")},
}

# Keys of the full checkpoints that LaVIN does not use: exactly these, nothing else is dropped.
_OPENAI_TEXT_BLOCK = (r"transformer\.resblocks\.\d+\.(attn\.in_proj_(weight|bias)|"
                      r"(attn\.out_proj|ln_1|ln_2|mlp\.c_fc|mlp\.c_proj)\.(weight|bias))")
OPENAI_UNUSED = re.compile(
    r"visual\.ln_post\.(weight|bias)|visual\.proj|token_embedding\.weight|positional_embedding|"
    r"ln_final\.(weight|bias)|text_projection|logit_scale|input_resolution|context_length|vocab_size|"
    + _OPENAI_TEXT_BLOCK
)
_HF_TEXT_BLOCK = (r"text_model\.encoder\.layers\.\d+\."
                  r"(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
HF_UNUSED = re.compile(
    r"(vision_model\.)?(post_layernorm\.(weight|bias)|embeddings\.position_ids)|"
    r"visual_projection\.weight|text_projection\.weight|logit_scale|"
    r"text_model\.(embeddings\.(token_embedding\.weight|position_embedding\.weight|position_ids)|"
    r"final_layer_norm\.(weight|bias))|" + _HF_TEXT_BLOCK
)

# CLIPVisionConfig's defaults: a config.json written with only the non-default values means these.
HF_CONFIG_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


@dataclass
class _Checkpoint:
    """Tensor names and shapes of a checkpoint, and how to read one tensor (lazily)."""

    source: str
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], Tensor]


def load_clip(
    path: str | Path,
    *,
    taps: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> VisionTransformer:
    """CLIP's vision trunk from an OpenAI file or a Hugging Face folder (module docstring).

    taps: 1-based blocks whose CLS token `forward` returns; default six evenly spaced ones
    (`default_taps`: 4, 8, ..., 24 for ViT-L/14 at 224 or 336 px, LaVIN's; 2, 4, ..., 12 for
    the 12 blocks of ViT-B/16 and B/32). The image size is the checkpoint's (ViT-L/14@336px:
    577 positions). dtype: convert the weights (default: keep the
    checkpoint's, fp16 for OpenAI's archives). Raises CheckpointError on any missing,
    unexpected or mis-shaped key of the vision trunk.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint, config, prefix = _open_hf(path)
        names = _names(config, HF_GLOBAL, HF_BLOCK, HF_IN_BLOCK, prefix)
        unused = HF_UNUSED
    elif path.is_file():
        checkpoint = _open_file(path)
        config = _infer_openai_config(checkpoint)
        names = _names(config, OPENAI_GLOBAL, OPENAI_BLOCK, OPENAI_IN_BLOCK, "")
        unused = OPENAI_UNUSED
    else:
        raise FileNotFoundError(f"load_clip: no such file or folder: {path}")
    config = replace(config, taps=tuple(taps) if taps is not None else default_taps(config.layers))

    with torch.device("meta"):
        model = VisionTransformer(config)
    ours = model.state_dict()
    expected = {}  # checkpoint name -> meta tensor of the shape it must have
    for key, tensor in ours.items():
        parts = names[key]
        rows = tensor.shape[0] // len(parts)  # q, k, v are stacked on dim 0
        expected.update({part: torch.empty((rows, *tensor.shape[1:]), device="meta") for part in parts})
    found = {key: torch.empty(shape, device="meta") for key, shape in checkpoint.shapes.items()
             if not unused.fullmatch(key)}
    check_state_dict(expected, found, checkpoint.source)

    state = {}
    for key in ours:
        parts = [checkpoint.read(part) for part in names[key]]
        check_floating({part: tensor.dtype for part, tensor in zip(names[key], parts)}, checkpoint.source)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        state[key] = tensor.detach().to(device=device, dtype=dtype)
    load_strict(model, state, checkpoint.source)
    return model


def save_clip(model: VisionTransformer, path: str | Path) -> Path:
    """Write a vision trunk as a safetensors state dict with OpenAI's key names (which
    `load_clip` reads back; OpenAI's rule heads = width / 64 must hold). Atomic."""
    from safetensors.torch import save_file

    if model.config.width != 64 * model.config.heads:
        raise ValueError(f"save_clip: OpenAI's format implies heads = width / 64, got width "
                         f"{model.config.width} with {model.config.heads} heads")
    names = _names(model.config, OPENAI_GLOBAL, OPENAI_BLOCK, OPENAI_IN_BLOCK, "")
    state = {names[key][0]: tensor.detach().cpu().contiguous()
             for key, tensor in model.state_dict().items() if "adapter" not in key}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _names(config: ViTConfig, outside: Mapping[str, str], block: str,
           in_block: Mapping[str, tuple[str, ...]], prefix: str) -> dict[str, tuple[str, ...]]:
    """Our key -> the checkpoint key(s) it is read from (several: stacked on dim 0)."""
    names = {ours: (prefix + theirs,) for ours, theirs in outside.items()}
    for n in range(config.layers):
        for ours, theirs in in_block.items():
            names[f"blocks.{n}.{ours}"] = tuple(prefix + block.format(n=n) + t for t in theirs)
    return names


# ---- files: TorchScript archive, torch.save state dict, safetensors -------------------------------

def _open_file(path: Path) -> _Checkpoint:
    source = f"CLIP checkpoint {path}"
    if path.suffix == ".safetensors":
        return _open_safetensors(path, source)
    if is_torchscript_archive(path):  # read without running it; only the vision tower's tensors
        return _from_mapping(torchscript_tensors(path, "visual", source), source)
    return _from_mapping(_torch_load(path, source), source)


def _torch_load(path: Path, source: str) -> object:
    try:
        return torch_load(path)
    except Exception as error:
        raise CheckpointError(f"{source} is neither a TorchScript archive, a state dict saved by torch.save "
                              f"(weights_only), nor safetensors: {error}") from error


def _from_mapping(state: object, source: str) -> _Checkpoint:
    state = flat_state_dict(state, source)
    return _Checkpoint(source, {key: tuple(value.shape) for key, value in state.items()}, state.__getitem__)


def _open_safetensors(path: Path, source: str) -> _Checkpoint:
    handle = open_safetensors(path)  # mapped; tensors read on demand
    shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return _Checkpoint(source, shapes, handle.get_tensor)


def _infer_openai_config(checkpoint: _Checkpoint) -> ViTConfig:
    """OpenAI's build_model rule: everything from shapes, heads = width / 64, QuickGELU."""
    shapes, source = checkpoint.shapes, checkpoint.source

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source} does not match the model: missing key {key} (needed to infer the shape)")
        return shapes[key]

    width, channels, patch, _ = shape("visual.conv1.weight")
    positions = shape("visual.positional_embedding")[0]
    grid = math.isqrt(positions - 1)
    if channels != 3 or grid * grid != positions - 1 or width % 64:
        raise CheckpointError(
            f"{source}: not a CLIP vision tower (conv1 {shape('visual.conv1.weight')}, "
            f"positional_embedding {shape('visual.positional_embedding')}; expected 3 channels, "
            "1 + grid^2 positions and a width divisible by 64)")
    blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", key))}
    if not blocks:
        raise CheckpointError(f"{source}: no visual.transformer.resblocks.N.* keys")
    mlp_hidden = shape(OPENAI_BLOCK.format(n=0) + "mlp.c_fc.weight")[0]
    layers = max(blocks) + 1  # a gap shows up as missing keys in the strict check
    return ViTConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=width // 64,
                     mlp_ratio=mlp_hidden / width, taps=(layers,),  # load_clip sets the real taps
                     activation="quick_gelu", ln_eps=1e-5)


# ---- Hugging Face folders ---------------------------------------------------------------------------

def _open_hf(folder: Path) -> tuple[_Checkpoint, ViTConfig, str]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"Hugging Face CLIP folder {folder} has no config.json")
    raw = read_json(config_file)
    vision = raw.get("vision_config", raw)
    if not isinstance(vision, Mapping):
        raise CheckpointError(f"{config_file}: vision_config holds a {type(vision).__name__}, not a JSON object")
    config = _hf_config(vision, config_file)
    if (folder / "model.safetensors").is_file():
        checkpoint = _open_safetensors(folder / "model.safetensors", f"CLIP checkpoint {folder / 'model.safetensors'}")
    elif (folder / "pytorch_model.bin").is_file():
        source = f"CLIP checkpoint {folder / 'pytorch_model.bin'}"
        checkpoint = _from_mapping(_torch_load(folder / "pytorch_model.bin", source), source)
    else:
        raise CheckpointError(f"Hugging Face CLIP folder {folder} has neither model.safetensors nor "
                              "pytorch_model.bin (sharded checkpoints are not supported)")
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in checkpoint.shapes) else ""
    return checkpoint, config, prefix


def _hf_config(raw: Mapping, config_file: Path) -> ViTConfig:
    values = {**HF_CONFIG_DEFAULTS, **raw}

    def square(name: str) -> int:
        value = values[name]
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise CheckpointError(f"{config_file}: {name} {value} is not square")
            value = value[0]
        return int(value)

    activation = values["hidden_act"]
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{config_file}: hidden_act {activation!r} is not supported (one of {ACTIVATIONS})")
    if values["num_channels"] != 3:
        raise CheckpointError(f"{config_file}: num_channels is {values['num_channels']}, CLIP takes 3")
    width, layers = int(values["hidden_size"]), int(values["num_hidden_layers"])
    try:
        return ViTConfig(image_size=square("image_size"), patch_size=square("patch_size"), width=width,
                         layers=layers, heads=int(values["num_attention_heads"]),
                         mlp_ratio=int(values["intermediate_size"]) / width, taps=(layers,),
                         activation=activation, ln_eps=float(values["layer_norm_eps"]))
    except ValueError as error:
        raise CheckpointError(f"{config_file}: {error}") from error
