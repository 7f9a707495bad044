"""Every backend behind the registered ops: opcheck, gradcheck, torch.compile (fullgraph,
dynamic shapes, fake-kernel checks), autocast, with_stats."""

import pytest
import torch

import margin_ops
from margin_ops import reference

from conformance.cases import DTYPE_IDS, OP_CONFIGS, PRIMITIVE_ARGS, PRIMITIVE_OPTIONS, config_id, primitive_id
from conftest import (REFERENCE_FNS, assert_close, closed_form_logits, compare_to_reference, leaf_copy,
                      make_inputs, make_op_inputs, primitive_options, run_with_grads)

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
CUSTOM_OPS = ("cpu", "cuda-emulated", "triton-interpreted", "cuda", "triton")
#: Backends fast enough for finite differences (2·(N + C)·D evaluations per case).
FAST = ("reference", "cpu", "cuda", "triton")


@pytest.mark.slow
@pytest.mark.backends(*CUSTOM_OPS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("args,options", [(args, {}) for args in PRIMITIVE_ARGS[::2]]
                         + [(PRIMITIVE_ARGS[0], PRIMITIVE_OPTIONS[-1])], ids=lambda v: primitive_id(v) if
                         isinstance(v, tuple) else "-".join(v) or "plain")
def test_opcheck_primitive(args, options, dtype, backend):
    """torch.library.opcheck of the backend's primitive pair (schema, fake kernel, autograd
    registration, aot dispatch) on small odd inputs with an ignored row, and with every
    option at once."""
    forward, backward = backend.primitive
    made = primitive_options(5, 9, device=backend.device, **options)
    x, w, y = make_inputs(5, 6, made.weight_rows, dtype, ignore_rows=(1,), device=backend.device)
    y = torch.where(y < 0, y, y % made.num_classes)
    args = args + made.options
    torch.library.opcheck(forward, (x, w, y) + args)
    lse = forward(x, w, y, *args)[0].detach()
    grads = tuple(torch.randn(5, dtype=lse.dtype, device=x.device) for _ in range(3))
    torch.library.opcheck(backward, grads + (x.detach(), w.detach(), y, lse) + args)


OPCHECK_CASES = [
    ("arcface", dict(s=30.0, m=0.5)), ("arcface", dict(easy_margin=True, margin_grad="detach")),
    ("cosface", dict(reduction="none")), ("combined", dict(m1=0.9, m2=0.3, m3=0.1, reduction="sum")),
    ("sphereface", dict(m=3, lamb=2.0, gamma=1.0)), ("sphereface", dict(s=10.0, ignore_index=-1)),
    ("arcface", dict(subcenters=3, label_smoothing=0.1)),
    ("adaptive", dict(angle_mode="arcface", m_angle=(0.45, 0.8), m_add=(0.0, 0.1), label_smoothing=0.2)),
    ("curricular", dict(t=0.4, reduction="none")),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", OPCHECK_CASES)
def test_opcheck_losses(name, kwargs, backend):
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 5, 6, 9, F32, ignore_rows=(1,),
                                       ignore_index=kwargs.get("ignore_index", -100), device=backend.device)
    torch.library.opcheck(getattr(torch.ops.margin, name).default, (x, w, y), kwargs)


@pytest.mark.slow
@pytest.mark.backends(*FAST)
@pytest.mark.parametrize("config", [c for c in OP_CONFIGS if c[1].get("margin_grad") != "detach"], ids=config_id)
def test_gradcheck_op(config, backend):
    name, kwargs = config
    kwargs = dict(kwargs)
    kwargs["s"] = min(kwargs.get("s", 64.0) or 64.0, 4.0)  # well-conditioned for finite differences
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 4, 5, 7, F64, ignore_rows=(1,), device=backend.device)
    op = getattr(torch.ops.margin, name)
    if name == "adaptive":  # the per-row margins are differentiable too (MagFace's depends on ‖x‖)
        rows = {k: kwargs.pop(k).double().requires_grad_() for k in ("m_angle", "m_add")}
        assert torch.autograd.gradcheck(lambda a, b, m_angle, m_add: op(a, b, y, m_angle, m_add, reduction="none",
                                                                        **kwargs), (x, w, *rows.values()))
    else:
        assert torch.autograd.gradcheck(lambda a, b: op(a, b, y, reduction="none", **kwargs), (x, w))


@pytest.mark.backends(*FAST)
@pytest.mark.parametrize("args", [
    ("arcface", 3.0, 1.0, 0.5, 0.0, 0.0, False, False), ("arcface", 3.0, 1.0, 1.3, 0.0, 0.0, False, False),
    ("arcface_easy", 3.0, 1.0, 0.5, 0.0, 0.0, False, False), ("cosface", 3.0, 1.0, 0.0, 0.35, 0.0, False, False),
    ("combined", 3.0, 1.2, 0.3, 0.1, 0.0, False, False), ("sphereface", 1.0, 4.0, 0.0, 0.0, 2.0, True, False),
    ("sphereface", 2.0, 3.0, 0.0, 0.0, 0.0, False, False)], ids=primitive_id)
