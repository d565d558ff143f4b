"""The fused MM-Adapter (kernels/mm_adapter.py), the module `lavin_fast.MMAdapter`, the functional
`lavin_fast.mm_adapter` and the backend switch, judged against float64 oracles.

Two oracles: `reference.mm_adapter` (dense form) for the kernel entry, and the reference code's
own formulation (grouped `Conv1d` modules over [B, d, N]) for the module, which also checks
that the dense gradients land on the right grouped blocks. Rule: `helpers.assert_close_to_oracle`
(kernel error <= 2x PyTorch's error in the same dtype + a rounding step or two, see
ROW_SUM_ULPS). On CPU the kernels run in Triton's interpreter; with CUDA everything runs on
the GPU, and bf16 and LLaMA-sized shapes join.
"""
import contextlib
import copy
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close_to_oracle, requires_cuda
from lavin_fast import MMAdapter, mm_adapter, native, reference, select_backend
from lavin_fast.kernels import mm_adapter as kernel
from lavin_fast.kernels._alloc import empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
PARAM_NAMES = ("x", "down_weight", "down_bias", "up_b_weight", "up_b_bias", "up_d_weight", "up_d_bias", "routing")
# The rounding allowance (helpers.assert_close_to_oracle): 1 step for y and dx, 2 for the
# gradients summed over all rows (added up in another order by design: row blocks, row groups,
# d slices), each step relative to the size of the terms, from the reference run on absolute
# values. 500 random fp32 problems needed at most 0.7 of a step.
ROW_SUM_ULPS = 2


def ulps(name):
    return 1 if name in ("y", "x") else ROW_SUM_ULPS


@pytest.fixture(autouse=True)
def _triton_kernels_on_cpu(monkeypatch):
    """The ops' CPU kernel runs the native code by default; the tests here are the Triton kernels'
    (in the interpreter without a GPU), so they ask for them unless a test picks a backend."""
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "triton")


@contextlib.contextmanager
def backend(name):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAVIN_FAST_BACKEND", name)
        yield


# ----------------------------------------------------------------------------------------------
# Kernel entry against reference.mm_adapter
# ----------------------------------------------------------------------------------------------

def make_index(kind, batch, tokens, gen):
    """(routing_index, table rows) of a routing mode: None (row b reads routing[b]), the
    padded-batch index row // N, per-token rows, or an arbitrary index with repeats and unused
    table rows."""
    if kind == "none":
        return None, batch
    if kind == "per_sample":
        return torch.arange(batch)[:, None].expand(batch, tokens).to(DEVICE), batch
    if kind == "per_token":
        return torch.arange(batch * tokens, dtype=torch.int32).view(batch, tokens).to(DEVICE), batch * tokens
    table = batch * tokens + 3
    return torch.randint(0, table - 2, (batch, tokens), generator=gen).to(DEVICE), table   # 2 rows never read


def make_problem(batch, tokens, dim, hidden, dtype, seed, layout="contiguous", groups=2, index="none"):
    """Random inputs as a user holds them: x and dy in `dtype` (with the drawn memory layout),
    parameters and the routing table in fp32, the up-projections grouped and non-zero so every
    gradient is non-trivial. Returns (params in the kernel's order, routing_index, dy)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE)

    def activation():
        if layout == "sequence_first":   # the ViT's [N, B, d] storage, seen as [B, N, d]
            return randn(tokens, batch, dim).to(dtype).transpose(0, 1)
        if layout == "strided":          # every other channel of a wider tensor
            return randn(batch, tokens, 2 * dim).to(dtype)[..., ::2]
        return randn(batch, tokens, dim).to(dtype)

    routing_index, table = make_index(index, batch, tokens, gen)
    per_group = hidden // groups
    params = dict(
        x=activation(),
        down_weight=randn(hidden, dim, std=dim ** -0.5),
        down_bias=randn(hidden, std=0.5),
        up_b_weight=randn(dim, per_group, std=per_group ** -0.5),
        up_b_bias=randn(dim, std=0.5),
        up_d_weight=randn(dim, per_group, std=per_group ** -0.5),
        up_d_bias=randn(dim, std=0.5),
        routing=torch.softmax(randn(table, 2, std=2.0), dim=-1),
    )
    return params, routing_index, activation()


def reference_run(params, routing_index, dy, scale, mask, dtype=None):
    """reference.mm_adapter forward + backward on the grouped weights made dense (their
    gradient lands on the grouped blocks); dtype=float64 for the oracle, None for the baseline
    (the plain op in the inputs' own dtypes)."""
    leaves = {k: (v.to(dtype) if dtype else v).detach().requires_grad_() for k, v in params.items()}
    groups = leaves["down_weight"].shape[0] // leaves["up_b_weight"].shape[1]
    up_weight = torch.stack([reference.grouped_to_dense(leaves[name][..., None], groups)
                             for name in ("up_b_weight", "up_d_weight")])
    up_bias = torch.stack([leaves["up_b_bias"], leaves["up_d_bias"]])
    m = None if mask is None else mask.to(dtype or torch.float32)
    y = reference.mm_adapter(leaves["x"], leaves["routing"], leaves["down_weight"], leaves["down_bias"],
                             up_weight, up_bias, scale, m, routing_index=routing_index)
    y.backward(dy.to(dtype) if dtype else dy)
    return y, {k: v.grad for k, v in leaves.items()}


def assert_matches_reference(params, routing_index, dy, scale, p, seed, y, grads):
    mask = kernel.dropout_mask(seed, *params["x"].shape[:2], params["down_bias"].shape[0], p, DEVICE) if p else None
    y64, grads64 = reference_run(params, routing_index, dy, scale, mask, torch.float64)
    y_base, grads_base = reference_run(params, routing_index, dy, scale, mask)
    y_abs, grads_abs = reference_run({k: v.abs() for k, v in params.items()}, routing_index, dy.abs(), scale, mask,
                                     torch.float64)
    assert y.dtype == params["x"].dtype
    assert_close_to_oracle("y", y, y64, y_base, magnitude=y_abs.max().item())
    for name in PARAM_NAMES:
        assert grads[name].dtype == params[name].dtype, name
        assert_close_to_oracle(f"d {name}", grads[name], grads64[name], grads_base[name], ulps=ulps(name),
                               magnitude=grads_abs[name].max().item())


def kernel_run(params, routing_index, dy, scale, p, seed):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    y = kernel.mm_adapter(*leaves.values(), routing_index, scale, p, seed)
    y.backward(dy)
    return y, {k: v.grad for k, v in leaves.items()}


def at_least(examples):
    """More examples than the CI profile's default where a test is cheap; never fewer than the
    profile asks for (the GPU profile's are many)."""
    return settings(max_examples=max(examples, settings().max_examples))


# LLaMA-sized rows join on a GPU, where they are cheap.
BIG = torch.cuda.is_available()
shapes = dict(
    batch=st.integers(1, 3),
    tokens=st.sampled_from([1, 2, 5, 17, 37] + ([512] if BIG else [])),
    dim=st.sampled_from([4, 16, 40, 132, 1000] + ([4096, 5120] if BIG else [])),
    hidden=st.sampled_from([4, 8, 12, 16]),
    scale=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**31 - 2),
)


@at_least(30)
@given(**shapes, dtype=st.sampled_from(DTYPES), p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
       layout=st.sampled_from(["contiguous", "contiguous", "sequence_first", "strided"]),
       groups=st.sampled_from([1, 2, 2]), index=st.sampled_from(["none", "none", "per_token", "arbitrary"]))
