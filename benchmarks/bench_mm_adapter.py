"""MM-Adapter: the fused Triton kernels against the ways PyTorch users would write it.

Providers:
- lavin_fast:     the fused kernels (fp32 adapter weights, activations in the benchmark dtype,
                  as in training);
- reference_conv: the reference code's formulation, eager: transpose, grouped Conv1d for each
                  projection, routed sum, transpose back (weights in the activation dtype, as
                  autocast gives them);
- eager_addmm:    a good eager formulation: one linear down, one K = 2r matmul up
                  (`lavin_fast.reference.mm_adapter`, the library's torch backend);
- compile_conv:   `torch.compile` of reference_conv (GPU only: CPU compilation is slow and
                  proves nothing about the kernels);
- native:         on a CPU where csrc/ is built, the same op's native C++ kernel takes the
                  place of lavin_fast (CPU_SHAPES, results `mm_adapter_cpu`); `--quick` on a CPU
                  runs the Triton kernels in the interpreter instead.

Modes: fwd (inputs requiring grad, as in training), bwd (the backward alone, through
autograd), fwdbwd. Bytes counted at the floor (ENGINEERING.md): forward reads x and writes y
(2 M d e), backward reads dy and x and writes dx (3 M d e), M = B N tokens, e bytes/element.

    python benchmarks/bench_mm_adapter.py [--quick] [--out benchmarks/results] [--dtypes bf16,fp16]
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():            # the kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from lavin_fast import native, reference  # noqa: E402
from lavin_fast.kernels.mm_adapter import mm_adapter as fused  # noqa: E402

GROUPS, HIDDEN, SCALE = 2, 8, 1.0
# (model, B, N, d): realistic token counts; LLaMA layers see 512-token sequences, the ViT 257.
FULL_SHAPES = ([("ViT-L", b, 257, 1024) for b in (8, 32, 64)]
               + [("7B", b, 512, 4096) for b in (1, 4, 8, 16, 32)]
               + [("13B", b, 512, 5120) for b in (1, 4, 16)])
QUICK_SHAPES = [("quick", 2, 9, 96)]
CPU_SHAPES = [("ViT-L", 8, 257, 1024), ("cpu", 8, 512, 1024)]


def reference_conv(x, routing, conv_a, bias_a, conv_b, bias_b, conv_d, bias_d):
    """The reference's RepAdapter_Router.forward (eval: no dropout), sequence on the last axis."""
    xt = x.transpose(1, 2)
    h = F.conv1d(xt, conv_a, bias_a)
    y = (F.conv1d(h, conv_b, bias_b, groups=GROUPS) * SCALE * routing[:, 0, None, None]
         + F.conv1d(h, conv_d, bias_d, groups=GROUPS) * SCALE * routing[:, 1, None, None] + xt)
    return y.transpose(1, 2).contiguous()


