"""torch.ops.margin.* (C++ CPU kernel) against the float64 reference; op registration
(opcheck, gradcheck, torch.compile, autocast) and the backend switch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import margin_ops
from margin_ops import backends, reference

from conftest import (DTYPES, OP_CONFIGS, REFERENCE_FNS, SHAPE_CONFIGS, assert_close, call_op,
                      closed_form_logits, compare_to_reference, config_id, leaf_copy, make_inputs,
                      opcheck_primitive, place_targets, run_with_grads)

F32, F64 = torch.float32, torch.float64
LOSSES = ("arcface", "cosface", "combined", "sphereface")
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


# ---------------------------------------------------------------------------------------
# Values and gradients against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_op_matches_reference(config, reduction, dtype):
    name, kwargs = config
    x, w, y = make_inputs(8, 16, 29, dtype, ignore_rows=(3,))
    compare_to_reference(name, x, w, y, reduction=reduction, **kwargs)


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ignore_index", [-1, 7, 10**6])
@pytest.mark.parametrize("name", LOSSES)
def test_op_ignore_index(name, ignore_index, dtype):
    """Custom ignore_index values: negative, inside [0, C) (the row keeps its target in the
    primitive but contributes nothing), and beyond C."""
    x, w, y = make_inputs(9, 10, 12, dtype, ignore_rows=(0, 5), ignore_index=ignore_index)
    for reduction in ("mean", "sum", "none"):
        got = compare_to_reference(name, x, w, y, ignore_index=ignore_index, reduction=reduction)
        if reduction == "none":
            assert (got.loss[y == ignore_index] == 0).all()


# (N, D, C): one row, one class, one feature, odd sizes, several class blocks of the CPU
# kernel (block = clamp(2^18 / D, 64, 4096) rows of W: 512 for D = 512, 64 for D = 4096).
ODD_SHAPES = [(1, 16, 29), (8, 16, 1), (8, 1, 29), (1, 1, 1), (5, 13, 1009), (3, 7, 513),
              (4, 512, 3000), (3, 4096, 130)]


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", SHAPE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}-D{}-C{}".format(*s))
def test_op_odd_shapes(shape, config, dtype):
    n, d, c = shape
    name, kwargs = config
    x, w, y = make_inputs(n, d, c, dtype)
    if c >= 3:  # put targets on both sides of class-block boundaries and at the ends
        place_targets(y, c, [0, c - 1, 511, 512, 513, 63, 64, 1008])
    # D = 1: every cosine is ±1 and the gradients are sums that cancel to (nearly) 0.
    compare_to_reference(name, x, w, y, reduction="sum", cancellation=d == 1, **kwargs)


def test_non_contiguous_inputs():
    """The classic layout keeps W as (D, C): passing W.t() gives a non-contiguous weight."""
    w_classic = torch.randn(16, 1100)
    x = torch.randn(16, 12).t()  # (12, 16) non-contiguous
    y = torch.randint(0, 1100, (24,))[::2]
    assert not (x.is_contiguous() or w_classic.t().is_contiguous() or y.is_contiguous())
    for name, kwargs in (("arcface", {}), ("sphereface", dict(m=3, lamb=1.0))):
        compare_to_reference(name, leaf_copy(x), leaf_copy(w_classic).t(), y, **kwargs)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result(threads):
    """Per-thread accumulators in the backward pass: any thread count gives the reference."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, w, y = make_inputs(4, 64, 9000, F32)  # 3 class blocks (4096 rows each)
        compare_to_reference("arcface", x, w, y)
        compare_to_reference("sphereface", x, w, y, m=2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("output", [0, 1], ids=["lse", "target_logit"])
def test_gradient_of_one_primitive_output(output):
    """Backward with only one of lse / target_logit used (the other gradient is None)."""
    x, w, y = make_inputs(6, 8, 300, F64, ignore_rows=(4,))
    args = ("sphereface", 1.0, 3.0, 0.0, 0.0, 2.0, True, False)
    got = torch.autograd.grad(torch.ops.margin.margin_lse(x, w, y, *args)[output].sum(), [x, w])
    want = torch.autograd.grad(reference.margin_lse(x, w, y, *args)[output].sum(), [x, w])
    for a, b, what in zip(got, want, ("grad_x", "grad_weight")):
        assert_close(a, b, 1e-10, what)


def test_primitive_statistics_match_reference():
    x, w, y = make_inputs(9, 24, 1300, F32, ignore_rows=(0,))
    args = ("combined", 30.0, 0.9, 0.3, 0.1, 0.0, False, False)
    got = torch.ops.margin.margin_lse(x, w, y, *args)
    want = reference.margin_lse(x.double(), w.double(), y, *args)
    for a, b, what in zip(got[:3], want[:3], ("lse", "target_logit", "max_cos")):
        assert_close(a, b, 1e-5, what)
    assert torch.equal(got[3], want[3])


def test_pred_ties_pick_the_lowest_class():
    """Identical weight rows in different class blocks (512 rows each for D = 512)."""
    w = torch.randn(1500, 512)
    w[600] = w[5]
    w[1100] = w[5]
    x = 2 * w[[5, 5]] + 0.01 * torch.randn(2, 512)
    y = torch.tensor([7, 1200])
    with margin_ops.backend("cpu"):
        out = margin_ops.with_stats("arcface", x, w, y)
    assert out.pred.tolist() == [5, 5]


def test_max_cos_is_a_clamped_cosine():
    t = torch.tensor([[1.656269907951355, 1.0606399774551392, 0.7503016591072083]])
    y = torch.tensor([0])
    args = ("cosface", 1.0, 1.0, 0.0, 0.0, 0.0, False, False)
    max_cos = torch.ops.margin.margin_lse(t, t, y, *args)[2]
    assert max_cos.item() <= 1.0
    assert torch.equal(max_cos, reference.margin_lse(t, t, y, *args)[2])


def test_default_backend_on_cpu_is_the_cpu_kernel():
    assert margin_ops.current_backend("cpu") == "cpu"
    assert backends.available_backends()["cpu"] is None
    assert backends.available_backends()["reference"] is None


class _LogOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", LOSSES)
def test_backend_switch_routes_to_cpu_kernel_or_reference(name):
    x, w, y = make_inputs(6, 9, 11, F32)
    with _LogOps() as log:
        loss_cpu = call_op(name, x, w, y, backend="cpu")
    assert "margin.margin_lse.default" in log.calls
    with _LogOps() as log:
        loss_ref = call_op(name, x, w, y, backend="reference")
    assert not any(c.startswith("margin.") for c in log.calls), log.calls
    # The reference backend computes exactly what margin_ops.reference computes.
    assert torch.equal(loss_ref, REFERENCE_FNS[name](x, w, y))
    assert_close(loss_cpu, loss_ref, 1e-4, "cpu vs reference backend")
    # ...including gradients
    compare_to_reference(name, x, w, y, backend="reference")


@pytest.mark.parametrize("name,kwargs", [("arcface", dict(s=30.0)), ("cosface", dict(m=0.2)),
                                         ("combined", dict(m1=0.9, m2=0.2, m3=0.1)),
                                         ("sphereface", dict(m=3, lamb=1.0))])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_with_stats(name, kwargs, backend):
    x, w, y = make_inputs(7, 11, 23, F32, ignore_rows=(2,))
    with margin_ops.backend(backend):
        out = margin_ops.with_stats(getattr(torch.ops.margin, name), x, w, y, reduction="none", **kwargs)
        by_name = margin_ops.with_stats(name, x, w, y, reduction="none", **kwargs)
        loss = call_op(name, x, w, y, backend=backend, reduction="none", **kwargs)
    assert isinstance(out, margin_ops.MarginOutput)
    assert torch.equal(out.loss, loss) and torch.equal(by_name.loss, loss)
    x64, w64 = x.detach().double(), w.detach().double()
    # lse = logsumexp of the reference logits (margin on the target; none on the ignored row,
    # whose label is outside [0, C))
    lse_ref, _, _, _ = reference.margin_lse(x64, w64, y, *_spec(name, kwargs).primitive_args())
    assert out.lse.shape == (7,) and out.lse.dtype == F32
    assert_close(out.lse, lse_ref, 1e-5, "lse")
    closed = closed_form_logits("cosface", x64, w64, y, s=kwargs.get("s", 64.0), m=kwargs["m"]) \
        if name == "cosface" else None
    if closed is not None:
        assert_close(out.lse, closed.logsumexp(1), 1e-5, "lse vs explicit logits")
    cos = torch.nn.functional.normalize(x64) @ torch.nn.functional.normalize(w64).t()
    assert out.pred.dtype == torch.int64
    assert torch.equal(out.pred, cos.argmax(1))


def _spec(name, kwargs):
    schema = getattr(torch.ops.margin, name).default._schema
    a = {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}
    a.update(kwargs)
    return margin_ops.ops._SPEC_BUILDERS[name](a)


# ---------------------------------------------------------------------------------------
# Autograd: gradcheck of the C++ kernel, and of the primitive with independent upstream
# gradients for lse and target_logit.


@pytest.mark.parametrize("config", [c for c in OP_CONFIGS if c[1].get("margin_grad") != "detach"], ids=config_id)
def test_gradcheck_op(config):
    name, kwargs = config
    kwargs = dict(kwargs)
    if kwargs.get("s") is not None:
        kwargs["s"] = min(kwargs["s"], 4.0)  # well-conditioned for finite differences
    x, w, y = make_inputs(4, 5, 7, F64, ignore_rows=(1,))
    op = getattr(torch.ops.margin, name)
    with margin_ops.backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: op(a, b, y, reduction="none", **kwargs), (x, w))


