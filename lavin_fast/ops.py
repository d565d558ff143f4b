"""Functional API of the fused ops: inputs checked, then the backend `lavin_fast.backend`
picks (the Triton or native kernels of one torch.library op, or the PyTorch reference).

Inputs are checked here, once, for both backends: a wrong shape, dtype or device is a
`ValueError` naming the tensor, never a broadcast that silently computes something else.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lavin_fast import reference
from lavin_fast.backend import check_once, check_router_order, select_backend

def _expect_shape(op: str, name: str, tensor: Tensor, shape: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _expect_same_device(op: str, x: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")


def _expect_floating(op: str, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")


def mm_adapter(
    x: Tensor,
    conv_A_weight: Tensor,
    conv_A_bias: Tensor,
    conv_B_weight: Tensor,
    conv_B_bias: Tensor,
    conv_D_weight: Tensor,
    conv_D_bias: Tensor,
    routing: Tensor | None = None,
    *,
    routing_index: Tensor | None = None,
    router_weight: Tensor | None = None,
    router_bias: Tensor | None = None,
    temperature: float | None = None,
    router_rows: Tensor | None = None,
    groups: int = 2,
    scale: float = 1.0,
    dropout: float = 0.0,
    check_values: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """The MM-Adapter on tensors held by the caller, in the reference's parameter shapes.

    x: [B, N, d]; conv_A_weight [r, d, 1], conv_A_bias [r]; conv_B_weight and conv_D_weight
    [d, r/groups, 1] (grouped 1x1 convolutions), their biases [d].

    The routing weights, either given or computed by the op's own router:
    - routing: a table [T, 2] of routing weights (e.g. from `reference.route`). Row (b, n) of x
      reads routing[b] when routing_index is None (then routing is [B, 2]), else
      routing[routing_index[b, n]] (routing_index: int32/int64 [B, N] with values in [0, T)):
      padded batches pass row // N, packed rows their sample, per-token routing arange(B*N)
      into a [B*N, 2] table.
    - or router_weight [2, d], router_bias [2] and temperature (the MMAdapter's expert_weights
      and temperature) instead of routing: table row t is
      softmax((x[router_rows[t]] W_r^T + b_r) / temperature), router_rows int32/int64 [T]
      holding flat rows of x (b * N + n): b * N per sample, a packed layout's first tokens
      (with its routing_index), sample 0's rows for the reference's "batch0". router_rows None
      routes every row by itself (no routing_index). A table row's source row must come at or
      before every row reading it (the kernels compute the table in their first pass over x,
      in chunks of rows). The kernels compute the logits in their first pass over x and the
      router's gradient with the rest: no separate pass over x, no full-size temporary.
    Index and router rows are checked in eager mode, not inside torch.compile: a device sync,
    so each tensor is checked once while it is not modified in place (the same index and rows
    serve every adapter of a model's forward: 64 in LaVIN-7B). `check_values=False` skips it for
    rows and index the caller built valid (MMAdapter's own layout).

    `dropout` is the probability of zeroing a hidden unit (0 in eval). Under `torch.autocast`
    the op runs in the autocast dtype (x cast to it, the weights read as they are). Returns y
    [B, N, d] in x's dtype (the autocast dtype under autocast); with the router
    (y, the table it used [T, 2], detached, fp32 or float64). Differentiable in x, every weight,
    `routing` (each table row's gradient sums the rows that read it) or the router's weight and
    bias.
    """
    op = "mm_adapter"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [batch, tokens, dim], got shape {tuple(x.shape)}")
    batch, tokens, dim = x.shape
    if conv_A_weight.dim() != 3:
        raise ValueError(f"{op}: conv_A_weight must be [hidden, dim, 1], got {tuple(conv_A_weight.shape)}")
    hidden = conv_A_weight.shape[0]
    if groups < 1 or dim % groups or hidden % groups:
        raise ValueError(
            f"{op}: dim ({dim}) and hidden ({hidden}) must both be divisible by groups ({groups})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: dropout must be in [0, 1), got {dropout}")
    _expect_shape(op, "conv_A_weight", conv_A_weight, (hidden, dim, 1))
    _expect_shape(op, "conv_A_bias", conv_A_bias, (hidden,))
    for name, weight, bias in (("conv_B", conv_B_weight, conv_B_bias), ("conv_D", conv_D_weight, conv_D_bias)):
        _expect_shape(op, f"{name}_weight", weight, (dim, hidden // groups, 1))
        _expect_shape(op, f"{name}_bias", bias, (dim,))
    tensors = dict(
        conv_A_weight=conv_A_weight, conv_A_bias=conv_A_bias, conv_B_weight=conv_B_weight,
        conv_B_bias=conv_B_bias, conv_D_weight=conv_D_weight, conv_D_bias=conv_D_bias,
    )
    has_router = router_weight is not None
    if has_router:
        table_rows = _check_router(op, routing, router_weight, router_bias, temperature, router_rows, routing_index, x)
        tensors.update(router_weight=router_weight, router_bias=router_bias)
    else:
        if routing is None:
            raise ValueError(f"{op}: pass the routing weights (routing) or the router (router_weight, router_bias, "
                             "temperature)")
        if router_bias is not None or router_rows is not None or temperature is not None:
            raise ValueError(f"{op}: router_bias, router_rows and temperature belong to the router: pass "
                             "router_weight with them")
        if routing_index is None:
            _expect_shape(op, "routing", routing, (batch, 2))
        elif routing.dim() != 2 or routing.shape[1] != 2 or routing.shape[0] == 0:
            raise ValueError(f"{op}: routing must be a table [rows, 2] when routing_index is given, "
                             f"got {tuple(routing.shape)}")
        table_rows = routing.shape[0]
        tensors.update(routing=routing)
    if routing_index is not None:
        _check_routing_index(op, routing_index, table_rows, x, check_values)
    if has_router and router_rows is not None and check_values and not torch.compiler.is_compiling():
        check_once("router_rows", router_rows, tuple(x.shape[:2]),
                   lambda: check_router_rows(op, router_rows, routing_index, x), related=routing_index)
    _expect_floating(op, x=x, **tensors)
    _expect_same_device(op, x, **tensors)

    if torch.is_autocast_enabled(x.device.type):
        # The autocast rule of this op: x in the autocast dtype, the weights as they are.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    down_weight = conv_A_weight.squeeze(-1)                                       # [r, d]

    if select_backend(x) in ("triton", "native"):
        from lavin_fast.kernels.mm_adapter import Router
        from lavin_fast.kernels.mm_adapter import mm_adapter as fused

        # Drawn on the device by torch's generator: reproducible under torch.manual_seed, and
        # traceable, so torch.compile keeps the graph whole when dropout is on.
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device) if dropout > 0 else None
        router = Router(router_weight, router_bias, float(temperature), router_rows) if has_router else None
        # The grouped weights as they are stored ([d, r/groups] views): no dense copy per call.
        return fused(x, down_weight, conv_A_bias, conv_B_weight.squeeze(-1), conv_B_bias, conv_D_weight.squeeze(-1),
                     conv_D_bias, routing, routing_index, scale, dropout, seed, router=router)
    up_weight = torch.stack([reference.grouped_to_dense(conv_B_weight, groups),
                             reference.grouped_to_dense(conv_D_weight, groups)])  # [2, d, r]
    up_bias = torch.stack([conv_B_bias, conv_D_bias])                             # [2, d]
    mask = None
    if dropout > 0:
        keep = torch.empty(batch, tokens, hidden, device=x.device).bernoulli_(1.0 - dropout)
        mask = keep / (1.0 - dropout)
    if has_router:
        routing = reference.route_rows(x, router_weight, router_bias, temperature, router_rows)
        if router_rows is None:   # every row reads its own table row
            routing_index = torch.arange(batch * tokens, device=x.device).view(batch, tokens)
    y = reference.mm_adapter(x, routing, down_weight, conv_A_bias, up_weight, up_bias, scale, mask,
                             routing_index=routing_index)
    return (y, routing.detach()) if has_router else y


def _check_router(op: str, routing: Tensor | None, weight: Tensor, bias: Tensor | None, temperature: float | None,
                  rows: Tensor | None, routing_index: Tensor | None, x: Tensor) -> int:
    """The router's arguments (but its rows' values, `check_router_rows`); returns the table's
    rows T."""
    batch, tokens, dim = x.shape
    if routing is not None:
        raise ValueError(f"{op}: pass either routing (the weights) or router_weight (the router computes them), "
                         "not both")
    if bias is None or temperature is None:
        raise ValueError(f"{op}: router_weight needs router_bias and temperature too")
    # A value check, skipped inside torch.compile as the index's: there the temperature may be
    # symbolic, and math.isfinite broke every adapter's graph (11 recompiles, tests/test_compile.py).
    if not torch.compiler.is_compiling() and (not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}")
    _expect_shape(op, "router_weight", weight, (2, dim))
    _expect_shape(op, "router_bias", bias, (2,))
    if rows is None:
        if routing_index is not None:
            raise ValueError(f"{op}: router_rows=None routes every row by itself and takes no routing_index")
        return batch * tokens
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: router_rows must be int32 or int64, got {rows.dtype}")
    if rows.dim() != 1 or (rows.numel() == 0 and batch * tokens > 0):
        raise ValueError(f"{op}: router_rows must be a non-empty [table rows] vector, got shape {tuple(rows.shape)}")
    if routing_index is None:
        _expect_shape(op, "router_rows (one per sample without a routing_index)", rows, (batch,))
    _expect_same_device(op, x, router_rows=rows)
    return rows.shape[0]


def check_router_rows(op: str, rows: Tensor, routing_index: Tensor | None, x: Tensor) -> None:
    """router_rows' values: flat rows of x, each at or before every row reading its table row
    (`check_router_order`). Skipped inside torch.compile (a host sync, as the index's check)."""
    if not rows.numel() or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(rows))
    if low < 0 or high >= x.shape[0] * x.shape[1]:
        raise ValueError(f"{op}: router_rows values must be flat rows of x in [0, {x.shape[0] * x.shape[1]}) "
                         f"(b * N + n), got values in [{low}, {high}]")
    check_router_order(op, rows, routing_index, x.shape[1])


def _check_routing_index(op: str, routing_index: Tensor, table_rows: int, x: Tensor,
                         check_values: bool = True) -> None:
    """routing_index: integer [B, N] on x's device with every value a row of the routing table
    ([table_rows, 2]); anything else is a ValueError (an out-of-range index would read past the
    table). The values only with `check_values`, once per tensor (`backend.check_once`)."""
    batch, tokens = x.shape[:2]
    if routing_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: routing_index must be int32 or int64, got {routing_index.dtype}")
    _expect_shape(op, "routing_index", routing_index, (batch, tokens))
    _expect_same_device(op, x, routing_index=routing_index)
    # The value check reads the index on the host: a sync, and under torch.compile a graph break
    # in every adapter (11 recompiles in 20 packed steps, tests/test_compile.py). A compiled
    # graph checks shapes, dtypes and devices here and trusts the values.
    if routing_index.numel() and check_values and not torch.compiler.is_compiling():
        check_once("routing_index", routing_index, (table_rows,),
                   lambda: _check_index_values(op, routing_index, table_rows))


def _check_index_values(op: str, routing_index: Tensor, table_rows: int) -> None:
    low, high = (int(v) for v in torch.aminmax(routing_index))
    if low < 0 or high >= table_rows:
        raise ValueError(f"{op}: routing_index values must be in [0, {table_rows}) (rows of routing), "
                         f"got values in [{low}, {high}]")


def visual_neck(
    x: Tensor,
    in_weight: Tensor,
    in_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    activation: str = "silu",
) -> Tensor:
    """The visual neck on tensors held by the caller (see `reference.visual_neck` for the math).

    x: [..., d_in]; in_weight [h, d_in] (silu) or [2h, d_in] (swiglu); in_bias matching;
    out_weight [d_out, h]; out_bias [d_out]. Returns [..., d_out] in x's dtype.
    """
    op = "visual_neck"
    if activation not in ("silu", "swiglu"):
        raise ValueError(f"{op}: activation must be 'silu' or 'swiglu', got {activation!r}")
    if x.dim() < 1 or in_weight.dim() != 2 or out_weight.dim() != 2:
        raise ValueError(
            f"{op}: expected x [..., d_in], in_weight [h, d_in], out_weight [d_out, h]; got "
            f"{tuple(x.shape)}, {tuple(in_weight.shape)}, {tuple(out_weight.shape)}"
        )
    out_dim, hidden = out_weight.shape
    in_rows = hidden * (2 if activation == "swiglu" else 1)
    _expect_shape(op, "in_weight", in_weight, (in_rows, x.shape[-1]))
    _expect_shape(op, "in_bias", in_bias, (in_rows,))
    _expect_shape(op, "out_bias", out_bias, (out_dim,))
    tensors = dict(in_weight=in_weight, in_bias=in_bias, out_weight=out_weight, out_bias=out_bias)
    _expect_floating(op, x=x, **tensors)
    _expect_same_device(op, x, **tensors)

    if select_backend(x) in ("triton", "native"):
        from lavin_fast.kernels.visual_neck import visual_neck as fused

        return fused(x, in_weight, in_bias, out_weight, out_bias, activation)
    return reference.visual_neck(x, in_weight, in_bias, out_weight, out_bias, activation)
