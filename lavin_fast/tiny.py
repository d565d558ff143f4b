"""The embedded default: everything a tiny LaVIN run needs, made on the spot on a CPU.

- `fake_scienceqa`: a fake ScienceQA tree in the real format (`scienceqa.write_fake_scienceqa`);
- `tiny_backbones`: a sentencepiece tokenizer trained on that tree's text, a tiny LLaMA
  (optionally pretrained briefly on the training questions, so that the frozen backbone is a
  language model as in real use) written in Meta's format, and a tiny random CLIP vision tower
  written with OpenAI's key names. Real runs load real checkpoints through the same loaders.

Everything is written once under the given folder; calling again finds it and reuses it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from lavin_fast import scienceqa
from lavin_fast.checkpoints.clip import save_clip
from lavin_fast.checkpoints.llama import save_llama
from lavin_fast.collate import IMAGE_PREFIX, TEXT_PREFIX
from lavin_fast.io import atomic_write_text
from lavin_fast.models.lavin import LaVINConfig
from lavin_fast.models.llama import Transformer
from lavin_fast.models.vit import VisionTransformer
from lavin_fast.tokenizer import Tokenizer

log = logging.getLogger("lavin_fast.tiny")


def fake_scienceqa(root: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A fake ScienceQA tree at `root` (written unless problems.json is already there), with
    the four color options in a fixed order (`write_fake_scienceqa(fixed_choices=True)`): the
    tiny LLaMA, pretrained for a minute, maps a color to its letter but cannot learn to look
    the color up among shuffled options."""
    root = Path(root)
    if not (root / "problems.json").is_file():
        scienceqa.write_fake_scienceqa(root, sizes, seed=seed, fixed_choices=True)
    return root


def language_texts(data_root: Path, split: str = "train") -> list[str]:
    """The text side of a split as a language model would read it, in LaVIN's order: "Image:"
    and what the picture shows, or "Image: N/A", then the QCM prompt and the ALE answer.

    Pretraining the tiny LLaMA on these teaches it the format and to answer from what the
    "Image:" line says; in LaVIN the picture's six visual tokens take that line's place, so
    the adapters and the neck must learn to say with them what the words said here."""
    problems = scienceqa.load_problems(data_root)
    texts = []
    for pid in scienceqa.load_split(data_root, split, problems):
        problem = problems[pid]
        seen = f"{IMAGE_PREFIX}{problem['solution']}" if problem.get("image") else TEXT_PREFIX
        texts.append(f"{seen}\n{scienceqa.build_prompt(problem)}{scienceqa.build_target(problem)}")
    return texts


def pretrain_language_model(model: Transformer, sequences: list[list[int]], *, steps: int, batch: int = 32,
                            lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Next-token training of the whole LLaMA on `sequences` (AdamW, warmup + cosine); returns
    the loss of every step. Used only to give the demo a frozen backbone that knows language."""
    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    losses = []
    model.train()
    for _ in range(steps):
        chosen = [sequences[generator.randrange(len(sequences))] for _ in range(batch)]
        length = max(len(s) for s in chosen)
        tokens = torch.zeros(batch, length, dtype=torch.long)
        targets = torch.full((batch, length), -100, dtype=torch.long)
        for row, ids in enumerate(chosen):
            tokens[row, :len(ids)] = torch.tensor(ids)
            targets[row, :len(ids) - 1] = torch.tensor(ids[1:])
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def tiny_backbones(folder: str | Path, data_root: str | Path, *, seed: int = 0, pretrain_steps: int = 0,
                   vocab_size: int = 512) -> dict[str, Path]:
    """Tokenizer, LLaMA and CLIP of the "tiny" preset under `folder`; returns their paths as
    {"tokenizer", "llama", "clip"}. With pretrain_steps > 0 the LLaMA is first trained as a
    language model on the training split's text (`language_texts`)."""
    folder, data_root = Path(folder), Path(data_root)
    paths = {"tokenizer": folder / "tokenizer.model", "llama": folder / "llama", "clip": folder / "clip.safetensors"}
    done = folder / "backbones.json"
    if done.is_file() and json.loads(done.read_text()).get("pretrain_steps") == pretrain_steps:
        return paths

    texts = language_texts(data_root)
    tokenizer = Tokenizer.train(texts, paths["tokenizer"], vocab_size)
    config = LaVINConfig.from_preset("tiny")
    torch.manual_seed(seed)
    # The vocabulary rounded up to a multiple of 64 (unused rows never come up): a tensor-parallel
    # plan splits the embedding and the output head by vocabulary rows.
    llama = Transformer(dataclasses.replace(config.llama, vocab_size=64 * math.ceil(tokenizer.n_words / 64)))
    if pretrain_steps > 0:
        sequences = [tokenizer.encode(text, bos=True, eos=True) for text in texts]
        losses = pretrain_language_model(llama, sequences, steps=pretrain_steps, seed=seed)
        log.info("pretrained the tiny LLaMA for %d steps: loss %.3f -> %.3f", pretrain_steps, losses[0], losses[-1])
    save_llama(llama, paths["llama"])
    save_clip(VisionTransformer(config.vit), paths["clip"])
    atomic_write_text(done, json.dumps({"pretrain_steps": pretrain_steps, "seed": seed}))
    return paths
