"""The LLaMA: its checkpoint loaders (Meta and Hugging Face folders) and the model itself.

Oracles are implementations no one here wrote, or explicit definitions written here:
- transformers' `LlamaForCausalLM` with eager attention (Hugging Face's code) for logits. The
  weights are drawn in Meta's layout, converted to Hugging Face's with the permutation of
  REFERENCE.md section 8 written here, and loaded into it; so the Meta path checks our RoPE
  against Hugging Face's and the Hugging Face path checks the loader's inverse permutation;
- transformers' own RoPE (`LlamaRotaryEmbedding`, `apply_rotary_pos_emb`);
- LaVIN's attention as an explicit L x L boolean mask with a float64 softmax;
- for KV-cache decoding, the same model's full forward (a different code path: SDPA over the
  whole sequence, against chunks attending to a cache with a bottom-right causal mask).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lavin_fast.checkpoints.llama import LlamaSource, load_llama, load_llama_weights, open_llama, save_llama
from lavin_fast.checkpoints.strict import CheckpointError
from lavin_fast.models.attention import attention, isolated_first_attention
from lavin_fast.models.llama import LlamaConfig, RopeScaling, Transformer, apply_rope, rope_angles, rope_frequencies

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB, HIDDEN = 100, 96
# Meta's FFN rule gives HIDDEN: int(2 * 4 * 64 / 3) = 170, int(0.5 * 170) = 85, 32 * ceil(85 / 32) = 96.
BASE = dict(dim=64, n_layers=3, n_heads=4, multiple_of=32, ffn_dim_multiplier=0.5, norm_eps=1e-5, vocab_size=VOCAB)
CONFIGS = {
    "mha": BASE,
    "gqa": {**BASE, "n_kv_heads": 2},
    "mqa-theta": {**BASE, "n_kv_heads": 1, "rope_theta": 500000.0},
}
# Meta's model-parallel layout (REFERENCE.md section 8), written here independently of the loader.
ROW_SPLIT = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
COL_SPLIT = ("attention.wo", "feed_forward.w2", "tok_embeddings")


# ---- weights in Meta's layout, and their Hugging Face twin ---------------------------------------

def _meta_weights(params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Meta's names, scaled for O(1) activations; RMSNorm weights far from 1
    so that a dropped or swapped norm changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    dim, heads = params["dim"], params["n_heads"]
    kv_heads, head_dim = params.get("n_kv_heads") or heads, params.get("head_dim", dim // heads)

    def weight(rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    def norm() -> torch.Tensor:
        return 1 + 0.3 * torch.randn(dim, generator=gen)

    state = {"tok_embeddings.weight": torch.randn(VOCAB, dim, generator=gen)}
    for n in range(params["n_layers"]):
        state.update({
            f"layers.{n}.attention.wq.weight": weight(heads * head_dim, dim, 2.0),  # peaky attention: RoPE matters
            f"layers.{n}.attention.wk.weight": weight(kv_heads * head_dim, dim),
            f"layers.{n}.attention.wv.weight": weight(kv_heads * head_dim, dim),
            f"layers.{n}.attention.wo.weight": weight(dim, heads * head_dim),
            f"layers.{n}.feed_forward.w1.weight": weight(HIDDEN, dim),
            f"layers.{n}.feed_forward.w2.weight": weight(dim, HIDDEN),
            f"layers.{n}.feed_forward.w3.weight": weight(HIDDEN, dim),
            f"layers.{n}.attention_norm.weight": norm(),
            f"layers.{n}.ffn_norm.weight": norm(),
        })
    state["norm.weight"] = norm()
    state["output.weight"] = weight(VOCAB, dim)
    return state


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> Hugging Face rows of q/k (REFERENCE.md section 8, transformers' conversion)."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_config(params: dict, **extra):
    return transformers.LlamaConfig(
        hidden_size=params["dim"], num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"], vocab_size=VOCAB,
        intermediate_size=HIDDEN, rms_norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=64, attn_implementation="eager", **extra)


def _hf_state(meta: dict[str, torch.Tensor], params: dict, tied: bool = False) -> dict[str, torch.Tensor]:
    heads = params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    hf = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = meta["output.weight"]
    for n in range(params["n_layers"]):
        src, dst = f"layers.{n}.", f"model.layers.{n}."
        hf.update({
            dst + "self_attn.q_proj.weight": _permute(meta[src + "attention.wq.weight"], heads),
            dst + "self_attn.k_proj.weight": _permute(meta[src + "attention.wk.weight"], kv_heads),
            dst + "self_attn.v_proj.weight": meta[src + "attention.wv.weight"],
            dst + "self_attn.o_proj.weight": meta[src + "attention.wo.weight"],
            dst + "mlp.gate_proj.weight": meta[src + "feed_forward.w1.weight"],
            dst + "mlp.up_proj.weight": meta[src + "feed_forward.w3.weight"],
            dst + "mlp.down_proj.weight": meta[src + "feed_forward.w2.weight"],
            dst + "input_layernorm.weight": meta[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": meta[src + "ffn_norm.weight"],
        })
    return {key: value.contiguous() for key, value in hf.items()}


def _hf_model(meta: dict[str, torch.Tensor], params: dict, tied: bool = False):
    model = transformers.LlamaForCausalLM(_hf_config(params, tie_word_embeddings=tied))
    missing, unexpected = model.load_state_dict(_hf_state(meta, params, tied), strict=False)
    # a tied lm_head is not a key of its own in every transformers version
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    return model.eval()


def _tokens(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def _logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def _assert_state_equals(model: Transformer, meta: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == meta.keys()
    for key, value in meta.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def _write_meta(folder: Path, meta: dict[str, torch.Tensor], params: dict, shards: int) -> Path:
    """Meta's layout: the row-split and column-split weights cut into `shards` equal pieces,
    norms replicated, LLaMA-1's rope.freqs buffer in every shard."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for rank in range(shards):
        shard = {}
        for key, value in meta.items():
            name = re.sub(r"^layers\.\d+\.", "", key).removesuffix(".weight")
            if name in ROW_SPLIT:
                value = value.chunk(shards, dim=0)[rank]
            elif name in COL_SPLIT:
                value = value.chunk(shards, dim=1)[rank]
            shard[key] = value.clone()  # a view would save the whole storage
        shard["rope.freqs"] = torch.randn(8)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder


def _mapped_from(tensor: torch.Tensor, file: Path) -> bool:
    """Whether tensor's memory lies in a mapping of `file` (Linux /proc/self/maps)."""
    target = str(file.resolve())
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= tensor.data_ptr() < high:
                    return True
    return False


# ---- Hugging Face folders ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_folder_matches_transformers(tmp_path, name):
    params = CONFIGS[name]
    meta = _meta_weights(params, seed=1)
    hf = _hf_model(meta, params)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    ours = load_llama(tmp_path, max_seq_len=64)
    assert ours.config.kv_heads == (params.get("n_kv_heads") or 4)
    assert ours.config.rope_theta == params.get("rope_theta", 10000.0) and ours.config.max_seq_len == 64
    _assert_state_equals(ours, meta)  # q/k rows back in Meta's order, exactly
    tokens = _tokens()
    expected = _hf_logits(hf, tokens)
    torch.testing.assert_close(_logits(ours, tokens), expected, **TOL)


