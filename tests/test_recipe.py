"""The training recipe: lr scaling, schedule, AdamW groups, and the sample order."""
import math

import pytest
from torch import nn

from lavin_fast import recipe


def test_lr_scaling_and_schedule_values():
    assert recipe.scaled_lr(9e-3, 32) == pytest.approx(1.125e-3)
    assert [recipe.lr_factor(s, 4, 12) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert recipe.lr_factor(8, 4, 12) == pytest.approx(0.5)                  # halfway down the cosine
    assert recipe.lr_factor(6, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert recipe.lr_factor(12, 4, 12) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_the_optimizer_lr():
    model = nn.Linear(3, 2)
    opt = recipe.build_optimizer(model, lr=0.1)
    sched = recipe.build_scheduler(opt, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.05 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]     # 0.1 x half cosine
    assert seen == pytest.approx([0.0, 0.05, 0.1] + cosine, abs=1e-12)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_no_weight_decay_on_biases_and_1d_tensors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4))
    model[0].bias.requires_grad_(False)
    decay, no_decay = recipe.param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias)}


def collect(num, dp_size, **kw):
    per_rank = [dict(recipe.micro_batches(num, dp_rank=r, dp_size=dp_size, **kw)) for r in range(dp_size)]
    return {step: [i for r in range(dp_size) for mb in per_rank[r][step] for i in mb] for step in per_rank[0]}


def test_global_batch_is_independent_of_the_layout():
    kw = dict(effective_batch=8, seed=3, start_step=0, total_steps=7)
    one = collect(30, 1, micro_batch=8, **kw)
    assert collect(30, 2, micro_batch=2, **kw) == one == collect(30, 4, micro_batch=1, **kw)
    assert all(len(batch) == 8 for batch in one.values())
    # 30 samples, batches of 8: 3 steps per epoch, no sample twice within an epoch.
    for epoch in range(2):
        seen = [i for s in range(3 * epoch, 3 * epoch + 3) for i in one[s]]
        assert len(set(seen)) == 24
    assert one[0] != one[3]                                  # each epoch reshuffles


def test_resuming_replays_the_same_batches():
    kw = dict(effective_batch=4, micro_batch=2, dp_rank=1, dp_size=2, seed=0, total_steps=9)
    whole = list(recipe.micro_batches(10, start_step=0, **kw))
    assert list(recipe.micro_batches(10, start_step=5, **kw)) == whole[5:]


def test_sampler_errors():
    with pytest.raises(ValueError, match="not a multiple of micro batch 3 x data-parallel size 2"):
        next(recipe.micro_batches(100, effective_batch=8, micro_batch=3, dp_rank=0, dp_size=2,
                                  seed=0, start_step=0, total_steps=1))
    with pytest.raises(ValueError, match="fewer than one effective batch"):
        next(recipe.micro_batches(5, effective_batch=8, micro_batch=8, dp_rank=0, dp_size=1,
                                  seed=0, start_step=0, total_steps=1))
