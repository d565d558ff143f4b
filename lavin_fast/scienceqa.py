"""ScienceQA: records in the real format, the QCM-ALE prompt, answer parsing, the paper's
category table, and a generator of fake trees in exactly that format.

The real data (CC BY-NC-SA) is never shipped: tests and the demo use `write_fake_scienceqa`,
whose image questions can only be answered from the image and text questions from the text.
Layout of a tree (REFERENCE.md section 6):

    root/problems.json          pid -> {question, choices, answer, hint, image, task, grade,
                                        subject, topic, category, skill, lecture, solution, split}
    root/pid_splits.json        {"train": [pid, ...], "val": [...], "test": [...], ...}
    root/captions.json          {"captions": {pid: caption}}
    root/images/<split>/<pid>/image.png
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping
from pathlib import Path

from lavin_fast.errors import UserError
from lavin_fast.io import atomic_write_text

REQUIRED_FIELDS = {
    "question": str, "choices": list, "answer": int, "hint": str, "grade": str, "subject": str,
    "lecture": str, "solution": str, "split": str,
}
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# The splits of the ScienceQA release's pid_splits.json.
SPLITS = ("train", "val", "test", "trainval", "minitrain", "minival", "minitest")
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER = re.compile(r"The answer is ([A-Z])\.")


class DataError(UserError):
    """A malformed data record or a missing file, with the record's id in the message."""


def check_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode, else a DataError naming `where`: JSON's "\\ud800" escapes
    give Python strings with lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where}: text is not valid Unicode (lone surrogate {text[error.start]!r} at "
                        f"character {error.start} of {text[:60]!r})") from None
    return text


# ----------------------------------------------------------------------------- reading


def validate_problem(pid: str, problem: Mapping) -> None:
    """Raise DataError naming `pid` if the record is not in ScienceQA's format."""
    if not isinstance(problem, Mapping):
        raise DataError(f"ScienceQA record {pid}: expected an object, got {type(problem).__name__}")
    for field, kind in REQUIRED_FIELDS.items():
        if field not in problem:
            raise DataError(f"ScienceQA record {pid}: missing field {field!r}")
        if not isinstance(problem[field], kind) or (kind is int and isinstance(problem[field], bool)):
            raise DataError(f"ScienceQA record {pid}: field {field!r} should be {kind.__name__}, "
                            f"got {type(problem[field]).__name__}")
    choices = problem["choices"]
    if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"ScienceQA record {pid}: choices must be 2-26 strings, got {choices!r}")
    for field in [f for f, kind in REQUIRED_FIELDS.items() if kind is str]:
        check_text(problem[field], f"ScienceQA record {pid}, field {field!r}")
    for choice in choices:
        check_text(choice, f"ScienceQA record {pid}, field 'choices'")
    if not 0 <= problem["answer"] < len(choices):
        raise DataError(f"ScienceQA record {pid}: answer {problem['answer']} is not an index into "
                        f"its {len(choices)} choices")
    if problem.get("image") not in (None, "image.png"):
        raise DataError(f"ScienceQA record {pid}: image must be 'image.png' or null, got {problem['image']!r}")
    if problem["subject"] not in SUBJECTS:
        raise DataError(f"ScienceQA record {pid}: unknown subject {problem['subject']!r}")
    if _grade_number(pid, problem["grade"]) is None:
        raise DataError(f"ScienceQA record {pid}: grade should look like 'grade7', got {problem['grade']!r}")


def _grade_number(pid: str, grade: str) -> int | None:
    match = re.fullmatch(r"grade(\d+)", grade)
    return int(match.group(1)) if match and 1 <= int(match.group(1)) <= 12 else None


def read_json(path: Path, what: str = "ScienceQA") -> object:
    """The JSON value in `path` (a `what` data file); a DataError naming the file if it is missing,
    not UTF-8 or not JSON."""
    if not path.is_file():
        raise DataError(f"missing {what} file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err


def load_problems(root: str | Path) -> dict[str, dict]:
    """problems.json, every record validated."""
    problems = read_json(Path(root) / "problems.json")
    if not isinstance(problems, dict):
        raise DataError(f"{Path(root) / 'problems.json'} should map pid -> record")
    for pid, problem in problems.items():
        validate_problem(pid, problem)
    return problems


def load_split(root: str | Path, split: str, problems: Mapping[str, dict] | None = None) -> list[str]:
    """The pids of `split` from pid_splits.json (checked against problems.json if given)."""
    path = Path(root) / "pid_splits.json"
    splits = read_json(path)
    if not isinstance(splits, dict):
        raise DataError(f"{path} should map split name -> list of pids, got {type(splits).__name__}")
    if split not in splits:
        raise DataError(f"split {split!r} not in pid_splits.json (has {sorted(splits)})")
    entries = splits[split]
    # A string would be read one character at a time ("12" -> pids "1", "2").
    if not isinstance(entries, list) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in entries):
        raise DataError(f"{path}: split {split!r} should be a list of pids (strings or ints), got {entries!r:.80}")
    pids = [str(pid) for pid in entries]
    if problems is not None:
        unknown = [pid for pid in pids if pid not in problems]
        if unknown:
            raise DataError(f"split {split!r} names pids missing from problems.json: {unknown[:10]}")
    return pids


