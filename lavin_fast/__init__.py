"""lavin_fast: Mixture-of-Modality Adaptation (LaVIN) with fused Triton kernels.

Public API (re-exported here; each name's module has the details):
- `MMAdapter`, `VisualNeck`: the trainable modules, reference-compatible state dicts;
  `mm_adapter`, `visual_neck`, `select_backend`: their functional forms and the backend choice.
- `LaVIN`, `LaVINConfig`: the model (frozen LLaMA + frozen CLIP ViT + adapters), `load_lavin`:
  the whole model from real checkpoints;
  `Transformer`, `LlamaConfig`: the LLaMA; `VisionTransformer`, `ViTConfig`: the CLIP ViT.
- `load_llama`, `load_clip`: strict loaders of Meta / Hugging Face LLaMA and OpenAI / Hugging
  Face CLIP checkpoints; `save_adapters`, `load_adapters`: adapter files (and the reference's).
- `Tokenizer`, `generate`: the tokenizer (sentencepiece or a Hugging Face tokenizer.json) and
  batched KV-cache generation.
"""
from lavin_fast._version import __version__  # noqa: F401  (the package attribute)
from lavin_fast.backend import select_backend
from lavin_fast.checkpoints.adapters import load_adapters, save_adapters
from lavin_fast.checkpoints.clip import load_clip
from lavin_fast.checkpoints.lavin import load_lavin
from lavin_fast.checkpoints.llama import load_llama
from lavin_fast.collate import Batch, Collator, SequenceLayout
from lavin_fast.generation import generate
from lavin_fast.models.lavin import LaVIN, LaVINConfig
from lavin_fast.models.llama import LlamaConfig, Transformer
from lavin_fast.models.vit import ViTConfig, VisionTransformer
from lavin_fast.modules import MMAdapter, VisualNeck
from lavin_fast.ops import mm_adapter, visual_neck
from lavin_fast.tokenizer import Tokenizer


__all__ = [
    "Batch", "Collator", "LaVIN", "LaVINConfig", "LlamaConfig", "MMAdapter", "SequenceLayout", "Tokenizer",
    "Transformer", "ViTConfig", "VisionTransformer", "VisualNeck", "generate", "load_adapters", "load_clip",
    "load_lavin", "load_llama", "mm_adapter", "save_adapters", "select_backend", "visual_neck",
]
