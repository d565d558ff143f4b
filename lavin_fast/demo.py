"""`lavin-fast demo`: the whole method, end to end, on a CPU in a few minutes.

1. write a fake ScienceQA tree in the real format (image questions answerable only from the
   picture: the colour of a drawn shape; text questions from their context);
2. make the tiny backbones: a tokenizer, a tiny LLaMA pretrained briefly as a language model on
   the training questions' text (where the "Image:" line says in words what the picture shows),
   and a random tiny CLIP vision tower; both then frozen, as in real use;
3. train only the adapters, the neck and the modality embedding with the real trainer;
4. evaluate on the held-out test split: the paper's table, and the accuracy on image questions,
   which only the visual path can answer (chance is 25%);
5. save the adapters, the loss curve and the routing-weights plot.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from lavin_fast import tiny
from lavin_fast.collate import Collator
from lavin_fast.evaluate import evaluate_scienceqa
from lavin_fast.io import atomic_write_text
from lavin_fast.train import TrainConfig, build_collator, build_model, train

log = logging.getLogger("lavin_fast.demo")


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much the demo makes and trains. The defaults are `lavin-fast demo`'s; the test suite
    runs a smaller one that still shows the image questions answered from the picture."""
    test_questions: int = 200
    epochs: int = 5


def run_demo(out: str | Path = "runs/demo", *, seed: int = 0, size: DemoSize = DemoSize()) -> dict:
    """Run the demo into `out`; returns the summary it also writes to out/summary.json."""
    out = Path(out)
    started = time.perf_counter()
    # The test split comes last: its size leaves the training questions (and so the backbones) as they are.
    sizes = {"train": 1280, "val": 64, "test": size.test_questions}
    data_root = tiny.fake_scienceqa(out / "data", sizes, seed=seed)
    paths = tiny.tiny_backbones(out / "backbones", data_root, seed=seed, pretrain_steps=200)
    cfg = TrainConfig(preset="tiny", data_root=str(data_root), out=str(out / "run"), seed=seed,
                      epochs=size.epochs, effective_batch=32, micro_batch=32, lr=1e-2,
                      warmup_epochs=1, dtype="fp32", overwrite=True, **{k: str(v) for k, v in paths.items()})
    train(cfg)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build_model(TrainConfig(**{**cfg.__dict__, "adapters": str(out / "run" / "adapters.safetensors")}),
                                   device)
    collator = build_collator(model, tokenizer, cfg)
    result = evaluate_scienceqa(model.eval(), collator, data_root, "test", batch_size=32, max_new_tokens=8,
                                out=out / "eval")
    # The same questions with every picture replaced by a white one: what the answers owe to the image.
    white = collator.image_loader(Image.new("RGB", (64, 64), "white"))
    blind = evaluate_scienceqa(model, Collator(collator.layout, lambda path: white), data_root, "test",
                               batch_size=32, max_new_tokens=8, progress=False)
    summary = {"image_accuracy": result.scores["IMG"], "image_accuracy_blank_pictures": blind.scores["IMG"],
               "scores": result.scores, "unparsed": result.unparsed,
               "seconds": time.perf_counter() - started}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(result.table)
    print(f"\nimage questions (4 options, chance 25%): {summary['image_accuracy']:.1f}% correct; "
          f"{summary['image_accuracy_blank_pictures']:.1f}% with the pictures blanked")
    print(f"demo took {summary['seconds']:.0f} s; adapters, loss.png, routing.png and predictions under {out}")
    return summary