def test_kernel_forward_and_every_gradient_match_the_reference(batch, tokens, dim, hidden, scale, seed,
                                                               dtype, p, layout, groups, index):
    params, routing_index, dy = make_problem(batch, tokens, dim, hidden, dtype, seed, layout, groups, index)
    y, grads = kernel_run(params, routing_index, dy, scale, p, seed)
    assert_matches_reference(params, routing_index, dy, scale, p, seed, y, grads)


@pytest.mark.parametrize("index", ["per_sample", "per_token", "arbitrary"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_index_reads_each_rows_table_entry_and_sums_its_gradient(index, dtype):
    """Padded batches (row // N), per-token routing (arange into [B*N, 2]) and an arbitrary
    index with repeats and unused table rows (whose gradient must be exactly 0); N = 37, d = 1000."""
    params, routing_index, dy = make_problem(2, 37, 1000, 8, dtype, seed=21, index=index)
    y, grads = kernel_run(params, routing_index, dy, 0.8, 0.1, 4)
    assert_matches_reference(params, routing_index, dy, 0.8, 0.1, 4, y, grads)
    unused = torch.ones(params["routing"].shape[0], dtype=torch.bool, device=DEVICE)
    unused[routing_index.reshape(-1).long()] = False
    assert torch.equal(grads["routing"][unused], torch.zeros_like(grads["routing"][unused]))
    assert (index == "arbitrary") == bool(unused.any())


def test_du_takes_w_hd_at_fp32_accuracy_on_16_bit_mmas():
    """dU = s (w hd)^T dy in fp16: with w hd rounded to fp16 once, this problem's d up_b_weight
    was 1.97e-4 off against PyTorch's 8.1e-5 (found by a search of 250 draws, the only one of
    them); w hd as head and tail (`_split16`) keeps it within the rule."""
    params, routing_index, dy = make_problem(1, 5, 4, 4, torch.float16, seed=0, groups=1)
    y, grads = kernel_run(params, routing_index, dy, 0.05, 0.0, 0)
    assert_matches_reference(params, routing_index, dy, 0.05, 0.0, 0, y, grads)


def test_per_sample_index_equals_no_index():
    params, routing_index, dy = make_problem(3, 5, 40, 8, torch.float32, seed=8, index="per_sample")
    y, grads = kernel_run(params, routing_index, dy, 1.1, 0.2, 3)
    y_none, grads_none = kernel_run(params, None, dy, 1.1, 0.2, 3)
    torch.testing.assert_close(y, y_none, rtol=0, atol=0)
    for name in PARAM_NAMES:
        torch.testing.assert_close(grads[name], grads_none[name], rtol=1e-6, atol=1e-7, msg=name)


@at_least(12)
@given(**shapes, block_m=st.sampled_from([16, 32]), block_slice=st.sampled_from([64, 128, 256]),
       block_slice_dhw=st.sampled_from([64, 128, 256]), block_m_up=st.sampled_from([16, 32]),
       block_d_up=st.sampled_from([16, 64]), block_m_cols=st.sampled_from([16, 32]),
       block_d_cols=st.sampled_from([16, 32, 64]), block_rows=st.sampled_from([16, 64]),
       chunk_bytes=st.sampled_from([1, 4096, 1 << 30]), waves=st.sampled_from([1, 4]), p=st.sampled_from([0.0, 0.3]),
       small_rows=st.sampled_from([0, 4, 1000]), block_k_small=st.sampled_from([16, 128]),
       block_d_small=st.sampled_from([16, 128]))
def test_kernel_launches_are_right_for_any_block_sizes(batch, tokens, dim, hidden, scale, seed, block_m, block_slice,
                                                       block_slice_dhw, block_m_up, block_d_up, block_m_cols,
                                                       block_d_cols, block_rows, chunk_bytes, waves, p, small_rows,
                                                       block_k_small, block_d_small):
    """Block-size keys of the table as a `config=` override: slices, row groups and chunks of any
    size (chunk_bytes 1: one block of rows per chunk), and the one-launch forward for no rows,
    a few, or every drawn shape (up to 111 rows in a 128-row block)."""
    params, routing_index, dy = make_problem(batch, tokens, dim, hidden, torch.float32, seed, index="arbitrary")
    config = dict(block_m=block_m, block_slice=block_slice, block_slice_dhw=block_slice_dhw, block_m_up=block_m_up,
                  block_d_up=block_d_up, block_m_cols=block_m_cols, block_d_cols=block_d_cols, block_rows=block_rows,
                  chunk_bytes=chunk_bytes, waves=waves, small_rows=small_rows, block_k_small=block_k_small,
                  block_d_small=block_d_small)
    y, hd, _ = kernel.mm_adapter_forward(*params.values(), routing_index, scale, p, seed, config=config)
    x, down_weight, _, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing = params.values()
    dx, d_routing, *d_weights, _, _ = kernel.mm_adapter_backward(
        dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index, hd, scale, p,
        seed, config=config)
    grads = dict(zip(PARAM_NAMES, (dx, *d_weights, d_routing)))
    assert_matches_reference(params, routing_index, dy, scale, p, seed, y, grads)


def test_host_integer_helpers_equal_tritons():
    """The launch arithmetic's plain-Python cdiv and next_power_of_2 (kernels/_ints.py, for speed)
    give Triton's values."""
    import triton

    from lavin_fast.kernels import _ints
    for n in range(1, 3000):
        assert _ints.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128, 257):
            assert _ints.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _ints.cdiv(0, 7) == 0 and _ints.next_power_of_2(2**40 + 1) == 2**41


def test_block_size_table_covers_every_arch_and_dtype_with_the_same_keys():
    keys = {tuple(sorted(config)) for config in kernel.BLOCK_CONFIGS.values()}
    assert len(keys) == 1
    assert {arch for arch, _ in kernel.BLOCK_CONFIGS} == {"sm80", "sm90", "interpreter"}
    for arch in ("sm80", "sm90", "interpreter"):
        for dtype in ("float32", "float16", "bfloat16"):
            config = kernel.BLOCK_CONFIGS[(arch, dtype)]
            assert config["num_stages"] >= 3 and config["block_m"] >= 16, (arch, dtype)
    x = torch.randn(1, 2, 8, device=DEVICE)
    expected_arch = "interpreter" if DEVICE == "cpu" else ("sm90" if torch.cuda.get_device_capability()[0] >= 9
                                                           else "sm80")
    assert kernel.launch_config(x) == kernel.BLOCK_CONFIGS[(expected_arch, "float32")]
    assert kernel.launch_config(x, dict(block_d_cols=32))["block_d_cols"] == 32
    with pytest.raises(ValueError, match=r"unknown config keys \['block_q'\]"):
        kernel.launch_config(x, dict(block_q=1))


FORWARD_KERNELS = ("_down_kernel", "_hidden_kernel", "_up_kernel", "_small_kernel")


@pytest.fixture
def forward_launches(monkeypatch):
    """The names of the forward kernels launched, in order (each `kernel[grid]` recorded)."""
    launched = []

    class Recorded:
        def __init__(self, name, jitted):
            self.name, self.jitted = name, jitted

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.jitted[grid]

    for name in FORWARD_KERNELS:
        monkeypatch.setattr(kernel, name, Recorded(name, getattr(kernel, name)))
    return launched


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("index", ["none", "per_token", "arbitrary"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_few_rows_are_one_forward_launch_that_matches_the_reference(dtype, index, p, forward_launches):
    """Decoding (one token per sample, M <= the table's small_rows): the forward is
    `_small_kernel` alone, its programs each computing hd over all of d (d = 200: 4 column
    blocks of 64 and 2 steps of 128 in the interpreter), and y and every gradient (the backward
    replaying its dropout mask from hd's seed) match the reference."""
    params, routing_index, dy = make_problem(3, 1, 200, 8, dtype, seed=31, index=index)
    assert 3 <= kernel.launch_config(params["x"])["small_rows"]
    y, grads = kernel_run(params, routing_index, dy, 0.9, p, 7)
    assert forward_launches == ["_small_kernel"]
    assert_matches_reference(params, routing_index, dy, 0.9, p, 7, y, grads)


@requires_cuda
@at_least(40)
@given(**shapes, p=st.sampled_from([0.0, 0.1]))
def test_kernel_bf16_on_gpu(batch, tokens, dim, hidden, scale, seed, p):
    params, routing_index, dy = make_problem(batch, tokens, dim, hidden, torch.bfloat16, seed)
    y, grads = kernel_run(params, routing_index, dy, scale, p, seed)
    assert_matches_reference(params, routing_index, dy, scale, p, seed, y, grads)


def test_a_broadcast_upstream_gradient_is_read_through_its_strides():
    """y.sum().backward() hands the backward an expanded dy whose strides are all 0."""
    params, _, _ = make_problem(2, 5, 40, 8, torch.float32, seed=3)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    kernel.mm_adapter(*leaves.values(), None, 1.5).sum().backward()
    dy = torch.ones_like(params["x"])
    assert_matches_reference(params, None, dy, 1.5, 0.0, 0, kernel.mm_adapter(*params.values(), None, 1.5),
                             {k: v.grad for k, v in leaves.items()})


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------

def test_dropout_mask_keeps_the_right_fraction_and_follows_the_seed():
    batch, tokens, hidden = 8, 512, 16                  # 65,536 draws: 5 sigma is under 0.01
    for p in (0.1, 0.5):
        mask = kernel.dropout_mask(7, batch, tokens, hidden, p, DEVICE)
        assert mask.shape == (batch, tokens, hidden)
        kept = mask != 0
        assert torch.equal(mask[kept], torch.full_like(mask[kept], 1.0 / (1.0 - p)))
        n = mask.numel()
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        small = kernel.dropout_mask(7, 2, 5, hidden, p, DEVICE)
        assert torch.equal(small, mask.view(-1, hidden)[:10].view(2, 5, hidden))   # offset row * r + unit
        assert torch.equal(small, kernel.dropout_mask(7, 2, 5, hidden, p, DEVICE))
        assert not torch.equal(small, kernel.dropout_mask(8, 2, 5, hidden, p, DEVICE))
    # rows are independent draws: no two rows of one call share a pattern more than chance allows
    rows = kernel.dropout_mask(1, 1, 512, 16, 0.5, DEVICE)[0] != 0
    assert rows.unique(dim=0).shape[0] > 500


def test_dropout_in_the_kernel_changes_y_and_replays_in_the_backward():
    """p > 0 against the reference fed the exported mask (y and every gradient), and p = 0 against
    no dropout at all."""
    params, _, dy = make_problem(2, 9, 130, 8, torch.float32, seed=11)
    for p, seed in ((0.25, 5), (0.0, 5)):
        y, grads = kernel_run(params, None, dy, 1.0, p, seed)
        assert_matches_reference(params, None, dy, 1.0, p, seed, y, grads)
    no_dropout = kernel.mm_adapter(*params.values(), None, 1.0, 0.0, 5)
    assert not torch.equal(kernel.mm_adapter(*params.values(), None, 1.0, 0.25, 5), no_dropout)


def test_module_dropout_zero_in_training_equals_eval_and_p_draws_a_fresh_mask_per_call():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32, device=DEVICE)
    with backend("triton"):
        module = randomized(MMAdapter(32, dropout=0.0)).to(DEVICE)
        assert torch.equal(module.train()(x), module.eval()(x))
        module.dropout = 0.3
        module.train()
        torch.manual_seed(1)
        first = module(x)
        torch.manual_seed(1)
        assert torch.equal(module(x), first)          # the seed comes from torch's generator
        assert not torch.equal(module(x), first)      # and is fresh at every call
        assert not torch.equal(first, module.eval()(x))


# ----------------------------------------------------------------------------------------------
# Module and functional form against the reference code's grouped-Conv1d formulation
# ----------------------------------------------------------------------------------------------

def randomized(module, seed=0):
    """Non-zero up-projections and biases (the init is zero, which would hide gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            std = tensor[0].numel() ** -0.5 if tensor.dim() > 1 else 0.5    # 1/sqrt(fan_in) for weights
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    return module


def conv_reference(module, x, weights=None, logits=None):
    """The reference code's forward, written with the module's own Conv1d layers over [B, d, N]
    (conv_B/conv_D grouped): independent of lavin_fast's dense block-diagonal form. `logits`, a
    list, receives the router's logits (with their gradient retained)."""
    if weights is None:
        z = module.expert_weights(x[:, 0])
        if logits is not None:
            z.retain_grad()
            logits.append(z)
        weights = torch.softmax(z / module.temperature, dim=-1)
    h = module.conv_A(x.transpose(1, 2))
    routed = (module.conv_B(h) * weights[:, 0, None, None] + module.conv_D(h) * weights[:, 1, None, None])
    return x + module.scale * routed.transpose(1, 2)


def module_run(module, x, dy, weights, forward):
    module.zero_grad()
    x = x.detach().requires_grad_()
    w = None if weights is None else weights.detach().requires_grad_()
    y = forward(module, x, w)
    y.backward(dy)
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    if w is not None:
        grads["weights"] = w.grad
    return y, grads


@st.composite
def module_configs(draw):
    groups = draw(st.sampled_from([1, 2]))
    dims = [6, 64, 130, 1000] + ([7, 333] if groups == 1 else [])
    return dict(groups=groups, dim=draw(st.sampled_from(dims)), hidden_dim=draw(st.sampled_from([8, 16])),
                scale=draw(st.floats(0.1, 2.0)), temperature=draw(st.floats(0.5, 20.0)))


@at_least(25)
@given(config=module_configs(), batch=st.integers(1, 3), tokens=st.sampled_from([1, 4, 19]),
       router=st.booleans(), functional=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_module_and_functional_match_the_conv_reference(config, batch, tokens, router, functional, dtype, seed):
    torch.manual_seed(seed)
    module = randomized(MMAdapter(**config), seed).to(DEVICE).eval()
    x = torch.randn(batch, tokens, config["dim"], device=DEVICE).to(dtype)
    dy = torch.randn(batch, tokens, config["dim"], device=DEVICE).to(dtype)
    weights = None if router else torch.softmax(torch.randn(batch, 2, device=DEVICE), dim=-1)

    def lavin_forward(m, x, w):
        if not functional:
            return m(x, w)
        w = m.route(x[:, 0]) if w is None else w
        return mm_adapter(x, m.conv_A.weight, m.conv_A.bias, m.conv_B.weight, m.conv_B.bias, m.conv_D.weight,
                          m.conv_D.bias, w, groups=m.groups, scale=m.scale)

    with backend("triton"):
        y, grads = module_run(module, x, dy, weights, lavin_forward)
    with backend("torch"):
        y_base, grads_base = module_run(copy.deepcopy(module), x, dy, weights, lavin_forward)
    oracle, logits = copy.deepcopy(module).double(), []
    y64, grads64 = module_run(oracle, x.double(), dy.double(), None if router else weights.double(),
                              lambda m, x, w: conv_reference(m, x, w, logits))
    # Sizes the roundings are relative to (see ROW_SUM_ULPS): the adapter on absolute values with
    # the oracle's routing, and for the router, its per-sample terms.
    used = torch.softmax(logits[0] / module.temperature, dim=-1) if router else weights.double()
    absolute = copy.deepcopy(module).double()
    with torch.no_grad():
        for tensor in absolute.parameters():
            tensor.abs_()
    y_abs, grads_abs = module_run(absolute, x.double().abs(), dy.double().abs(), used.detach(), conv_reference)
    magnitude = {name: grad.max().item() for name, grad in grads_abs.items()}
    magnitude["y"] = y_abs.max().item()
    if router:
        per_sample = logits[0].grad.abs()                                          # [B, 2]
        magnitude["expert_weights.bias"] = per_sample.sum(0).max().item()
        magnitude["expert_weights.weight"] = (per_sample.T @ x[:, 0].double().abs()).max().item()
        magnitude["x"] = max(magnitude["x"], grads64["x"].abs().max().item())       # plus the router's share
    expected = {"x", "conv_A.weight", "conv_A.bias", "conv_B.weight", "conv_B.bias", "conv_D.weight", "conv_D.bias"}
    expected |= {"expert_weights.weight", "expert_weights.bias"} if router else {"weights"}
    assert set(grads) == expected and set(grads64) == expected
    assert_close_to_oracle("y", y, y64, y_base, magnitude=magnitude["y"])
    for name in sorted(expected):
        assert_close_to_oracle(f"d {name}", grads[name], grads64[name], grads_base[name], ulps=ulps(name),
                               magnitude=magnitude[name])
    if not functional and router:    # the op's router: the weights it used, to fp32 rounding
        torch.testing.assert_close(module.last_routing, module.route(x[:, 0]), rtol=1e-5, atol=1e-6)
    elif not functional:
        assert torch.equal(module.last_routing, weights)


def test_torch_backend_is_the_reference_and_matches_the_conv_oracle():
    module = randomized(MMAdapter(64, hidden_dim=16, groups=2, scale=0.7, temperature=5.0)).double().eval()
    x, dy = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 5, 64, dtype=torch.float64)
    with backend("torch"):
        assert select_backend(x) == "torch"
        y, grads = module_run(module, x, dy, None, lambda m, x, w: m(x, w))
    y64, grads64 = module_run(copy.deepcopy(module), x, dy, None, lambda m, x, w: conv_reference(m, x, w))
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads64[name], rtol=1e-10, atol=1e-12, msg=name)


def test_backend_switch():
    x = torch.randn(1, 2, 8)
    with backend("auto"):
        assert select_backend(x) == ("native" if native.available() else "torch")   # CPU tensors
        assert select_backend(x.double()) == "torch"
    with backend("triton"):
        assert select_backend(x.to(DEVICE)) == "triton"       # on CPU: the interpreter (conftest)
    with backend("torch"):
        assert select_backend(x) == "torch"
    with backend("cuda-please"), pytest.raises(ValueError, match="LAVIN_FAST_BACKEND must be one of"):
        select_backend(x)
    if torch.cuda.is_available():
        with backend("auto"):
            assert select_backend(x.cuda()) == "triton"
            assert select_backend(x.cuda().double()) == "torch"


# ----------------------------------------------------------------------------------------------
# State dict, init, routing record, grouped structure
# ----------------------------------------------------------------------------------------------

REFERENCE_SHAPES_7B = {
    "conv_A.weight": (8, 4096, 1), "conv_A.bias": (8,),
    "conv_B.weight": (4096, 4, 1), "conv_B.bias": (4096,),
    "conv_D.weight": (4096, 4, 1), "conv_D.bias": (4096,),
    "expert_weights.weight": (2, 4096), "expert_weights.bias": (2,),
}


def test_state_dict_has_the_reference_names_and_shapes_and_loads_strictly():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MMAdapter(4096).state_dict().items()}
    assert shapes == REFERENCE_SHAPES_7B
    assert sum(math.prod(s) for s in shapes.values()) == 2_621_760 // 32     # REFERENCE.md section 4

    module = MMAdapter(4096)
    checkpoint = {k: torch.randn(s) for k, s in REFERENCE_SHAPES_7B.items()}
    module.load_state_dict(checkpoint)                                         # strict by default
    assert all(torch.equal(module.state_dict()[k], v) for k, v in checkpoint.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({k: v for k, v in checkpoint.items() if k != "conv_D.bias"})
    with pytest.raises(RuntimeError, match="size mismatch for conv_B.weight"):
        module.load_state_dict({**checkpoint, "conv_B.weight": torch.randn(4096, 8, 1)})
    vit = MMAdapter(1024)
    assert sum(p.numel() for p in vit.parameters()) == 20_490


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_identity_at_init_and_last_routing(name):
    module = MMAdapter(130, hidden_dim=8, groups=2).to(DEVICE).train()   # dropout active: still identity
    x = torch.randn(3, 7, 130, device=DEVICE)
    with backend(name):
        assert torch.equal(module(x), x)
        torch.testing.assert_close(module.last_routing, module.route(x[:, 0]), rtol=1e-5, atol=1e-6)
        assert not module.last_routing.requires_grad
        weights = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]], device=DEVICE, requires_grad=True)
        module(x, weights)
        assert torch.equal(module.last_routing, weights.detach())


