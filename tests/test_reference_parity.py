"""Reference parity: lavin_fast against a float64 restatement of the reference's own code.

The restatement here is written from the reference implementation (luogen1996/LaVIN:
`clip/model.py`, `lavin/mm_adapter.py`, `lavin/eval_model.py`, `lavin/generator.py`), in its
layouts, and shares nothing with lavin_fast but the weights:
- its adapter `RepAdapter_Router.forward`: routing from `x[:, 0]`, grouped 1x1 Conv1d on
  `x.transpose(1, 2)`. Called on the CLIP ViT's sequence-first `[L, B, D]` that routes token l
  of every image by token l of image 0, Conv1d taking L as its batch; called on the LLaMA's
  batch-first `[B, L, D]` it routes each sample by its modality token;
- its ViT (`VisionTransformer.forward`, `ResidualAttentionBlock` patched by `forward_clip`),
  attention through `F.multi_head_attention_forward` as `nn.MultiheadAttention` runs it;
- its LLaMA with the KV cache of `eval_model.Attention` (the modality token left out of the
  cache) and complex-number RoPE read at `start_pos`, driven by `LaVIN_Generator.generate`.
"""
from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lavin_fast import MMAdapter, cli
from lavin_fast.checkpoints.adapters import load_adapters, read_adapter_config, save_adapters
from lavin_fast.checkpoints.strict import CheckpointError
from lavin_fast.collate import Collator, SequenceLayout
from lavin_fast.data import Sample
from lavin_fast.generation import generate, generate_tokens
from lavin_fast.models.lavin import LaVIN, LaVINConfig
from lavin_fast.models.llama import LlamaConfig
from lavin_fast.tokenizer import Tokenizer
from lavin_fast.train import TrainConfig, build_parser, config_from_args

from helpers import assert_close_to_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORDS = "the cat dog red blue small bird tree river sees near question answer options image because".split()
SAMPLES = [  # (prompt, answer, image index or None): mixed modalities, different prompt lengths
    ("Question: Which bird is red?\nResponse:", "The answer is A. BECAUSE: red.", 0),
    ("Question: What does the dog see near the river?\nResponse:", "The answer is B.", None),
    ("Question: Small tree?\nResponse:", "The answer is C.", 1),
]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- the reference, restated in float64 ---------------------------------------------------------------

def ref_adapter(x: torch.Tensor, p: dict, prefix: str, t: float, s: float = 1.0) -> torch.Tensor:
    """RepAdapter_Router.forward (eval: no dropout), on whatever layout it is handed."""
    weights = torch.softmax((x[:, 0] @ p[prefix + "expert_weights.weight"].T + p[prefix + "expert_weights.bias"]) / t, -1)
    x = x.transpose(1, 2)
    h = F.conv1d(x, p[prefix + "conv_A.weight"], p[prefix + "conv_A.bias"])
    y = (F.conv1d(h, p[prefix + "conv_B.weight"], p[prefix + "conv_B.bias"], groups=2) * s * weights[:, 0, None, None]
         + F.conv1d(h, p[prefix + "conv_D.weight"], p[prefix + "conv_D.bias"], groups=2) * s * weights[:, 1, None, None]
         + x)
    return y.transpose(1, 2).contiguous()


def ref_adapter_cls(x: torch.Tensor, p: dict, prefix: str, t: float) -> torch.Tensor:
    """The same adapter routed by each image's CLS token: x [L, B, D], routing read at x[0]."""
    per_image = [ref_adapter(x[:, b:b + 1].transpose(0, 1), p, prefix, t) for b in range(x.shape[1])]
    return torch.cat(per_image, dim=0).transpose(0, 1)      # batch-first [1, L, D] each: x[:, 0] is the CLS


