"""Load a LLaMA from a Meta or a Hugging Face folder into `lavin_fast.models.llama.Transformer`.

Formats (REFERENCE.md section 8):
- Meta: `params.json` + `consolidated.00.pth` .. `consolidated.NN.pth`, one file per
  model-parallel rank. `wq wk wv w1 w3 output` are split on dim 0 (rows), `wo w2
  tok_embeddings` on dim 1 (columns), the RMSNorm weights are replicated in every shard (they
  must be equal). `rope.freqs` (LLaMA-1) is a precomputed buffer and is ignored. A vocab_size of
  -1 means "the tokenizer's": it is read from tok_embeddings' rows.
- Hugging Face: `config.json` (model_type "llama") + `model.safetensors`, sharded
  `model-0000X-of-0000Y.safetensors` with `model.safetensors.index.json`, or the same with
  `pytorch_model.bin`. Hugging Face permutes the rows of q_proj / k_proj so that its RoPE can
  rotate the two halves of each head (x_i, x_{i + Dh/2}) instead of Meta's adjacent pairs
  (x_{2i}, x_{2i+1}); the loader undoes that (`_unpermute`).

Key mapping, ours (= Meta's) <- Hugging Face (N = layer index):

| ours                              | Hugging Face                                           |
|-----------------------------------|--------------------------------------------------------|
| tok_embeddings.weight             | model.embed_tokens.weight                              |
| layers.N.attention.wq.weight      | model.layers.N.self_attn.q_proj.weight (rows permuted) |
| layers.N.attention.wk.weight      | model.layers.N.self_attn.k_proj.weight (rows permuted, kv heads) |
| layers.N.attention.wv.weight      | model.layers.N.self_attn.v_proj.weight                 |
| layers.N.attention.wo.weight      | model.layers.N.self_attn.o_proj.weight                 |
| layers.N.feed_forward.w1.weight   | model.layers.N.mlp.gate_proj.weight                    |
| layers.N.feed_forward.w3.weight   | model.layers.N.mlp.up_proj.weight                      |
| layers.N.feed_forward.w2.weight   | model.layers.N.mlp.down_proj.weight                    |
| layers.N.attention_norm.weight    | model.layers.N.input_layernorm.weight                  |
| layers.N.ffn_norm.weight          | model.layers.N.post_attention_layernorm.weight         |
| norm.weight                       | model.norm.weight                                      |
| output.weight                     | lm_head.weight (model.embed_tokens.weight when tie_word_embeddings) |

Dropped, by exact name only: `rope.freqs` (Meta), `...self_attn.rotary_emb.inv_freq` (old
Hugging Face files). Every other key must match the model in name and shape, or a
`CheckpointError` names it in the checkpoint's own spelling, with its file. Configurations
this LLaMA cannot run (RoPE scaling, attention or MLP biases, another activation, a head_dim
that is not hidden_size / heads, LLaMA-3.1's scaled RoPE) are refused, never approximated.

Memory: the model is built on the meta device and takes the checkpoint's tensors by
assignment. safetensors and zip-format torch files are memory-mapped, so a tensor loaded as it
is (one Meta shard, no q/k permutation, no dtype change) is never copied: its pages are read
from the file when first touched. Merging Meta shards, converting dtype and un-permuting q/k
make one new tensor at a time, so the peak is the model plus one tensor.
"""
from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lavin_fast.checkpoints.strict import CheckpointError, check_state_dict, load_strict
from lavin_fast.models.llama import LlamaConfig, Transformer

# ---- Meta ----------------------------------------------------------------------------------------

# Which dim a model-parallel shard splits (None: replicated), by parameter name inside a layer.
META_SPLIT_DIM: dict[str, int | None] = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1, "tok_embeddings.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
}
META_UNUSED = re.compile(r"rope\.freqs")
META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# params.json keys: those that shape the model, and inference-time settings of Meta's own
# generator (max_seq_len / max_batch_size: here the caller's max_seq_len rules) that are ignored.
META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size"}
META_REQUIRED = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")

# ---- Hugging Face --------------------------------------------------------------------------------

