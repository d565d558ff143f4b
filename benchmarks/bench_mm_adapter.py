"""MM-Adapter: what a user pays for the fused op, against the ways PyTorch users would write it.

Providers:
- module:         the public `lavin_fast.MMAdapter` (weights as fp32 parameters, router on the
                  first token, training mode), dropout 0; at decode handed its routing weights,
                  as generation hands it those kept from the prefill;
- module_dropout: the same with dropout 0.1 (LaVIN's training setting);
- kernels:        the raw launches `mm_adapter_forward` / `mm_adapter_backward` (no autograd,
                  no weight reshaping, no router): what the kernels alone cost;
- reference_conv: the reference code's formulation, eager: transpose, grouped Conv1d for each
                  projection, routed sum, transpose back (weights in the activation dtype, as
                  autocast gives them);
- eager_addmm:    a good eager formulation: one linear down, one K = 2r matmul up
                  (`lavin_fast.reference.mm_adapter`, the library's torch backend);
- compile_addmm:  `torch.compile` of eager_addmm (GPU only: CPU compilation proves nothing here);
- one_launch:     (decode only) a copy of x, one kernel launch: the latency floor of any call.

On a CPU where csrc/ is built (and without --quick) the same op runs its native C++ kernel: the
module rows are then named native / native_dropout, the raw Triton launches are left out, the
shapes are CPU_SHAPES and the results `mm_adapter_cpu`. `--quick` on a CPU runs the Triton kernels
in the interpreter instead (a check that the benchmark runs, not a measurement).

Modes: fwd (as in training: inputs require grad), fwdbwd (forward and every gradient), and for the
raw kernels bwd (the backward launch alone). Decode shapes (one token per sample) are forward only,
under torch.inference_mode and without dropout (as in generation): per-call overhead shows there.
Bytes counted at the floor (ENGINEERING.md): forward reads x and writes y (2 M d e), backward
reads dy and x and writes dx (3 M d e), M = B N tokens, e bytes/element; GB/s = floor bytes / time,
and its fraction of the copy bandwidth measured in the same run. Each row is written to the CSV as
soon as it is measured.

    python benchmarks/bench_mm_adapter.py [--quick] [--out DIR] [--dtypes bf16,fp16]
"""
from __future__ import annotations

import inspect
import os
import sys

import torch

if not torch.cuda.is_available():            # the kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LAVIN_FAST_BACKEND", "triton")

import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from lavin_fast import MMAdapter, native, reference  # noqa: E402
from lavin_fast.kernels import mm_adapter as kernels  # noqa: E402

GROUPS, HIDDEN, SCALE = 2, 8, 1.0
# (label, B, N, d): LLaMA layers see 512-token micro-batches, the ViT 257 tokens, decode 1 token.
FULL_SHAPES = [("7B", 4, 512, 4096), ("7B", 32, 512, 4096), ("13B", 4, 512, 5120), ("ViT-L", 32, 257, 1024),
               ("7B decode", 8, 1, 4096)]
QUICK_SHAPES = [("quick", 2, 9, 96), ("quick decode", 3, 1, 96)]
CPU_SHAPES = [("ViT-L", 8, 257, 1024), ("cpu", 8, 512, 1024), ("7B decode", 8, 1, 4096)]
FLOOR_ELEMENTS = {"fwd": 2, "bwd": 3, "fwdbwd": 5}   # x-sized tensors moved at the floor


def reference_conv(x, routing, conv_a, bias_a, conv_b, bias_b, conv_d, bias_d):
    """The reference's RepAdapter_Router.forward (eval: no dropout), sequence on the last axis."""
    xt = x.transpose(1, 2)
    h = F.conv1d(xt, conv_a, bias_a)
    y = (F.conv1d(h, conv_b, bias_b, groups=GROUPS) * SCALE * routing[:, 0, None, None]
         + F.conv1d(h, conv_d, bias_d, groups=GROUPS) * SCALE * routing[:, 1, None, None] + xt)
    return y.transpose(1, 2).contiguous()


