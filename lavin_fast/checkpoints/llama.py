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
`CheckpointError` names it in the checkpoint's own spelling, with its file. RoPE scaling
"linear" and "llama3" (LLaMA-3.1/3.2: Hugging Face's `rope_scaling` / `rope_parameters`, Meta's
`use_scaled_rope`, with Meta's factors: 8 and 4 unless params.json gives
`rope_scaling_factor` / `rope_high_freq_factor`) are implemented. A head_dim that is
not hidden_size / heads is read too (q/k/v/o are then [heads x head_dim, hidden]).
Configurations this LLaMA cannot run (other RoPE scalings, attention or MLP biases, another
activation) are refused, never approximated.

API: `open_llama` validates a folder (keys, shapes, configuration, replicated and tied
weights) and returns a `LlamaSource`, which reads one parameter, or one slice of it, on demand;
`load_llama_weights` fills a model built from `source.config` (typically on the meta device)
with it; `load_llama` is the two together.

Memory: the model is built on the meta device and takes the checkpoint's tensors by
assignment. safetensors and zip-format torch files are memory-mapped, so a tensor loaded as it
is (one Meta shard, no q/k permutation, no dtype change) is never copied: its pages are read
from the file when first touched. Merging Meta shards, converting dtype and un-permuting q/k
make one new tensor at a time, so the peak is the model plus one tensor.

Tensor parallelism: apply the plan (`lavin_fast.parallel.apply_tensor_parallel`) to the model
while it is on the meta device; its parameters become DTensors on meta, and
`load_llama_weights` reads for each only this rank's slice (a Shard(d) placement: this rank's
contiguous chunk of dim d; Replicate: the whole tensor). A slice along the dim Meta's shards
split takes only the shard pieces it overlaps; a Hugging Face slice is read from the mapped
file, and q/k rows are un-permuted per head (tensor parallelism cuts them at head boundaries).
No rank ever holds the whole model.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lavin_fast.checkpoints.strict import (
    CheckpointError,
    check_floating,
    check_state_dict,
    flat_state_dict,
    load_strict,
    open_safetensors,
    read_json,
    torch_load,
)
from lavin_fast.io import atomic_write, atomic_write_text
from lavin_fast.models.llama import ROPE_SCALINGS, LlamaConfig, RopeScaling, Transformer

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
               "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
               "max_seq_len", "max_batch_size"}
META_REQUIRED = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")
# The JSON types params.json's values that shape the model must have (null: absent).
_INTEGER, _NUMBER = ((int,), "an integer"), ((int, float), "a number")
META_TYPES = {"dim": _INTEGER, "n_layers": _INTEGER, "n_heads": _INTEGER, "vocab_size": _INTEGER,
              "multiple_of": _INTEGER, "n_kv_heads": ((int, type(None)), "an integer or null"),
              "ffn_dim_multiplier": ((int, float, type(None)), "a number or null"),
              "norm_eps": _NUMBER, "rope_theta": _NUMBER, "rope_scaling_factor": _NUMBER,
              "rope_high_freq_factor": _NUMBER}
# use_scaled_rope: Meta's LLaMA-3.1 code scales with factor 8 and high frequency factor 4 unless
# params.json gives rope_scaling_factor / rope_high_freq_factor (the names of Meta's later code),
# low frequency factor 1 and original context 8192 always. Hugging Face's LLaMA-3.2 configs
# say factor 32 where Meta's params.json names none.
META_SCALED_ROPE = RopeScaling("llama3", 8.0)

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
# The parameters of each RoPE type this LLaMA runs (config.json's names are RopeScaling's fields).
HF_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Weight files in the order they are looked for: (single file, index of a sharded save).
HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
              ("pytorch_model.bin", "pytorch_model.bin.index.json"))


@dataclass
class _Checkpoint:
    """Tensor names and shapes of a checkpoint (possibly several files), and how to read one
    tensor, or one slice of it, lazily. `where`: key -> the file holding it; `readers`: file ->
    read(key, dim, start, length), whole when dim is None (a view of the mapped file where the
    format allows it)."""

    source: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    where: dict[str, Path] = field(default_factory=dict)
    readers: dict[Path, Callable[[str, int | None, int, int | None], Tensor]] = field(default_factory=dict)

    def read(self, key: str, dim: int | None = None, start: int = 0, length: int | None = None) -> Tensor:
        return self.readers[self.where[key]](key, dim, start, length)


