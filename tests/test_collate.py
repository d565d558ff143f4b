"""LaVIN's sequence layout and the collation of samples into batches (REFERENCE.md section 3).

Every expected sequence is built here by hand from `tokenizer.encode` calls:

    image sample:  [0 (t_m), BOS, tok("Image: "),    0 x 6, prompt, answer, EOS, 0 (pad) ...]
    text sample:   [0 (t_m), BOS, tok("Image: N/A"),        prompt, answer, EOS, 0 (pad) ...]

and the expected targets from the definition "position i predicts token i + 1, counted on the
answer and EOS only" (REFERENCE.md section 5), never from the collator's own arithmetic.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lavin_fast.collate import IGNORE, Batch, Collator, SequenceLayout, split_groups, token_budget_groups
from lavin_fast.data import Sample
from lavin_fast.images import preprocess
from lavin_fast.tokenizer import Tokenizer

WORDS = ("the cat dog bird sun moon tree river stone red blue green small large quick slow runs jumps "
         "sees eats near above under question answer options context response image because").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
    texts += ["Image: N/A", "Image: ", "Question: Which is red?\nResponse:", "The answer is A. BECAUSE: red."] * 5
    return Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=450)


def enc(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, bos=False, eos=False)


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def expected_sequence(tokenizer: Tokenizer, sample: Sample, image_tokens: int = 6,
                      prompt: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(token ids, answer ids incl. EOS) of one sample, by hand."""
    head = [0, tokenizer.bos_id]
    head += enc(tokenizer, "Image: ") + [0] * image_tokens if sample.image is not None else enc(tokenizer, "Image: N/A")
    prompt = enc(tokenizer, sample.prompt) if prompt is None else prompt
    answer = enc(tokenizer, sample.answer) + [tokenizer.eos_id]
    return head + prompt + answer, answer


def expected_targets(ids: list[int], answer: list[int], length: int) -> list[int]:
    """Position i holds ids[i + 1] where ids[i + 1] is an answer token or EOS, IGNORE elsewhere."""
    targets = [IGNORE] * length
    first = len(ids) - len(answer)
    for i in range(first - 1, len(ids) - 1):
        targets[i] = ids[i + 1]
    return targets


# ---- SequenceLayout ---------------------------------------------------------------------------

def test_tokenizer_fixture_is_usable(tokenizer):
    # The checks below need "Image: " and "Image: N/A" to tokenize differently and non-trivially.
    assert enc(tokenizer, "Image: ") and enc(tokenizer, "Image: N/A")
    assert enc(tokenizer, "Image: ") != enc(tokenizer, "Image: N/A")
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2


@pytest.mark.parametrize("image_tokens", [6, 3])
def test_layout_prefixes(tokenizer, image_tokens):
    layout = SequenceLayout(tokenizer, image_tokens=image_tokens)
    image_prefix = enc(tokenizer, "Image: ")
    assert layout.prefix(True) == [0, tokenizer.bos_id, *image_prefix] + [0] * image_tokens
    assert layout.prefix(False) == [0, tokenizer.bos_id, *enc(tokenizer, "Image: N/A")]
    # v1 sits right after t_m, BOS and "Image: "
    assert layout.image_start == 2 + len(image_prefix)
    assert layout.prefix(True)[layout.image_start:] == [0] * image_tokens
    assert len(layout.prefix(True)) == layout.image_start + image_tokens
    # no BOS or EOS inside the prompt, no stray tokens
    prompt = "Question: Which is red?\nResponse:"
    for has_image in (True, False):
        assert layout.prompt_tokens(prompt, has_image) == layout.prefix(has_image) + enc(tokenizer, prompt)
    assert layout.max_len == 512


# ---- Collator ---------------------------------------------------------------------------------