def test_logits_test_tells_rope_layouts_and_theta_apart(tmp_path):
    """The logits comparison is sharp enough to catch q/k left in Hugging Face's row order, or
    a rope_theta that was not read."""
    params = CONFIGS["mqa-theta"]
    meta = _meta_weights(params, seed=1)
    hf = _hf_model(meta, params)
    hf.save_pretrained(tmp_path)
    tokens = _tokens()
    expected = _hf_logits(hf, tokens)

    wrong_order = load_llama(tmp_path)
    with torch.no_grad():
        for layer in wrong_order.layers:
            layer.attention.wq.weight.copy_(_permute(layer.attention.wq.weight, 4))
            layer.attention.wk.weight.copy_(_permute(layer.attention.wk.weight, 1))
    assert (_logits(wrong_order, tokens) - expected).abs().max() > 1e-2

    wrong_theta = load_llama(tmp_path)
    wrong_theta.config.rope_theta = 10000.0
    assert (_logits(wrong_theta, tokens) - expected).abs().max() > 1e-2


def test_hf_sharded_safetensors_and_pytorch_bin(tmp_path):
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=2)
    hf = _hf_model(meta, params)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard_files = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shard_files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens = _tokens(1)
    expected = _hf_logits(hf, tokens)
    sharded = load_llama(tmp_path / "sharded")
    _assert_state_equals(sharded, meta)
    torch.testing.assert_close(_logits(sharded, tokens), expected, **TOL)

    # pytorch_model.bin, whole and sharded with its index (older hub folders)
    state = _hf_state(meta, params)
    keys = sorted(state)
    single, split = tmp_path / "bin", tmp_path / "bin-sharded"
    for folder in (single, split):
        folder.mkdir()
        shutil.copy(tmp_path / "sharded" / "config.json", folder / "config.json")
    torch.save(state, single / "pytorch_model.bin")
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for file, part in halves.items():
        torch.save({key: state[key] for key in part}, split / file)
    (split / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {key: file for file, part in halves.items() for key in part}}))
    for folder in (single, split):
        _assert_state_equals(load_llama(folder), meta)


def test_hf_tied_embeddings(tmp_path):
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=3)
    meta["tok_embeddings.weight"] /= 8  # as the head it must give O(1) logits, like the untied head's
    meta["output.weight"] = meta["tok_embeddings.weight"].clone()
    hf = _hf_model(meta, params, tied=True)
    hf.save_pretrained(tmp_path / "tied")
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")  # saved once
    ours = load_llama(tmp_path / "tied")
    _assert_state_equals(ours, meta)
    tokens = _tokens(2)
    torch.testing.assert_close(_logits(ours, tokens), _hf_logits(hf, tokens), **TOL)

    # an explicit lm_head next to tied embeddings: accepted when it is the same matrix, else refused
    state = load_file(tmp_path / "tied" / "model.safetensors")
    for case, head in [("same", state["model.embed_tokens.weight"].clone()),
                       ("different", meta["tok_embeddings.weight"] + 1)]:
        folder = tmp_path / case
        folder.mkdir()
        shutil.copy(tmp_path / "tied" / "config.json", folder / "config.json")
        save_file({**state, "lm_head.weight": head}, folder / "model.safetensors")
        if case == "same":
            _assert_state_equals(load_llama(folder), meta)
        else:
            with pytest.raises(CheckpointError, match="lm_head.weight differs"):
                load_llama(folder)
    # untied config without lm_head: missing
    folder = tmp_path / "untied"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): lm_head\.weight"):
        load_llama(folder)


def test_dtype_kept_or_converted(tmp_path):
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=4)
    hf = _hf_model(meta, params)
    hf.half().save_pretrained(tmp_path / "fp16")
    kept = load_llama(tmp_path / "fp16")
    assert {p.dtype for p in kept.parameters()} == {torch.float16}
    _assert_state_equals(kept, {k: v.half() for k, v in meta.items()})

    _hf_model(meta, params).save_pretrained(tmp_path / "fp32")
    for folder in (tmp_path / "fp32", _write_meta(tmp_path / "meta", meta, params, shards=2)):
        bf16 = load_llama(folder, dtype=torch.bfloat16)
        _assert_state_equals(bf16, {k: v.to(torch.bfloat16) for k, v in meta.items()})
        assert bf16(_tokens()).dtype == torch.float32  # logits are fp32 whatever the weights
    with pytest.raises(ValueError, match="floating point"):
        load_llama(tmp_path / "fp32", dtype=torch.int8)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_weights_are_memory_mapped_not_copied(tmp_path):
    """Tensors taken as they are stay in the file's mapping (no copy in RAM); q/k of a Hugging
    Face file are un-permuted, hence new tensors."""
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=5)
    _hf_model(meta, params).save_pretrained(tmp_path / "hf")
    _write_meta(tmp_path / "meta", meta, params, shards=1)
    hf = load_llama(tmp_path / "hf").state_dict()
    one = load_llama(tmp_path / "meta").state_dict()
    hf_file, meta_file = tmp_path / "hf" / "model.safetensors", tmp_path / "meta" / "consolidated.00.pth"
    for key in ("tok_embeddings.weight", "layers.1.feed_forward.w2.weight", "layers.0.attention.wv.weight",
                "norm.weight", "output.weight"):
        assert _mapped_from(hf[key], hf_file), key
        assert _mapped_from(one[key], meta_file), key
    assert not _mapped_from(hf["layers.0.attention.wq.weight"], hf_file)
    assert _mapped_from(one["layers.0.attention.wq.weight"], meta_file)


# ---- Meta folders --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shards, vocab", [("mha", 1, VOCAB), ("gqa", 2, -1), ("mqa-theta", 1, -1),
                                                  ("mha", 4, -1)])
def test_meta_folder_matches_transformers(tmp_path, name, shards, vocab):
    params = CONFIGS[name]
    meta = _meta_weights(params, seed=6)
    folder = _write_meta(tmp_path, meta, {**params, "vocab_size": vocab}, shards)
    ours = load_llama(folder)
    assert ours.config.vocab_size == VOCAB and ours.config.ffn_hidden == HIDDEN
    _assert_state_equals(ours, meta)
    tokens = _tokens(3)
    torch.testing.assert_close(_logits(ours, tokens), _hf_logits(_hf_model(meta, params), tokens), **TOL)


def _meta_case(tmp_path: Path, shards: int = 2) -> tuple[Path, dict]:
    params = CONFIGS["gqa"]
    return _write_meta(tmp_path / "good", _meta_weights(params, seed=7), params, shards), params


def _edit_shard(folder: Path, rank: int, edit) -> None:
    file = folder / f"consolidated.{rank:02d}.pth"
    shard = torch.load(file, weights_only=True)
    edit(shard)
    torch.save(shard, file)


