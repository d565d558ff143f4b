"""lavin_fast: fused Triton kernels and a minimal LaVIN for Mixture-of-Modality Adaptation.

The Triton sources live in the top-level ``kernels/`` folder (the layout agreed with our users)
and are installed inside the package namespace as ``lavin_fast.kernels``.
"""
from setuptools import find_packages, setup

setup(
    name="lavin_fast",
    version="0.1.0",
    description="Fast, faithful Mixture-of-Modality Adaptation (LaVIN) with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lavin_fast", "lavin_fast.*"]) + ["lavin_fast.kernels", "lavin_fast.csrc"],
    package_dir={"lavin_fast": "lavin_fast", "lavin_fast.kernels": "kernels", "lavin_fast.csrc": "csrc"},
    # The C++ sources ship as data: lavin_fast.native compiles them with ninja on first use (no
    # build step at install, so a CPU install never builds against another torch).
    package_data={"lavin_fast.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        # A range, not a pin: GPU users keep the CUDA build they already have.
        "torch>=2.6,<2.15",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "ninja",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",  # Hugging Face tokenizer.json (LLaMA-3.x)
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers>=4.45"],
        "flash": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["lavin-fast=lavin_fast.cli:main"]},
)
