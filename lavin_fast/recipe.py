"""The paper's training recipe (REFERENCE.md section 5): AdamW groups, learning rate, schedule,
and the order in which samples are drawn.

- AdamW, betas (0.9, 0.95), weight decay 0.02 except on biases and 1-D tensors;
- lr = base_lr (9e-3) x effective batch / 256;
- linear warmup over the first `warmup_epochs`, then a half cosine to 0, updated every
  optimizer step (the reference updates it per iteration, from the fractional epoch);
- every optimizer step sees `effective_batch` samples, split over data-parallel ranks and
  gradient-accumulation micro-batches, so the global batch is the same for any layout.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decayed matrices, undecayed biases and 1-D."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of the reference: base_lr x batch / 256 (9e-3 x 32/256 = 1.125e-3)."""
    return base_lr * effective_batch / 256


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): a linear ramp from 0 over
    `warmup_steps`, then a half cosine from 1 down to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.02,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def micro_batches(num_samples: int, *, effective_batch: int, micro_batch: int, dp_rank: int,
                  dp_size: int, seed: int, start_step: int, total_steps: int) -> Iterator[tuple[int, list[list[int]]]]:
    """For each optimizer step from `start_step`: (step, this rank's micro-batches of indices).

    Epoch e shuffles all samples with a generator seeded by (seed, e); step s of the epoch takes
    samples [s E, (s + 1) E) of that order (E = effective_batch; the last partial batch of an
    epoch is dropped), rank r takes the r-th of dp_size equal slices, cut into micro-batches.
    A pure function of its arguments: resuming at a step replays exactly the same batches.
    """
    if effective_batch % (micro_batch * dp_size):
        raise ValueError(f"effective batch {effective_batch} is not a multiple of micro batch "
                         f"{micro_batch} x data-parallel size {dp_size}")
    steps_per_epoch = num_samples // effective_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} samples are fewer than one effective batch of {effective_batch}")
    per_rank = effective_batch // dp_size
    order, epoch = None, -1
    for step in range(start_step, total_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        start = (step % steps_per_epoch) * effective_batch + dp_rank * per_rank
        mine = order[start:start + per_rank].tolist()
        yield step, [mine[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]