def test_kernel_path_reads_the_grouped_weights_without_building_dense_ones():
    """No block_diag / stack of the weights per call (every decode token paid for it): the
    kernels read conv_B / conv_D in their grouped form."""
    module = randomized(MMAdapter(64, hidden_dim=8, groups=2)).to(DEVICE).eval()
    x = torch.randn(2, 5, 64, device=DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("dense weights built on the kernel path")

    with backend("triton"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "grouped_to_dense", refuse)
        patch.setattr(torch, "block_diag", refuse)
        patch.setattr(torch, "stack", refuse)
        y = module(x)
    with backend("torch"):
        torch.testing.assert_close(y, module(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Poison, registration, compilation
# ----------------------------------------------------------------------------------------------

def test_outputs_start_poisoned_so_unwritten_elements_fail():
    assert os.environ.get("LAVIN_FAST_POISON") == "1"
    assert torch.isnan(empty((4, 3), torch.float32, torch.device(DEVICE))).all()
    params, routing_index, dy = make_problem(3, 17, 1000, 8, torch.float32, seed=2, index="arbitrary")  # ragged
    y, hd, _ = kernel.mm_adapter_forward(*params.values(), routing_index, 1.0, 0.1, 9)
    x, down_weight, _, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing = params.values()
    outputs = kernel.mm_adapter_backward(dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                                         routing_index, hd, 1.0, 0.1, 9)
    for name, tensor in zip(("y", "hd", "x", "routing", *PARAM_NAMES[1:-1]), (y, hd, *outputs)):
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("index", ["none", "arbitrary"])
def test_op_registration_passes_opcheck(index):
    """Schema, autograd registration, fake tensors and AOT dispatch of both ops (torch.library)."""
    params, routing_index, dy = make_problem(2, 3, 20, 8, torch.float32, seed=4, index=index)
    leaves = [v.detach().requires_grad_() for v in params.values()]
    seed = torch.tensor([17])
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_fwd.default, (*leaves, routing_index, 1.3, 0.2, seed))
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_fwd.default, (*leaves, routing_index, 1.3, 0.0, None))
    x, down_weight, _, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing = params.values()
    _, hd, _ = kernel.mm_adapter_forward(*params.values(), routing_index, 1.3, 0.2, seed)
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_bwd.default,
                          (dy, x, down_weight, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing, routing_index,
                           hd, 1.3, 0.2, seed))


