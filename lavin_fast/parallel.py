"""Parallelism applied to an unchanged LaVIN from outside, on PyTorch's own engine.

- `build_mesh`: a 2-D DeviceMesh ("dp", "tp") over the torchrun processes.
- `apply_tensor_parallel`: Megatron-style tensor parallelism of the frozen LLaMA with
  `parallelize_module` (DTensor): q/k/v and w1/w3 column-wise, wo and w2 row-wise, the vocab
  split in the embedding and the output head; optionally sequence parallel norms. The
  MM-Adapters, the ViT and the neck stay replicated: each adapter gets the full sequence as a
  plain local tensor (its router reads token 0; the fused kernels take ordinary tensors).
- `apply_data_parallel`: FSDP2 `fully_shard` over the "dp" mesh that manages only the trainable
  parameters (adapters, neck, modality embedding): frozen weights are ignored, never gathered
  nor reduced; gradients of the ~3.8M trainable parameters are reduce-scattered.

The trainer applies the tensor-parallel plan while the LLaMA is still on the meta device
(`checkpoints.lavin.load_lavin(parallelize=...)`), so each rank then reads only its shard of the
checkpoint; data parallelism comes after loading.

Communication per layer with TP: without sequence parallel, one all-reduce after `wo` and one
after `w2` (the Megatron minimum); with it, an all-gather before the adapter (needed anyway:
the adapter and attention see the whole sequence) and a reduce-scatter after `wo`, likewise
around the FFN.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lavin_fast.errors import UserError


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); (rank, world).

    Without torchrun's environment this is a single process and nothing is initialised."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def build_mesh(dp: int | None, tp: int) -> DeviceMesh | None:
    """The ("dp", "tp") mesh; dp defaults to world / tp. None when running as one process."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if tp < 1 or world % tp:
        raise UserError(f"--tp {tp} must divide the number of processes ({world})")
    dp = dp or world // tp
    if dp * tp != world:
        raise UserError(f"--dp {dp} x --tp {tp} = {dp * tp} processes, but torchrun started {world}")
    if world == 1:
        return None
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def check_tensor_parallel(config, tp: int) -> None:
    """Clear errors for a LLaMA whose heads or widths do not split `tp` ways."""
    kv_heads = config.n_kv_heads or config.n_heads
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", kv_heads), ("dim", config.dim),
                        ("ffn hidden", config.ffn_hidden), ("vocab_size", config.vocab_size)):
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the LLaMA's {name} ({value})")


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _restore_trainable(model: nn.Module, trainable: set[str]) -> None:
    # parallelize_module re-creates parameters as DTensors; SequenceParallel's replicated norm
    # weights come back with requires_grad=True. Put the frozen set back as it was.
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Split `model.llama` over `tp_mesh` in place (the LaVIN module itself is not edited).

    Each layer: attention.{wq,wk,wv} and feed_forward.{w1,w3} column-wise (heads and hidden
    units split), attention.wo and feed_forward.w2 row-wise; tok_embeddings and output split on
    the vocabulary. Every other module (adapters, ViT, neck, modality embedding) is replicated.
    """
    llama = model.llama
    check_tensor_parallel(llama.config, tp_mesh.size())
    trainable = _trainable_names(model)
    seq = Shard(1)
    stream = seq if sequence_parallel else Replicate()
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    }
    if sequence_parallel:
        # The final norm gets the whole sequence back: LaVIN picks the answer positions out of
        # its output before the head, an indexing a sequence-sharded tensor cannot take.
        top["norm"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
    parallelize_module(llama, tp_mesh, top)
    for index, layer in enumerate(llama.layers):
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        if sequence_parallel:
            plan.update({
                # The residual stream enters the first layer whole (LaVIN builds it from the
                # embeddings, the image tokens and t_m); between layers it is each rank's plain
                # slice of the sequence (the length must divide by tp: the trainer pads to it).
                **({"": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(seq,),
                                           use_local_output=True)} if index == 0 else {}),
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # All-gather once, before the adapter: it routes on token 0 and, like
                # attention, needs the whole sequence; it receives a plain local tensor.
                "adapter_attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True),
                "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True),
            })
        parallelize_module(layer, tp_mesh, plan)
    _restore_trainable(model, trainable)


def apply_data_parallel(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """FSDP2 over `dp_mesh` for the trainable parameters only (frozen ones are ignored).

    One FSDP unit for all 3.8M trainable parameters: one all-gather before the forward and
    one reduce-scatter of their gradients after the backward. `loss`, which training calls
    instead of `forward`, is registered so that FSDP's hooks run around it too."""
    frozen = {param for param in model.parameters() if not param.requires_grad}
    fully_shard(model, mesh=dp_mesh, ignored_params=frozen)
    register_fsdp_forward_method(model, "loss")
    # The trainer's loss is already the mean over the whole step's answer tokens (every rank
    # divides by the global count), so the ranks' gradients are summed, not averaged.
    model.set_gradient_divide_factor(1.0)
    model.set_force_sum_reduction_for_comms(True)   # a plain SUM (gloo has no PREMUL_SUM)
    # A rank whose micro-batch has no image leaves the ViT adapters and the neck without a
    # gradient; they still join the reduce-scatter (as zeros), or the ranks' collectives differ.
    model.set_reduce_scatter_unused_params(True)
