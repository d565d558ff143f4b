"""The native CPU kernels (csrc/, lavin_fast.native) behind the CPU kernel of the fused ops:
against the float64 reference (forward and every gradient, the rule of tests/helpers.py), the
dropout mask, thread-count determinism, the build's fallback, and the one-op view of
torch.compile / torch.export. Built once per machine (cached); skipped where it cannot build."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import test_mm_adapter as adapter_tests
import test_visual_neck as neck_tests
from helpers import assert_close_to_oracle
from lavin_fast import MMAdapter, native, select_backend
from lavin_fast.kernels import mm_adapter as adapter_kernel

pytestmark = pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not built here")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "native")


def cpu(tensors):
    return {k: v.cpu() for k, v in tensors.items()}


def adapter_problem(batch, tokens, dim, hidden, dtype, seed, layout="contiguous", groups=2, index="none"):
    params, routing_index, dy = adapter_tests.make_problem(batch, tokens, dim, hidden, dtype, seed, layout, groups,
                                                           index)
    return cpu(params), None if routing_index is None else routing_index.cpu(), dy.cpu()


def adapter_run(params, routing_index, dy, scale, p, seed):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    y = adapter_kernel.mm_adapter(*leaves.values(), routing_index, scale, p, seed)
    y.backward(dy)
    return y, {k: v.grad for k, v in leaves.items()}


def native_mask(seed, params, p):
    batch, tokens = params["x"].shape[:2]
    return native.ops().mm_adapter_dropout_mask(torch.tensor([seed]), batch, tokens, params["down_bias"].shape[0], p)


@settings(max_examples=max(40, settings().max_examples))
@given(batch=st.integers(1, 3), tokens=st.sampled_from([1, 2, 5, 17, 37, 70]),
       dim=st.sampled_from([4, 16, 40, 132, 250, 1000]), hidden=st.sampled_from([4, 8, 12, 16]),
       scale=st.floats(0.05, 4.0), seed=st.integers(0, 2**31 - 2), dtype=st.sampled_from(DTYPES),
       p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
       layout=st.sampled_from(["contiguous", "contiguous", "sequence_first", "strided"]),
       groups=st.sampled_from([1, 2, 2]),
       index=st.sampled_from(["none", "none", "per_sample", "per_token", "arbitrary"]))
# Both forms of the up-projection: few table rows (the experts mixed per table row; blocks of 16
# rows straddling samples, d = 250 leaving columns past the last whole chunk) and per-token rows
# (the experts' own panels).
@example(batch=3, tokens=37, dim=250, hidden=8, scale=0.7, seed=5, dtype=torch.float32, p=0.1,
         layout="contiguous", groups=1, index="per_sample")
@example(batch=3, tokens=37, dim=250, hidden=8, scale=0.7, seed=5, dtype=torch.float32, p=0.1,
         layout="contiguous", groups=1, index="per_token")
def test_adapter_forward_and_every_gradient_match_the_reference(batch, tokens, dim, hidden, scale, seed, dtype, p,
                                                                layout, groups, index):
    """Odd d (groups 1), N = 1, rows past one weight-gradient block (64), fp32/bf16/fp16, every
    routing mode; with dropout the reference gets the native mask, so the gradients matching
    it shows the backward replays the forward's mask."""
    if groups == 2 and dim % 2:
        dim += 1
    check_adapter_against_the_reference(batch, tokens, dim, hidden, scale, seed, dtype, p, layout, groups, index)


# The mixed panels and the experts' panels; d = 1056: 33 chunks of 16 per group (the odd chunk of
# panel_combine); 1101 tokens: runs and blocks of rows not a multiple of 4 (its one-row path).
@pytest.mark.parametrize("index, dim", [("none", 1024), ("none", 1056), ("per_token", 1056)])
def test_outputs_past_the_streaming_threshold_match_the_reference(index, dim):
    """y and dx of 8 MB or more are written with streaming stores (csrc/vec_rows.h, kStreamBytes),
    the next rows prefetched: 2 x 1101 rows of d >= 1024 fp32 are 9 MB or more."""
    check_adapter_against_the_reference(2, 1101, dim, 8, 0.7, 3, torch.float32, 0.1, "contiguous", 2, index)


