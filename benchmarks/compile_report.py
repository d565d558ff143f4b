"""Compile report: every Triton kernel the public modules launch, compiled for an A100 (sm_80) or
an H100/H200 (sm_90) on a machine without a GPU, with what ptxas and the TTGIR say about it.

How (ENGINEERING.md, "Compiling for a GPU without one"): a stand-in driver reports
`GPUTarget("cuda", arch, 32)`, device 0 and stream 0; `JITFunction._do_compile` is replaced by a
`triton.compile` of the `ASTSource` the launcher specialised, which records the kernel and skips
the launch. The project's own host code (`lavin_fast.MMAdapter`, `lavin_fast.VisualNeck`, forward
and backward through the triton backend) picks grids, block sizes and specialisations from real
arguments: CPU tensors of the real shapes stand in for CUDA ones (`Tensor.is_cuda` reads True and
`torch.cuda.get_device_properties` / `get_device_capability` describe the target GPU while the
report runs, so host code takes its GPU path, never its interpreter path). No kernel runs and no
tensor math happens beyond what the host code does on its own.

Per launch: grid, warps, stages, registers / spill bytes / static shared memory from the ptxas
Triton itself uses (`ptxas -v`, same flags), dynamic shared memory from the compiled metadata,
the buffers of each pipelined load from the TTGIR (`ttg.local_alloc` of N x tile for
`async_copy_global_to_local`; a plain `tt.load` in a loop has none), blocks per SM (registers
65,536, warps 64, shared memory 228 KB sm_90 / 164 KB sm_80, 32 blocks), and two models:
- bytes in flight per SM: blocks/SM x the bytes of the streaming loads in loops (loads from the
  launch's largest loaded tensors: activations, or weights where those dominate), a pipelined
  load counting tile x buffers, a plain load one tile;
- HBM bytes per call (`hbm_bytes`): each launch touches every tensor it is given once (a view
  only its own bytes), or for a launch over a chunk of rows (`row0`, `row1`) the chunk's rows of
  each tensor laid out by row; a touched byte misses L2 (counts) unless it was touched before and
  everything touched since, this launch's other ranges included, fits in 3/4 of L2 (LRU; 40 MB
  A100, 50 MB H100/H200). That is the design the kernels are built for (chunks of rows whose x or dy is re-read
  from L2, kernels/mm_adapter.py) checked against the cache size, not a measurement. Plus the
  bytes in and out of every other torch op of the call (weight reshapes, partial sums, casts),
  against the floor:
  MM-Adapter 2 M d e forward and 3 M d e backward (e = x's element size); neck M (d_in + d_out) e
  + weights forward, M (2 d_in + d_out) e + 2 x weights backward. The adapter's floor leaves out
  its weights (0.3 MB fp32 at 7B: under 1% of a training call's bytes, over twice a bf16 decode
  step's x and y), so a second floor adds them as the neck's does (`floor_with_weights`: the
  parameters the call uses read forward, read and their gradients written backward).

    python benchmarks/compile_report.py --arch 90 [--arch 80] [--dtypes bf16,fp16,fp32] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import harness

# ----------------------------------------------------------------------------------------------
# Targets and workloads
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    capability: int
    gpu_name: str          # ptxas --gpu-name
    sms: int
    smem_per_sm: int       # bytes usable by blocks
    example: str
    l2_bytes: int


ARCHS = {
    80: Arch(80, "sm_80", 108, 164 * 1024, "A100", 40 << 20),
    90: Arch(90, "sm_90a", 132, 228 * 1024, "H100/H200", 50 << 20),
}
REGISTERS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM, SMEM_RESERVED_PER_BLOCK = 65536, 64, 32, 1024


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a public module: `module` at `shape`, in `phase` (training: forward with
    dropout + backward; eval: forward; decode: forward, one token per sample, with the routing
    weights given, as a generation step reads them from its KV cache)."""
    name: str
    module: str            # "adapter" or "neck"
    phase: str             # "train", "eval", "decode"
    shape: tuple[int, ...]  # adapter: (B, N, d); neck: (B, taps, d_in, hidden, d_out)

    @property
    def label(self) -> str:
        return f"{self.name} {self.phase}"