@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    return [
        Sample("img-a", "Question: Which is red?\nResponse:", "The answer is A. BECAUSE: red.",
               write_image(tmp_path / "a.png", 0)),
        Sample("txt-b", "Question: What does the quick dog see near the river under the moon?\nResponse:",
               "The answer is B."),
        Sample("img-c", "Question: Small bird?\nResponse:", "The answer is C. BECAUSE: the small bird sees the sun.",
               write_image(tmp_path / "c.jpg", 1, size=(25, 50))),
        Sample("txt-d", "Question: tree?\nResponse:", "A."),
    ]


def test_collator_builds_the_hand_made_batch(tokenizer, samples):
    loaded = []

    def loader(path):
        loaded.append(Path(path))
        return preprocess(path, size=56)

    collator = Collator(SequenceLayout(tokenizer), image_loader=loader)
    batch = collator(samples)
    expected = [expected_sequence(tokenizer, s) for s in samples]
    length = max(len(ids) for ids, _ in expected)
    assert len({len(ids) for ids, _ in expected}) >= 3  # different lengths: padding is exercised

    assert batch.tokens.dtype == torch.long and batch.targets.dtype == torch.long
    assert batch.tokens.shape == batch.targets.shape == (len(samples), length)  # padded to the longest, not 512
    for row, (ids, answer) in enumerate(expected):
        assert batch.tokens[row].tolist() == ids + [0] * (length - len(ids))
        assert batch.targets[row].tolist() == expected_targets(ids, answer, length)
        # targets[:, i] = tokens[:, i + 1] exactly on the counted span
        counted = (batch.targets[row] != IGNORE).nonzero().squeeze(1)
        assert counted.tolist() == list(range(len(ids) - len(answer) - 1, len(ids) - 1))
        assert torch.equal(batch.targets[row, counted], batch.tokens[row, counted + 1])
        assert batch.targets[row, len(ids) - 2] == tokenizer.eos_id  # the last counted target is EOS
    assert batch.has_image.dtype == torch.bool
    assert batch.has_image.tolist() == [True, False, True, False]
    assert batch.ids == ["img-a", "txt-b", "img-c", "txt-d"]
    assert batch.image_start == 2 + len(enc(tokenizer, "Image: "))
    # images: only the image samples are loaded, stacked in batch order
    assert loaded == [samples[0].image, samples[2].image]
    assert batch.images.shape == (2, 3, 56, 56) and batch.images.dtype == torch.float32
    assert torch.equal(batch.images[0], preprocess(samples[0].image, size=56))
    assert torch.equal(batch.images[1], preprocess(samples[2].image, size=56))
    assert not torch.equal(batch.images[0], batch.images[1])
    assert batch.answer_tokens == sum(len(answer) for _, answer in expected)
    assert collator.stats.truncated == collator.stats.dropped == 0


def test_collator_default_loader_and_text_only(tokenizer, samples):
    collator = Collator(SequenceLayout(tokenizer))
    batch = collator([samples[2], samples[1]])
    assert batch.images.shape == (1, 3, 224, 224)  # the default: preprocess at CLIP's 224 px
    assert torch.equal(batch.images[0], preprocess(samples[2].image))
    text_only = collator([samples[3], samples[1]])
    assert text_only.images is None and text_only.has_image.tolist() == [False, False]
    ids, answer = expected_sequence(tokenizer, samples[1])
    assert text_only.tokens[1].tolist() == ids
    assert text_only.tokens.shape[1] == len(ids)


def test_answer_with_and_without_leading_space(tokenizer):
    """Prompt and answer are tokenized separately (REFERENCE-compatible generation): the answer
    ids are exactly encode(answer), whatever the joined string would tokenize to."""
    collator = Collator(SequenceLayout(tokenizer))
    sample = Sample("s", "Question: red?\nResponse:", "The answer is A.")
    batch = collator([sample])
    ids, answer = expected_sequence(tokenizer, sample)
    assert batch.tokens[0].tolist() == ids
    assert batch.targets[0][batch.targets[0] != IGNORE].tolist() == answer


# ---- over-long samples ------------------------------------------------------------------------

