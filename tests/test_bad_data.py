"""Bad data is found before anything trains or generates, and named: damaged images (`--bad-samples
error|skip`), files that are not UTF-8, malformed splits and captions, empty sources, text no
tokenizer can encode, LLaVA image paths outside their folder; evaluation keeps what it did."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from test_train import tiny_config

from lavin_fast import cli, data, evaluate, scienceqa, tiny
from lavin_fast import train as training
from lavin_fast.collate import Collator, SequenceLayout
from lavin_fast.scienceqa import DataError
from lavin_fast.tokenizer import Tokenizer

DAMAGES = ("truncated", "cut_end", "flipped_bytes", "not_an_image")


def damage(path, how: str) -> None:
    """Break an image file the ways a copy, a disk or a download does."""
    raw = path.read_bytes()
    if how == "truncated":            # half the file: the decoder runs out of data
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "cut_end":            # pixels complete, end chunk missing: only verify() notices
        path.write_bytes(raw[:-20])
    elif how == "flipped_bytes":      # checksums no longer match the data
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 8]) + raw[middle + 8:])
    else:
        path.write_bytes(b"<html>404 Not Found</html>")


def image_pids(root, split: str) -> list[str]:
    problems = scienceqa.load_problems(root)
    return [pid for pid in scienceqa.load_split(root, split, problems) if problems[pid]["image"]]


def image_file(root, pid: str):
    problem = scienceqa.load_problems(root)[pid]
    return scienceqa.image_path(root, pid, problem)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Tokenizer, tiny LLaMA and CLIP (random), made once for every test here."""
    folder = tmp_path_factory.mktemp("backbones")
    root = scienceqa.write_fake_scienceqa(folder / "data", {"train": 24}, seed=0)
    return {name: str(path) for name, path in tiny.tiny_backbones(folder, root).items()}


@pytest.fixture
def tree(tmp_path):
    """A small fake ScienceQA tree: 17 train questions (5 with an image), 9 test questions (5)."""
    return scienceqa.write_fake_scienceqa(tmp_path / "sqa", {"train": 17, "test": 9}, seed=2)


# ---------------------------------------------------------------------------------- images


class ModelBuilt(Exception):
    pass


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_image_stops_training_before_the_model_loads(tree, tmp_path, backbones, monkeypatch, how):
    """Today the image is only read when its batch is collated: this one is never drawn in the
    first step, so the run would start (and die at the step that draws it)."""
    pid = image_pids(tree, "train")[-1]
    path = image_file(tree, pid)
    damage(path, how)

    def build_model(*args, **kwargs):
        raise ModelBuilt

    monkeypatch.setattr(training, "build_model", build_model)
    out = tmp_path / "run"
    with pytest.raises(DataError) as caught:
        training.train(tiny_config(out, data_root=str(tree), max_steps=1, **backbones))
    message = str(caught.value)
    assert f"sample {pid}: cannot read image {path}" in message and "--bad-samples skip" in message
    assert not (out / "log.jsonl").exists()


def test_skip_trains_without_the_damaged_samples_and_lists_them(tree, tmp_path, backbones, caplog):
    pids = image_pids(tree, "train")
    bad = {pids[0]: "truncated", pids[3]: "flipped_bytes"}
    for pid, how in bad.items():
        damage(image_file(tree, pid), how)
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        training.train(tiny_config(out, data_root=str(tree), max_steps=2, bad_samples="skip", **backbones))
    listed = json.loads((out / "skipped_samples.json").read_text())
    assert [entry["id"] for entry in listed] == [pid for pid in pids if pid in bad]
    assert [entry["image"] for entry in listed] == [str(image_file(tree, pid)) for pid in pids if pid in bad]
    assert all("cannot read image" in entry["error"] for entry in listed)
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2]
    text = caplog.text
    assert "left out 2 samples with a damaged image" in text and all(pid in text for pid in bad)
    assert "15 samples, 2 steps" in text                                      # 17 - 2
    assert "done: 2 steps" in text and "2 samples with a damaged image left out" in text
    assert json.loads((out / "run_config.json").read_text())["bad_samples"] == "skip"