@pytest.mark.slow
def test_gradcheck_primitive(args, backend):
    """Both outputs of the primitive with independent upstream gradients, and a label
    outside [0, C) (no target: target_logit 0)."""
    x, w, y = make_inputs(4, 5, 7, F64, ignore_rows=(2,), device=backend.device)
    y[3] = 7

    def fn(a, b):
        lse, target_logit, _, _, nontarget_sum = backend.lse_fn()(a, b, y, *args)
        return lse, target_logit, nontarget_sum

    assert torch.autograd.gradcheck(fn, (x, w))


def _train_step(x, w, y):
    loss = torch.ops.margin.arcface(x, w, y, s=16.0, m=0.4)
    grad_x, grad_w = torch.autograd.grad(loss, [x, w])
    return loss.detach(), grad_x, grad_w


@pytest.mark.slow
def test_compile_fullgraph_training_step(backend):
    """Forward and backward in one fullgraph-compiled function (autograd.grad traced)."""
    torch._dynamo.reset()
    x, w, y = make_inputs(6, 16, 37, F32, device=backend.device)
    eager = _train_step(x, w, y)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_train_step, fullgraph=True)(x, w, y)
    for a, b, what in zip(compiled, eager, ("loss", "grad_x", "grad_w")):
        assert_close(a, b, 1e-5, what)
    compare_to_reference("arcface", x, w, y, backend=backend, s=16.0, m=0.4)  # and eager is right


@pytest.mark.slow
def test_compile_forward_then_backward(backend):
    """The usual training step: a compiled forward graph and its AOT backward graph, reused
    with new inputs; with_stats compiles with fullgraph=True too."""
    torch._dynamo.reset()

    def head(x, w, y):
        loss, _, pred = margin_ops.with_stats(torch.ops.margin.sphereface, x, w, y, m=4, lamb=5.0, reduction="sum")
        return loss + torch.ops.margin.cosface(x, w, y, s=30.0) + 0 * pred.sum()

    compiled = torch.compile(head, fullgraph=True)
    for _ in range(2):
        x, w, y = make_inputs(6, 16, 37, F32, device=backend.device)
        got = run_with_grads(compiled, x, w, y)
        want = run_with_grads(head, x, w, y)
        for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
            assert_close(a, b, 1e-5, what)


@pytest.mark.slow
def test_compile_dynamic_batch(backend):
    """One dynamic-shape graph serves several batch sizes; label checks still fire inside
    the graph (an async assert), and the fake kernels reject bad shapes while tracing."""
    torch._dynamo.reset()

    def head(x, w, y):
        return torch.ops.margin.combined(x, w, y, s=20.0, m1=0.9, m2=0.3, m3=0.1, reduction="sum")

    compiled = torch.compile(head, fullgraph=True, dynamic=True)
    for n in (6, 9, 13):
        x, w, y = make_inputs(n, 16, 37, F32, device=backend.device)
        for a, b, what in zip(run_with_grads(compiled, x, w, y), run_with_grads(head, x, w, y),
                              ("loss", "grad_x", "grad_w")):
            assert_close(a, b, 1e-5, f"N={n} {what}")
    y_bad = y.clone()
    y_bad[0] = 99
    with pytest.raises((RuntimeError, ValueError), match="labels must lie in"):
        compiled(x, w, y_bad)
    with pytest.raises((RuntimeError, ValueError), match=r"weight must be \(C, D\)"):  # the check's message
        compiled(x, w[:, :5], y)
    module = margin_ops.ArcFace(16, 37, s=16.0).to(backend.device)
    assert_close(torch.compile(module, fullgraph=True)(x, y), module(x, y), 1e-5, "compiled ArcFace module")


@pytest.mark.parametrize("name,kwargs", [("arcface", dict(s=32.0)), ("cosface", dict()),
                                         ("combined", dict(m1=0.9, m2=0.3, m3=0.1)),
                                         ("sphereface", dict(m=4, lamb=3.0))])
@pytest.mark.slow
def test_autocast_bf16(name, kwargs, backend):
    """Under autocast the op casts x and weight to bfloat16 like F.linear, returns a
    float32 loss, and float32 gradients reach the float32 leaves: the same numbers as the
    op called on bfloat16-cast inputs."""
    x, w, y = make_inputs(6, 16, 21, F32, device=backend.device)
    op = getattr(torch.ops.margin, name)
    x1, w1 = leaf_copy(x), leaf_copy(w)
    with torch.autocast(torch.device(backend.device).type, dtype=BF16):
        loss = op(x1, w1, y, **kwargs)
    assert loss.dtype == F32
    loss.backward()
    assert x1.grad.dtype == F32 and w1.grad.dtype == F32
    x2, w2 = leaf_copy(x), leaf_copy(w)
    manual = op(x2.to(BF16), w2.to(BF16), y, **kwargs)
    manual.backward()
    assert_close(loss, manual, 1e-6, "autocast loss")
    assert_close(x1.grad, x2.grad, 1e-6, "autocast grad_x")
    assert_close(w1.grad, w2.grad, 1e-6, "autocast grad_weight")


