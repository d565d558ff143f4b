"""The assembled LaVIN: what trains, the input sequence, the mask, routing, the loss, and loading.

Oracles are written here, independently of the code under test:
- parameter counts from the formulas of REFERENCE.md section 4;
- the input sequence from the token embedding table, the modality embedding table and the
  neck's equation (REFERENCE.md section 3) applied to the ViT's features of each image alone;
- a float64 LaVIN forward written from the equations (RMSNorm, Meta's complex-number RoPE, the
  MM-Adapter of section 1 with its grouped up-projections made dense by hand, SwiGLU) with an
  explicit L x L boolean mask: causal, nobody attends to position 0, position 0 sees only itself;
- the loss as a hand-made cross-entropy over the answer + EOS positions of hand-built sequences;
- the plain LLaMA / ViT (no adapters) carrying the same weights, for identity at initialisation.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lavin_fast.checkpoints.adapters import save_adapters
from lavin_fast.checkpoints.clip import save_clip
from lavin_fast.checkpoints.lavin import load_lavin
from lavin_fast.checkpoints.llama import save_llama
from lavin_fast.collate import Batch, Collator, SequenceLayout
from lavin_fast.data import Sample
from lavin_fast.models import llama as llama_module
from lavin_fast.models import vit as vit_module
from lavin_fast.models.lavin import LAVIN_PRESETS, LaVIN, LaVINConfig
from lavin_fast.models.llama import LlamaConfig, Transformer
from lavin_fast.models.vit import ViTConfig, VisionTransformer
from lavin_fast.tokenizer import Tokenizer

WORDS = ("the cat dog bird sun moon tree river stone red blue green small large quick slow runs jumps "
         "sees eats near above under question answer options context response image because").split()
ADAPTER_PARTS = ("conv_A", "conv_B", "conv_D", "expert_weights")
SAMPLES = [  # (id, prompt, answer, image index or None)
    ("img-0", "Question: Which is red?\nResponse:", "The answer is A. BECAUSE: red.", 0),
    ("txt-1", "Question: What does the quick dog see near the river?\nResponse:", "The answer is B.", None),
    ("img-2", "Question: Small bird under the moon?\nResponse:", "The answer is C. BECAUSE: small.", 1),
    ("txt-3", "Question: tree?\nResponse:", "A.", None),
]


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
    texts += ["Image: N/A", "Image: "] + [p for _, p, a, _ in SAMPLES] + [a for _, p, a, _ in SAMPLES]
    tok = Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=450)
    assert tok.n_words <= LlamaConfig.from_preset("tiny").vocab_size
    return tok


def randomize(model: LaVIN, seed: int = 0, backbone: bool = True) -> LaVIN:
    """Non-trivial adapters (the up-projections start at zero), routers that separate the
    modalities, and (backbone=True) norm weights far from 1 (a dropped norm must show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".conv_B." in name or ".conv_D." in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith("expert_weights.weight"):
                # router logits of order 1 (not saturated) for inputs of RMS 1
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
            elif backbone and "norm" in name or backbone and re.search(r"ln_\w+\.(weight|bias)$", name):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def model() -> LaVIN:
    """The tiny LaVIN, fp32, eval mode; temperature 1 so that routing differences are visible.
    Tests that change it work on a deep copy."""
    torch.manual_seed(0)
    return randomize(LaVIN(LaVINConfig.from_preset("tiny", temperature=1.0))).eval()


@pytest.fixture(scope="module")
def cls_model() -> LaVIN:
    """`model`'s weights with vit_routing="cls" (each image routed by its CLS token)."""
    torch.manual_seed(0)
    return randomize(LaVIN(LaVINConfig.from_preset("tiny", temperature=1.0, vit_routing="cls"))).eval()


@pytest.fixture(scope="module")
def images(model) -> list[torch.Tensor]:
    size = model.config.vit.image_size
    return [torch.randn(3, size, size, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]


@pytest.fixture(scope="module")
def layout(tokenizer, model) -> SequenceLayout:
    return SequenceLayout(tokenizer, image_tokens=model.config.image_tokens)


def make_batch(layout: SequenceLayout, images: list[torch.Tensor], specs=SAMPLES) -> Batch:
    """Collate `specs`; an image "path" is its index into `images`."""
    samples = [Sample(i, p, a, None if k is None else k) for i, p, a, k in specs]
    return Collator(layout, image_loader=lambda k: images[k])(samples)


def hand_sequence(tokenizer: Tokenizer, prompt: str, answer: str, has_image: bool) -> tuple[list[int], int]:
    """(ids, number of counted targets = answer tokens + EOS), built by hand."""
    enc = functools.partial(tokenizer.encode, bos=False, eos=False)
    head = [0, tokenizer.bos_id] + (enc("Image: ") + [0] * 6 if has_image else enc("Image: N/A"))
    tail = enc(answer) + [tokenizer.eos_id]
    return head + enc(prompt) + tail, len(tail)


# ---- float64 oracle ---------------------------------------------------------------------------

def lavin_mask(length: int) -> torch.Tensor:
    """[L, L] bool, True = may attend: causal, no one attends to 0, 0 attends only to itself."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & ((j != 0) | (i == 0))


def dense_grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv1d(k=1, groups) weight [d_out, r/g, 1] -> dense [d_out, r], block g in rows/cols of group g."""
    d_out, per = weight.shape[0], weight.shape[1]
    dense = torch.zeros(d_out, per * groups, dtype=weight.dtype)
    rows = d_out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per:(g + 1) * per] = weight[g * rows:(g + 1) * rows, :, 0]
    return dense


def adapter_ref(x: torch.Tensor, p: dict, prefix: str, cfg: LaVINConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """REFERENCE.md section 1, eval mode: (y, routing weights [B, 2])."""
    logits = x[:, 0] @ p[prefix + "expert_weights.weight"].T + p[prefix + "expert_weights.bias"]
    w = torch.softmax(logits / cfg.temperature, dim=-1)
    h = x @ p[prefix + "conv_A.weight"][:, :, 0].T + p[prefix + "conv_A.bias"]
    up_b = h @ dense_grouped(p[prefix + "conv_B.weight"], cfg.adapter_groups).T + p[prefix + "conv_B.bias"]
    up_d = h @ dense_grouped(p[prefix + "conv_D.weight"], cfg.adapter_groups).T + p[prefix + "conv_D.bias"]
    return x + cfg.adapter_scale * (w[:, 0, None, None] * up_b + w[:, 1, None, None] * up_d), w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's RoPE: adjacent pairs as complex numbers times exp(i p theta^(-2k/Dh)). x [B, L, H, Dh]."""
    length, head_dim = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rot = torch.polar(torch.ones(length, head_dim // 2, dtype=torch.float64),
                      torch.outer(torch.arange(length, dtype=torch.float64), freqs))
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(z * rot[None, :, None, :]).flatten(-2)


def neck_ref(features: torch.Tensor, p: dict) -> torch.Tensor:
    """The reference's neck: Linear -> SiLU -> Linear."""
    hidden = F.silu(features @ p["adapter_proj.conv_A.weight"].T + p["adapter_proj.conv_A.bias"])
    return hidden @ p["adapter_proj.conv_B.weight"].T + p["adapter_proj.conv_B.bias"]


def embed_ref(model: LaVIN, batch: Batch) -> torch.Tensor:
    """[t_m, token embeddings ..., neck(vit(image alone)) at the image slots], float64."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    h = p["llama.tok_embeddings.weight"][batch.tokens].clone()
    k = 0
    for row in range(batch.tokens.shape[0]):
        h[row, 0] = p["adapter_modality_embedding.weight"][int(batch.has_image[row])]
        if batch.has_image[row]:
            with torch.no_grad():
                features = model.vit(batch.images[k:k + 1])[0].double()   # this image alone
            h[row, batch.image_start:batch.image_start + model.config.image_tokens] = neck_ref(features, p)
            k += 1
    return h


def lavin_ref(model: LaVIN, batch: Batch, mask: torch.Tensor | None = None):
    """float64 logits [B, L, V] and per-layer routing [layers, B, 2] of a LaVIN forward with an
    explicit attention mask (LaVIN's by default)."""
    cfg, lcfg = model.config, model.config.llama
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = embed_ref(model, batch)
    batch_size, length, dim = x.shape
    heads, head_dim = lcfg.n_heads, lcfg.head_dim
    allowed = lavin_mask(length) if mask is None else mask
    routings = []
    for n in range(lcfg.n_layers):
        q_ = f"llama.layers.{n}."
        h, w = adapter_ref(rms_norm(x, p[q_ + "attention_norm.weight"], lcfg.norm_eps), p, q_ + "adapter_attn.", cfg)
        routings.append(w)
        q = rope((h @ p[q_ + "attention.wq.weight"].T).view(batch_size, length, heads, head_dim), lcfg.rope_theta)
        k = rope((h @ p[q_ + "attention.wk.weight"].T).view(batch_size, length, heads, head_dim), lcfg.rope_theta)
        v = (h @ p[q_ + "attention.wv.weight"].T).view(batch_size, length, heads, head_dim)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(batch_size, length, dim)
        x = x + out @ p[q_ + "attention.wo.weight"].T
        f = rms_norm(x, p[q_ + "ffn_norm.weight"], lcfg.norm_eps)
        x = x + (F.silu(f @ p[q_ + "feed_forward.w1.weight"].T) * (f @ p[q_ + "feed_forward.w3.weight"].T)) \
            @ p[q_ + "feed_forward.w2.weight"].T
    x = rms_norm(x, p["llama.norm.weight"], lcfg.norm_eps)
    return x @ p["llama.output.weight"].T, torch.stack(routings)


# ---- what trains ------------------------------------------------------------------------------

def expected_counts(config: LaVINConfig) -> dict[str, int]:
    """REFERENCE.md section 4, from the formulas."""
    d, w, r, g = config.llama.dim, config.vit.width, config.adapter_hidden, config.adapter_groups

    def adapter(dim: int) -> int:  # conv_A + conv_B + conv_D + router
        return (r * dim + r) + 2 * (dim * (r // g) + dim) + (2 * dim + 2)

    return {
        "llama": config.llama.n_layers * adapter(d),
        "vit": config.vit.layers * adapter(w),
        "neck": (w * config.neck_hidden + config.neck_hidden) + (config.neck_hidden * d + d),
        "modality": 2 * d,
    }


def part_of(name: str) -> str:
    for pattern, part in ((r"llama\.layers\.\d+\.adapter_attn\.", "llama"), (r"vit\.blocks\.\d+\.adapter_attn\.", "vit"),
                          (r"adapter_proj\.", "neck"), (r"adapter_modality_embedding\.", "modality")):
        if re.match(pattern, name):
            return part
    return "frozen"


TRAINABLE_NAME = re.compile(
    r"(llama\.layers\.\d+|vit\.blocks\.\d+)\.adapter_attn\.(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)"
    r"|adapter_proj\.conv_[AB]\.(weight|bias)|adapter_modality_embedding\.weight")



def _readme_presets() -> dict[str, int]:
    """preset name -> trainable parameters, from the README's preset table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = {}
    for row in re.findall(r"^\| (`[^|]+`) \|[^|]+\|[^|]+\| ([\d,]+) \|$", readme, flags=re.M):
        for name in re.findall(r"`([^`]+)`", row[0]):
            table[name] = int(row[1].replace(",", ""))
    return table


def test_readme_preset_table_is_the_models_built():
    """Every preset but "tiny" is in the README's table, with the trainable count of the model
    built on the meta device, which the formulas of REFERENCE.md section 4 also give."""
    table = _readme_presets()
    assert set(table) == set(LAVIN_PRESETS) - {"tiny"}
    for name, count in table.items():
        config = LaVINConfig.from_preset(name)
        with torch.device("meta"):
            built = LaVIN(config).num_trainable()
        assert built == sum(expected_counts(config).values()) == count, name
    assert (table["7b"], table["13b"]) == (3_781_296, 5_390_080)


@pytest.mark.parametrize("name, llama, vit", [
    # LLaMA: (dim, layers, heads, kv heads, FFN width, vocab, rope_theta, llama3 factor) of the
    # published config.json files; CLIP: (image size, patch, positions, width, blocks, taps).
    ("llama2-13b", (5120, 40, 40, 40, 13824, 32000, 10000.0, None), (224, 14, 257, 1024, 24, (4, 8, 12, 16, 20, 24))),
    ("llama3.1-8b-336", (4096, 32, 32, 8, 14336, 128256, 500000.0, 8.0), (336, 14, 577, 1024, 24, (4, 8, 12, 16, 20, 24))),
    ("llama3.2-1b", (2048, 16, 32, 8, 8192, 128256, 500000.0, 32.0), (224, 14, 257, 1024, 24, (4, 8, 12, 16, 20, 24))),
    ("llama3.2-3b-336", (3072, 28, 24, 8, 8192, 128256, 500000.0, 32.0), (336, 14, 577, 1024, 24, (4, 8, 12, 16, 20, 24))),
])
def test_new_presets_have_the_published_shapes(name, llama, vit):
    config = LaVINConfig.from_preset(name)
    c, v = config.llama, config.vit
    scaling = None if c.rope_scaling is None else c.rope_scaling.factor
    assert (c.dim, c.n_layers, c.n_heads, c.kv_heads, c.ffn_hidden, c.vocab_size, c.rope_theta, scaling) == llama
    assert (v.image_size, v.patch_size, 1 + v.grid ** 2, v.width, v.layers, v.taps) == vit
    assert config.temperature == (5.0 if "13b" in name else 10.0)


@pytest.mark.parametrize("preset, total, parts", [
    ("7b", 3_781_296, {"llama": 2_621_760, "vit": 491_760, "neck": 659_584, "modality": 8_192}),
    ("13b", 5_390_080, {"llama": 4_096_400, "vit": 491_760, "neck": 791_680, "modality": 10_240}),
    ("tiny", None, None),
])
def test_trainable_parameters(preset, total, parts):
    config = LaVINConfig.from_preset(preset)
    with torch.device("meta"):
        lavin = LaVIN(config)
    counts = expected_counts(config)
    if parts is not None:  # the table of REFERENCE.md section 4 agrees with its formulas
        assert counts == parts and sum(parts.values()) == total
    found = dict.fromkeys(counts, 0)
    trainable = []
    for name, param in lavin.named_parameters():
        part = part_of(name)
        assert param.requires_grad == (part != "frozen"), name
        if param.requires_grad:
            found[part] += param.numel()
            trainable.append(name)
    assert found == counts
    assert lavin.num_trainable() == sum(counts.values())
    if total is not None:
        assert lavin.num_trainable() == total
    # exactly these names: 8 per adapter, 4 for the neck, 1 for the modality embedding
    assert all(TRAINABLE_NAME.fullmatch(name) for name in trainable)
    assert len(trainable) == 8 * (config.llama.n_layers + config.vit.layers) + 5
    assert set(lavin.trainable_state_dict()) == set(trainable)
    # norms, biases, embeddings and the head stay frozen
    named = dict(lavin.named_parameters())
    for name in ("llama.tok_embeddings.weight", "llama.output.weight", "llama.norm.weight",
                 "llama.layers.0.attention_norm.weight", "llama.layers.0.ffn_norm.weight",
                 "llama.layers.0.attention.wq.weight", "llama.layers.0.feed_forward.w2.weight",
                 "vit.conv1.weight", "vit.class_embedding", "vit.positional_embedding", "vit.ln_pre.weight",
                 "vit.ln_pre.bias", "vit.blocks.0.attn.in_proj.bias", "vit.blocks.0.mlp.c_fc.bias",
                 "vit.blocks.0.ln_1.weight"):
        assert not named[name].requires_grad, name
    assert all(p.device.type == "meta" for p in lavin.parameters())


# ---- embed ------------------------------------------------------------------------------------

def test_embed_layout(model, layout, images):
    batch = make_batch(layout, images)
    assert batch.has_image.tolist() == [True, False, True, False]
    with torch.no_grad():
        h = model.embed(batch.tokens, batch.has_image, batch.images, batch.image_start)
    table = model.llama.tok_embeddings.weight
    modality = model.adapter_modality_embedding.weight
    assert not torch.allclose(modality[0], modality[1])
    start, end = batch.image_start, batch.image_start + 6
    k = 0
    for row in range(4):
        torch.testing.assert_close(h[row, 0], modality[1 if batch.has_image[row] else 0], rtol=0, atol=0)
        if batch.has_image[row]:
            with torch.no_grad():  # the neck's equation on this image's features, computed alone
                features = model.vit(images[k][None])[0]
                p = {n: t.detach() for n, t in model.adapter_proj.named_parameters()}
                visual = F.silu(features @ p["conv_A.weight"].T + p["conv_A.bias"]) @ p["conv_B.weight"].T \
                    + p["conv_B.bias"]
            torch.testing.assert_close(h[row, start:end], visual, rtol=1e-5, atol=1e-5)
            rest = [*range(1, start), *range(end, h.shape[1])]
            k += 1
        else:
            rest = list(range(1, h.shape[1]))
        torch.testing.assert_close(h[row, rest], table[batch.tokens[row, rest]], rtol=0, atol=0)
    # the two image samples' visual tokens differ (their own image each)
    assert (h[0, start:end] - h[2, start:end]).abs().max() > 1e-3


def test_text_only_batch_never_runs_the_vit(model, layout, images):
    text = [s for s in SAMPLES if s[3] is None]
    batch = make_batch(layout, images, text)
    assert batch.images is None

    def refuse(*_):
        raise AssertionError("the ViT ran on a text-only batch")

    hook = model.vit.register_forward_pre_hook(refuse)
    neck_hook = model.adapter_proj.register_forward_pre_hook(refuse)
    try:
        with torch.no_grad():
            logits = model(batch)
            h = model.embed(batch.tokens, batch.has_image, None, batch.image_start)
    finally:
        hook.remove()
        neck_hook.remove()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(h[:, 1:], model.llama.tok_embeddings.weight[batch.tokens[:, 1:]], rtol=0, atol=0)
    # and the hook does fire when an image is there: the check above can fail
    hook = model.vit.register_forward_pre_hook(refuse)
    try:
        with pytest.raises(AssertionError, match="ViT ran"), torch.no_grad():
            model(make_batch(layout, images, SAMPLES[:2]))
    finally:
        hook.remove()


def test_embed_input_errors(model, images):
    tokens = torch.randint(3, 100, (2, 20))
    one, two = images[0][None], torch.stack(images[:2])
    cases = [
        (tokens, torch.tensor([True, True]), one),            # 2 image samples, 1 image
        (tokens, torch.tensor([True, False]), two),           # 1 image sample, 2 images
        (tokens, torch.tensor([True, False]), None),          # 1 image sample, no images
        (tokens, torch.tensor([False, False]), one),          # images for a text-only batch
        (tokens[0], torch.tensor([True]), one),               # tokens not [B, L]
        (tokens, torch.tensor([1, 0]), one),                  # has_image not bool
        (tokens, torch.tensor([True, False, False]), one),    # has_image of the wrong length
    ]
    for toks, has_image, pics in cases:
        with pytest.raises(ValueError):
            model.embed(toks, has_image, pics, 5)
    with pytest.raises(ValueError, match="fit"):  # image slots past the end of the sequence
        model.embed(tokens[:, :8], torch.tensor([True, False]), one, 5)
    size = model.config.vit.image_size
    for bad in (torch.randn(1, 3, size + 14, size + 14), torch.randn(1, 1, size, size), torch.randn(3, size, size)):
        with pytest.raises(ValueError):
            model.embed(tokens, torch.tensor([True, False]), bad, 5)


# ---- the forward against the explicit-mask oracle ----------------------------------------------

def test_forward_equals_explicit_mask_reference(model, layout, images):
    batch = make_batch(layout, images)
    with torch.no_grad():
        logits = model(batch)
    expected, routing = lavin_ref(model, batch)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.routing_weights()["llama"].double(), routing, rtol=1e-5, atol=1e-6)
    # The oracle can tell masks apart: plain causal attention (t_m visible to all) differs.
    causal = torch.ones(logits.shape[1], logits.shape[1], dtype=torch.bool).tril()
    plain, _ = lavin_ref(model, batch, causal)
    assert (plain[:, 1:] - logits[:, 1:].double()).abs().max() > 1e-2


def test_position_0_sees_only_itself(model, layout, images):
    """Whatever follows, position 0's output depends on t_m alone (its routing and logits)."""
    batch = make_batch(layout, images)
    other = dataclasses.replace(batch, tokens=torch.randint(3, 400, batch.tokens.shape,
                                                            generator=torch.Generator().manual_seed(1)),
                                images=torch.stack(images[1:3]))
    with torch.no_grad():
        first, second = model(batch), model(other)
    torch.testing.assert_close(first[:, 0], second[:, 0], rtol=1e-5, atol=1e-5)
    assert (first[:, 1:] - second[:, 1:]).abs().max() > 1e-2


# ---- routing ----------------------------------------------------------------------------------

def test_llama_routing_depends_on_the_modality_only(model, layout, images):
    batch = make_batch(layout, images)   # image, text, image, text: different prompts and images
    with torch.no_grad():
        model(batch)
    routing = model.routing_weights()["llama"]                       # [layers, B, 2]
    torch.testing.assert_close(routing[:, 0], routing[:, 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(routing[:, 1], routing[:, 3], rtol=0, atol=1e-6)
    assert ((routing[:, 0] - routing[:, 1]).abs().amax(-1) > 1e-3).all()  # every layer: image != text
    # layer 0 by hand: softmax(router(RMSNorm(t_m)) / t) for each modality row
    layer = model.llama.layers[0]
    with torch.no_grad():
        normed = rms_norm(model.adapter_modality_embedding.weight.double(), layer.attention_norm.weight.double(),
                          model.config.llama.norm_eps)
        logits = normed @ layer.adapter_attn.expert_weights.weight.double().T \
            + layer.adapter_attn.expert_weights.bias.double()
    by_hand = torch.softmax(logits / model.config.temperature, dim=-1)   # row 0 text, row 1 image
    torch.testing.assert_close(routing[0].double(), by_hand[batch.has_image.long()], rtol=1e-5, atol=1e-6)
    # a sample alone routes as in the batch
    with torch.no_grad():
        model(make_batch(layout, images, SAMPLES[1:2]))
    torch.testing.assert_close(model.routing_weights()["llama"][:, 0], routing[:, 1], rtol=0, atol=1e-6)


def test_cls_vit_routing_is_per_sample(cls_model, images):
    model = cls_model
    with torch.no_grad():
        pair = model.vit(torch.stack(images[:2]))
        routing = model.routing_weights()["vit"]                     # [blocks, 2, 2]
        other = model.vit(torch.stack([images[0], images[2]]))
        other_routing = model.routing_weights()["vit"]
        alone = model.vit(images[0][None])
        alone_routing = model.routing_weights()["vit"]
    assert routing.shape == (model.config.vit.layers, 2, 2)
    # block 0 reads ln_pre(class_embedding + pos_0), the same for every image; later blocks differ
    torch.testing.assert_close(routing[0, 0], routing[0, 1], rtol=0, atol=1e-6)
    assert ((routing[1:, 0] - routing[1:, 1]).abs().amax(-1) > 1e-3).all()
    # sample 0's features and routing do not depend on the other samples of its batch
    for features, weights in ((other, other_routing), (alone, alone_routing)):
        torch.testing.assert_close(features[0], pair[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weights[:, 0], routing[:, 0], rtol=0, atol=1e-6)
    # routing from each sample's own CLS, by hand at block 1 (the reference would use sample 0's)
    captured = {}
    hook = model.vit.blocks[1].adapter_attn.register_forward_pre_hook(
        lambda _m, args: captured.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.vit(torch.stack(images[:2]))
    finally:
        hook.remove()
    router = model.vit.blocks[1].adapter_attn.expert_weights
    with torch.no_grad():
        by_hand = torch.softmax((captured["x"][:, 0] @ router.weight.T + router.bias) / model.config.temperature, -1)
    torch.testing.assert_close(routing[1], by_hand, rtol=1e-5, atol=1e-6)


def test_routing_weights_shapes(model, layout, images):
    with torch.no_grad():
        model(make_batch(layout, images))
    weights = model.routing_weights()
    assert set(weights) == {"llama", "vit"}
    assert weights["llama"].shape == (model.config.llama.n_layers, 4, 2)
    assert weights["vit"].shape == (model.config.vit.taps[-1], 2, model.config.vit.grid ** 2 + 1, 2)  # per token
    for w in weights.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert (w >= 0).all() and not w.requires_grad
    # a text-only forward reports no ViT routing (not the previous batch's)
    with torch.no_grad():
        model(make_batch(layout, images, SAMPLES[1:2]))
    weights = model.routing_weights()
    assert set(weights) == {"llama"} and weights["llama"].shape == (model.config.llama.n_layers, 1, 2)


# ---- loss and gradients ------------------------------------------------------------------------

def hand_loss(logits: torch.Tensor, tokenizer: Tokenizer, tokens: torch.Tensor, specs) -> torch.Tensor:
    """Mean over all answer + EOS tokens of -log p(next token), positions from hand-built sequences."""
    terms = []
    for row, (_, prompt, answer, image) in enumerate(specs):
        ids, counted = hand_sequence(tokenizer, prompt, answer, image is not None)
        assert tokens[row, :len(ids)].tolist() == ids
        for i in range(len(ids) - counted - 1, len(ids) - 1):
            terms.append(-torch.log_softmax(logits[row, i].double(), -1)[ids[i + 1]])
    return torch.stack(terms).mean()


def test_loss_is_cross_entropy_over_answer_and_eos(model, layout, images, tokenizer):
    batch = make_batch(layout, images)
    with torch.no_grad():
        logits = model(batch)
        loss = model.loss(batch)
    expected = hand_loss(logits, tokenizer, batch.tokens, SAMPLES)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # sanity: counting every non-padding position would give another number
    everything = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))
    assert abs(everything.item() - loss.item()) > 1e-2
    # padding is ignored: other tokens in the padding slots leave the loss unchanged
    pad = torch.ones_like(batch.tokens, dtype=torch.bool)
    for row, (_, prompt, answer, image) in enumerate(SAMPLES):
        pad[row, :len(hand_sequence(tokenizer, prompt, answer, image is not None)[0])] = False
    assert pad.any()
    noisy = batch.tokens.masked_scatter(pad, torch.randint(3, 400, (int(pad.sum()),)))
    with torch.no_grad():
        torch.testing.assert_close(model.loss(dataclasses.replace(batch, tokens=noisy)), loss, rtol=1e-6, atol=1e-6)
    # targets decide what is counted: IGNORE on the prompt positions is honoured
    assert batch.answer_tokens == sum(hand_sequence(tokenizer, p, a, k is not None)[1] for _, p, a, k in SAMPLES)


def grads_of(lavin: LaVIN, batch: Batch, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lavin.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = lavin.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lavin.named_parameters() if p.grad is not None}


def test_gradients_reach_exactly_the_trainable_parameters(model, layout, images):
    lavin = copy.deepcopy(model)
    batch = make_batch(layout, images)
    loss, grads = grads_of(lavin, batch)
    assert torch.isfinite(loss)
    trainable = {n for n, p in lavin.named_parameters() if p.requires_grad}
    assert set(grads) == trainable                       # no frozen parameter got a .grad
    for name in trainable:
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    # both modality rows train in a mixed batch
    assert (grads["adapter_modality_embedding.weight"].abs().sum(-1) > 0).all()


def test_gradient_checkpointing_changes_nothing(model, layout, images, monkeypatch):
    lavin = copy.deepcopy(model).train()               # dropout on: the RNG must replay too
    batch = make_batch(layout, images)
    loss_off, grads_off = grads_of(lavin, batch, seed=3)
    calls = {"llama": 0, "vit": 0}
    for name, module in (("llama", llama_module), ("vit", vit_module)):
        original = module.checkpoint

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", counting)
    lavin.gradient_checkpointing = True
    assert lavin.llama.gradient_checkpointing and lavin.vit.gradient_checkpointing and lavin.gradient_checkpointing
    loss_on, grads_on = grads_of(lavin, batch, seed=3)
    assert calls == {"llama": model.config.llama.n_layers, "vit": model.config.vit.taps[-1]}
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-6)
    assert set(grads_on) == set(grads_off)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-6, msg=name)
    # dropout really was on: another seed gives another loss
    loss_other, _ = grads_of(lavin, batch, seed=4)
    assert abs(loss_other.item() - loss_on.item()) > 1e-6
    lavin.gradient_checkpointing = False
    assert not lavin.llama.gradient_checkpointing and not lavin.vit.gradient_checkpointing


# ---- identity at initialisation --------------------------------------------------------------

def test_fresh_adapters_are_identities(layout, images):
    torch.manual_seed(5)
    lavin = LaVIN(LaVINConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # backbone norms away from 1, so nothing is trivially the identity
        for name, param in lavin.named_parameters():
            if not param.requires_grad and param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
    plain_llama = Transformer(lavin.config.llama).eval()
    plain_llama.load_state_dict({k[len("llama."):]: v for k, v in lavin.state_dict().items()
                                 if k.startswith("llama.") and "adapter" not in k})
    plain_vit = VisionTransformer(lavin.config.vit).eval()
    plain_vit.load_state_dict({k[len("vit."):]: v for k, v in lavin.state_dict().items()
                               if k.startswith("vit.") and "adapter" not in k})
    text = make_batch(layout, images, [s for s in SAMPLES if s[3] is None])
    with torch.no_grad():
        h = lavin.embed(text.tokens, text.has_image, None, text.image_start)
        ours = lavin(text)
        plain = plain_llama(embeddings=h, isolate_first=True)
        torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
        pics = torch.stack(images[:2])
        torch.testing.assert_close(lavin.vit(pics), plain_vit(pics), rtol=1e-6, atol=1e-6)
        # and the comparison can fail: non-zero up-projections change the output
        randomize(lavin)
        assert (lavin(text) - plain).abs().max() > 1e-3


# ---- dtype ------------------------------------------------------------------------------------

def test_set_backbone_dtype_bf16(model, layout, images):
    lavin = copy.deepcopy(model)
    assert lavin.set_backbone_dtype(torch.bfloat16) is lavin
    for name, param in lavin.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert sum(p.requires_grad for p in lavin.parameters()) > 0
    batch = make_batch(layout, images)
    with torch.no_grad():
        logits = lavin(batch)
        reference = model(batch)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()   # bf16 rounding, not garbage
    loss, grads = grads_of(lavin, batch)
    assert torch.isfinite(loss)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert set(grads) == {n for n, p in lavin.named_parameters() if p.requires_grad}


# ---- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["7b", "13b", "tiny"])
def test_config_round_trip(preset):
    config = LaVINConfig.from_preset(preset, temperature=3.5, neck_activation="swiglu", adapter_dropout=0.0)
    values = json.loads(json.dumps(config.to_dict()))          # through JSON: tuples become lists
    back = LaVINConfig.from_dict(values)
    assert back == config
    assert isinstance(back.llama, LlamaConfig) and isinstance(back.vit, ViTConfig)
    assert back.vit.taps == config.vit.taps and isinstance(back.vit.taps, tuple)
    assert back.image_tokens == 6


def test_presets_and_unknown_preset():
    assert LaVINConfig.from_preset("7b").temperature == 10.0 and LaVINConfig.from_preset("13b").temperature == 5.0
    assert LaVINConfig.from_preset("7b").llama.dim == 4096 and LaVINConfig.from_preset("13b").llama.dim == 5120
    assert LaVINConfig.from_preset("7b").vit == ViTConfig.vit_l14()
    with pytest.raises(ValueError, match="unknown LaVIN preset"):
        LaVINConfig.from_preset("70b")


# ---- load_lavin -------------------------------------------------------------------------------

def test_load_lavin_end_to_end(tmp_path, layout, images):
    torch.manual_seed(7)
    tiny = LaVINConfig.from_preset("tiny")
    llama = Transformer(tiny.llama)
    vit = VisionTransformer(tiny.vit)
    with torch.no_grad():
        for module in (llama, vit):
            for param in module.parameters():
                if param.dim() == 1:
                    param.add_(0.3 * torch.randn_like(param))
    save_llama(llama, tmp_path / "llama")
    save_clip(vit, tmp_path / "clip.safetensors")

    lavin = load_lavin(llama=tmp_path / "llama", clip=tmp_path / "clip.safetensors", preset="tiny")
    assert lavin.config.neck_hidden == tiny.neck_hidden and lavin.config.temperature == tiny.temperature
    assert lavin.config.vit.taps == tiny.vit.taps and lavin.config.llama.dim == tiny.llama.dim
    state = lavin.state_dict()
    for prefix, module in (("llama.", llama), ("vit.", vit)):
        for key, value in module.state_dict().items():
            assert torch.equal(state[prefix + key], value), key
    assert lavin.num_trainable() == sum(expected_counts(lavin.config).values())
    for name, param in lavin.named_parameters():  # fresh adapters and neck: the reference's init
        if re.search(r"adapter_attn\.conv_[BD]\.|adapter_attn\.conv_A\.bias|adapter_proj\..*bias", name):
            assert torch.count_nonzero(param) == 0, name
        elif re.search(r"adapter_attn\.conv_A\.weight|adapter_proj\..*weight", name):
            bound = math.sqrt(6 / (param.shape[0] + param.shape[1]))   # xavier-uniform
            assert 0 < param.abs().max() <= bound, name
        assert param.dtype == torch.float32

    # a non-default temperature travels with the adapter file
    tuned = load_lavin(llama=tmp_path / "llama", clip=tmp_path / "clip.safetensors", preset="tiny",
                       temperature=3.0).eval()
    randomize(tuned, seed=11, backbone=False)
    save_adapters(tuned, tmp_path / "adapters.safetensors")
    loaded = load_lavin(llama=tmp_path / "llama", clip=tmp_path / "clip.safetensors",
                        adapters=tmp_path / "adapters.safetensors").eval()
    assert loaded.config.temperature == 3.0
    assert loaded.config.neck_hidden == tiny.neck_hidden     # from the file, not the default 7b preset
    assert all(layer.adapter_attn.temperature == 3.0 for layer in loaded.llama.layers)
    assert all(block.adapter_attn.temperature == 3.0 for block in loaded.vit.blocks)
    want = tuned.trainable_state_dict()
    got = loaded.trainable_state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    batch = make_batch(layout, images)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), tuned(batch), rtol=0, atol=0)
