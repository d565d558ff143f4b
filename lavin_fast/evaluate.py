"""ScienceQA evaluation: generate an answer for every question of a split, score the paper's
table, and plot the routing weights per layer (the paper's Fig. 4).

Answers are parsed from the first "The answer is X." of the generated text; a text with no such
sentence counts as wrong and is reported as unparsed (the reference guesses at random instead).
Writes into `out`: predictions.json (pid -> generated text, parsed choice, correct choice;
rewritten atomically after every batch, so a crash keeps the batches done), scores.json,
table.md, routing.png, and skipped_samples.json if `bad_samples="skip"` left questions out
(those with a damaged image: not scored).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lavin_fast import plots, scienceqa
from lavin_fast.collate import Collator
from lavin_fast.data import Sample, check_images, report_skipped, scienceqa_samples
from lavin_fast.generation import generate
from lavin_fast.io import atomic_write_text
from lavin_fast.models.lavin import LaVIN

log = logging.getLogger("lavin_fast.evaluate")


@dataclass
class EvalResult:
    scores: dict[str, float]
    unparsed: int
    predictions: dict[str, int | None]
    skipped: list[dict] = field(default_factory=list)    # {id, image, error} of questions left out

    @property
    def table(self) -> str:
        return scienceqa.format_table(self.scores, self.unparsed)


def evaluate_scienceqa(model: LaVIN, collator: Collator, data_root: str | Path, split: str = "test", *,
                       batch_size: int = 16, max_new_tokens: int = 64, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0, use_caption: bool = False, limit: int | None = None,
                       out: str | Path | None = None, progress: bool = True, bad_samples: str = "error") -> EvalResult:
    """Generate, parse and score `split` (its first `limit` questions if given); every image is
    read first (`data.check_images`: a damaged one is an error, or with "skip" left out)."""
    problems = scienceqa.load_problems(data_root)
    samples = list(scienceqa_samples(data_root, split, use_caption))[:limit]
    checked, skipped = check_images(samples, bad_samples, progress)
    samples = checked.samples
    # Batches of similar prompt lengths: generation steps through the longest prompt of a batch
    # one position at a time past the shortest, so mixed lengths cost decode steps.
    samples.sort(key=lambda s: len(collator.layout.prompt_tokens(s.prompt, s.image is not None)))
    out = Path(out) if out is not None else None
    if out is not None and skipped:
        report_skipped(out, skipped)
    records: dict[str, dict] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc=f"eval {split}", unit="batch", disable=not progress):
        chunk = samples[start:start + batch_size]
        images = [collator.image_loader(s.image) if s.image is not None else None for s in chunk]
        outputs = generate(model, collator.layout, [s.prompt for s in chunk], images,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + start)
        for sample, text in zip(chunk, outputs):
            problem = problems[sample.id]
            records[sample.id] = {"output": text, "prediction": scienceqa.parse_answer(text, len(problem["choices"])),
                                  "answer": problem["answer"]}
        if out is not None:   # the whole file again (atomic): a crash keeps every batch done so far
            atomic_write_text(out / "predictions.json", json.dumps(records, indent=1))
    predictions = {pid: record["prediction"] for pid, record in records.items()}
    result = EvalResult(scienceqa.score(problems, predictions), sum(p is None for p in predictions.values()),
                        predictions, skipped)
    if out is not None:
        atomic_write_text(out / "scores.json", json.dumps({**result.scores, "unparsed": result.unparsed}, indent=1))
        atomic_write_text(out / "table.md", result.table + "\n")
        plot_routing(model, collator, samples, out / "routing.png")
    return result


@torch.inference_mode()
def routing_by_modality(model: LaVIN, collator: Collator, samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Per LLaMA layer, the routing weight of expert 0 for a text-only and for an image sample
    (each layer's router reads the modality token alone, so one sample of each says it all)."""
    picked = {}
    for sample in samples:
        picked.setdefault("image" if sample.image is not None else "text", sample)
    if not picked:
        return {}
    was_training = model.training
    model.eval()
    try:
        names = list(picked)
        batch = collator([picked[name] for name in names]).to(next(model.parameters()).device)
        model.hidden_states(batch)
        weights = model.routing_weights()["llama"]          # [layers, B, 2]
    finally:
        model.train(was_training)
    return {name: weights[:, row, 0].float().tolist() for row, name in enumerate(names)}


def plot_routing(model: LaVIN, collator: Collator, samples: Sequence[Sample], path: str | Path) -> Path | None:
    weights = routing_by_modality(model, collator, samples)
    if not weights:
        return None
    return plots.routing_weights(weights, path, "LaVIN routing weights per LLaMA layer (Fig. 4)")
