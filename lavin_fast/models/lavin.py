"""LaVIN (Luo et al., NeurIPS 2023): a frozen LLaMA and a frozen CLIP ViT joined by MM-Adapters.

    features = vit(image)                        [B, 6, 1024]  CLS after blocks 4, 8, .., 24,
                                                               an MMAdapter before every attention
    v1..v6   = adapter_proj(features)            [B, 6, d]     the visual neck (Eq. 6)
    t_m      = adapter_modality_embedding(1 if image else 0)
    h        = [t_m, BOS, "Image: ", v1..v6, prompt, answer] (REFERENCE.md section 3)
    logits   = llama(h), an MMAdapter before every attention, t_m isolated in the mask

Only the adapters, the neck and the modality embedding train (every parameter whose name holds
"adapter", as in the reference): 3,781,296 for 7B, 5,390,080 for 13B (REFERENCE.md section 4);
the presets of LLaMA-2 and LLaMA-3.x (`LAVIN_PRESETS`) and their counts are in the README.
Text-only samples skip the vision tower. The modality token at position 0 is seen by nobody
but itself, so each layer's router, which reads position 0, depends on the modality alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavin_fast.collate import IGNORE, Batch
from lavin_fast.models.llama import KVCache, LlamaConfig, Transformer
from lavin_fast.models.segments import Segments
from lavin_fast.models.vit import ViTConfig, VisionTransformer
from lavin_fast.modules import ROUTING_MODES, MMAdapter, VisualNeck

TRAINABLE_MARK = "adapter"
PRESETS = ("7b", "13b", "tiny")          # the names of LaVINConfig.from_preset


@dataclass
class LaVINConfig:
    """The whole model: the two backbones' shapes and the adapters' hyper-parameters.

    temperature: the routers' softmax temperature (10 for 7B, 5 for 13B in the paper); the
    same for the LLaMA's and the ViT's adapters, as in the reference.

    vit_routing: what the ViT's routers read (the LLaMA's always read the modality token):
    "token" (default): every ViT token by its own features, independent of the rest of the
    batch; the reference's routing at batch size 1, so what its checkpoints were trained and
    evaluated with there. "cls": each image by its CLS token (lavin_fast before it recorded
    the mode). "batch0": token l of every image by token l of the batch's first sample, the
    reference's quirk at any batch size (its ViT runs sequence-first, REFERENCE.md section 2),
    only to reproduce its published evaluations.
    """

    llama: LlamaConfig = field(default_factory=LlamaConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    adapter_hidden: int = 8
    adapter_groups: int = 2
    adapter_scale: float = 1.0
    temperature: float = 10.0
    adapter_dropout: float = 0.1
    neck_hidden: int = 128
    neck_activation: str = "silu"
    vit_routing: str = "token"

    def __post_init__(self) -> None:
        if self.vit_routing not in ROUTING_MODES:
            raise ValueError(f"LaVINConfig: vit_routing must be one of {ROUTING_MODES}, got {self.vit_routing!r}")

    @property
    def image_tokens(self) -> int:
        return len(self.vit.taps)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LaVINConfig:
        """"7b" (LLaMA-7B), "13b" (LLaMA-13B), both with CLIP ViT-L/14, "tiny" (the demo's), or a
        newer LLaMA with ViT-L/14 at 224 px or, suffixed "-336", at 336 px (LLaVA-1.5's
        pairing): "llama2-7b", "llama2-13b", "llama3.1-8b", "llama3.2-1b", "llama3.2-3b"
        (`LAVIN_PRESETS`). The router temperature is the paper's: 5 for the 13B models, else 10."""
        if name not in LAVIN_PRESETS:
            raise ValueError(f"unknown LaVIN preset {name!r}; known: {sorted(LAVIN_PRESETS)}")
        if name == "tiny":
            base = cls(llama=LlamaConfig.from_preset("tiny"),
                       vit=ViTConfig(image_size=56, patch_size=14, width=128, layers=6, heads=2, taps=(1, 2, 3, 4, 5, 6)),
                       neck_hidden=32)
        else:
            llama, vit = LAVIN_PRESETS[name]
            base = cls(llama=LlamaConfig.from_preset(llama), vit=ViTConfig.from_preset(vit),
                       temperature=5.0 if llama.endswith("13b") else 10.0)
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LaVINConfig:
        values = dict(values)
        llama = LlamaConfig(**values.pop("llama"))
        vit = ViTConfig(**{**values.pop("vit")})
        return cls(llama=llama, vit=vit, **values)


# LaVIN preset -> (LLaMA preset, CLIP preset); "tiny" is built in `LaVINConfig.from_preset`.
LAVIN_PRESETS: dict[str, tuple[str, str] | None] = {
    "7b": ("llama-7b", "ViT-L/14"),
    "13b": ("llama-13b", "ViT-L/14"),
    "tiny": None,
    **{f"{llama}{suffix}": (llama, vit)
       for llama in ("llama2-7b", "llama2-13b", "llama3.1-8b", "llama3.2-1b", "llama3.2-3b")
       for suffix, vit in (("", "ViT-L/14"), ("-336", "ViT-L/14@336px"))},
}


class LaVIN(nn.Module):
    """The assembled model. Build it from a config (random backbones, e.g. under
    `torch.device("meta")` or for tests) or hand it loaded backbones (what
    `lavin_fast.checkpoints.lavin.load_lavin` does; adapter files: `checkpoints.adapters`)."""

    def __init__(self, config: LaVINConfig, llama: Transformer | None = None,
                 vit: VisionTransformer | None = None) -> None:
        super().__init__()
        self.config = config
        self.llama = llama if llama is not None else Transformer(config.llama)
        self.vit = vit if vit is not None else VisionTransformer(config.vit)
        if self.llama.config.dim != config.llama.dim or self.vit.config.width != config.vit.width:
            raise ValueError("LaVIN: the backbones given do not have the config's widths")
        dim, width = config.llama.dim, config.vit.width
        # Adapters are created on the default device; the backbones may live elsewhere (meta).
        for block in self.vit.blocks:
            block.adapter_attn = self._adapter(width, config.vit_routing)
        for layer in self.llama.layers:
            layer.adapter_attn = self._adapter(dim, "cls")   # by the modality token
        self.adapter_proj = VisualNeck(width, config.neck_hidden, dim, config.neck_activation)
        self.adapter_modality_embedding = nn.Embedding(2, dim)
        self.freeze_backbone()

    def _adapter(self, dim: int, routing: str) -> MMAdapter:
        c = self.config
        return MMAdapter(dim, c.adapter_hidden, c.adapter_groups, c.adapter_scale, c.temperature, c.adapter_dropout,
                         routing)

    # ---- what trains -----------------------------------------------------------------------------

    def freeze_backbone(self) -> None:
        """requires_grad on exactly the adapters, the neck and the modality embedding."""
        for name, param in self.named_parameters():
            param.requires_grad_(TRAINABLE_MARK in name)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained parameters by name (what `save_adapters` writes)."""
        return {name: param for name, param in self.named_parameters() if param.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def set_backbone_dtype(self, dtype: torch.dtype) -> LaVIN:
        """Frozen weights to `dtype` (bf16/fp16 for training); trainable ones stay fp32."""
        for param in self.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        return self.llama.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.llama.gradient_checkpointing = self.vit.gradient_checkpointing = on

    # ---- forward ------------------------------------------------------------------------------------

    def embed(self, tokens: Tensor, has_image: Tensor, images: Tensor | None, image_start: int,
              segments: Segments | None = None) -> Tensor:
        """The input sequence [B, L, d]: token embeddings with each sample's t_m at its first
        slot and, for image samples, the neck's outputs at image_start .. image_start + 5 of it.

        tokens [B, L] (layout of `lavin_fast.collate`); segments: where its S samples sit (None:
        one per row); has_image [S] bool; images [has_image.sum(), 3, S, S] in sample order."""
        if tokens.dim() == 2 and segments is None:
            segments = Segments.build(None, *tokens.shape, tokens.device)
        samples = segments.num_samples if segments is not None else None
        if tokens.dim() != 2 or has_image.shape != (samples,) or has_image.dtype != torch.bool:
            raise ValueError(f"LaVIN.embed: tokens must be [B, L] and has_image [samples] bool, got "
                             f"{tuple(tokens.shape)} and {has_image.dtype} {tuple(has_image.shape)}"
                             + (f" for {samples} samples" if samples is not None else ""))
        n_images = int(has_image.sum())
        if n_images != (0 if images is None else images.shape[0]):
            raise ValueError(f"LaVIN.embed: {n_images} samples have an image but "
                             f"{0 if images is None else images.shape[0]} images were given")
        h = self.llama.tok_embeddings(tokens)
        rows, length, dim = h.shape
        t_m = self.adapter_modality_embedding(has_image.long()).to(h.dtype)
        flat = h.reshape(rows * length, dim).index_put((segments.first,), t_m)
        if n_images:
            image_first = segments.first[has_image]
            end = image_start + self.config.image_tokens
            sample_of = segments.sample_of.flatten()
            in_row = image_first % length + end <= length
            if not bool(in_row.all()) or bool((sample_of[image_first + end - 1] != sample_of[image_first]).any()):
                raise ValueError(f"LaVIN.embed: image slots {image_start}..{end} do not fit in every image sample "
                                 f"(rows of length {length})")
            if self.config.vit_routing == "batch0" and not has_image[0]:
                # The reference runs every sample through its ViT, a text-only one as a zero
                # image, and routes all by the first: so that zero image routes them here too.
                images = torch.cat([images.new_zeros(1, *images.shape[1:]), images])
                visual = self.adapter_proj(self.vit(images)[1:]).to(h.dtype)
            else:
                visual = self.adapter_proj(self.vit(images)).to(h.dtype)         # [n_images, 6, d]
            slots = image_first[:, None] + torch.arange(image_start, end, device=h.device)[None, :]
            flat = flat.index_put((slots,), visual)
        else:  # no image went in: the ViT's routing of an earlier batch must not be reported
            for block in self.vit.blocks:
                if block.adapter_attn is not None:
                    block.adapter_attn.last_routing = None
        return flat.view(rows, length, dim)

    def hidden_states(self, batch: Batch, cache: KVCache | None = None) -> Tensor:
        """Final-normed LLaMA hidden states [B, L, d] of a collated batch, padded or packed."""
        segments = Segments.build(batch.lengths, *batch.tokens.shape, batch.tokens.device, isolate_first=True)
        h = self.embed(batch.tokens, batch.has_image, batch.images, batch.image_start, segments)
        return self.llama.hidden_states(embeddings=h, cache=cache, segments=segments)

    def forward(self, batch: Batch) -> Tensor:
        """Logits [B, L, vocab] (fp32) of a collated batch."""
        return self.llama.output(self.hidden_states(batch)).float()

    def loss(self, batch: Batch) -> Tensor:
        """Mean cross-entropy over the batch's answer tokens and EOS (REFERENCE.md section 5).
        The output head runs on those positions only."""
        counted = batch.targets != IGNORE
        if not counted.any():   # the mean over no token is NaN
            raise ValueError("LaVIN.loss: the batch has no answer tokens (every target is IGNORE), "
                             "so it has no loss; leave such batches out")
        hidden = self.hidden_states(batch)
        logits = self.llama.output(hidden[counted]).float()
        return F.cross_entropy(logits, batch.targets[counted])

    def routing_weights(self) -> dict[str, Tensor]:
        """The routing weights of the last forward, per adapter stack: "llama" [layers, B, 2]
        and "vit" [blocks, B_images, 2] with vit_routing "cls", [blocks, B_images, tokens, 2]
        otherwise (blocks that ran; missing when no image went in; with "batch0" and a text-only
        first sample, its zero image comes first)."""
        weights = {}
        for name, blocks in (("llama", self.llama.layers), ("vit", self.vit.blocks)):
            seen = [b.adapter_attn.last_routing for b in blocks if b.adapter_attn.last_routing is not None]
            if seen:
                weights[name] = torch.stack(seen)
        return weights
