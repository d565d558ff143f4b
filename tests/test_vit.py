"""CLIP vision tower, its checkpoint loaders and image preprocessing.

Oracles are independent of lavin_fast: a tiny `transformers.CLIPVisionModel` (Hugging Face's
code), and a module tree written here with OpenAI CLIP's attribute names, sequence-first and
built on `nn.MultiheadAttention` (OpenAI's code path), saved as a real TorchScript archive.
"""
from __future__ import annotations

import copy
import json
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from helpers import assert_close_to_oracle, requires_cuda
from lavin_fast.checkpoints.clip import load_clip
from lavin_fast.checkpoints.strict import CheckpointError
from lavin_fast.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess
from lavin_fast.models.vit import ViTConfig, VisionTransformer
from lavin_fast.modules import MMAdapter
from lavin_fast.scienceqa import DataError

TOL = dict(rtol=1e-5, atol=1e-5)


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial LayerNorm weights and biases everywhere (inits are 1 and 0, which would hide
    a swapped or dropped LayerNorm / bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return module.eval()


# ---- the Hugging Face oracle ----------------------------------------------------------------------

def _transformers():
    """The Hugging Face oracle (a test extra; the GPU machine may not have it)."""
    return pytest.importorskip("transformers")


def _trunk(model: nn.Module) -> nn.Module:
    """The module holding `encoder`: CLIPVisionModel itself in transformers 5, its
    `vision_model` in 4.x and in CLIPModel."""
    return getattr(model, "vision_model", model)


def _prefix(model: nn.Module) -> str:
    """'vision_model.' where this transformers version's state dict has it."""
    return "vision_model." if any(key.startswith("vision_model.") for key in model.state_dict()) else ""


def _hf_model(act: str = "quick_gelu", width: int = 64, heads: int = 2, layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    transformers = _transformers()
    config = transformers.CLIPVisionConfig(
        image_size=28, patch_size=14, hidden_size=width, intermediate_size=3 * width,
        num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act, layer_norm_eps=1e-5)
    return _perturb(transformers.CLIPVisionModel(config), seed)


def _hf_cls(model, images: torch.Tensor) -> list[torch.Tensor]:
    """CLS token entering the encoder (index 0) and after each block k (index k).

    Checked, not assumed: transformers' hidden_states are pre_layrnorm's output followed by
    each encoder layer's output, which forward hooks on those modules see independently."""
    trunk, hooked = _trunk(model), []
    modules = [trunk.pre_layrnorm, *trunk.encoder.layers]
    handles = [module.register_forward_hook(
        lambda _m, _i, out: hooked.append(out[0] if isinstance(out, tuple) else out)) for module in modules]
    with torch.no_grad():
        states = model(pixel_values=images, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    assert len(states) == len(hooked) == len(modules)
    for state, out in zip(states, hooked):
        torch.testing.assert_close(state, out, rtol=0, atol=0)
    return [state[:, 0] for state in states]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_vision_model_taps_match(tmp_path, act):
    model = _hf_model(act)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_clip(tmp_path, taps=(2, 3, 5)).eval()
    assert ours.config.activation == act and ours.config.heads == 2
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        features = ours(images)
    expected = _hf_cls(model, images)
    assert features.shape == (3, 3, 64)
    for i, k in enumerate((2, 3, 5)):
        torch.testing.assert_close(features[:, i], expected[k], **TOL)
    # the other convention would be off by one block: make sure the test tells them apart
    assert not torch.allclose(features[:, 0], expected[1], **TOL)


def test_blocks_after_last_tap_do_not_run(tmp_path):
    _hf_model().save_pretrained(tmp_path)
    ours = load_clip(tmp_path, taps=(1, 4)).eval()
    calls = []
    for index, block in enumerate(ours.blocks):
        block.register_forward_hook(lambda *_args, index=index: calls.append(index))
    ours(torch.randn(1, 3, 28, 28))
    assert calls == [0, 1, 2, 3]


def test_default_taps_are_six_evenly_spaced(tmp_path):
    _hf_model(layers=6).save_pretrained(tmp_path / "six")
    assert load_clip(tmp_path / "six").config.taps == (1, 2, 3, 4, 5, 6)
    _hf_model(layers=4).save_pretrained(tmp_path / "four")
    with pytest.raises(ValueError, match="pass taps"):
        load_clip(tmp_path / "four")
    for bad in [(0, 2), (3, 2), (2, 2), (7,), ()]:
        with pytest.raises(ValueError, match="taps"):
            load_clip(tmp_path / "six", taps=bad)



@pytest.mark.parametrize("preset, positions, taps", [
    ("ViT-L/14@336px", 577, (4, 8, 12, 16, 20, 24)),
    ("ViT-B/16", 197, (2, 4, 6, 8, 10, 12)),
    ("ViT-B/32", 50, (2, 4, 6, 8, 10, 12)),
])
def test_clip_sizes_match_transformers_with_the_tap_rule(tmp_path, preset, positions, taps):
    """Each OpenAI size (image, patch, blocks as published; narrow here to stay quick) loads
    from a Hugging Face folder with the preset's positions and taps, and its features are
    transformers' CLS tokens after those blocks."""
    shape = ViTConfig.from_preset(preset)
    transformers = _transformers()
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(
        image_size=shape.image_size, patch_size=shape.patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=shape.layers, num_attention_heads=2, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = _perturb(transformers.CLIPVisionModel(config), 1)
    model.save_pretrained(tmp_path)
    ours = load_clip(tmp_path).eval()
    assert ours.positional_embedding.shape[0] == positions == 1 + shape.grid ** 2
    assert ours.config.taps == shape.taps == taps
    images = torch.randn(1, 3, shape.image_size, shape.image_size)
    with torch.no_grad():
        features = ours(images)
    expected = _hf_cls(model, images)
    for i, k in enumerate(taps):
        torch.testing.assert_close(features[:, i], expected[k], **TOL)


def test_clip_presets_are_openais_published_shapes():
    """(image size, patch, width, blocks, heads) from OpenAI's CLIP model card."""
    published = {"ViT-B/32": (224, 32, 768, 12, 12), "ViT-B/16": (224, 16, 768, 12, 12),
                 "ViT-L/14": (224, 14, 1024, 24, 16), "ViT-L/14@336px": (336, 14, 1024, 24, 16)}
    for name, shape in published.items():
        config = ViTConfig.from_preset(name)
        assert (config.image_size, config.patch_size, config.width, config.layers, config.heads) == shape
        assert config.activation == "quick_gelu" and config.mlp_hidden == 4 * config.width
    assert ViTConfig.vit_l14() == ViTConfig()  # LaVIN's tower, the default
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        ViTConfig.from_preset("ViT-H/14")

def test_hf_full_clip_model_folder_and_prefixed_keys(tmp_path):
    """A CLIPModel folder (vision_config, vision_model.* keys, text tower) and a vision-only
    folder with the hub's `vision_model.` prefix, in safetensors and pytorch_model.bin."""
    torch.manual_seed(1)
    transformers = _transformers()
    vision = dict(image_size=28, patch_size=14, hidden_size=64, intermediate_size=192,
                  num_hidden_layers=6, num_attention_heads=2, hidden_act="gelu")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = _perturb(transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=vision, text_config=text, projection_dim=16)), 1)
    full.save_pretrained(tmp_path / "full")
    images = torch.randn(2, 3, 28, 28)
    expected = _hf_cls(full.vision_model, images)
    with torch.no_grad():
        features = load_clip(tmp_path / "full", taps=(1, 6)).eval()(images)
    torch.testing.assert_close(features[:, 0], expected[1], **TOL)
    torch.testing.assert_close(features[:, 1], expected[6], **TOL)

    vision_only = {k: v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    vision_only["vision_model.embeddings.position_ids"] = torch.arange(5)[None]  # old hub files have it
    for name, save in [("st", lambda sd, d: save_file(sd, d / "model.safetensors")),
                       ("bin", lambda sd, d: torch.save(sd, d / "pytorch_model.bin"))]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **vision}))
        save({k: v.contiguous() for k, v in vision_only.items()}, folder)
        with torch.no_grad():
            torch.testing.assert_close(load_clip(folder, taps=(1, 6)).eval()(images), features, rtol=0, atol=0)