def ref_vit(images: torch.Tensor, p: dict, cfg: LaVINConfig, cls_routing: bool = False) -> torch.Tensor:
    """clip/model.py VisionTransformer.forward with set_Clip_Adapter's blocks: [B, taps, W]."""
    v, width = cfg.vit, cfg.vit.width
    x = F.conv2d(images.double(), p["vit.conv1.weight"], stride=v.patch_size)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = p["vit.class_embedding"] + torch.zeros(x.shape[0], 1, width, dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + p["vit.positional_embedding"]
    x = F.layer_norm(x, (width,), p["vit.ln_pre.weight"], p["vit.ln_pre.bias"], v.ln_eps)
    x = x.permute(1, 0, 2)                                              # NLD -> LND
    features = []
    for i in range(v.taps[-1]):
        q = f"vit.blocks.{i}."
        h = F.layer_norm(x, (width,), p[q + "ln_1.weight"], p[q + "ln_1.bias"], v.ln_eps)
        h = (ref_adapter_cls if cls_routing else ref_adapter)(h, p, q + "adapter_attn.", cfg.temperature)
        attended, _ = F.multi_head_attention_forward(
            h, h, h, width, v.heads, p[q + "attn.in_proj.weight"], p[q + "attn.in_proj.bias"], None, None, False,
            0.0, p[q + "attn.out_proj.weight"], p[q + "attn.out_proj.bias"], training=False, need_weights=False)
        x = x + attended
        m = F.layer_norm(x, (width,), p[q + "ln_2.weight"], p[q + "ln_2.bias"], v.ln_eps)
        m = m @ p[q + "mlp.c_fc.weight"].T + p[q + "mlp.c_fc.bias"]
        x = x + (m * torch.sigmoid(1.702 * m)) @ p[q + "mlp.c_proj.weight"].T + p[q + "mlp.c_proj.bias"]
        if i + 1 in v.taps:
            features.append(x.permute(1, 0, 2)[:, :1])
    return torch.cat(features, 1)


def ref_neck(features: torch.Tensor, p: dict) -> torch.Tensor:
    """AdapterMLP: conv_B(silu(conv_A(x)))."""
    hidden = F.silu(features @ p["adapter_proj.conv_A.weight"].T + p["adapter_proj.conv_A.bias"])
    return hidden @ p["adapter_proj.conv_B.weight"].T + p["adapter_proj.conv_B.bias"]


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_llama(h: torch.Tensor, start_pos: int, p: dict, cfg: LaVINConfig, cache: dict) -> torch.Tensor:
    """eval_model.Transformer.forward with forward_llama_attn_cache: logits of every position."""
    lc = cfg.llama
    bsz, seqlen, _ = h.shape
    heads, hd = lc.n_heads, lc.head_dim
    freqs = 1.0 / lc.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs_cis = torch.polar(torch.ones(2 * lc.max_seq_len, hd // 2, dtype=torch.float64),
                            torch.outer(torch.arange(2 * lc.max_seq_len, dtype=torch.float64), freqs))
    freqs_cis = freqs_cis[start_pos:start_pos + seqlen]
    mask = None
    if seqlen > 1:
        mask = torch.triu(torch.full((1, 1, seqlen, seqlen), float("-inf"), dtype=torch.float64), diagonal=start_pos + 1)
        mask[:, :, 1:, 0] = float("-inf")
    for n in range(lc.n_layers):
        q_ = f"llama.layers.{n}."
        layer = cache.setdefault(n, {"k": torch.zeros(bsz, lc.max_seq_len, heads, hd, dtype=torch.float64),
                                     "v": torch.zeros(bsz, lc.max_seq_len, heads, hd, dtype=torch.float64)})
        x = rms(h, p[q_ + "attention_norm.weight"], lc.norm_eps)
        if start_pos == 0:  # the routing of the modality token, cached for every later step
            a = q_ + "adapter_attn."
            layer["w"] = torch.softmax((x[:, 0] @ p[a + "expert_weights.weight"].T + p[a + "expert_weights.bias"])
                                       / cfg.temperature, -1)
        x = ref_adapter_weighted(x, p, q_ + "adapter_attn.", layer["w"])
        xq = (x @ p[q_ + "attention.wq.weight"].T).view(bsz, seqlen, heads, hd)
        xk = (x @ p[q_ + "attention.wk.weight"].T).view(bsz, seqlen, heads, hd)
        xv = (x @ p[q_ + "attention.wv.weight"].T).view(bsz, seqlen, heads, hd)
        rot = freqs_cis[None, :, None, :]
        xq = torch.view_as_real(torch.view_as_complex(xq.reshape(bsz, seqlen, heads, -1, 2).contiguous()) * rot).flatten(3)
        xk = torch.view_as_real(torch.view_as_complex(xk.reshape(bsz, seqlen, heads, -1, 2).contiguous()) * rot).flatten(3)
        if start_pos == 0:  # the modality token's key and value are not cached
            layer["k"][:, :seqlen - 1], layer["v"][:, :seqlen - 1] = xk[:, 1:], xv[:, 1:]
            keys, values = xk, xv
        else:
            layer["k"][:, start_pos:start_pos + seqlen], layer["v"][:, start_pos:start_pos + seqlen] = xk, xv
            keys, values = layer["k"][:, :start_pos + seqlen], layer["v"][:, :start_pos + seqlen]
        scores = xq.transpose(1, 2) @ keys.transpose(1, 2).transpose(2, 3) / math.sqrt(hd)
        if mask is not None:
            scores = scores + mask
        out = (torch.softmax(scores, -1) @ values.transpose(1, 2)).transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + out @ p[q_ + "attention.wo.weight"].T
        f = rms(h, p[q_ + "ffn_norm.weight"], lc.norm_eps)
        h = h + (F.silu(f @ p[q_ + "feed_forward.w1.weight"].T) * (f @ p[q_ + "feed_forward.w3.weight"].T)) \
            @ p[q_ + "feed_forward.w2.weight"].T
    return rms(h, p["llama.norm.weight"], lc.norm_eps) @ p["llama.output.weight"].T


def ref_adapter_weighted(x: torch.Tensor, p: dict, prefix: str, weights: torch.Tensor) -> torch.Tensor:
    """RepAdapter_Router.forward with `weights` passed in (the LLaMA's cached routing)."""
    x = x.transpose(1, 2)
    h = F.conv1d(x, p[prefix + "conv_A.weight"], p[prefix + "conv_A.bias"])
    y = (F.conv1d(h, p[prefix + "conv_B.weight"], p[prefix + "conv_B.bias"], groups=2) * weights[:, 0, None, None]
         + F.conv1d(h, p[prefix + "conv_D.weight"], p[prefix + "conv_D.bias"], groups=2) * weights[:, 1, None, None] + x)
    return y.transpose(1, 2)


def ref_generate(model: LaVIN, tokenizer: Tokenizer, prompts, images, max_gen_len: int):
    """LaVIN_Generator.generate, greedy: (decoded strings, per sample the logits of its new tokens).
    `images` holds a zero image for a text-only sample, as eval.py builds the batch."""
    cfg, p = model.config, params(model)
    n_feats = cfg.image_tokens
    indicators = [int(image is not None) for image in images]
    batch_images = torch.stack([image if image is not None else torch.zeros(3, cfg.vit.image_size, cfg.vit.image_size)
                                for image in images])
    image_embeds = ref_neck(ref_vit(batch_images, p, cfg), p)
    prefix_img, prefix_txt = tokenizer.encode("Image: ", bos=True, eos=False), tokenizer.encode("Image: N/A", bos=True)
    prompt_tokens = [(prefix_img + [0] * n_feats if flag else prefix_txt) + tokenizer.encode(x, bos=False, eos=False)
                     for x, flag in zip(prompts, indicators)]
    min_size, max_size = min(map(len, prompt_tokens)), max(map(len, prompt_tokens))
    total_len = min(cfg.llama.max_seq_len, max_gen_len + max_size)
    tokens = torch.zeros(len(prompts), total_len, dtype=torch.long)
    known = torch.zeros_like(tokens, dtype=torch.bool)
    for k, t in enumerate(prompt_tokens):
        tokens[k, :len(t)], known[k, :len(t)] = torch.tensor(t), True
    embed = p["llama.tok_embeddings.weight"]
    token_embeds = embed[tokens].clone()
    for i, flag in enumerate(indicators):
        if flag:
            token_embeds[i, len(prefix_img):len(prefix_img) + n_feats] = image_embeds[i]
    modality = p["adapter_modality_embedding.weight"][torch.tensor(indicators)][:, None]
    cache, prev_pos, new_logits = {}, 0, [[] for _ in prompts]
    for cur_pos in range(min_size, total_len):
        h = torch.cat([modality, token_embeds[:, prev_pos:cur_pos]], 1) if prev_pos == 0 else token_embeds[:, prev_pos:cur_pos]
        logits = ref_llama(h, prev_pos, p, cfg, cache)[:, -1]
        next_token = logits.argmax(-1)
        for i in range(len(prompts)):
            if not known[i, cur_pos]:
                new_logits[i].append(logits[i])
        token_embeds[:, cur_pos] = torch.where(known[:, cur_pos, None], token_embeds[:, cur_pos], embed[next_token])
        tokens[:, cur_pos] = torch.where(known[:, cur_pos], tokens[:, cur_pos], next_token)
        prev_pos = cur_pos
    decoded = []
    for i, t in enumerate(tokens.tolist()):
        t = t[:len(prompt_tokens[i]) + max_gen_len]
        t = t[:t.index(tokenizer.eos_id)] if tokenizer.eos_id in t else t
        decoded.append(tokenizer.decode(t))
    return decoded, new_logits


def ref_lavin_logits(model: LaVIN, tokens: torch.Tensor, image: torch.Tensor | None, image_start: int) -> torch.Tensor:
    """The reference's forward of one sample alone (batch size 1): logits [L, vocab]."""
    cfg, p = model.config, params(model)
    h = p["llama.tok_embeddings.weight"][tokens].clone()
    h[0] = p["adapter_modality_embedding.weight"][int(image is not None)]
    if image is not None:
        h[image_start:image_start + cfg.image_tokens] = ref_neck(ref_vit(image[None], p, cfg), p)[0]
    return ref_llama(h[None], 0, p, cfg, {})[0]


# ---- the model under test ------------------------------------------------------------------------------

def params(model: LaVIN) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def tiny_model(vit_routing: str, seed: int = 0, vocab_size: int | None = None) -> LaVIN:
    """The tiny LaVIN with the same random weights for any mode: non-trivial adapters, routers
    of order-1 logits (temperature 1) that vary visibly from token to token."""
    torch.manual_seed(seed)
    llama = LlamaConfig.from_preset("tiny", **({} if vocab_size is None else {"vocab_size": vocab_size}))
    model = LaVIN(LaVINConfig.from_preset("tiny", llama=llama, temperature=1.0, vit_routing=vit_routing))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".conv_B." in name or ".conv_D." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("expert_weights.weight"):
                param.copy_(3 * torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(300)]
    texts += ["Image: N/A", "Image: "] + [p + a for p, a, _ in SAMPLES]
    return Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=300)


def images_for(model: LaVIN, count: int, seed: int = 10) -> torch.Tensor:
    size = model.config.vit.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the ViT's routing modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["token", "cls", "batch0"])
def test_vit_routing_modes_equal_the_reference_restatement(mode):
    model = tiny_model(mode).double()
    images = images_for(model, 3).double()
    p, cfg = params(model), model.config
    with torch.no_grad():
        ours = model.vit(images)
        if mode == "token":     # the reference at batch size 1, image by image
            expected = torch.cat([ref_vit(images[b:b + 1], p, cfg) for b in range(3)])
        elif mode == "batch0":  # the reference at this batch size
            expected = ref_vit(images, p, cfg)
        else:
            expected = ref_vit(images, p, cfg, cls_routing=True)
    assert relative(ours, expected) < 1e-12
    # the three modes are three different functions on a batch (so each comparison has teeth)
    others = {m: tiny_model(m).double().vit(images).detach() for m in ("token", "cls", "batch0") if m != mode}
    for other in others.values():
        assert relative(other, expected) > 1e-3


def test_token_routing_gives_an_image_the_same_features_in_any_batch():
    model = tiny_model("token")
    images = images_for(model, 4)
    with torch.no_grad():
        alone = model.vit(images[2:3])[0]
        for batch in (images, images[[2, 0]], images[[1, 3, 2]]):
            position = [int(torch.equal(b, images[2])) for b in batch].index(1)
            torch.testing.assert_close(model.vit(batch)[position], alone, rtol=1e-5, atol=1e-5)
    routing = model.vit.blocks[1].adapter_attn.last_routing
    assert routing.shape == (3, model.config.vit.grid ** 2 + 1, 2)    # per image, per token
    assert (routing[0, :, 0] - routing[0, 0, 0]).abs().max() > 1e-3    # tokens routed differently


def test_batch0_couples_an_image_to_the_batch_first_image_as_the_reference_does():
    model = tiny_model("batch0").double()
    images = images_for(model, 4).double()
    p, cfg = params(model), model.config
    with torch.no_grad():
        first_a = model.vit(images[[0, 2, 3]])
        first_b = model.vit(images[[1, 2, 3]])
        other_last = model.vit(images[[0, 2, 1]])
        # image 2's features follow the batch's first image, exactly as in the reference
        for ours, batch in ((first_a, [0, 2, 3]), (first_b, [1, 2, 3])):
            assert relative(ours, ref_vit(images[batch], p, cfg)) < 1e-12
        assert relative(first_a[1], first_b[1]) > 1e-3
        # but not the other images of the batch
        assert relative(other_last[1], first_a[1]) < 1e-12


def test_batch0_routes_by_a_text_first_sample_zero_image_as_the_reference_does(tokenizer):
    """The reference runs a text-only sample through its ViT as a zero image: first in the
    batch, that image routes every other."""
    model = tiny_model("batch0").double()
    layout = SequenceLayout(tokenizer, image_tokens=model.config.image_tokens)
    images = images_for(model, 2).double()
    batch = Collator(layout, image_loader=lambda k: images[k])([Sample(str(i), *s) for i, s in
                                                                 enumerate([SAMPLES[1], SAMPLES[0], SAMPLES[2]])])
    p, cfg = params(model), model.config
    with torch.no_grad():
        h = model.embed(batch.tokens, batch.has_image, batch.images, batch.image_start)
        zero = torch.zeros(1, *images.shape[1:], dtype=images.dtype)
        expected = ref_neck(ref_vit(torch.cat([zero, images]), p, cfg), p)[1:]
    slots = slice(batch.image_start, batch.image_start + cfg.image_tokens)
    assert relative(h[1:, slots], expected) < 1e-12


# ---- the whole model with a reference checkpoint ----------------------------------------------------------

def reference_checkpoint(model: LaVIN) -> dict:
    """checkpoint-E.pth as the reference's save_model writes it, names written out by hand."""
    state = {}
    for n, layer in enumerate(model.llama.layers):
        for k, v in layer.adapter_attn.state_dict().items():
            state[f"module.layers.{n}.adapter_attn.{k}"] = v.clone()
    for n, block in enumerate(model.vit.blocks):
        for k, v in block.adapter_attn.state_dict().items():
            state[f"module.backbone.visual.transformer.resblocks.{n}.adapter_attn.{k}"] = v.clone()
    for k, v in model.adapter_proj.state_dict().items():
        state[f"module.adapter_proj.{k}"] = v.clone()
    state["module.adapter_modality_embedding.weight"] = model.adapter_modality_embedding.weight.detach().clone()
    args = argparse.Namespace(temperature=model.config.temperature, adapter_scale=1.0,
                              adapter_dim=model.config.adapter_hidden, hidden_proj=model.config.neck_hidden)
    return {"model": state, "optimizer": {}, "epoch": 19, "scaler": {}, "args": args}


def test_reference_checkpoint_in_token_mode_gives_the_reference_logits_on_a_mixed_batch(tmp_path, tokenizer):
    trained = tiny_model("token", seed=3)      # stands in for a model the reference trained
    path = tmp_path / "checkpoint-19.pth"
    torch.save(reference_checkpoint(trained), path)
    model = tiny_model("token", seed=3)
    with torch.no_grad():  # fresh adapters, the same backbones: the file must bring the values
        for name, param in model.named_parameters():
            if "adapter" in name:
                param.zero_()
    load_adapters(model, path)
    model = model.double()
    layout = SequenceLayout(tokenizer, image_tokens=model.config.image_tokens)
    images = images_for(model, 2).double()
    batch = Collator(layout, image_loader=lambda k: images[k])([Sample(str(i), *s) for i, s in enumerate(SAMPLES)])
    with torch.no_grad():
        logits = model(batch)
    for row, (_, _, image) in enumerate(SAMPLES):
        length = int((batch.tokens[row] != 0).nonzero().max()) + 1
        expected = ref_lavin_logits(model, batch.tokens[row, :length], None if image is None else images[image],
                                    batch.image_start)
        # 1e-6: lavin_fast's RoPE angles and its returned logits are fp32 even in a float64 model
        assert relative(logits[row, :length], expected) < 1e-6, row


# ---- gradients of per-token routing through both backends --------------------------------------------------

def ref_token_adapter(x: torch.Tensor, module: MMAdapter, mode: str, p: dict) -> torch.Tensor:
    """The reference adapter on the sequence-first view of x [B, N, d]: "batch0" is the reference
    on the whole batch, "token" the reference on each sample alone (batch size 1)."""
    t = module.temperature
    if mode == "batch0":
        return ref_adapter(x.transpose(0, 1), p, "", t).transpose(0, 1)
    return torch.cat([ref_adapter(x[b][:, None], p, "", t).transpose(0, 1) for b in range(x.shape[0])])


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["token", "batch0"])
def test_per_token_routing_gradients_match_float64(backend_name, mode, monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_BACKEND", backend_name)
    torch.manual_seed(0)
    module = MMAdapter(32, hidden_dim=8, groups=2, temperature=2.0, routing=mode).eval()
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.copy_(torch.randn(tensor.shape) * (tensor[0].numel() ** -0.5 if tensor.dim() > 1 else 0.5))
    x = torch.randn(3, 7, 32)
    dy = torch.randn(3, 7, 32)
    names = ["x"] + [n for n, _ in module.named_parameters()]

    def run(target, x_in, forward):
        x_in = x_in.clone().requires_grad_(True)
        leaves = [x_in] + list(target.parameters())
        y = forward(x_in)
        grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        return y.detach(), dict(zip(names, grads))

    oracle_module = MMAdapter(32, hidden_dim=8, groups=2, temperature=2.0, routing=mode).double()
    oracle_module.load_state_dict(module.state_dict())

    def oracle_forward(x_in):
        p = dict(oracle_module.named_parameters())
        return ref_token_adapter(x_in, oracle_module, mode, p)

    y64, g64 = run(oracle_module, x.double(), oracle_forward)
    y, g = run(module.to(DEVICE), x.to(DEVICE), module)
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "torch")
    y32, g32 = run(module, x.to(DEVICE), module)      # the plain PyTorch op in fp32: the baseline
    assert_close_to_oracle("y", y.cpu(), y64, y32.cpu())
    for name in names:
        magnitude = g64[name].abs().max().item()
        assert_close_to_oracle(name, g[name].cpu(), g64[name], g32[name].cpu(), ulps=4, magnitude=magnitude)
        assert relative(g[name].cpu(), g64[name]) < 1e-5, name          # and the fp32 baseline is sound
    # the router trains through the per-token weights (and in batch0 only from sample 0's tokens)
    assert g["expert_weights.weight"].abs().max() > 0


