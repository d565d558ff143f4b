"""The LLaMA tokenizers behind one interface: a sentencepiece model (`tokenizer.model`, LLaMA-1
and 2 as Meta ships them) or a Hugging Face `tokenizer.json` (LLaMA-3.x: byte-level BPE, 128k
pieces), read with the `tokenizers` library. `Tokenizer(path)` takes the file or the folder
holding it (tokenizer.model first, as before, else tokenizer.json); the kind is told by the
file's name (`.json`: Hugging Face).

A tokenizer.json has no notion of BOS/EOS: they are the tokens the folder's
tokenizer_config.json and special_tokens_map.json name (bos_token, eos_token, pad_token, e.g.
<|begin_of_text|>, <|end_of_text|>; the two files must agree). Training appends `eos_id` to
answers; generation stops at any of `stop_ids`: eos_id and every eos_token_id of the folder's
generation_config.json (LLaMA-3.x Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>). Text
encodes and decodes exactly as transformers' fast tokenizer (`PreTrainedTokenizerFast`) does
with add_special_tokens=False (the bos/eos flags add them here) and skip_special_tokens=False,
including its clean_up_tokenization_spaces rule (transformers 5 skips it for BPE models).

`Tokenizer.train` makes a small sentencepiece model from text (the demo's tiny LLaMA and the
tests use it; real runs load Meta's 32,000-piece model or a LLaMA-3 tokenizer.json).
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path

import sentencepiece as spm

from lavin_fast.checkpoints.strict import CheckpointError, read_json
from lavin_fast.io import atomic_write
from lavin_fast.scienceqa import check_text

HF_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
HF_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions dropped.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
FORCE_BPE_CLEAN_UP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


class Tokenizer:
    """encode(text, bos, eos) -> ids and decode(ids) -> text over a sentencepiece model or a
    Hugging Face tokenizer.json (module docstring). n_words: the vocabulary (added tokens
    included); bos_id, eos_id; pad_id (None without one); stop_ids: every id generation stops at."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = next((path / name for name in ("tokenizer.model", "tokenizer.json") if (path / name).is_file()),
                        path / "tokenizer.model")
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer: no sentencepiece model or tokenizer.json at {path}")
        self.path = path
        self.sp = self.hf = None
        if path.suffix == ".json":
            self._open_hf(path)
            return
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as error:  # sentencepiece's own message: "could not parse ModelProto ..."
            raise CheckpointError(f"Tokenizer: {path} is not a sentencepiece model: {error}") from error
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"Tokenizer: {path} defines no BOS/EOS pieces (LLaMA needs both)")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.stop_ids = (self.eos_id,)

    def _open_hf(self, path: Path) -> None:
        """A tokenizer.json and the special tokens its folder names."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on a malformed file
            raise CheckpointError(f"Tokenizer: {path} is not a readable Hugging Face tokenizer.json: "
                                  f"{error}") from error
        self.n_words = self.hf.get_vocab_size(with_added_tokens=True)
        folder = path.parent
        tokens, config = _special_tokens(folder)
        for key in ("bos_token", "eos_token"):
            if tokens.get(key) is None:
                raise ValueError(f"Tokenizer: {' / '.join(HF_SPECIAL_FILES)} in {folder} name no {key} "
                                 "(LLaMA needs BOS and EOS)")
        self.bos_id, self.eos_id = (self._token_id(tokens[key], key, folder) for key in ("bos_token", "eos_token"))
        pad = tokens.get("pad_token")
        self.pad_id = None if pad is None else self._token_id(pad, "pad_token", folder)
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *_generation_eos_ids(folder, self.n_words)]))
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self.hf.model).__name__ != "BPE" or bool(config.get(FORCE_BPE_CLEAN_UP, False)))

    def _token_id(self, token: str, key: str, folder: Path) -> int:
        index = self.hf.token_to_id(token)
        if index is None:
            raise CheckpointError(f"Tokenizer: {key} {token!r} named in {folder} is not a token of {self.path}")
        return index

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}")
        check_text(text, "Tokenizer.encode")   # sentencepiece's own error says nothing of the text
        pieces = self.sp.encode(text) if self.hf is None else self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + pieces + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.hf is None:
            return self.sp.decode(ids)
        text = self.hf.decode(ids, skip_special_tokens=False)
        if self.clean_up:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

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


def _special_tokens(folder: Path) -> tuple[dict[str, str | None], dict]:
    """The bos/eos/pad token strings named in the folder's HF_SPECIAL_FILES (a string or an
    AddedToken object with its "content"), which must agree, and tokenizer_config.json itself."""
    present = [folder / name for name in HF_SPECIAL_FILES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(f"Tokenizer: {folder} has a tokenizer.json but neither {' nor '.join(HF_SPECIAL_FILES)} "
                              "naming its BOS/EOS tokens")
    tokens: dict[str, str | None] = {}
    named_in: dict[str, Path] = {}
    files = {file.name: read_json(file) for file in present}
    for file in present:
        for key in HF_SPECIAL_TOKENS:
            if key not in files[file.name]:
                continue
            token = files[file.name][key]
            if isinstance(token, Mapping):
                token = token.get("content")
            if token is not None and not isinstance(token, str):
                raise CheckpointError(f"Tokenizer: {file}: {key} should be a string, got {token!r}")
            if key in tokens and tokens[key] != token:
                raise CheckpointError(f"Tokenizer: {key} is {token!r} in {file} but {tokens[key]!r} in {named_in[key]}")
            tokens[key], named_in[key] = token, file
    return tokens, files.get("tokenizer_config.json", {})


def _generation_eos_ids(folder: Path, n_words: int) -> list[int]:
    """eos_token_id of the folder's generation_config.json (an id or a list of ids), if any."""
    file = folder / "generation_config.json"
    if not file.is_file():
        return []
    ids = read_json(file).get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_words for i in ids):
        raise CheckpointError(f"Tokenizer: {file}: eos_token_id {ids} are not ids of the {n_words}-token vocabulary")
    return ids
