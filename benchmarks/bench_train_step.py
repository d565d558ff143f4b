"""Whole LaVIN training steps: tokens/s, MFU, peak memory and where the time goes.

A LaVIN-7B-shaped model with random weights (no download): LLaMA-7B + CLIP ViT-L/14 in bf16,
fp32 adapters, micro-batches of 4 samples of ScienceQA-like lengths (benchmarks/lengths.py:
log-normal, median 270 of at most 512 tokens, 48% with an image), the answer the last quarter
of each sample. On a CPU (fp32) `--model tiny` (the default there, the demo's model) or
`--model small` (MODELS: a 7B-like shape cut to what two cores step through in seconds);
`--quick` runs tiny on samples of at most 64 tokens, only to prove the script runs.
Layouts: padded to the micro-batch's longest sample, packed into one row, and packed with
the blocks compiled (`LAVIN_BENCH_COMPILE=1`: minutes of Inductor on a CPU). Tokens/s and MFU
count real tokens only; the padding fraction of each layout is printed. Configurations: the
adapters and neck on the fused kernels (Triton on a GPU, the native C++ ones on a CPU) or on
the pure-PyTorch backend (`LAVIN_FAST_BACKEND`), gradient checkpointing off and on (on a GPU),
and flash-attn against PyTorch SDPA where flash-attn is installed.

MFU counts the work a frozen backbone really does (ENGINEERING.md): per LLaMA token
4 N_llama FLOPs (the forward and the activation gradients; no weight gradients) plus causal
attention, 6 L d per layer (2 L d forward, twice that backward); per image 4 N_vit x 257
tokens plus its attention likewise (not causal: 12 L d per block); against the GPU's dense
bf16 peak.

Step-time split: `forward` (loss), `backward`, `optimizer` (AdamW over the 3.8M trainable
parameters), each timed with CUDA events over the same steps (medians); on a CPU by the wall
clock, the fastest of the steps (a shared machine's other work only adds time).

    python benchmarks/bench_train_step.py [--quick] [--model tiny|small|7b] [--out DIR]
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import statistics
import sys
import time

import torch
from torch import nn

import harness  # noqa: E402  (puts the checkout on sys.path)
from lavin_fast import native, recipe  # noqa: E402
from lavin_fast.collate import Batch  # noqa: E402
from lavin_fast.compile import compile_blocks  # noqa: E402
from lengths import scienceqa_lengths  # noqa: E402
from lavin_fast.models import attention  # noqa: E402
from lavin_fast.models.lavin import LaVIN, LaVINConfig  # noqa: E402
from lavin_fast.models.llama import LlamaConfig, RMSNorm  # noqa: E402
from lavin_fast.models.vit import ViTConfig  # noqa: E402

# Dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def small_config() -> LaVINConfig:
    """LaVIN-7B's shape scaled down for a CPU: LLaMA's vocabulary, head size 64 and FFN rule at
    width 512 and 8 layers (about 43M parameters with the output layer), a CLIP-like ViT on
    224-pixel images (257 tokens) at width 256 with a tap after each of its 6 blocks."""
    return dataclasses.replace(
        LaVINConfig.from_preset("7b"), llama=LlamaConfig(dim=512, n_layers=8, n_heads=8),
        vit=ViTConfig(width=256, layers=6, heads=4, taps=(1, 2, 3, 4, 5, 6)), neck_hidden=128)


MODELS = {"tiny": lambda: LaVINConfig.from_preset("tiny"), "small": small_config,
          "7b": lambda: LaVINConfig.from_preset("7b")}


def build(config: LaVINConfig, device: torch.device, dtype: torch.dtype) -> LaVIN:
    """Random weights (never zeros: the adapters' up-projections too) without materialising an
    fp32 copy of the backbone: built on meta, cast, then allocated."""
    with torch.device("meta"):
        model = LaVIN(config)
    model.set_backbone_dtype(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    return model


def make_batch(model: LaVIN, batch: int, longest: int, device: torch.device, packed: bool) -> Batch:
    """`batch` samples of ScienceQA-like lengths (at most `longest`), padded or packed in one row."""
    gen = torch.Generator().manual_seed(0)
    lengths, has_image = scienceqa_lengths(batch, seed=0, longest=longest)
    has_image = torch.tensor(has_image)
    vocab = model.config.llama.vocab_size
    samples = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    rows = [torch.cat(samples)] if packed else samples
    width = max(row.numel() for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full_like(tokens, -100)
    for index, sample in enumerate(samples):
        row, start = (0, sum(lengths[:index])) if packed else (index, 0)
        n = sample.numel()
        tokens[row, start:start + n] = sample
        answer = n - n // 4
        targets[row, start + answer - 1:start + n - 1] = sample[answer:]
    size = model.config.vit.image_size
    images = torch.randn(int(has_image.sum()), 3, size, size, generator=gen) if has_image.any() else None
    return Batch(tokens, targets, has_image, images, image_start=5,
                 lengths=[lengths] if packed else None).to(device)


def sample_lengths(batch: Batch) -> list[int]:
    """The real lengths of a benchmark batch's samples (padded rows: up to the last target)."""
    if batch.lengths is not None:
        return batch.lengths[0]
    counted = (batch.targets != -100).int()
    return [int(row.nonzero().max()) + 2 for row in counted]


def model_flops(model: LaVIN, batch: Batch) -> float:
    """FLOPs of one step at a frozen backbone (module docstring)."""
    llama, vit = model.config.llama, model.config.vit
    n_llama = sum(p.numel() for n, p in model.llama.named_parameters() if "adapter" not in n and "tok_embeddings" not in n)
    n_vit = sum(p.numel() for n, p in model.vit.named_parameters() if "adapter" not in n)
    # Real tokens only, each attending inside its own sample (pads are waste, not work).
    text = sum(n * (4 * n_llama + 6 * llama.n_layers * n * llama.dim) for n in sample_lengths(batch))
    patches = 1 + vit.grid ** 2
    images = 0 if batch.images is None else batch.images.shape[0]
    vision = images * patches * (4 * n_vit + 12 * vit.layers * patches * vit.width)
    return float(text + vision)


class Timer:
    """Elapsed milliseconds between marks: CUDA events on a GPU, wall clock on a CPU."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def between(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


@contextlib.contextmanager
def environment(**values: str):
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def measure(model: LaVIN, batch: Batch, steps: int, warmup: int) -> dict[str, float]:
    optimizer = recipe.build_optimizer(model, 1e-4)
    timer = Timer()
    split = {"forward": [], "backward": [], "optimizer": []}
    autocast = torch.autocast("cuda", torch.bfloat16) if torch.cuda.is_available() else contextlib.nullcontext()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        t0 = timer.mark()
        with autocast:
            loss = model.loss(batch)
        t1 = timer.mark()
        loss.backward()
        t2 = timer.mark()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = timer.mark()
        if step >= warmup:
            for name, (a, b) in zip(split, ((t0, t1), (t1, t2), (t2, t3))):
                split[name].append(timer.between(a, b))
    if torch.cuda.is_available():
        result = {f"{name}_ms": statistics.median(v) for name, v in split.items()}
    else:
        # The fastest step: on a shared CPU other processes only ever add time, in bursts
        # that a mean or a median of a few steps would keep.
        fastest = min(range(steps), key=lambda i: sum(v[i] for v in split.values()))
        result = {f"{name}_ms": v[fastest] for name, v in split.items()}
    result["step_ms"] = sum(result.values())
    result["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return result


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], extra=lambda parser: parser.add_argument(
        "--model", choices=sorted(MODELS), help="the model (default: 7b on a GPU, tiny on a CPU; --quick: tiny)"))
    device = harness.device()
    cpu = device.type == "cpu"
    preset = "tiny" if args.quick else args.model or ("tiny" if cpu else "7b")
    length = 64 if args.quick else 512            # the recipe's max_len
    batch_size = 4
    dtype = torch.float32 if cpu else torch.bfloat16
    steps, warmup = (2, 1) if args.quick else (10, 3) if not cpu else (20, 3) if preset == "tiny" else (3, 1)
    model = build(MODELS[preset](), device, dtype).train()
    batches = {"padded": make_batch(model, batch_size, length, device, packed=False),
               "packed": make_batch(model, batch_size, length, device, packed=True)}
    layouts = ["padded", "packed"] + (["packed+compiled"] if os.environ.get("LAVIN_BENCH_COMPILE") == "1" else [])
    flops = model_flops(model, batches["padded"])
    real_tokens = sum(sample_lengths(batches["padded"]))
    peak = peak_flops()
    attention_backends = ["sdpa"] + (["flash"] if attention.flash_attn_func is not None and device.type == "cuda" else [])
    log = harness.RowLog(args.out, "train_step_" + ("quick" if args.quick else f"{preset}_{device.type}"))
    # On a CPU the fused ops run natively (csrc/) where built; the interpreter's speed says nothing.
    kernels = "triton" if device.type == "cuda" else "native" if native.available() else None
    backends = [b for b in (kernels, "torch") if b is not None]
    # The compiled layout comes last: compiling is in place, so every configuration after it
    # runs compiled.
    # On a CPU the layouts are the question (checkpointing only adds a recompute).
    checkpointings = (False,) if cpu else (False, True)
    for layout, backend, checkpointing, attn in itertools.product(layouts, backends, checkpointings,
                                                                  attention_backends):
        if layout == "packed+compiled" and not any(r["layout"] == layout for r in log.rows):
            compile_blocks(model)
        batch = batches[layout.split("+")[0]]
        padding = 1 - real_tokens / batch.tokens.numel()
        model.gradient_checkpointing = checkpointing
        with environment(LAVIN_FAST_BACKEND=backend, LAVIN_FAST_ATTENTION=attn):
            result = measure(model, batch, steps, warmup)
        tokens_per_s = real_tokens / (result["step_ms"] / 1e3)
        log.add(dict(preset=preset, batch=batch_size, seq=length, dtype=str(dtype).split(".")[-1],
                     layout=layout, padding_fraction=padding,
                     kernels=backend, checkpointing=checkpointing, attention=attn, **result,
                     tokens_per_s=tokens_per_s,
                     TFLOPs=flops / (result["step_ms"] / 1e3) / 1e12,
                     MFU=(flops / (result["step_ms"] / 1e3) / peak) if peak else None))
        print(log.rows[-1], file=sys.stderr)
    title = (f"LaVIN training step ({preset}, {batch_size} samples of at most {length} tokens, {real_tokens} real); "
             f"{flops / 1e9:.4g} GFLOP per step at a frozen backbone, real tokens only")
    log.finish(title, plot=lambda meta: plot(log.rows, meta))


def plot(rows, meta):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    labels = [f"{r['layout']}\n{r['kernels']}\n{'ckpt' if r['checkpointing'] else 'no ckpt'}\n{r['attention']}"
              for r in rows]
    bottom = [0.0] * len(rows)
    for part, color in (("forward", "tab:blue"), ("backward", "tab:orange"), ("optimizer", "tab:green")):
        values = [r[f"{part}_ms"] for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for index, row in enumerate(rows):      # what the bars are for: real tokens through per second
        ax.annotate(f"{row['tokens_per_s']:.4g} real tok/s\n{row['padding_fraction']:.0%} padding",
                    (index, bottom[index]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("ms per optimizer step")
    ax.set_ylim(0, 1.2 * max(bottom))
    ax.legend()
    ax.set_title(f"LaVIN step time on {meta['device']} ({meta['date']}, {meta['commit']})", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
