"""Loading real checkpoints: Meta / Hugging Face LLaMA, OpenAI / Hugging Face CLIP, adapters."""
