"""The models LaVIN is built from: LLaMA, CLIP ViT, attention, and LaVIN itself."""
