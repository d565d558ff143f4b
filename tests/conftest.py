"""Test-wide setup: Triton's CPU interpreter when there is no GPU, poisoned kernel outputs, and
the hypothesis profiles (a small one for CI's interpreter, a large one on a GPU)."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before the first @triton.jit is defined (lavin_fast imports kernels lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LAVIN_FAST_POISON", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu", max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("LAVIN_FAST_HYPOTHESIS", "gpu" if torch.cuda.is_available() else "ci"))
