"""The whole LaVIN from real checkpoints: a LLaMA, a CLIP and, optionally, trained adapters.

The layer above the three loaders (`checkpoints.llama`, `checkpoints.clip`,
`checkpoints.adapters`) and the model (`models.lavin`), which knows none of them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from lavin_fast.checkpoints.adapters import is_lavin_fast_file, load_adapters, read_adapter_config, read_reference_args
from lavin_fast.checkpoints.clip import load_clip
from lavin_fast.checkpoints.llama import load_llama_weights, open_llama
from lavin_fast.models.lavin import LaVIN, LaVINConfig
from lavin_fast.models.llama import Transformer


def load_lavin(llama: str | Path, clip: str | Path, adapters: str | Path | None = None, *,
               preset: str | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", max_seq_len: int = 512,
               parallelize: Callable[[LaVIN], None] | None = None, **overrides) -> LaVIN:
    """LaVIN on real backbones: `llama` a Meta or Hugging Face folder (`open_llama`), `clip` an
    OpenAI file or Hugging Face folder (`load_clip`), `adapters` (optional) a lavin_fast adapter
    file or the reference's `checkpoint-E.pth` (`load_adapters`).

    Adapter hyper-parameters come from the adapter file when it is lavin_fast's, else from
    `preset` (`LAVIN_PRESETS`; default by the LLaMA's width: 5120 -> "13b", else "7b")
    and the reference checkpoint's recorded temperature, then from `overrides`. dtype
    converts the frozen backbones; the trainable parameters are created in fp32 on `device`.
    Loading is strict throughout.

    parallelize: applied to the assembled model while the LLaMA is still on the meta device
    (e.g. `lavin_fast.parallel.apply_tensor_parallel`); the LLaMA's weights are then read
    into whatever it made of them, so under tensor parallelism each rank reads only its shard.
    """
    source = open_llama(llama, max_seq_len=max_seq_len)
    with torch.device("meta"):
        llama_model = Transformer(source.config)
    vit = load_clip(clip, dtype=dtype, device=device)
    if adapters is not None and is_lavin_fast_file(adapters):
        base = read_adapter_config(adapters)
    else:
        base = LaVINConfig.from_preset(preset or ("13b" if source.config.dim == 5120 else "7b"))
        if adapters is not None and "temperature" in (args := read_reference_args(adapters)):
            base = dataclasses.replace(base, temperature=float(args["temperature"]))
    config = dataclasses.replace(base, llama=source.config, vit=vit.config, **overrides)
    with torch.device(device):
        model = LaVIN(config, llama=llama_model, vit=vit)
    if adapters is not None:  # a vit_routing given here is the explicit override load_adapters asks for
        load_adapters(model, adapters, vit_routing=overrides.get("vit_routing"))
    if parallelize is not None:
        parallelize(model)
    load_llama_weights(model.llama, source, dtype=dtype, device=device)
    return model