@pytest.mark.parametrize("rank, edit, named", [
    (1, lambda sd: sd.pop("layers.2.feed_forward.w3.weight"),
     "consolidated.01.pth (2 of 2; shapes per shard) does not match the model: missing keys (1): "
     "layers.2.feed_forward.w3.weight"),
    (0, lambda sd: sd.__setitem__("layers.0.attention.bq", torch.zeros(32)),
     "unexpected keys (1): layers.0.attention.bq"),
    (0, lambda sd: sd.__setitem__("layers.3.ffn_norm.weight", torch.ones(64)),
     "unexpected keys (1): layers.3.ffn_norm.weight"),
    (1, lambda sd: sd.__setitem__("layers.1.attention.wk.weight", torch.zeros(32, 64)),
     "consolidated.01.pth (2 of 2; shapes per shard) does not match the model: mismatched shapes (1): "
     "layers.1.attention.wk.weight: "
     "checkpoint (32, 64) vs model (16, 64)"),
    (0, lambda sd: sd.__setitem__("norm.weight", torch.ones(32)), "norm.weight: checkpoint (32,)"),
    (1, lambda sd: sd["layers.1.ffn_norm.weight"].add_(1e-3), "layers.1.ffn_norm.weight is replicated"),
])
def test_meta_miskeyed_shards_fail_naming_key_and_file(tmp_path, rank, edit, named):
    folder, _ = _meta_case(tmp_path)
    _edit_shard(folder, rank, edit)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_llama(folder)


def test_meta_bad_folders_and_params(tmp_path):
    folder, params = _meta_case(tmp_path)

    def attempt(match: str, params_edit: dict | None = None, remove: tuple[str, ...] = ()):
        case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, case)
        if params_edit is not None:
            (case / "params.json").write_text(json.dumps({**params, **params_edit}))
        for name in remove:
            (case / name).unlink()
        with pytest.raises(CheckpointError, match=match):
            load_llama(case)

    attempt(re.escape("unknown keys ['moe_experts']"), {"moe_experts": 8})
    attempt(re.escape("unexpected keys (9): layers.2."), {"n_layers": 2})  # the checkpoint has 3
    attempt(re.escape("missing keys (9): layers.3."), {"n_layers": 4})
    # Meta's rule without the multiplier gives 192 hidden, 96 per shard
    attempt(re.escape("layers.0.feed_forward.w1.weight: checkpoint (48, 64) vs model (96, 64)"),
            {"ffn_dim_multiplier": None})
    attempt("no consolidated.NN.pth", remove=("consolidated.00.pth", "consolidated.01.pth"))
    attempt(re.escape("shards [1] are not numbered 0..0"), remove=("consolidated.00.pth",))
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    (gap / "consolidated.01.pth").rename(gap / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=re.escape("shards [0, 2]")):
        load_llama(gap)
    bad_params = tmp_path / "bad-params"
    bad_params.mkdir()
    (bad_params / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="params.json is not readable JSON"):
        load_llama(bad_params)



@pytest.mark.parametrize("edit, named", [
    ({"dim": "64"}, "dim '64' (expected an integer)"),
    ({"n_heads": 4.7}, "n_heads 4.7 (expected an integer)"),
    ({"n_layers": 3.0}, "n_layers 3.0 (expected an integer)"),
    ({"multiple_of": True}, "multiple_of True (expected an integer)"),
    ({"n_kv_heads": "2"}, "n_kv_heads '2' (expected an integer or null)"),
    ({"vocab_size": [100]}, "vocab_size [100] (expected an integer)"),
    ({"norm_eps": "1e-5"}, "norm_eps '1e-5' (expected a number)"),
    ({"rope_theta": None}, "rope_theta None (expected a number)"),
    ({"ffn_dim_multiplier": "1.5"}, "ffn_dim_multiplier '1.5' (expected a number or null)"),
])
def test_meta_params_of_the_wrong_json_type_are_refused(tmp_path, edit, named):
    """params.json sizes are JSON integers: "64" or 4.7 is a damaged file, never coerced."""
    folder, params = _meta_case(tmp_path)
    (folder / "params.json").write_text(json.dumps({**params, **edit}))
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "params.json")) + ".*" + re.escape(named)):
        load_llama(folder)


def test_integer_weights_are_refused_naming_file_and_key(tmp_path, hf_folder):
    """Meta shards, Hugging Face safetensors and pytorch_model.bin: integer weights would be
    converted into other numbers (or break the forward); refused at open, with or without dtype."""
    folder, _ = _meta_case(tmp_path / "meta")
    _edit_shard(folder, 1, lambda sd: sd.__setitem__("layers.2.ffn_norm.weight", sd["layers.2.ffn_norm.weight"].long()))
    state = load_file(hf_folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].to(torch.int8)
    st = _hf_attempt(hf_folder, tmp_path / "st", state=state)
    pt = _hf_attempt(hf_folder, tmp_path / "pt", state=state)
    (pt / "model.safetensors").unlink()
    torch.save(state, pt / "pytorch_model.bin")
    for path, file, named in [(folder, "consolidated.01.pth", "layers.2.ffn_norm.weight (torch.int64)"),
                              (st, "model.safetensors", "model.layers.1.mlp.up_proj.weight (I8)"),
                              (pt, "pytorch_model.bin", "model.layers.1.mlp.up_proj.weight (torch.int8)")]:
        for dtype in (None, torch.float32):
            with pytest.raises(CheckpointError, match=re.escape(str(path / file)) + ".*not floating point: "
                               + re.escape(named)):
                load_llama(path, dtype=dtype)

# ---- Hugging Face strictness and configurations --------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    params = CONFIGS["gqa"]
    _hf_model(_meta_weights(params, seed=8), params).save_pretrained(folder)
    return folder


def _hf_attempt(base: Path, target: Path, state: dict | None = None, config: dict | None = None) -> Path:
    target.mkdir()
    save_file(state if state is not None else load_file(base / "model.safetensors"), target / "model.safetensors")
    raw = json.loads((base / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config if config is not None else raw))
    return target


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing keys (1): model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.pop("model.norm.weight"), "missing keys (1): model.norm.weight"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(16)),
     "unexpected keys (1): model.layers.0.self_attn.q_norm.weight"),
    (lambda sd: sd.__setitem__("model.layers.3.input_layernorm.weight", torch.ones(64)),
     "unexpected keys (1): model.layers.3.input_layernorm.weight"),
    (lambda sd: sd.__setitem__("model.layers.2.self_attn.k_proj.weight", torch.zeros(64, 64)),
     "mismatched shapes (1): model.layers.2.self_attn.k_proj.weight: checkpoint (64, 64) vs model (32, 64)"),
    (lambda sd: sd.__setitem__("model.embed_tokens.weight", torch.zeros(101, 64)),
     "model.embed_tokens.weight: checkpoint (101, 64)"),
])
def test_hf_miskeyed_checkpoints_fail_naming_the_key(hf_folder, tmp_path, edit, named):
    state = load_file(hf_folder / "model.safetensors")
    edit(state)
    folder = _hf_attempt(hf_folder, tmp_path / "bad", state=state)
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "model.safetensors")) + ".*" + re.escape(named)):
        load_llama(folder)


