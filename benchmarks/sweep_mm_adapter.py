"""Block-size sweep of the MM-Adapter kernels on this GPU: writes the winning per-arch table.

The kernels keep ONE table of launch settings in `lavin_fast.kernels.mm_adapter`, keyed by
(arch, dtype name), e.g. ("sm90", "bf16") -> {"BLOCK_M": 64, ..., "num_warps": 8, "num_stages": 4}
(values may also be per-kernel dicts), and the raw launches `mm_adapter_forward` /
`mm_adapter_backward` take `config=` (an entry of that table). This script finds the table by
its shape, whatever its name, starts from this GPU's entry (or another arch's for the same dtype)
and does one pass of coordinate search: each setting in turn moved one step each way (powers of
two halved and doubled, num_stages -1/+1, num_warps halved and doubled), keeping a move when
forward + backward time at LaVIN-7B micro-batch 4 (M = 2048, d = 4096) drops; settings named
"*small*" (the one-launch forward of a few rows) are judged instead by the forward at decode
(8 and 32 samples of one token), where they act. A setting that fails to compile or launch is
recorded and skipped. Every trial is a CSV row written when timed;
the best table so far is rewritten to `mm_adapter_configs_<arch>.json` after every trial, so a run
stopped by its time budget (or killed) keeps what it found.

    python benchmarks/sweep_mm_adapter.py [--quick] [--out DIR] [--dtypes bf16] [--budget-s 80]
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch

if not torch.cuda.is_available():            # the kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402
from lavin_fast.io import atomic_write_text  # noqa: E402

SHAPE = (4, 512, 4096)          # LaVIN-7B micro-batch 4 x 512 tokens
QUICK_SHAPE = (2, 9, 96)
DECODE_SHAPES = ((8, 1, 4096), (32, 1, 4096))      # a generation step, one token per sample
QUICK_DECODE_SHAPES = ((3, 1, 96),)
Config = dict


def find_config_table(module) -> tuple[str, dict] | None:
    """(name, table) of the module-level dict keyed by (arch "smNN", dtype name) tuples whose
    values are dicts; None when the module has none."""
    for name, value in vars(module).items():
        if (isinstance(value, dict) and any(isinstance(k, tuple) and str(k[0]).startswith("sm") for k in value)
                and all(isinstance(k, tuple) and len(k) == 2 and all(isinstance(p, str) for p in k)
                        and isinstance(v, dict) for k, v in value.items())):
            return name, value
    return None


def table_entry(table: dict, arch: str, dtype: torch.dtype) -> tuple[tuple[str, str], Config] | None:
    """This arch's entry for `dtype` (named "bf16" or "bfloat16"), else another GPU arch's."""
    names = {harness.DTYPE_NAMES[dtype], str(dtype).removeprefix("torch.")}
    matches = sorted(((k, v) for k, v in table.items() if k[1] in names and k[0].startswith("sm")), key=lambda kv: kv[0])
    return next(((k, v) for k, v in matches if k[0] == arch), matches[0] if matches else None)


def _leaves(config: Config, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, path + (key,))
        else:
            yield path + (key,), value


def _with(config: Config, path: tuple, value) -> Config:
    out = copy.deepcopy(config)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def neighbours(name: str, value) -> list:
    """The values one step away from `value` for the setting called `name` (none for settings
    that are not tunable sizes: flags, strings, None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return []
    lowered = name.lower()
    if "stages" in lowered:
        return [v for v in (value - 1, value + 1) if 1 <= v <= 6]
    if "warps" in lowered:
        return [v for v in (value // 2, value * 2) if 1 <= v <= 16 and v != value]
    if value > 0 and value & (value - 1) == 0:          # a power of two: a block size, a byte count
        return [v for v in (value // 2, value * 2) if v >= 1 and v != value]
    return []


def workload(path: tuple) -> str:
    """Which cost judges a setting: "decode" for the few-rows forward's ("*small*"), else "train"."""
    return "decode" if "small" in str(path[-1]) else "train"


def coordinate_search(start: Config, costs: dict[str, Callable[[Config], float]], deadline: float,
                      record: Callable[[Config, tuple | None, str, float | None, str], None],
                      keep: Callable[[Config], None]) -> Config:
    """One pass over the settings of `start`: each moved to its neighbours, kept where its
    workload's cost (`workload`; seconds, lower is better) drops. `costs` maps each workload,
    "train" and "decode", to its cost function; a cost raising marks a setting that does not
    work there. Stops at `deadline` (time.monotonic()).
    `record(config, path, workload, cost, error)` sees every trial and every measurement of
    the best (path None), `keep(config)` every new best (the start first)."""
    best = start
    best_costs: dict[str, float] = {}          # the best config's cost per workload, measured when needed

    def best_cost(name: str) -> float:
        if name not in best_costs:
            best_costs[name] = costs[name](best)
            record(best, None, name, best_costs[name], "")
        return best_costs[name]

    best_cost("train")
    keep(best)
    for path, _ in list(_leaves(start)):
        name = workload(path)
        node = best
        for key in path:
            node = node[key]
        for value in neighbours(str(path[-1]), node):
            if time.monotonic() > deadline:
                return best
            trial = _with(best, path, value)
            try:
                baseline = best_cost(name)
                trial_cost = costs[name](trial)
            except Exception as error:          # out of shared memory, a block too large, ...
                message = str(error).strip().splitlines()
                record(trial, path, name, None, f"{type(error).__name__}: {message[0][:200] if message else ''}")
                continue
            record(trial, path, name, trial_cost, "")
            if trial_cost < baseline:
                best, best_costs = trial, {name: trial_cost}
                keep(best)
    return best


def arch_key() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def _arguments(shape, dtype, device) -> dict:
    from bench_mm_adapter import SCALE, kernel_weights, make_problem
    module, x, routing = make_problem(*shape, dtype, device)
    return dict(x=x, routing=routing, routing_index=None, scale=SCALE, dy=torch.randn_like(x), **kernel_weights(module))


def launch_cost(kernels, shape, dtype, device, quick: bool) -> Callable[[Config], float]:
    """Config -> seconds of one forward plus one backward launch at `shape`."""
    from bench_mm_adapter import raw_launch
    arguments = _arguments(shape, dtype, device)

    def cost(config: Config) -> float:
        forward = raw_launch(kernels.mm_adapter_forward, **arguments, config=config)
        hd = forward()[1]
        backward = raw_launch(kernels.mm_adapter_backward, **arguments, hd=hd, config=config)
        return (harness.time_ms(forward, quick) + harness.time_ms(backward, quick)) / 1e3

    return cost


def decode_cost(kernels, shapes, dtype, device, quick: bool) -> Callable[[Config], float]:
    """Config -> seconds of one forward at each of `shapes`, summed."""
    from bench_mm_adapter import raw_launch
    problems = [_arguments(shape, dtype, device) for shape in shapes]

    def cost(config: Config) -> float:
        return sum(harness.time_ms(raw_launch(kernels.mm_adapter_forward, **arguments, config=config), quick)
                   for arguments in problems) / 1e3

    return cost


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], dtypes="bf16", extra=lambda parser: parser.add_argument(
        "--budget-s", type=float, default=80.0, help="stop searching after this many seconds"))
    start_time = time.monotonic()
    from lavin_fast.kernels import mm_adapter as kernels

    found = find_config_table(kernels)
    if found is None:
        print("sweep_mm_adapter: lavin_fast.kernels.mm_adapter has no per-arch table (a dict keyed by "
              "(arch like 'sm90', dtype name) -> launch settings): nothing to sweep", file=sys.stderr)
        return
    table_name, table = found
    missing = [f.__name__ for f in (kernels.mm_adapter_forward, kernels.mm_adapter_backward)
               if "config" not in inspect.signature(f).parameters]
    if missing:
        print(f"sweep_mm_adapter: {', '.join(missing)} take no config= argument: nothing to sweep", file=sys.stderr)
        return
    device = harness.device()
    quick = args.quick or device.type == "cpu"
    arch = arch_key() if device.type == "cuda" else min(k[0] for k in table if k[0].startswith("sm"))
    dtypes = ["fp32"] if device.type == "cpu" else args.dtypes.split(",")
    log = harness.RowLog(args.out, f"sweep_mm_adapter_{arch}" + ("_quick" if quick else ""))
    winners: dict[str, Config] = {}
    table_path = os.path.join(args.out, f"mm_adapter_configs_{arch}" + ("_quick" if quick else "") + ".json")
    shape = QUICK_SHAPE if quick else SHAPE
    decode_shapes = QUICK_DECODE_SHAPES if quick else DECODE_SHAPES
    budget_s = min(args.budget_s, 10.0) if quick else args.budget_s      # quick: a few trials prove the loop

    def keep(table_dtype: str, config: Config) -> None:
        """Rewrite the JSON with `config` as this arch's best for `table_dtype` (the table's name
        of the dtype), keyed "arch,dtype" as the table's (arch, dtype) keys."""
        winners[f"{arch},{table_dtype}"] = config
        atomic_write_text(table_path, json.dumps(
            {"table": table_name, "arch": arch, "shape": list(shape), **log.meta, "entries": winners},
            indent=2, sort_keys=True) + "\n")

    for index, dtype_name in enumerate(dtypes):
        entry = table_entry(table, arch, harness.DTYPES[dtype_name])
        if entry is None:
            print(f"sweep_mm_adapter: {table_name} has no {dtype_name} entry to start from", file=sys.stderr)
            continue
        (entry_arch, table_dtype), start = entry
        if entry_arch != arch:
            print(f"sweep_mm_adapter: no {arch} entry for {dtype_name}: starting from {entry_arch}'s", file=sys.stderr)

        def record(config, path, workload_name, seconds, error, dtype_name=dtype_name):
            log.add(dict(arch=arch, dtype=dtype_name, changed="/".join(map(str, path)) if path else "best",
                         workload=workload_name, config=json.dumps(config, sort_keys=True),
                         ms=None if seconds is None else seconds * 1e3, error=error))
            print(log.rows[-1], file=sys.stderr)

        dtype = harness.DTYPES[dtype_name]
        costs = dict(train=launch_cost(kernels, shape, dtype, device, quick),
                     decode=decode_cost(kernels, decode_shapes, dtype, device, quick))
        deadline = start_time + budget_s * (index + 1) / len(dtypes)
        coordinate_search(start, costs, deadline, record, lambda config, d=table_dtype: keep(d, config))
    log.finish(f"MM-Adapter block-size sweep on {arch} (ms: train = fwd + bwd at B, N, d = {shape}; decode = "
               f"fwd at {', '.join(map(str, decode_shapes))})")


if __name__ == "__main__":
    main()
