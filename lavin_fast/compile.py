"""`torch.compile` of the frozen backbones, block by block, applied from outside the model.

Each LLaMA layer and each ViT block is compiled in place (`nn.Module.compile`: parameter names,
state dicts and checkpoints are unchanged), the way torchtitan compiles per block: one small graph
reused by every layer, RMSNorm / RoPE / SwiGLU / residual adds fused by Inductor, the MM-Adapter
staying one op (its torch.library registration when the Triton kernels run). Shapes are dynamic
(`dynamic=True`): packed rows change length every step, and a graph per length would recompile
each step; the layout's flags (padded or packed) are the only values a graph specialises on.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module) -> nn.Module:
    """Compile every block of `model.llama.layers` and `model.vit.blocks` in place; returns model."""
    for stack in (model.llama.layers, model.vit.blocks):
        for block in stack:
            block.compile(dynamic=True)
    return model


def compile_count() -> int:
    """Frames Dynamo has compiled in this process so far (first compiles and recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
