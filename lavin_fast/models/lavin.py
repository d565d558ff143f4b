"""LaVIN (Luo et al., NeurIPS 2023): a frozen LLaMA and a frozen CLIP ViT joined by MM-Adapters.

    features = vit(image)                        [B, 6, 1024]  CLS after blocks 4, 8, .., 24,
                                                               an MMAdapter before every attention
    v1..v6   = adapter_proj(features)            [B, 6, d]     the visual neck (Eq. 6)
    t_m      = adapter_modality_embedding(1 if image else 0)
    h        = [t_m, BOS, "Image: ", v1..v6, prompt, answer] (REFERENCE.md section 3)
    logits   = llama(h), an MMAdapter before every attention, t_m isolated in the mask

Only the adapters, the neck and the modality embedding train (every parameter whose name holds
"adapter", as in the reference): 3,781,296 for 7B, 5,390,080 for 13B (REFERENCE.md section 4).
Text-only samples skip the vision tower. The modality token at position 0 is seen by nobody
but itself, so each layer's router, which reads position 0, depends on the modality alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavin_fast.collate import IGNORE, Batch
from lavin_fast.models.llama import KVCache, LlamaConfig, Transformer
from lavin_fast.models.vit import ViTConfig, VisionTransformer
from lavin_fast.modules import MMAdapter, VisualNeck

TRAINABLE_MARK = "adapter"
PRESETS = ("7b", "13b", "tiny")          # the names of LaVINConfig.from_preset


@dataclass
class LaVINConfig:
    """The whole model: the two backbones' shapes and the adapters' hyper-parameters.

    temperature: the routers' softmax temperature (10 for 7B, 5 for 13B in the paper); the
    same for the LLaMA's and the ViT's adapters, as in the reference.
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

    @property
    def image_tokens(self) -> int:
        return len(self.vit.taps)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LaVINConfig:
        """"7b" (LLaMA-7B), "13b" (LLaMA-13B), both with CLIP ViT-L/14, or "tiny" (the demo's)."""
        presets = {
            "7b": lambda: cls(llama=LlamaConfig.from_preset("llama-7b"), vit=ViTConfig.vit_l14(), temperature=10.0),
            "13b": lambda: cls(llama=LlamaConfig.from_preset("llama-13b"), vit=ViTConfig.vit_l14(), temperature=5.0),
            "tiny": lambda: cls(llama=LlamaConfig.from_preset("tiny"),
                                vit=ViTConfig(image_size=56, patch_size=14, width=128, layers=6, heads=2,
                                              taps=(1, 2, 3, 4, 5, 6)),
                                neck_hidden=32),
        }
        if name not in presets:
            raise ValueError(f"unknown LaVIN preset {name!r}; known: {sorted(presets)}")
        return dataclasses.replace(presets[name](), **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LaVINConfig:
        values = dict(values)
        llama = LlamaConfig(**values.pop("llama"))
        vit = ViTConfig(**{**values.pop("vit")})
        return cls(llama=llama, vit=vit, **values)


class LaVIN(nn.Module):
    """The assembled model. Build it from a config (random backbones, e.g. under
    `torch.device("meta")` or for tests) or hand it loaded backbones (`from_pretrained`)."""

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
            block.adapter_attn = self._adapter(width)
        for layer in self.llama.layers:
            layer.adapter_attn = self._adapter(dim)
        self.adapter_proj = VisualNeck(width, config.neck_hidden, dim, config.neck_activation)
        self.adapter_modality_embedding = nn.Embedding(2, dim)
        self.freeze_backbone()

    @classmethod
    def from_pretrained(cls, llama: str | Path, clip: str | Path, adapters: str | Path | None = None, *,
                        preset: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", max_seq_len: int = 512,
                        parallelize: Callable[[LaVIN], None] | None = None, **overrides) -> LaVIN:
        """LaVIN on real backbones: `llama` a Meta or Hugging Face folder (`open_llama`), `clip` an
        OpenAI file or Hugging Face folder (`load_clip`), `adapters` (optional) a lavin_fast adapter
        file or the reference's `checkpoint-E.pth` (`load_adapters`).

        Adapter hyper-parameters come from the adapter file when it is lavin_fast's, else from
        `preset` ("7b", "13b", "tiny"; default by the LLaMA's width: 5120 -> "13b", else "7b")
        and the reference checkpoint's recorded temperature, then from `overrides`. dtype
        converts the frozen backbones; the trainable parameters are created in fp32 on `device`.
        Loading is strict throughout.

        parallelize: applied to the assembled model while the LLaMA is still on the meta device
        (e.g. `lavin_fast.parallel.apply_tensor_parallel`); the LLaMA's weights are then read
        into whatever it made of them, so under tensor parallelism each rank reads only its shard.
        """
        from lavin_fast.checkpoints.adapters import (
            is_lavin_fast_file,
            load_adapters,
            read_adapter_config,
            read_reference_args,
        )
        from lavin_fast.checkpoints.clip import load_clip
        from lavin_fast.checkpoints.llama import load_llama_weights, open_llama

        source = open_llama(llama, max_seq_len=max_seq_len)
        with torch.device("meta"):
            llama_model = Transformer(source.config)
        vit = load_clip(clip, dtype=dtype, device=device)
        if adapters is not None and is_lavin_fast_file(adapters):
            base = read_adapter_config(adapters)
        else:
            base = LaVINConfig.from_preset(preset or ("13b" if source.config.dim == 5120 else "7b"))
            if adapters is not None and "temperature" in (args := read_reference_args(adapters)):
                base = dataclasses.replace(base, temperature=float(args["temperature"]))
        config = dataclasses.replace(base, llama=source.config, vit=vit.config, **overrides)
        with torch.device(device):
            model = cls(config, llama=llama_model, vit=vit)
        if adapters is not None:
            load_adapters(model, adapters)
        if parallelize is not None:
            parallelize(model)
        load_llama_weights(model.llama, source, dtype=dtype, device=device)
        return model

    def save_adapters(self, path: str | Path) -> Path:
        """The trainable parameters and the config as one safetensors file (`checkpoints.adapters`)."""
        from lavin_fast.checkpoints.adapters import save_adapters

        return save_adapters(self, path)

    def load_adapters(self, path: str | Path) -> None:
        """Strictly load a lavin_fast adapter file or the reference's `checkpoint-E.pth`."""
        from lavin_fast.checkpoints.adapters import load_adapters

        load_adapters(self, path)

    def _adapter(self, dim: int) -> MMAdapter:
        c = self.config
        return MMAdapter(dim, c.adapter_hidden, c.adapter_groups, c.adapter_scale, c.temperature, c.adapter_dropout)

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

    def embed(self, tokens: Tensor, has_image: Tensor, images: Tensor | None, image_start: int) -> Tensor:
        """The input sequence [B, L, d]: token embeddings with t_m at position 0 and, for image
        samples, the neck's outputs at image_start .. image_start + 5.

        tokens [B, L] (layout of `lavin_fast.collate`); has_image [B] bool; images
        [has_image.sum(), 3, S, S] in the order of the image samples."""
        if tokens.dim() != 2 or has_image.shape != tokens.shape[:1] or has_image.dtype != torch.bool:
            raise ValueError(f"LaVIN.embed: tokens must be [B, L] and has_image [B] bool, got "
                             f"{tuple(tokens.shape)} and {has_image.dtype} {tuple(has_image.shape)}")
        n_images = int(has_image.sum())
        if n_images != (0 if images is None else images.shape[0]):
            raise ValueError(f"LaVIN.embed: {n_images} samples have an image but "
                             f"{0 if images is None else images.shape[0]} images were given")
        h = self.llama.tok_embeddings(tokens)
        t_m = self.adapter_modality_embedding(has_image.long()).to(h.dtype)
        h = torch.cat([t_m[:, None], h[:, 1:]], dim=1)
        if n_images:
            end = image_start + self.config.image_tokens
            if end > tokens.shape[1]:
                raise ValueError(f"LaVIN.embed: image slots {image_start}..{end} do not fit in length {tokens.shape[1]}")
            visual = self.adapter_proj(self.vit(images)).to(h.dtype)             # [n_images, 6, d]
            rows = has_image.nonzero().squeeze(1)
            h = h.index_put((rows[:, None], torch.arange(image_start, end, device=h.device)[None, :]), visual)
        else:  # no image went in: the ViT's routing of an earlier batch must not be reported
            for block in self.vit.blocks:
                if block.adapter_attn is not None:
                    block.adapter_attn.last_routing = None
        return h

    def hidden_states(self, batch: Batch, cache: KVCache | None = None) -> Tensor:
        """Final-normed LLaMA hidden states [B, L, d] of a collated batch."""
        h = self.embed(batch.tokens, batch.has_image, batch.images, batch.image_start)
        return self.llama.hidden_states(embeddings=h, cache=cache, isolate_first=True)

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
        and "vit" [blocks, B_images, 2] (blocks that ran; missing when no image went in)."""
        weights = {}
        for name, blocks in (("llama", self.llama.layers), ("vit", self.vit.blocks)):
            seen = [b.adapter_attn.last_routing for b in blocks if b.adapter_attn.last_routing is not None]
            if seen:
                weights[name] = torch.stack(seen)
        return weights