def test_check_images_reads_each_file_once_and_keeps_the_order(tmp_path):
    """A truncated JPEG passes verify() (only the decode sees it); LLaVA turns share one file."""
    good, jpeg = tmp_path / "good.png", tmp_path / "cut.jpg"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(good)
    Image.effect_noise((64, 48), 40).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    samples = [data.Sample("t", "p", "a"), data.Sample("a-0", "p", "a", jpeg), data.Sample("g", "p", "a", good),
               data.Sample("a-1", "p", "a", jpeg)]
    kept, skipped = data.check_images(samples, "skip", progress=False)
    assert [s.id for s in kept] == ["t", "g"]
    assert [(s["id"], s["image"]) for s in skipped] == [("a-0", str(jpeg)), ("a-1", str(jpeg))]
    with pytest.raises(DataError, match=r"2 of 4 samples have a damaged image \(sample a-0: cannot read .*cut.jpg"):
        data.check_images(samples, "error", progress=False)
    with pytest.raises(ValueError, match="bad-samples must be one of"):
        training.TrainConfig(bad_samples="ignore")


# ---------------------------------------------------------------------------------- evaluation


@pytest.fixture
def collator(backbones):
    return Collator(SequenceLayout(Tokenizer(backbones["tokenizer"])))


def scripted(calls: list, fail_at: int | None = None):
    """A stand-in for `generate`: answers A to everything, raises at batch `fail_at` (1-based)."""
    def generate(model, layout, prompts, images, **kwargs):
        calls.append(list(prompts))
        if len(calls) == fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return ["The answer is A. BECAUSE: scripted."] * len(prompts)
    return generate


def test_a_crash_during_evaluation_keeps_the_batches_done(tree, tmp_path, collator, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "generate", scripted(calls, fail_at=2))
    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        evaluate.evaluate_scienceqa(None, collator, tree, "test", batch_size=4, out=out, progress=False)
    problems = scienceqa.load_problems(tree)
    prompts = {scienceqa.build_prompt(problems[pid]): pid for pid in scienceqa.load_split(tree, "test")}
    first_batch = {prompts[prompt] for prompt in calls[0]}
    saved = json.loads((out / "predictions.json").read_text())
    assert set(saved) == first_batch and len(first_batch) == 4
    for pid, record in saved.items():
        assert record == {"output": "The answer is A. BECAUSE: scripted.", "prediction": 0,
                          "answer": problems[pid]["answer"]}


def test_eval_checks_images_before_generating(tree, tmp_path, collator, monkeypatch, capsys):
    """`lavin-fast eval`: a damaged image stops it before the first batch; --bad-samples skip
    scores the rest and lists what it left out."""
    pid = image_pids(tree, "test")[-1]
    damage(image_file(tree, pid), "truncated")
    calls = []
    monkeypatch.setattr(evaluate, "generate", scripted(calls))
    monkeypatch.setattr(evaluate, "plot_routing", lambda *args: None)
    monkeypatch.setattr(cli, "_load", lambda args: (None, collator, training.TrainConfig(data_root=str(tree))))
    out = tmp_path / "eval"
    command = ["eval", "--run", str(tmp_path), "--split", "test", "--out", str(out), "--batch-size", "4"]
    with pytest.raises(SystemExit) as stop:
        cli.main(command)
    assert stop.value.code == 2
    assert f"lavin-fast: error: 1 of 9 samples have a damaged image (sample {pid}: cannot read image " \
           f"{image_file(tree, pid)}" in capsys.readouterr().err
    assert calls == [] and not (out / "predictions.json").exists()

    cli.main(command + ["--bad-samples", "skip"])
    assert "questions left out for a damaged image: 1 (not scored" in capsys.readouterr().out
    predictions = json.loads((out / "predictions.json").read_text())
    assert set(predictions) == set(scienceqa.load_split(tree, "test")) - {pid}
    assert [entry["id"] for entry in json.loads((out / "skipped_samples.json").read_text())] == [pid]


# ---------------------------------------------------------------------------------- records


