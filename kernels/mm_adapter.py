"""The fused MM-Adapter: forward and backward Triton kernels, registered with torch.library.

Math (dense form, `lavin_fast.reference.mm_adapter`), rows m = (b, n) of x flattened, M = B*N:

    h   = (x A^T + a) * mask                       [M, r]   mask: 0 or 1/(1-p), Philox(seed)
    hw  = [w_0(b) h, w_1(b) h]                     [M, 2r]  the routed hidden state
    y   = x + s * (hw U^T + w_0(b) u_0 + w_1(b) u_1)         U^T = [U_0^T; U_1^T]  [2r, d]

The two routed up-projections are one product with K = 2r (REFERENCE.md section 1). Every
`tl.dot` has all dims >= 16: the hidden axis is padded to K_PAD = max(16, next_pow2(2r)) (and
to R_PAD = max(16, next_pow2(r)) where only h is multiplied); masked loads make the padding 0.
The kernels work on a "doubled" hidden axis k in [0, K_PAD): column k holds expert k // r,
hidden unit k % r (k < 2r), so the down-projection writes h straight into the routed layout.

Backward, with hd = h * mask (saved by the forward) and dy the upstream gradient:

    dhw   = s * dy [U_0, U_1]                      [M, 2r]
    dw_e  = sum_rows_of_b( hd . dhw_e + s * dy . u_e )       routing  [B, 2]
    dh    = (w_0 dhw_0 + w_1 dhw_1) * mask         [M, r]
    dx    = dy + dh A;   dA = dh^T x;   da = sum_m dh
    dU_e  = s * (w_e hd)^T dy  (dense [d, r]; autograd keeps only the grouped blocks)
    du_e  = s * sum_m w_e dy

Precision: every load is upcast to fp32 and every product accumulates in fp32. The dots'
input precision follows x's dtype (the tests hold each to <= 2x PyTorch's own error there):
- fp32: "ieee" (true fp32; tf32 would be far less accurate than PyTorch in fp32);
- bf16: "tf32", which holds bf16 x and dy exactly and rounds the fp32 weights and hidden state
  to 10 mantissa bits, finer than the 7 bits PyTorch rounds them to in bf16;
- fp16: "tf32x3" (three tf32 products, ~fp32 accuracy). Plain tf32 rounds the weights exactly
  as PyTorch's fp16 cast does, which leaves no margin on the routing gradient: an emulation of
  the kernels with tf32 operands broke the 2x rule on d routing in 2 of 200 random problems.
The interpreter ignores the setting (numpy fp32); the GPU tests judge it.

Public: `mm_adapter` (the differentiable op), `mm_adapter_forward` / `mm_adapter_backward`
(the launches, with block sizes exposed for benchmarks), `dropout_mask` (the exact mask the
kernels use, for tests).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lavin_fast.kernels._alloc import empty
from lavin_fast.ops import KERNEL_DTYPES


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dropout_multiplier(seed, rows, units, hidden, p):
    """Dropout factor of h[rows, units] (0 or 1/(1-p)): Philox at offset row * hidden + unit.

    The single definition of the mask: the forward and backward kernel 1 draw it here (kernel 2
    reads the saved hd), and so does `dropout_mask`, so the backward replays the forward's mask."""
    offsets = rows[:, None] * hidden + units[None, :]
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _routing(w_ptr, batch, row_ok, stride_wb, stride_we):
    """w_0, w_1 of each row's sample, fp32 (0 on rows past the end)."""
    w0 = tl.load(w_ptr + batch * stride_wb, mask=row_ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + batch * stride_wb + stride_we, mask=row_ok, other=0.0).to(tl.float32)
    return w0, w1


