"""The trainable pieces of LaVIN as drop-in modules, with the reference's state-dict names.

`MMAdapter` loads a reference `RepAdapter_Router` state dict strictly; `VisualNeck` loads the
reference `adapter_proj` (activation="silu"). Both pick their backend through `lavin_fast.ops`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from lavin_fast import ops, reference

# How an MMAdapter routes (`routing` argument): "cls" each sample by its own position 0 (the
# LLaMA's modality token, the ViT's CLS token); "token" every token by its own features;
# "batch0" token l of every sample by token l of the batch's first sample (the reference's ViT,
# which runs sequence-first: REFERENCE.md section 2).
ROUTING_MODES = ("cls", "token", "batch0")


class MMAdapter(nn.Module):
    """Mixture-of-Modality adapter: a shared down-projection, two routed up-projections.

        w = softmax(expert_weights(x[:, 0]) / temperature)          (unless `weights` is given;
                                                                      computed inside the op)
        y = x + scale * (w_0 * conv_B(h) + w_1 * conv_D(h)),  h = dropout(conv_A(x))

    `routing` ("cls", the default, as above; "token" or "batch0", see `ROUTING_MODES`) says
    which features the router reads: with "token" and "batch0" w is per token, [B, N, 2].

    Identity at initialisation (both up-projections start at zero). The state dict is exactly
    the reference's: conv_A.weight [hidden, dim, 1], conv_A.bias [hidden], conv_B.weight and
    conv_D.weight [dim, hidden/groups, 1], conv_B.bias and conv_D.bias [dim],
    expert_weights.weight [2, dim], expert_weights.bias [2]. `scale` and `temperature` are not in
    it (the reference does not store them); `lavin_fast` adapter files keep them as metadata.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 8,
        groups: int = 2,
        scale: float = 1.0,
        temperature: float = 10.0,
        dropout: float = 0.1,
        routing: str = "cls",
    ) -> None:
        super().__init__()
        if not (isinstance(groups, int) and groups >= 1):
            raise ValueError(f"MMAdapter: groups must be a positive int, got {groups!r}")
        if not math.isfinite(temperature) or temperature <= 0:   # the router divides by it
            raise ValueError(f"MMAdapter: temperature must be a finite number > 0, got {temperature}")
        if dim % groups or hidden_dim % groups:
            raise ValueError(
                f"MMAdapter: dim ({dim}) and hidden_dim ({hidden_dim}) must be divisible by groups ({groups})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MMAdapter: dropout must be in [0, 1), got {dropout}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"MMAdapter: routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.routing = routing
        self.dim, self.hidden_dim, self.groups = dim, hidden_dim, groups
        self.scale, self.temperature, self.dropout = scale, temperature, dropout
        self.conv_A = nn.Conv1d(dim, hidden_dim, 1)
        self.conv_B = nn.Conv1d(hidden_dim, dim, 1, groups=groups)
        self.conv_D = nn.Conv1d(hidden_dim, dim, 1, groups=groups)
        self.expert_weights = nn.Linear(dim, 2)
        self.last_routing: Tensor | None = None
        self._layouts: dict[tuple, tuple[Tensor, Tensor | None]] = {}   # router_layout's, per shape
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: xavier-uniform down-projection, everything else of conv_* zero."""
        nn.init.xavier_uniform_(self.conv_A.weight)
        nn.init.zeros_(self.conv_A.bias)
        for conv in (self.conv_B, self.conv_D):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.expert_weights.reset_parameters()

    def route(self, x0: Tensor) -> Tensor:
        """Routing weights [B, 2] (float32) from the first token x0 [B, dim]."""
        return reference.route(x0, self.expert_weights.weight, self.expert_weights.bias, self.temperature)

    def router_layout(self, x: Tensor, first: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(router_rows, routing_index) of `ops.mm_adapter`'s router for x [B, N, dim] in this
        adapter's mode: "cls" the table [B, 2] routed by each sample's row b * N; "token" every
        row by itself (None, None); "batch0" the table [N, 2] of sample 0's rows, row (b, n)
        reading its row n; with `first` (packed rows, "cls" only) the table [S, 2] routed by each
        sample's first token, `routing_index` (the caller's) saying which sample a row holds."""
        batch, tokens = x.shape[:2]
        if first is not None:
            return first, None
        if self.routing == "token":
            return None, None
        # The same tensors for the same shape (eagerly): the kernels check the rows' order once
        # per tensor (a device sync), not at every call. Those made under inference_mode are
        # kept apart (autograd cannot save an inference tensor).
        eager = not torch.compiler.is_compiling()
        key = (self.routing, batch, tokens, x.device, torch.is_inference_mode_enabled()) if eager else None
        layout = self._layouts.get(key) if eager else None
        if layout is None:
            if self.routing == "cls":
                layout = torch.arange(batch, device=x.device) * tokens, None
            else:
                positions = torch.arange(tokens, device=x.device)
                layout = positions, positions.expand(batch, tokens)
            if eager:
                if len(self._layouts) >= 8:   # a few shapes at a time (padded lengths vary per batch)
                    self._layouts.clear()
                self._layouts[key] = layout
        return layout

    def forward(self, x: Tensor, weights: Tensor | None = None, routing_index: Tensor | None = None, *,
                first: Tensor | None = None) -> Tensor:
        """x: [B, N, dim] -> [B, N, dim]. `weights` [B, 2] (per sample) or [B, N, 2] (per token)
        overrides the router (and gets a gradient); with `routing_index` (int [B, N]) `weights`
        is a table [T, 2] of which row (b, n) reads weights[routing_index[b, n]] (see
        `ops.mm_adapter`). Without `weights` the op's own router computes them (in the kernels'
        pass over x). The weights used are kept, detached, in `self.last_routing` ([B, 2] for
        "cls", [B, N, 2] for "token" and "batch0", [S, 2] with `first`; None when N = 0 and
        nothing was routed: the output is then empty).

        Packed rows (several samples in a row; "cls" routing): `first` [S] holds the flat index
        (b * N + n) of each sample's first token, which the router reads, giving the table
        [S, 2] that `routing_index` indexes (None: one sample per row, S = B).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MMAdapter: x must be [batch, tokens, {self.dim}], got {tuple(x.shape)}")
        if first is not None and (weights is not None or self.routing != "cls"):
            raise ValueError("MMAdapter: `first` routes each sample by its first token: it takes no weights "
                             "and needs routing='cls'")
        if routing_index is not None and weights is None and first is None:
            raise ValueError("MMAdapter: routing_index needs weights (the routing table it indexes) or first")
        adapter = functools.partial(
            ops.mm_adapter, x, self.conv_A.weight, self.conv_A.bias, self.conv_B.weight, self.conv_B.bias,
            self.conv_D.weight, self.conv_D.bias, groups=self.groups, scale=self.scale,
            dropout=self.dropout if self.training else 0.0)
        if weights is None:
            if x.shape[1] == 0:   # no first token to route on, and no token to adapt
                self.last_routing = None
                return x.clone()
            router_rows, index = self.router_layout(x, first)
            # Rows and index of this adapter's own layout are valid by construction: their value
            # checks (device syncs) only run for a caller's `first` and routing_index.
            y, table = adapter(routing_index=routing_index if first is not None else index,
                               router_weight=self.expert_weights.weight, router_bias=self.expert_weights.bias,
                               temperature=self.temperature, router_rows=router_rows,
                               check_values=first is not None)
            if self.routing == "token":          # a table row per row
                table = table.view(*x.shape[:2], 2)
            elif self.routing == "batch0":       # a table row per position, sample 0's
                table = table.expand(*x.shape[:2], 2)
            self.last_routing = table
            return y
        self.last_routing = weights.detach()
        if weights.dim() == 3:
            if routing_index is not None or weights.shape != (*x.shape[:2], 2):
                raise ValueError(f"MMAdapter: per-token weights must be {(*x.shape[:2], 2)} without a "
                                 f"routing_index, got {tuple(weights.shape)}")
            # Per-token routing is a table with one row per token, each token reading its own.
            routing_index = torch.arange(weights.shape[0] * weights.shape[1], device=x.device).view(x.shape[:2])
            weights = weights.reshape(-1, 2)
        return adapter(weights, routing_index=routing_index)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, groups={self.groups}, "
                f"scale={self.scale}, temperature={self.temperature}, dropout={self.dropout}, "
                f"routing={self.routing!r}")


NECK_ACTIVATIONS = ("silu", "swiglu")


class VisualNeck(nn.Module):
    """Maps the ViT's CLS features [..., in_dim] to the LLM's width [..., out_dim].

    activation="silu": the reference's `Linear -> SiLU -> Linear`; state dict conv_A.weight
    [hidden, in], conv_A.bias [hidden], conv_B.weight [out, hidden], conv_B.bias [out].
    activation="swiglu": the paper's Eq. 6 as a gated unit, y = conv_B(silu(g) * v) with
    [g; v] = conv_A(x): conv_A.weight is [2 * hidden, in], gate rows first, then value rows.
    Init as the reference: xavier-uniform weights, zero biases.
    """

    def __init__(self, in_dim: int = 1024, hidden_dim: int = 128, out_dim: int = 4096,
                 activation: str = "silu") -> None:
        super().__init__()
        if activation not in NECK_ACTIVATIONS:
            raise ValueError(f"VisualNeck: activation must be one of {NECK_ACTIVATIONS}, got {activation!r}")
        self.in_dim, self.hidden_dim, self.out_dim, self.activation = in_dim, hidden_dim, out_dim, activation
        self.conv_A = nn.Linear(in_dim, hidden_dim * (2 if activation == "swiglu" else 1))
        self.conv_B = nn.Linear(hidden_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.conv_A, self.conv_B):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_dim] -> [..., out_dim]."""
        return ops.visual_neck(x, self.conv_A.weight, self.conv_A.bias,
                               self.conv_B.weight, self.conv_B.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, out_dim={self.out_dim}, "
                f"activation={self.activation!r}")
