"""Shared judgement of a kernel's numbers against the float64 oracle.

The rule (the one flash-attention's tests use): the kernel's largest error against the float64
reference may be at most twice the largest error of the plain PyTorch op run in the kernel's
dtype, plus one rounding step of the result's magnitude in that dtype.

Also `train_hf_tokenizer`: a LLaMA-3-style Hugging Face tokenizer folder trained in the test.
"""
import json

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_oracle(name: str, out: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor,
                           ulps: float = 1, magnitude: float | None = None) -> None:
    """out: the kernel's result; oracle: float64 reference; baseline: the PyTorch op in out's dtype.

    On top of 2x PyTorch's error, `ulps` rounding steps (1 by default) of `magnitude`, the size
    the rounding is relative to: by default the oracle's largest value. A sum whose terms cancel
    rounds relative to its terms, not to its result: pass their size (e.g. the reference run on
    absolute values). That matters for outputs of a few elements (a routing or bias gradient),
    where the largest error of each side is a single noisy draw.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed)"
    err = max_err(out, oracle)
    base = max_err(baseline, oracle)
    size = oracle.abs().max().item() if magnitude is None else magnitude
    ulp = ulps * torch.finfo(out.dtype).eps * size
    assert err <= 2 * base + ulp, f"{name}: error {err:.3e} > 2 x PyTorch's {base:.3e} + {ulp:.3e}"


# ---- a LLaMA-3-style Hugging Face tokenizer folder, trained here ----------------------------------

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def train_hf_tokenizer(folder, texts, vocab_size: int = 400, instruct: bool = False, **config):
    """A byte-level BPE tokenizer.json trained on `texts` with LLaMA-3's layout: the special
    tokens added after the learned pieces, a post-processor prepending <|begin_of_text|>, and a
    tokenizer_config.json as Meta's Hugging Face folders write it (`config` adds or overrides
    keys). instruct: eos_token <|eot_id|> and a generation_config.json listing the three
    end-of-sequence ids, as LLaMA-3.1 Instruct's. Returns the folder."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(list(LLAMA3_SPECIALS))
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = "<|eot_id|>" if instruct else "<|end_of_text|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": eos, "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if instruct:
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos, "eos_token_id": [tokenizer.token_to_id(t) for t in LLAMA3_SPECIALS[1:]]}))
    return folder