# ---- the OpenAI oracle: OpenAI CLIP's module tree, sequence-first, nn.MultiheadAttention ----------

class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class OAIResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, B, W]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OAITransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[OAIResidualAttentionBlock(width, heads) for _ in range(layers)])


class OAIVisual(nn.Module):
    def __init__(self, image: int, patch: int, width: int, layers: int, out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OAITransformer(width, layers, width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token after every block: [layers, B, W]."""
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = x.permute(1, 0, 2)  # sequence-first, as OpenAI runs it
        cls_tokens = []
        for block in self.transformer.resblocks:
            x = block(x)
            cls_tokens.append(x[0])
        return torch.stack(cls_tokens)


class OAICLIP(nn.Module):
    """Vision part complete; a small text tower with OpenAI's names; the archive's bookkeeping
    buffers (OpenAI's build_model deletes them from the state dict)."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.visual = OAIVisual(image=28, patch=14, width=128, layers=layers, out=16)
        self.transformer = OAITransformer(64, 1, 1)
        self.token_embedding = nn.Embedding(50, 64)
        self.positional_embedding = nn.Parameter(torch.randn(8, 64))
        self.ln_final = nn.LayerNorm(64)
        self.text_projection = nn.Parameter(torch.randn(64, 16))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        for name, value in [("input_resolution", 28), ("context_length", 8), ("vocab_size", 50)]:
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


@pytest.fixture(scope="module")
def openai_clip():
    torch.manual_seed(2)
    model = OAICLIP()
    with torch.no_grad():
        model.visual.conv1.weight.mul_(0.2)  # keep activations O(1) through random blocks
    return _perturb(model, 2)


@pytest.fixture(scope="module")
def openai_files(openai_clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    torch.jit.script(openai_clip).save(str(folder / "ViT-tiny.pt"))
    state = {k: v.detach().clone() for k, v in openai_clip.state_dict().items()}
    torch.save(state, folder / "state.pth")
    torch.save(state, folder / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be mmapped
    save_file(state, folder / "state.safetensors")
    return folder


def test_openai_torchscript_archive_matches_openai_forward(openai_clip, openai_files):
    archive = openai_files / "ViT-tiny.pt"
    ours = load_clip(archive, taps=(1, 2, 3, 4)).eval()
    assert (ours.config.width, ours.config.layers, ours.config.heads, ours.config.image_size,
            ours.config.patch_size, ours.config.mlp_hidden) == (128, 4, 2, 28, 14, 512)
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = openai_clip(images)  # [layers, B, W]
        features = ours(images)
    torch.testing.assert_close(features, expected.transpose(0, 1), **TOL)


@pytest.mark.parametrize("name", ["state.pth", "legacy.pth", "state.safetensors"])
def test_openai_state_dict_files(openai_files, name):
    reference = load_clip(openai_files / "ViT-tiny.pt", taps=(2, 4)).state_dict()
    loaded = load_clip(openai_files / name, taps=(2, 4)).state_dict()
    assert reference.keys() == loaded.keys()
    for key in reference:
        torch.testing.assert_close(loaded[key], reference[key], rtol=0, atol=0)


def test_openai_and_hf_paths_agree_on_the_same_weights(openai_clip, openai_files, tmp_path):
    """OpenAI's weights rewritten under HF's names (q, k, v split here) give the same features
    through HF's own model and through both loaders; this also checks the two oracles agree."""
    transformers = _transformers()
    visual = openai_clip.visual.state_dict()
    hf_state = {
        "embeddings.patch_embedding.weight": visual["conv1.weight"],
        "embeddings.class_embedding": visual["class_embedding"],
        "embeddings.position_embedding.weight": visual["positional_embedding"],
        "pre_layrnorm.weight": visual["ln_pre.weight"], "pre_layrnorm.bias": visual["ln_pre.bias"],
        "post_layernorm.weight": visual["ln_post.weight"], "post_layernorm.bias": visual["ln_post.bias"],
    }
    for n in range(4):
        src, dst = f"transformer.resblocks.{n}.", f"encoder.layers.{n}."
        for p in ("weight", "bias"):
            q, k, v = visual[src + f"attn.in_proj_{p}"].chunk(3)
            hf_state.update({dst + f"self_attn.q_proj.{p}": q, dst + f"self_attn.k_proj.{p}": k,
                             dst + f"self_attn.v_proj.{p}": v,
                             dst + f"self_attn.out_proj.{p}": visual[src + f"attn.out_proj.{p}"],
                             dst + f"layer_norm1.{p}": visual[src + f"ln_1.{p}"],
                             dst + f"layer_norm2.{p}": visual[src + f"ln_2.{p}"],
                             dst + f"mlp.fc1.{p}": visual[src + f"mlp.c_fc.{p}"],
                             dst + f"mlp.fc2.{p}": visual[src + f"mlp.c_proj.{p}"]})
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=28, patch_size=14, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=2, hidden_act="quick_gelu")).eval()
    hf.load_state_dict({_prefix(hf) + k: v for k, v in hf_state.items()}, strict=True)
    hf.save_pretrained(tmp_path)

    images = torch.randn(2, 3, 28, 28)
    hf_cls = _hf_cls(hf, images)
    with torch.no_grad():
        openai_cls = openai_clip(images)
        from_openai = load_clip(openai_files / "ViT-tiny.pt", taps=(1, 2, 3, 4)).eval()(images)
        from_hf = load_clip(tmp_path, taps=(1, 2, 3, 4)).eval()(images)
    for k in range(1, 5):
        torch.testing.assert_close(hf_cls[k], openai_cls[k - 1], **TOL)
    torch.testing.assert_close(from_hf, from_openai, rtol=0, atol=0)


def test_dtype_conversion(openai_files):
    fp32 = load_clip(openai_files / "state.pth", taps=(4,))
    bf16 = load_clip(openai_files / "state.pth", taps=(4,), dtype=torch.bfloat16)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert b.dtype == torch.bfloat16, name
        torch.testing.assert_close(b, a.to(torch.bfloat16), rtol=0, atol=0)
    assert bf16(torch.randn(1, 3, 28, 28)).dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_bf16_error_within_twice_pytorch(openai_clip, openai_files, device):
    """bf16 features (SDPA's fused kernels on a GPU) against the float64 OpenAI forward: at most
    twice the error of OpenAI's own module tree run in bf16 on the same device."""
    images = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        oracle = copy.deepcopy(openai_clip).double()(images.double()).transpose(0, 1)
        baseline = copy.deepcopy(openai_clip).to(device, torch.bfloat16)(images.to(device, torch.bfloat16))
        ours = load_clip(openai_files / "ViT-tiny.pt", taps=(1, 2, 3, 4), dtype=torch.bfloat16, device=device)
        out = ours.eval()(images.to(device))
    assert out.dtype == torch.bfloat16 and out.device.type == device
    assert_close_to_oracle("ViT bf16 taps", out.cpu(), oracle, baseline.transpose(0, 1).cpu())


# ---- strictness -------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("visual.transformer.resblocks.1.mlp.c_fc.bias"), "visual.transformer.resblocks.1.mlp.c_fc.bias"),
    (lambda sd: sd.pop("visual.transformer.resblocks.2.attn.in_proj_weight"),
     "visual.transformer.resblocks.2.attn.in_proj_weight"),
    (lambda sd: sd.__setitem__("visual.adapter.weight", torch.zeros(3)), "visual.adapter.weight"),
    # only the known unused names are dropped: a text-tower-like stranger is still refused
    (lambda sd: sd.__setitem__("transformer.resblocks.0.attn.bias_k", torch.zeros(3)),
     "transformer.resblocks.0.attn.bias_k"),
    (lambda sd: sd.__setitem__("visual.transformer.resblocks.1.ln_3.weight", torch.zeros(128)),
     "visual.transformer.resblocks.1.ln_3.weight"),
    (lambda sd: sd.__setitem__("visual.ln_pre.weight", torch.zeros(64)), "visual.ln_pre.weight: checkpoint (64,)"),
    (lambda sd: sd.__setitem__("visual.transformer.resblocks.0.attn.in_proj_bias", torch.zeros(128)),
     "visual.transformer.resblocks.0.attn.in_proj_bias"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("visual.transformer.resblocks.2.")],
     "visual.transformer.resblocks.2.ln_1.weight"),  # a gap in the blocks
    (lambda sd: sd.pop("visual.conv1.weight"), "visual.conv1.weight"),
])
def test_openai_miskeyed_checkpoints_fail_naming_the_key(openai_files, tmp_path, edit, named):
    state = torch.load(openai_files / "state.pth", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_clip(tmp_path / "bad.pth", taps=(1,))


def test_hf_miskeyed_and_misconfigured_folders_fail(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path)
    state = {k.removeprefix(_prefix(model)): v.contiguous() for k, v in model.state_dict().items()}

    def attempt(state=state, config=None, match=""):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        save_file(state, folder / "model.safetensors")
        config = config or json.loads((tmp_path / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=re.escape(match)):
            load_clip(folder, taps=(1,))

    attempt({k: v for k, v in state.items() if k != "encoder.layers.2.self_attn.k_proj.weight"},
            match="encoder.layers.2.self_attn.k_proj.weight")
    attempt({**state, "encoder.layers.6.layer_norm1.weight": torch.ones(64)}, match="encoder.layers.6.layer_norm1.weight")
    attempt({**state, "encoder.layers.0.mlp.fc1.bias": torch.ones(7)}, match="encoder.layers.0.mlp.fc1.bias")
    config = json.loads((tmp_path / "config.json").read_text())
    attempt(config={**config, "hidden_act": "gelu_new"}, match="hidden_act 'gelu_new'")
    attempt(config={**config, "num_hidden_layers": 5}, match="encoder.layers.5.")
    attempt(config={**config, "image_size": 42}, match="embeddings.position_embedding.weight")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(empty)


def test_not_a_checkpoint(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list"):
        load_clip(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_clip(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip(tmp_path / "nowhere.pt")




def test_damaged_files_are_checkpoint_errors_naming_the_file(openai_files, tmp_path):
    """Truncated safetensors (a file, or a Hugging Face folder's), a config.json that is not JSON
    or whose vision_config is not an object: one CheckpointError naming the file."""
    data = (openai_files / "state.safetensors").read_bytes()
    for length in (5, len(data) // 2):
        (tmp_path / "cut.safetensors").write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "cut.safetensors"))):
            load_clip(tmp_path / "cut.safetensors")
    _hf_model().save_pretrained(tmp_path / "hf")
    model_file, config_file = tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"
    config = config_file.read_text()
    for text in ("{not json", "[1, 2]", json.dumps({"vision_config": "ViT-L/14"})):
        config_file.write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(str(config_file))):
            load_clip(tmp_path / "hf")
    config_file.write_text(config)
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=re.escape(str(model_file))):
        load_clip(tmp_path / "hf")


@pytest.mark.parametrize("save", ["pth", "safetensors", "hf"])
def test_integer_weights_are_refused_naming_the_key(openai_files, tmp_path, save):
    """Integer weights would break the forward (no dtype) or become other numbers (a dtype):
    refused either way; OpenAI's integer bookkeeping buffers, unused, are not weights."""
    if save == "hf":
        model = _hf_model()
        model.save_pretrained(tmp_path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        key = _prefix(model) + "encoder.layers.1.mlp.fc1.weight"
        path, file = tmp_path, tmp_path / "model.safetensors"
    else:
        state = torch.load(openai_files / "state.pth", weights_only=True)
        assert state["input_resolution"].dtype == torch.int64  # stays accepted
        key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
        path = file = tmp_path / f"bad.{save}"
    state[key] = (100 * state[key]).to(torch.int16)
    if save == "pth":
        torch.save(state, file)
    else:
        save_file(state, file)
    for dtype in (None, torch.float32):
        with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*not floating point: " + re.escape(key)):
            load_clip(path, taps=(1,), dtype=dtype)

# ---- TorchScript archives are read, never run -----------------------------------------------------

class MarkerWriter(nn.Module):
    """TorchScript whose `__setstate__` writes a file: what torch.jit.load would run while loading."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.weight, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight, self.marker, self.training = state
        torch.save(torch.zeros(1), self.marker)


@pytest.fixture
def no_torchscript_runtime(monkeypatch):
    """torch.jit.load (and the C++ importer beneath it) fail: an archive must be read without them."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the TorchScript runtime was asked to load a checkpoint")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)


