"""Training data: ScienceQA, Alpaca-52k and LLaVA-Instruct as one kind of sample, and mixing.

Every source becomes `Sample(id, prompt, answer, image)`; the collator (`lavin_fast.collate`)
turns a list of samples into a LaVIN batch. Formats: REFERENCE.md sections 6-7.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath

from torch.utils.data import ConcatDataset, Dataset
from tqdm import tqdm

from lavin_fast import scienceqa
from lavin_fast.images import check_image
from lavin_fast.io import atomic_write_text
from lavin_fast.scienceqa import DataError, check_text

log = logging.getLogger("lavin_fast.data")

BAD_SAMPLES = ("error", "skip")   # what to do with a sample whose image is damaged
SKIPPED_FILE = "skipped_samples.json"   # where a run lists the samples "skip" left out


@dataclass(frozen=True)
class Sample:
    """One training example: the model reads `prompt` (and the image, if any), learns `answer`."""

    id: str
    prompt: str
    answer: str
    image: Path | None = None


class SampleList(Dataset):
    """A list of samples as a map-style dataset."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def scienceqa_samples(root: str | Path, split: str, use_caption: bool = False) -> SampleList:
    """ScienceQA `split` as QCM -> ALE samples (images checked to exist, records validated)."""
    problems = scienceqa.load_problems(root)
    captions = scienceqa.load_captions(root) if use_caption else {}
    samples = []
    for pid in scienceqa.load_split(root, split, problems):
        problem = problems[pid]
        samples.append(Sample(
            id=pid,
            prompt=scienceqa.build_prompt(problem, captions.get(pid)),
            answer=scienceqa.build_target(problem),
            image=scienceqa.image_path(root, pid, problem),
        ))
    return SampleList(samples)


def check_images(samples: Dataset, bad_samples: str = "error", progress: bool = True) -> tuple[SampleList, list[dict]]:
    """Decode every image of `samples` before anything trains on them or evaluates them, so that a
    damaged file stops a run at its start, not at the step that first draws it.

    bad_samples: "error" raises a DataError naming the samples with a damaged image and their
    files; "skip" leaves them out. Returns (the samples kept, in their order; one {id, image,
    error} per sample left out). Each file is read once (LLaVA turns share an image), in threads:
    PIL decodes without holding the GIL.
    """
    if bad_samples not in BAD_SAMPLES:
        raise ValueError(f"bad_samples must be one of {BAD_SAMPLES}, got {bad_samples!r}")
    everything = [samples[i] for i in range(len(samples))]
    paths = list(dict.fromkeys(s.image for s in everything if s.image is not None))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checked = tqdm(pool.map(_image_problem, paths), total=len(paths), desc="check images", unit="image",
                       disable=not progress)
        problems = {path: problem for path, problem in zip(paths, checked) if problem is not None}
    skipped = [{"id": s.id, "image": str(s.image), "error": problems[s.image]}
               for s in everything if s.image in problems]
    if skipped and bad_samples == "error":
        listed = "; ".join(f"sample {s['id']}: {s['error']}" for s in skipped[:5])
        raise DataError(f"{len(skipped)} of {len(everything)} samples have a damaged image "
                        f"({listed}{'; ...' * (len(skipped) > 5)}); fix or remove the files, or pass "
                        "--bad-samples skip to leave such samples out")
    return SampleList([s for s in everything if s.image not in problems]), skipped


def report_skipped(folder: Path, skipped: list[dict]) -> None:
    """Warn about the samples `check_images` left out and list them all in folder/SKIPPED_FILE."""
    atomic_write_text(folder / SKIPPED_FILE, json.dumps(skipped, indent=1))
    log.warning("left out %d samples with a damaged image (listed in %s): %s", len(skipped), folder / SKIPPED_FILE,
                "; ".join(f"{s['id']} ({s['image']})" for s in skipped[:10]) + "; ..." * (len(skipped) > 10))


def _image_problem(path: Path) -> str | None:
    try:
        check_image(path)
    except DataError as error:
        return str(error)
    return None


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The reference's instruction template: 'Instruction: {instruction} {input}\\nResponse:'."""
    return f"Instruction: {instruction} {input_text}\nResponse:"


def _load_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    records = scienceqa.read_json(path, what)
    if not isinstance(records, list):
        raise DataError(f"{path} should hold a list of {what} records")
    if not records:
        raise DataError(f"{path} holds an empty list: no {what} records to train on")
    return records


def _field(record: Mapping, key: str, index: int, what: str, optional: bool = False) -> str:
    value = record.get(key, "" if optional else None) if isinstance(record, Mapping) else None
    if not isinstance(value, str):
        name = record.get("id", index) if isinstance(record, Mapping) else index
        raise DataError(f"{what} record {name}: field {key!r} should be a string, got {type(value).__name__}")
    return check_text(value, f"{what} record {record.get('id', index)}: field {key!r}")


def alpaca_samples(path: str | Path) -> SampleList:
    """Alpaca-52k: a JSON list of {instruction, input, output}; text-only samples."""
    samples = []
    for index, record in enumerate(_load_json_list(path, "Alpaca")):
        instruction = _field(record, "instruction", index, "Alpaca")
        input_text = _field(record, "input", index, "Alpaca", optional=True)
        output = _field(record, "output", index, "Alpaca")
        samples.append(Sample(id=f"alpaca-{index}", prompt=instruction_prompt(instruction, input_text), answer=output))
    return SampleList(samples)


def llava_samples(path: str | Path, image_root: str | Path) -> SampleList:
    """LLaVA-Instruct: {id, image, conversations: [{from: human|gpt, value}]}, split into single
    turns as the reference does (each human turn with the gpt turn after it, same image).
    The `<image>` marker is removed from the text: the image always goes in front."""
    samples = []
    for index, record in enumerate(_load_json_list(path, "LLaVA")):
        rid = str(record.get("id", index)) if isinstance(record, Mapping) else str(index)
        turns = record.get("conversations") if isinstance(record, Mapping) else None
        if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
            raise DataError(f"LLaVA record {rid}: conversations should be human/gpt pairs, got {turns!r:.80}")
        image = None
        if record.get("image"):
            name = PurePath(_field(record, "image", index, "LLaVA"))
            if name.is_absolute() or ".." in name.parts:   # lexical: symlinks inside the folder stay allowed
                raise DataError(f"LLaVA record {rid}: image {str(name)!r} is outside the image folder "
                                f"{image_root} (image paths must be relative to it, without '..')")
            image = Path(image_root) / name
            if not image.is_file():
                raise DataError(f"LLaVA record {rid}: image file {image} is missing")
        for turn, (human, gpt) in enumerate(zip(turns[::2], turns[1::2])):
            if not (isinstance(human, Mapping) and isinstance(gpt, Mapping)
                    and human.get("from") == "human" and gpt.get("from") == "gpt"):
                raise DataError(f"LLaVA record {rid}: turn {turn} is not a human turn followed by a gpt turn")
            question = _field(human, "value", index, "LLaVA").replace("<image>", "").strip()
            samples.append(Sample(id=f"{rid}-{turn}", prompt=instruction_prompt(question),
                                  answer=_field(gpt, "value", index, "LLaVA"), image=image))
    return SampleList(samples)


def mix(*datasets: Dataset) -> Dataset:
    """The chatbot recipe's mixture: the sources concatenated; batches mix them because the
    sampler shuffles across the whole concatenation."""
    return ConcatDataset([d for d in datasets if len(d)])