def make_problem(batch, tokens, dim, dtype, device):
    """Random (never zero) activations and weights: an MMAdapter with fp32 parameters as in
    training (its up-projections randomised too), x and routing weights."""
    torch.manual_seed(0)
    module = MMAdapter(dim, HIDDEN, GROUPS, SCALE)
    with torch.no_grad():
        for conv in (module.conv_B, module.conv_D):
            conv.weight.normal_(0.0, 0.1)
            conv.bias.normal_(0.0, 0.1)
    module = module.to(device).train()
    x = torch.randn(batch, tokens, dim, device=device).to(dtype)
    routing = torch.softmax(torch.randn(batch, 2, device=device), -1)
    return module, x, routing


def kernel_weights(module: MMAdapter) -> dict[str, torch.Tensor]:
    """The module's fp32 weights under every name the raw launches use: the dense layout
    (down_weight [r, d], up_weight [2, d, r], up_bias [2, d]) and the grouped one (up_b_weight,
    up_d_weight [d, r/g], up_b_bias, up_d_bias [d])."""
    with torch.no_grad():
        convs = dict(b=module.conv_B, d=module.conv_D)
        return dict(down_weight=module.conv_A.weight.squeeze(-1).clone(), down_bias=module.conv_A.bias.clone(),
                    up_weight=torch.stack([reference.grouped_to_dense(c.weight, GROUPS) for c in convs.values()]),
                    up_bias=torch.stack([c.bias for c in convs.values()]).clone(),
                    **{f"up_{k}_weight": c.weight.squeeze(-1).clone() for k, c in convs.items()},
                    **{f"up_{k}_bias": c.bias.clone() for k, c in convs.items()})


def raw_launch(function, **available):
    """A closure calling a raw launch with the arguments its signature names, matched by name
    (so the benchmark follows the kernels' API: dense or grouped weights, a routing index or
    none, `config=`); a required argument this benchmark cannot give is a clear error."""
    params = inspect.signature(function).parameters
    missing = [n for n, p in params.items() if p.default is p.empty and n not in available]
    if missing:
        raise TypeError(f"{function.__name__} needs {missing}, which bench_mm_adapter does not provide")
    kwargs = {n: available[n] for n in params if n in available}
    return lambda: function(**kwargs)


def inference(forward, x):
    with torch.inference_mode():
        return forward(x)


