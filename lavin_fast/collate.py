"""LaVIN's token sequence (REFERENCE.md section 3) and the collation of samples into batches.

    image sample:  [t_m, BOS, tok("Image: "),    v1 .. v6, prompt, answer, EOS, pad ...]
    text sample:   [t_m, BOS, tok("Image: N/A"),           prompt, answer, EOS, pad ...]

`t_m` (the modality token) and the image slots v1..v6 are filled by the model with embeddings;
in `tokens` they hold 0, never read. The loss counts the answer tokens and EOS only: `targets`
[:, i] is the token that position i must predict, `IGNORE` elsewhere.

Prompt and answer are tokenized separately (the answer with sentencepiece's leading space), the
same way generation sees the prompt; the reference tokenizes them joined, which can merge
pieces across the boundary. A sample longer than `max_len` loses the start of its prompt
(the question's options and the "Response:" cue stay next to the answer), never any of its
answer or EOS; one whose answer alone does not fit is dropped. Both are counted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from lavin_fast.data import Sample
from lavin_fast.images import preprocess
from lavin_fast.tokenizer import Tokenizer

IGNORE = -100
IMAGE_PREFIX, TEXT_PREFIX = "Image: ", "Image: N/A"


@dataclass
class Batch:
    """A collated batch of R rows holding S samples. tokens, targets [R, L] int64; has_image
    [S] bool; images [n_images, 3, S, S] for the samples with an image, in sample order (None
    if none); image_start: position of v1 in every image sample, counted from its first slot.

    lengths: each row's sample lengths in order, for packed rows (several samples concatenated
    without pads, each from RoPE position 0); None: one sample per row from column 0, then pads
    (the padded layout). ids: the samples' ids in sample order."""

    tokens: Tensor
    targets: Tensor
    has_image: Tensor
    images: Tensor | None
    image_start: int
    ids: list[str] = field(default_factory=list)
    lengths: list[list[int]] | None = None

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("tokens", "targets", "has_image", "images"):
            if moved[name] is not None:
                moved[name] = moved[name].to(device, non_blocking=True)
        return Batch(**moved)

    @property
    def answer_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