HF_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER = "model.layers.{n}."
HF_IN_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_UNUSED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")
# transformers' LlamaConfig defaults: a config.json written with only non-default values means these.
HF_CONFIG_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 32000,
                      "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                      "tie_word_embeddings": False}
# Weight files in the order they are looked for: (single file, index of a sharded save).
HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
              ("pytorch_model.bin", "pytorch_model.bin.index.json"))


@dataclass
class _Checkpoint:
    """Tensor names and shapes of a checkpoint (possibly several files), and how to read one
    tensor lazily. `where`: key -> the file holding it."""

    source: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    where: dict[str, Path] = field(default_factory=dict)
    readers: dict[Path, Callable[[str], Tensor]] = field(default_factory=dict)

    def read(self, key: str) -> Tensor:
        return self.readers[self.where[key]](key)


def load_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_seq_len: int = 512,
) -> Transformer:
    """A LLaMA from a Meta or a Hugging Face folder (module docstring).

    dtype: convert the weights (default: keep the checkpoint's). device: where the weights go.
    max_seq_len: the KV cache length `Transformer.new_cache` defaults to. Raises
    CheckpointError on any missing, unexpected or mis-shaped key, on a configuration this
    LLaMA cannot run, and on a folder that is neither format.
    """
    path = Path(path)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"load_llama: dtype must be a floating point type, got {dtype}")
    if not path.exists():
        raise FileNotFoundError(f"load_llama: no such folder: {path}")
    if not path.is_dir():
        raise CheckpointError(f"load_llama: {path} is a file; pass the folder holding params.json (Meta) "
                              "or config.json (Hugging Face)")
    is_meta, is_hf = (path / "params.json").is_file(), (path / "config.json").is_file()
    if is_meta and is_hf:
        raise CheckpointError(f"load_llama: {path} holds both params.json (Meta) and config.json (Hugging Face); "
                              "point at a folder with one format")
    if is_meta:
        return _load_meta(path, dtype, device, max_seq_len)
    if is_hf:
        return _load_hf(path, dtype, device, max_seq_len)
    raise CheckpointError(f"load_llama: {path} is neither a Meta LLaMA folder (params.json + consolidated.NN.pth) "
                          "nor a Hugging Face one (config.json + model.safetensors or pytorch_model.bin)")


