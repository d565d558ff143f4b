"""Triton kernels of lavin_fast, installed as `lavin_fast.kernels`: one op per module.

Each module holds the `@triton.jit` kernels, host functions that check inputs and launch them,
and the op registered with `torch.library` (forward, autograd and a fake for `torch.compile`).
Import them lazily (`lavin_fast.ops` does): Triton reads `TRITON_INTERPRET` when a kernel is
defined.
"""
