"""A minimal LLaMA (Touvron et al. 2023) with Meta's parameter names, and LaVIN's adapter slot.

    h_0 = tok_embeddings(tokens)                                  (or embeddings given directly)
    for each layer:  h = h + attention(adapter_attn(attention_norm(h)))
                     h = h + feed_forward(ffn_norm(h))
    logits = output(norm(h))

RMSNorm; rotary position embeddings rotating adjacent pairs (x_{2i}, x_{2i+1}) as Meta's code
does (Hugging Face checkpoints are permuted into this order when loaded); SwiGLU feed-forward
w2(silu(w1 x) * w3 x); optional grouped-query attention (`n_kv_heads`), `rope_theta`, RoPE
frequency scaling (`RopeScaling`: "linear", and LLaMA-3.1/3.2's "llama3") and a head width
other than dim / n_heads, so LLaMA-1, LLaMA-2 and LLaMA-3.x shapes all fit (a tied output head
is the embedding matrix loaded into both). `adapter_attn` is empty in a plain LLaMA (then it
is an ordinary language model) and holds an `MMAdapter` in LaVIN (REFERENCE.md section 2).

Heads are never read from the config inside a forward: shapes come from the projections'
outputs, so a tensor-parallel plan (`lavin_fast.parallel`) that splits wq/wk/wv column-wise
runs this code unchanged on its local heads.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lavin_fast.models.attention import attention, isolated_first_attention, packed_attention
from lavin_fast.models.segments import Segments


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling of a long-context LLaMA, as transformers defines it
    (`modeling_rope_utils`), applied to the inverse frequencies f_i = theta^(-2i / Dh):

    - "linear": every f_i / factor (position interpolation);
    - "llama3" (LLaMA-3.1, 3.2): with wavelength w_i = 2 pi / f_i and L the original context,
      f_i unchanged where w_i < L / high_freq_factor, f_i / factor where w_i > L / low_freq_factor,
      and in between (1 - s) f_i / factor + s f_i with s = (L / w_i - low) / (high - low).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"RopeScaling: kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling: factor must be positive, got {self.factor}")
        if self.kind == "llama3" and not (self.high_freq_factor > self.low_freq_factor > 0
                                          and self.original_max_position_embeddings > 0):
            raise ValueError(f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor > 0 and a positive "
                             f"original_max_position_embeddings, got {self}")


ROPE_SCALINGS = ("linear", "llama3")


@dataclass
class LlamaConfig:
    """Shape of a LLaMA. `ffn_hidden` follows Meta's rule (REFERENCE.md section 8),
    multiple_of * ceil(int(ffn_dim_multiplier * int(2 * 4 dim / 3)) / multiple_of), unless
    `ffn_hidden_dim` gives it (Hugging Face configs state it as intermediate_size)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    ffn_hidden_dim: int | None = None
    rope_scaling: RopeScaling | None = None
    explicit_head_dim: int | None = None  # Hugging Face's head_dim where it is not dim / n_heads

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):  # from a config saved as JSON (LaVINConfig.to_dict)
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        kv_heads = self.kv_heads
        if self.explicit_head_dim is not None:
            if self.explicit_head_dim < 2 or self.explicit_head_dim % 2:
                raise ValueError(f"LlamaConfig: explicit_head_dim {self.explicit_head_dim} must be even and positive")
        elif self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"LlamaConfig: dim {self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % kv_heads:
            raise ValueError(f"LlamaConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {kv_heads}")
        if min(self.dim, self.n_layers, self.vocab_size, self.multiple_of, self.max_seq_len) < 1:
            raise ValueError(f"LlamaConfig: sizes must be positive, got {self}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LlamaConfig:
        """One of `LLAMA_PRESETS` ("llama-7b", "llama-13b", "llama2-7b", "llama2-13b", "llama3.1-8b",
        "llama3.2-1b", "llama3.2-3b", "tiny")."""
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; known: {sorted(LLAMA_PRESETS)}")
        return replace(LLAMA_PRESETS[name], **overrides)


LLAMA_PRESETS = {
    "llama-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5),
    # The published params.json / config.json of each (the 3.2 models tie their output head).
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                               ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 8.0)),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                               ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 32.0)),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                               ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 32.0)),
    # The demo's and the tests' model: small enough to pretrain on a CPU in a minute.
    "tiny": LlamaConfig(dim=128, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32),
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (Meta's code), returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """The inverse frequencies [head_dim / 2] fp32, theta^(-2i / head_dim), scaled as `scaling`
    says; the same fp32 arithmetic as transformers, so the angles agree to the last bit."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    context, factor = scaling.original_max_position_embeddings, scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, scaled)


def rope_angles(head_dim: int, positions: Tensor, theta: float,
                scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, [*positions.shape, head_dim / 2] fp32 (positions [L],
    or [B, L] when every row has its own, as packed rows do): position p, pair i turns by
    p * f_i (`rope_frequencies`)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent pair (x_{2i}, x_{2i+1}) of x [B, L, H, Dh] by its angle (Meta's
    complex multiplication written in reals; cos, sin [L, Dh/2] or [B, L, Dh/2]). Computed in
    fp32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)                 # broadcast over heads
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


@dataclass
class LayerCache:
    """One layer's keys and values for decoding ([B, max_len, Hkv, Dh], allocated at the first
    write with the shapes that arrive: local heads under tensor parallelism) and the routing
    weights its adapter computed when position 0 went through."""

    max_len: int
    k: Tensor | None = None
    v: Tensor | None = None
    routing: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v [B, L, Hkv, Dh] at positions start_pos..; return all keys and values so far."""
        end = start_pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        if self.k is None:
            self.k = k.new_zeros((k.shape[0], self.max_len, *k.shape[2:]))
            self.v = v.new_zeros((v.shape[0], self.max_len, *v.shape[2:]))
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        return self.k[:, :end], self.v[:, :end]


@dataclass
class KVCache:
    """Keys, values and adapter routing of every layer, for incremental decoding."""

    n_layers: int
    max_len: int
    layers: list[LayerCache] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = [LayerCache(self.max_len) for _ in range(self.n_layers)]


class Attention(nn.Module):
    """Causal multi-head attention with rotary embeddings; wq [H Dh, d], wk/wv [Hkv Dh, d], wo [d, H Dh]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Segments, start_pos: int = 0,
                cache: LayerCache | None = None) -> Tensor:
        """x [B, L, d] laid out as `segments` says -> [B, L, d]. With `segments.isolate_first`,
        LaVIN's mask (nobody attends to a sample's first slot, which sees only itself)."""
        batch, length, _ = x.shape
        q = apply_rope(self.wq(x).view(batch, length, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(batch, length, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(batch, length, -1, self.head_dim)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        if not segments.one_per_row:
            if cache is not None:
                raise ValueError("Attention: packed rows cannot be decoded with a KV cache")
            out = packed_attention(q, k, v, segments)
        elif segments.isolate_first:
            out = isolated_first_attention(q, k, v, start_pos=start_pos)
        else:
            out = attention(q, k, v, causal=True)
        return self.wo(out.reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1, w3 [hidden, d], w2 [d, hidden]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """h = x + attention(adapter_attn(attention_norm(x))); out = h + feed_forward(ffn_norm(h)).

    `adapter_attn` (None in a plain LLaMA) is called as adapter(x, weights, first=...,
    routing_index=...) and exposes the routing weights it used as `last_routing` (the
    `MMAdapter` contract). Its router reads each sample's first slot, so with a cache the
    weights computed while position 0 went through are kept and passed back in at later
    positions (REFERENCE.md section 3: they depend on the modality token alone).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.adapter_attn: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Segments, start_pos: int = 0,
                cache: LayerCache | None = None) -> Tensor:
        h = self.attention_norm(x)
        if self.adapter_attn is not None:
            if cache is not None and start_pos > 0:
                if cache.routing is None:
                    raise ValueError("decoding past position 0 needs the routing cached at position 0")
                h = self.adapter_attn(h, weights=cache.routing)
            else:
                h = self.adapter_attn(h, first=segments.first, routing_index=segments.routing_index)
                if cache is not None:
                    cache.routing = self.adapter_attn.last_routing
        x = x + self.attention(h, cos, sin, segments, start_pos, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """LLaMA: `forward(tokens [B, L]) -> logits [B, L, vocab]` (fp32), a plain language model.

    Meta's parameter names: tok_embeddings, layers.N.{attention.{wq,wk,wv,wo}, feed_forward.
    {w1,w2,w3}, attention_norm, ffn_norm}, norm, output. `gradient_checkpointing = True`
    recomputes each layer in the backward pass when training.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def hidden_states(self, tokens: Tensor | None = None, *, embeddings: Tensor | None = None, start_pos: int = 0,
                      cache: KVCache | None = None, isolate_first: bool = False,
                      segments: Segments | None = None, rope_offset: int = 0) -> Tensor:
        """The final-normed hidden states [B, L, d] of `tokens` [B, L] or of `embeddings`
        [B, L, d] placed at positions start_pos.. (with `cache`, earlier positions are read
        from it and these are added to it). `rope_offset` shifts the rotary positions against
        the cache's (-1 reproduces the reference's decode steps, REFERENCE.md section 9).

        segments: where the samples sit in the rows (packed rows); None is one sample per row,
        isolated first as `isolate_first` says (given segments carry their own choice)."""
        if (tokens is None) == (embeddings is None):
            raise ValueError("Transformer: pass exactly one of tokens or embeddings")
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings
        if h.dim() != 3 or h.shape[-1] != self.config.dim:
            raise ValueError(f"Transformer: expected [batch, length, {self.config.dim}] embeddings, got {tuple(h.shape)}")
        if segments is None:
            segments = Segments.build(None, h.shape[0], h.shape[1], h.device, start_pos=start_pos,
                                      isolate_first=isolate_first)
        elif tuple(segments.positions.shape) != tuple(h.shape[:2]):
            raise ValueError(f"Transformer: segments of {tuple(segments.positions.shape)} slots for a batch of "
                             f"{tuple(h.shape[:2])}")
        cos, sin = rope_angles(self.config.head_dim, segments.positions + rope_offset, self.config.rope_theta,
                               self.config.rope_scaling)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            # Only h is positional: a tensor-parallel plan sees one input per layer (keyword
            # arguments pass through its input preparation untouched).
            extra = dict(cos=cos, sin=sin, segments=segments, start_pos=start_pos, cache=layer_cache)
            if checkpointed:
                h = checkpoint(layer, h, use_reentrant=False, **extra)
            else:
                h = layer(h, **extra)
        return self.norm(h)

    def forward(self, tokens: Tensor | None = None, **kwargs) -> Tensor:
        """Logits [B, L, vocab] in fp32; keyword arguments as in `hidden_states`."""
        return self.output(self.hidden_states(tokens, **kwargs)).float()

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, max_len or self.config.max_seq_len)