def load_captions(root: str | Path) -> dict[str, str]:
    """captions.json's {"captions": {pid: caption}}."""
    path = Path(root) / "captions.json"
    captions = read_json(path)
    if not isinstance(captions, dict) or not isinstance(captions.get("captions"), dict):
        raise DataError(f"{path} should hold {{'captions': {{pid: text}}}}")
    for pid, caption in captions["captions"].items():
        if not isinstance(caption, str):
            raise DataError(f"{path}: caption of record {pid} should be a string, got {type(caption).__name__}")
        check_text(caption, f"{path}: caption of record {pid}")
    return captions["captions"]


def image_path(root: str | Path, pid: str, problem: Mapping) -> Path | None:
    """images/<split>/<pid>/image.png for a record with an image (None without); missing: error."""
    if not problem.get("image"):
        return None
    path = Path(root) / "images" / problem["split"] / pid / problem["image"]
    if not path.is_file():
        raise DataError(f"ScienceQA record {pid}: image file {path} is missing")
    return path


# ----------------------------------------------------------------------------- prompts


def build_prompt(problem: Mapping, caption: str | None = None) -> str:
    """QCM input: 'Question: q\\nContext: hint\\nOptions: (A) a (B) b\\nResponse:'.

    The context is the hint ("N/A" when empty); with `caption`, the caption is appended to it, as
    the reference's caption option does.
    """
    context = " ".join(part for part in (problem["hint"].strip(), (caption or "").strip()) if part)
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(problem["choices"]))
    return f"Question: {problem['question']}\nContext: {context or 'N/A'}\nOptions: {options}\nResponse:"


def build_target(problem: Mapping) -> str:
    """ALE output: 'The answer is L. BECAUSE: lecture solution' (joined to the prompt with no space)."""
    explanation = " ".join(part.strip() for part in (problem["lecture"], problem["solution"]) if part.strip())
    return f"The answer is {LETTERS[problem['answer']]}. BECAUSE: {explanation}"


def parse_answer(text: str, n_choices: int) -> int | None:
    """The choice index in the first 'The answer is X.' of `text`; None when absent or out of
    range (counted wrong by `score`; the reference guesses at random instead)."""
    match = _ANSWER.search(text)
    if match is None:
        return None
    index = LETTERS.index(match.group(1))
    return index if index < n_choices else None


# ----------------------------------------------------------------------------- scoring


def categories_of(problem: Mapping) -> list[str]:
    """The table columns a record counts in (besides Avg)."""
    has_text, has_image = bool(problem["hint"].strip()), bool(problem.get("image"))
    cats = [SUBJECTS[problem["subject"]]]
    cats += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    cats.append("G1-6" if _grade_number("", problem["grade"]) <= 6 else "G7-12")
    return cats


def score(problems: Mapping[str, Mapping], predictions: Mapping[str, int | None]) -> dict[str, float]:
    """Accuracy (%) per category of the paper's Table 1 over the pids in `predictions`.

    predictions: pid -> predicted choice index, or None when nothing parsed (counted wrong).
    Returns NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg; a category with no questions is NaN.
    """
    right = {cat: 0 for cat in CATEGORIES}
    total = {cat: 0 for cat in CATEGORIES}
    for pid, predicted in predictions.items():
        if pid not in problems:
            raise DataError(f"prediction for unknown pid {pid}")
        problem = problems[pid]
        correct = predicted is not None and predicted == problem["answer"]
        for cat in categories_of(problem) + ["Avg"]:
            total[cat] += 1
            right[cat] += correct
    return {cat: 100.0 * right[cat] / total[cat] if total[cat] else math.nan for cat in CATEGORIES}


def format_table(scores: Mapping[str, float], unparsed: int | None = None) -> str:
    """The category table as markdown (a missing category shows '-')."""
    cells = ["-" if math.isnan(scores[c]) else f"{scores[c]:.2f}" for c in CATEGORIES]
    lines = ["| " + " | ".join(CATEGORIES) + " |", "|" + "---|" * len(CATEGORIES), "| " + " | ".join(cells) + " |"]
    if unparsed is not None:
        lines.append(f"\nunparsed answers (counted wrong): {unparsed}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fake trees

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
          "purple": (140, 40, 180), "orange": (245, 130, 20), "black": (10, 10, 10), "cyan": (20, 200, 210)}
SHAPES = ("circle", "square", "triangle")
NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Kim", "Eva")
THINGS = ("ball", "kite", "hat", "cup", "bike", "book")
ANIMALS = ("dog", "cat", "horse", "duck", "fish", "goat")
NON_ANIMALS = ("table", "spoon", "chair", "lamp", "door", "shoe", "rock", "cloud")