def save_llama(model: Transformer, folder: str | Path) -> Path:
    """Write a LLaMA as a one-shard Meta folder (params.json + consolidated.00.pth) that
    `load_llama` reads back; adapters, if any, are left out. Each file is written atomically."""
    from lavin_fast.io import atomic_write, atomic_write_text

    config = model.config
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": config.multiple_of,
              "ffn_dim_multiplier": config.ffn_dim_multiplier, "norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta}
    if config.ffn_hidden != dataclasses.replace(config, ffn_hidden_dim=None).ffn_hidden:
        raise ValueError(f"save_llama: FFN width {config.ffn_hidden} does not follow Meta's rule from multiple_of "
                         f"{config.multiple_of}; params.json cannot express it")
    folder = Path(folder)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()
             if "adapter" not in key}
    atomic_write(folder / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
    atomic_write_text(folder / "params.json", json.dumps(params, indent=1))
    return folder


# ---- Meta folders --------------------------------------------------------------------------------

def _load_meta(folder: Path, dtype: torch.dtype | None, device: str | torch.device, max_seq_len: int) -> Transformer:
    params_file = folder / "params.json"
    params = _read_json(params_file)
    files = _meta_shard_files(folder)
    shards = [_as_state_dict(_torch_load(file), file) for file in files]
    sources = [f"Meta LLaMA shard {file} ({rank + 1} of {len(files)}; shapes per shard)"
               for rank, file in enumerate(files)]
    config = _meta_config(params, params_file, shards[0], sources[0], max_seq_len)

    with torch.device("meta"):
        model = Transformer(config)
    ours = model.state_dict()
    count = len(shards)
    expected = {}  # per-shard shape of every key: Meta splits evenly across ranks
    for key, tensor in ours.items():
        dim = _split_dim(key)
        shape = list(tensor.shape)
        if dim is not None:
            if shape[dim] % count:
                raise CheckpointError(f"Meta LLaMA {folder}: {key} of shape {tuple(tensor.shape)} cannot be split "
                                      f"evenly into {count} shards on dim {dim}")
            shape[dim] //= count
        expected[key] = torch.empty(shape, device="meta")
    for shard, source in zip(shards, sources):
        found = {key: value for key, value in shard.items() if not META_UNUSED.fullmatch(key)}
        check_state_dict(expected, found, source)

    state = {}
    for key, tensor in ours.items():  # one tensor at a time: the peak is the model plus one tensor
        pieces = [shard[key] for shard in shards]
        dim = _split_dim(key)
        if dim is None:
            for piece, file in zip(pieces[1:], files[1:]):
                if not torch.equal(piece, pieces[0]):  # a replicated weight that differs: a broken merge
                    raise CheckpointError(f"Meta LLaMA {folder}: {key} is replicated in every shard but "
                                          f"{file.name} differs from {files[0].name}")
            state[key] = pieces[0].detach().to(device=device, dtype=dtype)
        elif count == 1:
            state[key] = pieces[0].detach().to(device=device, dtype=dtype)  # mmap-backed: no copy
        else:
            # One allocation that the shards are copied into (and converted on the way), instead
            # of converted pieces plus their concatenation.
            merged = torch.empty(tensor.shape, dtype=dtype or pieces[0].dtype, device=device)
            for piece, part in zip(pieces, merged.chunk(count, dim=dim)):
                part.copy_(piece)
            state[key] = merged
    load_strict(model, state, f"Meta LLaMA {folder}")
    return model


def _split_dim(key: str) -> int | None:
    return META_SPLIT_DIM[re.sub(r"^layers\.\d+\.", "", key)]


def _meta_shard_files(folder: Path) -> list[Path]:
    numbered = {}
    for file in folder.iterdir():
        if match := META_SHARD.fullmatch(file.name):
            numbered[int(match.group(1))] = file
    if not numbered:
        raise CheckpointError(f"Meta LLaMA folder {folder} has params.json but no consolidated.NN.pth")
    if sorted(numbered) != list(range(len(numbered))):
        raise CheckpointError(f"Meta LLaMA folder {folder}: shards {sorted(numbered)} are not numbered "
                              f"0..{len(numbered) - 1} (a shard is missing)")
    return [numbered[i] for i in range(len(numbered))]


def _meta_config(params: Mapping, params_file: Path, shard0: Mapping[str, Tensor], source0: str,
                 max_seq_len: int) -> LlamaConfig:
    unknown = sorted(set(params) - META_PARAMS)
    if unknown:
        raise CheckpointError(f"{params_file}: unknown keys {unknown}: this loader does not know what they change")
    missing = [key for key in META_REQUIRED if key not in params]
    if missing:
        raise CheckpointError(f"{params_file}: missing {missing}")
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{params_file}: use_scaled_rope (LLaMA-3.1's RoPE frequency scaling) is not supported")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size == -1:  # "the tokenizer's": the embedding's rows say it
        if "tok_embeddings.weight" not in shard0:
            raise CheckpointError(f"{source0} does not match the model: missing key tok_embeddings.weight "
                                  "(needed for vocab_size -1)")
        vocab_size = shard0["tok_embeddings.weight"].shape[0]
    try:
        return LlamaConfig(
            dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
            n_kv_heads=params.get("n_kv_heads"), vocab_size=int(vocab_size), multiple_of=int(params["multiple_of"]),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=float(params["norm_eps"]),
            rope_theta=float(params.get("rope_theta", 10000.0)), max_seq_len=max_seq_len)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{params_file}: {error}") from error


# ---- Hugging Face folders ------------------------------------------------------------------------

def _load_hf(folder: Path, dtype: torch.dtype | None, device: str | torch.device, max_seq_len: int) -> Transformer:
    config_file = folder / "config.json"
    raw = _read_json(config_file)
    config, tied = _hf_config(raw, config_file, max_seq_len)
    checkpoint = _open_hf_weights(folder)

    with torch.device("meta"):
        model = Transformer(config)
    ours = model.state_dict()
    names = dict(HF_GLOBAL)  # ours -> theirs
    for n in range(config.n_layers):
        names.update({f"layers.{n}.{o}": HF_LAYER.format(n=n) + t for o, t in HF_IN_LAYER.items()})
    lm_head = names["output.weight"]
    if tied and lm_head not in checkpoint.shapes:  # transformers saves a tied head once, as the embedding
        names["output.weight"] = names["tok_embeddings.weight"]
    expected = {names[key]: torch.empty(tensor.shape, device="meta") for key, tensor in ours.items()}
    if tied and lm_head in checkpoint.shapes:  # an explicit lm_head next to tied embeddings: the same matrix
        expected[lm_head] = expected[names["tok_embeddings.weight"]]
    found = {key: torch.empty(shape, device="meta") for key, shape in checkpoint.shapes.items()
             if not HF_UNUSED.fullmatch(key)}
    _check(expected, found, checkpoint)
    if tied and lm_head in checkpoint.shapes:
        if not torch.equal(checkpoint.read(lm_head), checkpoint.read(names["tok_embeddings.weight"])):
            raise CheckpointError(f"{checkpoint.source}: tie_word_embeddings is true but {lm_head} differs from "
                                  f"{names['tok_embeddings.weight']}")

    heads = {f"layers.{n}.attention.{w}.weight": h for n in range(config.n_layers)
             for w, h in (("wq", config.n_heads), ("wk", config.kv_heads))}
    shared = {theirs for theirs, uses in Counter(names.values()).items() if uses > 1}  # a tied embedding
    state: dict[str, Tensor] = {}
    converted: dict[str, Tensor] = {}
    for key in ours:  # one tensor at a time
        theirs = names[key]
        tensor = converted.get(theirs)
        if tensor is None:
            tensor = checkpoint.read(theirs).detach().to(device=device, dtype=dtype)
            if theirs in shared:  # converted once, the same tensor for both parameters
                converted[theirs] = tensor
        state[key] = _unpermute(tensor, heads[key]) if key in heads else tensor
    load_strict(model, state, checkpoint.source)
    return model


def _unpermute(weight: Tensor, heads: int) -> Tensor:
    """Hugging Face q/k rows -> Meta's. transformers' conversion script applied
    `w.view(heads, Dh / 2, 2, d).transpose(1, 2).reshape(heads * Dh, d)`, which moves the even
    rows of each head (first element of each RoPE pair) to its first half; this is the inverse.
    weight: [heads * Dh, d] -> [heads * Dh, d] (a new contiguous tensor)."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_config(raw: Mapping, config_file: Path, max_seq_len: int) -> tuple[LlamaConfig, bool]:
    """LlamaConfig and tie_word_embeddings from a transformers config.json (4.x or 5.x layout)."""
    if raw.get("model_type") != "llama":
        raise CheckpointError(f"{config_file}: model_type {raw.get('model_type')!r} is not 'llama'")
    values = {**HF_CONFIG_DEFAULTS, **raw}
    if values["hidden_act"] != "silu":
        raise CheckpointError(f"{config_file}: hidden_act {values['hidden_act']!r} is not supported (LLaMA uses silu)")
    for bias in ("attention_bias", "mlp_bias"):
        if values[bias]:
            raise CheckpointError(f"{config_file}: {bias} is true; this LLaMA has no biases")
    hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
    head_dim = values.get("head_dim")
    if head_dim is not None and heads and int(head_dim) * heads != hidden:
        raise CheckpointError(f"{config_file}: head_dim {head_dim} x {heads} heads != hidden_size {hidden} "
                              "(not supported)")
    try:
        config = LlamaConfig(
            dim=hidden, n_layers=int(values["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=values["num_key_value_heads"], vocab_size=int(values["vocab_size"]),
            norm_eps=float(values["rms_norm_eps"]), rope_theta=_hf_rope_theta(raw, config_file),
            max_seq_len=max_seq_len, ffn_hidden_dim=int(values["intermediate_size"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_file}: {error}") from error
    return config, bool(values["tie_word_embeddings"])


def _hf_rope_theta(raw: Mapping, config_file: Path) -> float:
    """rope_theta from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`).
    Only plain RoPE runs here: any scaling (linear, dynamic, yarn, llama3, ...) is refused."""
    theta = raw.get("rope_theta")
    for name in ("rope_scaling", "rope_parameters"):
        spec = raw.get(name)
        if spec is None:
            continue
        kind = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, Mapping) else None
        extra = sorted(set(spec) - {"rope_type", "type", "rope_theta"}) if isinstance(spec, Mapping) else None
        if kind != "default" or extra:
            raise CheckpointError(f"{config_file}: {name} {spec!r} is not supported: only plain RoPE (rope_type "
                                  "'default', no scaling) is implemented")
        if "rope_theta" in spec:
            if theta is not None and float(theta) != float(spec["rope_theta"]):
                raise CheckpointError(f"{config_file}: rope_theta {theta} disagrees with {name} {spec!r}")
            theta = spec["rope_theta"]
    return 10000.0 if theta is None else float(theta)


def _open_hf_weights(folder: Path) -> _Checkpoint:
    for single, index in HF_WEIGHTS:
        if (folder / index).is_file():
            return _open_sharded(folder / index)
        if (folder / single).is_file():
            checkpoint = _Checkpoint(f"Hugging Face LLaMA checkpoint {folder / single}")
            _add_file(checkpoint, folder / single)
            return checkpoint
    raise CheckpointError(f"Hugging Face LLaMA folder {folder} has no model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _open_sharded(index_file: Path) -> _Checkpoint:
    """A sharded save: the index's weight_map (key -> file name) must agree with the files."""
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index_file} has no weight_map")
    checkpoint = _Checkpoint(f"Hugging Face LLaMA checkpoint {index_file}")
    for name in sorted(set(weight_map.values())):
        file = index_file.parent / name
        if not file.is_file():
            raise CheckpointError(f"{index_file} names {name}, which does not exist")
        _add_file(checkpoint, file)
    disagree = sorted(key for key in set(weight_map) | set(checkpoint.where)
                      if key not in checkpoint.where or weight_map.get(key) != checkpoint.where[key].name)
    if disagree:
        shown = ", ".join(f"{key} (index: {weight_map.get(key)}, found in: "
                          f"{checkpoint.where[key].name if key in checkpoint.where else None})"
                          for key in disagree[:20])
        raise CheckpointError(f"{index_file} disagrees with its shard files: {shown}")
    return checkpoint


def _add_file(checkpoint: _Checkpoint, file: Path) -> None:
    """Register the tensors of one weight file (safetensors mapped and read on demand; a torch
    file loaded with mmap)."""
    if file.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as error:
            raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        read = handle.get_tensor
    else:
        state = _as_state_dict(_torch_load(file), file)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        read = state.__getitem__
    for key, shape in shapes.items():
        if key in checkpoint.where:
            raise CheckpointError(f"{checkpoint.source}: key {key} is in both {checkpoint.where[key]} and {file}")
        checkpoint.shapes[key], checkpoint.where[key] = shape, file
    checkpoint.readers[file] = read


def _check(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], checkpoint: _Checkpoint) -> None:
    """check_state_dict, and for a sharded checkpoint the file of every offending key."""
    try:
        check_state_dict(expected, found, checkpoint.source)
    except CheckpointError as error:
        if len(checkpoint.readers) < 2:
            raise
        offending = sorted(key for key in found
                           if key not in expected or tuple(expected[key].shape) != tuple(found[key].shape))
        if not offending:
            raise
        where = ", ".join(f"{key} in {checkpoint.where[key].name}" for key in offending[:20])
        raise CheckpointError(f"{error}; files: {where}") from None


# ---- files ---------------------------------------------------------------------------------------

def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a {type(value).__name__}, not a JSON object")
    return value


def _torch_load(file: Path) -> object:
    """torch.load(weights_only) memory-mapped; files in the pre-1.6 (non-zip) format cannot be
    mapped and are read whole."""
    try:
        if zipfile.is_zipfile(file):
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{file} is not a state dict saved by torch.save (weights_only): {error}") from error


def _as_state_dict(state: object, file: Path) -> dict[str, Tensor]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{file} is not a flat state dict: key {key!r} holds a {type(value).__name__}")
    return dict(state)
