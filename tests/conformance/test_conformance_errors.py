"""Bad arguments raise a clear error that names the argument, the same on every backend:
the checks live in front of the backends (margin_ops.checks, margin_ops.spec)."""

import math

import pytest
import torch

import margin_ops

from conformance.cases import PRIMITIVE_ARGS
from conftest import make_inputs

LOSSES = margin_ops.ops.LOSSES
PRIMITIVE = PRIMITIVE_ARGS[0]


class _Op:
    """torch.ops.margin.<name> with its required per-row / 0-d tensors filled in (zero
    margins for adaptive, t = 0 for curricular), sized from x."""

    def __init__(self, name):
        self.name = name

    def extra(self, x):
        n = x.shape[0] if x.dim() >= 1 else 0
        if self.name == "adaptive":
            return (torch.zeros(n, device=x.device), torch.zeros(n, device=x.device))
        if self.name == "curricular":
            return (torch.tensor(0.0, device=x.device),)
        return ()

    def __call__(self, x, w, y, **kwargs):
        return getattr(torch.ops.margin, self.name)(x, w, y, *self.extra(x), **kwargs)


_op = _Op


@pytest.fixture
def inputs(backend):
    return make_inputs(4, 6, 9, torch.float32, device=backend.device)


@pytest.mark.parametrize("name", LOSSES)
def test_tensor_arguments(name, inputs):
    x, w, y = inputs
    cases = [
        (ValueError, r"x must be a 2-D tensor", (x.reshape(4, 2, 3), w, y)),
        (ValueError, r"x must be a 2-D tensor", (x[0], w, y)),
        (ValueError, r"weight must be \(C, D\) with D = x.shape\[1\] = 6", (x, w[:, :5], y)),
        (ValueError, r"weight must be .*W.t\(\)", (x, w.t(), y)),  # the classic (D, C) layout
        (ValueError, r"weight must have at least one class", (x, w[:0], y)),
        (TypeError, r"weight must have x's dtype torch.float32, got torch.float64", (x, w.double(), y)),
        (TypeError, r"x must be floating point", (x.detach().long(), w, y)),
        (ValueError, r"labels must be \(N,\) with N = x.shape\[0\] = 4", (x, w, y[:3])),
        (ValueError, r"labels must be \(N,\)", (x, w, y.unsqueeze(1))),
        (TypeError, r"labels must be int64, got torch.int32", (x, w, y.int())),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            _op(name)(*args)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [9, -1, -101])
def test_labels_out_of_range(name, bad, inputs):
    x, w, y = inputs
    y = y.clone()
    y[2] = bad
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 9\) or equal ignore_index=-100; got {bad}"):
        _op(name)(x, w, y)
    assert torch.isfinite(_op(name)(x, w, y, ignore_index=bad))  # the same value as ignore_index is fine


SCALAR_CASES = [
    # (op, kwargs, expected message)
    ("arcface", dict(s=math.nan), r"s must be a finite number, got nan"),
    ("arcface", dict(s=math.inf), r"s must be a finite number, got inf"),
    ("arcface", dict(s=0.0), r"s must be > 0, got 0.0"),
    ("arcface", dict(s=-3.0), r"s must be > 0"),
    ("arcface", dict(m=math.nan), r"m must be a finite number"),
    ("arcface", dict(m=-math.inf), r"m must be a finite number"),
    ("arcface", dict(m=-2.0), r"m must lie in \[0, π\)"),  # cos(θ + m) would not be a margin
    ("arcface", dict(m=4.0), r"m must lie in \[0, π\)"),
    ("arcface", dict(m=math.pi, easy_margin=True), r"m must lie in \[0, π\)"),
    ("cosface", dict(s=-1.0), r"s must be > 0"),
    ("cosface", dict(s=math.inf), r"s must be a finite number"),
    ("cosface", dict(m=math.nan), r"m must be a finite number"),
    ("combined", dict(s=0.0), r"s must be > 0"),
    ("combined", dict(m1=math.nan), r"m1 must be a finite number"),
    ("combined", dict(m1=0.0), r"m1 must be > 0"),
    ("combined", dict(m2=math.inf), r"m2 must be a finite number"),
    ("combined", dict(m2=-0.5), r"m2 must lie in \[0, π\)"),
    ("combined", dict(m2=4.0), r"m2 must lie in \[0, π\)"),
    ("combined", dict(m3=-math.inf), r"m3 must be a finite number"),
    ("sphereface", dict(s=0.0), r"s must be > 0"),
    ("sphereface", dict(s=math.nan), r"s must be a finite number"),
    ("sphereface", dict(m=0), r"m must be an integer >= 1, got 0"),
    ("sphereface", dict(m=-2), r"m must be an integer >= 1"),
    ("sphereface", dict(m=True), r"m must be an integer >= 1, got True"),  # not m = 1
    ("sphereface", dict(m=2.5), r"m must be an integer >= 1, got 2.5"),
    ("sphereface", dict(m=4.0), r"m must be an integer >= 1, got 4.0"),
    ("sphereface", dict(lamb=-1.0), r"lamb must be >= 0"),
    ("sphereface", dict(lamb=math.nan), r"lamb must be a finite number"),
    ("sphereface", dict(gamma=-0.5), r"gamma must be >= 0"),
    ("sphereface", dict(gamma=math.inf), r"gamma must be a finite number"),
    ("arcface", dict(label_smoothing=-0.1), r"label_smoothing must lie in \[0, 1\], got -0.1"),
    ("sphereface", dict(label_smoothing=1.5), r"label_smoothing must lie in \[0, 1\]"),
    ("adaptive", dict(label_smoothing=math.nan), r"label_smoothing must be a finite number"),
    ("arcface", dict(subcenters=0), r"subcenters must be an integer >= 1, got 0"),
    ("cosface", dict(subcenters=2), r"weight must have num_classes·subcenters rows: 9 rows is not a multiple of "
                                    r"subcenters=2"),
    ("adaptive", dict(s=0.0), r"s must be > 0"),
    ("adaptive", dict(angle_mode="arc"), r"angle_mode must be one of 'clip', 'arcface', 'plain', got 'arc'"),
    ("curricular", dict(m=-0.1), r"m must lie in \[0, π\)"),
    ("curricular", dict(s=math.inf), r"s must be a finite number"),
]


