"""The `lavin-fast` command: train, eval, generate, demo.

    lavin-fast demo                                   # the embedded default, on a CPU in minutes
    lavin-fast train --preset tiny --fake-data --max-steps 20 --out runs/tiny
    lavin-fast eval --run runs/tiny --split test
    lavin-fast generate --run runs/tiny --image picture.png --prompt "What color is the shape?"

`eval` and `generate` rebuild the model of a training run from its `run_config.json` and
`adapters.safetensors` (`--run`), or from explicit checkpoint paths. Their
`--sampling-temperature` is the decoding's; `train --temperature` is the routers' softmax
temperature, a part of the model that `eval` and `generate` read from the run.
A mistake (a flag, a value, a file) prints one line, `lavin-fast: error: ...` (lavin_fast.errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lavin_fast import train as training
from lavin_fast.data import BAD_SAMPLES, SKIPPED_FILE
from lavin_fast.errors import ArgumentParser, UserError, one_line_user_errors
from lavin_fast.scienceqa import SPLITS


def _checked(kind: Callable[[str], float], ok: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse type: `kind(text)` if `ok` accepts it, else an error saying what it must be."""
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value
    return convert


_POSITIVE_INT = _checked(int, lambda v: v >= 1, "an integer >= 1")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (either --run, or the checkpoint paths)")
    group.add_argument("--run", help="A training run's output folder (its run_config.json and adapters).")
    group.add_argument("--preset", choices=training.CHOICES["preset"],
                       help=training.HELP["preset"] + " (default: the run's, else 7b)")
    for name in ("llama", "clip", "tokenizer"):
        group.add_argument(f"--{name}", help=training.HELP[name] + " Overrides the run's.")
    group.add_argument("--adapters", help="Trained adapter weights (default: the run's adapters.safetensors).")
    group.add_argument("--dtype", default="auto", choices=training.CHOICES["dtype"],
                       help=training.HELP["dtype"] + " (default: auto)")


def _load(args: argparse.Namespace):
    """(model in eval mode, collator, training config) from --run or explicit paths."""
    if args.run:
        run = Path(args.run)
        config_file = run / "run_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{run} is not a training run folder (no run_config.json)")
        values = json.loads(config_file.read_text())
        cfg = training.TrainConfig(**{**values, "adapters": str(run / "adapters.safetensors"), "dtype": args.dtype})
    else:
        cfg = training.TrainConfig(preset=args.preset or "7b", llama=args.llama, clip=args.clip,
                                   tokenizer=args.tokenizer, adapters=args.adapters, dtype=args.dtype)
    overrides = {k: getattr(args, k) for k in ("llama", "clip", "tokenizer", "adapters") if getattr(args, k)}
    cfg = dataclasses.replace(cfg, **overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = training.build_model(cfg, device)
    return model.eval(), training.build_collator(model, tokenizer, cfg), cfg


def _eval(args: argparse.Namespace) -> None:
    from lavin_fast.evaluate import evaluate_scienceqa

    model, collator, cfg = _load(args)
    data_root = args.data_root or cfg.data_root
    if data_root is None:
        raise UserError("eval needs --data-root (a ScienceQA folder)")
    out = Path(args.out or (Path(args.run) / f"eval-{args.split}" if args.run else f"eval-{args.split}"))
    result = evaluate_scienceqa(model, collator, data_root, args.split, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, temperature=args.sampling_temperature,
                                top_p=args.top_p, seed=args.seed, use_caption=cfg.use_caption, limit=args.limit,
                                out=out, bad_samples=args.bad_samples)
    print(result.table)
    if result.skipped:
        print(f"questions left out for a damaged image: {len(result.skipped)} (not scored; listed in "
              f"{out / SKIPPED_FILE})")
    if result.predictions and result.unparsed == len(result.predictions):
        print(f"The model answered none of the {result.unparsed} questions in the form \"The answer is X.\", so "
              "every one counts as wrong. This is what an untrained or barely trained run does, not a fault of "
              f"the evaluation: train longer (its answers are in {out / 'predictions.json'}).")
    print(f"predictions, scores and routing plot in {out}")


def _generate(args: argparse.Namespace) -> None:
    from lavin_fast.generation import generate

    model, collator, _ = _load(args)
    image = collator.image_loader(Path(args.image)) if args.image else None
    [text] = generate(model, collator.layout, [args.prompt], [image], max_new_tokens=args.max_new_tokens,
                      temperature=args.sampling_temperature, top_p=args.top_p, seed=args.seed)
    print(text)


def _demo(args: argparse.Namespace) -> None:
    from lavin_fast.demo import run_demo

    run_demo(args.out, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lavin-fast", description="LaVIN with fused Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the adapters (same flags as python -m lavin_fast.train)")
    training.build_parser(train)
    train.set_defaults(func=lambda args: training.train(training.config_from_args(args)))

    decoding = ArgumentParser(add_help=False)
    decoding.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=64,
                          help="Most tokens generated per answer (default: 64).")
    # Not --temperature: in `train` that is the routers' temperature, a part of the model.
    decoding.add_argument("--sampling-temperature", type=_checked(float, lambda v: math.isfinite(v) and v >= 0,
                                                                  "a finite number >= 0"), default=0.0,
                          help="Temperature of the sampling of the generated text, >= 0; 0 is greedy decoding "
                               "(default: 0). The routers' temperature is the run's.")
    decoding.add_argument("--top-p", type=_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0,
                          help="Nucleus sampling: draw from the most probable tokens that make up this "
                               "probability, in (0, 1] (default: 1).")
    decoding.add_argument("--seed", type=int, default=0, help="Random seed of the sampling (default: 0).")

    evaluate = commands.add_parser("eval", parents=[decoding], help="ScienceQA accuracy table of a model")
    _model_arguments(evaluate)
    evaluate.add_argument("--data-root", help="ScienceQA folder (default: the run's).")
    evaluate.add_argument("--split", default="test", choices=SPLITS, help="ScienceQA split to evaluate (default: test).")
    evaluate.add_argument("--batch-size", type=_POSITIVE_INT, default=16,
                          help="Questions generated together (default: 16).")
    evaluate.add_argument("--limit", type=_POSITIVE_INT, help="Evaluate only the first N questions (default: all).")
    evaluate.add_argument("--out", help="Output folder (default: RUN/eval-SPLIT).")
    evaluate.add_argument("--bad-samples", default="error", choices=BAD_SAMPLES,
                          help="A question whose image is damaged: stop before generating (error, the "
                               "default) or leave it out of the scores (skip).")
    evaluate.set_defaults(func=_eval)

    gen = commands.add_parser("generate", parents=[decoding], help="answer one prompt (with an image or not)")
    _model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="The prompt, e.g. \"Question: ...\\nResponse:\".")
    gen.add_argument("--image", help="An image file (omit it for a text-only prompt).")
    gen.set_defaults(func=_generate)

    demo = commands.add_parser("demo", help="the embedded default: tiny LaVIN on fake ScienceQA, on a CPU")
    demo.add_argument("--out", default="runs/demo", help="Output folder (default: runs/demo).")
    demo.add_argument("--seed", type=int, default=0, help="Random seed of the data, the model and training (default: 0).")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LAVIN_FAST_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    with one_line_user_errors():
        args = build_parser().parse_args(argv)
        args.func(args)


if __name__ == "__main__":
    main()
