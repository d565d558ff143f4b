"""`--compile`: the LLaMA's and the ViT's blocks compiled in place (lavin_fast.compile) give the
eager loss and gradients, and packed rows of changing lengths do not recompile every step.

One test (Inductor on 2 CPU cores takes minutes): the first step compiled against eager, then 19
more steps of mixed lengths and modalities. Bound: at most 4 compiles after the first step over
the 20 steps (measured: 3, the switch to dynamic shapes and the first text-only batch), where a
graph per length would compile on nearly every step.
"""
from __future__ import annotations

import torch

from lavin_fast.collate import Batch
from lavin_fast.compile import compile_blocks, compile_count
from lavin_fast.models.lavin import LaVIN, LaVINConfig

STEPS, MAX_RECOMPILES = 20, 4


def mixed_batch(gen: torch.Generator) -> Batch:
    lengths = torch.randint(10, 48, (3,), generator=gen).tolist()
    has_image = torch.rand(3, generator=gen) < 0.5
    tokens = torch.randint(3, 500, (1, sum(lengths)), generator=gen)
    targets = torch.where(torch.rand(1, sum(lengths), generator=gen) < 0.3, tokens, -100)
    images = torch.randn(int(has_image.sum()), 3, 56, 56, generator=gen) if has_image.any() else None
    return Batch(tokens, targets, has_image, images, image_start=2, lengths=[lengths])


def step(model: LaVIN, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_equal_eager_and_do_not_recompile_per_step(monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LaVIN(LaVINConfig.from_preset("tiny", adapter_dropout=0.0)).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".conv_B." in name or ".conv_D." in name:
                param.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(3)
    first = mixed_batch(gen)
    eager_loss, eager_grads = step(model, first)
    names = set(model.state_dict())
    compile_blocks(model)
    assert set(model.state_dict()) == names               # compiled in place: checkpoints unchanged
    loss, grads = step(model, first)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5 * max(grad.abs().max().item(), 1e-3), msg=name)
    after_first = compile_count()
    assert after_first > 0                                # the blocks did compile
    for _ in range(STEPS - 1):
        loss, _ = step(model, mixed_batch(gen))
        assert torch.isfinite(loss)
    recompiles = compile_count() - after_first
    assert recompiles <= MAX_RECOMPILES, f"{recompiles} compiles after the first of {STEPS} steps"
    torch._dynamo.reset()
