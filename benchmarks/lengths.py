"""ScienceQA-like sample lengths for the benchmarks' fake data.

Assumed: token lengths (prompt + answer, LaVIN's layout, LLaMA tokenizer) log-normal with median
270 and sigma 0.45, clipped to [64, 512] (the recipe's max_len): a mean near 300 tokens, the
figure REFERENCE/ENGINEERING quote for ScienceQA, with the long tail of lectures and the short
questions without context; about half of the samples (48%) carry an image, as in ScienceQA's
train split. Only the shape matters here: it decides the padding fraction of a micro-batch.
"""
from __future__ import annotations

import math

import torch

MEDIAN, SIGMA, SHORTEST, LONGEST, IMAGE_SHARE = 270, 0.45, 64, 512, 0.48


def scienceqa_lengths(count: int, seed: int = 0, longest: int = LONGEST) -> tuple[list[int], list[bool]]:
    """`count` sample lengths (each at most `longest`) and whether each has an image."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(count, generator=gen) * SIGMA + math.log(MEDIAN * longest / LONGEST)
    lengths = draws.exp().round().clamp(min(SHORTEST, longest // 2), longest).long().tolist()
    images = (torch.rand(count, generator=gen) < IMAGE_SHARE).tolist()
    return lengths, images
