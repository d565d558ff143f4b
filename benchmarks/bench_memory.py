"""Saved activations of one LLaMA-7B-shaped layer per real token, measured without a GPU.

One TransformerBlock (d 4096, 32 heads, its MM-Adapter) on fake tensors (FakeTensorMode: shapes and
dtypes, no memory; CPU device, so the packed layout takes the masked-SDPA path) in bf16: a forward with
`torch.autograd.graph.saved_tensors_hooks` adds up the bytes autograd keeps for the backward
(each saved tensor counted once). Layouts: a micro-batch of ScienceQA-like samples
(benchmarks/lengths.py) padded to its longest sample, or packed into one row. With gradient
checkpointing a layer keeps only its input (d x 2 bytes per slot) and recomputes the rest, one
layer at a time, in the backward. Saved [L, L] tensors (the attention mask and probabilities
of the CPU's math SDPA path; FlashAttention on a GPU, dense or varlen, keeps none) are listed
apart; the frozen weights autograd also holds are not activations and are left out.

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory_7b_layer.*
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from lengths import scienceqa_lengths  # noqa: E402

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from lavin_fast import ops  # noqa: E402
from lavin_fast.models.llama import LlamaConfig, TransformerBlock, rope_angles  # noqa: E402
from lavin_fast.models.segments import Segments  # noqa: E402
from lavin_fast.modules import MMAdapter  # noqa: E402

DTYPE = torch.bfloat16


def saved_bytes(block: TransformerBlock, lengths: list[int], packed: bool) -> tuple[int, int, int]:
    """(saved activation bytes, bytes of [L, L] attention masks and scores, slots) of one forward."""
    dim = block.attention.wq.in_features
    rows, length = (1, sum(lengths)) if packed else (len(lengths), max(lengths))
    segments = Segments.build([lengths] if packed else None, rows, length, isolate_first=True)
    x = torch.empty(rows, length, dim, dtype=DTYPE, requires_grad=True)
    cos, sin = rope_angles(block.attention.head_dim, segments.positions, 10000.0)
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[id(tensor)] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x, cos, sin, segments)
    weights = {id(p) for p in block.parameters()}
    # Frozen weights saved for the input gradients (or their transposed views) are no activation.
    tensors = [t for t in seen.values() if id(t) not in weights and id(t._base) not in weights]
    square = [t for t in tensors if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == length and length > 1]
    dense = sum(t.numel() * t.element_size() for t in tensors if all(t is not s for s in square))
    scores = sum(t.numel() * t.element_size() for t in square)
    return dense, scores, rows * length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--micro-batches", default="4,8,16", help="samples per micro-batch, comma-separated")
    args = parser.parse_args()
    config = LlamaConfig.from_preset("llama-7b")
    # The op's range check of the routing index reads values, which fake tensors do not have;
    # the indices come from Segments, checked there.
    ops._check_routing_index = lambda *args: None
    batches = [scienceqa_lengths(int(n), seed=int(n))[0] for n in args.micro_batches.split(",")]
    with FakeTensorMode():
        rows = run(config, batches)
    harness.write_results(rows, args.out, "memory_7b_layer",
                          "Saved activations of one LLaMA-7B layer (bf16, fake tensors)")


def run(config: LlamaConfig, micro_batches: list[list[int]]) -> list[dict]:
    """One row per micro-batch (its samples' lengths) and layout."""
    torch.set_default_dtype(DTYPE)        # the frozen backbone in bf16 (fake tensors cannot be cast in place)
    block = TransformerBlock(config)
    torch.set_default_dtype(torch.float32)
    block.adapter_attn = MMAdapter(config.dim, dropout=0.0)   # the trained adapter stays fp32
    for param in block.parameters():       # the frozen backbone; the adapter trains
        param.requires_grad_(False)
    for param in block.adapter_attn.parameters():
        param.requires_grad_(True)
    rows = []
    for lengths in micro_batches:
        samples, real = len(lengths), sum(lengths)
        for packed in (False, True):
            dense, masks, slots = saved_bytes(block, lengths, packed)
            rows.append({
                "samples": samples, "layout": "packed" if packed else "padded", "real_tokens": real,
                "slots": slots, "padding_fraction": 1 - real / slots,
                "saved_KiB_per_real_token": dense / real / 1024,
                "LxL_scores_KiB_per_real_token (CPU math path only)": masks / real / 1024,
                "checkpointed_KiB_per_real_token": slots * config.dim * 2 / real / 1024,
                "32_layers_GiB": 32 * dense / 2**30,
                "32_layers_checkpointed_GiB": (32 * slots * config.dim * 2 + dense) / 2**30,
            })
    return rows


if __name__ == "__main__":
    main()