def _malicious_archive(openai_clip: nn.Module, folder, where: str):
    """OpenAI's CLIP with a MarkerWriter attached at `where` ("visual" or the root), scripted and
    saved; returns (archive, marker path)."""
    marker = folder / f"marker-{where}"
    model = copy.deepcopy(openai_clip)
    (model.visual if where == "visual" else model).intruder = MarkerWriter(str(marker))
    archive = folder / f"intruder-{where}.pt"
    torch.jit.script(model).save(str(archive))
    assert not marker.exists()
    return archive, marker


def _outcome(load, marker):
    """`load()`'s result or the exception it raised; whichever, the marker must not exist."""
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - the caller checks which
        return error
    finally:
        assert not marker.exists(), "loading ran code from the checkpoint"


def test_torchscript_archive_code_never_runs_through_load_clip(openai_clip, openai_files, tmp_path):
    """Outside the vision tower the intruder is never touched and the load succeeds; inside it,
    its state cannot be named without running its code, so the load fails, naming it."""
    archive, marker = _malicious_archive(openai_clip, tmp_path, "root")
    loaded = _outcome(lambda: load_clip(archive, taps=(2, 4)), marker)
    reference = load_clip(openai_files / "state.pth", taps=(2, 4))
    assert isinstance(loaded, VisionTransformer), loaded
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in reference.state_dict().items())

    archive, marker = _malicious_archive(openai_clip, tmp_path, "visual")
    error = _outcome(lambda: load_clip(archive, taps=(2, 4)), marker)
    assert isinstance(error, CheckpointError), error
    assert re.search(re.escape(str(archive)) + ".*visual.intruder.*__getstate__", str(error)), error