def make_problem(batch, tokens, dim, dtype, device):
    """Random (never zero) activations and weights; fp32 master weights as in training."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    x = rnd(batch, tokens, dim).to(dtype)
    routing = torch.softmax(rnd(batch, 2), -1)
    conv = dict(conv_a=rnd(HIDDEN, dim, 1) * dim**-0.5, bias_a=rnd(HIDDEN) * 0.1,
                conv_b=rnd(dim, HIDDEN // GROUPS, 1) * 0.1, bias_b=rnd(dim) * 0.1,
                conv_d=rnd(dim, HIDDEN // GROUPS, 1) * 0.1, bias_d=rnd(dim) * 0.1)
    dense = dict(down_weight=conv["conv_a"].squeeze(-1), down_bias=conv["bias_a"],
                 up_weight=torch.stack([reference.grouped_to_dense(conv["conv_b"], GROUPS),
                                        reference.grouped_to_dense(conv["conv_d"], GROUPS)]),
                 up_bias=torch.stack([conv["bias_b"], conv["bias_d"]]))
    return x, routing, conv, dense


def providers(x, routing, conv, dense, fused_name="lavin_fast"):
    """name -> (inputs that require grad, forward closure)."""
    lowp_conv = {k: v.to(x.dtype).requires_grad_() for k, v in conv.items()}
    lowp_dense = {k: v.to(x.dtype).requires_grad_() for k, v in dense.items()}
    master = {k: v.clone().requires_grad_() for k, v in conv.items()}
    routing_g = routing.clone().requires_grad_()
    out = {
        fused_name: ([*master.values()], lambda xx: fused(
            xx, master["conv_a"].squeeze(-1), master["bias_a"], master["conv_b"].squeeze(-1), master["bias_b"],
            master["conv_d"].squeeze(-1), master["bias_d"], routing_g, None, SCALE)),
        "reference_conv": ([*lowp_conv.values()], lambda xx: reference_conv(xx, routing_g.to(x.dtype), **lowp_conv)),
        "eager_addmm": ([*lowp_dense.values()], lambda xx: reference.mm_adapter(
            xx, routing_g, lowp_dense["down_weight"], lowp_dense["down_bias"], lowp_dense["up_weight"],
            lowp_dense["up_bias"], SCALE)),
    }
    if torch.cuda.is_available():
        compiled = torch.compile(reference_conv)
        out["compile_conv"] = ([*lowp_conv.values()], lambda xx: compiled(xx, routing_g.to(x.dtype), **lowp_conv))
    for name in out:
        out[name][0].append(routing_g)
    return out


def measure(name, params, forward, x, mode, quick):
    x = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    inputs = [x, *params]
    if mode == "fwd":
        run = lambda: forward(x)  # noqa: E731
    elif mode == "bwd":
        y = forward(x)
        run = lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)  # noqa: E731
    else:
        run = lambda: torch.autograd.grad(forward(x), inputs, dy)  # noqa: E731
    ms = harness.time_ms(run, quick)
    return ms, harness.peak_memory_mb(run)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], "benchmarks/results")
    dev = harness.device()
    native_cpu = dev.type == "cpu" and not args.quick and native.available()
    if dev.type == "cpu":   # the op's CPU kernel: native C++, or Triton's interpreter under --quick
        os.environ["LAVIN_FAST_BACKEND"] = "native" if native_cpu else "triton"
    quick = args.quick or (dev.type == "cpu" and not native_cpu)
    shapes = CPU_SHAPES if native_cpu else QUICK_SHAPES if quick else FULL_SHAPES
    dtypes = ["fp32"] if dev.type == "cpu" else args.dtypes.split(",")
    copy_gbs = harness.copy_bandwidth_gbs(2**28 if not quick else 2**20, quick)
    rows = []
    for dtype_name in dtypes:
        for model, batch, tokens, dim in shapes:
            x, routing, conv, dense = make_problem(batch, tokens, dim, harness.DTYPES[dtype_name], dev)
            fused_name = "native" if native_cpu else "lavin_fast"
            for name, (params, forward) in providers(x, routing, conv, dense, fused_name).items():
                for mode, floor_elems in (("fwd", 2), ("bwd", 3), ("fwdbwd", 5)):
                    ms, peak = measure(name, params, forward, x, mode, quick)
                    gbs = floor_elems * x.numel() * x.element_size() / ms / 1e6
                    rows.append(dict(model=model, B=batch, N=tokens, d=dim, dtype=dtype_name, provider=name,
                                     mode=mode, ms=ms, GBps=gbs, frac_copy_bw=gbs / copy_gbs, peak_MiB=peak))
                    print(f"{model} B={batch} {dtype_name} {name:15s} {mode:6s} {ms:9.4f} ms {gbs:8.1f} GB/s",
                          file=sys.stderr)
    for row in rows:
        base = next(r for r in rows if r["provider"] == "reference_conv" and
                    all(r[k] == row[k] for k in ("model", "B", "d", "dtype", "mode")))
        row["speedup_vs_reference"] = base["ms"] / row["ms"]
    title = f"MM-Adapter (r={HIDDEN}, groups={GROUPS}); copy bandwidth {copy_gbs:.0f} GB/s"
    harness.write_results(rows, args.out, "mm_adapter" + ("_cpu" if native_cpu else "_quick" if quick else ""), title,
                          plot=lambda meta: plot(rows, meta, copy_gbs))


def plot(rows, meta, copy_gbs):
    import matplotlib.pyplot as plt

    modes = ("fwd", "bwd", "fwdbwd")
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(5 * len(modes), 3.6 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            labels = list(dict.fromkeys(f"{r['model']}\nB={r['B']}" for r in sel))
            providers_ = list(dict.fromkeys(r["provider"] for r in sel))
            width = 0.8 / len(providers_)
            for k, prov in enumerate(providers_):
                vals = [r["GBps"] for r in sel if r["provider"] == prov]
                ax.bar([p + k * width for p in range(len(vals))], vals, width, label=prov)
            ax.axhline(copy_gbs, color="k", ls="--", lw=0.8, label="copy bandwidth")
            ax.set_xticks([p + 0.4 - width / 2 for p in range(len(labels))], labels, fontsize=7)
            ax.set_title(f"{mode}, {dtype}")
            ax.set_ylabel("GB/s (floor bytes / time)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"MM-Adapter on {meta['device']} ({meta['date']}, {meta['commit']})")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
