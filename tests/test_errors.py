"""Bad arguments raise a clear error that names the argument."""

import math

import pytest
import torch

import margin_ops

from conftest import make_inputs

LOSSES = ("arcface", "cosface", "combined", "sphereface")


def _op(name):
    return getattr(torch.ops.margin, name)


@pytest.fixture(params=["cpu", "reference"])
def backend(request):
    """Argument checks live in the op, in front of every backend."""
    with margin_ops.backend(request.param):
        yield request.param


@pytest.fixture
def inputs():
    return make_inputs(4, 6, 9, torch.float32)


@pytest.mark.parametrize("name", LOSSES)
def test_x_must_be_2d(name, inputs, backend):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor"):
        _op(name)(x.reshape(4, 2, 3), w, y)
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor"):
        _op(name)(x[0], w, y)


@pytest.mark.parametrize("name", LOSSES)
def test_weight_feature_dim_mismatch(name, inputs, backend):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"weight must be \(C, D\) with D = x.shape\[1\] = 6"):
        _op(name)(x, w[:, :5], y)
    # the classic (D, C) layout is called out
    with pytest.raises(ValueError, match=r"weight must be .*W.t\(\)"):
        _op(name)(x, w.t(), y)
    with pytest.raises(ValueError, match=r"weight must have at least one class"):
        _op(name)(x, w[:0], y)


@pytest.mark.parametrize("name", LOSSES)
def test_dtype_mismatch(name, inputs, backend):
    x, w, y = inputs
    with pytest.raises(TypeError, match=r"weight must have x's dtype torch.float32, got torch.float64"):
        _op(name)(x, w.double(), y)
    with pytest.raises(TypeError, match=r"x must be floating point"):
        _op(name)(torch.ones(4, 6, dtype=torch.int64), w, y)


@pytest.mark.parametrize("name", LOSSES)
def test_labels_shape_and_dtype(name, inputs, backend):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"labels must be \(N,\) with N = x.shape\[0\] = 4"):
        _op(name)(x, w, y[:3])
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        _op(name)(x, w, y.unsqueeze(1))
    with pytest.raises(TypeError, match=r"labels must be int64, got torch.int32"):
        _op(name)(x, w, y.int())


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [9, 100, -1, -101])
def test_labels_out_of_range(name, bad, inputs, backend):
    x, w, y = inputs
    y = y.clone()
    y[2] = bad
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 9\) or equal ignore_index=-100; got {bad}"):
        _op(name)(x, w, y)
    # the same value is fine when it is the ignore_index
    loss = _op(name)(x, w, y, ignore_index=bad)
    assert torch.isfinite(loss)


SCALAR_CASES = [
    # (op, kwargs, expected message)
    ("arcface", dict(s=math.nan), r"s must be a finite number, got nan"),
    ("arcface", dict(s=math.inf), r"s must be a finite number, got inf"),
    ("arcface", dict(s=0.0), r"s must be > 0, got 0.0"),
    ("arcface", dict(s=-3.0), r"s must be > 0"),
    ("arcface", dict(m=math.nan), r"m must be a finite number"),
    ("arcface", dict(m=-math.inf), r"m must be a finite number"),
    ("cosface", dict(s=-1.0), r"s must be > 0"),
    ("cosface", dict(s=math.inf), r"s must be a finite number"),
    ("cosface", dict(m=math.nan), r"m must be a finite number"),
    ("combined", dict(s=0.0), r"s must be > 0"),
    ("combined", dict(m1=math.nan), r"m1 must be a finite number"),
    ("combined", dict(m2=math.inf), r"m2 must be a finite number"),
    ("combined", dict(m3=-math.inf), r"m3 must be a finite number"),
    ("sphereface", dict(s=0.0), r"s must be > 0"),
    ("sphereface", dict(s=math.nan), r"s must be a finite number"),
    ("sphereface", dict(m=0), r"m must be an integer >= 1 for SphereFace, got 0"),
    ("sphereface", dict(m=-2), r"m must be an integer >= 1"),
    ("sphereface", dict(lamb=-1.0), r"lamb must be >= 0"),
    ("sphereface", dict(lamb=math.nan), r"lamb must be a finite number"),
    ("sphereface", dict(gamma=-0.5), r"gamma must be >= 0"),
    ("sphereface", dict(gamma=math.inf), r"gamma must be a finite number"),
]


@pytest.mark.parametrize("name,kwargs,message", SCALAR_CASES)
def test_bad_scalars(name, kwargs, message, inputs, backend):
    x, w, y = inputs
    with pytest.raises(ValueError, match=message):
        _op(name)(x, w, y, **kwargs)


def test_sphereface_float_m_is_rejected(inputs, backend):
    """m is an int in the schema: the dispatcher refuses a float (its own message)."""
    x, w, y = inputs
    for m in (2.5, 4.0):
        with pytest.raises((TypeError, RuntimeError, ValueError), match=r"'m'"):
            torch.ops.margin.sphereface(x, w, y, m=m)


@pytest.mark.parametrize("name", LOSSES)
def test_unknown_reduction(name, inputs, backend):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        _op(name)(x, w, y, reduction="avg")


@pytest.mark.parametrize("name", ["arcface", "combined"])
def test_unknown_margin_grad(name, inputs, backend):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"margin_grad must be one of 'exact', 'detach', got 'stop'"):
        _op(name)(x, w, y, margin_grad="stop")


def test_with_stats_rejects_other_ops(inputs):
    x, w, y = inputs
    with pytest.raises(ValueError, match=r"op must be one of"):
        margin_ops.with_stats(torch.ops.aten.mm, x, w, y)
    with pytest.raises(TypeError, match=r"unexpected keyword"):
        margin_ops.with_stats("arcface", x, w, y, scale=3.0)


PRIMITIVE = ("arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False)


def test_primitive_checks_its_own_arguments(inputs):
    """margin_lse is public too (torch.ops.margin.margin_lse): the C++ kernel checks its
    inputs and names them."""
    x, w, y = (t.detach() for t in inputs)
    lse = torch.ops.margin.margin_lse(x, w, y, *PRIMITIVE)
    with pytest.raises(ValueError, match=r"margin must be one of .*got 'arc'"):
        torch.ops.margin.margin_lse(x, w, y, "arc", *PRIMITIVE[1:])
    with pytest.raises(ValueError, match=r"m1 must be an integer >= 1 for margin='sphereface'"):
        torch.ops.margin.margin_lse(x, w, y, "sphereface", 1.0, 2.5, 0.0, 0.0, 0.0, True, False)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        torch.ops.margin.margin_lse(x[0], w, y, *PRIMITIVE)
    with pytest.raises(ValueError, match=r"weight must be \(C, D\)"):
        torch.ops.margin.margin_lse(x, w[:, :2], y, *PRIMITIVE)
    with pytest.raises(TypeError, match=r"x and weight must share one floating dtype"):
        torch.ops.margin.margin_lse(x, w.double(), y, *PRIMITIVE)
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        torch.ops.margin.margin_lse(x, w, y[:2], *PRIMITIVE)
    with pytest.raises(TypeError, match=r"labels must be int64"):
        torch.ops.margin.margin_lse(x, w, y.int(), *PRIMITIVE)
    g = torch.randn(4)
    with pytest.raises(ValueError, match=r"per-row gradients and lse must be \(N,\)"):
        torch.ops.margin.margin_lse_backward(g[:3], g, x, w, y, lse[0], *PRIMITIVE)
