"""The sentencepiece tokenizer: a tiny model trained here, LLaMA's special ids, lossless round
trips (newlines, repeated spaces, unicode never seen in training), the BOS/EOS flags, errors.

Expected values come from LLaMA's conventions (unk 0, <s> 1, </s> 2, no pad) and from UTF-8
itself (byte-fallback pieces are named after the bytes Python's str.encode gives), never from
the code under test.
"""
from __future__ import annotations

import re

import pytest
import sentencepiece as spm

from lavin_fast.checkpoints.strict import CheckpointError
from lavin_fast.tokenizer import Tokenizer

CORPUS = [
    "Question: Which of these animals is a mammal?\nContext: N/A\nOptions: (A) whale (B) shark\nResponse:",
    "The answer is A. BECAUSE: whales breathe air and feed their young with milk.",
    "Instruction: write two lines about the sea.\nResponse: The sea is wide,\nthe sea is deep.",
    "Image: N/A\nPlants need light, water and air to grow.  Two spaces here.",
    "In 2023, 17 students measured 42 leaves; the mean length was 3.5 cm.",
    "Café, naïve, façade: words borrowed from French.",
]
VOCAB = 320  # >= 3 specials + 256 byte pieces (byte fallback) + a few merges


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    return Tokenizer.train(CORPUS * 10, folder / "tokenizer.model", vocab_size=VOCAB)


def _pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.sp.id_to_piece(i) for i in ids]


def test_special_ids_are_llamas(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert _pieces(tokenizer, [0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.sp.pad_id() == -1 and tokenizer.sp.unk_id() == 0
    assert 3 + 256 < tokenizer.n_words <= VOCAB
    assert tokenizer.n_words == tokenizer.sp.get_piece_size()


@pytest.mark.parametrize("text", [
    "Question: Which of these animals is a mammal?\nContext: N/A\nOptions: (A) whale (B) shark\nResponse:",
    "multi\n\nline\ntext\n",
    "\n",
    "",
    " leading space",
    "trailing space ",
    "  two  spaces  everywhere  ",
    "tab\tseparated",
    "unicode never seen in training: 日本語, Ελληνικά, 🦙, ∑ x² ≤ ∞",
    "digits 1234567890 and 3.14159",
])
def test_round_trip_is_lossless(tokenizer, text):
    for bos in (False, True):
        for eos in (False, True):
            ids = tokenizer.encode(text, bos=bos, eos=eos)
            assert all(isinstance(i, int) and 0 <= i < tokenizer.n_words for i in ids)
            assert tokenizer.decode(ids) == text, (bos, eos, _pieces(tokenizer, ids))


def test_bos_and_eos_flags(tokenizer):
    text = "The answer is B."
    plain = tokenizer.encode(text, bos=False, eos=False)
    assert plain and 1 not in plain and 2 not in plain
    assert tokenizer.encode(text) == [1] + plain  # defaults: BOS, no EOS (LLaMA's prompt encoding)
    assert tokenizer.encode(text, bos=True, eos=True) == [1] + plain + [2]
    assert tokenizer.encode(text, bos=False, eos=True) == plain + [2]
    assert tokenizer.encode("", bos=True, eos=True) == [1, 2]
    assert tokenizer.decode([1, 2]) == ""


def test_unseen_characters_fall_back_to_utf8_bytes_never_unk(tokenizer):
    for char in ("🦙", "語", "∞"):
        ids = tokenizer.encode(char, bos=False)
        assert 0 not in ids
        expected = [f"<0x{byte:02X}>" for byte in char.encode("utf-8")]
        assert _pieces(tokenizer, ids)[-len(expected):] == expected
    # a newline is kept as a character (it is in the corpus), never dropped or normalised
    assert "\n" in "".join(_pieces(tokenizer, tokenizer.encode("a\nb", bos=False)))


def test_digits_are_split(tokenizer):
    pieces = _pieces(tokenizer, tokenizer.encode("2023", bos=False))
    assert [p.replace("\u2581", "") for p in pieces if p != "\u2581"] == ["2", "0", "2", "3"]


def test_saved_model_reloads_and_is_written_atomically(tokenizer):
    assert [p.name for p in tokenizer.path.parent.iterdir()] == ["tokenizer.model"]  # no temp file left
    again = Tokenizer(str(tokenizer.path))
    text = CORPUS[0] + " 🦙"
    assert again.encode(text, eos=True) == tokenizer.encode(text, eos=True)
    assert again.n_words == tokenizer.n_words


def test_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(TypeError, match="takes a str"):
        tokenizer.encode([1, 2, 3])
    # a sentencepiece model without BOS/EOS pieces cannot serve LLaMA
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_prefix=str(tmp_path / "nobos"), vocab_size=60,
        model_type="bpe", bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="BOS/EOS"):
        Tokenizer(tmp_path / "nobos.model")


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model", b"{\"model\": {\"type\": \"BPE\"}}"])
def test_a_file_that_is_not_sentencepiece_is_a_checkpoint_error_naming_it(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)  # empty, junk, a Hugging Face tokenizer.json by the wrong name
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + " is not a sentencepiece model"):
        Tokenizer(path)
