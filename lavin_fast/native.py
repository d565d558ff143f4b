"""The native CPU kernels (`csrc/`): built with ninja on first use, cached per machine.

`torch.utils.cpp_extension.load` compiles `csrc/*.cpp` once into a cache folder
(`$LAVIN_FAST_NATIVE_CACHE`, default `~/.cache/lavin_fast/native`, one subfolder per torch
version and CPU vector width) and later processes load the built library in milliseconds
(the extension's own hash of sources and flags decides when to rebuild). Its ops live in the
private namespace `lavin_fast_native`; the public ops `lavin_fast::mm_adapter_fwd` etc. call
them from their CPU kernels (kernels/*.py), so torch.compile and torch.export see one op.

Without a C++ compiler or ninja, or when the build fails, the native kernels are off: one log
line says so and the CPU runs the PyTorch reference. `LAVIN_FAST_NATIVE=0` turns them off.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

CACHE_ENV = "LAVIN_FAST_NATIVE_CACHE"
SWITCH_ENV = "LAVIN_FAST_NATIVE"
SOURCES = ("mm_adapter.cpp", "visual_neck.cpp")
LOG = logging.getLogger("lavin_fast")

# at::vec's vector width per CPU capability (the flags ATen compiles its own kernels with).
_VECTOR_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}

# at::parallel_for runs its threads only where the extension itself is compiled and linked with
# OpenMP (ATen/ParallelOpenMP.h is header code under #ifdef _OPENMP): without it every kernel ran
# on one thread whatever torch.set_num_threads said. The link resolves to the libgomp torch
# already loaded (same soname), so both share one thread pool and its thread count.
_OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []


class NativeUnavailable(RuntimeError):
    """The native kernels were asked for but are not built here (the reason is the message)."""


def source_dir() -> Path:
    """The C++ sources: lavin_fast/csrc in an installed wheel, csrc/ beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    return here / "csrc" if (here / "csrc").is_dir() else here.parent / "csrc"


def cache_dir() -> Path:
    capability = torch.backends.cpu.get_cpu_capability()
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lavin_fast" / "native")
    return base / f"torch{torch.__version__.replace('+', '_')}-{capability.lower()}"


def _missing_tools() -> str | None:
    """Why the build cannot start here, or None."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    missing = [name for name in SOURCES if not (source_dir() / name).is_file()]
    if missing:
        return f"the sources {missing} are not in {source_dir()}"
    return None


def build() -> None:
    """Compile (or load the cached build of) csrc/ and register its ops; raises on failure."""
    from torch.utils import cpp_extension

    reason = _missing_tools()
    if reason:
        raise NativeUnavailable(reason)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-std=c++17", *_VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]

    def load(openmp: list[str]) -> None:
        cpp_extension.load(
            name="lavin_fast_native", sources=[str(source_dir() / name) for name in SOURCES],
            extra_cflags=flags + openmp, extra_ldflags=openmp, extra_include_paths=[str(source_dir())],
            build_directory=str(folder), is_python_module=False, verbose=False,
        )

    try:
        load(_OPENMP_FLAGS)
    except Exception as error:
        if not _OPENMP_FLAGS:
            raise
        # A compiler without OpenMP (clang without libomp): the kernels on one thread.
        LOG.warning("lavin_fast: native CPU kernels built without OpenMP (one thread each): %s",
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        load([])


@functools.cache
def _load() -> str | None:
    """Build once per process; None when built, else the reason they are off (logged once)."""
    if os.environ.get(SWITCH_ENV, "1").strip() == "0":
        return f"{SWITCH_ENV}=0"
    try:
        build()
    except Exception as error:  # no toolchain, a compile error, an unwritable cache: the reference serves
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        LOG.warning("lavin_fast: native CPU kernels are off (%s); the CPU runs the PyTorch reference", reason)
        return reason
    return None


def available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on the first call)."""
    return _load() is None


def ops():
    """`torch.ops.lavin_fast_native`, building it first; NativeUnavailable says why not."""
    reason = _load()
    if reason is not None:
        raise NativeUnavailable(f"the native CPU kernels are not available: {reason}")
    return torch.ops.lavin_fast_native