@dataclass
class LlamaSource:
    """An opened and validated LLaMA checkpoint (`open_llama`): its configuration and a reader
    of each parameter under our (Meta's) names, whole or in slices.

    config: the LlamaConfig to build the model with. source: the checkpoint, for messages.
    shapes: every LLaMA parameter's full shape, by our name (adapters are not in a checkpoint).
    """

    config: LlamaConfig
    source: str
    shapes: dict[str, tuple[int, ...]]

    def read(self, key: str, dim: int | None = None, start: int = 0, length: int | None = None, *,
             dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Tensor:
        """Parameter `key` (e.g. "layers.3.attention.wq.weight"), or only its slice
        [start, start + length) along `dim` (length: to the end), read from the file(s) as
        little as the format allows. dtype / device: convert on the way (default: as stored, on
        the CPU). Tensors taken as they are may be views of the read-only file mapping.
        Raises KeyError for a name this LLaMA does not have, ValueError for a slice outside
        the tensor or, for Hugging Face q/k, rows that do not begin and end on a head boundary.
        """
        if key not in self.shapes:
            raise KeyError(f"{self.source}: {key!r} is not a parameter of this LLaMA")
        shape = self.shapes[key]
        if dim is None:
            if start != 0 or length is not None:
                raise ValueError(f"LlamaSource.read({key!r}): start and length need a dim")
            return self._read(key, None, 0, None, dtype, device)
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"LlamaSource.read({key!r}): dim {dim} out of range for shape {shape}")
        dim %= len(shape)
        length = shape[dim] - start if length is None else length
        if start < 0 or length < 0 or start + length > shape[dim]:
            raise ValueError(f"LlamaSource.read({key!r}): [{start}, {start + length}) on dim {dim} is outside "
                             f"its size {shape[dim]}")
        return self._read(key, dim, start, length, dtype, device)

    def _origin(self, key: str) -> str:
        """The checkpoint tensor `key` is read from (two of ours share one when it is tied)."""
        return key

    def _read(self, key: str, dim: int | None, start: int, length: int | None, dtype: torch.dtype | None,
              device: str | torch.device | None) -> Tensor:
        raise NotImplementedError


def open_llama(path: str | Path, *, max_seq_len: int = 512) -> LlamaSource:
    """Open and validate a Meta or a Hugging Face LLaMA folder (module docstring) without
    reading its weights, except the few the checks compare (replicated norms of Meta shards,
    a Hugging Face lm_head next to tied embeddings).

    max_seq_len: the KV cache length `Transformer.new_cache` defaults to. Raises
    CheckpointError on any missing, unexpected or mis-shaped key, on a configuration this
    LLaMA cannot run, and on a folder that is neither format.
    """
    return _open(Path(path), max_seq_len, "open_llama")


def load_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_seq_len: int = 512,
) -> Transformer:
    """A LLaMA from a Meta or a Hugging Face folder (module docstring): `open_llama`, the
    model on the meta device, `load_llama_weights`.

    dtype: convert the weights (default: keep the checkpoint's). device: where the weights go.
    max_seq_len: the KV cache length `Transformer.new_cache` defaults to. Raises
    CheckpointError on any missing, unexpected or mis-shaped key, on a configuration this
    LLaMA cannot run, and on a folder that is neither format.
    """
    _check_dtype(dtype, "load_llama")
    source = _open(Path(path), max_seq_len, "load_llama")
    with torch.device("meta"):
        model = Transformer(source.config)
    load_llama_weights(model, source, dtype=dtype, device=device)
    return model


