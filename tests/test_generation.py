"""Generation: KV-cached decoding equals recomputing the whole sequence, batches equal single
prompts, routing is reused from position 0, stopping rules, sampling, and input checks."""
import random
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lavin_fast.collate import SequenceLayout
from lavin_fast.generation import Generation, generate, generate_tokens, sample_next_token
from lavin_fast.models.lavin import LaVIN, LaVINConfig
from lavin_fast.models.llama import LlamaConfig
from lavin_fast.tokenizer import Tokenizer

WORDS = ("the cat dog bird sun moon tree river stone red blue green small large quick slow runs jumps "
         "sees eats near above under question answer options context response image because").split()
PROMPTS = [
    "Question: Which is red?\nResponse:",
    "Question: What does the quick dog see near the river under the moon?\nResponse:",
    "Question: Small bird?\nResponse:",
    "Question: Which tree is large and green and above the stone?\nResponse:",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, layout, images): a tiny LaVIN with non-trivial adapters, fp32, in eval mode."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
    texts += PROMPTS + ["Image: ", "Image: N/A"]
    tokenizer = Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)
    torch.manual_seed(0)
    # temperature 1 (not 10) so the two modalities route visibly differently
    config = LaVINConfig.from_preset("tiny", llama=LlamaConfig.from_preset("tiny", vocab_size=tokenizer.n_words),
                                     temperature=1.0)
    model = LaVIN(config).eval()
    with torch.no_grad():  # the up-projections start at zero; make the adapters change things
        for name, param in model.named_parameters():
            if ".conv_B." in name or ".conv_D." in name:
                param.normal_(0.0, 0.2)
            elif name.endswith("expert_weights.weight"):
                param.normal_(0.0, 0.5)
    layout = SequenceLayout(tokenizer, image_tokens=config.image_tokens)
    size = config.vit.image_size
    images = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return model, layout, images


def naive_greedy(model, layout, prompt, image, steps):
    """Greedy decoding that re-runs the full, cache-free forward on the growing sequence."""
    ids = layout.prompt_tokens(prompt, image is not None)
    out, all_logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            h = model.embed(torch.tensor([ids]), torch.tensor([image is not None]),
                            None if image is None else image[None], layout.image_start)
            logits = model.llama.output(model.llama.hidden_states(embeddings=h, isolate_first=True)[:, -1]).float()[0]
            all_logits.append(logits)
            token = int(logits.argmax())
            if token == layout.tokenizer.eos_id:
                break
            out.append(token)
            ids.append(token)
    return out, torch.stack(all_logits)


class ScriptedHead(nn.Module):
    """The output head plus a logit bias: EOS suppressed, except where `force` says
    {call index: rows} (call 0 is the prefill, call k the k-th decode step)."""

    def __init__(self, head: nn.Module, eos: int, force: dict | None = None) -> None:
        super().__init__()
        self.head, self.eos, self.force, self.calls = head, eos, force or {}, 0

    def forward(self, h):
        logits = self.head(h).float().clone()
        logits[..., self.eos] = -1e9
        for row in self.force.get(self.calls, ()):
            logits[row, self.eos] = 1e9
        self.calls += 1
        return logits


@contextmanager
def head_swapped(model, head):
    """model.llama.output replaced by `head` inside (monkeypatch would delattr a submodule)."""
    original = model.llama.output
    model.llama.output = head
    try:
        yield head
    finally:
        model.llama.output = original


def test_cached_decoding_equals_full_recompute(setup):
    model, layout, images = setup
    prompts, pics = PROMPTS[:3], [images[0], None, images[1]]
    result = generate_tokens(model, layout, prompts, pics, max_new_tokens=8, return_logits=True)
    assert isinstance(result, Generation)
    for b, (prompt, image) in enumerate(zip(prompts, pics)):
        tokens, logits = naive_greedy(model, layout, prompt, image, 8)
        assert result.tokens[b] == tokens
        assert result.logits[b].shape == logits.shape
        torch.testing.assert_close(result.logits[b], logits, atol=1e-5, rtol=1e-5)
    texts = generate(model, layout, prompts, pics, max_new_tokens=8)
    assert texts == [layout.tokenizer.decode(ids) for ids in result.tokens]


