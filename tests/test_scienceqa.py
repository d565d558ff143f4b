"""ScienceQA format, QCM-ALE prompt, answer parsing, the category table, and the fake tree."""
import json
import math

import pytest

from lavin_fast import scienceqa
from lavin_fast.scienceqa import DataError


def record(**overrides):
    base = dict(question="Which is a mammal?", choices=["frog", "whale", "trout"], answer=1, hint="",
                image=None, task="closed choice", grade="grade4", subject="natural science", topic="biology",
                category="Classify", skill="Classify", lecture="Mammals have hair.",
                solution="A whale is a mammal.", split="test")
    return {**base, **overrides}


def test_prompt_and_target_match_the_reference_format():
    problem = record(hint="Whales live in the sea.")
    assert scienceqa.build_prompt(problem) == (
        "Question: Which is a mammal?\nContext: Whales live in the sea.\n"
        "Options: (A) frog (B) whale (C) trout\nResponse:")
    assert scienceqa.build_prompt(record()).split("\n")[1] == "Context: N/A"
    assert scienceqa.build_prompt(record(), caption="A whale.").split("\n")[1] == "Context: A whale."
    assert scienceqa.build_target(problem) == "The answer is B. BECAUSE: Mammals have hair. A whale is a mammal."


@pytest.mark.parametrize("text, n, expected", [
    ("The answer is B. BECAUSE: ...", 3, 1),
    ("blah The answer is A. then The answer is C.", 3, 0),   # the first match counts
    ("The answer is D.", 3, None),                            # no such option
    ("The answer is b.", 3, None),
    ("I think B", 3, None),
])
def test_parse_answer(text, n, expected):
    assert scienceqa.parse_answer(text, n) == expected


def test_score_by_category_hand_counted():
    problems = {
        "1": record(subject="natural science", hint="h", image=None, grade="grade2", answer=0),      # NAT TXT G1-6
        "2": record(subject="social science", hint="", image="image.png", grade="grade8", answer=1),  # SOC IMG G7-12
        "3": record(subject="language science", hint="", image=None, grade="grade12", answer=2),    # LAN NO G7-12
        "4": record(subject="natural science", hint="h", image="image.png", grade="grade6", answer=1),  # NAT TXT IMG G1-6
    }
    predictions = {"1": 0, "2": None, "3": 2, "4": 0}   # right, unparsed, right, wrong
    scores = scienceqa.score(problems, predictions)
    assert list(scores) == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert scores["NAT"] == 50.0 and scores["SOC"] == 0.0 and scores["LAN"] == 100.0
    assert scores["TXT"] == 50.0 and scores["IMG"] == 0.0 and scores["NO"] == 100.0
    assert scores["G1-6"] == 50.0 and scores["G7-12"] == 50.0 and scores["Avg"] == 50.0
    only_nat = scienceqa.score(problems, {"1": 0})
    assert math.isnan(only_nat["SOC"]) and only_nat["Avg"] == 100.0
    with pytest.raises(DataError, match="unknown pid 9"):
        scienceqa.score(problems, {"9": 0})


@pytest.mark.parametrize("broken, message", [
    (dict(answer=3), "answer 3 is not an index"),
    (dict(choices="abc"), "field 'choices' should be list"),
    (dict(grade="seventh"), "grade should look like"),
    (dict(subject="astrology"), "unknown subject"),
    (dict(image="photo.jpg"), "image must be"),
    (dict(answer=True), "field 'answer' should be int"),
])
def test_malformed_records_name_the_pid(tmp_path, broken, message):
    (tmp_path / "problems.json").write_text(json.dumps({"17": record(), "42": record(**broken)}))
    with pytest.raises(DataError, match=f"record 42: .*{message}"):
        scienceqa.load_problems(tmp_path)


def test_missing_field_and_missing_image_name_the_pid(tmp_path):
    problem = record()
    del problem["lecture"]
    (tmp_path / "problems.json").write_text(json.dumps({"5": problem}))
    with pytest.raises(DataError, match="record 5: missing field 'lecture'"):
        scienceqa.load_problems(tmp_path)
    with pytest.raises(DataError, match="record 6: image file .*images/test/6/image.png is missing"):
        scienceqa.image_path(tmp_path, "6", record(image="image.png"))


def test_fake_tree_is_in_the_real_format(tmp_path):
    root = scienceqa.write_fake_scienceqa(tmp_path / "sqa", {"train": 30, "val": 5, "test": 10}, seed=3)
    problems = scienceqa.load_problems(root)          # validates every record
    splits = json.loads((root / "pid_splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "val": 5, "test": 10}
    captions = scienceqa.load_captions(root)
    with_image = [pid for pid, p in problems.items() if p["image"]]
    assert with_image and set(captions) == set(with_image)
    for pid in with_image:
        path = scienceqa.image_path(root, pid, problems[pid])
        assert path == root / "images" / problems[pid]["split"] / pid / "image.png"
    # Image questions carry no hint (the answer is only in the picture); text ones do.
    assert all(problems[pid]["hint"] == "" for pid in with_image)
    kinds = {scienceqa.categories_of(p)[1] for p in problems.values()}
    assert kinds == {"TXT", "IMG", "NO"}
    assert scienceqa.load_split(root, "test", problems) == splits["test"]
    with pytest.raises(DataError, match="split 'dev' not in"):
        scienceqa.load_split(root, "dev")


def test_fake_image_shows_the_answer_color(tmp_path):
    import numpy as np
    from PIL import Image

    root = scienceqa.write_fake_scienceqa(tmp_path, {"train": 40}, image_fraction=1.0, seed=1)
    problems = scienceqa.load_problems(root)
    for pid, problem in problems.items():
        pixels = np.asarray(Image.open(scienceqa.image_path(root, pid, problem))).reshape(-1, 3)
        colored = {tuple(int(v) for v in px) for px in pixels} - {(255, 255, 255)}
        expected = scienceqa.COLORS[problem["choices"][problem["answer"]]]
        assert expected in colored