def _llama_folder(folder):
    from lavin_fast.checkpoints.llama import save_llama
    from lavin_fast.models.llama import LlamaConfig, Transformer

    return save_llama(Transformer(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)), folder)


def test_torchscript_archive_code_never_runs_through_load_lavin_and_the_cli(tmp_path, monkeypatch):
    from lavin_fast import cli

    monkeypatch.setenv("LAVIN_FAST_DEBUG", "1")  # the CLI re-raises the error it would print in one line
    from lavin_fast.checkpoints.lavin import load_lavin
    from lavin_fast.models.lavin import LaVIN

    torch.manual_seed(3)
    clip = OAICLIP(layers=6)  # the default taps need six blocks
    llama = _llama_folder(tmp_path / "llama")
    tokenizer = tmp_path / "missing-tokenizer.model"  # read after the backbones: reached only past the CLIP
    for where in ("root", "visual"):
        archive, marker = _malicious_archive(clip, tmp_path, where)
        model = _outcome(lambda: load_lavin(llama=llama, clip=archive, preset="tiny"), marker)
        cli_error = _outcome(lambda: cli.main(["generate", "--preset", "tiny", "--llama", str(llama), "--clip",
                                               str(archive), "--tokenizer", str(tokenizer), "--prompt", "hi"]), marker)
        if where == "root":
            assert isinstance(model, LaVIN), model
            assert isinstance(cli_error, FileNotFoundError) and str(tokenizer) in str(cli_error), cli_error
        else:
            for error in (model, cli_error):
                assert isinstance(error, CheckpointError) and "visual.intruder" in str(error), error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torchscript_archive_loads_exactly_like_its_state_dict(openai_clip, tmp_path, no_torchscript_runtime, dtype):
    """Read without the TorchScript runtime, tensor for tensor equal to the same weights saved as a
    state dict: fp16 as OpenAI ships them, one tensor stored transposed (non-contiguous)."""
    model = copy.deepcopy(openai_clip).to(dtype)
    with torch.no_grad():
        weight = model.visual.transformer.resblocks[1].mlp.c_fc.weight
        weight.set_(weight.detach().t().contiguous().t())
    assert not weight.is_contiguous()
    torch.jit.script(model).save(str(tmp_path / "ViT.pt"))
    torch.save(model.state_dict(), tmp_path / "state.pth")
    from_archive = load_clip(tmp_path / "ViT.pt", taps=(1, 4)).state_dict()
    from_state = load_clip(tmp_path / "state.pth", taps=(1, 4)).state_dict()
    assert from_archive.keys() == from_state.keys()
    for key, tensor in from_state.items():
        assert from_archive[key].dtype == dtype and torch.equal(from_archive[key], tensor), key