@triton.jit
def _mm_adapter_fwd_kernel(
    x_ptr, w_ptr, a_w_ptr, a_b_ptr, u_w_ptr, u_b_ptr, y_ptr, hd_ptr,
    M, N, D, R,
    stride_xb, stride_xn, stride_xd, stride_wb, stride_we,
    scale, p, seed_ptr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Each program takes row blocks of BLOCK_M rows (block pid, pid + programs, ...). Pass 1
    (d ascending): h = x A^T + a. Pass 2 (d descending, so the x tiles read last in pass 1, the
    likeliest still in L2, are re-read first): y = x + s (hw U^T + routed bias).
    Weights are contiguous: A [r, d], U [2, d, r], u [2, d]."""
    scale = tl.cast(scale, tl.float32)
    p = tl.cast(p, tl.float32)
    k = tl.arange(0, K_PAD)
    expert, unit, k_ok = k // R, k % R, k < 2 * R
    cols = tl.arange(0, BLOCK_D)
    num_chunks = tl.cdiv(D, BLOCK_D)
    for block in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        batch = rows // N
        x_row = batch.to(tl.int64) * stride_xb + (rows % N).to(tl.int64) * stride_xn

        h = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            c_ok = c < D
            x = tl.load(x_ptr + x_row[:, None] + c[None, :] * stride_xd,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            a_t = tl.load(a_w_ptr + unit[None, :] * D + c[:, None],                 # [BLOCK_D, K_PAD]
                          mask=k_ok[None, :] & c_ok[:, None], other=0.0).to(tl.float32)
            h = tl.dot(x, a_t, h, input_precision=PRECISION)
        h += tl.load(a_b_ptr + unit, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            h = h * _dropout_multiplier(tl.load(seed_ptr), rows, unit, R, p)
        tl.store(hd_ptr + rows[:, None] * R + k[None, :], h, mask=row_ok[:, None] & (k < R)[None, :])

        w0, w1 = _routing(w_ptr, batch, row_ok, stride_wb, stride_we)
        hw = h * tl.where(expert[None, :] == 0, w0[:, None], w1[:, None])
        for i in range(0, num_chunks):
            c = (num_chunks - 1 - i) * BLOCK_D + cols
            c_ok = c < D
            tile_ok = row_ok[:, None] & c_ok[None, :]
            x = tl.load(x_ptr + x_row[:, None] + c[None, :] * stride_xd, mask=tile_ok, other=0.0).to(tl.float32)
            u_t = tl.load(u_w_ptr + expert[:, None] * D * R + c[None, :] * R + unit[:, None],  # [K_PAD, BLOCK_D]
                          mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            u0 = tl.load(u_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            u1 = tl.load(u_b_ptr + D + c, mask=c_ok, other=0.0).to(tl.float32)
            up = tl.dot(hw, u_t, input_precision=PRECISION) + w0[:, None] * u0[None, :] + w1[:, None] * u1[None, :]
            y = x + scale * up
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=tile_ok)


@triton.jit
def _mm_adapter_bwd_rows_kernel(
    dy_ptr, w_ptr, u_w_ptr, u_b_ptr, hd_ptr, dh_ptr, dw_ptr,
    M, N, D, R,
    stride_gb, stride_gn, stride_gd, stride_wb, stride_we,
    scale, p, seed_ptr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward 1 of 2, one program = BLOCK_M rows, one pass over d: dhw = s dy [U_0, U_1] and
    dy . u_e, then the per-row routing gradient dw [M, 2] and the hidden gradient dh [M, r]."""
    scale = tl.cast(scale, tl.float32)
    p = tl.cast(p, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    batch = rows // N
    g_row = batch.to(tl.int64) * stride_gb + (rows % N).to(tl.int64) * stride_gn
    k = tl.arange(0, K_PAD)
    expert, unit, k_ok = k // R, k % R, k < 2 * R
    cols = tl.arange(0, BLOCK_D)

    dhw = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
    dy_u0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    dy_u1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        c_ok = c < D
        dy = tl.load(dy_ptr + g_row[:, None] + c[None, :] * stride_gd,
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        u = tl.load(u_w_ptr + expert[None, :] * D * R + c[:, None] * R + unit[None, :],  # [BLOCK_D, K_PAD]
                    mask=k_ok[None, :] & c_ok[:, None], other=0.0).to(tl.float32)
        dhw = tl.dot(dy, u, dhw, input_precision=PRECISION)
        u0 = tl.load(u_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        u1 = tl.load(u_b_ptr + D + c, mask=c_ok, other=0.0).to(tl.float32)
        dy_u0 += tl.sum(dy * u0[None, :], axis=1)
        dy_u1 += tl.sum(dy * u1[None, :], axis=1)
    dhw = dhw * scale

    hd = tl.load(hd_ptr + rows[:, None] * R + unit[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    routing_terms = hd * dhw
    dw0 = tl.sum(tl.where(expert[None, :] == 0, routing_terms, 0.0), axis=1) + scale * dy_u0
    dw1 = tl.sum(tl.where(expert[None, :] == 1, routing_terms, 0.0), axis=1) + scale * dy_u1
    tl.store(dw_ptr + rows * 2, dw0, mask=row_ok)
    tl.store(dw_ptr + rows * 2 + 1, dw1, mask=row_ok)

    # dh[:, j] = w_0 dhw[:, j] + w_1 dhw[:, r + j]: columns j and r + j folded by a 0/1 matrix
    # (a K_PAD x K_PAD product, exact in ieee; cheaper than a register shuffle in Triton).
    w0, w1 = _routing(w_ptr, batch, row_ok, stride_wb, stride_we)
    routed = dhw * tl.where(expert[None, :] == 0, w0[:, None], w1[:, None])
    fold = ((unit[:, None] == unit[None, :]) & k_ok[:, None] & k_ok[None, :]).to(tl.float32)
    dh = tl.dot(routed, fold, input_precision="ieee")
    if HAS_DROPOUT:
        dh = dh * _dropout_multiplier(tl.load(seed_ptr), rows, unit, R, p)
    tl.store(dh_ptr + rows[:, None] * R + k[None, :], dh, mask=row_ok[:, None] & (k < R)[None, :])


@triton.jit
def _mm_adapter_bwd_cols_kernel(
    dy_ptr, x_ptr, w_ptr, a_w_ptr, hd_ptr, dh_ptr, dx_ptr, da_part_ptr, du_part_ptr, dub_part_ptr,
    M, N, D, R, BLOCKS_PER_GROUP,
    stride_gb, stride_gn, stride_gd, stride_xb, stride_xn, stride_xd, stride_wb, stride_we,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr, K_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward 2 of 2, grid (d chunks, row groups): each program owns BLOCK_D columns and
    BLOCKS_PER_GROUP row blocks. It writes dx = dy + dh A for its tiles and accumulates, in fp32
    registers, its share of dA = dh^T x, dU = s hw^T dy and du_e = s sum w_e dy; the shares go
    to [row_groups, ...] buffers that the host sums (deterministic)."""
    scale = tl.cast(scale, tl.float32)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    group = tl.program_id(1)
    i = tl.arange(0, R_PAD)
    i_ok = i < R
    k = tl.arange(0, K_PAD)
    expert, unit, k_ok = k // R, k % R, k < 2 * R

    a = tl.load(a_w_ptr + i[:, None] * D + c[None, :], mask=i_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    da_acc = tl.zeros([R_PAD, BLOCK_D], dtype=tl.float32)
    du_acc = tl.zeros([K_PAD, BLOCK_D], dtype=tl.float32)
    dub0_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dub1_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = group * BLOCKS_PER_GROUP
    last = tl.minimum(first + BLOCKS_PER_GROUP, tl.cdiv(M, BLOCK_M))
    for block in range(first, last):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        batch = rows // N
        n = (rows % N).to(tl.int64)
        tile_ok = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + (batch.to(tl.int64) * stride_gb + n * stride_gn)[:, None] + c[None, :] * stride_gd,
                     mask=tile_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (batch.to(tl.int64) * stride_xb + n * stride_xn)[:, None] + c[None, :] * stride_xd,
                    mask=tile_ok, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows[:, None] * R + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        dx = dy + tl.dot(dh, a, input_precision=PRECISION)
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        da_acc = tl.dot(tl.trans(dh), x, da_acc, input_precision=PRECISION)

        w0, w1 = _routing(w_ptr, batch, row_ok, stride_wb, stride_we)
        hd = tl.load(hd_ptr + rows[:, None] * R + unit[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        hw = hd * tl.where(expert[None, :] == 0, w0[:, None], w1[:, None])
        du_acc = tl.dot(tl.trans(hw), dy, du_acc, input_precision=PRECISION)
        dub0_acc += tl.sum(w0[:, None] * dy, axis=0)
        dub1_acc += tl.sum(w1[:, None] * dy, axis=0)

    tl.store(da_part_ptr + (group * R + i[:, None]) * D + c[None, :], da_acc,
             mask=i_ok[:, None] & c_ok[None, :])
    tl.store(du_part_ptr + (group * 2 * R + k[:, None]) * D + c[None, :], du_acc * scale,
             mask=k_ok[:, None] & c_ok[None, :])
    tl.store(dub_part_ptr + group * 2 * D + c, dub0_acc * scale, mask=c_ok)
    tl.store(dub_part_ptr + group * 2 * D + D + c, dub1_acc * scale, mask=c_ok)


@triton.jit
def _dropout_mask_kernel(out_ptr, M, R, p, seed_ptr, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    units = tl.arange(0, R_PAD)
    mask = _dropout_multiplier(tl.load(seed_ptr), rows, units, R, tl.cast(p, tl.float32))
    tl.store(out_ptr + rows[:, None] * R + units[None, :], mask, mask=(rows < M)[:, None] & (units < R)[None, :])


# ----------------------------------------------------------------------------------------------
# Host side: checks, block sizes, launches
# ----------------------------------------------------------------------------------------------

def _seed_tensor(seed: int | Tensor | None, device: torch.device) -> Tensor:
    """The Philox seed as a 1-element int64 tensor on `device`. The kernels load it, so a seed
    drawn on the device by `torch.randint` flows through `torch.compile` without a graph break."""
    if seed is None:
        raise ValueError("mm_adapter kernel: dropout needs a seed")
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"mm_adapter kernel: seed must be one int32/int64 element, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pads(hidden: int) -> tuple[int, int]:
    """(R_PAD, K_PAD): the hidden axis and the doubled (routed) axis padded for tl.dot (>= 16)."""
    return max(16, triton.next_power_of_2(hidden)), max(16, triton.next_power_of_2(2 * hidden))


def _precision(dtype: torch.dtype, precision: str | None) -> str:
    """tl.dot input precision per x dtype (see the module docstring)."""
    if precision is not None:
        return precision
    return {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}[dtype]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check(x: Tensor, routing: Tensor, down_weight: Tensor, up_weight: Tensor, up_bias: Tensor,
           down_bias: Tensor | None = None, dy: Tensor | None = None) -> tuple[int, int, int, int]:
    """Kernel preconditions: the kernels index memory from these shapes, so nothing is assumed.
    Returns (B, N, d, r)."""
    op = "mm_adapter kernel"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [batch, tokens, dim], got shape {tuple(x.shape)}")
    batch, tokens, dim = x.shape
    if down_weight.dim() != 2 or down_weight.shape[1] != dim or down_weight.shape[0] == 0:
        raise ValueError(f"{op}: down_weight must be [hidden, {dim}], got {tuple(down_weight.shape)}")
    hidden = down_weight.shape[0]
    expected = dict(x=(x, x.shape), routing=(routing, (batch, 2)), down_weight=(down_weight, down_weight.shape),
                    up_weight=(up_weight, (2, dim, hidden)), up_bias=(up_bias, (2, dim)),
                    down_bias=(down_bias, (hidden,)), dy=(dy, x.shape))
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
        if tensor.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; the kernel takes {KERNEL_DTYPES}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(f"{op}: tensors on {x.device} need a CUDA device or TRITON_INTERPRET=1")
    if dim == 0 or batch * tokens * max(hidden, 2) >= 2**31:
        raise ValueError(f"{op}: need dim > 0 and batch * tokens * hidden < 2**31 (int32 offsets of h and "
                         f"the dropout stream), got x {tuple(x.shape)}, hidden {hidden}")
    return batch, tokens, dim, hidden


def mm_adapter_forward(
    x: Tensor, routing: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
    up_bias: Tensor, scale: float, dropout_p: float = 0.0, seed: int | Tensor | None = None, *,
    block_m: int = 32, block_d: int = 64, programs: int | None = None, num_warps: int = 8,
    num_stages: int = 2, precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the forward. x [B, N, d] (any strides); routing [B, 2]; down_weight [r, d];
    down_bias [r]; up_weight [2, d, r]; up_bias [2, d]. Returns y [B, N, d] in x's dtype and
    hd [B, N, r] fp32, the hidden state after dropout (what the backward needs).

    `programs` caps the grid (each program then walks several row blocks): the knob that keeps
    the row blocks in flight, programs * block_m * d * e bytes, inside L2. None: one program per
    row block. The defaults are untimed: the largest tiles that ptxas compiles for sm_90 without
    register spills in all three dtypes (an offline compile; benchmarks sweep them). At ~184
    registers x 256 threads one program fits per SM, so an H100 holds 132 x 256 KB = 34 MB of
    row blocks in flight for d = 4096 bf16: inside its 50 MB L2.

    HBM bytes, M = B N, e = x's element size, fp32 weights: read x (M d e), write y (M d e),
    write hd (4 M r), read the weights once (4 (3 r d + 2 d + r)): 2 M d e + 4 M r + ~12 r d.
    That is the floor, reached when pass 2's re-read of each x tile hits L2; when the row blocks
    in flight outgrow L2, up to one more M d e.
    B=4, N=512, d=4096, r=8, bf16: 33,554,432 + 65,536 + 426,048 = 34.0 MB (floor 33.6 MB).
    """
    batch, tokens, dim, hidden = _check(x, routing, down_weight, up_weight, up_bias, down_bias=down_bias)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"mm_adapter kernel: dropout_p must be in [0, 1), got {dropout_p}")
    rows = batch * tokens
    y = empty(tuple(x.shape), x.dtype, x.device)
    hd = empty((batch, tokens, hidden), torch.float32, x.device)
    if rows == 0:
        return y, hd
    row_blocks = triton.cdiv(rows, block_m)
    _, k_pad = _pads(hidden)
    _mm_adapter_fwd_kernel[(min(row_blocks, programs or row_blocks),)](
        x, routing, down_weight.contiguous(), down_bias.contiguous(), up_weight.contiguous(),
        up_bias.contiguous(), y, hd,
        rows, tokens, dim, hidden,
        x.stride(0), x.stride(1), x.stride(2), routing.stride(0), routing.stride(1),
        float(scale), float(dropout_p), _seed_tensor(seed, x.device) if dropout_p > 0 else x,  # x: never read
        HAS_DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_D=block_d, K_PAD=k_pad,
        PRECISION=_precision(x.dtype, precision), num_warps=num_warps, num_stages=num_stages,
    )
    return y, hd


def mm_adapter_backward(
    dy: Tensor, x: Tensor, routing: Tensor, down_weight: Tensor, up_weight: Tensor, up_bias: Tensor,
    hd: Tensor, scale: float, dropout_p: float = 0.0, seed: int | Tensor | None = None, *,
    block_m: int = 16, block_d_rows: int = 64, block_d_cols: int = 64, row_groups: int | None = None,
    num_warps: int = 8, num_stages: int = 3, precision: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward. dy, x [B, N, d] (any strides); hd [B, N, r] fp32 from the forward.
    Returns dx [B, N, d] in x's dtype, then fp32 d routing [B, 2], d down_weight [r, d],
    d down_bias [r], d up_weight [2, d, r] (dense), d up_bias [2, d].

    Kernel 1 takes block_m rows x block_d_rows columns per step; kernel 2 block_m rows x
    block_d_cols columns, in row_groups groups (None: about two waves of programs on a GPU).
    Defaults chosen as in the forward (spill-free on sm_90, untimed).

    HBM bytes, M = B N, e = element size, G = row groups: kernel 1 reads dy (M d e); kernel 2
    reads dy and x and writes dx (3 M d e); per row, dh (written, read twice), hd (read twice)
    and dw (written, read) add M (20 r + 16); the fp32 partials are written and summed once,
    8 G (3 r + 2) d, plus 4 (3 r + 2) d for the sums; weights 4 (3 r d + 2 d):
    4 M d e + M (20 r + 16) + (8 G + 4) (3 r + 2) d + 12 r d + 8 d.
    B=4, N=512, d=4096, r=8, bf16, H100 (G=5): 67,108,864 + 360,448 + 4,685,824 + 425,984
    = 72.6 MB. The floor is 3 M d e = 50.3 MB: dh needs a whole row of dy before any dx can be
    written, so dy is read twice (once from L2 at best, as in the forward, when a problem's dy
    fits there).
    """
    batch, tokens, dim, hidden = _check(x, routing, down_weight, up_weight, up_bias, dy=dy)
    if tuple(hd.shape) != (batch, tokens, hidden) or hd.dtype != torch.float32 or not hd.is_contiguous():
        raise ValueError(f"mm_adapter kernel: hd must be a contiguous fp32 [{batch}, {tokens}, {hidden}] "
                         f"(the forward's), got {hd.dtype} {tuple(hd.shape)}")
    rows = batch * tokens
    device = x.device
    dx = empty(tuple(x.shape), x.dtype, device)
    if rows == 0:
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        return dx, zeros(batch, 2), zeros(hidden, dim), zeros(hidden), zeros(2, dim, hidden), zeros(2, dim)
    r_pad, k_pad = _pads(hidden)
    row_blocks, col_blocks = triton.cdiv(rows, block_m), triton.cdiv(dim, block_d_cols)
    if row_groups is None:  # few partials under the interpreter
        row_groups = 2 if _interpreting() else triton.cdiv(2 * _sm_count(device.index or 0), col_blocks)
    blocks_per_group = triton.cdiv(row_blocks, max(1, min(row_groups, row_blocks)))
    row_groups = triton.cdiv(row_blocks, blocks_per_group)  # no empty group
    precision = _precision(x.dtype, precision)
    down_weight, up_weight, up_bias = down_weight.contiguous(), up_weight.contiguous(), up_bias.contiguous()
    has_dropout = dropout_p > 0

    dh = empty((rows, hidden), torch.float32, device)
    dw_rows = empty((rows, 2), torch.float32, device)
    _mm_adapter_bwd_rows_kernel[(row_blocks,)](
        dy, routing, up_weight, up_bias, hd, dh, dw_rows,
        rows, tokens, dim, hidden,
        dy.stride(0), dy.stride(1), dy.stride(2), routing.stride(0), routing.stride(1),
        float(scale), float(dropout_p), _seed_tensor(seed, x.device) if dropout_p > 0 else x,  # x: never read
        HAS_DROPOUT=has_dropout, BLOCK_M=block_m, BLOCK_D=block_d_rows, K_PAD=k_pad,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    da_part = empty((row_groups, hidden, dim), torch.float32, device)
    du_part = empty((row_groups, 2 * hidden, dim), torch.float32, device)
    dub_part = empty((row_groups, 2, dim), torch.float32, device)
    _mm_adapter_bwd_cols_kernel[(col_blocks, row_groups)](
        dy, x, routing, down_weight, hd, dh, dx, da_part, du_part, dub_part,
        rows, tokens, dim, hidden, blocks_per_group,
        dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
        routing.stride(0), routing.stride(1),
        float(scale),
        BLOCK_M=block_m, BLOCK_D=block_d_cols, R_PAD=r_pad, K_PAD=k_pad, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    d_routing = dw_rows.view(batch, tokens, 2).sum(1)
    d_up_weight = du_part.sum(0).view(2, hidden, dim).transpose(1, 2).contiguous()
    return dx, d_routing, da_part.sum(0), dh.sum(0), d_up_weight, dub_part.sum(0)


def dropout_mask(seed: int | Tensor, batch: int, tokens: int, hidden: int, p: float,
                 device: torch.device | str = "cpu") -> Tensor:
    """The dropout mask the kernels apply for `seed`: [B, N, r] fp32, 0 or 1/(1-p).

    Drawn by the same Philox helper as the kernels, so `reference.mm_adapter(..., dropout_mask=m)`
    reproduces a kernel call with the same seed and p exactly."""
    rows = batch * tokens
    out = empty((batch, tokens, hidden), torch.float32, torch.device(device))
    if rows:
        block_m = 64
        _dropout_mask_kernel[(triton.cdiv(rows, block_m),)](
            out, rows, hidden, float(p), _seed_tensor(seed, out.device), BLOCK_M=block_m, R_PAD=triton.next_power_of_2(hidden))
    return out


# ----------------------------------------------------------------------------------------------
# The op (torch.library): forward, backward, fakes for torch.compile, autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("lavin_fast::mm_adapter_fwd", mutates_args=())
def _fwd_op(x: Tensor, routing: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
            up_bias: Tensor, scale: float, dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return mm_adapter_forward(x, routing, down_weight, down_bias, up_weight, up_bias, scale, dropout_p, seed)


@_fwd_op.register_fake
def _fwd_fake(x, routing, down_weight, down_bias, up_weight, up_bias, scale, dropout_p, seed):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty((*x.shape[:2], down_weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lavin_fast::mm_adapter_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, routing: Tensor, down_weight: Tensor, up_weight: Tensor,
            up_bias: Tensor, hd: Tensor, scale: float, dropout_p: float, seed: Tensor | None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return mm_adapter_backward(dy, x, routing, down_weight, up_weight, up_bias, hd, scale, dropout_p, seed)


@_bwd_op.register_fake
def _bwd_fake(dy, x, routing, down_weight, up_weight, up_bias, hd, scale, dropout_p, seed):
    f32 = functools.partial(x.new_empty, dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), f32(routing.shape),
            f32(down_weight.shape), f32(down_weight.shape[:1]), f32(up_weight.shape), f32(up_bias.shape))


def _setup_context(ctx, inputs, output) -> None:
    x, routing, down_weight, down_bias, up_weight, up_bias, scale, dropout_p, seed = inputs
    _, hd = output
    ctx.save_for_backward(x, routing, down_weight, up_weight, up_bias, hd, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.dtypes = [t.dtype for t in (routing, down_weight, down_bias, up_weight, up_bias)]
    ctx.mark_non_differentiable(hd)


def _backward(ctx, dy: Tensor, _dhd: Tensor):
    x, routing, down_weight, up_weight, up_bias, hd, seed = ctx.saved_tensors
    dx, *grads = _bwd_op(dy, x, routing, down_weight, up_weight, up_bias, hd,
                         ctx.scale, ctx.dropout_p, seed)
    grads = [g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
    return (dx, *grads, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def mm_adapter(x: Tensor, routing: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
               up_bias: Tensor, scale: float, dropout_p: float = 0.0, seed: int | Tensor | None = None) -> Tensor:
    """The fused MM-Adapter, differentiable in x, routing and the four weight tensors.

    x [B, N, d] fp32/fp16/bf16; routing [B, 2]; down_weight [r, d]; down_bias [r];
    up_weight [2, d, r] (dense); up_bias [2, d]; dropout on h with probability dropout_p, mask
    from `seed` (see `dropout_mask`; an int, or a one-element integer tensor, e.g. drawn with
    `torch.randint` on x's device, which keeps `torch.compile` graphs whole). Returns y
    [B, N, d] in x's dtype.
    """
    y, _ = _fwd_op(x, routing, down_weight, down_bias, up_weight, up_bias, float(scale), float(dropout_p),
                  _seed_tensor(seed, x.device) if dropout_p > 0 else None)
    return y