@pytest.mark.parametrize("margin,args", [
    ("arcface", (3.0, 1.0, 0.5, 0.0, 0.0, False)), ("arcface", (3.0, 1.0, 1.3, 0.0, 0.0, False)),
    ("arcface_easy", (3.0, 1.0, 0.5, 0.0, 0.0, False)), ("cosface", (3.0, 1.0, 0.0, 0.35, 0.0, False)),
    ("combined", (3.0, 1.2, 0.3, 0.1, 0.0, False)), ("sphereface", (1.0, 4.0, 0.0, 0.0, 2.0, True)),
    ("sphereface", (2.0, 3.0, 0.0, 0.0, 0.0, False)),
])
def test_gradcheck_margin_lse(margin, args):
    x, w, y = make_inputs(4, 5, 7, F64, ignore_rows=(2,))
    y[3] = 7  # a label outside [0, C): no target, target_logit 0

    def fn(a, b):
        lse, target_logit, _, _ = torch.ops.margin.margin_lse(a, b, y, margin, *args, False)
        return lse, target_logit

    assert torch.autograd.gradcheck(fn, (x, w))


def test_margin_lse_detach_gradient_is_straight_through():
    """detach_margin_grad=True: gradient of target_logit = s·(c + const) (dφ/dc = 1)."""
    x, w, y = make_inputs(5, 6, 8, F64)
    args = ("arcface", 10.0, 1.0, 0.5, 0.0, 0.0, False)
    g_lse, g_t = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    got = torch.autograd.grad(_weighted(torch.ops.margin.margin_lse(x, w, y, *args, True), g_lse, g_t), [x, w])
    want = torch.autograd.grad(_weighted(reference.margin_lse(x, w, y, *args, True), g_lse, g_t), [x, w])
    exact = torch.autograd.grad(_weighted(torch.ops.margin.margin_lse(x, w, y, *args, False), g_lse, g_t), [x, w])
    for a, b in zip(got, want):
        assert_close(a, b, 1e-10, "detach grads vs reference")
    assert not torch.allclose(got[0], exact[0], rtol=1e-3)