def _cases() -> list[Case]:
    cases = []
    for model, dim, out_dim in (("7B", 4096, 4096), ("13B", 5120, 5120)):
        cases += [Case(f"{model} adapter", "adapter", "train", (4, 512, dim)),
                  Case(f"{model} adapter", "adapter", "eval", (4, 512, dim)),
                  Case(f"{model} adapter", "adapter", "decode", (8, 1, dim))]
        cases += [Case(f"{model} neck", "neck", phase, (4, 6, 1024, 128, out_dim)) for phase in ("train", "eval")]
    cases.append(Case("7B adapter, batch 32", "adapter", "decode", (32, 1, 4096)))   # the one-launch path's most rows
    cases += [Case("ViT-L adapter", "adapter", phase, (32, 257, 1024)) for phase in ("train", "eval")]
    cases += [Case("7B neck, ViT batch 32", "neck", phase, (32, 6, 1024, 128, 4096)) for phase in ("train", "eval")]
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# The stand-in GPU: compile instead of launch
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    args: dict            # parameter name -> value the host passed
    compiled: object      # triton CompiledKernel


class _StandInDriver:
    """What Triton's launcher asks the active driver while specialising and compiling."""

    def __init__(self, arch: Arch) -> None:
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch.capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclasses.dataclass(frozen=True)
class _DeviceProperties:
    """The fields of torch.cuda.get_device_properties that host code reads."""
    name: str
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int = 80 * 2**30


def _grid3(grid, bound: dict) -> tuple[int, int, int]:
    grid = grid(bound) if callable(grid) else grid
    grid = tuple(int(g) for g in grid) + (1, 1)
    return grid[:3]


