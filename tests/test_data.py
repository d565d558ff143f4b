"""Data sources: ScienceQA, Alpaca and LLaVA-Instruct as samples; malformed records are errors."""
import json

import pytest

from lavin_fast import data, scienceqa
from lavin_fast.scienceqa import DataError


def test_scienceqa_samples_pair_prompt_target_and_image(tmp_path):
    root = scienceqa.write_fake_scienceqa(tmp_path, {"train": 20, "test": 4}, seed=5)
    problems = scienceqa.load_problems(root)
    samples = data.scienceqa_samples(root, "train")
    assert len(samples) == 20
    for sample in samples:
        problem = problems[sample.id]
        assert sample.prompt == scienceqa.build_prompt(problem)
        assert sample.answer.startswith(f"The answer is {'ABCD'[problem['answer']]}. BECAUSE: ")
        assert (sample.image is not None) == (problem["image"] is not None)
    captioned = data.scienceqa_samples(root, "train", use_caption=True)
    with_image = next(s for s in captioned if s.image is not None)
    assert "on a white background." in with_image.prompt


def test_alpaca_reader(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]))
    samples = data.alpaca_samples(path)
    assert [s.prompt for s in samples] == ["Instruction: Add the numbers. 2 and 3\nResponse:",
                                           "Instruction: Say hi. \nResponse:"]
    assert [s.answer for s in samples] == ["5", "Hi!"] and all(s.image is None for s in samples)
    path.write_text(json.dumps([{"instruction": "x", "input": "", "output": 3}]))
    with pytest.raises(DataError, match="Alpaca record 0: field 'output' should be a string"):
        data.alpaca_samples(path)


def test_llava_reader_splits_turns_and_checks_images(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "000001.jpg").write_bytes(b"jpeg")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"id": "a1", "image": "000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A bus."},
        {"from": "human", "value": "Which color?"}, {"from": "gpt", "value": "Red."}]}]))
    samples = data.llava_samples(path, tmp_path / "coco")
    assert [(s.id, s.prompt, s.answer) for s in samples] == [
        ("a1-0", "Instruction: What is this? \nResponse:", "A bus."),
        ("a1-1", "Instruction: Which color? \nResponse:", "Red.")]
    assert all(s.image == tmp_path / "coco" / "000001.jpg" for s in samples)
    with pytest.raises(DataError, match="LLaVA record a1: image file .*000002.jpg is missing"):
        path.write_text(json.dumps([{"id": "a1", "image": "000002.jpg", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
        data.llava_samples(path, tmp_path / "coco")
    with pytest.raises(DataError, match="LLaVA record b2: turn 0 is not a human turn"):
        path.write_text(json.dumps([{"id": "b2", "conversations": [
            {"from": "gpt", "value": "q"}, {"from": "human", "value": "a"}]}]))
        data.llava_samples(path, tmp_path / "coco")


def test_mix_concatenates_sources(tmp_path):
    a = data.SampleList([data.Sample("1", "p", "a")])
    b = data.SampleList([data.Sample("2", "q", "b"), data.Sample("3", "r", "c")])
    mixed = data.mix(a, b, data.SampleList([]))
    assert [mixed[i].id for i in range(len(mixed))] == ["1", "2", "3"]
