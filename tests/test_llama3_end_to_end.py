"""A user moving to LLaMA-3: a tiny LLaMA-3.2-style Hugging Face folder (rope_scaling llama3,
rope_theta 500000, tied embeddings, grouped-query attention, a byte-level BPE tokenizer.json
with LLaMA-3's special tokens, all made here) runs through the same commands as LLaMA-1:
`load_lavin`, `lavin-fast train`, `eval` and `generate`."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import train_hf_tokenizer
from lavin_fast import cli, tiny
from lavin_fast import train as training
from lavin_fast.checkpoints.clip import save_clip
from lavin_fast.checkpoints.lavin import load_lavin
from lavin_fast.data import scienceqa_samples
from lavin_fast.generation import generate_tokens
from lavin_fast.models.lavin import LaVINConfig
from lavin_fast.models.vit import VisionTransformer
from lavin_fast.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """{"data_root", "llama" (the Hugging Face folder, its tokenizer inside), "clip"}."""
    root = tmp_path_factory.mktemp("llama3")
    data_root = tiny.fake_scienceqa(root / "data", seed=0)
    folder = train_hf_tokenizer(root / "llama3", tiny.language_texts(data_root), vocab_size=400)
    tokenizer = Tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tokenizer.n_words, rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    clip = save_clip(VisionTransformer(LaVINConfig.from_preset("tiny").vit), root / "clip.safetensors")
    return {"data_root": str(data_root), "llama": str(folder), "clip": str(clip)}


def test_load_lavin_reads_a_llama3_folder(backbones):
    model = load_lavin(backbones["llama"], backbones["clip"], preset="tiny")
    llama = model.llama.config
    assert (llama.rope_scaling.kind, llama.rope_scaling.factor, llama.rope_theta) == ("llama3", 32.0, 500000.0)
    assert torch.equal(model.llama.output.weight, model.llama.tok_embeddings.weight)  # tied
    tokenizer = Tokenizer(backbones["llama"])
    assert llama.vocab_size == tokenizer.n_words
    # the LaVIN sequence with LLaMA-3's tokens: <|begin_of_text|> after t_m, <|end_of_text|> closing the answer
    collator = training.build_collator(model, tokenizer, training.TrainConfig(preset="tiny"))
    sample = scienceqa_samples(backbones["data_root"], "train")[0]
    ids, answer_start = collator.sequence(sample)
    assert ids[1] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[answer_start:-1]) == sample.answer  # byte-level BPE is lossless
    assert len(ids) > 32  # positions past original_max_position_embeddings


def test_train_eval_and_generate_with_the_same_commands(backbones, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--preset", "tiny", "--llama", backbones["llama"], "--clip", backbones["clip"],
              "--tokenizer", backbones["llama"], "--data-root", backbones["data_root"], "--max-steps", "3",
              "--effective-batch", "4", "--micro-batch", "4", "--lr", "0.005", "--out", str(out), "--no-progress"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)

    cli.main(["eval", "--run", str(out), "--split", "test", "--limit", "4", "--max-new-tokens", "4",
              "--batch-size", "4"])
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in capsys.readouterr().out
    assert len(json.loads((out / "eval-test" / "predictions.json").read_text())) == 4

    prompt = "Question: Which is a mammal?\nResponse:"
    cli.main(["generate", "--run", str(out), "--prompt", prompt, "--max-new-tokens", "5"])
    printed = capsys.readouterr().out
    values = json.loads((out / "run_config.json").read_text())
    cfg = training.TrainConfig(**{**values, "adapters": str(out / "adapters.safetensors")})
    model, tokenizer = training.build_model(cfg, torch.device("cpu"))
    collator = training.build_collator(model, tokenizer, cfg)
    result = generate_tokens(model, collator.layout, [prompt], [None], max_new_tokens=5)
    assert printed == tokenizer.decode(result.tokens[0]) + "\n"
    assert not set(result.tokens[0]) & set(tokenizer.stop_ids)
