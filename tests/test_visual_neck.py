"""The fused visual neck (kernels/visual_neck.py), the module `lavin_fast.VisualNeck`, the functional
`lavin_fast.visual_neck` and the backend switch, judged against float64 oracles.

Two oracles: `reference.visual_neck` for the kernel entry, and the reference code's own layers
(`Linear -> SiLU -> Linear` built from the module's state dict; for swiglu, the gate and value
halves of conv_A applied as two separate linears) for the module, which also checks the
gate-rows-first convention. Rule: `helpers.assert_close_to_oracle` (kernel error <= 2x PyTorch's
error in the same dtype + rounding steps). On CPU the kernels run in Triton's interpreter; with
CUDA everything runs on the GPU and bf16 joins.
"""
import contextlib
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_close_to_oracle, requires_cuda
from lavin_fast import VisualNeck, native, reference, select_backend, visual_neck
from lavin_fast.kernels import visual_neck as kernel
from lavin_fast.kernels._alloc import empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
GRAD_NAMES = ("x", "in_weight", "in_bias", "out_weight", "out_bias")
# Gradients summed over all rows (the weights' and biases') are added up in another order than
# PyTorch's (row blocks, d_out chunks); they get 4 rounding steps on top of 2x PyTorch's error.
ROW_SUM_ULPS = 4


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


def at_least(examples):
    """More examples than the CI profile's default where a test is cheap; never fewer than the
    profile asks for (the GPU profile's are many)."""
    return settings(max_examples=max(examples, settings().max_examples))


# ----------------------------------------------------------------------------------------------
# Kernel entry against reference.visual_neck
# ----------------------------------------------------------------------------------------------

def make_problem(lead, d_in, hidden, d_out, activation, dtype, seed, layout="contiguous", weight_dtype=None):
    """Random inputs as a user holds them: x and dy in `dtype` (x with the drawn memory layout),
    weights in fp32 (or `weight_dtype`), biases non-zero so every gradient is non-trivial.
    lead: x's leading dims, e.g. (M,) or (B, 6)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE)

    if layout == "strided":                    # every other feature of a wider tensor
        x = randn(*lead, 2 * d_in).to(dtype)[..., ::2]
    elif layout == "transposed" and len(lead) == 2:  # [6, B, d] storage seen as [B, 6, d]
        x = randn(lead[1], lead[0], d_in).to(dtype).transpose(0, 1)
    else:
        x = randn(*lead, d_in).to(dtype)
    in_rows = hidden * (2 if activation == "swiglu" else 1)
    weight_dtype = weight_dtype or torch.float32
    params = dict(
        x=x,
        in_weight=randn(in_rows, d_in, std=d_in ** -0.5).to(weight_dtype),
        in_bias=randn(in_rows, std=0.5).to(weight_dtype),
        out_weight=randn(d_out, hidden, std=hidden ** -0.5).to(weight_dtype),
        out_bias=randn(d_out, std=0.5).to(weight_dtype),
    )
    return params, randn(*lead, d_out).to(dtype)


def reference_run(params, dy, activation, dtype=None):
    """reference.visual_neck forward + backward; dtype=float64 for the oracle, None for the
    baseline (the plain op in the inputs' own dtypes, as the torch backend runs it)."""
    leaves = {k: (v.to(dtype) if dtype else v).detach().requires_grad_() for k, v in params.items()}
    y = reference.visual_neck(*leaves.values(), activation)
    y.backward(dy.to(dtype) if dtype else dy)
    return y, {k: v.grad for k, v in leaves.items()}


def assert_matches_reference(params, dy, activation, y, grads):
    y64, grads64 = reference_run(params, dy, activation, torch.float64)
    y_base, grads_base = reference_run(params, dy, activation)
    assert y.dtype == params["x"].dtype
    assert_close_to_oracle("y", y, y64, y_base)
    for name in GRAD_NAMES:
        assert grads[name].dtype == params[name].dtype, name
        assert_close_to_oracle(f"d {name}", grads[name], grads64[name], grads_base[name],
                               ulps=1 if name == "x" else ROW_SUM_ULPS)


def kernel_run(params, dy, activation):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    y = kernel.visual_neck(*leaves.values(), activation)
    y.backward(dy)
    return y, {k: v.grad for k, v in leaves.items()}


# LaVIN-sized problems join on a GPU, where they are cheap.
BIG = torch.cuda.is_available()
shapes = dict(
    lead=st.sampled_from([(1,), (6,), (7,), (13,), (37,), (1, 6), (3, 6), (2, 5)]
                         + ([(32, 6), (200,)] if BIG else [])),
    d_in=st.sampled_from([16, 40, 100, 257] + ([1024] if BIG else [])),
    hidden=st.sampled_from([7, 16, 23, 32, 128]),
    d_out=st.sampled_from([16, 33, 70, 130] + ([1000, 4096, 5120] if BIG else [])),
    activation=st.sampled_from(["silu", "swiglu"]),
    seed=st.integers(0, 2**31 - 2),
)


@at_least(40)
@given(**shapes, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "contiguous", "strided",
                                                                        "transposed"]))
