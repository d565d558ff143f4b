"""The `lavin-fast` command (train, eval, generate, demo) and the ScienceQA evaluation."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from lavin_fast import cli, evaluate, scienceqa


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short training run of the tiny model on fake data, through the command line."""
    out = tmp_path_factory.mktemp("cli") / "run"
    cli.main(["train", "--preset", "tiny", "--fake-data", "--max-steps", "6", "--effective-batch", "8",
              "--micro-batch", "8", "--out", str(out), "--no-progress"])
    return out


def test_eval_writes_the_table_predictions_and_routing_plot(run, capsys):
    cli.main(["eval", "--run", str(run), "--split", "test", "--limit", "12", "--max-new-tokens", "6",
              "--batch-size", "5"])
    printed = capsys.readouterr().out
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in printed
    folder = run / "eval-test"
    predictions = json.loads((folder / "predictions.json").read_text())
    scores = json.loads((folder / "scores.json").read_text())
    assert len(predictions) == 12
    assert scores["unparsed"] == sum(p["prediction"] is None for p in predictions.values())
    assert set(scores) == set(scienceqa.CATEGORIES) | {"unparsed"}
    right = sum(p["prediction"] == p["answer"] for p in predictions.values())
    assert scores["Avg"] == pytest.approx(100 * right / 12)
    assert (folder / "table.md").read_text().startswith("| NAT |")
    assert (folder / "routing.png").stat().st_size > 1000


def load_run(run, adapters=True):
    import torch

    from lavin_fast import train as training

    values = json.loads((run / "run_config.json").read_text())
    cfg = training.TrainConfig(**{**values, "adapters": str(run / "adapters.safetensors") if adapters else None})
    model, tokenizer = training.build_model(cfg, torch.device("cpu"))
    return model.eval(), training.build_collator(model, tokenizer, cfg), cfg


def test_generate_prints_what_the_library_generates(run, tmp_path, capsys, monkeypatch):
    from lavin_fast.generation import generate

    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 30, 30)).save(picture)
    model, collator, _ = load_run(run)
    prompt = "Question: What color is it?\nResponse:"
    for image in (picture, None):
        cli.main(["generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", "5",
                  *(["--image", str(image)] if image else [])])
        pixels = collator.image_loader(image) if image else None
        [expected] = generate(model, collator.layout, [prompt], [pixels], max_new_tokens=5)
        assert capsys.readouterr().out == expected + "\n"
    monkeypatch.setenv("LAVIN_FAST_DEBUG", "1")      # the error itself, not its one line
    with pytest.raises(FileNotFoundError, match="not a training run folder"):
        cli.main(["generate", "--run", str(tmp_path), "--prompt", "hi"])


def test_evaluation_scores_what_was_generated_and_counts_unparsed_as_wrong(run, tmp_path, monkeypatch):
    """With the generator replaced by scripted answers (right, wrong, unparsable in turn), the
    table and the unparsed count follow from the script alone. The tree has shuffled options,
    so every prompt names its question (evaluation may ask in any order)."""
    model, collator, _ = load_run(run, adapters=False)
    root = scienceqa.write_fake_scienceqa(tmp_path / "sqa", {"test": 8}, image_size=32, seed=4)
    problems = scienceqa.load_problems(root)
    pids = scienceqa.load_split(root, "test", problems)
    by_prompt = {scienceqa.build_prompt(problems[pid]): i for i, pid in enumerate(pids)}
    assert len(by_prompt) == 8
    batch_sizes = []

    def scripted_generate(model, layout, prompts, images, **kwargs):
        batch_sizes.append(len(prompts))
        outputs = []
        for prompt in prompts:
            i = by_prompt[prompt]
            answer = problems[pids[i]]["answer"]
            outputs.append([f"The answer is {'ABCD'[answer]}. BECAUSE: it is.",
                            f"The answer is {'ABCD'[(answer + 1) % 4]}.", "I do not know."][i % 3])
        return outputs

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    result = evaluate.evaluate_scienceqa(model, collator, root, "test", batch_size=3, progress=False)
    assert result.scores["Avg"] == pytest.approx(100 * 3 / 8)          # i = 0, 3, 6 right
    assert result.unparsed == 2                                           # i = 2, 5
    assert [result.predictions[pids[i]] for i in (2, 5)] == [None, None]
    assert sorted(result.predictions) == sorted(pids) and batch_sizes == [3, 3, 2]


def test_demo_answers_image_questions_from_the_image(tmp_path):
    """The embedded default end to end: >= 80% on held-out 4-option image questions, and far
    less once the pictures are blanked (the answer comes through the visual path)."""
    from lavin_fast.demo import run_demo

    summary = run_demo(tmp_path / "demo")
    assert summary["image_accuracy"] >= 80.0, summary
    assert summary["image_accuracy_blank_pictures"] <= 50.0, summary
    for name in ("run/adapters.safetensors", "run/loss.png", "eval/routing.png", "eval/table.md", "summary.json"):
        assert (tmp_path / "demo" / name).is_file(), name
