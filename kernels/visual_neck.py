"""The fused visual neck: forward and backward Triton kernels, registered with torch.library.

Math (`lavin_fast.reference.visual_neck`), rows m of x flattened to M = prod(leading dims):

    pre    = x W1^T + b1                               [M, H1]   H1 = h (silu) or 2h (swiglu)
    hidden = silu(pre)                  (silu)         [M, h]
           = silu(pre_g) * pre_v        (swiglu)       pre = [pre_g, pre_v], gate columns first
    y      = hidden W2^T + b2                          [M, d_out]

The forward stores `pre` (fp32), the one thing the backward needs; `hidden` never goes to memory:
every kernel that needs it recomputes it from `pre` (a sigmoid per element). With dy the
upstream gradient, s = sigmoid, silu'(p) = s(p) (1 + p (1 - s(p))):

    dhidden = dy W2                                     [M, h]     (reduction over d_out)
    dpre    = dhidden * silu'(pre)                      (silu)
            = [dhidden * pre_v * silu'(pre_g), dhidden * silu(pre_g)]   (swiglu)
    dx  = dpre W1;  dW1 = dpre^T x;  db1 = sum_m dpre
    dW2 = dy^T hidden;  db2 = sum_m dy

Shapes in LaVIN: M = 6 CLS taps x batch (6..200), d_in = 1024, h = 128, d_out = 4096/5120, so the
weights (fp32, 2.6-3.1 MB) outweigh x and y: every weight is read once from HBM (re-reads by
other programs hit L2), and the kernels are laid out so each weight-gradient tile is owned by one
program that loops over all M rows (no cross-program reduction, deterministic). Two other
reductions are split across programs to fill the GPU at LaVIN's few rows: pre's over d_in
(forward) and dhidden's over d_out (backward); with S splits each writes an fp32 partial and a
small elementwise kernel sums them in a fixed order (deterministic), the backward's while
applying the activation's derivative. S is just enough for a wave, so the partials stay small
(4 S M h bytes: 0.2 MB at M = 192, S = 2).

Eight launches at most: forward `_fwd_pre` (pre, or its partials), `_fwd_pre_sum`, `_fwd_out`
(y); backward `_bwd_out` (dW2, db2), `_bwd_dh` (dpre, or dhidden's partials), `_bwd_dpre`
(dpre), `_bwd_dx` (dx), `_bwd_in` (dW1, db1); the sums run only when there is a split. Every
`tl.dot` has all dims >= 16 (block sizes are powers of two >= 16; masked loads pad with zeros,
silu(0) = 0, so padded rows and hidden units contribute nothing).

Precision: every load is upcast to fp32, every product accumulates in fp32, weight gradients are
fp32 (cast to each weight's dtype by the autograd). The dots' input precision follows x's dtype
(the same rule as kernels/mm_adapter.py): fp32 "ieee" (tf32 would be far less accurate than
PyTorch in fp32); bf16 "tf32" (holds bf16 exactly, rounds the fp32 weights to 10 mantissa bits,
finer than PyTorch's bf16 cast); fp16 "tf32x3" (about fp32 accuracy: plain tf32 would round the
weights exactly as PyTorch's fp16 cast does, leaving no margin under the tests' 2x rule). The
cost is compute the op has to spare (~250 MFLOP forward at LaVIN's shapes). The interpreter
ignores the setting (numpy fp32); the GPU tests judge it.

Public: `visual_neck` (the differentiable op), `visual_neck_forward` / `visual_neck_backward`
(the launches, with block sizes exposed for benchmarks).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from lavin_fast import native
from lavin_fast.kernels import _target
from lavin_fast.kernels._alloc import empty
from lavin_fast.kernels._ints import cdiv, next_power_of_2
from lavin_fast.backend import KERNEL_DTYPES, cpu_runs_native

ACTIVATIONS = ("silu", "swiglu")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _hidden(pre_ptr, rows, units, M, H, SWIGLU: tl.constexpr):
    """hidden[rows, units] (fp32, [BLOCK_M, BLOCK_H]) recomputed from pre; 0 outside [M, H)."""
    ok = (rows < M)[:, None] & (units < H)[None, :]
    if SWIGLU:
        at = rows.to(tl.int64)[:, None] * (2 * H) + units[None, :]
        gate = tl.load(pre_ptr + at, mask=ok, other=0.0)
        value = tl.load(pre_ptr + at + H, mask=ok, other=0.0)
        hidden = gate * tl.sigmoid(gate) * value
    else:
        p = tl.load(pre_ptr + rows.to(tl.int64)[:, None] * H + units[None, :], mask=ok, other=0.0)
        hidden = p * tl.sigmoid(p)
    return hidden


@triton.jit
def _split_tile(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, rows, row_ok, units, unit_ok, k_first,
                k_last, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """sum over k in [k_first, k_last) of a[rows, k] b[k, units], [BLOCK_M, BLOCK_H] fp32, in
    BLOCK_K steps: one program's tile of a product split over its reduction axis (the forward's
    x W1^T over d_in, the backward's dy W2 over d_out), a and b read through their strides."""
    a_rows = rows.to(tl.int64) * stride_am
    b_units = units.to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(k_first, k_last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_last
        a = tl.load(a_ptr + a_rows[:, None] + k[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + k[:, None].to(tl.int64) * stride_bk + b_units[None, :],           # [BLOCK_K, BLOCK_H]
                    mask=k_ok[:, None] & unit_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fwd_pre_kernel(
    x_ptr, w1_ptr, b1_ptr, pre_ptr,
    M, D_IN, H1, K_PER_SPLIT, stride_xm, stride_xk,
    ADD_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """pre = x W1^T + b1 (fp32), grid (row blocks, H1 chunks, d_in splits): one [BLOCK_M,
    BLOCK_H] tile per program over its K_PER_SPLIT columns of d_in, in BLOCK_K steps. One split:
    writes pre (ADD_BIAS). Several (the split over d_in that fills the GPU at LaVIN's few rows):
    writes the split's partial pre_ptr[split] of [splits, M, H1], which `_fwd_pre_sum_kernel`
    adds up with b1. W1 [H1, d_in] and b1 [H1] contiguous.

    HBM bytes: x (M d_in e) + W1 (H1 d_in w) + b1 (4 H1) read once (re-reads of x by the H1
    chunks and of W1 by the row blocks hit L2), pre (or each split's partial) written
    (4 M H1 splits)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, unit_ok = rows < M, units < H1
    k_first = tl.program_id(2) * K_PER_SPLIT
    acc = _split_tile(x_ptr, stride_xm, stride_xk, w1_ptr, 1, D_IN, rows, row_ok, units, unit_ok, k_first,
                      tl.minimum(k_first + K_PER_SPLIT, D_IN), BLOCK_M, BLOCK_H, BLOCK_K, PRECISION)
    if ADD_BIAS:
        acc += tl.load(b1_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
    out = pre_ptr + tl.program_id(2).to(tl.int64) * M * H1
    tl.store(out + rows.to(tl.int64)[:, None] * H1 + units[None, :], acc, mask=row_ok[:, None] & unit_ok[None, :])


@triton.jit
def _fwd_pre_sum_kernel(part_ptr, b1_ptr, pre_ptr, M, H1, SPLITS, BLOCK_E: tl.constexpr):
    """pre = sum_splits part + b1, elementwise over the M H1 entries (splits ascending:
    deterministic). HBM bytes: 4 M H1 (splits + 1) + 4 H1."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < M * H1
    acc = tl.load(b1_ptr + e % H1, mask=ok, other=0.0).to(tl.float32)
    for split in range(0, SPLITS):
        acc += tl.load(part_ptr + split * M * H1 + e, mask=ok, other=0.0)
    tl.store(pre_ptr + e, acc, mask=ok)


@triton.jit
def _fwd_out_kernel(
    pre_ptr, w2_ptr, b2_ptr, y_ptr,
    M, H, D_OUT,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y = act(pre) W2^T + b2, grid (row blocks, d_out chunks): one [BLOCK_M, BLOCK_N] tile of y
    per program, looping over the hidden units in BLOCK_H steps and recomputing hidden from pre.
    W2 [d_out, h], b2 [d_out] contiguous; y [M, d_out] contiguous.

    HBM bytes: pre (4 M H1) + W2 (d_out h w) + b2 (4 d_out) read once (pre re-read per d_out
    chunk and W2 per row block from L2), y written (M d_out e)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < D_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, H, BLOCK_H):
        units = j0 + tl.arange(0, BLOCK_H)
        hidden = _hidden(pre_ptr, rows, units, M, H, SWIGLU)
        w2_t = tl.load(w2_ptr + cols[None, :].to(tl.int64) * H + units[:, None],           # [BLOCK_H, BLOCK_N]
                       mask=(units < H)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(hidden, w2_t, acc, input_precision=PRECISION)
    acc += tl.load(b2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D_OUT + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_out_kernel(
    dy_ptr, pre_ptr, dw2_ptr, db2_ptr,
    M, H, D_OUT, stride_gm, stride_gn,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward of the output layer's weights, grid (d_out chunks, hidden chunks): each program
    owns the [BLOCK_N, BLOCK_H] tile of dW2 (and, in hidden chunk 0, BLOCK_N entries of db2) and
    loops over all M rows: dW2 += dy^T hidden, db2 += sum_m dy.

    HBM bytes: dy (M d_out e) read once (re-read per hidden chunk from L2), pre (4 M H1, from L2
    after the first d_out chunk), dW2 + db2 written (4 d_out (h + 1))."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok, unit_ok = cols < D_OUT, units < H
    dw2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn,
                     mask=(rows < M)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        hidden = _hidden(pre_ptr, rows, units, M, H, SWIGLU)
        dw2 = tl.dot(tl.trans(dy), hidden, dw2, input_precision=PRECISION)
        db2 += tl.sum(dy, axis=0)
    tl.store(dw2_ptr + cols[:, None].to(tl.int64) * H + units[None, :], dw2,
             mask=col_ok[:, None] & unit_ok[None, :])
    if tl.program_id(1) == 0:  # one hidden block writes the bias gradient
        tl.store(db2_ptr + cols, db2, mask=col_ok)


@triton.jit
def _store_dpre(dh, pre_ptr, dpre_ptr, rows, units, ok, H, SWIGLU: tl.constexpr):
    """dpre at the hidden entries (rows, units) (int64 offsets of any broadcastable shapes, `ok`
    their mask) from dhidden there: dh silu'(pre) (silu); swiglu writes the gate column j,
    dh pre_v silu'(pre_g), and the value column h + j, dh silu(pre_g)."""
    if SWIGLU:
        at = rows * (2 * H) + units
        gate = tl.load(pre_ptr + at, mask=ok, other=0.0)
        value = tl.load(pre_ptr + at + H, mask=ok, other=0.0)
        s = tl.sigmoid(gate)
        tl.store(dpre_ptr + at, dh * value * s * (1.0 + gate * (1.0 - s)), mask=ok)
        tl.store(dpre_ptr + at + H, dh * gate * s, mask=ok)
    else:
        at = rows * H + units
        p = tl.load(pre_ptr + at, mask=ok, other=0.0)
        s = tl.sigmoid(p)
        tl.store(dpre_ptr + at, dh * s * (1.0 + p * (1.0 - s)), mask=ok)


@triton.jit
def _bwd_dh_kernel(
    dy_ptr, w2_ptr, pre_ptr, out_ptr,
    M, H, D_OUT, N_PER_SPLIT, stride_gm, stride_gn,
    SWIGLU: tl.constexpr, FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    """dhidden = dy W2, grid (row blocks, hidden chunks, d_out splits): one [BLOCK_M, BLOCK_H]
    tile per program over its N_PER_SPLIT columns of d_out, in BLOCK_N steps. One split (FUSED):
    writes dpre (`_store_dpre`). Several (the split over d_out that fills the GPU at LaVIN's few
    rows): writes the split's fp32 partial out_ptr[split] of [splits, M, h], which
    `_bwd_dpre_kernel` adds up. W2 [d_out, h] contiguous.

    HBM bytes: dy (M d_out e) + W2 (d_out h w) read once (dy re-read per hidden chunk and W2 per
    row block from L2); one split: pre read and dpre written (8 M H1); S splits: the partials
    written (4 S M h)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, unit_ok = rows < M, units < H
    n_first = tl.program_id(2) * N_PER_SPLIT
    dh = _split_tile(dy_ptr, stride_gm, stride_gn, w2_ptr, H, 1, rows, row_ok, units, unit_ok, n_first,
                     tl.minimum(n_first + N_PER_SPLIT, D_OUT), BLOCK_M, BLOCK_H, BLOCK_N, PRECISION)
    ok = row_ok[:, None] & unit_ok[None, :]
    if FUSED:
        _store_dpre(dh, pre_ptr, out_ptr, rows.to(tl.int64)[:, None], units[None, :], ok, H, SWIGLU)
    else:
        part = out_ptr + tl.program_id(2).to(tl.int64) * M * H
        tl.store(part + rows.to(tl.int64)[:, None] * H + units[None, :], dh, mask=ok)


@triton.jit
def _bwd_dpre_kernel(
    dh_part_ptr, pre_ptr, dpre_ptr,
    M, H, SPLITS,
    SWIGLU: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dpre from `_bwd_dh_kernel`'s partials, elementwise over the M h hidden entries e = (m, j),
    BLOCK_E per program: dhidden = sum_splits dh_part[split] (splits ascending: deterministic),
    then `_store_dpre`.

    HBM bytes: partials read (4 S M h, mostly from L2), pre read (4 M H1), dpre written
    (4 M H1)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < M * H
    dh = tl.zeros([BLOCK_E], dtype=tl.float32)
    partial = dh_part_ptr + e
    for _ in range(0, SPLITS):
        dh += tl.load(partial, mask=ok, other=0.0)
        partial += M * H
    _store_dpre(dh, pre_ptr, dpre_ptr, e // H, e % H, ok, H, SWIGLU)


@triton.jit
def _bwd_dx_kernel(
    dpre_ptr, w1_ptr, dx_ptr,
    M, D_IN, H1,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    """dx = dpre W1, grid (row blocks, d_in chunks): one [BLOCK_M, BLOCK_K] tile per program,
    looping over H1 in BLOCK_H steps. dx [M, d_in] contiguous in x's dtype.

    HBM bytes: dpre (4 M H1) + W1 (H1 d_in w) read once (re-reads from L2), dx written
    (M d_in e)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < D_IN
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H1, BLOCK_H):
        units = k0 + tl.arange(0, BLOCK_H)
        unit_ok = units < H1
        dpre = tl.load(dpre_ptr + rows.to(tl.int64)[:, None] * H1 + units[None, :],
                       mask=row_ok[:, None] & unit_ok[None, :], other=0.0)
        w1 = tl.load(w1_ptr + units[:, None].to(tl.int64) * D_IN + cols[None, :],          # [BLOCK_H, BLOCK_K]
                     mask=unit_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(dpre, w1, acc, input_precision=PRECISION)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D_IN + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_in_kernel(
    dpre_ptr, x_ptr, dw1_ptr, db1_ptr,
    M, D_IN, H1, stride_xm, stride_xk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward of the input layer's weights, grid (H1 chunks, d_in chunks): each program owns
    the [BLOCK_H, BLOCK_K] tile of dW1 (and, in d_in chunk 0, BLOCK_H entries of db1) and loops
    over all M rows: dW1 += dpre^T x, db1 += sum_m dpre.

    HBM bytes: x (M d_in e) + dpre (4 M H1) read once (re-reads from L2), dW1 + db1 written
    (4 H1 (d_in + 1))."""
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    unit_ok, col_ok = units < H1, cols < D_IN
    dw1 = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        dpre = tl.load(dpre_ptr + rows.to(tl.int64)[:, None] * H1 + units[None, :],
                       mask=row_ok[:, None] & unit_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        dw1 = tl.dot(tl.trans(dpre), x, dw1, input_precision=PRECISION)
        db1 += tl.sum(dpre, axis=0)
    tl.store(dw1_ptr + units[:, None].to(tl.int64) * D_IN + cols[None, :], dw1,
             mask=unit_ok[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:  # one column block writes the bias gradient
        tl.store(db1_ptr + units, db1, mask=unit_ok)


# ----------------------------------------------------------------------------------------------
# Host side: checks, block sizes, launches
# ----------------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype, precision: str | None) -> str:
    """tl.dot input precision per x dtype (see the module docstring)."""
    if precision is not None:
        return precision
    return {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}[dtype]


def _block_sizes(x: Tensor, rows: int, block_m: int | None, block_n: int | None, block_h: int | None,
                 block_k: int | None) -> tuple[int, int, int, int]:
    """Fill in defaults and check that every block is a power of two >= 16 (the least tl.dot
    dimension on a GPU). Under the interpreter (~1 ms per program) few, large programs. On a GPU
    (or compiling for one) the defaults keep every kernel spill-free in every dtype on sm_80 and
    sm_90 (ptxas -v, offline) and give the launches at ViT batches 16-32 (M = 96-192 rows) at
    least a wave on 132 SMs: 16 rows per block, 16 hidden units per program for `_bwd_out` /
    `_bwd_in`, 32 d_in columns for `_bwd_dx` / `_bwd_in`, 128 d_out columns; `_fwd_pre` and
    `_bwd_dh` split their reduction on top (see `_splits`)."""
    small = _target.arch(x.device) == "interpreter"
    blocks = dict(
        block_m=block_m or (min(32, max(16, next_power_of_2(rows))) if small else 16),
        block_n=block_n or (32 if small else 128),
        block_h=block_h or (32 if small else 16),
        block_k=block_k or 32,
    )
    for name, size in blocks.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"visual_neck kernel: {name} must be a power of two >= 16, got {size}")
    return blocks["block_m"], blocks["block_n"], blocks["block_h"], blocks["block_k"]


def _splits(x: Tensor, tiles: int, length: int, block: int, splits: int | None) -> tuple[int, int]:
    """Split a reduction of `length` (d_in in `_fwd_pre`, d_out in `_bwd_dh`) over programs:
    enough splits for a wave with `tiles` output tiles on the GPU (one under the interpreter), at
    most one per `block`, none empty. Returns (splits, length per split, a multiple of block)."""
    if splits is not None and splits < 1:
        raise ValueError(f"visual_neck kernel: split_k / split_n must be >= 1, got {splits}")
    if splits is None:
        sms = _target.sm_count(x.device, _target.DEFAULT_SMS.get(_target.arch(x.device), 1))
        splits = cdiv(sms, tiles)
    splits = max(1, min(splits, cdiv(length, block)))
    per_split = cdiv(cdiv(length, splits), block) * block
    return cdiv(length, per_split), per_split


def _check(x: Tensor, in_weight: Tensor, out_weight: Tensor, activation: str, in_bias: Tensor | None = None,
           out_bias: Tensor | None = None, dy: Tensor | None = None) -> tuple[int, int, int, int, int]:
    """Kernel preconditions: the kernels index memory from these shapes, so nothing is assumed.
    Returns (M, d_in, h, H1, d_out)."""
    op = "visual_neck kernel"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 1 or in_weight.dim() != 2 or out_weight.dim() != 2:
        raise ValueError(f"{op}: expected x [..., d_in], in_weight [H1, d_in], out_weight [d_out, h]; got "
                         f"{tuple(x.shape)}, {tuple(in_weight.shape)}, {tuple(out_weight.shape)}")
    d_in = x.shape[-1]
    d_out, hidden = out_weight.shape
    in_rows = hidden * (2 if activation == "swiglu" else 1)
    if min(d_in, hidden, d_out) == 0:
        raise ValueError(f"{op}: d_in, h and d_out must be > 0, got {d_in}, {hidden}, {d_out}")
    expected = dict(x=(x, x.shape), in_weight=(in_weight, (in_rows, d_in)), out_weight=(out_weight, out_weight.shape),
                    in_bias=(in_bias, (in_rows,)), out_bias=(out_bias, (d_out,)),
                    dy=(dy, (*x.shape[:-1], d_out)))
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)} ({activation}), got {tuple(tensor.shape)}")
        if tensor.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; the kernel takes {KERNEL_DTYPES}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")
    if not x.is_cuda and not _target.interpreting():
        raise RuntimeError(f"{op}: tensors on {x.device} need a CUDA device or TRITON_INTERPRET=1")
    rows = x.numel() // d_in
    return rows, d_in, hidden, in_rows, d_out


def visual_neck_forward(
    x: Tensor, in_weight: Tensor, in_bias: Tensor, out_weight: Tensor, out_bias: Tensor, activation: str, *,
    block_m: int | None = None, block_n: int | None = None, block_h: int | None = None,
    block_k: int | None = None, split_k: int | None = None, num_warps: int = 4, precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the forward. x [..., d_in] (any strides, fp32/fp16/bf16); in_weight [H1, d_in];
    in_bias [H1]; out_weight [d_out, h]; out_bias [d_out] (H1 = h, or 2h for swiglu).
    Returns y [..., d_out] in x's dtype and pre [..., H1] fp32 (what the backward needs).

    Blocks: block_m rows, block_n d_out columns, block_h hidden units, block_k d_in columns
    (powers of two >= 16; untuned defaults, benchmarks sweep them); split_k: d_in splits of
    `_fwd_pre` (None: enough for a wave of programs on a GPU, see `_splits`).

    HBM bytes, M rows, e = x's element size, w = the weights' (4 for fp32), S = d_in splits:
        _fwd_pre: M d_in e + H1 d_in w + 4 H1 + 4 M H1 (+ 8 S M H1 for S > 1: the partials
                  written and summed by `_fwd_pre_sum_kernel`, mostly in L2)
        _fwd_out: 4 M H1 + d_out h w + 4 d_out + M d_out e
    M = 192 (6 x 32), d_in = 1024, h = 128, d_out = 4096, bf16 x, fp32 weights, silu, S = 1:
    1,016,320 + 3,784,704 = 4,801,024 B (swiglu: 1,639,424 + 3,883,008 = 5,522,432 B); sm_90
    defaults (S = 2 silu) add 393,216 B. The floor (x, weights and biases read once, y written
    once) is 4,604,416 B (swiglu 5,129,216 B); the excess is pre, written once and read once.
    """
    rows, d_in, hidden, in_rows, d_out = _check(x, in_weight, out_weight, activation, in_bias, out_bias)
    lead = tuple(x.shape[:-1])
    y = empty((*lead, d_out), x.dtype, x.device)
    pre = empty((*lead, in_rows), torch.float32, x.device)
    if rows == 0:
        return y, pre
    block_m, block_n, block_h, block_k = _block_sizes(x, rows, block_m, block_n, block_h, block_k)
    precision = _precision(x.dtype, precision)
    x2 = x.reshape(rows, d_in)
    in_bias = in_bias.contiguous()
    tiles = (cdiv(rows, block_m), cdiv(in_rows, block_h))
    splits, k_per_split = _splits(x, tiles[0] * tiles[1], d_in, block_k, split_k)
    out = pre if splits == 1 else empty((splits, rows, in_rows), torch.float32, x.device)
    _fwd_pre_kernel[(*tiles, splits)](
        x2, in_weight.contiguous(), in_bias, out,
        rows, d_in, in_rows, k_per_split, x2.stride(0), x2.stride(1),
        ADD_BIAS=splits == 1, BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_K=block_k, PRECISION=precision,
        num_warps=num_warps,
    )
    if splits > 1:
        block_e = 1024
        _fwd_pre_sum_kernel[(cdiv(rows * in_rows, block_e),)](
            out, in_bias, pre, rows, in_rows, splits, BLOCK_E=block_e, num_warps=num_warps)
    _fwd_out_kernel[(cdiv(rows, block_m), cdiv(d_out, block_n))](
        pre, out_weight.contiguous(), out_bias.contiguous(), y,
        rows, hidden, d_out,
        SWIGLU=activation == "swiglu", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h,
        PRECISION=precision, num_warps=num_warps,
    )
    return y, pre


def visual_neck_backward(
    dy: Tensor, x: Tensor, in_weight: Tensor, out_weight: Tensor, pre: Tensor, activation: str, *,
    block_m: int | None = None, block_n: int | None = None, block_h: int | None = None,
    block_k: int | None = None, block_e: int | None = None, split_n: int | None = None, num_warps: int = 4,
    precision: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward. dy [..., d_out] (any strides, e.g. an expanded ones from .sum());
    x, in_weight, out_weight as in the forward; pre [..., H1] fp32 contiguous, the forward's.
    Returns dx [..., d_in] in x's dtype, then fp32 d in_weight [H1, d_in], d in_bias [H1],
    d out_weight [d_out, h], d out_bias [d_out].

    Blocks as in the forward; block_e: hidden entries per program of the elementwise `_bwd_dpre`;
    split_n: d_out splits S of `_bwd_dh` (None: enough for a wave of programs on a GPU, see
    `_splits`; with one, `_bwd_dh` writes dpre itself and `_bwd_dpre` is not launched).

    HBM bytes, M rows, e = element size of x and dy, w = the weights':
        _bwd_out:  M d_out e + 4 M H1 + 4 d_out (h + 1)
        _bwd_dh:   M d_out e + d_out h w + 4 S M h      (S = 1: + 8 M H1, pre read, dpre written)
        _bwd_dpre: 4 S M h + 4 M H1 + 4 M H1            (S > 1)
        _bwd_dx:   4 M H1 + H1 d_in w + M d_in e
        _bwd_in:   4 M H1 + M d_in e + 4 H1 (d_in + 1)
    dy is read by `_bwd_out` and again by `_bwd_dh`, pre by three launches, dpre by two, the
    partials written and read back: every second touch is an L2 hit at LaVIN's sizes (dy 1.5 MB,
    pre 0.1 MB at M = 192). M = 192, d_in = 1024, h = 128, d_out = 4096, bf16, fp32 weights, silu,
    sm_90 defaults (S = 2): the floor (dy, x and the weights read once, dx and the weight
    gradients written once) is 7,619,072 B (swiglu 8,668,160 B); once each tensor's first touch
    is counted, the excess is the fp32 pre read (98,304 B), dpre written (98,304 B) and the
    partials written (196,608 B).
    """
    rows, d_in, hidden, in_rows, d_out = _check(x, in_weight, out_weight, activation, dy=dy)
    lead = tuple(x.shape[:-1])
    if tuple(pre.shape) != (*lead, in_rows) or pre.dtype != torch.float32 or not pre.is_contiguous():
        raise ValueError(f"visual_neck kernel: pre must be a contiguous fp32 {(*lead, in_rows)} (the forward's), "
                         f"got {pre.dtype} {tuple(pre.shape)}")
    device = x.device
    dx = empty((*lead, d_in), x.dtype, device)
    if rows == 0:
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        return dx, zeros(in_rows, d_in), zeros(in_rows), zeros(d_out, hidden), zeros(d_out)
    block_m, block_n, block_h, block_k = _block_sizes(x, rows, block_m, block_n, block_h, block_k)
    block_e = block_e or (128 if _target.interpreting() else 256)
    precision = _precision(x.dtype, precision)
    swiglu = activation == "swiglu"
    x2, dy2 = x.reshape(rows, d_in), dy.reshape(rows, d_out)
    in_weight, out_weight = in_weight.contiguous(), out_weight.contiguous()

    d_out_weight = empty((d_out, hidden), torch.float32, device)
    d_out_bias = empty((d_out,), torch.float32, device)
    _bwd_out_kernel[(cdiv(d_out, block_n), cdiv(hidden, block_h))](
        dy2, pre, d_out_weight, d_out_bias,
        rows, hidden, d_out, dy2.stride(0), dy2.stride(1),
        SWIGLU=swiglu, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, PRECISION=precision,
        num_warps=num_warps,
    )
    dpre = empty((rows, in_rows), torch.float32, device)
    tiles = (cdiv(rows, block_m), cdiv(hidden, block_h))
    splits, n_per_split = _splits(x, tiles[0] * tiles[1], d_out, block_n, split_n)
    out = dpre if splits == 1 else empty((splits, rows, hidden), torch.float32, device)
    _bwd_dh_kernel[(*tiles, splits)](
        dy2, out_weight, pre, out,
        rows, hidden, d_out, n_per_split, dy2.stride(0), dy2.stride(1),
        SWIGLU=swiglu, FUSED=splits == 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h,
        PRECISION=precision, num_warps=num_warps,
    )
    if splits > 1:
        _bwd_dpre_kernel[(cdiv(rows * hidden, block_e),)](
            out, pre, dpre, rows, hidden, splits, SWIGLU=swiglu, BLOCK_E=block_e, num_warps=num_warps,
        )
    _bwd_dx_kernel[(cdiv(rows, block_m), cdiv(d_in, block_k))](
        dpre, in_weight, dx, rows, d_in, in_rows,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_H=block_h, PRECISION=precision, num_warps=num_warps,
    )
    d_in_weight = empty((in_rows, d_in), torch.float32, device)
    d_in_bias = empty((in_rows,), torch.float32, device)
    _bwd_in_kernel[(cdiv(in_rows, block_h), cdiv(d_in, block_k))](
        dpre, x2, d_in_weight, d_in_bias, rows, d_in, in_rows, x2.stride(0), x2.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_H=block_h, PRECISION=precision, num_warps=num_warps,
    )
    return dx, d_in_weight, d_in_bias, d_out_weight, d_out_bias


# ----------------------------------------------------------------------------------------------
# The op (torch.library): forward, backward, fakes for torch.compile, autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("lavin_fast::visual_neck_fwd", mutates_args=())
def _fwd_op(x: Tensor, in_weight: Tensor, in_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
            activation: str) -> tuple[Tensor, Tensor]:
    return visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, activation)


@_fwd_op.register_kernel("cpu")
def _fwd_cpu(x, in_weight, in_bias, out_weight, out_bias, activation):
    """CPU tensors: the native kernel (csrc/visual_neck.cpp), or under LAVIN_FAST_BACKEND=triton
    the Triton kernels in the interpreter."""
    if cpu_runs_native():
        return native.ops().visual_neck_fwd(x, in_weight, in_bias, out_weight, out_bias, activation)
    return visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, activation)


@_fwd_op.register_fake
def _(x, in_weight, in_bias, out_weight, out_bias, activation):
    lead = tuple(x.shape[:-1])
    return x.new_empty((*lead, out_weight.shape[0])), \
        x.new_empty((*lead, in_weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lavin_fast::visual_neck_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, in_weight: Tensor, out_weight: Tensor, pre: Tensor,
            activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return visual_neck_backward(dy, x, in_weight, out_weight, pre, activation)


@_bwd_op.register_kernel("cpu")
def _bwd_cpu(dy, x, in_weight, out_weight, pre, activation):
    if cpu_runs_native():
        return tuple(native.ops().visual_neck_bwd(dy, x, in_weight, out_weight, pre, activation))
    return visual_neck_backward(dy, x, in_weight, out_weight, pre, activation)


@_bwd_op.register_fake
def _(dy, x, in_weight, out_weight, pre, activation):
    f32 = functools.partial(x.new_empty, dtype=torch.float32)
    return (x.new_empty(x.shape), f32(in_weight.shape), f32(in_weight.shape[:1]),
            f32(out_weight.shape), f32(out_weight.shape[:1]))


def _setup_context(ctx, inputs, output) -> None:
    x, in_weight, in_bias, out_weight, out_bias, activation = inputs
    _, pre = output
    ctx.save_for_backward(x, in_weight, out_weight, pre)
    ctx.activation = activation
    ctx.mark_non_differentiable(pre)


def _backward(ctx, dy: Tensor, _dpre: Tensor):
    x, in_weight, out_weight, pre = ctx.saved_tensors
    # fp32 weight gradients; autograd casts each to its weight's dtype (e.g. a .half() model).
    return (*_bwd_op(dy, x, in_weight, out_weight, pre, ctx.activation), None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def visual_neck(x: Tensor, in_weight: Tensor, in_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
                activation: str) -> Tensor:
    """The fused visual neck, differentiable in x and the four weight tensors.

    x [..., d_in] fp32/fp16/bf16; in_weight [H1, d_in]; in_bias [H1]; out_weight [d_out, h];
    out_bias [d_out]; activation "silu" (H1 = h) or "swiglu" (H1 = 2h, gate rows first).
    Returns y [..., d_out] in x's dtype.
    """
    y, _ = _fwd_op(x, in_weight, in_bias, out_weight, out_bias, activation)
    return y