def test_kernel_forward_and_every_gradient_match_the_reference(lead, d_in, hidden, d_out, activation, seed,
                                                               dtype, layout):
    params, dy = make_problem(lead, d_in, hidden, d_out, activation, dtype, seed, layout)
    y, grads = kernel_run(params, dy, activation)
    assert y.shape == (*lead, d_out)
    assert_matches_reference(params, dy, activation, y, grads)


@at_least(16)
@given(**shapes, block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([16, 64]),
       block_h=st.sampled_from([16, 64]), block_k=st.sampled_from([16, 64]), block_e=st.sampled_from([16, 256]),
       split_k=st.sampled_from([1, 2, 3, 64]), split_n=st.sampled_from([1, 2, 3, 64]))
def test_kernel_launches_are_right_for_any_block_sizes(lead, d_in, hidden, d_out, activation, seed, block_m,
                                                       block_n, block_h, block_k, block_e, split_k, split_n):
    """Any blocks, any split of d_in in the forward's first layer and of d_out in the backward's
    dhidden (the GPU default splits both to fill a wave at LaVIN's few rows; the interpreter's
    does not)."""
    params, dy = make_problem(lead, d_in, hidden, d_out, activation, torch.float32, seed)
    blocks = dict(block_m=block_m, block_n=block_n, block_h=block_h, block_k=block_k)
    y, pre = kernel.visual_neck_forward(*params.values(), activation, split_k=split_k, **blocks)
    x, in_weight, _, out_weight, _ = params.values()
    grads = kernel.visual_neck_backward(dy, x, in_weight, out_weight, pre, activation, block_e=block_e,
                                        split_n=split_n, **blocks)
    assert_matches_reference(params, dy, activation, y, dict(zip(GRAD_NAMES, grads)))


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_kernel_at_lavins_input_width_and_hidden(activation):
    """d_in = 1024 and h = 128 as in LaVIN (d_out kept small for the interpreter), 6 CLS rows of 2
    images as [B, 6, d_in]."""
    params, dy = make_problem((2, 6), 1024, 128, 48, activation, torch.float16, seed=4)
    y, grads = kernel_run(params, dy, activation)
    assert_matches_reference(params, dy, activation, y, grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_with_weights_in_x_dtype(dtype):
    """A model cast as a whole (.half()): weights in x's dtype; gradients come back in it."""
    params, dy = make_problem((9,), 40, 24, 70, "swiglu", dtype, seed=5, weight_dtype=dtype)
    y, grads = kernel_run(params, dy, "swiglu")
    assert_matches_reference(params, dy, "swiglu", y, grads)


@requires_cuda
@at_least(40)
@given(**shapes)
def test_kernel_bf16_on_gpu(lead, d_in, hidden, d_out, activation, seed):
    params, dy = make_problem(lead, d_in, hidden, d_out, activation, torch.bfloat16, seed)
    y, grads = kernel_run(params, dy, activation)
    assert_matches_reference(params, dy, activation, y, grads)


def test_a_broadcast_upstream_gradient_is_read_through_its_strides():
    """y.sum().backward() hands the backward an expanded dy whose strides are all 0."""
    params, _ = make_problem((3, 6), 40, 16, 33, "silu", torch.float32, seed=3)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    kernel.visual_neck(*leaves.values(), "silu").sum().backward()
    dy = torch.ones(3, 6, 33, device=DEVICE)
    assert_matches_reference(params, dy, "silu", kernel.visual_neck(*params.values(), "silu"),
                             {k: v.grad for k, v in leaves.items()})


def test_no_rows():
    params, dy = make_problem((0, 6), 40, 16, 33, "swiglu", torch.float32, seed=0)
    y, grads = kernel_run(params, dy, "swiglu")
    assert y.shape == (0, 6, 33) and grads["x"].shape == (0, 6, 40)
    for name in GRAD_NAMES[1:]:
        assert torch.equal(grads[name], torch.zeros_like(params[name])), name


def test_outputs_start_poisoned_so_unwritten_elements_fail():
    assert os.environ.get("LAVIN_FAST_POISON") == "1"
    assert torch.isnan(empty((4, 3), torch.float32, torch.device(DEVICE))).all()
    for activation in ("silu", "swiglu"):
        params, dy = make_problem((37,), 257, 24, 130, activation, torch.float32, seed=2)  # ragged everywhere
        y, pre = kernel.visual_neck_forward(*params.values(), activation)
        x, in_weight, _, out_weight, _ = params.values()
        grads = kernel.visual_neck_backward(dy, x, in_weight, out_weight, pre, activation)
        for name, tensor in zip(("y", "pre", *GRAD_NAMES), (y, pre, *grads)):
            assert torch.isfinite(tensor).all(), f"{activation}: {name} has unwritten elements"
        torch.testing.assert_close(pre, F.linear(x, in_weight, params["in_bias"]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Module and functional form against the reference code's layers
# ----------------------------------------------------------------------------------------------

def randomized(module, seed=0):
    """Non-zero biases (the init is zero, which would hide their effect on the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            std = tensor[0].numel() ** -0.5 if tensor.dim() > 1 else 0.5    # 1/sqrt(fan_in) for weights
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    return module


def layers_reference(module, x):
    """The neck written with plain layers loaded from the module's state dict: the reference
    code's `Linear -> SiLU -> Linear` (silu), or for swiglu the gate (first h rows of conv_A) and
    value (last h rows) as two linears, silu(gate) * value, then conv_B."""
    state = module.state_dict()
    h = module.hidden_dim
    conv_B = nn.Linear(h, module.out_dim).to(x)
    conv_B.load_state_dict({"weight": state["conv_B.weight"], "bias": state["conv_B.bias"]})
    if module.activation == "silu":
        conv_A = nn.Linear(module.in_dim, h).to(x)
        conv_A.load_state_dict({"weight": state["conv_A.weight"], "bias": state["conv_A.bias"]})
        return nn.Sequential(conv_A, nn.SiLU(), conv_B)(x), (conv_A, conv_B)
    gate, value = nn.Linear(module.in_dim, h).to(x), nn.Linear(module.in_dim, h).to(x)
    gate.load_state_dict({"weight": state["conv_A.weight"][:h], "bias": state["conv_A.bias"][:h]})
    value.load_state_dict({"weight": state["conv_A.weight"][h:], "bias": state["conv_A.bias"][h:]})
    return conv_B(F.silu(gate(x)) * value(x)), (gate, value, conv_B)


def layers_grads(layers, activation):
    """The reference layers' gradients under the module's parameter names."""
    if activation == "silu":
        conv_A, conv_B = layers
        a_weight, a_bias = conv_A.weight.grad, conv_A.bias.grad
    else:
        gate, value, conv_B = layers
        a_weight = torch.cat([gate.weight.grad, value.weight.grad])
        a_bias = torch.cat([gate.bias.grad, value.bias.grad])
    return {"conv_A.weight": a_weight, "conv_A.bias": a_bias,
            "conv_B.weight": conv_B.weight.grad, "conv_B.bias": conv_B.bias.grad}


def module_run(module, x, dy, functional, forward=None):
    """y and every gradient (by parameter name, and "x") through the module, or through the
    functional form with the module's parameters; `forward` replaces the module's call (compiled)."""
    module.zero_grad()
    x = x.detach().requires_grad_()
    if functional:
        y = visual_neck(x, module.conv_A.weight, module.conv_A.bias, module.conv_B.weight, module.conv_B.bias,
                        module.activation)
    else:
        y = (module if forward is None else forward)(x)
    y.backward(dy)
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["x"] = x.grad
    return y, grads


@at_least(16)
@given(activation=st.sampled_from(["silu", "swiglu"]), in_dim=st.sampled_from([16, 100]),
       hidden_dim=st.sampled_from([16, 40]), out_dim=st.sampled_from([33, 64]),
       batch=st.integers(1, 3), functional=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_module_and_functional_match_the_reference_layers(activation, in_dim, hidden_dim, out_dim, batch,
                                                          functional, dtype, seed):
    torch.manual_seed(seed)
    module = randomized(VisualNeck(in_dim, hidden_dim, out_dim, activation), seed).to(DEVICE)
    x = torch.randn(batch, 6, in_dim, device=DEVICE).to(dtype)
    dy = torch.randn(batch, 6, out_dim, device=DEVICE).to(dtype)
    with backend("triton"):
        assert select_backend(x) == "triton"
        y, grads = module_run(module, x, dy, functional)
    with backend("torch"):
        assert select_backend(x) == "torch"
        y_base, grads_base = module_run(copy.deepcopy(module), x, dy, functional)
    oracle = copy.deepcopy(module).double()
    x64 = x.double().requires_grad_()
    y64, layers = layers_reference(oracle, x64)
    y64.backward(dy.double())
    grads64 = {**layers_grads(layers, activation), "x": x64.grad}
    assert set(grads) == set(grads64) == {"x", "conv_A.weight", "conv_A.bias", "conv_B.weight", "conv_B.bias"}
    assert y.shape == (batch, 6, out_dim)
    assert_close_to_oracle("y", y, y64, y_base)
    for name in sorted(grads):
        assert_close_to_oracle(f"d {name}", grads[name], grads64[name], grads_base[name],
                               ulps=1 if name == "x" else ROW_SUM_ULPS)


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_torch_backend_is_the_reference_and_matches_the_layers(activation):
    module = randomized(VisualNeck(64, 16, 40, activation)).double()
    x, dy = torch.randn(2, 6, 64, dtype=torch.float64), torch.randn(2, 6, 40, dtype=torch.float64)
    with backend("torch"):
        y, grads = module_run(module, x, dy, functional=False)
    x64 = x.clone().requires_grad_()
    y64, layers = layers_reference(copy.deepcopy(module), x64)
    y64.backward(dy)
    grads64 = {**layers_grads(layers, activation), "x": x64.grad}
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads64[name], rtol=1e-10, atol=1e-12, msg=name)


def test_backend_switch():
    x = torch.randn(6, 8)
    with backend("auto"):
        assert select_backend(x) == ("native" if native.available() else "torch")   # CPU tensors
    with backend("triton"):
        assert select_backend(x) == "triton"                 # the interpreter is on (conftest)
    if torch.cuda.is_available():
        with backend("auto"):
            assert select_backend(x.cuda()) == "triton"
            assert select_backend(x.cuda().double()) == "torch"


# ----------------------------------------------------------------------------------------------
# State dict and init
# ----------------------------------------------------------------------------------------------

def reference_shapes(out_dim, in_rows=128):
    return {"conv_A.weight": (in_rows, 1024), "conv_A.bias": (in_rows,),
            "conv_B.weight": (out_dim, 128), "conv_B.bias": (out_dim,)}


@pytest.mark.parametrize("out_dim, count", [(4096, 659_584), (5120, 791_680)])   # REFERENCE.md section 4
def test_state_dict_has_the_reference_names_and_shapes_and_loads_strictly(out_dim, count):
    with torch.device("meta"):
        silu = {k: tuple(v.shape) for k, v in VisualNeck(out_dim=out_dim).state_dict().items()}
        swiglu = {k: tuple(v.shape) for k, v in VisualNeck(out_dim=out_dim, activation="swiglu").state_dict().items()}
    assert silu == reference_shapes(out_dim)
    assert swiglu == reference_shapes(out_dim, in_rows=256)               # gate rows, then value rows
    assert sum(math.prod(s) for s in silu.values()) == count

    module = VisualNeck(out_dim=out_dim)
    checkpoint = {k: torch.randn(s) for k, s in reference_shapes(out_dim).items()}
    module.load_state_dict(checkpoint)                                     # strict by default
    assert all(torch.equal(module.state_dict()[k], v) for k, v in checkpoint.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({k: v for k, v in checkpoint.items() if k != "conv_B.bias"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        module.load_state_dict({**checkpoint, "conv_C.weight": torch.randn(3)})
    with pytest.raises(RuntimeError, match="size mismatch for conv_A.weight"):     # a silu checkpoint
        VisualNeck(out_dim=out_dim, activation="swiglu").load_state_dict(checkpoint)


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_init_is_xavier_uniform_with_zero_biases(activation):
    torch.manual_seed(0)
    module = VisualNeck(1024, 128, 4096, activation)
    for linear in (module.conv_A, module.conv_B):
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = linear.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3)   # U(-b, b)
        assert abs(w.mean().item()) < 0.01 * bound
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def neck_tensors(activation="silu", d_in=40, hidden=16, d_out=33):
    params, _ = make_problem((2, 6), d_in, hidden, d_out, activation, torch.float32, seed=1)
    return params


@pytest.mark.parametrize("name", ["triton", "native", "torch"])
def test_bad_inputs_get_clear_errors(name):
    p = neck_tensors()
    cases = [
        (dict(x=p["x"][..., :39]), "in_weight must have shape \\(16, 39\\)"),
        (dict(in_weight=p["in_weight"].T), "in_weight must have shape"),
        (dict(in_bias=p["in_bias"][:8]), "in_bias must have shape \\(16,\\)"),
        (dict(out_bias=p["out_bias"][:32]), "out_bias must have shape \\(33,\\)"),
        (dict(out_weight=p["out_weight"][0]), "out_weight \\[d_out, h\\]"),
        (dict(x=p["x"].to(torch.int32)), "x must be a floating-point tensor"),
        (dict(in_bias=p["in_bias"].to(torch.int64)), "in_bias must be a floating-point tensor"),
        (dict(out_weight=p["out_weight"].to("meta")), "out_weight is on meta"),
    ]
    with backend(name):
        for change, message in cases:
            with pytest.raises(ValueError, match=message):
                visual_neck(**{**p, **change})
        with pytest.raises(ValueError, match="activation must be 'silu' or 'swiglu', got 'gelu'"):
            visual_neck(**p, activation="gelu")
        with pytest.raises(ValueError, match="in_weight must have shape \\(32, 40\\)"):   # silu weights, swiglu
            visual_neck(**p, activation="swiglu")
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'swiglu'\), got 'relu'"):
        VisualNeck(activation="relu")
    with pytest.raises(ValueError, match="VisualNeck|in_weight"):
        VisualNeck(40, 16, 33)(torch.randn(2, 6, 41))


def test_kernel_entry_checks_its_own_preconditions():
    p = neck_tensors("swiglu")
    x, in_weight, in_bias, out_weight, out_bias = p.values()
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        kernel.visual_neck_forward(x.double(), in_weight, in_bias, out_weight, out_bias, "swiglu")
    with pytest.raises(ValueError, match="in_weight must have shape \\(32, 40\\) \\(swiglu\\)"):
        kernel.visual_neck_forward(x, in_weight[:16], in_bias, out_weight, out_bias, "swiglu")
    with pytest.raises(ValueError, match="activation must be one of"):
        kernel.visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, "SiLU")
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        kernel.visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, "swiglu", block_k=24)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        kernel.visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, "swiglu", block_m=8)
    y, pre = kernel.visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, "swiglu")
    dy = torch.randn_like(y)
    with pytest.raises(ValueError, match="dy must have shape \\(2, 6, 33\\)"):
        kernel.visual_neck_backward(dy[..., :32], x, in_weight, out_weight, pre, "swiglu")
    with pytest.raises(ValueError, match="pre must be a contiguous fp32"):
        kernel.visual_neck_backward(dy, x, in_weight, out_weight, pre.half(), "swiglu")
    with pytest.raises(ValueError, match="pre must be a contiguous fp32"):
        kernel.visual_neck_backward(dy, x, in_weight, out_weight, pre[..., :16], "swiglu")
    with pytest.raises(ValueError, match="split_k / split_n must be >= 1, got 0"):
        kernel.visual_neck_forward(x, in_weight, in_bias, out_weight, out_bias, "swiglu", split_k=0)
    with pytest.raises(ValueError, match="split_k / split_n must be >= 1, got 0"):
        kernel.visual_neck_backward(dy, x, in_weight, out_weight, pre, "swiglu", split_n=0)
    with pytest.raises(ValueError, match="out_weight is on meta"):
        kernel.visual_neck_forward(x, in_weight, in_bias, out_weight.to("meta"), out_bias, "swiglu")


# ----------------------------------------------------------------------------------------------
# Registration, compilation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_ops_are_registered_with_fakes_and_autograd(activation):
    """torch.library's own checks: schema, fake (meta) shapes against real outputs, autograd
    registration, and AOT dispatch (what torch.compile traces through)."""
    params, dy = make_problem((2, 6), 40, 16, 33, activation, torch.float16, seed=6)   # pre is fp32 all the same
    leaves = [v.detach().requires_grad_() for v in params.values()]
    torch.library.opcheck(torch.ops.lavin_fast.visual_neck_fwd.default, (*leaves, activation))
    x, in_weight, _, out_weight, _ = params.values()
    _, pre = kernel.visual_neck_forward(*params.values(), activation)
    torch.library.opcheck(torch.ops.lavin_fast.visual_neck_bwd.default,
                          (dy, x, in_weight, out_weight, pre, activation))


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_torch_compile_matches_eager_forward_and_backward(activation):
    """The op inside a compiled module (fullgraph: no graph break around it) gives exactly the
    eager numbers. LaVIN's shapes in bf16 on a GPU; small ones through the interpreter on CPU."""
    torch.manual_seed(0)
    dims, dtype = ((1024, 128, 4096), torch.bfloat16) if BIG else ((64, 16, 40), torch.float32)
    module = randomized(VisualNeck(*dims, activation)).to(DEVICE)
    compiled_module = copy.deepcopy(module)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(4, 6, dims[0], device=DEVICE).to(dtype)
    dy = torch.randn(4, 6, dims[2], device=DEVICE).to(dtype)
    with backend("triton"):
        eager_y, eager_grads = module_run(module, x, dy, functional=False)
        compiled_y, compiled_grads = module_run(compiled_module, x, dy, functional=False, forward=compiled)
    assert torch.equal(compiled_y, eager_y)
    for name in eager_grads:
        assert torch.equal(compiled_grads[name], eager_grads[name]), name
