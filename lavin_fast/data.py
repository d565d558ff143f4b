"""Training data: ScienceQA, Alpaca-52k and LLaVA-Instruct as one kind of sample, and mixing.

Every source becomes `Sample(id, prompt, answer, image)`; the collator (`lavin_fast.collate`)
turns a list of samples into a LaVIN batch. Formats: REFERENCE.md sections 6-7.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from lavin_fast import scienceqa
from lavin_fast.scienceqa import DataError


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


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The reference's instruction template: 'Instruction: {instruction} {input}\\nResponse:'."""
    return f"Instruction: {instruction} {input_text}\nResponse:"


def _load_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {what} file {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise DataError(f"{path} should hold a list of {what} records")
    return records


def _field(record: Mapping, key: str, index: int, what: str, optional: bool = False) -> str:
    value = record.get(key, "" if optional else None) if isinstance(record, Mapping) else None
    if not isinstance(value, str):
        name = record.get("id", index) if isinstance(record, Mapping) else index
        raise DataError(f"{what} record {name}: field {key!r} should be a string, got {type(value).__name__}")
    return value


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
            image = Path(image_root) / _field(record, "image", index, "LLaVA")
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
