"""Mixture-of-modality training of LaVIN: `python -m lavin_fast.train` (what torchrun launches).

    python -m lavin_fast.train --preset tiny --fake-data --max-steps 20 --out runs/tiny
    torchrun --nproc_per_node 8 -m lavin_fast.train --preset 7b --llama LLAMA --clip CLIP \
        --tokenizer tokenizer.model --data-root scienceqa --out runs/7b

Configuration: the fields of `TrainConfig` (the paper's recipe by default, REFERENCE.md
section 5), from a JSON file (`--config`) with command-line overrides on top. Every run writes
into `--out`: `run_config.json` (the resolved configuration, what `lavin-fast eval` rebuilds
the model from), `log.jsonl` (one object per optimizer step), `loss.png`, checkpoints under
`checkpoints/step-N/` (adapters in safetensors, plus the optimizer, scheduler, step and RNG
state) and the final `adapters.safetensors`. `--resume` continues from the latest checkpoint
exactly where it stopped. The folder belongs to one run (`lavin_fast.run_folder`): locked while
a trainer writes it, refused to a fresh run while it holds another run (`--overwrite` moves that
one aside), and a `--resume` must keep the stored recipe.

Mixed batches: image and text-only samples are drawn together at random (one shuffled order
over the whole dataset, `recipe.micro_batches`); each optimizer step sees `effective_batch`
samples split over data-parallel ranks and gradient-accumulation micro-batches. The loss is
the mean over all answer tokens of the step, whatever the split. Micro-batches hold
`micro_batch` samples each, or with `max_tokens` as many samples as fit that many tokens in a
packed row (`collate.token_budget_groups`; the log's `fill` is real tokens / budget).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lavin_fast import data, distributed, plots, recipe, run_folder, tiny
from lavin_fast.collate import Collator, SequenceLayout, split_groups, token_budget_groups
from lavin_fast.compile import compile_blocks
from lavin_fast.errors import ArgumentParser, UserError, one_line_user_errors
from lavin_fast.images import NORMALIZATIONS, preprocess
from lavin_fast.io import atomic_write_text
from lavin_fast.checkpoints.lavin import load_lavin
from lavin_fast.models.lavin import PRESETS, LaVIN
from lavin_fast.modules import NECK_ACTIVATIONS, ROUTING_MODES
from lavin_fast.scienceqa import SPLITS
from lavin_fast.tokenizer import Tokenizer

log = logging.getLogger("lavin_fast.train")

DATASETS = ("scienceqa", "alpaca", "llava", "chatbot")
DTYPES = ("auto", "bf16", "fp16", "fp32")
# AdamW moves every weight by about the learning rate per step: far above this a run diverges
# to NaN (LaVIN's own peak is about 1e-3).
MAX_LR = 1.0


@dataclass
class TrainConfig:
    """Everything a run needs. Paths may be None where `--preset tiny --fake-data` makes them."""

    # model
    preset: str = "7b"
    llama: str | None = None                 # Meta or Hugging Face LLaMA folder
    clip: str | None = None                  # OpenAI CLIP .pt or Hugging Face folder
    tokenizer: str | None = None             # tokenizer.model, tokenizer.json or the folder holding it
    adapters: str | None = None              # start from these adapter weights
    temperature: float | None = None         # router temperature (preset's: 10 for 7B, 5 for 13B)
    adapter_dropout: float | None = None
    neck_activation: str | None = None       # silu (reference) or swiglu (paper Eq. 6)
    vit_routing: str | None = None           # token (new runs), cls or batch0; None: the adapters file's
    # data
    data: str = "scienceqa"
    data_root: str | None = None             # ScienceQA folder
    split: str = "train"
    use_caption: bool = False
    alpaca: str | None = None
    llava: str | None = None
    llava_images: str | None = None
    fake_data: bool = False                  # write and train on a fake ScienceQA tree
    image_normalization: str = "imagenet"
    max_len: int = 512
    bad_samples: str = "error"               # a damaged image: stop before training (error) or skip
    # recipe (paper + reference scripts)
    epochs: int = 20
    max_steps: int | None = None
    effective_batch: int = 32
    micro_batch: int = 4
    base_lr: float = 9e-3
    lr: float | None = None                  # absolute peak lr (default: base_lr x batch / 256)
    weight_decay: float = 0.02
    warmup_epochs: float = 2.0
    seed: int = 0
    dtype: str = "auto"                      # backbone dtype: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    packing: bool = True                     # micro-batches as one row without pads (equal to padded ones)
    max_tokens: int | None = None            # packed micro-batches filled up to this many tokens (not micro_batch samples)
    compile: bool = False                    # torch.compile each LLaMA and ViT block
    # parallelism (torchrun)
    dp: int | None = None
    tp: int = 1
    sequence_parallel: bool = False
    # output
    out: str = "runs/lavin"
    save_every: int = 0                      # optimizer steps between checkpoints (0: every epoch)
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False                  # a fresh run into a folder holding a run moves that one aside
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse, before anything loads, every value that can only fail later or train on NaN."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, options in CHOICES.items():
            if (value := getattr(self, name)) not in options and not (value is None and defaults[name] is None):
                raise UserError(f"{_flag(name)} must be one of {options}, got {value!r}")
        for name, ok, requirement in _RULES:
            if not ok(value := getattr(self, name)):
                raise UserError(f"{_flag(name)} must be {requirement}, got {value!r}")
        if self.max_tokens is not None:
            self._check_token_budget()
        elif self.effective_batch % (self.micro_batch * (self.dp or 1)):
            raise UserError(f"--effective-batch {self.effective_batch} must be a multiple of --micro-batch "
                            f"{self.micro_batch}" + (f" x --dp {self.dp}" if self.dp else ""))
        if not self.peak_lr <= MAX_LR:
            source = "--lr" if self.lr is not None else "--base-lr x --effective-batch / 256"
            raise UserError(f"the peak learning rate ({source}) is {self.peak_lr:.3g}, more than {MAX_LR}: AdamW "
                            "moves every weight by about the learning rate per step, so this run would diverge")

    def _check_token_budget(self) -> None:
        """--max-tokens: packed rows; every sample (at most --max-len tokens) fits a micro-batch
        by itself, so no sample is ever refused or left out mid-run; the rows' rounding to a
        multiple of --tp (sequence parallelism) stays inside the budget."""
        if not self.packing:
            raise UserError("--max-tokens fills packed micro-batches: it needs --packing (drop --no-packing)")
        if self.max_tokens < self.max_len:
            raise UserError(f"--max-tokens {self.max_tokens} must be at least --max-len {self.max_len}: "
                            "a sample of --max-len tokens must fit a micro-batch by itself")
        if self.sequence_parallel and self.max_tokens % self.tp:
            raise UserError(f"--max-tokens {self.max_tokens} must be a multiple of --tp {self.tp} with "
                            "--sequence-parallel (a row's length is rounded up to that multiple)")
        if self.dp and self.effective_batch % self.dp:
            raise UserError(f"--effective-batch {self.effective_batch} must be a multiple of --dp {self.dp}")

    @property
    def peak_lr(self) -> float:
        """The learning rate after warmup: --lr, or --base-lr scaled by the effective batch."""
        return self.lr if self.lr is not None else recipe.scaled_lr(self.base_lr, self.effective_batch)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(value) -> bool:
    """An int or float that is not NaN or infinite (and not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The fields with a fixed set of values (None stays allowed where it is the default), and the
# rules of the others: (field, predicate, what the value must be). Checked by __post_init__.
CHOICES = {"preset": PRESETS, "data": DATASETS, "split": SPLITS, "image_normalization": tuple(NORMALIZATIONS),
           "neck_activation": NECK_ACTIVATIONS, "dtype": DTYPES, "bad_samples": data.BAD_SAMPLES,
           "vit_routing": ROUTING_MODES}
_RULES = (
    ("temperature", lambda v: v is None or _finite(v) and v > 0,
     "a finite number > 0 (the router's softmax divides by it)"),
    ("adapter_dropout", lambda v: v is None or _finite(v) and 0 <= v < 1, "a probability in [0, 1)"),
    ("base_lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("lr", lambda v: v is None or _finite(v) and v > 0, "a finite number > 0"),
    ("weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("warmup_epochs", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("epochs", lambda v: _finite(v) and v >= 1, "at least 1"),
    ("max_steps", lambda v: v is None or _finite(v) and v >= 1, "at least 1"),
    ("effective_batch", lambda v: _finite(v) and v >= 1, "at least 1"),
    ("micro_batch", lambda v: _finite(v) and v >= 1, "at least 1"),
    ("max_len", lambda v: _finite(v) and v >= 1, "at least 1"),
    ("max_tokens", lambda v: v is None or _finite(v) and v >= 1, "at least 1"),
    ("dp", lambda v: v is None or _finite(v) and v >= 1, "at least 1"),
    ("tp", lambda v: _finite(v) and v >= 1, "at least 1"),
    ("save_every", lambda v: _finite(v) and v >= 0, "at least 0 (0: once per epoch)"),
    ("keep_checkpoints", lambda v: _finite(v) and v >= 0, "at least 0 (0: keep all)"),
)

# One sentence per TrainConfig field: the --help of `python -m lavin_fast.train` and `lavin-fast train`.
HELP = {
    "preset": "Model: LaVIN on LLaMA-7B or LLaMA-13B with CLIP ViT-L/14, or the tiny demo model.",
    "llama": "Meta or Hugging Face LLaMA checkpoint folder.",
    "clip": "OpenAI CLIP .pt file or Hugging Face CLIP folder.",
    "tokenizer": "The LLaMA's sentencepiece tokenizer.model.",
    "adapters": "Adapter weights to start from (a lavin_fast adapter file or the reference's checkpoint-E.pth).",
    "temperature": "Router softmax temperature of the MM-Adapters, > 0; not a sampling temperature "
                   "(default: the preset's, 10 for 7b and 5 for 13b).",
    "adapter_dropout": "Dropout of the adapters' hidden units, in [0, 1) (default: the preset's).",
    "neck_activation": "Activation of the visual neck: silu (the reference's code) or swiglu (the paper's Eq. 6) "
                       "(default: the preset's, silu).",
    "vit_routing": "How the ViT's adapters route: token (each token by itself, the reference at batch size 1), "
                   "cls (each image by its CLS token) or batch0 (the reference's batch coupling) (default: the "
                   "--adapters file's mode, else token).",
    "data": "Training data: ScienceQA, Alpaca (text only), LLaVA (with images), or chatbot (Alpaca and LLaVA).",
    "data_root": "ScienceQA folder (problems.json, pid_splits.json, images/).",
    "split": "ScienceQA split to train on.",
    "use_caption": "Put the captions of captions.json into the ScienceQA prompts.",
    "alpaca": "Alpaca JSON file (for --data alpaca or chatbot).",
    "llava": "LLaVA instruction JSON file (for --data llava or chatbot).",
    "llava_images": "Folder of the LLaVA images (for --data llava or chatbot).",
    "fake_data": "Write a small fake ScienceQA tree under --out and train on it.",
    "image_normalization": "Image preprocessing: imagenet (the reference's stretch, ImageNet statistics) or clip "
                           "(CLIP's own resize, center crop and statistics).",
    "bad_samples": "A sample whose image is damaged: stop before training (error) or leave it out and list it "
                   "in skipped_samples.json (skip).",
    "overwrite": "A fresh run into a folder holding another run moves that run into replaced-<UTC time>/ "
                 "inside it (nothing is deleted).",
    "max_len": "Longest sequence in tokens; a longer prompt loses its start.",
    "epochs": "Passes over the training data.",
    "max_steps": "Optimizer steps of the run, > 0, instead of --epochs (warmup and cosine decay fit into them).",
    "effective_batch": "Samples per optimizer step, over all data-parallel ranks.",
    "micro_batch": "Samples per forward pass on one rank (the rest of a step is gradient accumulation).",
    "base_lr": "Learning rate per 256 samples: the peak is --base-lr x --effective-batch / 256.",
    "lr": f"Absolute peak learning rate, in (0, {MAX_LR}]; replaces --base-lr.",
    "weight_decay": "AdamW weight decay, >= 0.",
    "warmup_epochs": "Epochs of linear warmup before the cosine decay, >= 0.",
    "seed": "Random seed of the adapters' initialisation, the data order and dropout.",
    "dtype": "Dtype of the frozen backbones; auto is bf16 on CUDA and fp32 on a CPU.",
    "gradient_checkpointing": "Recompute activations in the backward pass, to save memory.",
    "packing": "Concatenate each micro-batch's samples into one row without padding (the same losses and "
               "gradients as padded rows, less compute); --no-packing pads every sample to the longest.",
    "max_tokens": "With packing, fill each micro-batch up to this many tokens instead of --micro-batch samples "
                  "(at least --max-len); a step still takes --effective-batch samples, and the log records "
                  "the fill fraction (real tokens / budget).",
    "compile": "Compile each LLaMA layer and ViT block with torch.compile (dynamic shapes: packed rows do not recompile "
               "every step); the first steps are slow while it compiles.",
    "dp": "Data-parallel ranks (default: the number of processes / --tp).",
    "tp": "Tensor-parallel ranks per model replica.",
    "sequence_parallel": "With --tp, split the RMSNorms' tokens over the tensor-parallel ranks (less memory).",
    "out": "Output folder of the run.",
    "save_every": "Optimizer steps between checkpoints, >= 0 (0: once per epoch).",
    "keep_checkpoints": "Newest checkpoints to keep, >= 0 (0: all).",
    "resume": "Continue the run in --out from its latest checkpoint.",
    "progress": "Show a progress bar on stderr.",
}


# ---------------------------------------------------------------------------------------------
# Configuration: file + command line
# ---------------------------------------------------------------------------------------------

def _field_type(f: dataclasses.Field) -> type:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    for name, python in (("bool", bool), ("int", int), ("float", float)):
        if kind.startswith(name):
            return python
    return str


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Every TrainConfig field as --kebab-case (booleans as --flag / --no-flag); defaults are
    left out so that a value given in --config is only overridden by an explicit flag."""
    parser = parser or ArgumentParser(prog="python -m lavin_fast.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="JSON file of TrainConfig fields; flags override it.")
    for f in dataclasses.fields(TrainConfig):
        flag = _flag(f.name)
        kind = _field_type(f)
        text = HELP[f.name] + ("" if f.default is None else f" (default: {f.default})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=CHOICES.get(f.name), help=text)
    return parser


# What a resume never takes from run_config.json: where and how this launch runs.
RUN_LAYOUT = frozenset({"out", "resume", "overwrite", "dp", "tp", "sequence_parallel", "progress"})


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read config file {path}: {error}") from error
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"config file {path} has unknown keys: {unknown}")
        for key, value in values.items():
            kind = _field_type(fields[key])
            ok = value is None or (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
                                   or (kind is float and type(value) is int))
            if not ok:
                raise UserError(f"config file {path}: {key} should be {kind.__name__}, got {value!r}")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    values.update(flags)
    out = Path(values.get("out", TrainConfig.out))
    if values.get("resume") and (out / "run_config.json").is_file():
        # A resume continues the stored recipe: what neither --config nor a flag gives comes from
        # run_config.json, so `--resume --out RUN` alone is enough (a differing value is refused).
        stored = run_folder.read_run_config(out)
        values = {**{k: v for k, v in stored.items() if k not in RUN_LAYOUT}, **values}
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------

def backbone_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def prepare_embedded_default(cfg: TrainConfig) -> TrainConfig:
    """Fill in what `--fake-data` and `--preset tiny` leave out: a fake ScienceQA tree, a
    tokenizer trained on it and random tiny backbones, all written under `out` (once: a
    rerun or a resume reuses them). Returns the config with those paths set."""
    out = Path(cfg.out)
    updates = {}
    if cfg.fake_data and cfg.data_root is None:
        updates["data_root"] = str(tiny.fake_scienceqa(out / "data", seed=cfg.seed))
    cfg = dataclasses.replace(cfg, **updates)
    if cfg.preset == "tiny" and (cfg.tokenizer is None or cfg.llama is None or cfg.clip is None):
        if cfg.data != "scienceqa" or cfg.data_root is None:
            raise UserError("--preset tiny without --tokenizer/--llama/--clip needs ScienceQA data (--fake-data)")
        paths = tiny.tiny_backbones(out / "backbones", Path(cfg.data_root), seed=cfg.seed)
        cfg = dataclasses.replace(cfg, **{k: getattr(cfg, k) or str(v) for k, v in paths.items()})
    return cfg


def claim_run_folder(cfg: TrainConfig) -> tuple[TrainConfig, run_folder.RunLock]:
    """Lock `out` and make it this run's (run_folder.claim), fill in the embedded default, and
    refuse a `--resume` whose recipe differs from the stored one. Returns the config and the
    held lock (released again if anything here fails)."""
    lock = run_folder.claim(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    try:
        cfg = prepare_embedded_default(cfg)
        if cfg.resume:
            run_folder.check_resume_recipe(Path(cfg.out), dataclasses.asdict(cfg))
    except BaseException:
        lock.release()
        raise
    return cfg, lock


def build_model(cfg: TrainConfig, device: torch.device,
                parallelize: Callable[[LaVIN], None] | None = None) -> tuple[LaVIN, Tokenizer]:
    """LaVIN from the configured checkpoints, adapters fp32, backbone in the run's dtype;
    `parallelize` (a tensor-parallel plan) is applied before the LLaMA's weights are read."""
    missing = [name for name in ("llama", "clip", "tokenizer") if getattr(cfg, name) is None]
    if missing:
        raise UserError(f"missing --{', --'.join(missing)} (paths to the {cfg.preset} checkpoints; "
                         "only --preset tiny --fake-data makes its own)")
    overrides = {k: v for k, v in (("temperature", cfg.temperature), ("adapter_dropout", cfg.adapter_dropout),
                                   ("neck_activation", cfg.neck_activation), ("vit_routing", cfg.vit_routing))
                 if v is not None}
    model = load_lavin(llama=cfg.llama, clip=cfg.clip, adapters=cfg.adapters, preset=cfg.preset,
                                  dtype=backbone_dtype(cfg, device), device=device, max_seq_len=cfg.max_len,
                                  parallelize=parallelize, **overrides)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        compile_blocks(model)
    return model, Tokenizer(cfg.tokenizer)


def build_dataset(cfg: TrainConfig) -> Dataset:
    """The training samples of the configured source(s)."""
    def need(name: str) -> str:
        value = getattr(cfg, name)
        if value is None:
            raise UserError(f"--data {cfg.data} needs --{name.replace('_', '-')}")
        return value

    if cfg.data == "scienceqa":
        return data.scienceqa_samples(need("data_root"), cfg.split, cfg.use_caption)
    sources = []
    if cfg.data in ("alpaca", "chatbot"):
        sources.append(data.alpaca_samples(need("alpaca")))
    if cfg.data in ("llava", "chatbot"):
        sources.append(data.llava_samples(need("llava"), need("llava_images")))
    return data.mix(*sources)


def build_collator(model: LaVIN, tokenizer: Tokenizer, cfg: TrainConfig) -> Collator:
    layout = SequenceLayout(tokenizer, model.config.image_tokens, cfg.max_len)
    loader = functools.partial(preprocess, size=model.config.vit.image_size, normalization=cfg.image_normalization)
    return Collator(layout, loader, pad_multiple=cfg.tp if cfg.sequence_parallel else 1, packing=cfg.packing)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class RunState:
    step: int = 0
    records: list[dict] = field(default_factory=list)


class NonFiniteStepError(UserError):
    """A step whose loss or gradient is not finite: the run stops before the adapters take it."""


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the output folder."""
    session = distributed.start(cfg, claim=claim_run_folder, prepare=prepare_embedded_default)
    try:
        return _train(session)
    finally:
        session.close()        # and the run folder's lock, however the run ended


def _train(session) -> Path:
    cfg = session.cfg
    out = Path(cfg.out)
    device = session.device
    # Every image is read once before the model loads: a damaged one stops the run here.
    dataset, skipped = data.check_images(build_dataset(cfg), cfg.bad_samples, cfg.progress and session.is_main)
    torch.manual_seed(cfg.seed)                  # the same fresh adapters on every rank
    random.seed(cfg.seed)
    model, tokenizer = build_model(cfg, device, session.tensor_parallel_plan())
    # Dropout masks: the same within a tensor-parallel group (its ranks hold replicas of the
    # adapters and must compute the same thing), different across data-parallel ranks.
    torch.manual_seed(cfg.seed + 1 + session.dp_rank)
    collator = build_collator(model, tokenizer, cfg)
    steps_per_epoch = len(dataset) // cfg.effective_batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} samples are fewer than one effective batch of {cfg.effective_batch}")
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    # --max-steps sets the run's length; warmup and cosine then fit into it.
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    peak_lr = cfg.peak_lr

    model = session.data_parallel(model)
    optimizer = recipe.build_optimizer(model, peak_lr, cfg.weight_decay)
    scheduler = recipe.build_scheduler(optimizer, warmup_steps, total_steps)
    state = RunState()
    if cfg.resume and (resumed := run_folder.load_newest(
            out, lambda folder: session.load_checkpoint(folder, model, optimizer))) is not None:
        checkpoint, extra = resumed
        scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(extra["rng"][session.rank] if session.rank < len(extra["rng"]) else extra["rng"][0])
        state.step = extra["step"]
        log.info("resumed from %s at step %d", checkpoint, state.step)
        if session.is_main:
            run_folder.remove_checkpoints_after(out, state.step)
        session.barrier()
    if session.is_main:
        atomic_write_text(out / "run_config.json",
                          json.dumps(run_folder.storable_config(dataclasses.asdict(cfg), out), indent=2))
        state.records = run_folder.read_log_until(out / "log.jsonl", state.step)
        if skipped:
            data.report_skipped(out, skipped)
        log.info("LaVIN %s: %d trainable parameters; %d samples, %d steps (%d per epoch), peak lr %.3g, "
                 "dp %d x tp %d, device %s", cfg.preset, model.num_trainable(), len(dataset), total_steps,
                 steps_per_epoch, peak_lr, session.dp_size, session.tp_size, device)

    save_every = cfg.save_every or steps_per_epoch
    progress = _progress(cfg, session, state.step, total_steps)
    model.train()
    # With a token budget, a rank's samples of a step come as one list, cut by their tokens.
    per_draw = cfg.micro_batch if cfg.max_tokens is None else cfg.effective_batch // session.dp_size
    for step, micro in recipe.micro_batches(
            len(dataset), effective_batch=cfg.effective_batch, micro_batch=per_draw,
            dp_rank=session.dp_rank, dp_size=session.dp_size, seed=cfg.seed, start_step=state.step,
            total_steps=total_steps):
        started = time.perf_counter()
        if cfg.max_tokens is None:
            batches = [collator([dataset[i] for i in indices]) for indices in micro]
        else:
            batches = _fill_to_budget(session, collator, [dataset[i] for i in micro[0]], cfg.max_tokens)
        tokens = session.all_reduce_sum(sum(b.answer_tokens for b in batches))
        loss_sum = torch.zeros((), device=device)
        for batch in batches:
            batch = batch.to(device)
            with session.autocast():
                # Sum over this micro-batch's answer tokens / tokens of the whole step: the
                # gradient of the step-wide token mean, however the step is split.
                loss = model.loss(batch) * batch.answer_tokens / tokens
            loss.backward()
            loss_sum += loss.detach()
        loss_sum = session.all_reduce_sum(loss_sum)
        _stop_unless_finite(session, out, model, loss_sum, step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state.step = step + 1
        record = {"step": state.step, "loss": loss_sum.item(), "lr": lr,
                  "answer_tokens": tokens, "epoch": step / steps_per_epoch,
                  "seconds": time.perf_counter() - started,
                  "truncated": collator.stats.truncated, "dropped": collator.stats.dropped}
        if cfg.max_tokens is not None:
            real = session.all_reduce_sum(sum(sum(row) for b in batches for row in b.lengths))
            record["fill"] = real / (cfg.max_tokens * session.all_reduce_sum(len(batches)))
        if session.is_main:
            _append_log(out / "log.jsonl", record)
            state.records.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if state.step % save_every == 0 or state.step == total_steps:
            _save(session, out, model, optimizer, scheduler, state.step, cfg.keep_checkpoints)
    progress.close()

    if session.is_main and state.records:
        plots.loss_curve(out / "log.jsonl", out / "loss.png")
        log.info("done: %d steps, last loss %.4f; adapters in %s%s", state.step, state.records[-1]["loss"],
                 out / "adapters.safetensors",
                 f"; {len(skipped)} samples with a damaged image left out ({data.SKIPPED_FILE})" if skipped else "")
    session.export_adapters(model, out / "adapters.safetensors")
    return out


def _fill_to_budget(session, collator: Collator, samples: list, max_tokens: int) -> list:
    """This rank's samples of a step as packed micro-batches of at most `max_tokens` tokens
    (`collate.token_budget_groups`), as many on every rank: FSDP reduce-scatters the gradients
    after each backward, so the ranks' counts must match (a rank with fewer splits some)."""
    sequences = collator.sequences(samples)
    groups = token_budget_groups([len(ids) for _, (ids, _) in sequences], max_tokens)
    groups = split_groups(groups, max(session.gather_objects(len(groups))))
    return [collator.collate([sequences[i] for i in group]) for group in groups]


def _stop_unless_finite(session, out: Path, model, loss: torch.Tensor, step: int) -> None:
    """Raise NonFiniteStepError, on every rank alike, when the step's loss (summed over ranks) or
    any gradient is not finite: before the optimizer applies it, so the adapters and the
    checkpoints stay what the last good step made them."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for p in model.parameters() if p.grad is not None]
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).sum() if grads else torch.zeros((), device=loss.device)
    bad_grads = int(session.all_reduce_sum(bad.to(torch.float64)).item())
    value = loss.item()
    if math.isfinite(value) and bad_grads == 0:
        return
    what = f"the loss is {value}" if not math.isfinite(value) else f"{bad_grads} gradient(s) are not finite"
    last = run_folder.named_checkpoint(out)
    kept = f"the last good checkpoint, {last}, is kept" if last is not None else "no checkpoint was written yet"
    raise NonFiniteStepError(f"step {step}: {what}; stopped before updating the adapters and {kept} "
                             "(lower --lr, check the data, then --resume)")


def _save(session, out: Path, model, optimizer, scheduler, step: int, keep: int) -> None:
    folder = out / "checkpoints" / f"step-{step:07d}"
    extra = {"scheduler": scheduler.state_dict(), "step": step, "rng": session.gather_objects(_rng_state())}
    session.save_checkpoint(folder, model, optimizer, extra)
    if session.is_main:
        # The pointer moves only once everything of the new checkpoint is on disk.
        run_folder.write_pointer(out, folder, step)
        run_folder.rotate(out, keep)


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


class _NoProgress:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def _progress(cfg: TrainConfig, session, start: int, total: int):
    if not (cfg.progress and session.is_main):
        return _NoProgress()
    from tqdm import tqdm

    # In a log file (not a terminal) one refresh every few seconds is enough.
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 5.0)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LAVIN_FAST_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    with one_line_user_errors():
        train(config_from_args(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