class SequenceLayout:
    """Where everything sits in a LaVIN sequence, for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, image_tokens: int = 6, max_len: int = 512) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.max_len = max_len
        self.image_prefix = tokenizer.encode(IMAGE_PREFIX, bos=False, eos=False)
        self.text_prefix = tokenizer.encode(TEXT_PREFIX, bos=False, eos=False)
        self.image_start = 2 + len(self.image_prefix)

    def prefix(self, has_image: bool) -> list[int]:
        """[t_m slot, BOS, "Image: " (+ image slots) or "Image: N/A"]: what precedes the prompt."""
        if has_image:
            return [0, self.tokenizer.bos_id, *self.image_prefix, *[0] * self.image_tokens]
        return [0, self.tokenizer.bos_id, *self.text_prefix]

    def prompt_tokens(self, prompt: str, has_image: bool) -> list[int]:
        """The whole input a prompt becomes (for generation): prefix + prompt tokens."""
        return self.prefix(has_image) + self.tokenizer.encode(prompt, bos=False, eos=False)


@dataclass
class CollateStats:
    """Samples whose prompt start was cut (`truncated`) or that were left out (`dropped`)."""

    truncated: int = 0
    dropped: int = 0


class Collator:
    """Samples -> `Batch`: padded, one sample per row, to the longest sequence of the batch (not
    to max_len); or with `packing`, the same samples concatenated into one row with no pad.
    Either length is rounded up to a multiple of `pad_multiple` (sequence parallelism splits
    the length evenly)."""

    def __init__(self, layout: SequenceLayout, image_loader: Callable[[Path], Tensor] = preprocess,
                 pad_multiple: int = 1, packing: bool = False) -> None:
        self.layout = layout
        self.image_loader = image_loader
        self.pad_multiple = pad_multiple
        self.packing = packing
        self.stats = CollateStats()

    def sequence(self, sample: Sample) -> tuple[list[int], int] | None:
        """(token ids, index of the first answer token), or None if the answer cannot fit."""
        layout, tokenizer = self.layout, self.layout.tokenizer
        prefix = layout.prefix(sample.image is not None)
        prompt = tokenizer.encode(sample.prompt, bos=False, eos=False)
        answer = tokenizer.encode(sample.answer, bos=False, eos=True)
        room = layout.max_len - len(prefix) - len(answer)
        if room < 1:      # not even one prompt token ("Response:") beside the answer
            self.stats.dropped += 1
            return None
        if len(prompt) > room:
            self.stats.truncated += 1
            prompt = prompt[-room:]
        return prefix + prompt + answer, len(prefix) + len(prompt)

    def sequences(self, samples: Sequence[Sample]) -> list[tuple[Sample, tuple[list[int], int]]]:
        """The samples that fit, each with its (token ids, index of the first answer token);
        a ValueError if none does."""
        kept = [(s, seq) for s in samples if (seq := self.sequence(s)) is not None]
        if not kept:
            raise ValueError(f"none of the {len(samples)} samples fits in {self.layout.max_len} tokens")
        return kept

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        return self.collate(self.sequences(samples))

    def collate(self, kept: Sequence[tuple[Sample, tuple[list[int], int]]]) -> Batch:
        """One batch of samples already turned into sequences (`sequences`), at least one."""
        sizes = [len(ids) for _, (ids, _) in kept]
        rows, longest = (1, sum(sizes)) if self.packing else (len(kept), max(sizes))
        length = -(-longest // self.pad_multiple) * self.pad_multiple
        tokens = torch.zeros(rows, length, dtype=torch.long)
        targets = torch.full((rows, length), IGNORE, dtype=torch.long)
        column = 0
        for index, (_, (ids, answer_start)) in enumerate(kept):
            row = 0 if self.packing else index
            tokens[row, column:column + len(ids)] = torch.tensor(ids)
            # position i predicts token i + 1: answer tokens and EOS are predicted from answer_start - 1 on
            targets[row, column + answer_start - 1:column + len(ids) - 1] = torch.tensor(ids[answer_start:])
            column += len(ids) if self.packing else 0
        has_image = torch.tensor([s.image is not None for s, _ in kept])
        pictures = [self.image_loader(s.image) for s, _ in kept if s.image is not None]
        return Batch(tokens=tokens, targets=targets, has_image=has_image,
                     images=torch.stack(pictures) if pictures else None,
                     image_start=self.layout.image_start, ids=[s.id for s, _ in kept],
                     lengths=[sizes] if self.packing else None)


def token_budget_groups(sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """The indices of samples of `sizes` tokens in groups of at most `max_tokens` tokens each,
    every index in exactly one group: first-fit decreasing (the longest sample first, each
    into the first group with room, a new group where none has), which leaves few groups
    and little room unused. Indices ascend within a group. A sample longer than the budget
    is a ValueError (training refuses such a budget up front: --max-tokens >= --max-len)."""
    if too_long := [n for n in sizes if n > max_tokens]:
        raise ValueError(f"{len(too_long)} sample(s) of up to {max(too_long)} tokens exceed the budget of "
                         f"{max_tokens} tokens per micro-batch")
    groups: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        target = next((g for g, free in enumerate(room) if free >= sizes[index]), len(groups))
        if target == len(groups):
            groups.append([])
            room.append(max_tokens)
        groups[target].append(index)
        room[target] -= sizes[index]
    return [sorted(group) for group in groups]


def split_groups(groups: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """`groups` split, the one of most samples in halves each time, until there are `count` (or
    already more): data-parallel ranks must run as many micro-batches as each other. A half
    never holds more tokens than its group, so a budget `token_budget_groups` kept still holds."""
    groups = [list(group) for group in groups]
    while len(groups) < count:
        widest = max(range(len(groups)), key=lambda g: len(groups[g]), default=None)
        if widest is None or len(groups[widest]) < 2:
            raise ValueError(f"{sum(map(len, groups))} samples cannot make {count} micro-batches")
        group = groups.pop(widest)
        groups[widest:widest] = [group[:len(group) // 2], group[len(group) // 2:]]
    return groups
