"""Scaled dot-product attention for the LLaMA and the ViT: flash-attn or PyTorch SDPA.

Packed rows (several samples in a row, `lavin_fast.models.segments`) run `packed_attention`:
flash-attn's variable-length function when flash-attn is in use; otherwise, on CUDA fp16/bf16,
PyTorch's own FlashAttention-2 variable-length op `torch.nn.attention.varlen.varlen_attn`
(torch >= 2.10, with a backward; it is the same kernel SDPA runs, fed cumulative lengths, so
nothing is computed across samples). Elsewhere (a CPU, fp32/fp64, torch 2.6-2.9) each sample
runs LaVIN's own causal attention (`isolated_first_attention`) on its own slice of the rows,
one call per sample: the samples' own causal squares and no padding (gathering them into one
batch padded to the longest, the second version, did the padded layout's attention work, which
at the tiny preset's widths is most of the step: packed ran 1.0x padded, now 1.54x; a mask over
the whole row's square, the first, 1.4x the pairs). That loop stays out of torch.compile. FlexAttention was not chosen: fast only under torch.compile,
with a block mask to build per batch; nested jagged tensors were not: their SDPA backward
depends on the torch version and backend.

`LAVIN_FAST_ATTENTION` = `auto` (default: flash-attn when it imports and the inputs are CUDA
fp16/bf16, SDPA otherwise), `flash` (required; an error if unusable) or
`sdpa`. On a CUDA GPU, SDPA itself dispatches to FlashAttention-2 kernels inside PyTorch.

Layout everywhere: [batch, seq, heads, head_dim] (flash-attn's), grouped-query attention when
k/v have fewer heads than q.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from lavin_fast.models.segments import Segments

try:  # optional extra `flash`; a broken build (wrong torch/CUDA ABI) must not break import
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:
    flash_attn_func = flash_attn_varlen_func = None
try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except Exception:
    varlen_attn = None

ATTENTION_ENV = "LAVIN_FAST_ATTENTION"
_log = logging.getLogger(__name__)
_reported: set[str] = set()


def attention_backend(q: Tensor) -> str:
    """'flash' or 'sdpa': what `attention` will run for q."""
    choice = os.environ.get(ATTENTION_ENV, "auto").strip().lower()
    if choice not in ("auto", "flash", "sdpa"):
        raise ValueError(f"{ATTENTION_ENV} must be auto, flash or sdpa, got {choice!r}")
    usable = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if choice == "flash" and not usable:
        raise RuntimeError(
            f"{ATTENTION_ENV}=flash but flash-attn is "
            + ("not installed" if flash_attn_func is None else "unusable here (needs CUDA fp16/bf16 inputs)")
        )
    backend = "flash" if (choice != "sdpa" and usable) else "sdpa"
    if backend not in _reported and not torch.compiler.is_compiling():  # say once which kernel runs
        _reported.add(backend)
        _log.info("attention backend: %s", backend)
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v.

    q: [B, Lq, H, Dh]; k, v: [B, Lk, Hkv, Dh] with H % Hkv == 0 -> [B, Lq, H, Dh].
    causal: query i may see keys up to Lk - Lq + i (bottom-right aligned, so a chunk of new
    queries against a longer KV cache is handled; flash-attn aligns the same way).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads not divisible by {k.shape[2]} kv heads")
    if attention_backend(q) == "flash":
        return flash_attn_func(q, k, v, causal=causal)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    lq, lk = q.shape[-2], k.shape[-2]
    square_causal = causal and lq == lk and lq > 1
    attn_mask = None
    if causal and lq > 1 and lq != lk:   # a chunk of queries after a KV cache
        attn_mask = causal_lower_right(lq, lk)
        # CausalBias calls the fused kernels itself, without SDPA's grouped-query handling.
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=square_causal,
                                         enable_gqa=bool(q.shape[1] != k.shape[1]))
    return out.transpose(1, 2)


def isolated_first_attention(q: Tensor, k: Tensor, v: Tensor, *, start_pos: int = 0) -> Tensor:
    """LaVIN's attention: causal, except that no token attends to position 0 (the modality
    token t_m), which sees only itself (REFERENCE.md section 3).

    So position 0's output is its own value and positions 1.. run plain causal attention among
    themselves: two cheap pieces instead of an L x L mask.
    q: [B, Lq, H, Dh] at positions start_pos .. start_pos + Lq - 1; k, v: [B, Lk, Hkv, Dh] at
    positions 0 .. Lk - 1 (a KV cache holds the earlier ones; Lk = start_pos + Lq).
    """
    if start_pos > 0:  # decoding: t_m is only a key here, and nobody may read it
        return attention(q, k[:, 1:], v[:, 1:], causal=True)
    first = v[:, :1].repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    if q.shape[1] == 1:
        return first
    rest = attention(q[:, 1:], k[:, 1:], v[:, 1:], causal=True)
    return torch.cat([first, rest], dim=1)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments) -> Tensor:
    """Causal attention inside each attention segment of `segments`, nothing across them.

    q: [R, L, H, Dh]; k, v: [R, L, Hkv, Dh] -> [R, L, H, Dh]. With `segments.isolate_first`
    each sample's t_m is a segment of its own, so this is LaVIN's mask for every sample.
    """
    rows, length, heads, head_dim = q.shape
    backend = attention_backend(q)
    if backend == "flash" or _torch_varlen_usable(q):
        flat = [t.reshape(rows * length, *t.shape[2:]) for t in (q, k, v)]
        cu, longest = segments.cu_seqlens, segments.max_seqlen
        if backend == "flash":
            out = flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True)
        else:
            _report("torch varlen")
            out = _torch_varlen(*flat, cu, longest)
        return out.view(rows, length, heads, head_dim)
    _report("sdpa, one call per sample")
    return _per_sample_attention(q, k, v, segments.spans, segments.isolate_first)


@torch.compiler.disable
def _per_sample_attention(q: Tensor, k: Tensor, v: Tensor, spans: tuple[int, ...], isolate_first: bool) -> Tensor:
    """One attention call per sample, each its own causal square and nothing more; the spans tile
    the flat rows, so the outputs concatenate back in place. Kept out of torch.compile (a graph
    break in each block): compiled, the loop would bake the lengths into the graph and recompile
    for every new batch."""
    rows, length, heads, head_dim = q.shape
    flat = [t.reshape(rows * length, *t.shape[2:]) for t in (q, k, v)]
    outs = []
    for sample_q, sample_k, sample_v in zip(*(t.split(spans) for t in flat)):
        sample_q, sample_k, sample_v = sample_q[None], sample_k[None], sample_v[None]
        outs.append(isolated_first_attention(sample_q, sample_k, sample_v) if isolate_first
                    else attention(sample_q, sample_k, sample_v, causal=True))
    return torch.cat(outs, dim=1).view(rows, length, heads, head_dim)


def _report(backend: str) -> None:
    if backend not in _reported and not torch.compiler.is_compiling():   # logging breaks a compiled graph
        _reported.add(backend)
        _log.info("attention backend for packed rows: %s", backend)


def _torch_varlen_usable(q: Tensor) -> bool:
    return varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, longest: int) -> Tensor:
    """torch's varlen op, causal; its keyword changed between torch 2.10 (is_causal) and 2.11
    (window_size), and grouped-query heads are repeated (not every version takes enable_gqa)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    causal = {"window_size": (-1, 0)} if "window_size" in _varlen_parameters() else {"is_causal": True}
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, **causal)


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(varlen_attn).parameters)