@contextlib.contextmanager
def stand_in_gpu(arch: Arch) -> Iterator[list[Launch]]:
    """While active, Triton compiles every launch for `arch` and records it in the yielded list
    instead of running it; CPU tensors pass the host's CUDA checks."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    import triton

    launches: list[Launch] = []
    compiled_cache: dict = {}
    pending: list = []        # the grid and arguments of the launch being compiled
    properties = _DeviceProperties(f"stand-in {arch.gpu_name}", arch.capability // 10, arch.capability % 10, arch.sms)
    original = dict(run=JITFunction.run, do_compile=JITFunction._do_compile, is_cuda=torch.Tensor.is_cuda,
                    properties=torch.cuda.get_device_properties, capability=torch.cuda.get_device_capability)

    def run(self, *args, grid, warmup, **kwargs):
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in self.arg_names})
        bound.apply_defaults()
        pending.append((grid, dict(bound.arguments)))
        try:
            original["run"](self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            pending.pop()

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        from triton.compiler import ASTSource
        target = self.device_caches[device][2]
        cache_key = (self.fn.__qualname__, key)
        if cache_key not in compiled_cache:
            compiled_cache[cache_key] = triton.compile(ASTSource(self, signature, constexprs, attrs),
                                                       target=target, options=options.__dict__)
        grid, bound = pending[-1]
        launches.append(Launch(self.fn.__name__, _grid3(grid, bound), bound, compiled_cache[cache_key]))
        return None           # the launcher returns before launching

    def reset_binders() -> None:
        # The launcher caches the target per device at first use: forget it on entry and exit.
        from triton.runtime.jit import _triton_jit_function_registry
        for fn in _triton_jit_function_registry.values():
            if isinstance(fn, JITFunction):
                fn.device_caches = defaultdict(fn.create_binder)

    previous_driver = driver._active      # None on a machine without a GPU (no default driver)
    driver.set_active(_StandInDriver(arch))
    reset_binders()
    JITFunction.run, JITFunction._do_compile = run, do_compile
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.get_device_properties = lambda *args, **kwargs: properties
    torch.cuda.get_device_capability = lambda *args, **kwargs: (properties.major, properties.minor)
    try:
        yield launches
    finally:
        JITFunction.run, JITFunction._do_compile = original["run"], original["do_compile"]
        torch.Tensor.is_cuda = original["is_cuda"]
        torch.cuda.get_device_properties = original["properties"]
        torch.cuda.get_device_capability = original["capability"]
        driver._active = previous_driver
        reset_binders()


class _TorchOpBytes(TorchDispatchMode):
    """Bytes in and out of every torch op outside the kernels' own custom ops (which the launch
    records count). Views, allocations and the seed draw move nothing."""

    MOVES_NOTHING = ("empty", "randint", "detach", "lift_fresh", "alias")

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name()
        if name.startswith("lavin_fast::") or func.is_view or any(s in name for s in self.MOVES_NOTHING):
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


# ----------------------------------------------------------------------------------------------
# Driving the public modules
# ----------------------------------------------------------------------------------------------


def _call(case: Case, dtype: torch.dtype, launches: list[Launch], counter: "_TorchOpBytes") -> tuple[int, int]:
    """One call of the module as training / evaluation / decoding makes it (fp32 weights), with
    `counter` counting the torch ops of the call itself (not the set-up). Returns how many of
    `launches` the forward made, and the bytes of the parameters the call uses (a decoding
    adapter, given its routing weights, runs no router)."""
    from lavin_fast import MMAdapter, VisualNeck
    torch.manual_seed(0)
    if case.module == "adapter":
        batch, tokens, dim = case.shape
        module = MMAdapter(dim)
        x = torch.randn(batch, tokens, dim).to(dtype)
    else:
        batch, taps, d_in, hidden, d_out = case.shape
        module = VisualNeck(d_in, hidden, d_out)
        x = torch.randn(batch, taps, d_in).to(dtype)
    module.train(case.phase == "train")
    decoding = case.phase == "decode"
    weight_bytes = sum(p.numel() * p.element_size() for name, p in module.named_parameters()
                       if not (decoding and name.startswith("expert_weights.")))
    if case.phase != "train":
        weights = torch.softmax(torch.randn(x.shape[0], 2), -1) if decoding else None
        with torch.no_grad(), counter:
            module(x) if weights is None else module(x, weights)
        return len(launches), weight_bytes
    x.requires_grad_()
    with counter:
        y = module(x)
    forward_launches = len(launches)
    dy = torch.randn_like(y)
    # The gradients handed back as a layer's backward hands them on (x is an activation inside a
    # model, never a leaf: y.backward would count the copy AccumulateGrad makes into x.grad).
    with counter:
        torch.autograd.grad(y, [x, *module.parameters()], dy)
    return forward_launches, weight_bytes


def floor_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    """The least HBM traffic of the op (see the module docstring)."""
    e = torch.finfo(dtype).bits // 8
    if case.module == "adapter":
        batch, tokens, dim = case.shape
        return (2 if direction == "fwd" else 3) * batch * tokens * dim * e
    batch, taps, d_in, hidden, d_out = case.shape
    rows, weights = batch * taps, 4 * (hidden * d_in + hidden + d_out * hidden + d_out)
    if direction == "fwd":
        return rows * (d_in + d_out) * e + weights
    return rows * (2 * d_in + d_out) * e + 2 * weights


def floor_with_weights(case: Case, dtype: torch.dtype, direction: str, weight_bytes: int) -> int:
    """`floor_bytes` with the `weight_bytes` of parameters the call uses: read forward, read
    and their gradients written backward (the neck's floor counts them already)."""
    floor = floor_bytes(case, dtype, direction)
    if case.module == "neck":
        return floor
    return floor + weight_bytes * (1 if direction == "fwd" else 2)


# ----------------------------------------------------------------------------------------------
# What the compiler says
# ----------------------------------------------------------------------------------------------


def ptxas_path(arch: Arch) -> Path | None:
    """The ptxas Triton itself uses for `arch` (bundled in the wheel), or None when missing."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = Path(get_ptxas(arch.capability).path)
    except Exception:
        return None
    return path if path.is_file() and os.access(path, os.X_OK) else None


def ptxas_stats(ptx: str, arch: Arch) -> dict[str, int]:
    """Registers, spill bytes (stores + loads) and static shared memory, from `ptxas -v` with
    the flags Triton's own compile uses."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([str(ptxas_path(arch)), "-v", "-lineinfo", "--regAllocOptLevel=2",
                               f"--gpu-name={arch.gpu_name}", str(source), "-o", str(Path(folder) / "kernel.o")],
                              capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch.gpu_name}:\n{log[-2000:]}")
    number = lambda pattern: sum(int(v) for v in re.findall(pattern, log))  # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"),
                spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                static_smem=number(r"(\d+) bytes smem"))


_TYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "i1": 1}