def test_torchscript_archive_with_foreign_globals_is_refused(tmp_path):
    """A data.pkl that needs any callable beyond torch's tensor rebuilding is refused, naming it,
    before anything runs; so is an archive with no vision tower."""
    import pickle
    import zipfile

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return torch.save, (torch.zeros(1), str(marker))

    for name, payload in [("payload", {"visual": Payload()}), ("no_visual", {"text": 1})]:
        archive = tmp_path / f"{name}.pt"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
            zipped.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        with pytest.raises(CheckpointError, match=re.escape(str(archive))):
            load_clip(archive)
    with pytest.raises(CheckpointError, match="torch.serialization.save"):
        load_clip(tmp_path / "payload.pt")
    assert not marker.exists()

# ---- the model itself ---------------------------------------------------------------------------------

def _tiny_vit(seed: int = 0, layers: int = 3) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(image_size=28, patch_size=14, width=32, layers=layers, heads=2, taps=(1, layers)))
    return _perturb(model, seed)


@pytest.mark.parametrize("shape, dtype, match", [
    ((3, 28, 28), torch.float32, r"\[batch, 3, 28, 28\]"),
    ((2, 1, 28, 28), torch.float32, r"got \(2, 1, 28, 28\)"),
    ((2, 3, 42, 42), torch.float32, r"got \(2, 3, 42, 42\)"),
    ((2, 3, 28, 14), torch.float32, r"got \(2, 3, 28, 14\)"),
    ((2, 3, 28, 28), torch.uint8, "floating point"),
])
def test_bad_images_raise(shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        _tiny_vit()(torch.zeros(shape, dtype=dtype))


def test_bad_configs_raise():
    for kwargs, match in [(dict(image_size=30), "multiple of patch_size"), (dict(heads=5), "divisible by heads"),
                          (dict(activation="relu"), "activation"), (dict(taps=(4, 30)), "taps")]:
        with pytest.raises(ValueError, match=match):
            ViTConfig(**kwargs)
    assert ViTConfig.vit_l14() == ViTConfig()  # the defaults are ViT-L/14 with LaVIN's taps


def _with_adapters(model: VisionTransformer, seed: int) -> VisionTransformer:
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        block.adapter_attn = MMAdapter(model.config.width, temperature=1.0)
        with torch.no_grad():
            for conv in (block.adapter_attn.conv_B, block.adapter_attn.conv_D):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=gen))
            block.adapter_attn.expert_weights.weight.mul_(10)  # routing that varies visibly per sample
    return model