def test_per_row_margins_and_t(inputs):
    """adaptive's m_angle / m_add are (N,) floating tensors on x's device; curricular's t a
    0-d floating tensor on x's device, never differentiated (one that requires grad is
    taken as its value)."""
    x, w, y = inputs
    zeros = torch.zeros(4, device=x.device)
    elsewhere = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match=r"m_angle must be on x's device"):
        torch.ops.margin.adaptive(x, w, y, elsewhere, zeros)
    with pytest.raises(ValueError, match=r"m_add must be on x's device"):
        torch.ops.margin.adaptive(x, w, y, zeros, elsewhere)
    with pytest.raises(ValueError, match=r"t must be on x's device"):
        torch.ops.margin.curricular(x, w, y, elsewhere[0])
    t = torch.tensor(0.3, device=x.device, requires_grad=True)
    loss = torch.ops.margin.curricular(x, w, y, t)
    assert torch.equal(loss, torch.ops.margin.curricular(x, w, y, t.detach()))
    assert torch.autograd.grad(loss, [x, t], allow_unused=True)[1] is None, "t must not be differentiated"
    with pytest.raises(ValueError, match=r"m_angle must be \(N,\) with N = x.shape\[0\] = 4"):
        torch.ops.margin.adaptive(x, w, y, zeros[:3], zeros)
    with pytest.raises(TypeError, match=r"m_add must be floating point"):
        torch.ops.margin.adaptive(x, w, y, zeros, zeros.long())
    with pytest.raises(TypeError, match=r"m_angle must not be float64 when x is torch.float32"):
        torch.ops.margin.adaptive(x, w, y, zeros.double(), zeros)
    with pytest.raises(ValueError, match=r"t must be a 0-d \(or one-element\) floating tensor"):
        torch.ops.margin.curricular(x, w, y, zeros)
    with pytest.raises(ValueError, match=r"t must be a 0-d \(or one-element\) floating tensor"):
        torch.ops.margin.curricular(x, w, y, torch.tensor(1))


@pytest.mark.parametrize("name,kwargs,message", SCALAR_CASES)
def test_bad_scalars(name, kwargs, message, inputs):
    x, w, y = inputs
    with pytest.raises(ValueError, match=message):
        _op(name)(x, w, y, **kwargs)
    with pytest.raises(ValueError, match=message):
        margin_ops.with_stats(name, x, w, y, *_op(name).extra(x), **kwargs)


@pytest.mark.parametrize("name", LOSSES)
def test_unknown_reduction(name, inputs):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        _op(name)(x, w, y, reduction="avg")


@pytest.mark.parametrize("name", ["arcface", "combined"])
def test_unknown_margin_grad(name, inputs):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"margin_grad must be one of 'exact', 'detach', got 'stop'"):
        _op(name)(x, w, y, margin_grad="stop")


def test_with_stats_rejects_other_ops(inputs):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"op must be one of"):
        margin_ops.with_stats(torch.ops.aten.mm, x, w, y)
    with pytest.raises(TypeError, match=r"unexpected keyword"):
        margin_ops.with_stats("arcface", x, w, y, scale=3.0)


#: (primitive margin arguments, expected message): what the primitive itself rejects.
PRIMITIVE_CASES = [
    (("arc",) + PRIMITIVE[1:], r"margin must be one of .*got 'arc'"),
    (("arcface", math.nan) + PRIMITIVE[2:], r"s must be a finite number, got nan"),
    (("arcface", 0.0) + PRIMITIVE[2:], r"s must be > 0, got 0.0"),
    (("arcface", -1.0) + PRIMITIVE[2:], r"s must be > 0"),
    (("arcface", 64.0, 1.0, 4.0, 0.0, 0.0, False, False), r"m2 must lie in \[0, π\)"),
    (("arcface_easy", 64.0, 1.0, -2.0, 0.0, 0.0, False, False), r"m2 must lie in \[0, π\)"),
    (("combined", 64.0, 0.0, 0.5, 0.0, 0.0, False, False), r"m1 must be > 0 for margin='combined'"),
    (("cosface", 64.0, 1.0, 0.0, math.inf, 0.0, False, False), r"m3 must be a finite number"),
    (("sphereface", 1.0, 2.5, 0.0, 0.0, 0.0, True, False), r"m1 must be an integer >= 1 for margin='sphereface'"),
    (("sphereface", 1.0, 2.0, 0.0, 0.0, -1.0, True, False), r"lamb must be >= 0"),
]


