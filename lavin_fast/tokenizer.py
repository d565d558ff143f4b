"""The LLaMA tokenizer: a sentencepiece model (`tokenizer.model`), as Meta ships it.

`Tokenizer.train` makes a small one from text (the demo's tiny LLaMA and the tests use it;
real runs load Meta's 32,000-piece model).
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from lavin_fast.checkpoints.strict import CheckpointError
from lavin_fast.io import atomic_write
from lavin_fast.scienceqa import check_text


class Tokenizer:
    """encode(text, bos, eos) -> ids and decode(ids) -> text over a sentencepiece model."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer: no sentencepiece model at {path}")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as error:  # sentencepiece's own message: "could not parse ModelProto ..."
            raise CheckpointError(f"Tokenizer: {path} is not a sentencepiece model: {error}") from error
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"Tokenizer: {path} defines no BOS/EOS pieces (LLaMA needs both)")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}")
        check_text(text, "Tokenizer.encode")   # sentencepiece's own error says nothing of the text
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @classmethod
    def train(cls, texts: Iterable[str], path: str | Path, vocab_size: int) -> Tokenizer:
        """Train a BPE sentencepiece model on `texts` with LLaMA's special ids (unk 0, bos 1,
        eos 2, no pad) and byte fallback, write it to `path` atomically and load it."""
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
            hard_vocab_limit=False, minloglevel=2, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        )
        atomic_write(path, lambda tmp: tmp.write_bytes(model.getvalue()))
        return cls(path)
