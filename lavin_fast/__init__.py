"""lavin_fast: Mixture-of-Modality Adaptation (LaVIN) with fused Triton kernels.

Public API (re-exported here; each name's module has the details):
- `MMAdapter`, `VisualNeck`: the trainable modules, reference-compatible state dicts.
- `mm_adapter`, `visual_neck`, `select_backend`: the functional forms and the backend choice.
"""
from lavin_fast.modules import MMAdapter, VisualNeck
from lavin_fast.ops import mm_adapter, select_backend, visual_neck

__version__ = "0.1.0"

__all__ = ["MMAdapter", "VisualNeck", "mm_adapter", "select_backend", "visual_neck"]