def test_truncation_cuts_the_prompt_start_never_the_answer(tokenizer, tmp_path):
    long_prompt = "Question: " + " ".join(WORDS * 2) + "\nResponse:"
    long_image = Sample("long-img", long_prompt, "The answer is A.", write_image(tmp_path / "x.png", 3))
    long_text = Sample("long-txt", long_prompt, "The answer is B. BECAUSE: red.")
    short = Sample("short", "Question: red?\nResponse:", "A.")
    # room for 12 prompt tokens beside the longer of the two (prefix + answer)
    max_len = 12 + max(len(expected_sequence(tokenizer, s)[0]) - len(enc(tokenizer, long_prompt))
                       for s in (long_image, long_text))
    assert len(expected_sequence(tokenizer, short)[0]) < max_len
    layout = SequenceLayout(tokenizer, max_len=max_len)
    collator = Collator(layout, image_loader=functools.partial(preprocess, size=56))
    batch = collator([long_image, short, long_text])
    assert collator.stats.truncated == 2 and collator.stats.dropped == 0
    assert batch.tokens.shape[1] == max_len
    assert batch.ids == ["long-img", "short", "long-txt"]

    prompt_ids = enc(tokenizer, long_prompt)
    for row, sample in ((0, long_image), (2, long_text)):
        full, answer = expected_sequence(tokenizer, sample)
        assert len(full) > max_len
        head = full[: len(full) - len(prompt_ids) - len(answer)]
        room = max_len - len(head) - len(answer)
        # the *end* of the prompt stays (its "Response:" cue next to the answer)
        ids = head + prompt_ids[-room:] + answer
        assert len(ids) == max_len
        assert batch.tokens[row].tolist() == ids
        assert batch.tokens[row, -1] == tokenizer.eos_id
        assert batch.targets[row].tolist() == expected_targets(ids, answer, max_len)
    ids, answer = expected_sequence(tokenizer, short)
    assert batch.tokens[1].tolist() == ids + [0] * (max_len - len(ids))


def test_answer_that_cannot_fit_is_dropped(tokenizer):
    fits = Sample("fits", "Question: red?\nResponse:", "A.")
    max_len = len(expected_sequence(tokenizer, fits)[0]) + 2
    layout = SequenceLayout(tokenizer, max_len=max_len)
    head = len(layout.prefix(False))
    answer_text = "The answer is A. BECAUSE: " + " ".join(WORDS)
    answer = enc(tokenizer, answer_text) + [tokenizer.eos_id]
    assert head + len(answer) >= max_len
    collator = Collator(layout)
    batch = collator([Sample("too-long", "Question: red?\nResponse:", answer_text), fits])
    assert collator.stats.dropped == 1 and collator.stats.truncated == 0
    assert batch.ids == ["fits"] and batch.tokens.shape[0] == 1 and batch.has_image.tolist() == [False]
    assert batch.tokens[0].tolist() == expected_sequence(tokenizer, fits)[0]
    with pytest.raises(ValueError, match="fits"):
        collator([Sample("too-long", "Question: red?\nResponse:", answer_text)])
    assert collator.stats.dropped == 2


def test_truncation_boundary_keeps_one_prompt_token(tokenizer):
    """Room for exactly one prompt token: kept with the prompt's last token; room for none: dropped."""
    answer_text = "The answer is A."
    prompt = "Question: Which is red?\nResponse:"
    answer = enc(tokenizer, answer_text) + [tokenizer.eos_id]
    head = 2 + len(enc(tokenizer, "Image: N/A"))
    layout = SequenceLayout(tokenizer, max_len=head + len(answer) + 1)
    collator = Collator(layout)
    batch = collator([Sample("edge", prompt, answer_text)])
    prefix = [0, tokenizer.bos_id, *enc(tokenizer, "Image: N/A")]
    assert batch.tokens[0].tolist() == prefix + enc(tokenizer, prompt)[-1:] + answer
    assert collator.stats.truncated == 1
    tight = Collator(SequenceLayout(tokenizer, max_len=head + len(answer)))
    with pytest.raises(ValueError):
        tight([Sample("edge", prompt, answer_text)])
    assert tight.stats.dropped == 1