def check_adapter_against_the_reference(batch, tokens, dim, hidden, scale, seed, dtype, p, layout, groups, index):
    params, routing_index, dy = adapter_problem(batch, tokens, dim, hidden, dtype, seed, layout, groups, index)
    y, grads = adapter_run(params, routing_index, dy, scale, p, seed)
    mask = native_mask(seed, params, p) if p else None
    y64, grads64 = adapter_tests.reference_run(params, routing_index, dy, scale, mask, torch.float64)
    y_base, grads_base = adapter_tests.reference_run(params, routing_index, dy, scale, mask)
    y_abs, grads_abs = adapter_tests.reference_run({k: v.abs() for k, v in params.items()}, routing_index, dy.abs(),
                                                   scale, mask, torch.float64)
    assert y.dtype == dtype
    assert_close_to_oracle("y", y, y64, y_base, magnitude=y_abs.max().item())
    for name in adapter_tests.PARAM_NAMES:
        assert grads[name].dtype == params[name].dtype, name
        assert_close_to_oracle(f"d {name}", grads[name], grads64[name], grads_base[name],
                               ulps=adapter_tests.ulps(name), magnitude=grads_abs[name].max().item())


def test_adapter_empty_batch():
    params, _, dy = adapter_problem(2, 3, 16, 8, torch.float32, 0)
    params["x"], params["routing"], dy = params["x"][:0], params["routing"][:0], dy[:0]
    y, grads = adapter_run(params, None, dy, 1.0, 0.1, 3)
    assert y.shape == (0, 3, 16)
    for name, grad in grads.items():
        assert grad.shape == params[name].shape and not grad.any(), name


def test_dropout_mask_keeps_the_right_fraction_and_follows_the_seed():
    params, _, _ = adapter_problem(4, 512, 8, 16, torch.float32, 0)
    for p in (0.1, 0.5):
        mask = native_mask(7, params, p)
        assert set(mask.unique().tolist()) <= {0.0, torch.tensor(1.0 / (1.0 - p)).item()}   # fp32
        assert abs((mask == 0).float().mean().item() - p) < 0.02
    assert torch.equal(native_mask(7, params, 0.5), native_mask(7, params, 0.5))
    assert not torch.equal(native_mask(7, params, 0.5), native_mask(8, params, 0.5))
    # The forward's hd is its h times exactly this mask.
    _, hd = native.ops().mm_adapter_fwd(*params.values(), None, 1.0, 0.5, torch.tensor([7]))
    _, h = native.ops().mm_adapter_fwd(*params.values(), None, 1.0, 0.0, None)
    assert torch.equal(hd, h * native_mask(7, params, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", ["arbitrary", "none"])   # the experts' panels; the mixed ones
def test_one_and_two_threads_give_identical_results(dtype, index):
    """Weight gradients sum fixed 64-row blocks in block order, so the thread count changes
    nothing, bit for bit (300 rows: 5 blocks)."""
    params, routing_index, dy = adapter_problem(3, 100, 132, 8, dtype, 1, index=index)
    neck_params, neck_dy = neck_tests.make_problem((300,), 40, 23, 70, "swiglu", dtype, 1)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y, grads = adapter_run(params, routing_index, dy, 0.7, 0.2, 11)
            neck_y, neck_grads = neck_tests.kernel_run(cpu(neck_params), neck_dy.cpu(), "swiglu")
            results.append([y, *grads.values(), neck_y, *neck_grads.values()])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@settings(max_examples=max(30, settings().max_examples))
@given(lead=st.sampled_from([(0,), (1,), (7,), (37,), (3, 6), (2, 5)]), d_in=st.sampled_from([16, 40, 257]),
       hidden=st.sampled_from([7, 16, 23, 128]), d_out=st.sampled_from([16, 33, 130]),
       activation=st.sampled_from(["silu", "swiglu"]), seed=st.integers(0, 2**31 - 2),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "strided", "transposed"]))