def write_json(path, value) -> None:
    path.write_text(json.dumps(value))     # ensure_ascii: a lone surrogate is written as \ud800


def test_json_files_that_are_not_utf8_name_the_file(tree, tmp_path):
    problems = tree / "problems.json"
    problems.write_bytes(problems.read_bytes().replace(b"What color", b"What col\xf6r", 1))
    with pytest.raises(DataError, match=r"problems.json is not UTF-8 text \(byte 0xf6"):
        scienceqa.load_problems(tree)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_bytes('[{"instruction": "Caf\u00e9", "output": "ok"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="alpaca.json is not UTF-8 text"):
        data.alpaca_samples(alpaca)


def test_a_split_that_is_not_a_list_of_pids(tree):
    """A string would be read character by character: "12" trained on records 1 and 2."""
    write_json(tree / "pid_splits.json", {"train": "12", "test": ["3", 4, [5]]})
    with pytest.raises(DataError, match=r"pid_splits.json: split 'train' should be a list of pids.*'12'"):
        data.scienceqa_samples(tree, "train")
    with pytest.raises(DataError, match=r"split 'test' should be a list of pids"):
        scienceqa.load_split(tree, "test")


def test_captions_that_are_not_text_name_the_record(tree):
    pid = image_pids(tree, "train")[0]
    captions = scienceqa.load_captions(tree)
    write_json(tree / "captions.json", {"captions": {**captions, pid: ["a circle"]}})
    with pytest.raises(DataError, match=f"captions.json: caption of record {pid} should be a string, got list"):
        data.scienceqa_samples(tree, "train", use_caption=True)
    write_json(tree / "captions.json", {"captions": {**captions, pid: "a \ud800 circle"}})
    with pytest.raises(DataError, match=f"caption of record {pid}: text is not valid Unicode"):
        data.scienceqa_samples(tree, "train", use_caption=True)


def test_an_empty_alpaca_or_llava_file_is_refused(tmp_path):
    path = tmp_path / "alpaca.json"
    write_json(path, [])
    with pytest.raises(DataError, match="alpaca.json holds an empty list: no Alpaca records"):
        data.alpaca_samples(path)
    with pytest.raises(DataError, match="holds an empty list: no LLaVA records"):
        data.llava_samples(path, tmp_path)


def test_lone_surrogates_are_named_before_the_tokenizer(tree, tmp_path, backbones):
    problems = json.loads((tree / "problems.json").read_text())
    problems["5"]["question"] = "What color is \udc80 this?"
    write_json(tree / "problems.json", problems)
    with pytest.raises(DataError, match=r"ScienceQA record 5, field 'question': text is not valid Unicode "
                                        r"\(lone surrogate '\\udc80' at character 14"):
        scienceqa.load_problems(tree)
    alpaca = tmp_path / "alpaca.json"
    write_json(alpaca, [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "x\ud83d", "output": "y"}])
    with pytest.raises(DataError, match="Alpaca record 1: field 'instruction': text is not valid Unicode"):
        data.alpaca_samples(alpaca)
    # what gets past the data files (a prompt from the command line) is refused by the tokenizer
    with pytest.raises(ValueError, match="Tokenizer.encode: text is not valid Unicode"):
        Tokenizer(backbones["tokenizer"]).encode("Question: \udcff?")


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.jpg", "train/../../secret.jpg"])
def test_llava_image_paths_stay_inside_the_image_folder(tmp_path, name):
    images = tmp_path / "coco"
    (images / "train").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    (images / "train" / "ok.jpg").write_bytes(b"jpeg")
    path = tmp_path / "llava.json"
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A bus."}]
    write_json(path, [{"id": "ok", "image": "train/ok.jpg", "conversations": turns},
                      {"id": "x7", "image": name, "conversations": turns}])
    with pytest.raises(DataError, match=f"LLaVA record x7: image '{name}' is outside the image folder"):
        data.llava_samples(path, images)
    write_json(path, [{"id": "ok", "image": "train/ok.jpg", "conversations": turns}])
    assert data.llava_samples(path, images)[0].image == images / "train" / "ok.jpg"