def test_hf_old_rotary_buffers_are_ignored(hf_folder, tmp_path):
    state = load_file(hf_folder / "model.safetensors")
    extra = {f"model.layers.{n}.self_attn.rotary_emb.inv_freq": torch.ones(8) for n in range(3)}
    folder = _hf_attempt(hf_folder, tmp_path / "old", state={**state, **extra})
    reference = load_llama(hf_folder).state_dict()
    for key, value in load_llama(folder).state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_hf_sharded_errors_name_the_file(hf_folder, tmp_path):
    shutil.copytree(hf_folder, tmp_path / "src")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    state = load_file(tmp_path / "sharded" / file)
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(state, tmp_path / "sharded" / file)
    with pytest.raises(CheckpointError, match=re.escape(f"model.layers.1.mlp.down_proj.weight in {file}")):
        load_llama(tmp_path / "sharded")

    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = file  # the index names a key no file holds
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape("model.layers.9.mlp.up_proj.weight (index: " + file)):
        load_llama(tmp_path / "sharded")
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00099-of-00099.safetensors"
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00099-of-00099.safetensors, which does not exist"):
        load_llama(tmp_path / "sharded")


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling of type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0}},
     "rope_parameters of type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}},
     re.escape("missing ['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings']")),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "attention_factor": 0.5}},
     re.escape("unknown keys ['attention_factor'] (not implemented)")),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "factor must be positive"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta": 500000.0},
     "rope_theta 500000.0 disagrees"),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"mlp_bias": True}, "mlp_bias is true"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 32}, re.escape("q_proj.weight: checkpoint (64, 64) vs model (128, 64)")),
    ({"num_hidden_layers": 2}, re.escape("unexpected keys (9): model.layers.2.")),
    ({"intermediate_size": 64}, re.escape("mlp.down_proj.weight: checkpoint (64, 96) vs model (64, 64)")),
    ({"num_key_value_heads": 4}, re.escape("k_proj.weight: checkpoint (32, 64) vs model (64, 64)")),
])
def test_hf_unsupported_or_wrong_configs_fail(hf_folder, tmp_path, change, match):
    raw = json.loads((hf_folder / "config.json").read_text())
    folder = _hf_attempt(hf_folder, tmp_path / "bad", config={**raw, **change})
    with pytest.raises(CheckpointError, match=match):
        load_llama(folder)


