"""Shared judgement of a kernel's numbers against the float64 oracle.

The rule (the one flash-attention's tests use): the kernel's largest error against the float64
reference may be at most twice the largest error of the plain PyTorch op run in the kernel's
dtype, plus one rounding step of the result's magnitude in that dtype.
"""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_oracle(name: str, out: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor,
                           ulps: float = 1, magnitude: float | None = None) -> None:
    """out: the kernel's result; oracle: float64 reference; baseline: the PyTorch op in out's dtype.

    On top of 2x PyTorch's error, `ulps` rounding steps (1 by default) of `magnitude`, the size
    the rounding is relative to: by default the oracle's largest value. A sum whose terms cancel
    rounds relative to its terms, not to its result: pass their size (e.g. the reference run on
    absolute values). That matters for outputs of a few elements (a routing or bias gradient),
    where the largest error of each side is a single noisy draw.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed)"
    err = max_err(out, oracle)
    base = max_err(baseline, oracle)
    size = oracle.abs().max().item() if magnitude is None else magnitude
    ulp = ulps * torch.finfo(out.dtype).eps * size
    assert err <= 2 * base + ulp, f"{name}: error {err:.3e} > 2 x PyTorch's {base:.3e} + {ulp:.3e}"