# ---- Batch ------------------------------------------------------------------------------------

def test_batch_to_keeps_values_and_answer_tokens():
    tokens = torch.tensor([[0, 1, 5, 6, 7, 2], [0, 1, 5, 8, 2, 0]])
    targets = torch.full_like(tokens, IGNORE)
    targets[0, 3:5] = torch.tensor([7, 2])
    targets[1, 2:4] = torch.tensor([8, 2])
    images = torch.randn(1, 3, 4, 4)
    batch = Batch(tokens, targets, torch.tensor([True, False]), images, image_start=3, ids=["a", "b"])
    assert batch.answer_tokens == 4
    moved = batch.to(torch.device("cpu"))
    for name in ("tokens", "targets", "has_image", "images"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    assert moved.image_start == 3 and moved.ids == ["a", "b"] and moved.answer_tokens == 4
    meta = batch.to("meta")
    assert meta.tokens.device.type == "meta" and meta.images.shape == images.shape
    assert meta.image_start == 3 and meta.ids == ["a", "b"]
    assert batch.tokens.device.type == "cpu"  # the original is untouched
    no_images = Batch(tokens, targets, torch.tensor([False, False]), None, image_start=3).to("cpu")
    assert no_images.images is None and no_images.ids == []


# ---- micro-batches by a token budget ---------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_token_budget_groups_fit_the_budget_and_hold_every_sample_once(seed):
    rng = random.Random(seed)
    budget = rng.choice([512, 700, 1024])
    sizes = [rng.randint(1, 512) for _ in range(rng.randint(1, 40))]
    groups = token_budget_groups(sizes, budget)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    assert all(group and sum(sizes[i] for i in group) <= budget for group in groups)
    # No two groups could have been one: first-fit leaves no pair that fits together.
    loads = sorted(sum(sizes[i] for i in group) for group in groups)
    assert len(loads) < 2 or loads[0] + loads[1] > budget
    for count in (len(groups), len(groups) + 3):
        split = split_groups(groups, min(count, len(sizes)))
        assert len(split) == max(len(groups), min(count, len(sizes)))
        assert sorted(i for group in split for i in group) == list(range(len(sizes)))
        assert all(group and sum(sizes[i] for i in group) <= budget for group in split)


def test_a_sample_over_the_budget_or_too_few_samples_to_split_are_errors():
    with pytest.raises(ValueError, match="1 sample.* of up to 600 tokens exceed the budget of 512"):
        token_budget_groups([100, 600, 200], 512)
    with pytest.raises(ValueError, match="3 samples cannot make 4 micro-batches"):
        split_groups(token_budget_groups([100, 300, 200], 512), 4)


def test_packed_micro_batches_by_budget_hold_the_steps_samples(tokenizer, samples):
    """The collator's rows of each group stay within the budget, and the step's samples are all
    there once, each with its own sequence (the rows are those samples concatenated)."""
    collator = Collator(SequenceLayout(tokenizer), image_loader=functools.partial(preprocess, size=56), packing=True)
    step = samples * 3
    sequences = collator.sequences(step)
    sizes = [len(ids) for _, (ids, _) in sequences]
    budget = max(sizes) + min(sizes)
    batches = [collator.collate([sequences[i] for i in group]) for group in token_budget_groups(sizes, budget)]
    assert len(batches) > 1
    assert all(batch.tokens.shape == (1, sum(batch.lengths[0])) and batch.tokens.shape[1] <= budget
               for batch in batches)
    assert sorted(i for batch in batches for i in batch.ids) == sorted(s.id for s in step)
    by_id = {s.id: ids for s, (ids, _) in sequences}
    for batch in batches:
        assert batch.tokens[0].tolist() == [t for i in batch.ids for t in by_id[i]]