def test_positions_are_exact_one_off_would_differ(setup):
    """The reference's decode runs one RoPE position off; that must change the logits, so the
    equality above really checks the positions."""
    model, layout, _ = setup
    ids = layout.prompt_tokens(PROMPTS[0], False)
    with torch.no_grad():
        h = model.embed(torch.tensor([ids]), torch.tensor([False]), None, layout.image_start)
        right = model.llama.hidden_states(embeddings=h, isolate_first=True)[:, -1]
        cache = model.llama.new_cache(len(ids) + 1)
        model.llama.hidden_states(embeddings=h[:, :-1], cache=cache, isolate_first=True)
        shifted = model.llama.hidden_states(embeddings=h[:, -1:], start_pos=len(ids), cache=cache,
                                            isolate_first=True)[:, -1]
    assert (right - shifted).abs().max() > 1e-3


def test_mixed_batch_equals_each_prompt_alone(setup):
    model, layout, images = setup
    pics = [images[2], None, None, images[3]]
    batched = generate_tokens(model, layout, PROMPTS, pics, max_new_tokens=10, return_logits=True)
    assert len({len(layout.prompt_tokens(p, i is not None)) for p, i in zip(PROMPTS, pics)}) == 4
    for b, (prompt, image) in enumerate(zip(PROMPTS, pics)):
        alone = generate_tokens(model, layout, [prompt], [image], max_new_tokens=10, return_logits=True)
        assert batched.tokens[b] == alone.tokens[0]
        assert batched.finish_reasons[b] == alone.finish_reasons[0]
        torch.testing.assert_close(batched.logits[b], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_decode_reuses_the_routing_of_position_0(setup):
    model, layout, images = setup
    pics = [images[0], None, images[1]]
    calls = {i: [] for i in range(len(model.llama.layers))}
    def record(i, args, kwargs):
        weights = args[1] if len(args) > 1 else kwargs.get("weights")
        calls[i].append((args[0].clone(), None if weights is None else weights.clone()))

    hooks = [layer.adapter_attn.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: record(i, args, kwargs), with_kwargs=True)
        for i, layer in enumerate(model.llama.layers)]
    try:
        result = generate_tokens(model, layout, PROMPTS[:3], pics, max_new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.finish_reasons == ["max_new_tokens"] * 3
    lengths = [len(layout.prompt_tokens(p, i is not None)) for p, i in zip(PROMPTS[:3], pics)]
    # decode feeds positions min(L) .. max(L + new) - 2 (a sample's last token is never fed)
    steps = max(n + len(t) for n, t in zip(lengths, result.tokens)) - 1 - min(lengths)
    for i, layer in enumerate(model.llama.layers):
        (prefill_x, prefill_w), *decode = calls[i]
        assert prefill_w is None  # the router ran in the prefill, on position 0 ...
        with torch.no_grad():
            routing = layer.adapter_attn.route(prefill_x[:, 0])
        assert len(decode) == steps > 0
        for _, weights in decode:  # ... and its weights were passed back at every later step
            assert torch.equal(weights, routing)
        assert (routing[0] - routing[1]).abs().max() > 1e-3       # image vs text routes differ
        torch.testing.assert_close(routing[0], routing[2])         # same modality, same routing
    # The cache-free forward of each finished sequence routes the same way.
    for b, (prompt, image) in enumerate(zip(PROMPTS[:3], pics)):
        ids = layout.prompt_tokens(prompt, image is not None) + result.tokens[b]
        with torch.no_grad():
            h = model.embed(torch.tensor([ids]), torch.tensor([image is not None]),
                            None if image is None else image[None], layout.image_start)
            model.llama.hidden_states(embeddings=h, isolate_first=True)
        full = model.routing_weights()["llama"][:, 0]
        for i in range(len(model.llama.layers)):
            torch.testing.assert_close(full[i], calls[i][1][1][b], atol=1e-6, rtol=1e-6)


def test_eos_stops_only_its_sample(setup):
    model, layout, _ = setup
    eos, head = layout.tokenizer.eos_id, model.llama.output
    # Two text prompts; row 0 has the shorter one, so call k yields its (k+1)-th token.
    prompts, pics = [PROMPTS[0], PROMPTS[1]], [None, None]
    assert len(layout.prompt_tokens(prompts[0], False)) < len(layout.prompt_tokens(prompts[1], False))
    with head_swapped(model, ScriptedHead(head, eos)):
        free = generate_tokens(model, layout, prompts, pics, max_new_tokens=7)
    assert free.finish_reasons == ["max_new_tokens", "max_new_tokens"]
    assert [len(t) for t in free.tokens] == [7, 7]  # max_new_tokens respected exactly

    with head_swapped(model, ScriptedHead(head, eos, force={3: [0]})):
        stopped = generate_tokens(model, layout, prompts, pics, max_new_tokens=7, return_logits=True)
    assert stopped.tokens[0] == free.tokens[0][:3] and stopped.finish_reasons[0] == "eos"
    assert stopped.logits[0].shape[0] == 4 and stopped.logits[0][-1].argmax() == eos
    assert stopped.tokens[1] == free.tokens[1] and stopped.finish_reasons[1] == "max_new_tokens"
    assert eos not in stopped.tokens[0] + stopped.tokens[1]

    # Everyone at EOS at once: empty answers and no decode step after the prefill.
    with head_swapped(model, ScriptedHead(head, eos, force={0: [0, 1]})) as scripted:
        assert generate(model, layout, [prompts[0], prompts[0]], pics, max_new_tokens=7) == ["", ""]
    assert scripted.calls == 1



def test_every_stop_id_stops_its_sample(setup, monkeypatch):
    """A tokenizer with several end-of-sequence ids (LLaMA-3 Instruct's <|eot_id|> beside
    <|end_of_text|>): the answer ends at whichever comes first, and none is part of it."""
    model, layout, _ = setup
    eos, head = layout.tokenizer.eos_id, model.llama.output
    prompts, pics = [PROMPTS[0], PROMPTS[1]], [None, None]
    with head_swapped(model, ScriptedHead(head, eos)):
        free = generate_tokens(model, layout, prompts, pics, max_new_tokens=7)
    other = free.tokens[0][2]  # what sample 0 says third becomes a second stop token
    monkeypatch.setattr(layout.tokenizer, "stop_ids", (eos, other))
    with head_swapped(model, ScriptedHead(head, eos)):
        stopped = generate_tokens(model, layout, prompts, pics, max_new_tokens=7)
    assert stopped.tokens[0] == free.tokens[0][:free.tokens[0].index(other)]
    assert stopped.finish_reasons[0] == "eos"
    cut = free.tokens[1].index(other) if other in free.tokens[1] else None
    assert stopped.tokens[1] == free.tokens[1][:cut]

def test_context_limit_and_zero_budget(setup, monkeypatch):
    model, layout, images = setup
    pics = [None, images[0]]
    lengths = [len(layout.prompt_tokens(p, i is not None)) for p, i in zip(PROMPTS[:2], pics)]
    monkeypatch.setattr(model.llama.config, "max_seq_len", max(lengths) + 3)
    with head_swapped(model, ScriptedHead(model.llama.output, layout.tokenizer.eos_id)):
        result = generate_tokens(model, layout, PROMPTS[:2], pics, max_new_tokens=20)
    assert [len(t) for t in result.tokens] == [max(lengths) + 3 - n for n in lengths]
    assert result.finish_reasons == ["max_seq_len", "max_seq_len"]
    monkeypatch.setattr(model.llama.config, "max_seq_len", lengths[1])
    with pytest.raises(ValueError, match="prompt 1 takes .* max_seq_len"):
        generate(model, layout, PROMPTS[:2], pics)
    monkeypatch.undo()
    assert generate(model, layout, PROMPTS[:2], pics, max_new_tokens=0) == ["", ""]
    assert generate(model, layout, [], []) == []


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(setup):
    model, layout, images = setup
    pics = [images[0], None, None]
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    first = generate_tokens(model, layout, PROMPTS[:3], pics, seed=1, **kwargs).tokens
    assert generate_tokens(model, layout, PROMPTS[:3], pics, seed=1, **kwargs).tokens == first
    assert generate_tokens(model, layout, PROMPTS[:3], pics, seed=2, **kwargs).tokens != first
    greedy = generate_tokens(model, layout, PROMPTS[:3], pics, max_new_tokens=12).tokens
    assert generate_tokens(model, layout, PROMPTS[:3], pics, max_new_tokens=12, temperature=0.7,
                           top_p=1e-6, seed=3).tokens == greedy


def test_sample_next_token_draws_from_the_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.3, 0.25])
    logits = probs.log().expand(20000, 4)
    draws = sample_next_token(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    # nucleus {1, 2} (mass 0.7 >= 0.6), renormalised to 4/7, 3/7
    torch.testing.assert_close(counts, torch.tensor([0.0, 4 / 7, 3 / 7, 0.0]), atol=0.015, rtol=0)
    assert torch.equal(sample_next_token(logits[:3]), torch.tensor([1, 1, 1]))
    tie = torch.tensor([[0.0, 2.0, 2.0]])
    assert sample_next_token(tie, 1.0, 1e-6, torch.Generator().manual_seed(0)).item() == 1 == tie.argmax().item()


def test_keeps_training_state_and_ignores_dropout(setup):
    model, layout, images = setup
    args = (model, layout, PROMPTS[:2], [images[0], None])
    expected = generate_tokens(*args, max_new_tokens=5, return_logits=True)
    model.train()
    model.llama.eval()  # a mixed state must come back as it was, module by module
    try:
        got = generate_tokens(*args, max_new_tokens=5, return_logits=True)
        assert model.training and not model.llama.training and model.vit.training
        assert not model.llama.layers[0].adapter_attn.training and model.vit.blocks[0].adapter_attn.training
    finally:
        model.eval()
    # no adapter dropout (p = 0.1) while generating, even though the caller was training
    assert got.tokens == expected.tokens
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not got.logits[0].requires_grad


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=PROMPTS[:2], images=[None]), "2 prompts but 1 images"),
    (dict(prompts=PROMPTS[:1], images=[torch.zeros(3, 32, 32)]), r"image 0 must be .*\[3, 56, 56\]"),
    (dict(prompts=PROMPTS[:2], images=[None, torch.zeros(1, 3, 56, 56)]), r"image 1 must be"),
    (dict(prompts=PROMPTS[:1], images=[torch.zeros(3, 56, 56, dtype=torch.uint8)]), r"image 0 must be .*float"),
    (dict(prompts=PROMPTS[:1], images=["cat.png"]), "image 0 is a str"),
    (dict(prompts="Question: x", images=[None]), "single string"),
    (dict(prompts=[3], images=[None]), "prompt 0 is a int"),
    (dict(prompts=PROMPTS[:1], images=[None], max_new_tokens=-1), "max_new_tokens"),
    (dict(prompts=PROMPTS[:1], images=[None], temperature=-0.5), "temperature"),
    (dict(prompts=PROMPTS[:1], images=[None], top_p=0.0), "top_p"),
    (dict(prompts=PROMPTS[:1], images=[None], top_p=1.5), "top_p"),
])
def test_bad_inputs_raise(setup, kwargs, match):
    model, layout, _ = setup
    with pytest.raises(ValueError, match=match):
        generate(model, layout, **kwargs)


def test_layout_must_match_the_model(setup):
    model, layout, _ = setup
    with pytest.raises(ValueError, match="layout has 4 image slots"):
        generate(model, SequenceLayout(layout.tokenizer, image_tokens=4), PROMPTS[:1], [None])
