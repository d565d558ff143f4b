"""CLIP's vision transformer, as LaVIN uses it: the CLS token read after a few blocks.

    x = ln_pre([class_embedding; conv1(image) patches] + positional_embedding)   [B, 1 + P, W]
    for block k = 1..K:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    features = [x_k[:, 0] for k in taps]                                           [B, T, W]

No ln_post, no proj and no text tower: LaVIN feeds the raw CLS tokens after blocks
4, 8, ..., 24 of ViT-L/14 to its neck (REFERENCE.md section 3). Every block has an adapter
slot before attention, `x = x + attn(adapter_attn(ln_1(x)))` (section 2), empty unless LaVIN
fills it.

Layout is batch-first, [B, L, W], unlike OpenAI's sequence-first [L, B, W]. Weights load from
OpenAI and Hugging Face checkpoints through `lavin_fast.checkpoints.clip.load_clip`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lavin_fast.models.attention import attention

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class ViTConfig:
    """Shape of a CLIP vision tower. `taps` are 1-based block indices after which the CLS token
    is read; blocks after the last tap are not run. `activation`: "quick_gelu" (OpenAI CLIP,
    x * sigmoid(1.702 x)) or "gelu" (exact, erf-based), as Hugging Face configs name them."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    taps: tuple[int, ...] = (4, 8, 12, 16, 20, 24)
    activation: str = "quick_gelu"
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.taps = tuple(self.taps)
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ViTConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if (not self.taps or any(not isinstance(t, int) for t in self.taps)
                or list(self.taps) != sorted(set(self.taps)) or not 1 <= self.taps[0] <= self.taps[-1] <= self.layers):
            raise ValueError(
                f"ViTConfig: taps must be strictly increasing block indices in 1..{self.layers}, got {self.taps}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @classmethod
    def vit_l14(cls, **overrides) -> ViTConfig:
        """OpenAI CLIP ViT-L/14 at 224 px, LaVIN's vision tower."""
        return cls.from_preset("ViT-L/14", **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ViTConfig:
        """One of OpenAI's CLIP vision towers by its OpenAI name (`VIT_PRESETS`: "ViT-B/32",
        "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"; Hugging Face's openai/clip-vit-* are the same
        weights), tapped by the rule of `default_taps` unless overrides say otherwise."""
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(VIT_PRESETS)}")
        shape = VIT_PRESETS[name]
        return cls(**{**shape, "taps": default_taps(shape["layers"]), **overrides})


# (image size, patch, width, blocks, heads) as OpenAI published them; positions 1 + (size / patch)^2.
VIT_PRESETS = {
    "ViT-B/32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12),        # 50 positions
    "ViT-B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12),        # 197
    "ViT-L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16),       # 257
    "ViT-L/14@336px": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16),  # 577
}


def default_taps(layers: int) -> tuple[int, ...]:
    """The blocks whose CLS tokens feed the neck by default: six evenly spaced ones, block
    floor(k * layers / 6) for k = 1..6. For ViT-L/14's 24 blocks that is LaVIN's 4, 8, ..., 24
    (REFERENCE.md section 3); for the 12 blocks of ViT-B/16 and B/32, 2, 4, ..., 12 (the same
    relative depths)."""
    if layers < 6:
        raise ValueError(f"default_taps: a tower of {layers} blocks (< 6) has no six evenly spaced taps: "
                         "pass taps explicitly")
    return tuple(layers * i // 6 for i in range(1, 7))


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (its weights were trained with it)."""
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with one fused qkv projection.

    in_proj.weight [3W, W] stacks the q, k, v rows in that order (OpenAI's `in_proj_weight`).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, L, W] -> [B, L, W]."""
        batch, length, width = x.shape
        q, k, v = self.in_proj(x).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        out = attention(q, k, v, causal=False)  # [B, L, H, Dh]
        return self.out_proj(out.reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block with an optional adapter before attention:

        x = x + attn(adapter_attn(ln_1(x)))      (adapter_attn skipped when None)
        x = x + mlp(ln_2(x))

    LaVIN puts an MMAdapter in `adapter_attn`, routing as `LaVINConfig.vit_routing` says. The
    reference's ViT is sequence-first ([L, B, W]), so its `x[:, 0]` is the whole sequence of
    *sample 0* and its Conv1d takes L as the batch: token l of every sample is routed by token l
    of sample 0 (REFERENCE.md section 2). "token" routing (each token by itself) is that at
    batch size 1 without the coupling; "batch0" reproduces the coupling; "cls" routes each
    sample by its own CLS token.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.attn = Attention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.mlp = MLP(config.width, config.mlp_hidden, config.activation)
        self.adapter_attn: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, L, W] -> [B, L, W]."""
        h = self.ln_1(x)
        if self.adapter_attn is not None:
            h = self.adapter_attn(h)
        x = x + self.attn(h)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """CLIP's vision trunk returning the CLS token after each tap block.

    Parameters (OpenAI's names, batch-first): conv1.weight [W, 3, p, p] (no bias),
    class_embedding [W], positional_embedding [1 + (S/p)^2, W], ln_pre, blocks.N.{ln_1, attn.in_proj,
    attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}. `gradient_checkpointing = True` recomputes each
    block's activations in the backward pass when training.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        # OpenAI's init; real weights replace it (load_clip builds on the meta device).
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1 + config.grid ** 2, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.ln_eps)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))
        self.gradient_checkpointing = False

    def forward(self, images: Tensor) -> Tensor:
        """images: [B, 3, S, S] float, preprocessed (`lavin_fast.images.preprocess`) ->
        CLS features [B, len(taps), W] in the model's dtype."""
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"VisionTransformer: images must be [batch, 3, {size}, {size}], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"VisionTransformer: images must be floating point (normalised), got {images.dtype}")
        x = self.conv1(images.to(self.conv1.weight.dtype))           # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)                               # [B, g*g, W]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        taps = set(self.config.taps)
        features = []
        for index, block in enumerate(self.blocks[: self.config.taps[-1]], start=1):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index in taps:
                features.append(x[:, 0])
        return torch.stack(features, dim=1)