def test_adapter_slot_is_before_attention_and_routes_per_sample():
    plain = _tiny_vit().eval()
    adapted = _with_adapters(_tiny_vit().eval(), seed=3).eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        without, with_ = plain(images), adapted(images)
    assert not torch.allclose(without, with_, atol=1e-3)

    # placement: x + attn(adapter(ln_1(x))), then x + mlp(ln_2(x))
    block, x = adapted.blocks[0], torch.randn(2, 5, 32)
    with torch.no_grad():
        h = x + block.attn(block.adapter_attn(block.ln_1(x)))
        torch.testing.assert_close(block(x), h + block.mlp(block.ln_2(h)), rtol=0, atol=0)

    # per-sample routing: the two samples are routed differently, yet each sample's features
    # are what it gets alone (the reference routes everyone by sample 0)
    routing = adapted.blocks[0].adapter_attn.last_routing
    assert routing.shape == (2, 2) and not torch.allclose(routing[0], routing[1], atol=1e-3)
    changed = images.clone()
    changed[1] = torch.randn(3, 28, 28)
    with torch.no_grad():
        other = adapted(changed)
        alone = adapted(images[:1])
    # fp32 rounding of matmuls blocked by batch size (1e-6 here); routing by sample 0 moves them
    # by far more (the routings above differ by 1e-3 or more)
    torch.testing.assert_close(other[0], with_[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], with_[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[1], with_[1], atol=1e-3)


def test_gradient_checkpointing_matches():
    images = torch.randn(2, 3, 28, 28)
    results = []
    for checkpointing in (False, True):
        model = _with_adapters(_tiny_vit(seed=4), seed=5).train()  # train: adapter dropout is live
        model.gradient_checkpointing = checkpointing
        calls = []
        # a pre-hook: recomputation stops early, after the last tensor backward needs
        model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
        x = images.clone().requires_grad_()
        torch.manual_seed(6)
        out = model(x)
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.detach(), x.grad, grads))
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when on
    (out0, gx0, g0), (out1, gx1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- preprocessing --------------------------------------------------------------------------------------

def _normalise(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W], computed in float64 here."""
    values = pixels.astype(np.float64) / 255.0
    return torch.from_numpy(((values - np.array(mean)) / np.array(std)).transpose(2, 0, 1))


@pytest.mark.parametrize("normalization, mean, std", [("imagenet", IMAGENET_MEAN, IMAGENET_STD),
                                                       ("clip", CLIP_MEAN, CLIP_STD)])
def test_constant_colour(normalization, mean, std):
    colour = (10, 200, 255)
    out = preprocess(Image.new("RGB", (300, 180), colour), normalization=normalization)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[c], torch.full((224, 224), expected, dtype=torch.float32))


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_imagenet_resize_is_bicubic_without_crop():
    image = _noise(50, 30)
    expected = _normalise(np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC)), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(preprocess(image).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("width, height, size, resized, box", [
    (31, 20, 16, (24, 16), (4, 0, 20, 16)),   # landscape: 16 * 31 / 20 = 24.8 -> 24 (truncated, as torchvision)
    (36, 30, 16, (19, 16), (2, 0, 18, 16)),   # 16 * 36 / 30 = 19.2 -> 19; offset round(1.5) = 2
    (30, 45, 20, (20, 30), (0, 5, 20, 25)),   # portrait
])
def test_clip_resize_shorter_side_and_center_crop(width, height, size, resized, box):
    image = _noise(width, height, seed=1)
    crop = image.resize(resized, Image.Resampling.BICUBIC).crop(box)
    expected = _normalise(np.asarray(crop), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(preprocess(image, size=size, normalization="clip").double(), expected, rtol=0, atol=1e-6)


def test_preprocess_files_and_modes(tmp_path):
    image = _noise(40, 30, seed=2)
    image.save(tmp_path / "a.png")
    torch.testing.assert_close(preprocess(tmp_path / "a.png", size=32), preprocess(image, size=32), rtol=0, atol=0)
    torch.testing.assert_close(preprocess(str(tmp_path / "a.png"), size=32), preprocess(image, size=32), rtol=0, atol=0)
    assert preprocess(image.convert("L"), size=8).shape == (3, 8, 8)
    assert preprocess(image.convert("RGBA"), size=8).shape == (3, 8, 8)

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for name in ("broken.png", "missing.png"):
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name))):
            preprocess(tmp_path / name)
    with pytest.raises(ValueError, match="normalization"):
        preprocess(image, normalization="openai")
    with pytest.raises(ValueError, match="size"):
        preprocess(image, size=0)
    with pytest.raises(TypeError, match="ndarray"):
        preprocess(np.zeros((4, 4, 3), dtype=np.uint8))