@pytest.mark.parametrize("args,message", PRIMITIVE_CASES)
def test_primitive_rejects_bad_margins(args, message, inputs, backend):
    """The primitive (torch.ops.margin.margin_lse is public too) of every backend validates
    its margin arguments as the losses do: s = NaN or 0 is an error, not NaN statistics."""
    x, w, y = (t.detach() for t in inputs)
    with pytest.raises(ValueError, match=message):
        backend.lse_fn()(x, w, y, *args)


def test_primitive_checks_its_tensors(inputs, backend):
    x, w, y = (t.detach() for t in inputs)
    lse_fn = backend.lse_fn()
    cases = [
        (ValueError, r"x must be a 2-D tensor", (x[0], w, y)),
        (ValueError, r"weight must be \(C, D\)", (x, w[:, :2], y)),
        (TypeError, r"weight must have x's dtype", (x, w.double(), y)),
        (ValueError, r"labels must be \(N,\)", (x, w, y[:2])),
        (TypeError, r"labels must be int64", (x, w, y.int())),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            lse_fn(*args, *PRIMITIVE)


def test_primitive_checks_its_options(inputs, backend):
    """subcenters, class_index (PartialFC: distinct, in range, int64, on weight's device) and
    the hard-example tensors, checked by every backend's primitive."""
    x, w, y = (t.detach() for t in inputs)
    lse_fn = backend.lse_fn()
    index = torch.tensor([4, 0, 7], device=x.device)
    y3 = y % 3
    hard = torch.zeros(4, device=x.device)
    cases = [
        (ValueError, r"subcenters must be an integer >= 1, got 0", (x, w, y, *PRIMITIVE, None, 0)),
        (ValueError, r"9 rows is not a multiple of subcenters=2", (x, w, y, *PRIMITIVE, None, 2)),
        (ValueError, r"class_index must lie in \[0, 9\) \(the classes of weight\); got 9",
         (x, w, y3, *PRIMITIVE, None, 1, torch.tensor([1, 9, 2], device=x.device))),
        (ValueError, r"class_index must lie in \[0, 3\)", (x, w, y3, *PRIMITIVE, None, 3, index)),
        (ValueError, r"class_index must lie in \[0, 9\)",
         (x, w, y3, *PRIMITIVE, None, 1, torch.tensor([-1, 0, 2], device=x.device))),
        (ValueError, r"class_index must not repeat a class .*; got 4 twice",
         (x, w, y3, *PRIMITIVE, None, 1, torch.tensor([4, 0, 4], device=x.device))),
        (TypeError, r"class_index must be int64, got torch.int32", (x, w, y3, *PRIMITIVE, None, 1, index.int())),
        (ValueError, r"class_index must be a non-empty 1-D tensor \(C,\)",
         (x, w, y3, *PRIMITIVE, None, 1, index[:0])),
        (ValueError, r"class_index must be a non-empty 1-D tensor", (x, w, y3, *PRIMITIVE, None, 1, index[None])),
        (ValueError, r"hard_threshold and hard_t must be given together",
         (x, w, y, *PRIMITIVE, None, 1, None, hard, None)),
        (ValueError, r"hard_t must be \(N,\) with N = x.shape\[0\] = 4",
         (x, w, y, *PRIMITIVE, None, 1, None, hard, hard[:2])),
        (TypeError, r"hard_threshold must be floating point",
         (x, w, y, *PRIMITIVE, None, 1, None, hard.long(), hard)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            lse_fn(*args)


@pytest.mark.backends("cpu", "cuda-emulated", "triton-interpreted", "cuda", "triton")
def test_primitive_backward_checks_its_per_row_tensors(inputs, backend):
    x, w, y = (t.detach() for t in inputs)
    forward, backward = backend.primitive
    lse = forward(x, w, y, *PRIMITIVE)[0]
    g = torch.randn(4, device=x.device)
    with pytest.raises(ValueError, match=r"grad_lse must be \(N,\) with N = x.shape\[0\] = 4"):
        backward(g[:3], g, g, x, w, y, lse, *PRIMITIVE)
    with pytest.raises(ValueError, match=r"grad_nontarget_sum must be \(N,\)"):
        backward(g, g, g[:1], x, w, y, lse, *PRIMITIVE)
    with pytest.raises(ValueError, match=r"lse must be \(N,\)"):
        backward(g, g, g, x, w, y, lse[:1], *PRIMITIVE)
    with pytest.raises(ValueError, match=r"class_index must not repeat a class"):
        backward(g, g, g, x, w, y % 2, lse, *PRIMITIVE, None, 1, torch.tensor([3, 3], device=x.device))