def providers(module, x, routing, decode, native_cpu=False):
    """name -> {mode: closure to time}; with `native_cpu` the module runs the native C++ kernel
    and the raw Triton launches are left out."""
    weights = kernel_weights(module)
    dense = {k: weights[k] for k in ("down_weight", "down_bias", "up_weight", "up_bias")}
    conv = {k: v.detach().to(x.dtype).requires_grad_() for k, v in dict(
        conv_a=module.conv_A.weight, bias_a=module.conv_A.bias, conv_b=module.conv_B.weight,
        bias_b=module.conv_B.bias, conv_d=module.conv_D.weight, bias_d=module.conv_D.bias).items()}
    lowp = {k: v.to(x.dtype).requires_grad_() for k, v in dense.items()}
    routing_g = routing.clone().requires_grad_()
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(x)

    def autograd_modes(forward, params):
        if decode:   # generation: no autograd, as under generate()
            return {"fwd": lambda: inference(forward, x)}
        return {"fwd": lambda: forward(xg),
                "fwdbwd": lambda: torch.autograd.grad(forward(xg), [xg, *params], dy)}

    def module_with(dropout):
        def forward(inp):
            module.dropout = dropout
            return module(inp, routing) if decode else module(inp)
        return autograd_modes(forward, list(module.parameters()))

    addmm = lambda inp: reference.mm_adapter(inp, routing_g, *lowp.values(), SCALE)  # noqa: E731
    name = "native" if native_cpu else "module"
    out = {name: module_with(0.0)} if decode else {name: module_with(0.0), f"{name}_dropout": module_with(0.1)}
    if not native_cpu:
        arguments = dict(x=x, routing=routing, routing_index=None, scale=SCALE, config=None, **weights)
        raw_forward = raw_launch(kernels.mm_adapter_forward, **arguments)
        out["kernels"] = {"fwd": raw_forward}
        if not decode:
            hd = raw_forward()[1]
            out["kernels"]["bwd"] = raw_launch(kernels.mm_adapter_backward, dy=dy, hd=hd, **arguments)
    out["reference_conv"] = autograd_modes(lambda inp: reference_conv(inp, routing_g.to(x.dtype), **conv),
                                           [*conv.values(), routing_g])
    out["eager_addmm"] = autograd_modes(addmm, [*lowp.values(), routing_g])
    if torch.cuda.is_available():
        compiled = torch.compile(reference.mm_adapter)
        out["compile_addmm"] = autograd_modes(lambda inp: compiled(inp, routing_g, *lowp.values(), SCALE),
                                              [*lowp.values(), routing_g])
    if decode:
        copy = torch.empty_like(x)
        out["one_launch"] = {"fwd": lambda: copy.copy_(x)}
    return out


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    dev = harness.device()
    native_cpu = dev.type == "cpu" and not args.quick and native.available()
    if native_cpu:
        os.environ["LAVIN_FAST_BACKEND"] = "native"
    quick = args.quick or (dev.type == "cpu" and not native_cpu)
    shapes = CPU_SHAPES if native_cpu else QUICK_SHAPES if quick else FULL_SHAPES
    dtypes = ["fp32"] if dev.type == "cpu" else args.dtypes.split(",")
    copy_gbs = harness.copy_bandwidth_gbs(2**28 if not quick else 2**20, quick)
    log = harness.RowLog(args.out, "mm_adapter" + ("_cpu" if native_cpu else "_quick" if quick else ""))
    for dtype_name in dtypes:
        for model, batch, tokens, dim in shapes:
            module, x, routing = make_problem(batch, tokens, dim, harness.DTYPES[dtype_name], dev)
            decode = tokens == 1
            for name, modes in providers(module, x, routing, decode, native_cpu).items():
                for mode, run in modes.items():
                    ms = harness.time_ms(run, quick)
                    gbs = FLOOR_ELEMENTS[mode] * x.numel() * x.element_size() / ms / 1e6
                    log.add(dict(model=model, B=batch, N=tokens, d=dim, dtype=dtype_name, provider=name, mode=mode,
                                 ms=ms, GBps=gbs, frac_copy_bw=gbs / copy_gbs, copy_GBps=copy_gbs,
                                 peak_MiB=harness.peak_memory_mb(run)))
                    print(f"{model} B={batch} {dtype_name} {name:15s} {mode:6s} {ms:9.4f} ms {gbs:8.1f} GB/s",
                          file=sys.stderr)
    for row in log.rows:
        base = next((r for r in log.rows if r["provider"] == "reference_conv" and r["mode"] == row["mode"] and
                     all(r[k] == row[k] for k in ("model", "B", "d", "dtype"))), None)
        row["speedup_vs_reference"] = base["ms"] / row["ms"] if base else None
    title = f"MM-Adapter (r={HIDDEN}, groups={GROUPS}); copy bandwidth {copy_gbs:.0f} GB/s"
    log.finish(title, plot=lambda meta: plot(log.rows, meta, copy_gbs))


def plot(rows, meta, copy_gbs):
    import matplotlib.pyplot as plt

    modes = [m for m in ("fwd", "fwdbwd", "bwd") if any(r["mode"] == m for r in rows)]
    dtypes = sorted({r["dtype"] for r in rows})
    colors = harness.series_colors([r["provider"] for r in rows])
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(6 * len(modes), 4 * len(dtypes) + 0.6), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            groups = list(dict.fromkeys((r["model"], r["B"]) for r in sel))
            series = {prov: [next((r["GBps"] for r in sel if r["provider"] == prov and (r["model"], r["B"]) == g), None)
                             for g in groups] for prov in colors if any(r["provider"] == prov for r in sel)}
            ax.axhline(copy_gbs, color="k", ls="--", lw=0.8, label=f"copy bandwidth ({copy_gbs:.3g} GB/s)")
            harness.grouped_bars(ax, [f"{m}\nB={b}" for m, b in groups], series, "GB/s (floor bytes / time)", colors)
            ax.set_title(f"{mode}, {dtype}")
    harness.figure_legend(fig, axes.flat)
    fig.suptitle(f"MM-Adapter on {meta['device']} ({meta['date']}, {meta['commit']})")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


if __name__ == "__main__":
    main()