def test_neck_forward_and_every_gradient_match_the_reference(lead, d_in, hidden, d_out, activation, seed, dtype,
                                                             layout):
    params, dy = neck_tests.make_problem(lead, d_in, hidden, d_out, activation, dtype, seed, layout)
    params, dy = cpu(params), dy.cpu()
    y, grads = neck_tests.kernel_run(params, dy, activation)
    if lead == (0,):
        assert y.shape == (0, d_out) and all(not g.any() for g in grads.values())
        return
    neck_tests.assert_matches_reference(params, dy, activation, y, grads)


@pytest.mark.parametrize("index", [False, True])
def test_ops_pass_opcheck_on_the_native_kernels(index):
    params, routing_index, dy = adapter_problem(2, 5, 40, 8, torch.float32, 3, index="arbitrary" if index else "none")
    seed = torch.tensor([5])
    leaves = [v.detach().requires_grad_() for v in params.values()]
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_fwd.default, (*leaves, routing_index, 1.3, 0.2, seed))
    _, hd = native.ops().mm_adapter_fwd(*params.values(), routing_index, 1.3, 0.2, seed)
    x, down_weight, _, *up_and_routing = params.values()
    torch.library.opcheck(torch.ops.lavin_fast.mm_adapter_bwd.default,
                          (dy, x, down_weight, *up_and_routing, routing_index, hd, 1.3, 0.2, seed))
    neck_params, _ = neck_tests.make_problem((7,), 16, 16, 33, "swiglu", torch.float32, 3)
    torch.library.opcheck(torch.ops.lavin_fast.visual_neck_fwd.default, (*cpu(neck_params).values(), "swiglu"))


def test_export_sees_one_op_and_auto_picks_native_for_cpu(monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "auto")
    x = torch.randn(2, 7, 32)
    assert select_backend(x) == "native" and select_backend(x.double()) == "torch"
    module = MMAdapter(dim=32, hidden_dim=8, groups=2).eval()
    program = torch.export.export(module, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("lavin_fast.mm_adapter_fwd.default") == 1, targets
    torch.testing.assert_close(program.module()(x), module(x))


def test_forcing_native_where_it_is_not_built_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(native, "_load", lambda: "no C++ compiler ('c++' not found)")
    with pytest.raises(native.NativeUnavailable, match="native CPU kernels are not available: no C"):
        select_backend(torch.randn(2, 3, 8))
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "auto")
    assert select_backend(torch.randn(2, 3, 8)) == "torch"


def test_without_a_compiler_one_line_says_native_is_off_and_the_reference_runs(tmp_path):
    script = ("import torch, lavin_fast\n"
              "m = lavin_fast.MMAdapter(dim=16, hidden_dim=4)\n"
              "print(lavin_fast.select_backend(torch.randn(1, 2, 16)), tuple(m(torch.randn(2, 3, 16)).shape))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), native.CACHE_ENV: str(tmp_path / "cache"),
           "LAVIN_FAST_BACKEND": "auto"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["torch", "(2,", "3,", "16)"]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "native CPU kernels are off (no C++ compiler" in lines[0], run.stderr


def test_a_compiler_without_openmp_builds_the_kernels_single_threaded(tmp_path):
    """OpenMP is what lets at::parallel_for use threads in the extension; where the compiler
    refuses it (a stand-in flag here), one line says so and the kernels still build and run."""
    script = ("import torch, lavin_fast\n"
              "from lavin_fast import native\n"
              "native._OPENMP_FLAGS[:] = ['-fno-such-openmp-flag']\n"
              "m = lavin_fast.MMAdapter(dim=16, hidden_dim=4)\n"
              "print(lavin_fast.select_backend(torch.randn(1, 2, 16)), tuple(m(torch.randn(2, 3, 16)).shape))\n")
    env = {**os.environ, native.CACHE_ENV: str(tmp_path / "cache"), "LAVIN_FAST_BACKEND": "auto"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["native", "(2,", "3,", "16)"]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "built without OpenMP" in lines[0], run.stderr
