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


def assert_close_to_oracle(name: str, out: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor) -> None:
    """out: the kernel's result; oracle: float64 reference; baseline: the PyTorch op in out's dtype."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed)"
    err = max_err(out, oracle)
    base = max_err(baseline, oracle)
    ulp = torch.finfo(out.dtype).eps * oracle.abs().max().item()
    assert err <= 2 * base + ulp, f"{name}: error {err:.3e} > 2 x PyTorch's {base:.3e} + {ulp:.3e}"
