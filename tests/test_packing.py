"""Packed micro-batches (several samples concatenated in one row, no pads) against padded ones.

Every sample keeps its RoPE positions from 0, its modality token isolated at its first slot, causal
attention inside itself, its own routing in every adapter and its answer-only targets, so the whole
LaVIN forward, the loss and every trainable gradient equal the padded layout's: in float64 on the
torch backend (1e-10) and in float32 on the Triton kernels run by the interpreter (1e-5).
"""
from __future__ import annotations

import pytest
import torch

from lavin_fast.collate import IGNORE, Batch
from lavin_fast.models.attention import packed_attention
from lavin_fast.models.lavin import LaVIN, LaVINConfig
from lavin_fast.models.segments import Segments

IMAGE_START = 2
# Image and text samples of very different lengths, in a mixed order.
LENGTHS = (41, 9, 27, 12, 60)
HAS_IMAGE = (True, False, True, False, False)


def padded_batch(dtype: torch.dtype) -> Batch:
    gen = torch.Generator().manual_seed(1)
    longest = max(LENGTHS)
    tokens = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    targets = torch.full((len(LENGTHS), longest), IGNORE)
    for row, length in enumerate(LENGTHS):
        tokens[row, :length] = torch.randint(3, 500, (length,), generator=gen)
        answer = length // 2            # the second half is the answer (and EOS)
        targets[row, answer - 1:length - 1] = tokens[row, answer:length]
    images = torch.randn(sum(HAS_IMAGE), 3, 56, 56, generator=gen, dtype=dtype)
    return Batch(tokens, targets, torch.tensor(HAS_IMAGE), images, image_start=IMAGE_START)


def packed(batch: Batch, pad_to: int = 0) -> Batch:
    """The padded batch's samples concatenated into one row (pads only at the end, up to pad_to)."""
    rows = [slice(0, n) for n in LENGTHS]
    tokens = torch.cat([batch.tokens[i, r] for i, r in enumerate(rows)])
    targets = torch.cat([batch.targets[i, r] for i, r in enumerate(rows)])
    extra = max(pad_to - tokens.numel(), 0)
    tokens = torch.cat([tokens, tokens.new_zeros(extra)])
    targets = torch.cat([targets, targets.new_full((extra,), IGNORE)])
    return Batch(tokens[None], targets[None], batch.has_image, batch.images, batch.image_start,
                 lengths=[list(LENGTHS)])


def build_model(dtype: torch.dtype) -> LaVIN:
    torch.manual_seed(0)
    model = LaVIN(LaVINConfig.from_preset("tiny", adapter_dropout=0.0)).to(dtype)
    with torch.no_grad():   # every adapter and the modality tokens non-trivial, so routing matters
        for name, param in model.named_parameters():
            if ".conv_B." in name or ".conv_D." in name or "expert_weights" in name:
                param.normal_(0, 0.3)
            if "adapter_modality_embedding" in name:
                param.normal_(0, 1.0)
    return model.train()


def forward_and_backward(model: LaVIN, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch)
    loss.backward()
    with torch.no_grad():
        logits = model(batch)
        routing = model.routing_weights()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), logits, grads, routing


def sample_logits(logits: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Each sample's logits [length, vocab], from its row (padded) or its segment (packed)."""
    if batch.lengths is None:
        return [logits[i, :n] for i, n in enumerate(LENGTHS)]
    starts = torch.tensor((0, *LENGTHS)).cumsum(0)
    return [logits[0, a:b] for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("backend, dtype, tolerance", [("torch", torch.float64, 1e-10),
                                                       ("triton", torch.float32, 1e-5)])
def test_packed_equals_padded_forward_loss_and_every_gradient(monkeypatch, backend, dtype, tolerance):
    monkeypatch.setenv("LAVIN_FAST_BACKEND", backend)
    model = build_model(dtype)
    padded = padded_batch(dtype)
    loss_a, logits_a, grads_a, routing_a = forward_and_backward(model, padded)
    loss_b, logits_b, grads_b, routing_b = forward_and_backward(model, packed(padded, pad_to=160))
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=tolerance)
    for a, b in zip(sample_logits(logits_a, padded), sample_logits(logits_b, packed(padded))):
        torch.testing.assert_close(b, a, rtol=0, atol=tolerance * max(a.abs().max().item(), 1.0))
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad is not None and grads_b[name] is not None, name    # ViT, neck and LLaMA adapters all train
        scale = max(grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=tolerance * scale, msg=name)
    # each sample routed by its own modality token: one table row per sample, equal to its padded row
    torch.testing.assert_close(routing_b["llama"], routing_a["llama"], rtol=0, atol=tolerance)
    assert not torch.allclose(routing_a["llama"][:, 0], routing_a["llama"][:, 1])   # image != text


def test_segments_of_a_packed_row():
    """Two samples (3 and 2 slots) and one pad in a row of 6; the pad ends the last sample."""
    segments = Segments.build([[3, 2]], 1, 6, isolate_first=True)
    assert segments.positions.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert segments.first.tolist() == [0, 3]
    assert segments.sample_of.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert segments.routing_index is segments.sample_of
    # t_m alone, then the rest of its sample: attention segments [0], [1, 2], [3], [4, 5]
    assert segments.attention_ids.tolist() == [[0, 1, 1, 2, 3, 3]]
    assert segments.cu_seqlens.tolist() == [0, 1, 3, 4, 6] and segments.max_seqlen == 2
    assert segments.spans == (3, 3)   # the pad ends the last sample
    assert Segments.build([[2], [1, 1]], 2, 3).spans == (3, 1, 2)
    padded = Segments.build(None, 2, 4)
    assert padded.one_per_row and padded.routing_index is None and padded.first.tolist() == [0, 4]


@pytest.mark.parametrize("lengths, message", [([[3, 4]], "fit in the row's 6 slots"), ([[0, 2]], "at least 1"),
                                              ([[2], [2]], "2 rows of sample lengths for a batch of 1 rows")])
def test_bad_segments_are_clear_errors(lengths, message):
    with pytest.raises(ValueError, match=message):
        Segments.build(lengths, 1, 6)


def lavin_attention_by_hand(q, k, v, spans):
    """float64 loops: within each span (a sample), slot 0 (t_m) outputs its own value, slot
    j >= 1 attends to slots 1..j of its sample only; grouped-query heads share their kv head."""
    out = torch.zeros_like(q)
    group = q.shape[2] // k.shape[2]
    for row, row_spans in enumerate(spans):
        start = 0
        for span in row_spans:
            for head in range(q.shape[2]):
                kv = head // group
                out[row, start, head] = v[row, start, kv]
                for j in range(1, span):
                    keys = slice(start + 1, start + j + 1)
                    scores = k[row, keys, kv] @ q[row, start + j, head] / q.shape[-1] ** 0.5
                    out[row, start + j, head] = scores.softmax(0) @ v[row, keys, kv]
            start += span
    return out


def test_packed_attention_is_each_samples_own_attention_with_t_m_isolated():
    """Two rows, the second ending in pads (the end of its last sample), grouped-query heads:
    outputs and gradients of q, k, v equal the per-sample attention written out by hand."""
    lengths, length = [[3, 6, 1], [4, 2]], 10
    spans = [[3, 6, 1], [4, 6]]
    segments = Segments.build(lengths, 2, length, isolate_first=True)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, length, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, length, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    got = packed_attention(q, k, v, segments)
    want = lavin_attention_by_hand(q, k, v, spans)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