def _weighted(out, g_lse, g_t):
    return (out[0] * g_lse).sum() + (out[1] * g_t).sum()


# ---------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, autocast


OPCHECK_CASES = [
    ("arcface", dict(s=30.0, m=0.5)), ("arcface", dict(easy_margin=True, margin_grad="detach")),
    ("cosface", dict(reduction="none")), ("combined", dict(m1=0.9, m2=0.3, m3=0.1, reduction="sum")),
    ("sphereface", dict(m=3, lamb=2.0, gamma=1.0)), ("sphereface", dict(s=10.0, ignore_index=-1)),
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name,kwargs", OPCHECK_CASES)
def test_opcheck_losses(name, kwargs, dtype):
    x, w, y = make_inputs(5, 6, 9, dtype, ignore_rows=(1,), ignore_index=kwargs.get("ignore_index", -100))
    with margin_ops.backend("cpu"):
        torch.library.opcheck(getattr(torch.ops.margin, name).default, (x, w, y), kwargs)


PRIMITIVE_ARGS = [
    ("arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False),
    ("arcface_easy", 30.0, 1.0, 0.5, 0.0, 0.0, False, True),
    ("cosface", 64.0, 1.0, 0.0, 0.35, 0.0, False, False),
    ("combined", 32.0, 0.9, 0.3, 0.1, 0.0, False, False),
    ("sphereface", 1.0, 4.0, 0.0, 0.0, 5.0, True, False),
]


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("args", PRIMITIVE_ARGS, ids=lambda a: a[0])
def test_opcheck_primitive(args, dtype):
    opcheck_primitive(torch.ops.margin.margin_lse.default, torch.ops.margin.margin_lse_backward.default,
                      args, dtype)


def _train_step(x, w, y):
    loss = torch.ops.margin.arcface(x, w, y, s=16.0, m=0.4)
    grad_x, grad_w = torch.autograd.grad(loss, [x, w])
    return loss.detach(), grad_x, grad_w


def test_compile_fullgraph_training_step_with_autograd_grad():
    torch._dynamo.reset()
    x, w, y = make_inputs(6, 16, 37, F32)
    with margin_ops.backend("cpu"):
        eager = _train_step(x, w, y)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled = torch.compile(_train_step, fullgraph=True)(x, w, y)
    for a, b, what in zip(compiled, eager, ("loss", "grad_x", "grad_w")):
        assert_close(a, b, 1e-5, what)
    compare_to_reference("arcface", x, w, y, s=16.0, m=0.4)  # and eager is right


def test_compile_fullgraph_forward_then_backward():
    """The usual training step: a compiled model (forward graph + AOT backward graph)."""
    torch._dynamo.reset()
    x, w, y = make_inputs(6, 16, 37, F32)

    def head(x, w, y):
        return torch.ops.margin.sphereface(x, w, y, m=4, lamb=5.0, reduction="sum") + \
            torch.ops.margin.cosface(x, w, y, s=30.0)

    compiled = torch.compile(head, fullgraph=True)
    for _ in range(2):  # second call reuses the compiled graph with new inputs
        x, w, y = make_inputs(6, 16, 37, F32)
        with margin_ops.backend("cpu"):
            got = run_with_grads(compiled, x, w, y)
            want = run_with_grads(head, x, w, y)
        for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
            assert_close(a, b, 1e-5, what)


def test_compile_dynamic_batch_and_module():
    """One dynamic-shape graph serves several batch sizes; a module head compiles too; label
    checks still fire inside the graph (as an async assert)."""
    torch._dynamo.reset()

    def head(x, w, y):
        return torch.ops.margin.combined(x, w, y, s=20.0, m1=0.9, m2=0.3, m3=0.1, reduction="sum")

    with margin_ops.backend("cpu"):
        compiled = torch.compile(head, fullgraph=True, dynamic=True)
        for n in (6, 9, 13):
            x, w, y = make_inputs(n, 16, 37, F32)
            for a, b, what in zip(run_with_grads(compiled, x, w, y), run_with_grads(head, x, w, y),
                                  ("loss", "grad_x", "grad_w")):
                assert_close(a, b, 1e-5, f"N={n} {what}")
        y_bad = y.clone()
        y_bad[0] = 99
        with pytest.raises((RuntimeError, ValueError), match="labels must lie in"):
            compiled(x, w, y_bad)

        module = margin_ops.ArcFace(16, 37, s=16.0)
        compiled_module = torch.compile(module, fullgraph=True)
        assert_close(compiled_module(x, y), module(x, y), 1e-5, "compiled ArcFace module")


@pytest.mark.parametrize("name,kwargs", [("arcface", dict(s=32.0)), ("cosface", dict()),
                                         ("combined", dict(m1=0.9, m2=0.3, m3=0.1)),
                                         ("sphereface", dict(m=4, lamb=3.0))])
def test_autocast_bf16(name, kwargs):
    x, w, y = make_inputs(6, 16, 21, F32)
    op = getattr(torch.ops.margin, name)
    x1, w1 = leaf_copy(x), leaf_copy(w)
    with margin_ops.backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = op(x1, w1, y, **kwargs)
    assert loss.dtype == F32
    loss.backward()
    assert x1.grad.dtype == F32 and w1.grad.dtype == F32

    # the same as calling the op on bf16-cast inputs (like F.linear under autocast)
    x2, w2 = leaf_copy(x), leaf_copy(w)
    with margin_ops.backend("cpu"):
        manual = op(x2.to(torch.bfloat16), w2.to(torch.bfloat16), y, **kwargs)
    manual.backward()
    assert_close(loss, manual, 1e-6, "autocast loss")
    assert_close(x1.grad, x2.grad, 1e-6, "autocast grad_x")
    assert_close(w1.grad, w2.grad, 1e-6, "autocast grad_weight")
    # and it really computed in bf16: not the float32 result
    compare_to_reference(name, x.to(torch.bfloat16), w.to(torch.bfloat16), y, **kwargs)


def test_autocast_leaves_float64_alone():
    x, w, y = make_inputs(4, 8, 9, F64)
    with margin_ops.backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.ops.margin.arcface(x, w, y)
    assert loss.dtype == F64
    assert_close(loss, reference.arcface(x, w, y), 1e-10, "float64 under autocast")


# ---------------------------------------------------------------------------------------
# Backend selection


def test_env_var_selects_backend(monkeypatch):
    x, w, y = make_inputs(4, 8, 9, F32)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert margin_ops.current_backend("cpu") == "reference"
    with _LogOps() as log:
        loss = torch.ops.margin.cosface(x, w, y)
    assert "margin.margin_lse.default" not in log.calls
    assert torch.equal(loss, reference.cosface(x, w, y))
    # the context manager overrides the environment
    with margin_ops.backend("cpu"), _LogOps() as log:
        torch.ops.margin.cosface(x, w, y)
    assert "margin.margin_lse.default" in log.calls
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with _LogOps() as log:
        torch.ops.margin.cosface(x, w, y)
    assert "margin.margin_lse.default" in log.calls


def test_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with margin_ops.backend("nope"):
            pass
    x, w, y = make_inputs(4, 8, 9, F32)
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        torch.ops.margin.arcface(x, w, y)


def test_cuda_backend_on_cpu_tensors_raises():
    """'not available' without CUDA kernels, 'cannot run on cpu tensors' with them."""
    x, w, y = make_inputs(4, 8, 9, F32)
    with pytest.raises(RuntimeError, match="backend 'cuda' (is not available|cannot run on cpu tensors)"):
        call_op("arcface", x, w, y, backend="cuda")


def test_backend_that_cannot_run_on_the_device_raises(monkeypatch):
    """A usable backend for the wrong device type is an error, never a silent fallback."""
    fake = backends.Backend(reference.margin_lse, lambda: ("cuda",), lambda: None)
    monkeypatch.setitem(backends._registry, "cuda", fake)
    x, w, y = make_inputs(4, 8, 9, F32)
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        call_op("arcface", x, w, y, backend="cuda")


def test_python_m_margin_ops_lists_backends():
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    run = subprocess.run([sys.executable, "-m", "margin_ops"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    for name in backends.BACKENDS:
        assert name in run.stdout
    assert "default for cpu: cpu" in run.stdout
    assert margin_ops.__version__ in run.stdout


def test_tf32_follows_both_precision_apis():
    """float32 may be TF32 when either torch.set_float32_matmul_precision or the newer
    torch.backends...fp32_precision says so (legacy getters raise once only the new API
    was used). In a child process: these settings are global."""
    script = """
import json
import torch
from margin_ops.backends import tf32_allowed
seen = [tf32_allowed()]
torch.set_float32_matmul_precision("high"); seen.append(tf32_allowed())
torch.set_float32_matmul_precision("highest"); seen.append(tf32_allowed())
if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
    torch.backends.cuda.matmul.fp32_precision = "tf32"; seen.append(tf32_allowed())
    torch.backends.cuda.matmul.fp32_precision = "ieee"; seen.append(tf32_allowed())
print(json.dumps(seen))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == [False, True, False, True, False][:len(seen)] and len(seen) >= 3, seen