@dataclasses.dataclass
class Load:
    pointer_arg: str | None   # the kernel parameter the pointer derives from
    tile: tuple[int, ...]
    element_bytes: int
    buffers: int              # shared-memory buffers (pipelined); 0: a plain load into registers
    in_loop: bool
    alloc: str | None = None  # the buffers' ttg.local_alloc (the pipeliner's prologue copies share it)

    @property
    def tile_bytes(self) -> int:
        size = self.element_bytes
        for n in self.tile:
            size *= n
        return size


_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_OPERAND = re.compile(r"%[\w.$-]+")


def ttgir_loads(ttgir: str) -> list[Load]:
    """Every global load of a kernel: the parameter its pointer comes from, its tile, and its
    buffers (the leading dimension of the `ttg.local_alloc` an async copy writes into)."""
    args = set(re.findall(r"(%\w+): !tt\.ptr", ttgir))
    first_operand: dict[str, str] = {}      # value -> the value it was derived from
    alloc_buffers: dict[str, int] = {}
    loads: list[tuple[str, str, str, bool]] = []
    regions: list[bool] = []                # open regions: True for a loop body
    for line in ttgir.splitlines():
        stripped = line.strip()
        if stripped.startswith("}"):
            regions and regions.pop()
        for name, init in re.findall(r"(%[\w.$-]+) = (%[\w.$-]+)", stripped.partition("iter_args(")[2]):
            first_operand[name] = init      # loop-carried values start as their initial value
        match = _DEF.match(line)
        if match:
            name, op, rest = match.groups()
            operands = _OPERAND.findall(rest.split(":")[0])
            if operands:
                first_operand[name] = operands[0]
            if op == "ttg.local_alloc" and not operands:
                dims = re.search(r"memdesc<([\dx]+)x\w+,", rest)
                alloc_buffers[name] = int(dims.group(1).split("x")[0]) if dims else 1
            if op in ("tt.load", "ttg.async_copy_global_to_local"):
                loads.append((op, rest, name, any(regions)))
        if stripped.endswith("{"):
            regions.append(" scf.for " in f" {stripped} ")

    def root(value: str, known: set[str]) -> str | None:
        for _ in range(200):
            if value in known:
                return value
            if value not in first_operand:
                return None
            value = first_operand[value]
        return None

    result = []
    for op, rest, _name, in_loop in loads:
        operands = _OPERAND.findall(rest)
        pointer_type = re.search(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>", rest)
        if pointer_type:
            tile = tuple(int(n) for n in pointer_type.group(1).split("x"))
            element = pointer_type.group(2)
        else:
            scalar = re.search(r"!tt\.ptr<(\w+)>", rest)
            tile, element = (), scalar.group(1) if scalar else "i8"
        buffers, alloc = 0, None
        if op == "ttg.async_copy_global_to_local":
            alloc = root(operands[1], set(alloc_buffers))
            buffers = alloc_buffers.get(alloc, 1)
        arg = root(operands[0], args)
        result.append(Load(arg.lstrip("%") if arg else None, tile, _TYPE_BYTES.get(element, 4), buffers, in_loop,
                           alloc))
    return result


def _tensor_args(launch: Launch) -> dict[str, torch.Tensor]:
    return {name: value for name, value in launch.args.items() if isinstance(value, torch.Tensor)}


def _launch_bytes(launch: Launch) -> int:
    """Every tensor the launch is given, touched once (deduplicated by storage)."""
    seen = {}
    for tensor in _tensor_args(launch).values():
        seen[tensor.data_ptr()] = max(seen.get(tensor.data_ptr(), 0), tensor.numel() * tensor.element_size())
    return sum(seen.values())


Range = tuple[int, int, int]   # (storage, first byte, end byte)


def _touched(launch: Launch, rows: int) -> list[Range]:
    """The byte ranges of their storages that the launch's tensors cover: a tensor whose leading
    dimensions hold the call's `rows` rows, in a launch over rows [row0, row1), only those rows;
    any other tensor whole (a view: its own bytes, e.g. one chunk's rows of a larger buffer).
    A range given twice (a placeholder argument that is never read) counts once."""
    row0, row1 = launch.args.get("row0"), launch.args.get("row1")
    touched: dict[Range, None] = {}
    for tensor in _tensor_args(launch).values():
        start = tensor.storage_offset() * tensor.element_size()
        size = tensor.numel() * tensor.element_size()
        leading = [math.prod(tensor.shape[:i + 1]) for i in range(tensor.dim())]
        if isinstance(row0, int) and isinstance(row1, int) and rows in leading and tensor.is_contiguous():
            per_row = size // rows
            start, size = start + row0 * per_row, (row1 - row0) * per_row
        touched[(tensor.untyped_storage().data_ptr(), start, start + size)] = None
    return list(touched)


def _minus(kept: Range, cut: Range) -> list[Range]:
    """What is left of range `kept` once `cut` is taken out of it (0, 1 or 2 ranges)."""
    storage, first, end = kept
    if storage != cut[0] or cut[2] <= first or end <= cut[1]:
        return [kept]
    return [piece for piece in ((storage, first, cut[1]), (storage, cut[2], end)) if piece[2] > piece[1]]


def hbm_bytes(launches: list[Launch], rows: int, arch: Arch) -> int:
    """The launches' modelled HBM traffic (see the module docstring): an LRU of the byte ranges
    touched; the part of a touch that overlaps an earlier touched range is an L2 hit while
    everything touched since (this launch's other ranges included) fits in 3/4 of L2."""
    capacity = arch.l2_bytes * 3 // 4
    recent: list[Range] = []        # disjoint, least recently touched first
    total = 0
    for launch in launches:
        touched = _touched(launch, rows)
        others = sum(end - first for _, first, end in touched)
        since, later = [], 0       # since[i]: bytes touched from recent[i] on
        for _, first, end in reversed(recent):
            later += end - first
            since.append(later)
        since.reverse()
        for storage, first, end in touched:
            hit = 0
            for (kept_storage, kept_first, kept_end), touched_since in zip(recent, since):
                overlap = min(end, kept_end) - max(first, kept_first)
                if kept_storage == storage and overlap > 0 and touched_since + others - overlap <= capacity:
                    hit += overlap
            total += end - first - hit
        for cut in touched:
            recent = [piece for kept in recent for piece in _minus(kept, cut)]
            recent.append(cut)
    return total


def streaming_loads(loads: list[Load], tensors: dict[str, torch.Tensor]) -> list[Load]:
    """The tile loads in loops that carry the launch's bytes: those from the tensors at least
    half the size of the largest tensor the kernel loads in a loop (activations; at decode or in
    the neck, weights)."""
    size = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    looped = [load for load in loads if load.in_loop and load.tile and load.pointer_arg in size]
    largest = max((size[load.pointer_arg] for load in looped), default=0)
    return [load for load in looped if 2 * size[load.pointer_arg] >= largest]


def blocks_per_sm(registers: int, warps: int, smem: int, arch: Arch) -> tuple[int, str]:
    """Resident blocks per SM and what limits them (registers allocated per warp in units of 256)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {"registers": REGISTERS_PER_SM // (per_warp * warps), "warps": WARPS_PER_SM // warps,
              "smem": arch.smem_per_sm // (smem + SMEM_RESERVED_PER_BLOCK), "blocks": BLOCKS_PER_SM}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def describe(launch: Launch, arch: Arch) -> dict:
    """One launch's compile report row (without the case columns)."""
    compiled = launch.compiled
    stats = ptxas_stats(compiled.asm["ptx"], arch)
    warps, stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    smem = compiled.metadata.shared + stats["static_smem"]
    blocks, limiter = blocks_per_sm(stats["registers"], warps, smem, arch)
    streams = streaming_loads(ttgir_loads(compiled.asm["ttgir"]), _tensor_args(launch))
    # A pipelined stream keeps all its buffers in flight (counted once per allocation, however
    # many copies fill it); a plain load one tile.
    per_alloc = {load.alloc: load.tile_bytes * load.buffers for load in streams if load.alloc}
    in_flight = blocks * (sum(per_alloc.values()) + sum(load.tile_bytes for load in streams if not load.alloc))
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    return dict(kernel=launch.kernel.strip("_"), grid="x".join(str(g) for g in launch.grid if g > 1) or "1",
                programs=programs, waves=round(programs / (arch.sms * max(blocks, 1)), 2), warps=warps,
                stages=stages, stream_buffers=min((load.buffers for load in streams), default=None),
                streams=" ".join(sorted({f"{load.pointer_arg.removesuffix('_ptr')}:{'x'.join(map(str, load.tile))}"
                                         f"/{load.buffers}" for load in streams})),
                registers=stats["registers"], spill_bytes=stats["spill_bytes"], smem_bytes=smem,
                blocks_per_sm=blocks, occupancy_limit=limiter, in_flight_KB_per_sm=round(in_flight / 1024, 1),
                launch_MB=round(_launch_bytes(launch) / 1e6, 3))


def report(arch: Arch, dtypes: list[torch.dtype], cases: list[Case] = CASES) -> list[dict]:
    """Compile every launch of every case for `arch`; one row per launch, with the call's modelled
    HBM bytes against the floor on each row of the call."""
    os.environ["LAVIN_FAST_BACKEND"] = "triton"
    os.environ.pop("LAVIN_FAST_POISON", None)
    rows = []
    for dtype in dtypes:
        for case in cases:
            counter = _TorchOpBytes()
            with stand_in_gpu(arch) as launches:
                first_bwd, weight_bytes = _call(case, dtype, launches, counter)
            if not launches:
                raise RuntimeError(f"compile_report: {case.label} ({harness.DTYPE_NAMES[dtype]}) launched no Triton kernel: "
                                   "is LAVIN_FAST_BACKEND honoured, or TRITON_INTERPRET set?")
            directions = ["fwd"] + (["bwd"] if case.phase == "train" else [])
            floor = sum(floor_bytes(case, dtype, d) for d in directions)
            floor_weights = sum(floor_with_weights(case, dtype, d, weight_bytes) for d in directions)
            batch = case.shape[0]
            rows_m = batch * case.shape[1]
            # The forward's and the backward's caches are apart: the rest of the model runs between.
            modelled = (hbm_bytes(launches[:first_bwd], rows_m, arch) + hbm_bytes(launches[first_bwd:], rows_m, arch)
                        + counter.bytes)
            for i, launch in enumerate(launches):
                rows.append(dict(arch=arch.gpu_name, case=case.name, phase=case.phase, dtype=harness.DTYPE_NAMES[dtype],
                                 M=rows_m, d=case.shape[2], direction="bwd" if i >= first_bwd else "fwd",
                                 **describe(launch, arch),
                                 torch_ops_MB=round(counter.bytes / 1e6, 3), call_HBM_MB=round(modelled / 1e6, 3),
                                 floor_MB=round(floor / 1e6, 3), HBM_over_floor=round(modelled / floor, 3),
                                 floor_with_weights_MB=round(floor_weights / 1e6, 3),
                                 HBM_over_floor_with_weights=round(modelled / floor_weights, 3)))
            print(f"{arch.gpu_name} {harness.DTYPE_NAMES[dtype]} {case.name} {case.phase}: {len(launches)} launches",
                  file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                        help="compute capability to compile for, 80 or 90 (repeat for both; default both)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--case", action="append", choices=[case.label for case in CASES], metavar="CASE",
                        help="only this case (repeatable), e.g. '7B adapter train'; default all of: "
                             + "; ".join(case.label for case in CASES))
    parser.add_argument("--out", default=str(harness.RESULTS), help="folder for the CSV and markdown")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_report: unset TRITON_INTERPRET (with it the kernels run in the interpreter and never compile)")
    dtypes = harness.parse_dtypes(args.dtypes)
    cases = [case for case in CASES if args.case is None or case.label in args.case]
    archs = args.arch or sorted(ARCHS)
    if len(archs) > 1:     # one process per arch: host code may cache what it asked the GPU (an SM count)
        for capability in archs:
            command = [sys.executable, __file__, "--arch", str(capability), "--dtypes", args.dtypes, "--out", args.out]
            for case in args.case or []:
                command += ["--case", case]
            if subprocess.run(command).returncode:
                sys.exit(f"compile_report: the sm_{capability} report failed")
        return
    for capability in archs:
        arch = ARCHS[capability]
        if ptxas_path(arch) is None:
            sys.exit(f"compile_report: no ptxas for {arch.gpu_name} in the triton wheel (triton.backends.nvidia)")
        rows = report(arch, dtypes, cases)
        harness.write_results(rows, args.out, f"compile_report_sm{capability}",
                              f"Compile report, {arch.gpu_name} ({arch.example}, {arch.sms} SMs), offline",
                              device=f"offline compile for {arch.gpu_name} (no GPU)")


if __name__ == "__main__":
    main()
