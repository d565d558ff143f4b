"""Where the kernels' host functions are about to launch: a CUDA GPU, an offline compile for one,
or Triton's CPU interpreter. Shared by the ops' block-size choices.

An offline compile (a CPU machine compiling for a GPU, e.g. the compile report) installs a
stand-in Triton driver whose target is the GPU; the host code then picks that GPU's block sizes
from CPU tensors, exactly as it would on the GPU.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

# SM counts of the targets named by `arch`, for offline compiles (no device to ask).
DEFAULT_SMS = {"sm90": 132, "sm80": 108}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def arch(device: torch.device) -> str:
    """"sm90" (Hopper or newer) / "sm80" for a CUDA device or an active GPU target,
    "interpreter" otherwise."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "sm90" if major >= 9 else "sm80"
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # no GPU driver: Triton's interpreter
        return "interpreter"
    return ("sm90" if target.arch >= 90 else "sm80") if target.backend == "cuda" else "interpreter"


@functools.cache
def _device_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, default: int) -> int:
    """The device's SM count; `default` where there is no device to ask."""
    return _device_sms(device.index or 0) if device.type == "cuda" else default
