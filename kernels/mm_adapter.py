"""The fused MM-Adapter: forward and backward Triton kernels, registered with torch.library.

Math (dense form, `lavin_fast.reference.mm_adapter`), rows m = (b, n) of x flattened, M = B*N,
each row reading its routing weights from a table through an index, t(m) = index[b, n]
(or t(m) = b without an index):

    h   = (x A^T + a) * mask                       [M, r]   mask: 0 or 1/(1-p), Philox(seed)
    y   = x + s * (w_0(t) (h U_0^T + u_0) + w_1(t) (h U_1^T + u_1))

U_0, U_1 are the grouped 1x1 convolutions conv_B, conv_D, read in their grouped form
[d, r/g] (g groups): output channel c of group c // (d/g) reads hidden units
(c // (d/g)) r/g + j, j < r/g. Nothing dense is ever built; inside a tile the two experts sit
on one "doubled" hidden axis k in [0, K_PAD) (expert k // r, unit k % r), so the two routed
up-projections are one product with K = 2r whose off-group entries are masked to zero.

Backward, with hd = h * mask (saved by the forward) and dy the upstream gradient:

    dhw_e = s dy U_e                              [M, r]   per expert
    dw_e  = hd . dhw_e + s dy . u_e               [M]      summed into routing row t(m)
    dh    = (w_0 dhw_0 + w_1 dhw_1) * mask        [M, r]
    dx    = dy + dh A;   dA = dh^T x;   da = sum_m dh
    dU_e  = s (w_e hd)^T dy  (only the grouped entries);   du_e = s sum_m w_e dy

Launches. Forward, per chunk of rows (see below): `_down_kernel` (partial x A^T over d slices,
grid slices x row groups, each program holding its A slice for all its row blocks),
`_hidden_kernel` (sums the partials, adds a, applies dropout: hd), `_up_kernel` (y, grid
row blocks x column blocks); a few rows (at most the table's `small_rows`: decoding, one token
per sample) take `_small_kernel` alone, one launch with no partials, each program computing hd
for every row (the launch, not the bytes, is a decode step's cost). Backward, per chunk:
`_dhw_kernel` (partial dy [U_0, U_1] and dy . u_e over d slices), `_dh_kernel` (dh and the
per-row routing gradient), `_cols_kernel` (dx and per-row-group fp32 partials of dA, dU, du,
da, grid column blocks x row groups); then once `_reduce_kernel` sums the partials into the
gradients in their final layouts.

L2 by design: the second read of x (forward, in `_up_kernel`) and of dy (backward, in
`_cols_kernel`) follow the first read within one chunk of rows whose x (dy) is at most
`chunk_bytes` (per arch in `BLOCK_CONFIGS`); the first read marks its lines evict_last, the
second evict_first. The chunk is sized for the backward, the longer reuse: between a row's two
reads of dy the chunk's dy, x and dx stream through, so 3 chunks (plus partials) must sit in
about 3/4 of L2 (40 MB A100, 50 MB H100/H200), with room to spare: 8 MiB chunks on both. The
compile report's HBM model checks this (benchmarks/compile_report.py): on H100 16 MB chunks
left 7B bf16's backward dy re-read a miss, 1.25x the floor; 11 MiB fitted 7B (1.06x) but not
13B fp16 (1.37x) nor ViT-L fp16 (1.17x); 8 MiB leaves every training call of the three models
at 1.05-1.07x the floor in every dtype, on A100 too (9 MiB left 13B fp32 there at 1.31x). The
partials of `_down` / `_dhw` are laid out [M, slices, width], so a chunk's are one range. More
chunks are more launches (13B: 3 per call instead of 2), which only a GPU can weigh.

Precision: every reduction accumulates in fp32. With `dot16` (the table's choice per arch and
dtype) the products of bf16/fp16 inputs run on 16-bit MMAs: the tile of x or dy as it is, the
fp32 weights and hidden state rounded to x's dtype, as PyTorch's own run in that dtype rounds
them; the two products whose fp32 operand must stay fp32-accurate, dy U (it feeds the routing
gradient) and dU's (w hd)^T dy, run as two 16-bit MMAs on that operand split into a head and a
scaled tail (`_split16`): ~22 bits of it in fp16, 16 in bf16 (one 16-bit rounding of U broke the
tests' 2x rule on the routing gradient in fp16). fp32 inputs use "ieee" throughout (tf32 would
be far less accurate than PyTorch in fp32); with `dot16` off, 16-bit inputs take fp32 operands
at "tf32" (bf16) / "tf32x3" (fp16).

Public: `mm_adapter` (the differentiable op), `mm_adapter_forward` / `mm_adapter_backward`
(the launches, `config=` overriding `BLOCK_CONFIGS`), `launch_config`, `dropout_mask` (the exact
mask the kernels use, for tests).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from lavin_fast import native, reference
from lavin_fast.kernels import _target
from lavin_fast.kernels._alloc import empty
from lavin_fast.kernels._ints import cdiv, next_power_of_2
from lavin_fast.backend import KERNEL_DTYPES, check_once, check_router_order, cpu_runs_native

# Block sizes per (GPU arch, x's dtype). Untimed (no GPU has run them yet): chosen offline so
# that every kernel compiles for sm_80 and sm_90 without spills, the main launches at 7B
# micro-batch 4 fill a wave, and enough bytes are in flight per SM (~20 KB on H100). A GPU
# sweep overrides any key through the launch functions' `config=`.
#   block_m        rows per step of the row-streaming kernels (_down, _dhw; >= 16 for tl.dot)
#   block_slice    d columns per program of _down (its weight slice stays in registers)
#   block_slice_dhw  the same for _dhw
#   block_m_up, block_d_up, num_warps_up        rows per step, columns per program, warps of _up
#   block_m_cols, block_d_cols, num_warps_cols  the same for _cols
#   block_rows     rows per program of the row-wise kernels (_hidden, _dh)
#   block_reduce   elements per program of _reduce
#   num_warps      of _down / _dhw
#   num_stages     of the streaming kernels (>= 3: their loads multi-buffered)
#   waves          programs to aim for, in multiples of the SM count (_cols: one wave)
#   chunk_bytes    rows per chunk: x (dy) of a chunk at most this many bytes (the L2 re-read set)
#   sms            SM count assumed where no device can be asked (offline compiles)
#   dot16          16-bit MMAs on bf16/fp16 inputs (see the module docstring)
#   small_rows     rows up to which the forward is one launch (`_small_kernel`: decoding)
#   block_k_small, block_d_small, num_warps_small, num_stages_small  its d columns per step of
#                  the pass over x, columns per program, warps, stages
# Per dtype, where register pressure decides (ptxas -v, sm_80 and sm_90): _cols holds three
# accumulators and three operand tiles (128-148 registers, no spills, at 16 x 64 in 16-bit and
# 32 x 32 in fp32). _dhw takes 512-wide slices in 16-bit (190-226 registers, no spills), which
# halves its partials' bytes against 256; fp16 had to keep 128 while its dy U ran as tf32x3 (three
# tf32 products spilled 428 B at 256, sm_90), leaving its training calls at 1.16-1.23x the floor:
# the head-and-tail split (module docstring) fits 512. fp32 ("ieee") keeps 256. _down in both
# 16-bit dtypes takes 512 on 16-bit MMAs (71-94 registers, no spills; fp16 at 128 was 1.11x the
# floor evaluating, 512 1.04x). _up streams 64 x 128 tiles of x through two shared-memory
# buffers: 32 KB in flight per SM in 16-bit (one block of 8 warps, 203-233 registers, no spills;
# 32-row tiles left 16 KB). _small_kernel at 8 and 32 rows, with the per-row router or without,
# compiles without spills on 8 warps (120-174 registers) with 128-column steps in 16-bit and 64 in
# fp32 (4 warps spilled up to 608 B in fp32 with the router; 128-column fp32 steps 448 B at 32 rows).
_GPU = dict(block_m=16, block_slice=256, block_m_up=64, block_d_up=128, num_warps_up=8, block_rows=64,
            block_reduce=1024, num_warps=4, num_warps_cols=8, num_stages=3, waves=2, small_rows=32, block_d_small=128,
            num_warps_small=8, num_stages_small=3)
_HALF = dict(block_m_cols=16, block_d_cols=64, block_slice=512, block_slice_dhw=512, block_k_small=128)
_PER_DTYPE = dict(float32=dict(block_m_cols=32, block_d_cols=32, block_slice_dhw=256, block_k_small=64), float16=_HALF,
                  bfloat16=_HALF)
BLOCK_CONFIGS: dict[tuple[str, str], dict] = {
    **{(arch, dtype): dict(_GPU, **own, chunk_bytes=8 << 20, sms=sms, dot16=dtype != "float32")
       for arch, sms in (("sm90", 132), ("sm80", 108)) for dtype, own in _PER_DTYPE.items()},
    # Triton's CPU interpreter (tests): ~1 ms per program and loop step, so few of both; small
    # chunks and slices so that every multi-chunk, multi-slice, multi-group path runs.
    **{("interpreter", dtype): dict(block_m=16, block_slice=128, block_slice_dhw=128, block_m_up=16, block_d_up=128,
                                    num_warps_up=4, block_m_cols=16, block_d_cols=128, block_rows=32, block_reduce=1024,
                                    num_warps=4, num_warps_cols=4, num_stages=3, waves=1, chunk_bytes=128 << 10, sms=4,
                                    dot16=dtype != "float32", small_rows=4, block_k_small=128, block_d_small=64,
                                    num_warps_small=4, num_stages_small=3)
       for dtype in _PER_DTYPE},
}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dropout_multiplier(seed, rows, units, hidden, p):
    """Dropout factor of h[rows, units] (0 or 1/(1-p)): Philox at offset row * hidden + unit.

    The single definition of the mask: `_hidden_kernel`, `_small_kernel` (through `_hidden_units`)
    and `_dh_kernel` draw it here, and so does `dropout_mask`, so the backward replays the
    forward's mask."""
    offsets = rows[:, None] * hidden + units[None, :]
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _row_offsets(rows, N, stride_b, stride_n):
    """Offsets (int64) of rows m = b N + n in a [B, N, ...] tensor with these strides."""
    return (rows // N).to(tl.int64) * stride_b + (rows % N).to(tl.int64) * stride_n


# How a row m = b N + n finds its routing-table row t (the TABLE_ROW constexpr of the kernels):
# t = b, t = index[b, n], or t = m (a table row per row: the fused router's per-token routing).
BY_SAMPLE, BY_INDEX, BY_ROW = (tl.constexpr(mode) for mode in range(3))


@triton.jit
def _routing(w_ptr, index_ptr, rows, row_ok, N, TABLE_ROWS, stride_ib, stride_in, stride_wr, stride_we,
             TABLE_ROW: tl.constexpr):
    """(t, ok, w_0, w_1) of each row: its routing-table row t (see BY_SAMPLE, BY_INDEX, BY_ROW)
    and that row's weights in fp32; ok is False (and w 0) for rows past the end and for an
    index outside [0, TABLE_ROWS), which is never read."""
    if TABLE_ROW == BY_INDEX:
        t = tl.load(index_ptr + _row_offsets(rows, N, stride_ib, stride_in), mask=row_ok, other=0).to(tl.int64)
    elif TABLE_ROW == BY_ROW:
        t = rows.to(tl.int64)
    else:
        t = (rows // N).to(tl.int64)
    ok = row_ok & (t >= 0) & (t < TABLE_ROWS)
    w0 = tl.load(w_ptr + t * stride_wr, mask=ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + t * stride_wr + stride_we, mask=ok, other=0.0).to(tl.float32)
    return t, ok, w0, w1


@triton.jit
def _grouped_entries(w_ptr, units, units_ok, cols, col_ok, D_GROUP, R_GROUP):
    """One up-projection's entries U[cols, units] as [len(units), len(cols)] fp32, read from its
    grouped form [d, r/g]: column c holds units of its group only (0 elsewhere)."""
    j = units[:, None] - (cols // D_GROUP)[None, :] * R_GROUP       # unit within the column's group
    ok = units_ok[:, None] & col_ok[None, :] & (j >= 0) & (j < R_GROUP)
    return tl.load(w_ptr + cols[None, :] * R_GROUP + j, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _grouped_up(b_w_ptr, d_w_ptr, cols, col_ok, D_GROUP, R_GROUP, R, K_PAD: tl.constexpr):
    """The two up-projections' entries for columns `cols` on the doubled hidden axis,
    [K_PAD, len(cols)] fp32 (0 off the groups)."""
    k = tl.arange(0, K_PAD)
    expert, unit = k // R, k % R
    return (_grouped_entries(b_w_ptr, unit, expert == 0, cols, col_ok, D_GROUP, R_GROUP)
            + _grouped_entries(d_w_ptr, unit, expert == 1, cols, col_ok, D_GROUP, R_GROUP))


# fp32 operands on 16-bit MMAs: v = head + tail / TAIL_SCALE, both in x's dtype. The head holds
# 11 (fp16) / 8 (bf16) bits of v, the scaled tail the next 11 / 8, so against an operand exact in
# its dtype (dy) two 16-bit products give v's ~22 / 16 bits, fp32-level in fp16 (as tf32x3, three
# tf32 products, at a third of the registers). 2^11 keeps fp16's tail (~2^-11 v) out of its
# subnormals.
TAIL_SCALE = tl.constexpr(2048.0)


@triton.jit
def _split16(v, dtype: tl.constexpr):
    """(head, tail) of fp32 v in the 16-bit `dtype`: v = head + tail / TAIL_SCALE (above)."""
    head = v.to(dtype)
    return head, ((v - head.to(tl.float32)) * TAIL_SCALE).to(dtype)


@triton.jit
def _down_weights(a_w_ptr, r_w_ptr, cols, col_ok, D, R, R_PAD: tl.constexpr, HAS_ROUTER: tl.constexpr,
                  DOT16: tl.constexpr, dtype: tl.constexpr):
    """A^T's rows `cols`, [len(cols), R_PAD]: fp32, or in x's `dtype` with DOT16. With HAS_ROUTER
    W_r's rows sit in A's padding, each as its rounding to x's dtype (units R, R + 1) and the
    remainder (R + 2, R + 3): the one product over x also gives the routing logits, to fp32
    accuracy on 16-bit MMAs too (x is exact in its dtype)."""
    i = tl.arange(0, R_PAD)
    a_t = tl.load(a_w_ptr + i[None, :] * D + cols[:, None], mask=(i < R)[None, :] & col_ok[:, None], other=0.0,
                  eviction_policy="evict_last").to(tl.float32)
    if HAS_ROUTER:
        unit = i - R
        w_r = tl.load(r_w_ptr + (unit % 2)[None, :] * D + cols[:, None], mask=((unit >= 0) & (unit < 4))[None, :]
                      & col_ok[:, None], other=0.0, eviction_policy="evict_last").to(tl.float32)
        head = w_r.to(dtype).to(tl.float32)
        a_t += tl.where((unit < 2)[None, :], head, w_r - head)
    if DOT16:
        a_t = a_t.to(dtype)
    return a_t


@triton.jit
def _router_softmax(h, R, r_b_ptr, inv_temperature, R_PAD: tl.constexpr):
    """Each row's routing weights (w_0, w_1) = softmax((z + b_r) / temperature) from h = x [A |
    W_r head | W_r tail]^T summed over d ([rows, R_PAD], `_down_weights`): z_e = h[R + e] +
    h[R + 2 + e]."""
    inv_temperature = tl.cast(inv_temperature, tl.float32)
    unit = (tl.arange(0, R_PAD) - R)[None, :]
    z0 = tl.sum(tl.where((unit == 0) | (unit == 2), h, 0.0), axis=1) + tl.load(r_b_ptr).to(tl.float32)
    z1 = tl.sum(tl.where((unit == 1) | (unit == 3), h, 0.0), axis=1) + tl.load(r_b_ptr + 1).to(tl.float32)
    z0, z1 = z0 * inv_temperature, z1 * inv_temperature
    top = tl.maximum(z0, z1)
    e0, e1 = tl.exp(z0 - top), tl.exp(z1 - top)
    return e0 / (e0 + e1), e1 / (e0 + e1)


@triton.jit
def _hidden_units(h, rows, R, a_b_ptr, p, seed_ptr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr):
    """hd = (h + a) * mask for h = x A^T summed over d ([rows, R_PAD]); 0 past unit R."""
    i = tl.arange(0, R_PAD)
    h += tl.load(a_b_ptr + i, mask=i < R, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        h = h * _dropout_multiplier(tl.load(seed_ptr), rows, i, R, tl.cast(p, tl.float32))
    return tl.where((i < R)[None, :], h, 0.0)


@triton.jit
def _down_kernel(
    x_ptr, a_w_ptr, r_w_ptr, part_ptr,
    row0, row1, N, D, R, WIDTH, BLOCKS_PER_GROUP,
    stride_xb, stride_xn, stride_xd,
    HAS_ROUTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SLICE: tl.constexpr, R_PAD: tl.constexpr,
    DOT16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward 1 of 3, grid (d slices, row groups): part[m, slice] = x[m, slice] A[:, slice]^T
    for the rows [row0, row1) of one chunk, and with HAS_ROUTER the routing logits' partials
    x[m, slice] W_r[:, slice]^T beside them (W_r's rows in A's padding: the same product).
    A program loads its slice of A (and W_r) once ([BLOCK_SLICE, R_PAD], kept in registers) and
    streams BLOCKS_PER_GROUP row blocks of x through it, x marked evict_last (`_up_kernel`
    reads it again). part: [M, slices, WIDTH] fp32 (a chunk's partials one contiguous range),
    WIDTH = r (+ 4 with the router).

    HBM bytes per chunk of Mc rows: x read (Mc d e); A (and W_r) read from L2 once per row
    group (4 WIDTH d G); partials written (4 Mc WIDTH d / BLOCK_SLICE), read back by
    `_hidden_kernel`."""
    c = tl.program_id(0) * BLOCK_SLICE + tl.arange(0, BLOCK_SLICE)
    c_ok = c < D
    i = tl.arange(0, R_PAD)
    a_t = _down_weights(a_w_ptr, r_w_ptr, c, c_ok, D, R, R_PAD, HAS_ROUTER, DOT16, x_ptr.dtype.element_ty)
    first = row0 + tl.program_id(1) * BLOCKS_PER_GROUP * BLOCK_M
    last = tl.minimum(first + BLOCKS_PER_GROUP * BLOCK_M, row1)
    for m0 in range(first, last, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        x = tl.load(x_ptr + _row_offsets(rows, N, stride_xb, stride_xn)[:, None] + c[None, :] * stride_xd,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0, eviction_policy="evict_last")
        if DOT16:
            h = tl.dot(x, a_t)
        else:
            h = tl.dot(x.to(tl.float32), a_t, input_precision=PRECISION)
        out = part_ptr + (rows.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * WIDTH
        tl.store(out[:, None] + i[None, :], h, mask=row_ok[:, None] & (i < WIDTH)[None, :])


@triton.jit
def _hidden_kernel(part_ptr, a_b_ptr, r_b_ptr, hd_ptr, probs_ptr, row0, row1, R, WIDTH, SLICES, p, seed_ptr,
                   inv_temperature, HAS_ROUTER: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   R_PAD: tl.constexpr):
    """Forward 2 of 3, BLOCK_ROWS rows per program: hd = (sum_slices part + a) * mask [M, r];
    with HAS_ROUTER also every row's routing weights softmax((z + b_r) / temperature) into
    probs [M, 2], z_e the summed logits (units R + e and R + 2 + e of the partials).

    HBM bytes: partials read (4 Mc WIDTH slices, from L2), hd written (4 Mc r), probs (8 Mc)."""
    rows = row0 + tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < row1
    i = tl.arange(0, R_PAD)
    h = tl.zeros([BLOCK_ROWS, R_PAD], dtype=tl.float32)
    for s in range(0, SLICES):
        h += tl.load(part_ptr + (rows * SLICES + s)[:, None] * WIDTH + i[None, :],
                     mask=row_ok[:, None] & (i < WIDTH)[None, :], other=0.0)
    if HAS_ROUTER:
        w0, w1 = _router_softmax(h, R, r_b_ptr, inv_temperature, R_PAD)
        tl.store(probs_ptr + rows * 2, w0, mask=row_ok)
        tl.store(probs_ptr + rows * 2 + 1, w1, mask=row_ok)
    hd = _hidden_units(h, rows, R, a_b_ptr, p, seed_ptr, HAS_DROPOUT, R_PAD)
    tl.store(hd_ptr + rows[:, None] * R + i[None, :], hd, mask=row_ok[:, None] & (i < R)[None, :])


@triton.jit
def _up_kernel(
    x_ptr, w_ptr, index_ptr, hd_ptr, b_w_ptr, d_w_ptr, b_b_ptr, d_b_ptr, y_ptr,
    row0, row1, N, D, R, D_GROUP, R_GROUP, TABLE_ROWS, BLOCKS_PER_GROUP,
    stride_xb, stride_xn, stride_xd, stride_ib, stride_in, stride_wr, stride_we, scale,
    TABLE_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HIDDEN: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Forward 3 of 3, grid (column blocks, row groups of the chunk): a program streams
    BLOCKS_PER_GROUP row blocks of its BLOCK_D columns: y = x + s (w_0 (hd U_0^T + u_0) + w_1 (hd
    U_1^T + u_1)), one rank-1 update per hidden unit (r of them; an entry of U is 0 off its
    column's group). No tl.dot: Triton multi-buffers the loads of a loop without one when the
    loop asks for stages (tl.range num_stages), and x's tile, the stream here, feeds no dot (with
    hw U^T on tl.dot it was a plain load). The 2 r FMAs per element cost ~4 us at 7B micro-batch 4
    on an H100's fp32 units, under the ~10 us the tile's bytes take. x is read the second time
    (evict_first: the chunk's last use). y [M, d] contiguous.

    HBM bytes per chunk: y written (Mc d e); x read again from L2 (Mc d e); U's and u's columns
    from L1/L2 per row block (8 (r + 1) BLOCK_D), hd from L2 (4 Mc r per column block)."""
    scale = tl.cast(scale, tl.float32)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    group = c // D_GROUP
    u0 = tl.load(b_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    u1 = tl.load(d_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    first = row0 + tl.program_id(1) * BLOCKS_PER_GROUP * BLOCK_M
    last = tl.minimum(first + BLOCKS_PER_GROUP * BLOCK_M, row1)
    for m0 in tl.range(first, last, BLOCK_M, num_stages=NUM_STAGES):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        _, _, w0, w1 = _routing(w_ptr, index_ptr, rows, row_ok, N, TABLE_ROWS, stride_ib, stride_in,
                                stride_wr, stride_we, TABLE_ROW)
        tile_ok = row_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + _row_offsets(rows, N, stride_xb, stride_xn)[:, None] + c[None, :] * stride_xd,
                    mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
        sw0, sw1 = scale * w0, scale * w1
        y = x + sw0[:, None] * u0[None, :] + sw1[:, None] * u1[None, :]
        for unit in tl.static_range(HIDDEN):
            hd = tl.load(hd_ptr + rows * R + unit, mask=row_ok, other=0.0)             # [BLOCK_M]
            j = unit - group * R_GROUP                                                  # unit within c's group
            in_group = c_ok & (j >= 0) & (j < R_GROUP)
            ub = tl.load(b_w_ptr + c * R_GROUP + j, mask=in_group, other=0.0).to(tl.float32)
            ud = tl.load(d_w_ptr + c * R_GROUP + j, mask=in_group, other=0.0).to(tl.float32)
            y += (sw0 * hd)[:, None] * ub[None, :] + (sw1 * hd)[:, None] * ud[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _small_kernel(
    x_ptr, a_w_ptr, a_b_ptr, r_w_ptr, r_b_ptr, w_ptr, index_ptr, b_w_ptr, d_w_ptr, b_b_ptr, d_b_ptr, hd_ptr, y_ptr,
    ROWS, N, D, R, D_GROUP, R_GROUP, TABLE_ROWS,
    stride_xb, stride_xn, stride_xd, stride_ib, stride_in, stride_wr, stride_we, scale, p, seed_ptr, inv_temperature,
    TABLE_ROW: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr, DOT16: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The whole forward in one launch for a few rows (ROWS <= BLOCK_M: decoding, one token
    per sample), grid (column blocks,). A launch costs more than these bytes take (at 7B decode
    x is 64 KB), so every program computes hd for all the rows over all of d, as `_down_kernel`
    and `_hidden_kernel` do between them (x and A streamed through, from L2 after the first
    program's read), then y for its BLOCK_D columns as `_up_kernel` does, the up-projections as
    two products hd U_e^T. Program 0 writes hd [ROWS, r] and, with HAS_ROUTER (then every row
    routes itself, TABLE_ROW is BY_ROW), the table of routing weights at w_ptr [ROWS, 2].

    HBM bytes: x read once (M d e; its second read, and every other program's, from L2), y
    written (M d e), the weights once (4 (W d + 2 d r/g + 2 d + r), W = r, + 2 with the router),
    hd (4 M r), the table (8 M): no partials. L2 reads: each program M d e + 4 W d, 192 KB at 7B
    bf16 decode (M = 8), 2-5 us at an SM's share of L2 bandwidth (40-100 GB/s; a model: the
    sweep times the "*small*" settings at decode)."""
    scale = tl.cast(scale, tl.float32)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    row_offsets = _row_offsets(rows, N, stride_xb, stride_xn)
    i = tl.arange(0, R_PAD)
    h = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        a_t = _down_weights(a_w_ptr, r_w_ptr, k, k_ok, D, R, R_PAD, HAS_ROUTER, DOT16, x_ptr.dtype.element_ty)
        x = tl.load(x_ptr + row_offsets[:, None] + k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0, eviction_policy="evict_last")
        if DOT16:
            h = tl.dot(x, a_t, h)
        else:
            h = tl.dot(x.to(tl.float32), a_t, h, input_precision=PRECISION)
    if HAS_ROUTER:
        w0, w1 = _router_softmax(h, R, r_b_ptr, inv_temperature, R_PAD)
        w0, w1 = tl.where(row_ok, w0, 0.0), tl.where(row_ok, w1, 0.0)
    else:
        _, _, w0, w1 = _routing(w_ptr, index_ptr, rows, row_ok, N, TABLE_ROWS, stride_ib, stride_in,
                                stride_wr, stride_we, TABLE_ROW)
    hd = _hidden_units(h, rows, R, a_b_ptr, p, seed_ptr, HAS_DROPOUT, R_PAD)
    if tl.program_id(0) == 0:
        tl.store(hd_ptr + rows[:, None] * R + i[None, :], hd, mask=row_ok[:, None] & (i < R)[None, :])
        if HAS_ROUTER:
            tl.store(w_ptr + rows * 2, w0, mask=row_ok)
            tl.store(w_ptr + rows * 2 + 1, w1, mask=row_ok)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    tile_ok = row_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + row_offsets[:, None] + c[None, :] * stride_xd, mask=tile_ok, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    u0 = tl.load(b_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    u1 = tl.load(d_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    up0 = tl.dot(hd, _grouped_entries(b_w_ptr, i, i < R, c, c_ok, D_GROUP, R_GROUP), input_precision="ieee")
    up1 = tl.dot(hd, _grouped_entries(d_w_ptr, i, i < R, c, c_ok, D_GROUP, R_GROUP), input_precision="ieee")
    y = x + (scale * w0)[:, None] * (u0[None, :] + up0) + (scale * w1)[:, None] * (u1[None, :] + up1)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dhw_kernel(
    dy_ptr, b_w_ptr, d_w_ptr, b_b_ptr, d_b_ptr, part_ptr,
    row0, row1, N, D, R, D_GROUP, R_GROUP, BLOCKS_PER_GROUP,
    stride_gb, stride_gn, stride_gd,
    BLOCK_M: tl.constexpr, BLOCK_SLICE: tl.constexpr, K_PAD: tl.constexpr, DOT16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward 1 of 3, grid (d slices, row groups), as `_down_kernel`: over one d slice,
    part[m, slice] = [dy U_0 | dy U_1 | dy . u_0 | dy . u_1] (unscaled), width 2r + 2. The
    grouped U slice and the biases stay in registers; dy is marked evict_last (`_cols_kernel`
    reads it again). U at fp32-level accuracy (this feeds the routing gradient): with DOT16 as
    head and tail on two 16-bit MMAs (`_split16`), else fp32 operands at PRECISION.

    HBM bytes per chunk: dy read (Mc d e); U and u from L2 once per row group; partials written
    (4 Mc (2r + 2) slices), read back by `_dh_kernel`."""
    c = tl.program_id(0) * BLOCK_SLICE + tl.arange(0, BLOCK_SLICE)
    c_ok = c < D
    u = tl.trans(_grouped_up(b_w_ptr, d_w_ptr, c, c_ok, D_GROUP, R_GROUP, R, K_PAD))  # [BLOCK_SLICE, K_PAD]
    if DOT16:
        u_head, u_tail = _split16(u, dy_ptr.dtype.element_ty)
    u0 = tl.load(b_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    u1 = tl.load(d_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    k = tl.arange(0, K_PAD)
    width = 2 * R + 2
    first = row0 + tl.program_id(1) * BLOCKS_PER_GROUP * BLOCK_M
    last = tl.minimum(first + BLOCKS_PER_GROUP * BLOCK_M, row1)
    for m0 in range(first, last, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        dy = tl.load(dy_ptr + _row_offsets(rows, N, stride_gb, stride_gn)[:, None] + c[None, :] * stride_gd,
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0, eviction_policy="evict_last")
        if DOT16:
            dhw = tl.dot(dy, u_head, tl.dot(dy, u_tail) * (1.0 / TAIL_SCALE))
        else:
            dhw = tl.dot(dy.to(tl.float32), u, input_precision=PRECISION)
        dy = dy.to(tl.float32)
        out = part_ptr + (rows.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * width
        tl.store(out[:, None] + k[None, :], dhw, mask=row_ok[:, None] & (k < 2 * R)[None, :])
        tl.store(out + 2 * R, tl.sum(dy * u0[None, :], axis=1), mask=row_ok)
        tl.store(out + 2 * R + 1, tl.sum(dy * u1[None, :], axis=1), mask=row_ok)


@triton.jit
def _dh_kernel(
    part_ptr, w_ptr, index_ptr, hd_ptr, dh_ptr, dw_ptr, dlog_ptr,
    row0, row1, N, R, SLICES, TABLE_ROWS, stride_ib, stride_in, stride_wr, stride_we, scale, p, seed_ptr,
    inv_temperature,
    TABLE_ROW: tl.constexpr, FUSED_ROUTER: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """Backward 2 of 3, BLOCK_ROWS rows per program: sums the slices' partials into
    dhw_e = s dy U_e and dy . u_e, then writes the per-row routing gradient
    dw_e = hd . dhw_e + s dy . u_e ([M, 2]) and dh = (w_0 dhw_0 + w_1 dhw_1) * mask ([M, r]).
    With FUSED_ROUTER (every row routed by itself, w = softmax(z / temperature) its own) also the
    softmax's backward dz_e = w_e (dw_e - w . dw) / temperature into dlog [M, 2].

    HBM bytes: partials (4 Mc (2r + 2) slices, from L2), hd read (4 Mc r), dh and dw written
    (4 Mc (r + 2)), dlog (8 Mc)."""
    scale = tl.cast(scale, tl.float32)
    rows = row0 + tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < row1
    i = tl.arange(0, R_PAD)
    ok = row_ok[:, None] & (i < R)[None, :]
    width = 2 * R + 2
    dhw0 = tl.zeros([BLOCK_ROWS, R_PAD], dtype=tl.float32)
    dhw1 = tl.zeros([BLOCK_ROWS, R_PAD], dtype=tl.float32)
    dyu0 = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    dyu1 = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for s in range(0, SLICES):
        part = part_ptr + (rows * SLICES + s) * width
        dhw0 += tl.load(part[:, None] + i[None, :], mask=ok, other=0.0)
        dhw1 += tl.load(part[:, None] + R + i[None, :], mask=ok, other=0.0)
        dyu0 += tl.load(part + 2 * R, mask=row_ok, other=0.0)
        dyu1 += tl.load(part + 2 * R + 1, mask=row_ok, other=0.0)
    hd = tl.load(hd_ptr + rows[:, None] * R + i[None, :], mask=ok, other=0.0)
    dw0 = scale * (tl.sum(hd * dhw0, axis=1) + dyu0)
    dw1 = scale * (tl.sum(hd * dhw1, axis=1) + dyu1)
    tl.store(dw_ptr + rows * 2, dw0, mask=row_ok)
    tl.store(dw_ptr + rows * 2 + 1, dw1, mask=row_ok)
    _, _, w0, w1 = _routing(w_ptr, index_ptr, rows, row_ok, N, TABLE_ROWS, stride_ib, stride_in,
                            stride_wr, stride_we, TABLE_ROW)
    if FUSED_ROUTER:
        inv_temperature = tl.cast(inv_temperature, tl.float32)
        mean = w0 * dw0 + w1 * dw1
        tl.store(dlog_ptr + rows * 2, w0 * (dw0 - mean) * inv_temperature, mask=row_ok)
        tl.store(dlog_ptr + rows * 2 + 1, w1 * (dw1 - mean) * inv_temperature, mask=row_ok)
    dh = scale * (w0[:, None] * dhw0 + w1[:, None] * dhw1)
    if HAS_DROPOUT:
        dh = dh * _dropout_multiplier(tl.load(seed_ptr), rows, i, R, tl.cast(p, tl.float32))
    tl.store(dh_ptr + rows[:, None] * R + i[None, :], dh, mask=ok)


@triton.jit
def _cols_kernel(
    dy_ptr, x_ptr, w_ptr, index_ptr, a_w_ptr, r_w_ptr, hd_ptr, dh_ptr, dlog_ptr, dx_ptr, part_ptr,
    row0, row1, N, D, R, D_GROUP, R_GROUP, TABLE_ROWS, BLOCKS_PER_GROUP, TOTAL,
    stride_gb, stride_gn, stride_gd, stride_xb, stride_xn, stride_xd, stride_ib, stride_in, stride_wr, stride_we,
    scale,
    TABLE_ROW: tl.constexpr, FUSED_ROUTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, DOT16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward 3 of 3, grid (column blocks, row groups of the chunk): each program owns
    BLOCK_D columns and BLOCKS_PER_GROUP row blocks. It writes dx = dy + dh A for its tiles
    (dy read the second time, evict_first) and accumulates in fp32 registers its share of
    dA = dh^T x, dU = s hw^T dy (grouped entries only), du_e = s sum w_e dy and da = sum dh,
    stored as its group's row of part [groups, TOTAL] (the chunk's rows of the call's partials,
    which `_reduce_kernel` sums). Layout of a row: dA [r, d], dU_0 [d, r/g], dU_1 [d, r/g], du_0 [d],
    du_1 [d], da [r] (TOTAL = r d + 2 d r/g + 2 d + r), and with FUSED_ROUTER (each row routed
    by itself) the router's share from the rows' dz = dlog: dx += dz W_r, dW_r = dz^T x [2, d]
    and db_r = sum dz [2] (TOTAL + 2 d + 2), in fp32 FMAs on the tiles already loaded.

    HBM bytes per chunk: dy again (from L2), x read (Mc d e), dx written (Mc d e); dh, hd from
    L2; partials written (4 TOTAL per group)."""
    scale = tl.cast(scale, tl.float32)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    i = tl.arange(0, R_PAD)
    i_ok = i < R
    k = tl.arange(0, K_PAD)
    expert, unit = k // R, k % R
    a = tl.load(a_w_ptr + i[:, None] * D + c[None, :], mask=i_ok[:, None] & c_ok[None, :], other=0.0,
                eviction_policy="evict_last").to(tl.float32)                       # [R_PAD, BLOCK_D]
    if FUSED_ROUTER:
        w_r0 = tl.load(r_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        w_r1 = tl.load(r_w_ptr + D + c, mask=c_ok, other=0.0).to(tl.float32)
    dw_r0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw_r1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_r0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    db_r1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if DOT16:
        a = a.to(x_ptr.dtype.element_ty)
    da_acc = tl.zeros([R_PAD, BLOCK_D], dtype=tl.float32)
    du_acc = tl.zeros([K_PAD, BLOCK_D], dtype=tl.float32)
    du0_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    du1_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dh_sum = tl.zeros([R_PAD], dtype=tl.float32)
    first = row0 + tl.program_id(1) * BLOCKS_PER_GROUP * BLOCK_M
    last = tl.minimum(first + BLOCKS_PER_GROUP * BLOCK_M, row1)
    for m0 in range(first, last, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        tile_ok = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + _row_offsets(rows, N, stride_gb, stride_gn)[:, None] + c[None, :] * stride_gd,
                     mask=tile_ok, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + _row_offsets(rows, N, stride_xb, stride_xn)[:, None] + c[None, :] * stride_xd,
                    mask=tile_ok, other=0.0, eviction_policy="evict_first")
        dh = tl.load(dh_ptr + rows[:, None] * R + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        _, _, w0, w1 = _routing(w_ptr, index_ptr, rows, row_ok, N, TABLE_ROWS, stride_ib, stride_in,
                                stride_wr, stride_we, TABLE_ROW)
        hd = tl.load(hd_ptr + rows[:, None] * R + unit[None, :], mask=row_ok[:, None] & (k < 2 * R)[None, :],
                     other=0.0)
        hw = hd * tl.where(expert[None, :] == 0, w0[:, None], w1[:, None])
        if DOT16:
            dh16 = dh.to(x_ptr.dtype.element_ty)
            dx = dy.to(tl.float32) + tl.dot(dh16, a)
            da_acc = tl.dot(tl.trans(dh16), x, da_acc)
            # dU takes hw = w hd (fp32) as head and tail (`_split16`): hw rounded to 16 bits
            # exceeded 2x PyTorch's error on dU (fp16; tests/test_mm_adapter.py holds the case).
            hw_head, hw_tail = _split16(tl.trans(hw), x_ptr.dtype.element_ty)
            du_acc = tl.dot(hw_head, dy, du_acc + tl.dot(hw_tail, dy) * (1.0 / TAIL_SCALE))
        else:
            dx = dy.to(tl.float32) + tl.dot(dh, a, input_precision=PRECISION)
            da_acc = tl.dot(tl.trans(dh), x.to(tl.float32), da_acc, input_precision=PRECISION)
            du_acc = tl.dot(tl.trans(hw), dy.to(tl.float32), du_acc, input_precision=PRECISION)
        if FUSED_ROUTER:
            dz0 = tl.load(dlog_ptr + rows * 2, mask=row_ok, other=0.0)
            dz1 = tl.load(dlog_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
            dx += dz0[:, None] * w_r0[None, :] + dz1[:, None] * w_r1[None, :]
            x32 = x.to(tl.float32)
            dw_r0 += tl.sum(dz0[:, None] * x32, axis=0)
            dw_r1 += tl.sum(dz1[:, None] * x32, axis=0)
            db_r0 += dz0
            db_r1 += dz1
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        dy32 = dy.to(tl.float32)
        du0_acc += tl.sum(w0[:, None] * dy32, axis=0)
        du1_acc += tl.sum(w1[:, None] * dy32, axis=0)
        dh_sum += tl.sum(dh, axis=0)

    out = part_ptr + tl.program_id(1).to(tl.int64) * TOTAL
    tl.store(out + i[:, None] * D + c[None, :], da_acc, mask=i_ok[:, None] & c_ok[None, :])
    j = unit[:, None] - (c // D_GROUP)[None, :] * R_GROUP
    in_group = (k < 2 * R)[:, None] & c_ok[None, :] & (j >= 0) & (j < R_GROUP)
    tl.store(out + R * D + expert[:, None] * D * R_GROUP + c[None, :] * R_GROUP + j, du_acc * scale, mask=in_group)
    biases = out + R * D + 2 * D * R_GROUP
    tl.store(biases + c, du0_acc * scale, mask=c_ok)
    tl.store(biases + D + c, du1_acc * scale, mask=c_ok)
    if tl.program_id(0) == 0:
        tl.store(biases + 2 * D + i, dh_sum, mask=i_ok)
    if FUSED_ROUTER:
        d_router = biases + 2 * D + R
        tl.store(d_router + c, dw_r0, mask=c_ok)
        tl.store(d_router + D + c, dw_r1, mask=c_ok)
        if tl.program_id(0) == 0:
            tl.store(d_router + 2 * D, tl.sum(db_r0, axis=0))
            tl.store(d_router + 2 * D + 1, tl.sum(db_r1, axis=0))


@triton.jit
def _segment_store(out_ptr, e, start, length, value, ok):
    tl.store(out_ptr + (e - start), value, mask=ok & (e >= start) & (e < start + length))


@triton.jit
def _reduce_kernel(part_ptr, da_w_ptr, db_w_ptr, dd_w_ptr, db_b_ptr, dd_b_ptr, da_b_ptr, dr_w_ptr, dr_b_ptr,
                   GROUPS, TOTAL, R, D, R_GROUP, HAS_ROUTER: tl.constexpr, BLOCK: tl.constexpr):
    """Sums the partials over the row groups (ascending: deterministic) and writes each
    gradient in its final layout: dA [r, d], dU_0 and dU_1 [d, r/g] (the grouped weights'
    own layout), du_0, du_1 [d], da [r], with HAS_ROUTER dW_r [2, d] and db_r [2], all fp32. Element e of a partials row is element e of
    their concatenation (see `_cols_kernel`).

    HBM bytes: 4 TOTAL (groups + 1)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < TOTAL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(0, GROUPS):
        acc += tl.load(part_ptr + g * TOTAL + e, mask=ok, other=0.0)
    start = 0
    _segment_store(da_w_ptr, e, start, R * D, acc, ok)
    start += R * D
    _segment_store(db_w_ptr, e, start, D * R_GROUP, acc, ok)
    start += D * R_GROUP
    _segment_store(dd_w_ptr, e, start, D * R_GROUP, acc, ok)
    start += D * R_GROUP
    _segment_store(db_b_ptr, e, start, D, acc, ok)
    _segment_store(dd_b_ptr, e, start + D, D, acc, ok)
    _segment_store(da_b_ptr, e, start + 2 * D, R, acc, ok)
    if HAS_ROUTER:
        start += 2 * D + R
        _segment_store(dr_w_ptr, e, start, 2 * D, acc, ok)
        _segment_store(dr_b_ptr, e, start + 2 * D, 2, acc, ok)


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


def launch_config(x: Tensor, config: dict | None = None) -> dict:
    """The block sizes for x's device and dtype (`BLOCK_CONFIGS`), with `config`'s keys on top."""
    base = BLOCK_CONFIGS[(_target.arch(x.device), str(x.dtype).removeprefix("torch."))]
    unknown = set(config or {}) - set(base)
    if unknown:
        raise ValueError(f"mm_adapter kernel: unknown config keys {sorted(unknown)}; known: {sorted(base)}")
    return {**base, **(config or {})}


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the fp32-operand products, per x dtype (module docstring)."""
    return {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}[dtype]


def _pads(hidden: int, router: bool = False) -> tuple[int, int]:
    """(R_PAD, K_PAD): the hidden axis (with the router's four units after it, see
    `_down_kernel`) and the doubled (routed) axis, padded for tl.dot (>= 16)."""
    return max(16, next_power_of_2(hidden + 4 * router)), max(16, next_power_of_2(2 * hidden))


def _slices(dim: int, row_blocks: int, width: int, programs: int) -> int:
    """d slice width of `_down_kernel` / `_dhw_kernel`: the table's `width`, halved (down to 64)
    while the row blocks are too few to fill `programs` programs: the decode path splits d."""
    while width > 64 and cdiv(dim, width) * row_blocks < programs:
        width //= 2
    return width


def _groups(blocks: int, other_axis: int, programs: int) -> tuple[int, int]:
    """(groups, blocks per group): `blocks` row blocks split so that groups x the other grid
    axis (of size other_axis) reaches `programs` programs, no group empty."""
    per_group = cdiv(blocks, max(1, min(blocks, cdiv(programs, other_axis))))
    return cdiv(blocks, per_group), per_group


def _chunks(rows: int, dim: int, element_size: int, config: dict) -> list[tuple[int, int]]:
    """Row ranges [row0, row1) whose x (or dy) holds at most config["chunk_bytes"] bytes (the
    set re-read from L2), of about equal size (no small last chunk with a small grid), in whole
    blocks of every kernel."""
    align = max(config["block_m"], config["block_m_up"], config["block_m_cols"], config["block_rows"])
    most = max(align, config["chunk_bytes"] // (dim * element_size) // align * align)
    size = cdiv(cdiv(rows, cdiv(rows, most)), align) * align
    return [(row0, min(row0 + size, rows)) for row0 in range(0, rows, size)]


def _check(x: Tensor, a_weight: Tensor, a_bias: Tensor | None, b_weight: Tensor, b_bias: Tensor,
           d_weight: Tensor, d_bias: Tensor, routing: Tensor, routing_index: Tensor | None,
           dy: Tensor | None = None, router: Router | None = None) -> tuple[int, int, int, int, int]:
    """Kernel preconditions: the kernels index memory from these shapes, so nothing is assumed.
    Returns (B, N, d, r, r/g). The index's range is checked by `lavin_fast.ops.mm_adapter` (a
    device sync); the kernels skip an out-of-range index (weights 0), they never read with it."""
    op = "mm_adapter kernel"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [batch, tokens, dim], got shape {tuple(x.shape)}")
    batch, tokens, dim = x.shape
    if a_weight.dim() != 2 or a_weight.shape[1] != dim or a_weight.shape[0] == 0:
        raise ValueError(f"{op}: down_weight must be [hidden, {dim}], got {tuple(a_weight.shape)}")
    hidden = a_weight.shape[0]
    if b_weight.dim() != 2 or b_weight.shape[0] != dim or b_weight.shape[1] == 0 or hidden % b_weight.shape[1] \
            or dim % (hidden // b_weight.shape[1]):
        raise ValueError(f"{op}: up_b_weight must be [{dim}, hidden/groups] with groups dividing hidden "
                         f"({hidden}) and dim ({dim}), got {tuple(b_weight.shape)}")
    per_group = b_weight.shape[1]
    table = (batch, 2) if routing_index is None else (routing.shape[0] if routing.dim() == 2 else -1, 2)
    if router is not None and router.rows is None:
        table = (batch * tokens, 2)                              # every row routes itself
    expected = dict(x=(x, x.shape), down_weight=(a_weight, a_weight.shape), down_bias=(a_bias, (hidden,)),
                    up_b_weight=(b_weight, b_weight.shape), up_b_bias=(b_bias, (dim,)),
                    up_d_weight=(d_weight, (dim, per_group)), up_d_bias=(d_bias, (dim,)),
                    routing=(routing, table), dy=(dy, x.shape))
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
        if tensor.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; the kernel takes {KERNEL_DTYPES}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")
    if routing_index is not None:
        if routing_index.dtype not in (torch.int32, torch.int64) or tuple(routing_index.shape) != (batch, tokens):
            raise ValueError(f"{op}: routing_index must be an int32/int64 [{batch}, {tokens}] tensor, got "
                             f"{routing_index.dtype} {tuple(routing_index.shape)}")
        if routing_index.device != x.device:
            raise ValueError(f"{op}: routing_index is on {routing_index.device} but x is on {x.device}")
    if not x.is_cuda and not _target.interpreting():
        raise RuntimeError(f"{op}: tensors on {x.device} need a CUDA device or TRITON_INTERPRET=1")
    if dim == 0 or batch * tokens * (2 * hidden + 2) * cdiv(dim, 64) >= 2**31:
        raise ValueError(f"{op}: need dim > 0 and batch * tokens * (2 hidden + 2) * cdiv(dim, 64) < 2**31 "
                         f"(int32 offsets of the row-wise buffers), got x {tuple(x.shape)}, hidden {hidden}")
    return batch, tokens, dim, hidden, per_group


class Router(NamedTuple):
    """The router computed inside the op: table row t holds softmax((x[rows[t]] W^T + b) / t)
    for x's flat row rows[t] (m = b N + n); rows None: every row routes itself (the table
    [M, 2], read at row m, no routing_index). weight [2, d], bias [2]."""
    weight: Tensor
    bias: Tensor | None          # None only in the backward, which does not read it
    temperature: float
    rows: Tensor | None = None


def _table_row(routing_index: Tensor | None, router: Router | None) -> int:
    """The kernels' TABLE_ROW mode: how row m finds its table row."""
    if router is not None and router.rows is None:
        return BY_ROW.value
    return BY_SAMPLE.value if routing_index is None else BY_INDEX.value


def _check_router(router: Router, x: Tensor, routing_index: Tensor | None) -> int:
    """The router's shapes, dtypes and devices (its rows' values are `ops.check_router_rows`').
    Returns the routing table's rows T."""
    op = "mm_adapter kernel"
    batch, tokens, dim = x.shape
    for name, tensor, shape in (("router weight", router.weight, (2, dim)), ("router bias", router.bias, (2,))):
        if tensor is None and name == "router bias":
            continue
        if tuple(tensor.shape) != shape or tensor.dtype not in KERNEL_DTYPES or tensor.device != x.device:
            raise ValueError(f"{op}: {name} must be {shape} of {KERNEL_DTYPES} on {x.device}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    if not router.temperature > 0:
        raise ValueError(f"{op}: router temperature must be > 0, got {router.temperature}")
    if router.rows is None:
        if routing_index is not None:
            raise ValueError(f"{op}: a router without rows routes every row by itself: no routing_index")
        return batch * tokens
    rows = router.rows
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64) or rows.device != x.device:
        raise ValueError(f"{op}: router rows must be an int32/int64 [T] tensor on {x.device}, got "
                         f"{rows.dtype} {tuple(rows.shape)} on {rows.device}")
    if routing_index is None and rows.shape[0] != batch:
        raise ValueError(f"{op}: without a routing_index the router rows are one per sample, [{batch}], got "
                         f"{tuple(rows.shape)}")
    return rows.shape[0]


def _index_args(routing: Tensor, routing_index: Tensor | None, x: Tensor) -> tuple[Tensor, int, int]:
    """(index tensor or a stand-in never read, its strides)."""
    if routing_index is None:
        return routing, 0, 0
    return routing_index, routing_index.stride(0), routing_index.stride(1)


def mm_adapter_forward(
    x: Tensor, down_weight: Tensor, down_bias: Tensor, up_b_weight: Tensor, up_b_bias: Tensor,
    up_d_weight: Tensor, up_d_bias: Tensor, routing: Tensor | None, routing_index: Tensor | None, scale: float,
    dropout_p: float = 0.0, seed: int | Tensor | None = None, *, router: Router | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward. x [B, N, d] (any strides); down_weight [r, d]; down_bias [r];
    up_b_weight, up_d_weight [d, r/g] (conv_B, conv_D in their grouped form, the trailing 1
    dropped); up_b_bias, up_d_bias [d]; routing [T, 2] read by row (b, n) at
    routing_index[b, n] (int [B, N]), or [B, 2] read at b (routing_index None); or routing
    None and `router` (see `Router`): the table computed here, its logits in `_down_kernel`'s
    pass over x, its softmax in `_hidden_kernel` (both in `_small_kernel` for a few rows).
    Returns y [B, N, d] in x's dtype, hd [B, N, r] fp32 (the hidden state after dropout) and
    the routing table used ([T, 2] fp32 with the router, else `routing` itself).
    `config` overrides `BLOCK_CONFIGS` keys (benchmarks sweep them). M = B N up to the table's
    `small_rows` is one launch of `_small_kernel` (with the router only where every row routes
    itself: a table gathered from source rows takes the three kernels below).

    Chunks: a chunk's `_up_kernel` reads table rows computed by its own or an earlier chunk's
    `_hidden_kernel`, so each table row's source row must come at or before every row reading
    it (a sample's first token does); checked here when there are several chunks (a sync, once
    per rows tensor: `backend.check_once`).

    HBM bytes, M = B N, e = x's element size, fp32 weights, S = d slices, G = row groups of
    `_down_kernel`, W = r (r + 4 with the router): x read once (M d e: the second read, in
    `_up_kernel`, hits L2 by design), y written (M d e), weights once (4 (W d + 2 d r/g + 2 d
    + r)), partials 8 S M W, hd 4 M r, with the router the rows' weights 8 M:
    2 M d e + 8 S M W + 4 M r + ~4 (W + 2 r/g + 2) d.
    B=4, N=512, d=4096, r=8, g=2, bf16, sm_90 table (S=8), router on: 33,554,432 + 1,572,864
    + 65,536 + 16,384 + 360,480 = 35.6 MB against the floor 2 M d e = 33.6 MB (+6%).
    """
    if (routing is None) == (router is None) or (router is not None and router.bias is None):
        raise ValueError("mm_adapter kernel: pass either a routing table or a router (with its bias)")
    table_rows = routing.shape[0] if router is None else _check_router(router, x, routing_index)
    table = routing if router is None else empty((table_rows, 2), torch.float32, x.device)
    batch, tokens, dim, hidden, per_group = _check(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight,
                                                   up_d_bias, table, routing_index, router=router)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"mm_adapter kernel: dropout_p must be in [0, 1), got {dropout_p}")
    rows = batch * tokens
    y = empty(tuple(x.shape), x.dtype, x.device)
    hd = empty((batch, tokens, hidden), torch.float32, x.device)
    if rows == 0:
        return y, hd, table
    cfg = launch_config(x, config)
    programs = cfg["waves"] * _target.sm_count(x.device, cfg["sms"])
    has_router = router is not None
    r_pad, _ = _pads(hidden, has_router)
    down_weight, down_bias = down_weight.contiguous(), down_bias.contiguous()      # no copy for parameters
    weights = [w.contiguous() for w in (up_b_weight, up_d_weight, up_b_bias, up_d_bias)]
    router_weight, router_bias = (router.weight.contiguous(), router.bias) if has_router else (x, x)  # x: never read
    # Every row's routing weights: the table itself when each row routes itself, else gathered
    # into it at the table's source rows after each chunk.
    row_probs = table if has_router and router.rows is None else (
        empty((rows, 2), torch.float32, x.device) if has_router else x)
    index, stride_ib, stride_in = _index_args(table, routing_index, x)
    seed_t = _seed_tensor(seed, x.device) if dropout_p > 0 else x                  # x: never read
    inv_temperature = 1.0 / router.temperature if has_router else 1.0
    dot16, precision = cfg["dot16"] and x.dtype != torch.float32, _precision(x.dtype)
    d_group = dim // (hidden // per_group)
    if rows <= cfg["small_rows"] and not (has_router and router.rows is not None):
        _small_kernel[(cdiv(dim, cfg["block_d_small"]),)](
            x, down_weight, down_bias, router_weight, router_bias, table, index, *weights, hd, y,
            rows, tokens, dim, hidden, d_group, per_group, table_rows,
            x.stride(0), x.stride(1), x.stride(2), stride_ib, stride_in, table.stride(0), table.stride(1),
            float(scale), float(dropout_p), seed_t, inv_temperature,
            TABLE_ROW=_table_row(routing_index, router), HAS_ROUTER=has_router, HAS_DROPOUT=dropout_p > 0,
            BLOCK_M=max(16, next_power_of_2(rows)), BLOCK_K=cfg["block_k_small"],
            BLOCK_D=cfg["block_d_small"], R_PAD=r_pad, DOT16=dot16, PRECISION=precision,
            NUM_STAGES=cfg["num_stages_small"], num_warps=cfg["num_warps_small"],
        )
        return y, hd, table
    width = _slices(dim, cdiv(rows, cfg["block_m"]), cfg["block_slice"], programs)
    slices = cdiv(dim, width)
    part_width = hidden + 4 * has_router
    part = empty((rows, slices, part_width), torch.float32, x.device)
    col_blocks = cdiv(dim, cfg["block_d_up"])
    streaming = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    chunks = _chunks(rows, dim, x.element_size(), cfg)
    if has_router and router.rows is not None and len(chunks) > 1:
        check_once("router order", router.rows, (tokens,),
                   lambda: check_router_order("mm_adapter kernel", router.rows, routing_index, tokens),
                   related=routing_index)
    for row0, row1 in chunks:
        groups, per_group_blocks = _groups(cdiv(row1 - row0, cfg["block_m"]), slices, programs)
        _down_kernel[(slices, groups)](
            x, down_weight, router_weight, part, row0, row1, tokens, dim, hidden, part_width, per_group_blocks,
            x.stride(0), x.stride(1), x.stride(2),
            HAS_ROUTER=has_router, BLOCK_M=cfg["block_m"], BLOCK_SLICE=width, R_PAD=r_pad,
            DOT16=dot16, PRECISION=precision, **streaming,
        )
        _hidden_kernel[(cdiv(row1 - row0, cfg["block_rows"]),)](
            part, down_bias, router_bias, hd, row_probs, row0, row1, hidden, part_width, slices,
            float(dropout_p), seed_t, inv_temperature,
            HAS_ROUTER=has_router, HAS_DROPOUT=dropout_p > 0, BLOCK_ROWS=cfg["block_rows"], R_PAD=r_pad,
        )
        if has_router and router.rows is not None:
            # Table rows whose source lies in a later chunk read rows not computed yet: never
            # read before a later chunk gathers them again (the order checked above).
            torch.index_select(row_probs, 0, router.rows, out=table)
        up_groups, up_blocks = _groups(cdiv(row1 - row0, cfg["block_m_up"]), col_blocks, programs)
        _up_kernel[(col_blocks, up_groups)](
            x, table, index, hd, *weights, y,
            row0, row1, tokens, dim, hidden, d_group, per_group, table_rows, up_blocks,
            x.stride(0), x.stride(1), x.stride(2), stride_ib, stride_in, table.stride(0), table.stride(1),
            float(scale),
            TABLE_ROW=_table_row(routing_index, router), BLOCK_M=cfg["block_m_up"], BLOCK_D=cfg["block_d_up"],
            HIDDEN=hidden, NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps_up"],
        )
    return y, hd, table


def mm_adapter_backward(
    dy: Tensor, x: Tensor, down_weight: Tensor, up_b_weight: Tensor, up_b_bias: Tensor, up_d_weight: Tensor,
    up_d_bias: Tensor, routing: Tensor, routing_index: Tensor | None, hd: Tensor, scale: float,
    dropout_p: float = 0.0, seed: int | Tensor | None = None, *, router: Router | None = None,
    config: dict | None = None,
) -> tuple[Tensor | None, ...]:
    """Launch the backward. dy, x [B, N, d] (any strides); the weights, routing and index as in
    `mm_adapter_forward` (with `router`, routing is the table the forward returned); hd
    [B, N, r] fp32 from the forward. Returns dx [B, N, d] in x's dtype, then fp32 gradients of
    routing (the table's shape: each table row gets the sum over the rows that read it),
    down_weight [r, d], down_bias [r], up_b_weight [d, r/g], up_b_bias [d], up_d_weight
    [d, r/g], up_d_bias [d], router weight [2, d] and bias [2] (None without a router).

    The router's gradient, through the softmax: dz_t = w_t (dw_t - w_t . dw_t) / temperature
    per table row t (dw_t its routing gradient), dW_r = dz^T x[rows], db_r = sum_t dz_t and
    dx[rows] += dz W_r. Each row routing itself (router rows None), all of it rides in the
    kernels: `_dh_kernel` writes dz per row and `_cols_kernel` adds its share to dx and the
    partials. With router rows (a table row per sample: few), dz sums over all the rows reading
    it, so it is complete only after the last chunk: a few torch ops on [T, d] then
    (`_router_rows_backward`), dx updated in place.

    HBM bytes, M = B N, e = element size, S = d slices, G = row groups of `_cols_kernel`
    (about one wave over its d / block_d_cols column blocks): dy read once (the second read hits
    L2 by design), x read, dx written (3 M d e); the partials of dy U (8 S M (2 r + 2)); hd, dh,
    dw (4 M (3 r + 4)); the weight-gradient partials written and summed once
    (4 (2 G + 1) (r d + 2 d r/g + 2 d + r), + 2 d + 2 with the per-row router, which also moves
    dz, 16 M); the weights (4 (r + 2 r/g + 2) d); router rows: ~3 T d e more.
    B=4, N=512, d=4096, r=8, g=2, bf16, sm_90 table (S=8, G=3): 50,331,648 + 2,359,296 + 229,376
    + 2,064,608 + 294,912 = 55.3 MB against the floor 3 M d e = 50.3 MB (+10%); a router per
    sample adds ~0.1 MB (T = 4).
    """
    batch, tokens, dim, hidden, per_group = _check(x, down_weight, None, up_b_weight, up_b_bias, up_d_weight,
                                                   up_d_bias, routing, routing_index, dy=dy, router=router)
    if router is not None:
        _check_router(router, x, routing_index)
    if tuple(hd.shape) != (batch, tokens, hidden) or hd.dtype != torch.float32 or not hd.is_contiguous():
        raise ValueError(f"mm_adapter kernel: hd must be a contiguous fp32 [{batch}, {tokens}, {hidden}] "
                         f"(the forward's), got {hd.dtype} {tuple(hd.shape)}")
    rows = batch * tokens
    device = x.device
    dx = empty(tuple(x.shape), x.dtype, device)
    fused_router = router is not None and router.rows is None
    total = hidden * dim + 2 * dim * per_group + 2 * dim + hidden + (2 * dim + 2) * fused_router
    if rows == 0:
        zeros = [g.zero_() for g in _gradient_buffers(hidden, dim, per_group, device, router is not None)]
        d_routing = torch.zeros(routing.shape, dtype=torch.float32, device=device)
        return (dx, d_routing, zeros[0], zeros[5], zeros[1], zeros[3], zeros[2], zeros[4], *_router_grads(zeros))
    cfg = launch_config(x, config)
    sms = _target.sm_count(device, cfg["sms"])
    programs = cfg["waves"] * sms
    r_pad, k_pad = _pads(hidden)
    dot16 = cfg["dot16"] and x.dtype != torch.float32
    precision = _precision(x.dtype)
    down_weight = down_weight.contiguous()
    b_weight, d_weight, b_bias, d_bias = (w.contiguous() for w in (up_b_weight, up_d_weight, up_b_bias, up_d_bias))
    router_weight = router.weight.contiguous() if fused_router else x                   # x: never read
    inv_temperature = 1.0 / router.temperature if router is not None else 1.0
    index, stride_ib, stride_in = _index_args(routing, routing_index, x)
    table_row = _table_row(routing_index, router)
    seed_t = _seed_tensor(seed, device) if dropout_p > 0 else x                    # x: never read
    has_dropout = dropout_p > 0
    d_group = dim // (hidden // per_group)
    width = _slices(dim, cdiv(rows, cfg["block_m"]), cfg["block_slice_dhw"], programs)
    slices = cdiv(dim, width)
    col_blocks = cdiv(dim, cfg["block_d_cols"])
    chunks = _chunks(rows, dim, dy.element_size(), cfg)
    # One wave of `_cols_kernel` per chunk: its programs each write a row of partials.
    col_groups = [_groups(cdiv(row1 - row0, cfg["block_m_cols"]), col_blocks, sms) for row0, row1 in chunks]
    part_dhw = empty((rows, slices, 2 * hidden + 2), torch.float32, device)
    dh = empty((rows, hidden), torch.float32, device)
    dw_rows = empty((rows, 2), torch.float32, device)
    dlog_rows = empty((rows, 2), torch.float32, device) if fused_router else dw_rows   # dw_rows: never read
    part = empty((sum(g for g, _ in col_groups), total), torch.float32, device)
    streaming = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    group0 = 0
    for (row0, row1), (groups, per_group_blocks) in zip(chunks, col_groups):
        slice_groups, slice_blocks = _groups(cdiv(row1 - row0, cfg["block_m"]), slices, programs)
        _dhw_kernel[(slices, slice_groups)](
            dy, b_weight, d_weight, b_bias, d_bias, part_dhw,
            row0, row1, tokens, dim, hidden, d_group, per_group, slice_blocks,
            dy.stride(0), dy.stride(1), dy.stride(2),
            BLOCK_M=cfg["block_m"], BLOCK_SLICE=width, K_PAD=k_pad, DOT16=dot16, PRECISION=precision, **streaming,
        )
        _dh_kernel[(cdiv(row1 - row0, cfg["block_rows"]),)](
            part_dhw, routing, index, hd, dh, dw_rows, dlog_rows,
            row0, row1, tokens, hidden, slices, routing.shape[0], stride_ib, stride_in,
            routing.stride(0), routing.stride(1), float(scale), float(dropout_p), seed_t, inv_temperature,
            TABLE_ROW=table_row, FUSED_ROUTER=fused_router, HAS_DROPOUT=has_dropout, BLOCK_ROWS=cfg["block_rows"],
            R_PAD=r_pad,
        )
        _cols_kernel[(col_blocks, groups)](
            dy, x, routing, index, down_weight, router_weight, hd, dh, dlog_rows, dx, part[group0:group0 + groups],
            row0, row1, tokens, dim, hidden, d_group, per_group, routing.shape[0], per_group_blocks, total,
            dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2), stride_ib, stride_in,
            routing.stride(0), routing.stride(1), float(scale),
            TABLE_ROW=table_row, FUSED_ROUTER=fused_router, BLOCK_M=cfg["block_m_cols"], BLOCK_D=cfg["block_d_cols"],
            R_PAD=r_pad, K_PAD=k_pad, DOT16=dot16, PRECISION=precision, num_warps=cfg["num_warps_cols"],
            num_stages=cfg["num_stages"],
        )
        group0 += groups
    grads = _gradient_buffers(hidden, dim, per_group, device, fused_router)
    _reduce_kernel[(cdiv(total, cfg["block_reduce"]),)](
        part, *grads[:6], *(grads[6:] if fused_router else (part, part)), group0, total, hidden, dim, per_group,
        HAS_ROUTER=fused_router, BLOCK=cfg["block_reduce"])
    if table_row == BY_ROW.value:
        d_routing = dw_rows
    elif routing_index is None:
        d_routing = dw_rows.view(batch, tokens, 2).sum(1)
    else:
        d_routing = torch.zeros(routing.shape, dtype=torch.float32, device=device).index_add_(
            0, routing_index.reshape(rows).long(), dw_rows)
    if router is not None and not fused_router:
        grads += _router_rows_backward(x, dx, routing, d_routing, router)
    return (dx, d_routing, grads[0], grads[5], grads[1], grads[3], grads[2], grads[4], *_router_grads(grads))


def _router_grads(grads: list[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """The router's (weight, bias) gradients at the end of `grads`, or (None, None)."""
    return (grads[6], grads[7]) if len(grads) == 8 else (None, None)


def _router_rows_backward(x: Tensor, dx: Tensor, table: Tensor, d_table: Tensor, router: Router) -> list[Tensor]:
    """The router's share of the backward from the table's gradient: dz = w (dw - w . dw) / t
    per table row, dx[rows] += dz W_r in place, and returns [dW_r = dz^T x[rows], db_r = sum dz]
    (fp32). Torch ops on [T, d]: x's source rows gathered (never x whole), rows None meaning
    every row (the native CPU kernels' per-token routing). dx: contiguous, x's shape."""
    dz = table * (d_table - (table * d_table).sum(-1, keepdim=True)) / router.temperature      # [T, 2]
    dim = x.shape[-1]
    if router.rows is None:
        sources = x.reshape(-1, dim)
        dx.view(-1, dim).add_((dz @ router.weight.float()).to(dx.dtype))
    else:
        sources = reference.source_rows(x, router.rows)                                       # [T, d]
        dx.view(-1, dim).index_add_(0, router.rows, (dz @ router.weight.float()).to(dx.dtype))
    return [dz.T @ sources.float(), dz.sum(0)]


def _gradient_buffers(hidden: int, dim: int, per_group: int, device: torch.device,
                      router: bool = False) -> list[Tensor]:
    """`_reduce_kernel`'s outputs, in its order: d down_weight [r, d], d up_b_weight [d, r/g],
    d up_d_weight [d, r/g], d up_b_bias [d], d up_d_bias [d], d down_bias [r], with the router
    d router weight [2, d] and bias [2] (fp32)."""
    shapes = ((hidden, dim), (dim, per_group), (dim, per_group), (dim,), (dim,), (hidden,))
    shapes += ((2, dim), (2,)) if router else ()
    return [empty(shape, torch.float32, device) for shape in shapes]


def dropout_mask(seed: int | Tensor, batch: int, tokens: int, hidden: int, p: float,
                 device: torch.device | str = "cpu") -> Tensor:
    """The dropout mask the kernels apply for `seed`: [B, N, r] fp32, 0 or 1/(1-p).

    Drawn by the same Philox helper as the kernels, so `reference.mm_adapter(..., dropout_mask=m)`
    reproduces a kernel call with the same seed and p exactly."""
    rows = batch * tokens
    out = empty((batch, tokens, hidden), torch.float32, torch.device(device))
    if rows:
        block_m = 64
        _dropout_mask_kernel[(cdiv(rows, block_m),)](
            out, rows, hidden, float(p), _seed_tensor(seed, out.device), BLOCK_M=block_m, R_PAD=next_power_of_2(hidden))
    return out


# ----------------------------------------------------------------------------------------------
# The op (torch.library): forward, backward, fakes for torch.compile, autograd
# ----------------------------------------------------------------------------------------------
# The router travels as three optional tensors and the temperature (a schema takes no tuples):
# router_weight None means a given routing table.

def _router(router_weight: Tensor | None, router_bias: Tensor | None, router_rows: Tensor | None,
            temperature: float) -> Router | None:
    return None if router_weight is None else Router(router_weight, router_bias, temperature, router_rows)


def _native_index(routing_index: Tensor | None, router: Router | None, x: Tensor) -> Tensor | None:
    """The native kernels read a given table only: per-token routing is the table [M, 2] read
    through the index arange(M)."""
    if router is not None and router.rows is None:
        return torch.arange(x.shape[0] * x.shape[1], device=x.device).view(x.shape[:2])
    return routing_index


def _forward(x: Tensor, down_weight: Tensor, down_bias: Tensor, up_b_weight: Tensor, up_b_bias: Tensor,
             up_d_weight: Tensor, up_d_bias: Tensor, routing: Tensor | None, routing_index: Tensor | None,
             scale: float, dropout_p: float, seed: Tensor | None, router_weight: Tensor | None = None,
             router_bias: Tensor | None = None, router_rows: Tensor | None = None, temperature: float = 1.0
             ) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernels (any device; on CPU in the interpreter): (y, hd, the routing table the
    router computed: [T, 2] fp32, or [0, 2] for a given table, which an op's output may not
    alias)."""
    router = _router(router_weight, router_bias, router_rows, temperature)
    y, hd, table = mm_adapter_forward(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias,
                                      routing, routing_index, scale, dropout_p, seed, router=router)
    return y, hd, table if router is not None else x.new_empty((0, 2), dtype=torch.float32)


_fwd_op = torch.library.custom_op("lavin_fast::mm_adapter_fwd", _forward, mutates_args=())


@_fwd_op.register_kernel("cpu")
def _fwd_cpu(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index,
             scale, dropout_p, seed, router_weight=None, router_bias=None, router_rows=None, temperature=1.0):
    """CPU tensors: the native kernel (csrc/mm_adapter.cpp, its own dropout mask from `seed`),
    or under LAVIN_FAST_BACKEND=triton the Triton kernels in the interpreter. The native code
    takes a given table only, so there the router runs in torch around it (`reference.route_rows`:
    its [T, d] source rows gathered, x whole for per-token routing; a CPU copy at most)."""
    router = _router(router_weight, router_bias, router_rows, temperature)
    if not cpu_runs_native():
        return _forward(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                        routing_index, scale, dropout_p, seed, router_weight, router_bias, router_rows, temperature)
    if router is not None:
        routing = reference.route_rows(x, router.weight, router.bias, temperature, router_rows).float()
    y, hd = native.ops().mm_adapter_fwd(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias,
                                        routing, _native_index(routing_index, router, x), scale, dropout_p, seed)
    return y, hd, routing if router is not None else x.new_empty((0, 2), dtype=torch.float32)


@_fwd_op.register_fake
def _fwd_fake(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index,
              scale, dropout_p, seed, router_weight=None, router_bias=None, router_rows=None, temperature=1.0):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    table_rows = 0 if router_weight is None else (
        x.shape[0] * x.shape[1] if router_rows is None else router_rows.shape[0])
    return (y, x.new_empty((*x.shape[:2], down_weight.shape[0]), dtype=torch.float32),
            x.new_empty((table_rows, 2), dtype=torch.float32))


def _backward_kernels(dy: Tensor, x: Tensor, down_weight: Tensor, up_b_weight: Tensor, up_b_bias: Tensor,
                      up_d_weight: Tensor, up_d_bias: Tensor, routing: Tensor, routing_index: Tensor | None,
                      hd: Tensor, scale: float, dropout_p: float, seed: Tensor | None, router_weight: Tensor | None = None,
                      router_rows: Tensor | None = None, temperature: float = 1.0) -> list[Tensor]:
    """The Triton kernels: dx, d routing, the six weight gradients, and with the router its
    weight's and bias's (`mm_adapter_backward`'s order); `routing` is the table the forward used."""
    router = _router(router_weight, None, router_rows, temperature)         # the bias is not read
    grads = mm_adapter_backward(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                                routing_index, hd, scale, dropout_p, seed, router=router)
    return [g for g in grads if g is not None]


_bwd_op = torch.library.custom_op("lavin_fast::mm_adapter_bwd", _backward_kernels, mutates_args=())


@_bwd_op.register_kernel("cpu")
def _bwd_cpu(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index, hd, scale,
             dropout_p, seed, router_weight=None, router_rows=None, temperature=1.0):
    if not cpu_runs_native():
        return _backward_kernels(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                                 routing_index, hd, scale, dropout_p, seed, router_weight, router_rows, temperature)
    router = _router(router_weight, None, router_rows, temperature)
    grads = list(native.ops().mm_adapter_bwd(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias,
                                             routing, _native_index(routing_index, router, x), hd, scale, dropout_p,
                                             seed))
    if router is not None:   # the router's share in torch (see _fwd_cpu), dx updated in place
        grads += _router_rows_backward(x, grads[0], routing, grads[1], router)
    return grads


@_bwd_op.register_fake
def _bwd_fake(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index, hd,
              scale, dropout_p, seed, router_weight=None, router_rows=None, temperature=1.0):
    f32 = functools.partial(x.new_empty, dtype=torch.float32)
    router = [f32(router_weight.shape), f32((2,))] if router_weight is not None else []
    return [torch.empty_like(x, memory_format=torch.contiguous_format), f32(routing.shape),
            f32(down_weight.shape), f32(down_weight.shape[:1]), f32(up_b_weight.shape), f32(up_b_bias.shape),
            f32(up_d_weight.shape), f32(up_d_bias.shape), *router]


def _setup_context(ctx, inputs, output) -> None:
    (x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index,
     scale, dropout_p, seed, router_weight, router_bias, router_rows, temperature) = inputs
    _, hd, table = output
    has_router = router_weight is not None
    ctx.save_for_backward(x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias,
                          table if has_router else routing, routing_index, hd, seed, router_weight, router_rows)
    ctx.scale, ctx.dropout_p, ctx.temperature, ctx.has_router = scale, dropout_p, temperature, has_router
    ctx.dtypes = [t.dtype for t in (down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias)]
    ctx.routing_dtypes = ([router_weight.dtype, router_bias.dtype] if has_router else [routing.dtype])
    ctx.mark_non_differentiable(hd, table)


def _backward(ctx, dy: Tensor, _dhd: Tensor, _dtable: Tensor):
    (x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index, hd, seed,
     router_weight, router_rows) = ctx.saved_tensors
    dx, d_routing, *rest = _bwd_op(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                                   routing_index, hd, ctx.scale, ctx.dropout_p, seed, router_weight, router_rows,
                                   ctx.temperature)
    d_weights = [g.to(dtype) for g, dtype in zip(rest[:6], ctx.dtypes)]
    if ctx.has_router:
        d_router = [g.to(dtype) for g, dtype in zip(rest[6:], ctx.routing_dtypes)]
        return (dx, *d_weights, None, None, None, None, None, *d_router, None, None)
    return (dx, *d_weights, d_routing.to(ctx.routing_dtypes[0]), None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def mm_adapter(x: Tensor, down_weight: Tensor, down_bias: Tensor, up_b_weight: Tensor, up_b_bias: Tensor,
               up_d_weight: Tensor, up_d_bias: Tensor, routing: Tensor | None, routing_index: Tensor | None = None,
               scale: float = 1.0, dropout_p: float = 0.0, seed: int | Tensor | None = None, *,
               router: Router | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The fused MM-Adapter, differentiable in x, every weight and bias, and the routing table
    or the router.

    x [B, N, d] fp32/fp16/bf16; down_weight [r, d]; down_bias [r]; up_b_weight, up_d_weight
    [d, r/g] (grouped); up_b_bias, up_d_bias [d]; routing [T, 2] with routing_index int [B, N]
    in [0, T), or routing [B, 2] and routing_index None; or routing None and `router` (see
    `Router`; its rows' order is `lavin_fast.ops.check_router_rows`'); dropout on h with
    probability dropout_p, mask from `seed` (see `dropout_mask`; an int, or a one-element
    integer tensor, e.g. drawn with `torch.randint` on x's device, which keeps `torch.compile`
    graphs whole). Returns y [B, N, d] in x's dtype; with the router (y, the table it computed
    [T, 2] fp32, detached).
    """
    weight, bias, temperature, rows = router if router is not None else (None, None, 1.0, None)
    y, _, table = _fwd_op(x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                          routing_index, float(scale), float(dropout_p),
                          _seed_tensor(seed, x.device) if dropout_p > 0 else None, weight, bias, rows,
                          float(temperature))
    return (y, table) if router is not None else y