def _draw(color: str, shape: str, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(half, size - half), rng.randint(half, size - half)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLORS[color])
    return image


def _options(answer: str, pool: tuple[str, ...], n: int, rng: random.Random) -> tuple[list[str], int]:
    choices = [answer] + rng.sample([p for p in pool if p != answer], n - 1)
    rng.shuffle(choices)
    return choices, choices.index(answer)


# The fixed options of `write_fake_scienceqa(..., fixed_choices=True)`, always in this order.
FIXED_COLORS = ("red", "green", "blue", "yellow")


def _color_question(rng: random.Random, fixed_choices: bool) -> tuple[str, list[str], int]:
    """(the right color, the options, its index): four of the eight colors shuffled, or the
    four FIXED_COLORS in their order."""
    if fixed_choices:
        color = rng.choice(FIXED_COLORS)
        return color, list(FIXED_COLORS), FIXED_COLORS.index(color)
    color = rng.choice(list(COLORS))
    return color, *_options(color, tuple(COLORS), 4, rng)


def _fake_problem(kind: str, rng: random.Random, fixed_choices: bool = False) -> tuple[dict, tuple[str, str] | None]:
    """One record of `kind` ('image', 'text' or 'none') and, for images, (color, shape) to draw."""
    if kind == "image":
        shape = rng.choice(SHAPES)
        color, choices, answer = _color_question(rng, fixed_choices)
        problem = dict(question=f"What color is the {shape} in the picture?", hint="", image="image.png",
                       subject="natural science", topic="colors", category="Identify colors",
                       skill="Identify colors", lecture="Colors are seen with the eyes.",
                       solution=f"The {shape} is {color}.", grade=f"grade{rng.randint(1, 6)}")
        return dict(problem, choices=choices, answer=answer), (color, shape)
    if kind == "text":
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        color, choices, answer = _color_question(rng, fixed_choices)
        problem = dict(question=f"What color is {name}'s {thing}?", hint=f"{name} has a {color} {thing}.",
                       image=None, subject="social science", topic="reading", category="Read a text",
                       skill="Find details", lecture="A text can tell you facts.",
                       solution=f"The text says the {thing} is {color}.", grade=f"grade{rng.randint(1, 12)}")
        return dict(problem, choices=choices, answer=answer), None
    animal = rng.choice(ANIMALS)
    others = rng.sample(NON_ANIMALS, 3)
    choices = others + [animal]
    rng.shuffle(choices)
    problem = dict(question="Which word names an animal?", hint="", image=None, subject="language science",
                   topic="vocabulary", category="Word meaning", skill="Classify words",
                   lecture="Some words name animals.", solution=f"A {animal} is an animal.",
                   grade=f"grade{rng.randint(7, 12)}")
    return dict(problem, choices=choices, answer=choices.index(animal)), None


def write_fake_scienceqa(root: str | Path, sizes: Mapping[str, int] | None = None, *,
                         image_size: int = 56, image_fraction: float = 0.5, seed: int = 0,
                         fixed_choices: bool = False) -> Path:
    """Write a fake ScienceQA tree in the real format (see the module docstring).

    Image questions ask the color of a drawn shape (answerable only from the image), text
    questions are answered by their hint, the rest by word meaning alone (the NO column).
    sizes: records per split (default train 400, val 100, test 100). fixed_choices: every color
    question offers the same four colors in the same order (FIXED_COLORS), so that the answer
    letter names the color directly; shuffled options (the default) add a lookup of the color
    among the options, which a language model small enough to pretrain on a CPU in a minute
    does not learn. Returns root.
    """
    root = Path(root)
    sizes = dict(sizes or {"train": 400, "val": 100, "test": 100})
    rng = random.Random(seed)
    problems: dict[str, dict] = {}
    splits: dict[str, list[str]] = {}
    captions: dict[str, str] = {}
    for split, count in sizes.items():
        splits[split] = []
        for _ in range(count):
            pid = str(len(problems) + 1)
            draw = rng.random()
            kind = "image" if draw < image_fraction else ("text" if draw < (1 + image_fraction) / 2 else "none")
            problem, picture = _fake_problem(kind, rng, fixed_choices)
            problem["split"] = split
            problem["task"] = "closed choice"
            problems[pid] = problem
            splits[split].append(pid)
            if picture is not None:
                folder = root / "images" / split / pid
                folder.mkdir(parents=True, exist_ok=True)
                _draw(*picture, image_size, rng).save(folder / "image.png")
                captions[pid] = f"A {picture[1]} on a white background."
    atomic_write_text(root / "problems.json", json.dumps(problems, indent=1))
    atomic_write_text(root / "pid_splits.json", json.dumps(splits))
    atomic_write_text(root / "captions.json", json.dumps({"captions": captions}))
    return root
