"""The plain-PyTorch math of every fused op in lavin_fast, in one place.

Each function here is both the oracle of the kernel tests (called on float64 copies) and the
`torch` backend (called in the input's own dtype, with the parameters cast to it, as autocast
would). Equations follow `REFERENCE.md` and the paper (Luo et al., NeurIPS 2023).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_to_dense(weight: Tensor, groups: int) -> Tensor:
    """A grouped 1x1 Conv1d weight as the dense block-diagonal matrix it multiplies by.

    weight: [d_out, d_in / groups, 1] -> [d_out, d_in]. Output channels of group k read only input
    channels of group k. Differentiable: the dense matrix's gradient flows back onto the blocks
    only, so off-block entries never train.
    """
    d_out, per_group = weight.shape[0], weight.shape[1]
    blocks = weight.reshape(groups, d_out // groups, per_group)
    return torch.block_diag(*blocks.unbind(0))


def route(x0: Tensor, weight: Tensor, bias: Tensor, temperature: float) -> Tensor:
    """Routing weights of the MM-Adapter: w = softmax((x0 W^T + b) / t).

    x0: [B, d] (the modality token, or the CLS token in the ViT); weight [E, d]; bias [E].
    Returns [B, E] in float32 for any lower-precision input (the reference casts to fp16 instead;
    fp32 keeps the two weights summing to one), in float64 for float64 input (the oracle).
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)
    logits = F.linear(x0.to(dtype), weight.to(dtype), bias.to(dtype))
    return torch.softmax(logits / temperature, dim=-1)


def route_rows(x: Tensor, weight: Tensor, bias: Tensor, temperature: float, rows: Tensor | None = None) -> Tensor:
    """The routing table of the op's router: row t routed by x's flat row rows[t] (m = b N + n).

    x: [B, N, d]; rows: integer [T] (None: every row, T = B N). Returns `route` of those rows,
    [T, E]: only the T source rows are gathered, never a copy of x (unless rows is None and x
    is not contiguous)."""
    if rows is None:
        return route(x.reshape(-1, x.shape[-1]), weight, bias, temperature)
    return route(source_rows(x, rows), weight, bias, temperature)


def source_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x's flat rows rows[t] (m = b N + n) gathered: x [B, N, d], rows integer [T] -> [T, d].

    One index_select on the [B N, d] view where batch and tokens merge into one (any
    contiguous x): 3-6 us on a CPU, where the two-dimensional index x[rows // N, rows % N] of
    other strides takes 16-32 us (measured at B = 8, d = 1024 and 4096), per adapter call."""
    batch, tokens, dim = x.shape
    if batch <= 1 or tokens <= 1 or x.stride(0) == tokens * x.stride(1):
        return x.reshape(-1, dim).index_select(0, rows)
    rows = rows.long()
    return x[rows // tokens, rows % tokens]


def mm_adapter(
    x: Tensor,
    routing: Tensor,
    down_weight: Tensor,
    down_bias: Tensor,
    up_weight: Tensor,
    up_bias: Tensor,
    scale: float,
    dropout_mask: Tensor | None = None,
    routing_index: Tensor | None = None,
) -> Tensor:
    """The routed MM-Adapter (paper Eq. 3-4, REFERENCE.md section 1), in dense form.

        h = (x A^T + a) * m                                   [B, N, r]
        y = x + s * sum_e w_e * (h U_e^T + u_e)               [B, N, d]

    x: [B, N, d]; routing w: [B, E], row b's weights, or with routing_index (integer [B, N]) a
    table [T, E] of which row (b, n) reads routing[routing_index[b, n]]; down_weight A: [r, d];
    down_bias a: [r]; up_weight U: [E, d, r] (each expert's block-diagonal up-projection made
    dense); up_bias u: [E, d]; dropout_mask m: [B, N, r] holding 0 or 1/(1-p) (None: no dropout).

    Written as one product with K = E*r: sum_e w_e h U_e^T = [w_0 h, .., w_{E-1} h] [U_0^T; ..].
    """
    dtype = x.dtype
    h = F.linear(x, down_weight.to(dtype), down_bias.to(dtype))
    if dropout_mask is not None:
        h = h * dropout_mask.to(dtype)
    w = routing.to(dtype)
    w = w[:, None, :] if routing_index is None else w[routing_index]       # [B, N or 1, E]
    experts, d, r = up_weight.shape
    routed_h = (w[..., None] * h[:, :, None, :]).flatten(2)                # [B, N, E*r]
    up = up_weight.to(dtype).transpose(1, 2).reshape(experts * r, d)       # [E*r, d]
    routed_bias = w @ up_bias.to(dtype)                                     # [B, N or 1, d]
    return x + scale * (routed_h @ up + routed_bias)


def visual_neck(
    x: Tensor,
    in_weight: Tensor,
    in_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    activation: str,
) -> Tensor:
    """The visual neck that maps CLIP features into the LLM's width (REFERENCE.md section 3).

        silu   (reference):   y = W2 silu(W1 x + b1) + b2
        swiglu (paper Eq. 6): y = W2 (silu(G x + g) * (V x + v)) + b2,  with W1 = [G; V]

    x: [..., d_in]; in_weight: [h, d_in] (silu) or [2h, d_in] (swiglu: gate rows first, then
    value rows); in_bias: [h] or [2h]; out_weight: [d_out, h]; out_bias: [d_out].
    """
    dtype = x.dtype
    pre = F.linear(x, in_weight.to(dtype), in_bias.to(dtype))
    if activation == "silu":
        hidden = F.silu(pre)
    elif activation == "swiglu":
        gate, value = pre.chunk(2, dim=-1)
        hidden = F.silu(gate) * value
    else:
        raise ValueError(f"activation must be 'silu' or 'swiglu', got {activation!r}")
    return F.linear(hidden, out_weight.to(dtype), out_bias.to(dtype))
