"""Which implementation runs a fused op, and what the kernels require of their inputs.

`LAVIN_FAST_BACKEND` picks the implementation, read at every call:
- `auto` (default): the Triton kernels for CUDA tensors of a dtype they support, the native C++
  kernels (`csrc/`, `lavin_fast.native`) for such CPU tensors where they are built, the PyTorch
  reference otherwise;
- `triton`: always the Triton kernels (on CPU tensors this needs `TRITON_INTERPRET=1` set before
  lavin_fast is imported: Triton reads it when the kernels are defined);
- `native`: always the native CPU kernels (an error where they are not built, or on a GPU);
- `torch`: always the PyTorch reference (`lavin_fast.reference`).

Triton and native are the CPU and CUDA kernels of one op each (`lavin_fast::mm_adapter_fwd`,
...): the op's CPU kernel runs the native code unless `triton` is asked for (`cpu_runs_native`).
Beneath both `lavin_fast.ops` and the kernels (`kernels/`), which read it.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from lavin_fast import native

BACKEND_ENV = "LAVIN_FAST_BACKEND"
BACKENDS = ("auto", "triton", "native", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # missing, or broken on this platform
        return False
    return True


def _backend_choice() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {choice!r}")
    return choice


def select_backend(x: Tensor) -> str:
    """The backend ('triton', 'native' or 'torch') that will run an op on `x`, per
    `LAVIN_FAST_BACKEND`."""
    choice = _backend_choice()
    if choice == "auto":
        if x.dtype not in KERNEL_DTYPES or not _triton_available():
            return "torch"
        if x.is_cuda:
            return "triton"
        return "native" if x.device.type == "cpu" and native.available() else "torch"
    if choice == "native":
        if x.device.type != "cpu":
            raise RuntimeError(f"{BACKEND_ENV}=native runs CPU tensors only, got {x.device}")
        native.ops()  # raises NativeUnavailable, saying why
        if not _triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=native needs triton importable (the ops are defined beside the "
                               "Triton kernels)")
    if choice == "triton":
        if not _triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton cannot be imported")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{BACKEND_ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 in the "
                "environment before lavin_fast is imported (Triton's CPU interpreter)"
            )
    return choice


def cpu_runs_native() -> bool:
    """Whether the CPU kernel of a fused op runs the native code (else Triton's interpreter):
    yes unless `LAVIN_FAST_BACKEND=triton`; `native` raises where they are not built."""
    choice = _backend_choice()
    if choice == "triton":
        return False
    if choice == "native":
        native.ops()
        return True
    return native.available()


def check_router_order(op: str, rows: Tensor, routing_index: Tensor | None, tokens: int) -> None:
    """Every row m = b N + n reading table row t (routing_index[b, n], or b) must come at or
    after t's source row rows[t]: the kernels compute the table in chunks of rows, so a table
    row must be ready by the first chunk reading it. A sample's first token always is. A host
    sync; rows' values must be valid rows already."""
    rows = rows.long()
    if routing_index is None:
        readers = torch.arange(rows.shape[0], device=rows.device) * tokens          # each sample's first row
        sources = rows
    else:
        readers = torch.arange(routing_index.numel(), device=rows.device).view(routing_index.shape)
        sources = rows[routing_index.long()]
    late = sources > readers
    if bool(late.any()):
        at = int(late.flatten().nonzero()[0])
        raise ValueError(f"{op}: router_rows: row {int(readers.flatten()[at])} of x reads a table row whose source "
                         f"row {int(sources.flatten()[at])} comes after it; a table row's source row must be at or "
                         "before every row reading it (e.g. a sample's first token)")


# (check, id(tensor)) -> (a weak reference to the tensor, the check's context, its version, the
# related tensor's weak reference and version) for tensors whose values passed a check. Keyed by
# id, not by the tensor (a tensor's == is elementwise); an entry leaves with its tensor.
_CHECKED: dict[tuple[str, int], tuple] = {}


def _version(tensor: Tensor) -> int | None:
    """The in-place version counter (None for an inference tensor, which keeps none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def check_once(name: str, tensor: Tensor, context: tuple, check: Callable[[], None],
               related: Tensor | None = None) -> None:
    """check() (a value check of `tensor`, a device sync) unless `tensor` passed the check `name`
    in the same context, neither it nor `related` (a tensor the check also reads) modified or
    replaced since: the same index and router rows serve every adapter of a forward (64 in
    LaVIN-7B). Inference tensors (no version counter) are checked every time."""
    version, related_version = _version(tensor), None if related is None else _version(related)
    key = (name, id(tensor))
    cached = _CHECKED.get(key)
    if cached is not None and version is not None and cached[0]() is tensor and cached[1:3] == (context, version):
        if related is None and cached[3] is None:
            return
        if (related is not None and cached[3] is not None and cached[3][0]() is related
                and related_version is not None and cached[3][1] == related_version):
            return
    check()
    if version is not None:
        _CHECKED[key] = (weakref.ref(tensor, lambda _, key=key: _CHECKED.pop(key, None)), context, version,
                         None if related is None else (weakref.ref(related), related_version))