@pytest.mark.slow
def test_autocast_leaves_float64_alone(backend):
    x, w, y = make_inputs(4, 8, 9, F64, device=backend.device)
    with torch.autocast(torch.device(backend.device).type, dtype=BF16):
        loss = torch.ops.margin.arcface(x, w, y)
    assert loss.dtype == F64
    assert_close(loss, reference.arcface(x, w, y), 1e-10, "float64 under autocast")


@pytest.mark.parametrize("name,kwargs", [("arcface", dict(s=30.0)), ("cosface", dict(m=0.2)),
                                         ("combined", dict(m1=0.9, m2=0.2, m3=0.1)),
                                         ("sphereface", dict(m=3, lamb=1.0))])
def test_with_stats(name, kwargs, backend):
    """(loss, lse, pred) from one pass: the loss the op returns, lse of the explicit
    logits, pred the argmax of the exact cosines; by op object or by name."""
    x, w, y = make_inputs(7, 11, 23, F32, ignore_rows=(2,), device=backend.device)
    out = margin_ops.with_stats(getattr(torch.ops.margin, name), x, w, y, reduction="none", **kwargs)
    by_name = margin_ops.with_stats(name, x, w, y, reduction="none", **kwargs)
    loss = getattr(torch.ops.margin, name)(x, w, y, reduction="none", **kwargs)
    assert isinstance(out, margin_ops.MarginOutput)
    assert torch.equal(out.loss, loss) and torch.equal(by_name.loss, loss)
    assert_close(out.loss, REFERENCE_FNS[name](x.double(), w.double(), y, reduction="none", **kwargs), 1e-4, "loss")
    x64, w64 = x.detach().double(), w.detach().double()
    if name == "cosface":  # lse of explicitly built logits (margin on the target only)
        assert_close(out.lse, closed_form_logits(name, x64, w64, y, s=30.0 if "s" in kwargs else 64.0,
                                                 m=kwargs["m"]).logsumexp(1), 1e-5, "lse")
    assert out.lse.shape == (7,) and out.lse.dtype == F32
    cos = torch.nn.functional.normalize(x64) @ torch.nn.functional.normalize(w64).t()
    assert out.pred.dtype == torch.int64 and torch.equal(out.pred, cos.argmax(1))


@pytest.mark.slow
def test_compile_fullgraph_v2_ops(backend):
    """adaptive (gradients to its per-row margins too), curricular and the sub-center,
    label-smoothed ArcFace in one fullgraph-compiled head, with with_stats."""
    torch._dynamo.reset()
    n, d, c = 6, 16, 37
    m_angle = torch.linspace(0.45, 0.8, n, device=backend.device, requires_grad=True)
    t = torch.tensor(0.3, device=backend.device)

    def head(x, w, y):
        out = margin_ops.with_stats("adaptive", x, w, y, m_angle, 0.1 * m_angle, angle_mode="arcface")
        return (out.loss + torch.ops.margin.curricular(x, w, y, t, s=32.0, label_smoothing=0.1)
                + torch.ops.margin.arcface(x, w.repeat(2, 1), y, subcenters=2, label_smoothing=0.2)
                + 0 * out.pred.sum())

    compiled = torch.compile(head, fullgraph=True)
    x, w, y = make_inputs(n, d, c, F32, device=backend.device)
    got = run_with_grads(compiled, x, w, y)
    want = run_with_grads(head, x, w, y)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
        assert_close(a, b, 1e-5, what)
    got_m = torch.autograd.grad(compiled(x, w, y), [m_angle])[0]
    want_m = torch.autograd.grad(head(x, w, y), [m_angle])[0]
    assert_close(got_m, want_m, 1e-5, "grad m_angle")


@pytest.mark.parametrize("name,kwargs", [("adaptive", dict(m_angle=(-0.3, 0.4), m_add=(0.0, 0.6))),
                                         ("curricular", dict(t=0.5)),
                                         ("arcface", dict(subcenters=3, label_smoothing=0.1))])
def test_with_stats_v2(name, kwargs, backend):
    """with_stats of the v2 ops: the op's loss, lse of the explicitly built logits (the
    reference's), and pred a class id in [0, C) (sub-centers: the class of the best one)."""
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 7, 11, 23, F32, ignore_rows=(2,), device=backend.device)
    out = margin_ops.with_stats(name, x, w, y, reduction="none", **kwargs)
    assert torch.equal(out.loss, getattr(torch.ops.margin, name)(x, w, y, reduction="none", **kwargs))
    cos = reference.class_cosines(x.detach().double(), w.detach().double(), kwargs.get("subcenters", 1))
    assert out.pred.dtype == torch.int64 and torch.equal(out.pred, cos.argmax(1))
    x64, w64 = x.detach().double(), w.detach().double()
    if name == "arcface":
        want = reference.margin_lse(x64, w64, y, "arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False, None, 3)[0]
    else:
        want = getattr(reference, f"{name}_logits")(x64, w64, y, **kwargs).logsumexp(dim=1)
    assert_close(out.lse[y != -100], want[y != -100], 1e-5, "lse")