def compiled_matches_eager(backend_name):
    params, routing_index, dy = make_problem(2, 9, 40, 8, torch.float32, seed=6, index="per_token")

    def step(*tensors):
        return kernel.mm_adapter(*tensors, routing_index, 0.5, 0.2, 123)

    results = []
    for fn in (step, torch.compile(step, backend=backend_name, fullgraph=True)):
        leaves = [v.detach().requires_grad_() for v in params.values()]
        y = fn(*leaves)
        y.backward(dy)
        results.append([y, *(t.grad for t in leaves)])
    for name, eager, compiled in zip(("y", *PARAM_NAMES), *results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0, msg=name)


def test_torch_compile_traces_through_the_op():
    """Dynamo + AOT autograd over the custom op's fake and autograd registrations (no codegen)."""
    compiled_matches_eager("aot_eager")


def test_training_with_dropout_compiles_into_one_graph():
    """The dropout seed is drawn on the device (no .item()), so fullgraph=True holds in training."""
    module = randomized(MMAdapter(40, dropout=0.3)).train()
    x = torch.randn(2, 5, 40)
    with backend("triton"):
        torch.manual_seed(0)
        eager = module(x)
        torch.manual_seed(0)
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@requires_cuda
def test_torch_compile_with_inductor_on_gpu():
    compiled_matches_eager("inductor")
    module = randomized(MMAdapter(256, dropout=0.0)).cuda()
    x = torch.randn(2, 16, 256, device="cuda", dtype=torch.bfloat16)
    with backend("triton"):
        eager = module(x)
        compiled = torch.compile(module, fullgraph=False)(x)
    torch.testing.assert_close(compiled, eager)      # inductor may fuse the router differently


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def functional_args(batch=2, tokens=3, dim=8, hidden=4, **overrides):
    args = dict(
        x=torch.randn(batch, tokens, dim), conv_A_weight=torch.randn(hidden, dim, 1),
        conv_A_bias=torch.randn(hidden), conv_B_weight=torch.randn(dim, hidden // 2, 1),
        conv_B_bias=torch.randn(dim), conv_D_weight=torch.randn(dim, hidden // 2, 1),
        conv_D_bias=torch.randn(dim), routing=torch.full((batch, 2), 0.5),
    )
    return {**args, **overrides}


@pytest.mark.parametrize("backend_name", ["triton", "native", "torch"])
@pytest.mark.parametrize("overrides, error, match", [
    (dict(x=torch.randn(3, 8)), ValueError, r"x must be \[batch, tokens, dim\]"),
    (dict(conv_A_weight=torch.randn(4, 8)), ValueError, "conv_A_weight must be"),
    (dict(conv_A_weight=torch.randn(4, 9, 1)), ValueError, "conv_A_weight must have shape"),
    (dict(conv_B_weight=torch.randn(8, 4, 1)), ValueError, "conv_B_weight must have shape"),
    (dict(conv_D_bias=torch.randn(7)), ValueError, "conv_D_bias must have shape"),
    (dict(routing=torch.rand(2, 3)), ValueError, r"routing must have shape \(2, 2\)"),
    (dict(routing=torch.rand(2)), ValueError, "routing must have shape"),
    (dict(x=torch.randint(0, 3, (2, 3, 8))), ValueError, "x must be a floating-point tensor"),
    (dict(routing=torch.ones(2, 2, dtype=torch.int64)), ValueError, "routing must be a floating-point"),
    (dict(conv_B_bias=torch.randn(8, device="meta")), ValueError, "conv_B_bias is on meta but x is on cpu"),
])
def test_functional_rejects_bad_input(backend_name, overrides, error, match):
    with backend(backend_name), pytest.raises(error, match=match):
        mm_adapter(**functional_args(**overrides))


def test_groups_and_dropout_are_checked():
    with pytest.raises(ValueError, match=r"dim \(7\) and hidden \(4\) must both be divisible by groups \(2\)"):
        mm_adapter(**functional_args(dim=7), groups=2)
    with pytest.raises(ValueError, match="dropout must be in"):
        mm_adapter(**functional_args(), dropout=1.0)
    with pytest.raises(ValueError, match=r"dim \(7\) and hidden_dim \(8\) must be divisible by groups \(2\)"):
        MMAdapter(7, groups=2)
    module = MMAdapter(8, hidden_dim=4)
    with pytest.raises(ValueError, match=r"x must be \[batch, tokens, 8\]"):
        module(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="routing must have shape"):
        module(torch.randn(2, 3, 8), torch.rand(3, 2))


def test_triton_path_rejects_dtypes_the_kernel_does_not_take():
    on_device = {k: v.to(DEVICE) for k, v in functional_args().items()}
    with backend("triton"):
        with pytest.raises(ValueError, match=r"x has dtype torch.float64; the kernel takes"):
            mm_adapter(**{**on_device, "x": on_device["x"].double()})
        with pytest.raises(ValueError, match=r"routing has dtype torch.float64; the kernel takes"):
            mm_adapter(**{**on_device, "routing": on_device["routing"].double()})
    with backend("torch"):       # the reference computes in x's dtype whatever the parameters hold
        assert mm_adapter(**functional_args(x=torch.randn(2, 3, 8, dtype=torch.float64))).dtype == torch.float64


def test_kernel_host_functions_check_their_preconditions():
    params, routing_index, dy = make_problem(2, 3, 20, 8, torch.float32, seed=1)
    x, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing = params.values()
    weights = (down_weight, down_bias, up_b_weight, up_b_bias)
    with pytest.raises(ValueError, match=r"up_d_weight must have shape \(20, 4\)"):
        kernel.mm_adapter_forward(x, *weights, up_d_weight[:, :2], up_d_bias, routing, None, 1.0)
    with pytest.raises(ValueError, match=r"down_bias must have shape \(8,\)"):
        kernel.mm_adapter_forward(x, down_weight, up_b_bias, *weights[2:], up_d_weight, up_d_bias, routing, None, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        kernel.mm_adapter_forward(*params.values(), None, 1.0, -0.1)
    with pytest.raises(ValueError, match=r"routing_index must be an int32/int64 \[2, 3\]"):
        kernel.mm_adapter_forward(*params.values(), torch.zeros(2, 3), 1.0)
    _, hd, _ = kernel.mm_adapter_forward(*params.values(), None, 1.0)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 20\)"):
        kernel.mm_adapter_backward(dy[:1], x, down_weight, *weights[2:], up_d_weight, up_d_bias, routing, None, hd, 1.0)
    with pytest.raises(ValueError, match="hd must be a contiguous fp32"):
        kernel.mm_adapter_backward(dy, x, down_weight, *weights[2:], up_d_weight, up_d_bias, routing, None, hd.half(),
                                   1.0)
    if DEVICE == "cpu":
        with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            patch.setenv("TRITON_INTERPRET", "0")
            kernel.mm_adapter_forward(*params.values(), None, 1.0)


@pytest.mark.parametrize("backend_name", ["triton", "native", "torch"])
@pytest.mark.parametrize("index, match", [
    (torch.tensor([[0, 1, 5], [2, 2, 0]]), r"routing_index values must be in \[0, 5\) \(rows of routing\), got values in \[0, 5\]"),
    (torch.tensor([[0, -1, 1], [2, 2, 0]]), r"values must be in \[0, 5\).*got values in \[-1, 2\]"),
    (torch.zeros(2, 3), "routing_index must be int32 or int64, got torch.float32"),
    (torch.zeros(2, 4, dtype=torch.int64), r"routing_index must have shape \(2, 3\)"),
    (torch.zeros(2, 3, dtype=torch.int64, device="meta"), "routing_index is on meta but x is on cpu"),
])
def test_functional_rejects_a_bad_routing_index(backend_name, index, match):
    with backend(backend_name), pytest.raises(ValueError, match=match):
        mm_adapter(**functional_args(routing=torch.full((5, 2), 0.5)), routing_index=index)
    with backend(backend_name), pytest.raises(ValueError, match=r"routing must be a table \[rows, 2\]"):
        mm_adapter(**functional_args(routing=torch.full((5, 3), 0.5)), routing_index=torch.zeros(2, 3, dtype=torch.int64))


def test_value_checks_run_once_per_tensor_and_again_after_a_change():
    """The index and router rows are checked once (a device sync each) while unmodified: an
    in-place edit, or the rows read with another index, is checked again."""
    index = torch.tensor([[0, 1, 4], [2, 2, 0]])
    args = dict(functional_args(routing=torch.full((5, 2), 0.5)), routing_index=index)
    with backend("torch"):
        mm_adapter(**args)
        index[0, 2] = 5                      # in place: out of the table's rows now
        with pytest.raises(ValueError, match=r"routing_index values must be in \[0, 5\)"):
            mm_adapter(**args)
        router = dict(functional_args(), router_weight=torch.randn(2, 8), router_bias=torch.randn(2), temperature=1.0)
        del router["routing"]
        rows = torch.tensor([0, 4])
        mm_adapter(**router, router_rows=rows, routing_index=torch.tensor([[0, 0, 0], [0, 1, 1]]))
        with pytest.raises(ValueError, match="row 3 of x reads a table row whose source row 4 comes after it"):
            mm_adapter(**router, router_rows=rows, routing_index=torch.tensor([[0, 0, 0], [1, 1, 1]]))
        rows[1] = 6
        with pytest.raises(ValueError, match="router_rows values must be flat rows"):
            mm_adapter(**router, router_rows=rows, routing_index=torch.tensor([[0, 0, 0], [0, 1, 1]]))


@pytest.mark.parametrize("index", ["per_sample", "per_token", "arbitrary"])
def test_functional_routing_index_matches_the_conv_reference_per_row(index):
    """ops.mm_adapter with a routing table and index, both backends, against the reference code's
    grouped Conv1d run row by row with each row's own routing weights (float64)."""
    torch.manual_seed(3)
    module = randomized(MMAdapter(40, hidden_dim=8, groups=2)).to(DEVICE).eval()
    x = torch.randn(2, 5, 40, device=DEVICE)
    routing_index, table = make_index(index, 2, 5, torch.Generator().manual_seed(1))
    routing = torch.softmax(torch.randn(table, 2, device=DEVICE), -1)
    oracle = copy.deepcopy(module).double()
    per_row = routing.double()[routing_index.long()].reshape(-1, 2)
    expected = conv_reference(oracle, x.double().reshape(-1, 1, 40), per_row).reshape(2, 5, 40)
    for name in ("triton", "torch"):
        with backend(name):
            y = mm_adapter(x, module.conv_A.weight, module.conv_A.bias, module.conv_B.weight, module.conv_B.bias,
                           module.conv_D.weight, module.conv_D.bias, routing, routing_index=routing_index)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_module_passes_a_routing_table_and_index_through():
    torch.manual_seed(4)
    module = randomized(MMAdapter(40, hidden_dim=8, groups=2)).to(DEVICE).eval()
    x = torch.randn(2, 5, 40, device=DEVICE)
    routing_index, table = make_index("arbitrary", 2, 5, torch.Generator().manual_seed(2))
    routing = torch.softmax(torch.randn(table, 2, device=DEVICE), -1)
    with backend("triton"):
        y = module(x, routing, routing_index=routing_index)
        expected = mm_adapter(x, module.conv_A.weight, module.conv_A.bias, module.conv_B.weight, module.conv_B.bias,
                              module.conv_D.weight, module.conv_D.bias, routing, routing_index=routing_index)
        with pytest.raises(ValueError, match="routing_index needs weights"):
            module(x, None, routing_index=routing_index)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert torch.equal(module.last_routing, routing)


@pytest.mark.parametrize("backend_name, dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_runs_the_op_in_the_autocast_dtype(backend_name, dtype):
    """Under torch.autocast, x is cast to the autocast dtype and the fp32 weights are read as they
    are: y and dx come out in that dtype, equal to a call on x cast by hand (fp16 for the kernels
    on CPU: the interpreter cannot do bf16). Before the rule, y came out in fp32."""
    torch.manual_seed(5)
    module = randomized(MMAdapter(40, hidden_dim=8, groups=2)).to(DEVICE).eval()
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    routing = module.route(x[:, 0]).detach()
    with backend(backend_name):
        with torch.autocast(DEVICE, dtype=dtype):
            y = module(x, routing)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        dx, d_weight = x.grad.clone(), module.conv_B.weight.grad.clone()
        assert dx.dtype == torch.float32 and d_weight.dtype == torch.float32
        module.zero_grad()
        x_cast = x.detach().to(dtype).requires_grad_()
        expected = module(x_cast, routing)
        expected.float().square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(dx, x_cast.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(d_weight, module.conv_B.weight.grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The op's own router (router_weight, router_bias, temperature, router_rows)
# ----------------------------------------------------------------------------------------------

ROUTER_NAMES = ("x", "conv_A_weight", "conv_A_bias", "conv_B_weight", "conv_B_bias", "conv_D_weight", "conv_D_bias",
                "router_weight", "router_bias")


def router_layout(kind, batch, tokens):
    """(router_rows, routing_index) of a routing mode, as `MMAdapter` and the LLaMA pass them:
    every row by itself, each sample by its row b * N, packed rows (samples of lengths 1..N in
    each row) by their first tokens, and the reference's batch0 (sample 0's rows, row (b, n)
    reading its row n)."""
    if kind == "per_token":
        return None, None
    if kind == "per_sample":
        return torch.arange(batch, device=DEVICE) * tokens, None
    if kind == "batch0":
        positions = torch.arange(tokens, device=DEVICE)
        return positions, positions.expand(batch, tokens)
    first, sample_of = [], []
    for row in range(batch):                       # packed: samples of lengths 1, 2, 3, .. filling the row
        n, length = 0, 1
        while n < tokens:
            span = min(length, tokens - n)
            first.append(row * tokens + n)
            sample_of += [len(first) - 1] * span
            n, length = n + span, length + 1
    return torch.tensor(first, device=DEVICE), torch.tensor(sample_of, device=DEVICE).view(batch, tokens)


def router_problem(batch, tokens, dim, hidden, dtype, seed, groups=2):
    """Inputs in the op's (conv) shapes: x and dy in `dtype`, the parameters fp32, non-zero."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE)

    per_group = hidden // groups
    params = dict(
        x=randn(batch, tokens, dim).to(dtype),
        conv_A_weight=randn(hidden, dim, 1, std=dim ** -0.5), conv_A_bias=randn(hidden, std=0.5),
        conv_B_weight=randn(dim, per_group, 1, std=per_group ** -0.5), conv_B_bias=randn(dim, std=0.5),
        conv_D_weight=randn(dim, per_group, 1, std=per_group ** -0.5), conv_D_bias=randn(dim, std=0.5),
        router_weight=randn(2, dim, std=2 * dim ** -0.5), router_bias=randn(2),
    )
    return params, randn(batch, tokens, dim).to(dtype)


def restated_router_run(params, rows, index, dy, temperature, scale, groups, dtype=None):
    """The routed adapter with its router written out here (gather the source rows, logits,
    softmax, each row's table row), forward + backward: dtype=float64 for the oracle, None for
    the baseline (the inputs' own dtypes, the router in fp32 as `reference.route`). Returns
    (y, grads, the routing table, its gradient, the logits' gradient dz, the source rows x[rows])."""
    leaves = {k: (v.to(dtype) if dtype else v).detach().requires_grad_() for k, v in params.items()}
    x = leaves["x"]
    batch, tokens, dim = x.shape
    flat = torch.arange(batch * tokens, device=DEVICE) if rows is None else rows.long()
    sources = x.reshape(-1, dim)[flat]
    router_dtype = torch.promote_types(x.dtype, torch.float32)
    logits = sources.to(router_dtype) @ leaves["router_weight"].to(router_dtype).T + leaves["router_bias"].to(router_dtype)
    logits.retain_grad()
    table = torch.softmax(logits / temperature, dim=-1)
    table.retain_grad()
    reads = (flat if rows is None else (index.reshape(-1) if index is not None
                                        else torch.arange(batch, device=DEVICE).repeat_interleave(tokens)))
    w = table.to(x.dtype)[reads].view(batch, tokens, 2)
    h = torch.nn.functional.conv1d(x.transpose(1, 2), leaves["conv_A_weight"].to(x.dtype), leaves["conv_A_bias"].to(x.dtype))
    up = [torch.nn.functional.conv1d(h, leaves[f"conv_{e}_weight"].to(x.dtype), leaves[f"conv_{e}_bias"].to(x.dtype),
                                     groups=groups).transpose(1, 2) for e in ("B", "D")]
    y = x + scale * (w[..., :1] * up[0] + w[..., 1:] * up[1])
    y.backward(dy.to(dtype) if dtype else dy)
    return y, {k: v.grad for k, v in leaves.items()}, table.detach(), table.grad, logits.grad, sources.detach()


def op_router_run(params, rows, index, dy, temperature, scale, groups):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    y, table = mm_adapter(**leaves, routing_index=index, temperature=temperature, router_rows=rows, groups=groups,
                          scale=scale)
    y.backward(dy)
    return y, {k: v.grad for k, v in leaves.items()}, table


def assert_router_matches_the_restatement(params, rows, index, dy, temperature, scale, groups, y, grads, table):
    y64, grads64, table64, _, dz64, sources64 = restated_router_run(params, rows, index, dy, temperature, scale,
                                                                    groups, torch.float64)
    y_base, grads_base, table_base, _, _, _ = restated_router_run(params, rows, index, dy, temperature, scale, groups)
    absolute = {k: v.abs() for k, v in params.items()}
    y_abs, grads_abs, _, d_table_abs, _, sources_abs = restated_router_run(absolute, rows, index, dy.abs(),
                                                                           temperature, scale, groups, torch.float64)
    # The router's gradients dz^T x[rows] and sum dz, dz = w (dw - w . dw) / t per table row,
    # round relative to the larger of: the terms of the routing gradient dw (fp32 sums, from the
    # absolute run; dz's terms are at most 2 w |dw| / t), and dz itself in x's dtype's steps (dw
    # comes from products in x's dtype). A two-element db_r of opposite signs otherwise leaves
    # PyTorch's error a lucky draw.
    in_x_steps = torch.finfo(params["x"].dtype).eps / torch.finfo(torch.float32).eps
    dz_terms = torch.maximum(2 * table64 * d_table_abs / temperature, in_x_steps * dz64.abs())          # [T, 2]
    sizes = dict(router_weight=(dz_terms.T @ sources_abs).max().item(), router_bias=dz_terms.sum(0).max().item())
    assert y.dtype == params["x"].dtype
    assert_close_to_oracle("y", y, y64, y_base, magnitude=y_abs.max().item())
    assert_close_to_oracle("routing table", table, table64, table_base, magnitude=1.0)
    magnitude = {k: v.max().item() for k, v in grads_abs.items()}
    magnitude.update(sizes)
    magnitude["x"] = max(magnitude["x"], grads64["x"].abs().max().item())        # plus the router's share
    for name in ROUTER_NAMES:
        assert grads[name].dtype == params[name].dtype, name
        assert_close_to_oracle(f"d {name}", grads[name], grads64[name], grads_base[name], ulps=ulps(name),
                               magnitude=magnitude[name])


def on_backend(name):
    if name == "native" and not native.available():
        pytest.skip("the native CPU kernels are not built here")
    if name == "native" and DEVICE != "cpu":
        pytest.skip("the native kernels run CPU tensors")
    return backend(name)


# (B, N, d, r, groups): odd d, N = 1, and d = 1000 with 37 tokens, which the interpreter's table
# splits into 3 chunks of rows (a table row's readers in a later chunk than its source).
ROUTER_SHAPES = [(2, 5, 40, 8, 2), (3, 1, 33, 8, 1), (2, 37, 1000, 12, 2)]


# The torch backend in 16 bits is PyTorch's own run, the baseline itself: it runs in fp32 here
# (and in float64 in the next test).
ROUTER_BACKENDS = [(name, dtype) for name in ("triton", "native", "torch") for dtype in DTYPES
                   if name != "torch" or dtype == torch.float32]


@pytest.mark.parametrize("shape", ROUTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["per_token", "per_sample", "packed", "batch0"])
@pytest.mark.parametrize("backend_name, dtype", ROUTER_BACKENDS, ids=lambda v: str(v))
def test_fused_router_forward_and_every_gradient_match_the_reference(shape, kind, backend_name, dtype):
    """The op's router against a float64 restatement: y, the table it returns, and the
    gradients of x, every adapter weight and the router's weight and bias."""
    batch, tokens, dim, hidden, groups = shape
    params, dy = router_problem(batch, tokens, dim, hidden, dtype, seed=sum(shape) + len(kind), groups=groups)
    rows, index = router_layout(kind, batch, tokens)
    with on_backend(backend_name):
        y, grads, table = op_router_run(params, rows, index, dy, 3.0, 0.7, groups)
    assert not table.requires_grad
    assert_router_matches_the_restatement(params, rows, index, dy, 3.0, 0.7, groups, y, grads, table)


@pytest.mark.parametrize("kind", ["per_token", "per_sample", "packed", "batch0"])
def test_torch_backend_router_is_the_float64_restatement(kind):
    params, dy = router_problem(2, 6, 40, 8, torch.float64, seed=9)
    params = {k: v.double() for k, v in params.items()}
    rows, index = router_layout(kind, 2, 6)
    with backend("torch"):
        y, grads, table = op_router_run(params, rows, index, dy, 2.5, 1.3, 2)
    y64, grads64, table64, _, _, _ = restated_router_run(params, rows, index, dy, 2.5, 1.3, 2, torch.float64)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(table, table64, rtol=1e-12, atol=1e-12)
    for name in ROUTER_NAMES:
        torch.testing.assert_close(grads[name], grads64[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind, expected", [("per_token", ["_small_kernel"]),
                                            ("per_sample", ["_down_kernel", "_hidden_kernel", "_up_kernel"])])
def test_a_few_rows_routed_by_the_ops_router(kind, expected, forward_launches):
    """The router at a few rows: every row routing itself is one launch (its logits ride in the
    pass over x, the table written by program 0); a table gathered from source rows takes the
    three launches. Both match the float64 restatement."""
    params, dy = router_problem(3, 1, 200, 8, torch.float32, seed=12)
    rows, index = router_layout(kind, 3, 1)
    y, grads, table = op_router_run(params, rows, index, dy, 2.0, 0.8, 2)
    assert forward_launches == expected
    assert_router_matches_the_restatement(params, rows, index, dy, 2.0, 0.8, 2, y, grads, table)


def test_fused_router_equals_the_table_it_returns_passed_back_in():
    """The router's y is the op fed its own table (per token, through an arange index)."""
    params, _ = router_problem(2, 9, 64, 8, torch.float32, seed=5)
    with backend("triton"):
        y, table = mm_adapter(**params, temperature=2.0)
        router_free = {k: v for k, v in params.items() if not k.startswith("router")}
        again = mm_adapter(**router_free, routing=table,
                           routing_index=torch.arange(18, device=DEVICE).view(2, 9))
    torch.testing.assert_close(y, again, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name", ["triton", "native", "torch"])
@pytest.mark.parametrize("overrides, match", [
    (dict(router_rows=torch.tensor([0, 6])), r"router_rows values must be flat rows of x in \[0, 6\).*\[0, 6\]"),
    (dict(router_rows=torch.tensor([-1, 3])), r"router_rows values must be flat rows.*got values in \[-1, 3\]"),
    (dict(router_rows=torch.tensor([0.0, 3.0])), "router_rows must be int32 or int64, got torch.float32"),
    (dict(router_rows=torch.tensor([[0, 3]])), r"router_rows must be a non-empty \[table rows\] vector"),
    (dict(router_rows=torch.tensor([0, 3, 4])), r"router_rows \(one per sample without a routing_index\) must have"),
    (dict(router_rows=torch.tensor([1, 3])), r"row 0 of x reads a table row whose source row 1 comes after it"),
    (dict(router_rows=torch.tensor([0, 4]), routing_index=torch.tensor([[0, 0, 0], [1, 1, 1]])),
     r"row 3 of x reads a table row whose source row 4 comes after it"),
    (dict(router_rows=torch.tensor([0, 3], device="meta")), "router_rows is on meta but x is on cpu"),
    (dict(routing_index=torch.zeros(2, 3, dtype=torch.int64)), "router_rows=None routes every row by itself"),
    (dict(routing=torch.full((2, 2), 0.5)), "pass either routing .* or router_weight"),
    (dict(router_bias=None), "router_weight needs router_bias and temperature"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(router_weight=torch.randn(3, 8)), r"router_weight must have shape \(2, 8\)"),
    (dict(router_weight=None, routing=torch.full((2, 2), 0.5)),
     "router_bias, router_rows and temperature belong to the router"),
])
def test_functional_rejects_a_bad_router(backend_name, overrides, match):
    args = dict(functional_args(), router_weight=torch.randn(2, 8), router_bias=torch.randn(2), temperature=1.0)
    del args["routing"]
    args.update(overrides)
    with backend(backend_name), pytest.raises(ValueError, match=match):
        mm_adapter(**args)


@pytest.mark.parametrize("routing", ["cls", "batch0"])
def test_module_trains_after_running_under_inference_mode(routing):
    """The module reuses its router layout per shape; one made under torch.inference_mode (an
    inference tensor, which autograd cannot save) is not the one a training call gets."""
    module = MMAdapter(16, hidden_dim=4, groups=2, routing=routing).to(DEVICE)
    x = torch.randn(2, 3, 16, device=DEVICE)
    with backend("triton"):
        with torch.inference_mode():
            module(x)
        x.requires_grad_()
        module(x).sum().backward()
    assert x.grad is not None and module.expert_weights.weight.grad is not None


@pytest.mark.parametrize("routing", ["cls", "token", "batch0", "packed"])
def test_module_routes_every_mode_inside_the_op(routing):
    """MMAdapter's router runs in the op for every mode (no separate router pass: the kernel
    path never calls `reference.route`), with the module's own float64 torch-backend run as the
    oracle for y, last_routing and every parameter's gradient."""
    torch.manual_seed(6)
    module = randomized(MMAdapter(40, hidden_dim=8, groups=2, temperature=4.0,
                                  routing="cls" if routing == "packed" else routing)).to(DEVICE).eval()
    x, dy = torch.randn(3, 7, 40, device=DEVICE), torch.randn(3, 7, 40, device=DEVICE)
    rows, index = router_layout(routing, 3, 7)
    packed = dict(first=rows, routing_index=index) if routing == "packed" else {}

    def refuse(*args, **kwargs):
        raise AssertionError("the router ran outside the op")

    with backend("triton"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "route", refuse)
        y, grads = module_run(module, x, dy, None, lambda m, x, w: m(x, **packed))
        used = module.last_routing
    oracle = copy.deepcopy(module).double()
    with backend("torch"):
        y64, grads64 = module_run(oracle, x.double(), dy.double(), None, lambda m, x, w: m(x, **packed))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(used.double(), oracle.last_routing, rtol=1e-5, atol=1e-6)
    assert used.shape == {"cls": (3, 2), "token": (3, 7, 2), "batch0": (3, 7, 2), "packed": (rows.numel(), 2)}[routing]
    assert set(grads) == set(grads64) and "expert_weights.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name].double(), grads64[name], rtol=1e-4, atol=1e-5, msg=name)


def test_kernel_checks_the_router_rows_order_across_chunks_once_per_tensor():
    """Several chunks: a table row must be computed (by its source row's chunk) before a later
    row reads it. The launch checks that itself (callers may skip ops), once per rows tensor:
    a late source row is a clear error, fixed in place it passes."""
    params, _ = router_problem(2, 40, 32, 8, torch.float32, seed=2)
    x, a_w, a_b, b_w, b_b, d_w, d_b, r_w, r_b = params.values()
    weights = (a_w.squeeze(-1), a_b, b_w.squeeze(-1), b_b, d_w.squeeze(-1), d_b)
    rows = torch.tensor([0, 50], device=DEVICE)            # sample 1 starts at row 40, routed by row 50
    config = dict(chunk_bytes=16 * 32 * 4)                 # 16-row chunks: 5 of them
    with pytest.raises(ValueError, match="row 40 of x reads a table row whose source row 50 comes after it"):
        kernel.mm_adapter_forward(x, *weights, None, None, 1.0, router=kernel.Router(r_w, r_b, 2.0, rows),
                                  config=config)
    rows[1] = 40
    y, _, table = kernel.mm_adapter_forward(x, *weights, None, None, 1.0, router=kernel.Router(r_w, r_b, 2.0, rows),
                                            config=config)
    with backend("torch"):
        expected, expected_table = mm_adapter(**params, temperature=2.0, router_rows=rows)
    torch.testing.assert_close(table, expected_table, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["per_token", "packed"])
def test_op_registration_with_the_router_passes_opcheck(kind):
    """The router's schema (three optional tensors and the temperature), its fakes (the table
    [T, 2] as a third output, the router's gradients after the weights') and autograd."""
    params, dy = router_problem(2, 3, 20, 8, torch.float32, seed=4)
    rows, index = router_layout(kind, 2, 3)
    x, a_w, a_b, b_w, b_b, d_w, d_b, r_w, r_b = (v.detach().requires_grad_() for v in params.values())
    weights = (a_w.squeeze(-1), a_b, b_w.squeeze(-1), b_b, d_w.squeeze(-1), d_b)
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_fwd.default,
                          (x, *weights, None, index, 1.3, 0.0, None, r_w, r_b, rows, 2.0))
    router = kernel.Router(r_w.detach(), r_b.detach(), 2.0, rows)
    _, hd, table = kernel.mm_adapter_forward(x.detach(), *(w.detach() for w in weights), None, index, 1.3,
                                             router=router)
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_bwd.default,
                          (dy, x.detach(), weights[0].detach(), *(w.detach() for w in weights[2:]), table, index, hd,
                           1.3, 0.0, None, r_w.detach(), rows, 2.0))
