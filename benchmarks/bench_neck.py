"""Visual neck: the fused Triton kernels against eager PyTorch and torch.compile.

Providers:
- lavin_fast: the fused kernels (fp32 neck weights, activations in the benchmark dtype);
- eager:      the reference's formulation, `Linear -> SiLU -> Linear` (for swiglu the gated
              unit), weights in the activation dtype as autocast gives them — for the neck the
              reference's way is already the good eager way (two addmm);
- compile:    `torch.compile` of that (GPU only);
- native:     on a CPU where csrc/ is built, the same op's native C++ kernel takes the place of
              lavin_fast (CPU_SHAPES, results `neck_cpu`); `--quick` on a CPU runs the Triton
              kernels in the interpreter instead.

At LaVIN's shapes (M = 6 CLS tokens x batch, 1024 -> 128 -> d) the weights dominate the bytes:
the floor is reading x, the weights and biases once and writing y (forward); reading dy, x and
the weights and writing dx and the weight gradients (backward).

    python benchmarks/bench_neck.py [--quick] [--out DIR] [--dtypes bf16,fp16]
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():            # the kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402
from lavin_fast import native, reference  # noqa: E402
from lavin_fast.kernels.visual_neck import visual_neck as fused  # noqa: E402

FULL_SHAPES = [(model, batch, 1024, 128, dim) for model, dim in (("7B", 4096), ("13B", 5120))
               for batch in (1, 4, 32, 128)]
QUICK_SHAPES = [("quick", 2, 64, 16, 48)]
CPU_SHAPES = [("7B", batch, 1024, 128, 4096) for batch in (4, 32)]


def make_problem(rows, d_in, hidden, d_out, activation, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    in_rows = hidden * (2 if activation == "swiglu" else 1)
    x = rnd(rows, d_in).to(dtype)
    weights = dict(in_weight=rnd(in_rows, d_in) * d_in**-0.5, in_bias=rnd(in_rows) * 0.1,
                   out_weight=rnd(d_out, hidden) * hidden**-0.5, out_bias=rnd(d_out) * 0.1)
    return x, weights


def providers(x, weights, activation, fused_name="lavin_fast"):
    master = {k: v.clone().requires_grad_() for k, v in weights.items()}
    lowp = {k: v.to(x.dtype).requires_grad_() for k, v in weights.items()}
    eager = lambda xx: reference.visual_neck(xx, **lowp, activation=activation)  # noqa: E731
    out = {fused_name: (list(master.values()), lambda xx: fused(xx, **master, activation=activation)),
           "eager": (list(lowp.values()), eager)}
    if torch.cuda.is_available():
        compiled = torch.compile(reference.visual_neck)
        out["compile"] = (list(lowp.values()), lambda xx: compiled(xx, **lowp, activation=activation))
    return out


def floor_bytes(mode, x, weights, d_out):
    e = x.element_size()
    w = sum(t.numel() for t in weights.values()) * 4
    fwd = x.numel() * e + w + x.shape[0] * d_out * e
    bwd = x.shape[0] * d_out * e + 2 * x.numel() * e + 2 * w
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def measure(params, forward, x, mode, quick):
    x = x.detach().requires_grad_()
    inputs = [x, *params]
    y = forward(x)
    dy = torch.randn_like(y)
    if mode == "fwd":
        run = lambda: forward(x)  # noqa: E731
    elif mode == "bwd":
        run = lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)  # noqa: E731
    else:
        run = lambda: torch.autograd.grad(forward(x), inputs, dy)  # noqa: E731
    return harness.time_ms(run, quick), harness.peak_memory_mb(run)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    dev = harness.device()
    native_cpu = dev.type == "cpu" and not args.quick and native.available()
    if dev.type == "cpu":   # the op's CPU kernel: native C++, or Triton's interpreter under --quick
        os.environ["LAVIN_FAST_BACKEND"] = "native" if native_cpu else "triton"
    quick = args.quick or (dev.type == "cpu" and not native_cpu)
    dtypes = ["fp32"] if dev.type == "cpu" else args.dtypes.split(",")
    copy_gbs = harness.copy_bandwidth_gbs(2**28 if not quick else 2**20, quick)
    log = harness.RowLog(args.out, "neck" + ("_cpu" if native_cpu else "_quick" if quick else ""))
    for dtype_name in dtypes:
        for activation in ("silu", "swiglu"):
            for model, batch, d_in, hidden, d_out in (CPU_SHAPES if native_cpu else QUICK_SHAPES if quick
                                                      else FULL_SHAPES):
                x, weights = make_problem(6 * batch, d_in, hidden, d_out, activation, harness.DTYPES[dtype_name], dev)
                fused_name = "native" if native_cpu else "lavin_fast"
                for name, (params, forward) in providers(x, weights, activation, fused_name).items():
                    for mode in ("fwd", "bwd", "fwdbwd"):
                        ms, peak = measure(params, forward, x, mode, quick)
                        gbs = floor_bytes(mode, x, weights, d_out) / ms / 1e6
                        log.add(dict(model=model, B=batch, M=6 * batch, d_out=d_out, activation=activation,
                                     dtype=dtype_name, provider=name, mode=mode, ms=ms, GBps=gbs,
                                     frac_copy_bw=gbs / copy_gbs, peak_MiB=peak))
                        print(f"{model} B={batch} {activation} {dtype_name} {name:10s} {mode:6s} {ms:9.4f} ms",
                              file=sys.stderr)
    for row in log.rows:
        base = next(r for r in log.rows if r["provider"] == "eager" and all(
            r[k] == row[k] for k in ("model", "B", "activation", "dtype", "mode")))
        row["speedup_vs_eager"] = base["ms"] / row["ms"]
    title = f"Visual neck (6 CLS taps x B, 1024 -> 128 -> d); copy bandwidth {copy_gbs:.0f} GB/s"
    log.finish(title, plot=lambda meta: plot(log.rows, meta))


def plot(rows, meta):
    import matplotlib.pyplot as plt

    combos = sorted({(r["dtype"], r["activation"]) for r in rows})
    colors = harness.series_colors([r["provider"] for r in rows])
    fig, axes = plt.subplots(len(combos), 3, figsize=(15, 3.4 * len(combos) + 0.6), squeeze=False)
    for i, (dtype, activation) in enumerate(combos):
        for j, mode in enumerate(("fwd", "bwd", "fwdbwd")):
            sel = [r for r in rows if (r["dtype"], r["activation"], r["mode"]) == (dtype, activation, mode)]
            groups = list(dict.fromkeys((r["model"], r["B"]) for r in sel))
            series = {prov: [next((r["ms"] * 1e3 for r in sel if r["provider"] == prov and (r["model"], r["B"]) == g),
                                  None) for g in groups] for prov in colors}
            harness.grouped_bars(axes[i][j], [f"{m}\nB={b}" for m, b in groups], series, "time (us)", colors)
            axes[i][j].set_title(f"{mode}, {activation}, {dtype}")
    harness.figure_legend(fig, axes.flat)
    fig.suptitle(f"Visual neck on {meta['device']} ({meta['date']}, {meta['commit']})")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


if __name__ == "__main__":
    main()