def load_llama_weights(
    model: Transformer,
    source: LlamaSource,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Fill `model` (built from `source.config`, typically on the meta device, possibly with
    LaVIN's adapters attached and a tensor-parallel plan applied) with the checkpoint's weights.

    Every LLaMA entry of the state dict (those whose name holds "adapter" are not in a LLaMA
    checkpoint and are left as they are) is assigned: a DTensor gets only this rank's slice,
    read from the checkpoint and wrapped with its mesh and placements (Shard(d) on a mesh dim:
    the rank's contiguous chunk of dim d, which must divide evenly; Replicate: the whole
    tensor); a plain tensor gets the whole parameter. dtype: convert (default: keep the
    checkpoint's); device: where the weights (the local shards) go. Strict: every LLaMA key,
    every shape, or CheckpointError.
    """
    _check_dtype(dtype, "load_llama_weights")
    full = model.state_dict()
    ours = {key: value for key, value in full.items() if "adapter" not in key}
    check_state_dict(ours, {key: torch.empty(shape, device="meta") for key, shape in source.shapes.items()},
                     source.source)

    uses = Counter(source._origin(key) for key in ours)
    shared: dict[tuple, Tensor] = {}  # a tied embedding: read and converted once for both parameters
    state: dict[str, Tensor] = {}
    for key, target in ours.items():  # one tensor at a time: the peak is the model plus one tensor
        if isinstance(target, DTensor):
            dim, start, length = _local_slice(key, target)
            mesh = target.device_mesh
            if torch.device(device).type != mesh.device_type:
                raise ValueError(f"load_llama_weights: device {device} but {key} lives on a {mesh.device_type} "
                                 "mesh; pass a device of the mesh's type")
        else:
            dim, start, length = None, 0, None
        origin = (source._origin(key), dim, start, length)
        tensor = shared.get(origin)
        if tensor is None:
            tensor = source.read(key, dim, start, length, dtype=dtype, device=device)
            if isinstance(target, DTensor):
                tensor = tensor.contiguous()
            if uses[origin[0]] > 1:
                shared[origin] = tensor
        if isinstance(target, DTensor):
            tensor = DTensor.from_local(tensor, target.device_mesh, target.placements, run_check=False,
                                        shape=target.shape, stride=target.stride())
        state[key] = tensor

    if len(ours) == len(full):
        load_strict(model, state, source.source)
        return
    # Adapters attached (and maybe already materialised): strict over exactly the LLaMA keys.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != set(full) - set(ours) or unexpected:
        raise CheckpointError(f"{source.source}: loading left LLaMA keys unassigned: "
                              f"{sorted(set(missing) & set(ours))}, unexpected: {sorted(unexpected)}")


def _check_dtype(dtype: torch.dtype | None, caller: str) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"{caller}: dtype must be a floating point type, got {dtype}")


def _local_slice(key: str, tensor: DTensor) -> tuple[int | None, int, int | None]:
    """(dim, start, length) of this rank's part of `tensor` ((None, 0, None): all of it), from
    its placements: mesh dims are applied in order, each Shard(d) cutting the current part of
    dim d into equal contiguous chunks."""
    mesh, shape = tensor.device_mesh, tuple(tensor.shape)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"load_llama_weights: this rank is not in the mesh of {key}")
    start, length = [0] * len(shape), list(shape)
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # Partial, _StridedShard, ...: not a layout a checkpoint fills
            raise ValueError(f"load_llama_weights: {key} has placement {placement} on mesh dim {mesh_dim}; "
                             "only Shard(d) and Replicate can be loaded")
        d, ranks = placement.dim % len(shape), mesh.size(mesh_dim)
        if length[d] % ranks:
            raise ValueError(f"load_llama_weights: {key} of shape {shape} cannot be split evenly: size "
                             f"{length[d]} of dim {d} over {ranks} ranks (mesh dim {mesh_dim})")
        length[d] //= ranks
        start[d] += coordinate[mesh_dim] * length[d]
    cut = [d for d in range(len(shape)) if length[d] != shape[d]]
    if not cut:
        return None, 0, None
    if len(cut) > 1:
        raise ValueError(f"load_llama_weights: {key} is sharded on dims {cut}; one sharded dim is supported")
    return cut[0], start[cut[0]], length[cut[0]]


def _open(path: Path, max_seq_len: int, caller: str) -> LlamaSource:
    if not path.exists():
        raise FileNotFoundError(f"{caller}: no such folder: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{caller}: {path} is a file; pass the folder holding params.json (Meta) "
                              "or config.json (Hugging Face)")
    is_meta, is_hf = (path / "params.json").is_file(), (path / "config.json").is_file()
    if is_meta and is_hf:
        raise CheckpointError(f"{caller}: {path} holds both params.json (Meta) and config.json (Hugging Face); "
                              "point at a folder with one format")
    if is_meta:
        return _open_meta(path, max_seq_len)
    if is_hf:
        return _open_hf(path, max_seq_len)
    raise CheckpointError(f"{caller}: {path} is neither a Meta LLaMA folder (params.json + consolidated.NN.pth) "
                          "nor a Hugging Face one (config.json + model.safetensors or pytorch_model.bin)")


def _model_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in Transformer(config).state_dict().items()}


def _convert(tensor: Tensor, dtype: torch.dtype | None, device: str | torch.device | None) -> Tensor:
    return tensor.detach().to(device=device, dtype=dtype)  # no copy when nothing changes


def _join(parts: list[Tensor], dim: int, dtype: torch.dtype | None, device: str | torch.device | None) -> Tensor:
    """parts concatenated along dim, converted: one allocation the parts are copied into
    (converted on the way), instead of converted parts plus their concatenation."""
    if len(parts) == 1:
        return _convert(parts[0], dtype, device)
    shape = list(parts[0].shape)
    shape[dim] = sum(part.shape[dim] for part in parts)
    merged = torch.empty(shape, dtype=dtype or parts[0].dtype, device=device or parts[0].device)
    offset = 0
    for part in parts:
        merged.narrow(dim, offset, part.shape[dim]).copy_(part)
        offset += part.shape[dim]
    return merged


def save_llama(model: Transformer, folder: str | Path) -> Path:
    """Write a LLaMA as a one-shard Meta folder (params.json + consolidated.00.pth) that
    `load_llama` reads back; adapters, if any, are left out. Each file is written atomically."""
    config = model.config
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": config.multiple_of,
              "ffn_dim_multiplier": config.ffn_dim_multiplier, "norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta}
    if config.explicit_head_dim is not None:
        raise ValueError(f"save_llama: head_dim {config.explicit_head_dim} is not dim / n_heads; params.json "
                         "cannot express it")
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        if dataclasses.replace(scaling, factor=8.0, high_freq_factor=4.0) != META_SCALED_ROPE:
            raise ValueError(f"save_llama: RoPE scaling {scaling} is not Meta's use_scaled_rope "
                             f"({META_SCALED_ROPE} with any factors); params.json cannot express it")
        params.update(use_scaled_rope=True, rope_scaling_factor=scaling.factor,
                      rope_high_freq_factor=scaling.high_freq_factor)
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

@dataclass
class _MetaSource(LlamaSource):
    """Meta shards (each a memory-mapped state dict), split as META_SPLIT_DIM says."""

    shards: list[dict[str, Tensor]] = field(default_factory=list, repr=False)

    def _read(self, key: str, dim: int | None, start: int, length: int | None, dtype: torch.dtype | None,
              device: str | torch.device | None) -> Tensor:
        pieces = [shard[key] for shard in self.shards]
        split = _split_dim(key)
        if split is None:  # replicated (equal in every shard, checked when opened)
            piece = pieces[0] if dim is None else pieces[0].narrow(dim, start, length)
            return _convert(piece, dtype, device)
        if dim is None:
            return _join(pieces, split, dtype, device)  # one shard: the mapped tensor itself
        if dim != split:  # every shard holds part of the slice: narrow each, then join
            return _join([piece.narrow(dim, start, length) for piece in pieces], split, dtype, device)
        per, parts = pieces[0].shape[split], []  # only the shards the slice overlaps
        for index, piece in enumerate(pieces):
            low, high = max(start, index * per), min(start + length, (index + 1) * per)
            if low < high:
                parts.append(piece.narrow(split, low - index * per, high - low))
        return _join(parts or [pieces[0].narrow(split, 0, 0)], split, dtype, device)


def _open_meta(folder: Path, max_seq_len: int) -> LlamaSource:
    params_file = folder / "params.json"
    params = read_json(params_file)
    files = _meta_shard_files(folder)
    shards = [_torch_load(file) for file in files]
    sources = [f"Meta LLaMA shard {file} ({rank + 1} of {len(files)}; shapes per shard)"
               for rank, file in enumerate(files)]
    config = _meta_config(params, params_file, shards[0], sources[0], max_seq_len)

    shapes = _model_shapes(config)
    count = len(shards)
    expected = {}  # per-shard shape of every key: Meta splits evenly across ranks
    for key, full in shapes.items():
        dim = _split_dim(key)
        shape = list(full)
        if dim is not None:
            if shape[dim] % count:
                raise CheckpointError(f"Meta LLaMA {folder}: {key} of shape {full} cannot be split "
                                      f"evenly into {count} shards on dim {dim}")
            shape[dim] //= count
        expected[key] = torch.empty(shape, device="meta")
    for shard, source in zip(shards, sources):
        found = {key: value for key, value in shard.items() if not META_UNUSED.fullmatch(key)}
        check_state_dict(expected, found, source)
        check_floating({key: value.dtype for key, value in found.items()}, source)
    for key in shapes:  # the replicated weights (norms: small) must be equal, or the merge is broken
        if _split_dim(key) is None:
            for shard, file in zip(shards[1:], files[1:]):
                if not torch.equal(shard[key], shards[0][key]):
                    raise CheckpointError(f"Meta LLaMA {folder}: {key} is replicated in every shard but "
                                          f"{file.name} differs from {files[0].name}")
    return _MetaSource(config, f"Meta LLaMA {folder}", shapes, shards=shards)


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
    mistyped = [f"{key} {params[key]!r} (expected {kind})" for key, (types, kind) in META_TYPES.items()
                if key in params and (isinstance(params[key], bool) or not isinstance(params[key], types))]
    if mistyped:  # "128" or 4.7 is a damaged or hand-edited file, not a size to round
        raise CheckpointError(f"{params_file}: wrong types: {', '.join(mistyped)}")
    missing = [key for key in META_REQUIRED if key not in params]
    if missing:
        raise CheckpointError(f"{params_file}: missing {missing}")
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dataclasses.replace(META_SCALED_ROPE, **{
            field_name: params[key] for key, field_name in (("rope_scaling_factor", "factor"),
                                                            ("rope_high_freq_factor", "high_freq_factor"))
            if params.get(key) is not None})
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
            rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling, max_seq_len=max_seq_len)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{params_file}: {error}") from error


# ---- Hugging Face folders ------------------------------------------------------------------------

@dataclass
class _HFSource(LlamaSource):
    """A Hugging Face checkpoint: `names` maps ours to theirs; `heads` the q/k keys (rows
    permuted by Hugging Face) to their number of heads."""

    checkpoint: _Checkpoint | None = field(default=None, repr=False)
    names: dict[str, str] = field(default_factory=dict, repr=False)
    heads: dict[str, int] = field(default_factory=dict, repr=False)

    def _origin(self, key: str) -> str:
        return self.names[key]

    def _read(self, key: str, dim: int | None, start: int, length: int | None, dtype: torch.dtype | None,
              device: str | torch.device | None) -> Tensor:
        tensor = self.checkpoint.read(self.names[key], dim, start, length)
        heads = self.heads.get(key)
        if heads is None:
            return _convert(tensor, dtype, device)
        if dim == 0:  # a slice of rows: whole heads only, each un-permuted on its own
            head_dim = self.config.head_dim
            if start % head_dim or length % head_dim:
                raise ValueError(f"LlamaSource.read({key!r}): rows [{start}, {start + length}) of a Hugging Face "
                                 f"q/k projection must begin and end on a head boundary (head_dim {head_dim}): "
                                 "its rows are permuted within each head")
            heads = length // head_dim
        tensor = _convert(tensor, dtype, device)
        return _unpermute(tensor, heads) if heads else tensor


def _open_hf(folder: Path, max_seq_len: int) -> LlamaSource:
    config_file = folder / "config.json"
    raw = read_json(config_file)
    config, tied = _hf_config(raw, config_file, max_seq_len)
    checkpoint = _open_hf_weights(folder)

    shapes = _model_shapes(config)
    names = dict(HF_GLOBAL)  # ours -> theirs
    for n in range(config.n_layers):
        names.update({f"layers.{n}.{o}": HF_LAYER.format(n=n) + t for o, t in HF_IN_LAYER.items()})
    lm_head = names["output.weight"]
    if tied and lm_head not in checkpoint.shapes:  # transformers saves a tied head once, as the embedding
        names["output.weight"] = names["tok_embeddings.weight"]
    expected = {names[key]: torch.empty(shape, device="meta") for key, shape in shapes.items()}
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
    return _HFSource(config, checkpoint.source, shapes, checkpoint=checkpoint, names=names, heads=heads)


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
    head_dim = values.get("head_dim")  # kept only where it is not hidden_size / heads (LLaMA's own is)
    explicit_head_dim = None if head_dim is None or int(head_dim) * heads == hidden else int(head_dim)
    theta, scaling = _hf_rope(raw, config_file)
    try:
        config = LlamaConfig(
            dim=hidden, n_layers=int(values["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=values["num_key_value_heads"], vocab_size=int(values["vocab_size"]),
            norm_eps=float(values["rms_norm_eps"]), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=max_seq_len, ffn_hidden_dim=int(values["intermediate_size"]),
            explicit_head_dim=explicit_head_dim)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_file}: {error}") from error
    return config, bool(values["tie_word_embeddings"])


def _hf_rope(raw: Mapping, config_file: Path) -> tuple[float, RopeScaling | None]:
    """rope_theta and the RoPE scaling from transformers 4.x (`rope_theta`, `rope_scaling`) or
    5.x (`rope_parameters`). Plain RoPE, "linear" and "llama3" run here; any other type
    (dynamic, yarn, longrope, ...) or an unknown parameter is refused by name."""
    theta, scaling = raw.get("rope_theta"), None
    for name in ("rope_scaling", "rope_parameters"):
        spec = raw.get(name)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise CheckpointError(f"{config_file}: {name} {spec!r} is not a JSON object")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in HF_ROPE_KEYS:
            raise CheckpointError(f"{config_file}: {name} of type {kind!r} is not supported: only plain RoPE "
                                  f"(rope_type 'default') and the scalings {ROPE_SCALINGS} are implemented")
        extra = sorted(set(spec) - {"rope_type", "type", "rope_theta", *HF_ROPE_KEYS[kind]})
        missing = [key for key in HF_ROPE_KEYS[kind] if key not in spec]
        if extra or missing:
            raise CheckpointError(f"{config_file}: {name} {spec!r} of type {kind!r}: "
                                  + (f"unknown keys {extra} (not implemented)" if extra else f"missing {missing}"))
        if "rope_theta" in spec:
            if theta is not None and float(theta) != float(spec["rope_theta"]):
                raise CheckpointError(f"{config_file}: rope_theta {theta} disagrees with {name} {spec!r}")
            theta = spec["rope_theta"]
        if kind != "default":
            try:
                scaling = RopeScaling(kind, **{key: spec[key] for key in HF_ROPE_KEYS[kind]})
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{config_file}: {name}: {error}") from error
    return 10000.0 if theta is None else float(theta), scaling


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
    weight_map = read_json(index_file).get("weight_map")
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
        handle = open_safetensors(file)
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        check_floating({key: handle.get_slice(key).get_dtype() for key in handle.keys()}, str(file))

        def read(key: str, dim: int | None, start: int, length: int | None) -> Tensor:
            if dim is None:
                return handle.get_tensor(key)  # a view of the mapped file
            index = [slice(None)] * len(shapes[key])
            index[dim] = slice(start, start + length)
            return handle.get_slice(key)[tuple(index)]  # reads only the slice (also a view of the mapping)
    else:
        state = _torch_load(file)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        check_floating({key: value.dtype for key, value in state.items()}, str(file))

        def read(key: str, dim: int | None, start: int, length: int | None) -> Tensor:
            return state[key] if dim is None else state[key].narrow(dim, start, length)
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

def _torch_load(file: Path) -> dict[str, Tensor]:
    try:
        state = torch_load(file)
    except Exception as error:
        raise CheckpointError(f"{file} is not a state dict saved by torch.save (weights_only): {error}") from error
    return flat_state_dict(state, str(file))