def test_hf_config_layouts_of_transformers_4_and_5(hf_folder, tmp_path):
    """transformers 4.x writes rope_theta and rope_scaling: null; 5.x writes rope_parameters."""
    raw = json.loads((hf_folder / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.pop("rope_theta", None)
    old = _hf_attempt(hf_folder, tmp_path / "v4", config={**raw, "rope_theta": 250000.0, "rope_scaling": None})
    assert load_llama(old).config.rope_theta == 250000.0
    new = _hf_attempt(hf_folder, tmp_path / "v5",
                      config={**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}})
    assert load_llama(new).config.rope_theta == 250000.0
    neither = _hf_attempt(hf_folder, tmp_path / "default", config=raw)
    assert load_llama(neither).config.rope_theta == 10000.0


def test_paths_that_are_neither_format(hf_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_llama(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Meta LLaMA folder"):
        load_llama(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="is a file"):
        load_llama(hf_folder / "model.safetensors")
    both = tmp_path / "both"
    shutil.copytree(hf_folder, both)
    (both / "params.json").write_text(json.dumps(BASE))
    with pytest.raises(CheckpointError, match="both params.json"):
        load_llama(both)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(hf_folder / "config.json", no_weights / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_llama(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a state dict"):
        load_llama(no_weights)


# ---- RoPE scaling: LLaMA-3.1 / 3.2 ("llama3") and "linear" ----------------------------------------

# head_dim 16, theta 500000: wavelengths 6.3, 32.5, 168, ... so with an original context of 64
# (high/low frequency bounds 16 and 64) the first pair is kept, the second blended, the rest scaled.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
SCALINGS = {"llama3": LLAMA3_SCALING, "linear": {"rope_type": "linear", "factor": 4.0}}
LONG = 80  # positions past original_max_position_embeddings


def _hf_scaled_model(meta: dict[str, torch.Tensor], params: dict, scaling: dict, tied: bool = False):
    config = _hf_config(params, tie_word_embeddings=tied)
    config.max_position_embeddings = 256
    config.rope_parameters = {**scaling, "rope_theta": params["rope_theta"]}
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(_hf_state(meta, params, tied), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("kind", [None, "linear", "llama3"])
def test_rope_frequencies_equal_transformers_bit_for_bit(kind, theta):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    spec = {"rope_type": "default"} if kind is None else SCALINGS[kind]
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                                      rope_parameters={**spec, "rope_theta": theta})
    expected = LlamaRotaryEmbedding(config).inv_freq
    scaling = None if kind is None else RopeScaling(kind, **{k: v for k, v in spec.items() if k != "rope_type"})
    torch.testing.assert_close(rope_frequencies(16, theta, scaling), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind, tied", [("llama3", True), ("linear", False)])
def test_hf_rope_scaling_matches_transformers_past_the_original_context(tmp_path, kind, tied):
    """A LLaMA-3.2-style folder (llama3 scaling, rope_theta 500000, tied head, grouped kv heads)
    and a linearly scaled one give transformers' logits at positions 0..79, past the original 64."""
    params = {**CONFIGS["gqa"], "rope_theta": 500000.0}
    meta = _meta_weights(params, seed=11)
    if tied:
        meta["tok_embeddings.weight"] /= 8
        meta["output.weight"] = meta["tok_embeddings.weight"].clone()
    hf = _hf_scaled_model(meta, params, SCALINGS[kind], tied)
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = load_llama(tmp_path / "hf", max_seq_len=LONG)
    assert ours.config.rope_scaling.kind == kind and ours.config.rope_theta == 500000.0
    _assert_state_equals(ours, meta)
    tokens = _tokens(4, length=LONG)
    expected = _hf_logits(hf, tokens)
    torch.testing.assert_close(_logits(ours, tokens), expected, **TOL)

    # transformers 4.x's layout of the same config: rope_theta beside rope_scaling with "type"
    old = {key: value for key, value in raw.items() if key != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={**{k: v for k, v in SCALINGS[kind].items() if k != "rope_type"},
                                                  "type": kind})
    v4 = _hf_attempt(tmp_path / "hf", tmp_path / "v4", config=old)
    assert load_llama(v4, max_seq_len=LONG).config == ours.config

    # the comparison is sharp: the same weights without the scaling are far off
    unscaled = load_llama(tmp_path / "hf", max_seq_len=LONG)
    unscaled.config.rope_scaling = None
    assert (_logits(unscaled, tokens) - expected).abs().max() > 1e-2


def test_hf_explicit_head_dim_matches_transformers(tmp_path):
    """head_dim 32 with hidden_size 64 and 4 heads: q/k/v/o are [128, 64] / [64, 128]."""
    params = {**CONFIGS["gqa"], "head_dim": 32}
    meta = _meta_weights(params, seed=13)
    hf = transformers.LlamaForCausalLM(_hf_config(params, head_dim=32))
    hf.load_state_dict(_hf_state(meta, params))
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = load_llama(tmp_path / "hf")
    assert ours.config.head_dim == 32 and ours.layers[0].attention.wq.weight.shape == (128, 64)
    _assert_state_equals(ours, meta)
    tokens = _tokens(6)
    torch.testing.assert_close(_logits(ours, tokens), _hf_logits(hf, tokens), **TOL)
    with pytest.raises(ValueError, match="head_dim 32 is not dim / n_heads"):
        save_llama(ours, tmp_path / "meta")
    # head_dim equal to hidden_size / heads (LLaMA-3.2's config.json states it) is the plain model
    plain = CONFIGS["gqa"]
    transformers.LlamaForCausalLM(_hf_config(plain, head_dim=16)).save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["head_dim"] == 16
    config = load_llama(tmp_path / "plain").config
    assert config.explicit_head_dim is None and config.head_dim == 16


def test_meta_use_scaled_rope_is_llama31_scaling(tmp_path):
    """params.json of LLaMA-3.1 (use_scaled_rope, rope_theta 500000) gives transformers' logits
    with the llama3 scaling Hugging Face's conversion writes for it (factor 8, 1, 4, 8192)."""
    params = {**CONFIGS["gqa"], "rope_theta": 500000.0}
    meta = _meta_weights(params, seed=12)
    folder = _write_meta(tmp_path / "meta", meta, {**params, "use_scaled_rope": True}, shards=2)
    ours = load_llama(folder, max_seq_len=LONG)
    assert ours.config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    hf = _hf_scaled_model(meta, params, {**LLAMA3_SCALING, "original_max_position_embeddings": 8192})
    tokens = _tokens(5, length=LONG)
    torch.testing.assert_close(_logits(ours, tokens), _hf_logits(hf, tokens), **TOL)
    # and it is written back as use_scaled_rope
    again = load_llama(save_llama(ours, tmp_path / "saved"), max_seq_len=LONG)
    assert json.loads((tmp_path / "saved" / "params.json").read_text())["use_scaled_rope"] is True
    assert again.config == ours.config
    ours.config.rope_scaling = RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="params.json cannot express it"):
        save_llama(ours, tmp_path / "linear")

    # Meta's rope_scaling_factor / rope_high_freq_factor (LLaMA-3.2's factor 32, as Hugging Face's
    # config says) against transformers with the same numbers
    folder = _write_meta(tmp_path / "meta32", meta, {**params, "use_scaled_rope": True, "rope_scaling_factor": 32.0,
                                                     "rope_high_freq_factor": 2.0}, shards=1)
    ours = load_llama(folder, max_seq_len=LONG)
    assert ours.config.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 2.0, 8192)
    hf = _hf_scaled_model(meta, params, {**LLAMA3_SCALING, "factor": 32.0, "high_freq_factor": 2.0,
                                         "original_max_position_embeddings": 8192})
    torch.testing.assert_close(_logits(ours, tokens), _hf_logits(hf, tokens), **TOL)
    again = load_llama(save_llama(ours, tmp_path / "saved32"), max_seq_len=LONG)
    assert again.config == ours.config


# ---- LlamaSource: reading parameters whole or in slices ------------------------------------------

def _cuts(size: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, length) slices of a dim of `size`: whole, halves, the last `align` rows and,
    unaligned, pieces that start, end or straddle anywhere (across Meta's shard boundaries)."""
    cuts = {(0, size), (0, size // 2), (size // 2, size - size // 2), (size - align, align)}
    if align == 1:
        cuts |= {(3, size // 2), (size // 4 + 1, size // 4), (size // 3, 1), (1, size - 2)}
    elif 3 * align <= size:
        cuts.add((align, 2 * align))
    return sorted(cuts)


def _save_hf_folder(folder: Path, meta: dict[str, torch.Tensor], params: dict, tied: bool = False,
                    **save_kwargs) -> Path:
    _hf_model(meta, params, tied=tied).save_pretrained(folder, **save_kwargs)
    return folder


def _tied(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with the head tied to the embedding (scaled for O(1) logits)."""
    embeddings = meta["tok_embeddings.weight"] / 8
    return {**meta, "tok_embeddings.weight": embeddings, "output.weight": embeddings.clone()}


@pytest.mark.parametrize("layout", ["meta-1", "meta-2", "meta-4", "hf", "hf-sharded-tied"])
def test_source_reads_slices_equal_slices_of_the_full_tensors(tmp_path, layout):
    """Every parameter, every dim, many slices: equal (exactly) to the slice of the true weight.
    Meta: slices inside one shard, across shard boundaries, and along the other dim; Hugging
    Face: q/k rows (GQA: 4 q heads, 2 kv heads) un-permuted per head-aligned slice."""
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=9)
    if layout.startswith("meta"):
        folder = _write_meta(tmp_path, meta, params, shards=int(layout[-1]))
    elif layout == "hf":
        folder = _save_hf_folder(tmp_path, meta, params)
    else:
        meta = _tied(meta)
        folder = _save_hf_folder(tmp_path, meta, params, tied=True, max_shard_size="20KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 2
    source = open_llama(folder, max_seq_len=48)
    assert isinstance(source, LlamaSource) and str(folder) in source.source
    assert source.config.kv_heads == 2 and source.config.max_seq_len == 48
    assert source.shapes == {key: tuple(value.shape) for key, value in meta.items()}
    head_dim, permuted = params["dim"] // params["n_heads"], layout.startswith("hf")
    for key, full in meta.items():
        torch.testing.assert_close(source.read(key), full, rtol=0, atol=0, msg=key)
        for dim in range(full.dim()):
            align = head_dim if permuted and dim == 0 and re.search(r"\.w[qk]\.", key) else 1
            for start, length in _cuts(full.shape[dim], align):
                torch.testing.assert_close(source.read(key, dim, start, length), full.narrow(dim, start, length),
                                           rtol=0, atol=0, msg=f"{key} dim {dim} [{start}, {start + length})")
            # length defaults to the end; negative dims count from the last
            torch.testing.assert_close(source.read(key, dim - full.dim(), align), full.narrow(dim, align,
                                       full.shape[dim] - align), rtol=0, atol=0, msg=key)
    converted = source.read("layers.2.attention.wk.weight", 0, head_dim, head_dim, dtype=torch.bfloat16)
    assert converted.dtype == torch.bfloat16
    torch.testing.assert_close(converted, meta["layers.2.attention.wk.weight"][head_dim:].bfloat16(), rtol=0, atol=0)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_source_slices_stay_in_the_file_mapping(tmp_path):
    """A slice that one file holds as it is comes back as a view of that file's mapping: a Meta
    slice inside one shard (either dim), a Hugging Face slice of anything but q/k."""
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=12)
    meta_source = open_llama(_write_meta(tmp_path / "meta", meta, params, shards=2))
    second, first = tmp_path / "meta" / "consolidated.01.pth", tmp_path / "meta" / "consolidated.00.pth"
    assert _mapped_from(meta_source.read("layers.0.attention.wq.weight", 0, 40, 16), second)  # rows 32..63
    assert _mapped_from(meta_source.read("layers.1.feed_forward.w2.weight", 1, 0, 48), first)  # columns 0..47
    assert _mapped_from(meta_source.read("layers.2.ffn_norm.weight", 0, 8, 8), first)  # replicated
    # pieces of both shards, joined: a new tensor
    assert not _mapped_from(meta_source.read("layers.1.feed_forward.w2.weight", 1, 40, 16), first)
    assert not _mapped_from(meta_source.read("layers.1.feed_forward.w2.weight", 0, 8, 8), first)
    hf_source = open_llama(_save_hf_folder(tmp_path / "hf", meta, params))
    file = tmp_path / "hf" / "model.safetensors"
    for key in ("layers.0.attention.wv.weight", "tok_embeddings.weight", "layers.2.feed_forward.w2.weight"):
        assert _mapped_from(hf_source.read(key, 0, 16, 16), file), key
        assert _mapped_from(hf_source.read(key, 1, 16, 16), file), key
    assert not _mapped_from(hf_source.read("layers.0.attention.wq.weight", 0, 16, 16), file)  # un-permuted


def test_source_read_refuses_bad_slices(hf_folder):
    source = open_llama(hf_folder)
    for key, start, length in [("layers.0.attention.wq.weight", 8, 16), ("layers.0.attention.wq.weight", 16, 24),
                               ("layers.1.attention.wk.weight", 0, 8), ("layers.1.attention.wk.weight", 4, 16)]:
        with pytest.raises(ValueError, match=re.escape(f"rows [{start}, {start + length})") + ".*head boundary"):
            source.read(key, 0, start, length)
    torch.testing.assert_close(source.read("layers.0.attention.wq.weight", 1, 5, 7),
                               source.read("layers.0.attention.wq.weight")[:, 5:12], rtol=0, atol=0)  # any columns
    with pytest.raises(ValueError, match=re.escape("[60, 68) on dim 0 is outside its size 64")):
        source.read("norm.weight", 0, 60, 8)
    with pytest.raises(ValueError, match="dim 2 out of range"):
        source.read("output.weight", 2, 0, 1)
    with pytest.raises(ValueError, match="need a dim"):
        source.read("norm.weight", start=3)
    with pytest.raises(KeyError, match="layers.3.ffn_norm.weight"):
        source.read("layers.3.ffn_norm.weight")


# ---- load_llama_weights: adapters attached, tensor parallelism -----------------------------------

def _linear_adapters(dim: int, n_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in adapters (near-identity Linear maps in each layer's adapter slot): parameters
    whose names hold "adapter", which no LLaMA checkpoint has."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for n in range(n_layers):
        state[f"layers.{n}.adapter_attn.weight"] = torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=gen)
        state[f"layers.{n}.adapter_attn.bias"] = 0.1 * torch.randn(dim, generator=gen)
    return state


class _LinearAdapter(torch.nn.Linear):
    """A Linear map in an adapter slot, on the MMAdapter contract: the routing arguments are
    taken and unused."""

    last_routing = None

    def forward(self, x, weights=None, routing_index=None, *, first=None):
        return super().forward(x)


def _attach_adapters(model: Transformer, adapters: dict[str, torch.Tensor]) -> None:
    for n, layer in enumerate(model.layers):
        layer.adapter_attn = _LinearAdapter(model.config.dim, model.config.dim, device="cpu")
        layer.adapter_attn.load_state_dict({"weight": adapters[f"layers.{n}.adapter_attn.weight"],
                                            "bias": adapters[f"layers.{n}.adapter_attn.bias"]})


def test_load_llama_weights_leaves_attached_adapters_alone(tmp_path):
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=10)
    source = open_llama(_write_meta(tmp_path / "meta", meta, params, shards=2), max_seq_len=64)
    adapters = _linear_adapters(params["dim"], params["n_layers"])
    with torch.device("meta"):
        model = Transformer(source.config)
    _attach_adapters(model, adapters)
    load_llama_weights(model, source, dtype=torch.bfloat16)
    state = model.state_dict()
    assert state.keys() == meta.keys() | adapters.keys()
    for key, value in meta.items():
        torch.testing.assert_close(state[key], value.bfloat16(), rtol=0, atol=0, msg=key)
    for key, value in adapters.items():  # untouched: fp32, the values they had
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    tokens = _tokens(4)
    reference = load_llama(tmp_path / "meta", dtype=torch.bfloat16)
    _attach_adapters(reference, adapters)
    reference.to(torch.bfloat16)
    model.to(torch.bfloat16)
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens), rtol=0, atol=0)

    with torch.device("meta"):  # strict: a model of another shape is refused, naming the keys
        smaller = Transformer(dataclasses.replace(source.config, n_layers=2))
    with pytest.raises(CheckpointError, match=re.escape("unexpected keys (9): layers.2.")):
        load_llama_weights(smaller, source)
    with pytest.raises(ValueError, match="floating point"):
        load_llama_weights(model, source, dtype=torch.int64)


# Which dim of each weight a tensor-parallel rank holds a contiguous chunk of, under
# lavin_fast.parallel's plan (ColwiseParallel Linear: rows; RowwiseParallel Linear: columns;
# RowwiseParallel Embedding: vocabulary rows); the norms are whole on every rank.
TP_CHUNK_DIM = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0,
                "feed_forward.w3": 0, "output": 0, "tok_embeddings": 0, "attention.wo": 1, "feed_forward.w2": 1}

TP_RANK = r'''
"""One tensor-parallel rank, started by tests/test_llama.py: for each case, the LLaMA on the
meta device, lavin_fast.parallel's plan, this rank's shards read by load_llama_weights, and a
forward; what the rank holds and computes is written to rank{RANK}.pt."""
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lavin_fast.checkpoints.llama import load_llama_weights, open_llama
from lavin_fast.models.llama import Transformer
from lavin_fast.parallel import apply_tensor_parallel


class LinearAdapter(nn.Linear):
    """A Linear map in an adapter slot, on the MMAdapter contract (routing arguments unused)."""

    last_routing = None

    def forward(self, x, weights=None, routing_index=None, *, first=None):
        return super().forward(x)


class Holder(nn.Module):
    """apply_tensor_parallel takes a LaVIN: it splits `.llama` and keeps the trainable flags."""

    def __init__(self, llama):
        super().__init__()
        self.llama = llama


def main(out):
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tokens = torch.load(out / "tokens.pt", weights_only=True)
    adapters = torch.load(out / "adapters.pt", weights_only=True)
    results = {}
    for case in json.loads((out / "cases.json").read_text()):
        source = open_llama(case["folder"])
        with torch.device("meta"):
            llama = Transformer(source.config)
        if case["adapters"]:  # materialised, replicated, not in the checkpoint
            for n, layer in enumerate(llama.layers):
                layer.adapter_attn = LinearAdapter(source.config.dim, source.config.dim, device="cpu")
                layer.adapter_attn.load_state_dict({"weight": adapters[f"layers.{n}.adapter_attn.weight"],
                                                    "bias": adapters[f"layers.{n}.adapter_attn.bias"]})
        apply_tensor_parallel(Holder(llama), mesh, sequence_parallel=case["sequence_parallel"])
        load_llama_weights(llama, source, dtype=getattr(torch, case["dtype"]) if case["dtype"] else None)
        result = {"local": {}, "placements": {}, "adapters": {}}
        for key, value in llama.state_dict().items():
            if "adapter" in key:
                result["adapters"][key] = value.clone()
            elif isinstance(value, DTensor):
                result["local"][key] = value.to_local().clone()
                result["placements"][key] = [[type(p).__name__, getattr(p, "dim", None)] for p in value.placements]
            else:
                result["local"][key] = value.clone()
                result["placements"][key] = None
        if case["forward"]:
            with torch.no_grad():
                result["logits"] = llama.eval()(tokens)
        results[case["name"]] = result
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


def _run_ranks(script: Path, out: Path, world: int = 2, timeout: float = 60.0) -> None:
    """`world` processes of `script` joined by torch.distributed's env:// rendezvous on a free
    local port; fails with their output unless every one exits 0 within `timeout`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    processes, logs = [], []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world):
            logs.append(open(out / f"rank{rank}.log", "w"))
            processes.append(subprocess.Popen([sys.executable, str(script), str(out)], cwd=root, stdout=logs[-1],
                                              stderr=subprocess.STDOUT,
                                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    codes = [process.returncode for process in processes]
    if codes != [0] * world:
        output = "\n".join(f"--- rank {rank} ---\n" + (out / f"rank{rank}.log").read_text()[-4000:]
                           for rank in range(world))
        pytest.fail(f"tensor-parallel ranks exited {codes} (negative: killed after {timeout} s):\n{output}")


def test_tensor_parallel_ranks_load_only_their_shards(tmp_path):
    """Two gloo processes, each: the LLaMA on the meta device, lavin_fast.parallel's plan, then
    load_llama_weights. Each rank must hold exactly its chunk of every split weight (half of
    it: never the whole model) and the whole norms, adapters untouched, and compute the
    one-process logits. Meta folders of 2 and 4 shards (2 shards per rank), Hugging Face
    safetensors (q/k un-permuted per rank's heads, GQA), tied embeddings; with sequence
    parallel the layers' norms are Replicate DTensors (loaded in bf16, checked, not run)."""
    params = CONFIGS["gqa"]
    meta = _meta_weights(params, seed=11)
    folders = {"meta-2": _write_meta(tmp_path / "meta-2", meta, params, shards=2),
               "meta-4": _write_meta(tmp_path / "meta-4", meta, params, shards=4),
               "hf": _save_hf_folder(tmp_path / "hf", meta, params),
               "hf-tied": _save_hf_folder(tmp_path / "hf-tied", _tied(meta), params, tied=True)}
    adapters = _linear_adapters(params["dim"], params["n_layers"], seed=3)
    tokens = _tokens(5)
    torch.save(adapters, tmp_path / "adapters.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    # The sequence-parallel case is loaded, not run: its forward needs a length divisible by
    # the two ranks and is judged in tests/test_parallel.py.
    cases = [dict(name=name, folder=str(folders[folder]), adapters=adapters_on, sequence_parallel=sp, dtype=dtype,
                  forward=not sp)
             for name, folder, adapters_on, sp, dtype in [
                 ("meta-2", "meta-2", False, False, None),
                 ("meta-4-adapters", "meta-4", True, False, None),
                 ("hf", "hf", False, False, None),
                 ("hf-tied-adapters", "hf-tied", True, False, None),
                 ("meta-2-sequence-parallel-bf16", "meta-2", False, True, "bfloat16")]]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "tp_rank.py").write_text(TP_RANK)

    _run_ranks(tmp_path / "tp_rank.py", tmp_path)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for case in cases:
        dtype = getattr(torch, case["dtype"]) if case["dtype"] else None
        reference = load_llama(case["folder"], dtype=dtype)
        if case["adapters"]:
            _attach_adapters(reference, adapters)
        expected_state = {key: value for key, value in reference.state_dict().items() if "adapter" not in key}
        logits = _logits(reference, tokens) if case["forward"] else None
        for rank, results in enumerate(ranks):
            result, where = results[case["name"]], f"{case['name']} rank {rank}"
            assert result["local"].keys() == expected_state.keys(), where
            for key, full in expected_state.items():
                dim = TP_CHUNK_DIM.get(re.sub(r"^layers\.\d+\.", "", key).removesuffix(".weight"))
                local, placed = result["local"][key], result["placements"][key]
                if dim is None:   # norms: inside the layers Replicate DTensors under sequence parallel
                    in_layer = key.startswith("layers.")
                    assert placed == ([["Replicate", None]] if case["sequence_parallel"] and in_layer else None), (
                        where, key)
                    expected = full
                else:
                    assert placed == [["Shard", dim]], (where, key)
                    expected = full.chunk(2, dim)[rank]
                    assert local.shape[dim] * 2 == full.shape[dim], (where, key)
                assert local.dtype == full.dtype, (where, key)
                torch.testing.assert_close(local, expected, rtol=0, atol=0, msg=f"{where}: {key}")
            if case["adapters"]:
                assert result["adapters"].keys() == adapters.keys()
                for key, value in adapters.items():
                    torch.testing.assert_close(result["adapters"][key], value, rtol=0, atol=0, msg=f"{where}: {key}")
            if case["forward"]:
                torch.testing.assert_close(result["logits"], logits, **TOL, msg=where)


# ---- the model: RoPE, LaVIN's attention, KV cache, gradient checkpointing -------------------------

def test_rope_matches_transformers_after_the_permutation():
    """Meta's adjacent-pair rotation of q equals transformers' rotate-half rotation of the
    permuted q, element for element once the layouts are mapped."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, head_dim, length, theta = 3, 16, 9, 50000.0
    config = transformers.LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, rope_theta=theta)
    q = torch.randn(2, length, heads, head_dim, dtype=torch.float64)
    positions = torch.arange(5, 5 + length)
    cos, sin = rope_angles(head_dim, positions, theta)
    ours = apply_rope(q, cos, sin)
    # per head, transformers' layout holds Meta's even elements first, then the odd ones
    to_hf = _permute(torch.eye(heads * head_dim, dtype=torch.float64), heads)
    q_hf = (q.reshape(2, length, -1) @ to_hf.T).view(2, length, heads, head_dim).transpose(1, 2)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q_hf, positions[None])
    rotated_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, hf_cos.double(), hf_sin.double())
    expected = rotated_hf.transpose(1, 2).reshape(2, length, -1) @ to_hf  # back to Meta's layout
    # transformers computes the angles in fp32 as we do: compare at fp32 precision
    torch.testing.assert_close(ours.reshape(2, length, -1), expected, rtol=0, atol=1e-5)


def _masked_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(Dh) masked to `allowed` [Lq, Lk]) v, head h reading kv head
    h // (H / Hkv) (transformers' repeat_kv); float64, head by head."""
    heads, kv_heads = q.shape[2], k.shape[2]
    out = torch.empty_like(q)
    for h in range(heads):
        kh = h // (heads // kv_heads)
        scores = q[:, :, h] @ k[:, :, kh].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, :, h] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, :, kh]
    return out


def _lavin_mask(length: int) -> torch.Tensor:
    """REFERENCE.md section 3, entry by entry: t_m (0) sees only itself; every later position
    sees positions 1..itself, never 0."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            allowed[i, j] = (i == 0 and j == 0) or (1 <= j <= i)
    return allowed


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_isolated_first_attention_matches_the_explicit_mask(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads + kv_heads)
    length = 9
    q = 2 * torch.randn(2, length, heads, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, length, kv_heads, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, length, kv_heads, 8, generator=gen, dtype=torch.float64)
    expected = _masked_attention(q, k, v, _lavin_mask(length))
    torch.testing.assert_close(isolated_first_attention(q, k, v), expected, rtol=1e-12, atol=1e-12)
    # the mask matters: plain causal attention differs everywhere after position 0
    assert (attention(q, k, v, causal=True)[:, 1:] - expected[:, 1:]).abs().amax(dim=(0, 2, 3)).min() > 1e-3

    # a chunk of queries at start_pos > 0 against cached keys 0 .. start_pos + chunk - 1
    for start, chunk in [(1, 1), (1, 8), (4, 1), (4, 3), (8, 1), (3, 6)]:
        end = start + chunk
        out = isolated_first_attention(q[:, start:end], k[:, :end], v[:, :end], start_pos=start)
        torch.testing.assert_close(out, expected[:, start:end], rtol=1e-12, atol=1e-12, msg=f"{start}+{chunk}")
    # prefill of t_m alone
    torch.testing.assert_close(isolated_first_attention(q[:, :1], k[:, :1], v[:, :1]), expected[:, :1],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_causal_attention_chunks_align_bottom_right(heads, kv_heads):
    """What the KV cache relies on: Lq new queries see all earlier keys and the causal part
    of their own chunk."""
    gen = torch.Generator().manual_seed(0)
    length = 10
    q = torch.randn(1, length, heads, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, length, kv_heads, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, length, kv_heads, 8, generator=gen, dtype=torch.float64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = _masked_attention(q, k, v, causal)
    torch.testing.assert_close(attention(q, k, v, causal=True), expected, rtol=1e-12, atol=1e-12)
    for start, chunk in [(0, 1), (3, 1), (3, 4), (9, 1), (1, 9)]:
        end = start + chunk
        out = attention(q[:, start:end], k[:, :end], v[:, :end], causal=True)
        torch.testing.assert_close(out, expected[:, start:end], rtol=1e-12, atol=1e-12, msg=f"{start}+{chunk}")


def _tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                                   max_seq_len=32), **overrides})
    model = Transformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn(param.shape))
    return model.eval()


@pytest.mark.parametrize("isolate_first", [False, True])
@pytest.mark.parametrize("schedule", [[1] * 11, [3] + [1] * 8, [2, 4, 1, 4]])
def test_kv_cache_decoding_matches_the_full_forward(isolate_first, schedule):
    model = _tiny_model(1)
    tokens = torch.randint(0, 50, (2, sum(schedule)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, isolate_first=isolate_first)
        cache, pieces, start = model.new_cache(), [], 0
        for chunk in schedule:
            pieces.append(model(tokens[:, start:start + chunk], start_pos=start, cache=cache,
                                isolate_first=isolate_first))
            start += chunk
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)



def test_kv_cache_decoding_with_scaled_rope_and_explicit_head_dim():
    """Decoding one position at a time uses the scaled frequencies at every position, past the
    original context (4 here), and heads wider than dim / n_heads."""
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 4)
    model = _tiny_model(3, rope_scaling=scaling, explicit_head_dim=16, rope_theta=500000.0)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens, isolate_first=True)
        cache = model.new_cache()
        steps = [model(tokens[:, p:p + 1], start_pos=p, cache=cache, isolate_first=True) for p in range(12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)

def test_isolate_first_model_semantics():
    """Nobody reads position 0 and position 0 reads nobody: changing the later tokens leaves
    logits 0 alone and changing token 0 leaves the later logits alone. The later positions are
    then a plain causal LM over tokens 1.. (RoPE only sees relative positions)."""
    model = _tiny_model(2)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 50, (2, 10), generator=gen)
    other_rest, other_first = tokens.clone(), tokens.clone()
    other_rest[:, 1:] = torch.randint(0, 50, (2, 9), generator=gen)
    other_first[:, 0] = (tokens[:, 0] + 1) % 50
    with torch.no_grad():
        logits = model(tokens, isolate_first=True)
        torch.testing.assert_close(model(other_rest, isolate_first=True)[:, 0], logits[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(other_first, isolate_first=True)[:, 1:], logits[:, 1:], rtol=0, atol=1e-6)
        torch.testing.assert_close(logits[:, 1:], model(tokens[:, 1:]), **TOL)
        # and the flag does something: the plain LM's later positions do read token 0
        assert (model(other_first)[:, 1:] - model(tokens)[:, 1:]).abs().max() > 1e-3


def test_embeddings_input_equals_tokens_input():
    model = _tiny_model(3)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(embeddings=model.tok_embeddings(tokens)), model(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(tokens, embeddings=model.tok_embeddings(tokens))
    with pytest.raises(ValueError, match=r"\[batch, length, 32\]"):
        model(embeddings=torch.zeros(2, 7, 16))


@pytest.mark.parametrize("isolate_first", [False, True])
def test_gradient_checkpointing_matches(isolate_first):
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(4))
    results = []
    for checkpointing in (False, True):
        model = _tiny_model(4).train()
        model.gradient_checkpointing = checkpointing
        calls = []
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        logits = model(tokens, isolate_first=isolate_first)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when on
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads0.keys() == grads1.keys() and all(g.abs().sum() > 0 for g in grads0.values())
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("config, hidden", [
    (LlamaConfig.from_preset("llama-7b"), 11008),
    (LlamaConfig.from_preset("llama-13b"), 13824),
    (LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3), 14336),
    (LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3), 28672),
])
def test_ffn_hidden_follows_meta_rule(config, hidden):
    """The published sizes of LLaMA-7B, 13B, LLaMA-3-8B and LLaMA-2-70B."""
    assert config.ffn_hidden == hidden


def test_bad_llama_configs_raise():
    for kwargs, match in [(dict(dim=64, n_heads=3), "heads of even size"), (dict(dim=64, n_heads=4, n_kv_heads=3),
                          "multiple of n_kv_heads"), (dict(dim=64, n_heads=4, n_layers=0), "positive")]:
        with pytest.raises(ValueError, match=match):
            LlamaConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown LLaMA preset"):
        LlamaConfig.from_preset("llama-65b")
    model = _tiny_model(5, max_seq_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=model.new_cache())