# ---- the mode in adapter files, training and the command line -------------------------------------------

def test_adapter_files_record_the_mode_and_refuse_another(tmp_path):
    path = save_adapters(tiny_model("token"), tmp_path / "token.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["vit_routing"] == "token"
    assert read_adapter_config(path).vit_routing == "token"
    load_adapters(tiny_model("token", seed=1), path)
    cls_model = tiny_model("cls", seed=1)
    before = cls_model.vit.blocks[0].adapter_attn.conv_B.weight.detach().clone()
    with pytest.raises(CheckpointError, match="trained with vit_routing 'token', the model routes with 'cls'"):
        load_adapters(cls_model, path)
    with pytest.raises(CheckpointError, match="vit_routing"):
        load_adapters(cls_model, path, strict=False)
    assert torch.equal(cls_model.vit.blocks[0].adapter_attn.conv_B.weight, before)   # nothing copied
    load_adapters(cls_model, path, vit_routing="cls")                                 # explicit override
    assert not torch.equal(cls_model.vit.blocks[0].adapter_attn.conv_B.weight, before)
    with pytest.raises(ValueError, match="the model routes its ViT with 'cls'"):
        load_adapters(cls_model, path, vit_routing="batch0")


def test_files_without_a_recorded_mode_were_trained_with_cls(tmp_path):
    path = save_adapters(tiny_model("cls"), tmp_path / "cls.safetensors")
    with safe_open(str(path), framework="pt") as handle:   # rewrite it as lavin_fast wrote it before
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    del metadata["vit_routing"]
    config = json.loads(metadata["config"])
    del config["vit_routing"]
    metadata["config"] = json.dumps(config)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    assert read_adapter_config(old).vit_routing == "cls"
    load_adapters(tiny_model("cls"), old)
    with pytest.raises(CheckpointError, match="record.? no mode was trained with 'cls'"):
        load_adapters(tiny_model("token"), old)


def test_reference_checkpoints_load_as_token_or_batch0_only(tmp_path):
    path = tmp_path / "checkpoint-1.pth"
    torch.save(reference_checkpoint(tiny_model("token")), path)
    load_adapters(tiny_model("token"), path)
    load_adapters(tiny_model("batch0"), path)
    with pytest.raises(CheckpointError, match="trained with vit_routing 'token' or 'batch0'"):
        load_adapters(tiny_model("cls"), path)
    load_adapters(tiny_model("cls"), path, vit_routing="cls")


def test_token_is_the_default_and_the_mode_is_an_option():
    assert LaVINConfig().vit_routing == "token" and LaVINConfig.from_preset("7b").vit_routing == "token"
    with pytest.raises(ValueError, match="vit_routing must be one of"):
        LaVINConfig(vit_routing="image")
    with pytest.raises(ValueError, match="vit-routing must be one of"):
        TrainConfig(vit_routing="image")
    assert config_from_args(build_parser().parse_args(["--vit-routing", "batch0"])).vit_routing == "batch0"
    assert TrainConfig().vit_routing is None            # None: the adapters file's mode, else token
    args = cli.build_parser().parse_args(["eval", "--run", "r", "--vit-routing", "batch0", "--reference-decoding"])
    assert args.vit_routing == "batch0" and args.reference_decoding
    assert not cli.build_parser().parse_args(["eval", "--run", "r"]).reference_decoding   # opt-in
    with pytest.raises(ValueError, match="routing must be one of"):
        MMAdapter(32, routing="image")
    with pytest.raises(ValueError, match=r"per-token weights must be \(2, 5, 2\)"):
        MMAdapter(32, routing="token")(torch.randn(2, 5, 32), weights=torch.full((2, 4, 2), 0.5))
    model = tiny_model("token")
    assert all(b.adapter_attn.routing == "token" for b in model.vit.blocks)
    assert all(layer.adapter_attn.routing == "cls" for layer in model.llama.layers)   # the modality token


# ---- the reference's evaluation: decoding positions, one output string --------------------------------------

def test_reference_decoding_reproduces_the_reference_generator(tokenizer):
    model = tiny_model("batch0", seed=5, vocab_size=tokenizer.n_words).double()   # every id decodable
    layout = SequenceLayout(tokenizer, image_tokens=model.config.image_tokens)
    pictures = images_for(model, 2).double()
    # a text-only sample first (its zero image routes the ViT), prompts of three lengths
    order = [SAMPLES[1], SAMPLES[0], SAMPLES[2]]
    prompts = [prompt for prompt, _, _ in order]
    images = [None if k is None else pictures[k] for _, _, k in order]
    max_new = 5
    texts, ref_logits = ref_generate(model, tokenizer, prompts, images, max_new)
    ours = generate_tokens(model, layout, prompts, images, max_new_tokens=max_new, return_logits=True,
                           reference_decoding=True)
    assert sum(len(rows) for rows in ours.logits) >= 6
    for row, rows in enumerate(ours.logits):
        assert relative(rows, torch.stack(ref_logits[row][:len(rows)])) < 1e-6, row   # fp32 RoPE and logits
    assert generate(model, layout, prompts, images, max_new_tokens=max_new, reference_decoding=True) == texts
    # lavin_fast's own decode (every position at its index) is a different function
    fixed = generate_tokens(model, layout, prompts, images, max_new_tokens=max_new, return_logits=True)
    assert max(relative(a[1:], b[1:]) for a, b in zip(fixed.logits, ours.logits) if len(a) > 1 and len(b) > 1) > 1e-4
