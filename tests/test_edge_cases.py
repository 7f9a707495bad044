"""Edge cases of the CPU kernel: empty batches, all rows ignored, zero-norm rows, |cos| = 1.

(Index overflow, N·C > 2^31, is only cheap to test on a GPU: see test_cuda.py.)
"""

import pytest
import torch

import margin_ops
from margin_ops import reference

from conftest import (OP_CONFIGS, TOLERANCES, assert_close, call_op, check_nan_propagation,
                      compare_to_reference, config_id, make_inputs, reference_result, run_with_grads)

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", torch.float16: "f16"}


def _op(name):
    return lambda *a, **k: call_op(name, *a, **k)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("config", OP_CONFIGS[::3], ids=config_id)
def test_empty_batch(config, reduction, dtype):
    name, kwargs = config
    x, w, y = make_inputs(0, 6, 9, dtype)
    got = run_with_grads(_op(name), x, w, y, reduction=reduction, **kwargs)
    want = reference_result(name, x, w, y, reduction=reduction, **kwargs)
    if reduction == "none":
        assert got.loss.shape == (0,)
    else:
        assert got.loss.shape == () and got.loss.item() == 0 and want.loss.item() == 0
    assert got.grad_x.shape == (0, 6)
    assert got.grad_weight.shape == (9, 6) and (got.grad_weight == 0).all()
    with margin_ops.backend("cpu"):
        stats = margin_ops.with_stats(name, x, w, y, **kwargs)
    assert stats.lse.shape == (0,) and stats.pred.shape == (0,)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_all_rows_ignored(config, dtype):
    name, kwargs = config
    x, w, y = make_inputs(5, 6, 9, dtype, ignore_rows=range(5))
    for reduction in ("mean", "sum", "none"):
        got = run_with_grads(_op(name), x, w, y, reduction=reduction, **kwargs)
        assert torch.isfinite(got.loss).all()
        assert (got.loss == 0).all(), f"{reduction}: {got.loss}"
        assert (got.grad_x == 0).all() and (got.grad_weight == 0).all()


def _compare_by_rows(got, want, zero_x_rows, zero_w_rows, rtol, what):
    """Gradients of zero-norm rows are ~1/eps = 1e12 times larger than the others: compare
    the two groups of rows separately, each at its own scale."""
    for grad_got, grad_want, zero_rows, label in ((got.grad_x, want.grad_x, zero_x_rows, "grad_x"),
                                                  (got.grad_weight, want.grad_weight, zero_w_rows, "grad_weight")):
        mask = torch.zeros(grad_want.shape[0], dtype=torch.bool)
        mask[list(zero_rows)] = True
        assert torch.isfinite(grad_got).all(), f"{what} {label} not finite"
        assert_close(grad_got[mask], grad_want[mask], rtol, f"{what} {label} (zero-norm rows)")
        assert_close(grad_got[~mask], grad_want[~mask], rtol, f"{what} {label} (other rows)")


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_zero_norm_rows(config, dtype):
    """x̂ = x / max(‖x‖, eps): a zero row has cosine 0 with every class, and gradient
    dx̂ / eps (the true derivative of x / eps near 0). Same for rows of weight.

    float16 is left out: 1/eps = 1e12 overflows float16 (max 65504) whatever computes it.
    """
    name, kwargs = config
    x, w, y = make_inputs(6, 8, 10, dtype, requires_grad=False)
    x[1] = 0
    w[3] = 0
    w[7] = 0
    y[2] = 3  # a row whose target class has a zero weight row
    y[1] = 5
    got = run_with_grads(_op(name), x, w, y, reduction="sum", **kwargs)
    want = reference_result(name, x, w, y, reduction="sum", **kwargs)
    assert torch.isfinite(got.loss)
    assert_close(got.loss, want.loss, 1e-4 if dtype != F64 else 1e-10, "loss")
    _compare_by_rows(got, want, [1], [3, 7], TOLERANCES[dtype], name)
    with margin_ops.backend("cpu"):
        stats = margin_ops.with_stats(name, x, w, y, **kwargs)
    assert torch.isfinite(stats.lse).all()


@pytest.mark.parametrize("dtype", [F64, F32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("sign", [1, -1], ids=["cos+1", "cos-1"])
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_cos_exactly_one(config, sign, dtype):
    """x rows equal to (or minus) their class's weight row: |cos| = 1 exactly (or within a
    rounding of it). Loss and gradients must be finite for every margin, including exact
    ArcFace / combined whose dφ/dc ~ 1/sin θ is floored; rounding decides which side of
    |c| = 1 each implementation lands on, so the comparison is loose there (see
    compare_to_reference's ``cancellation``)."""
    name, kwargs = config
    x, w, y = make_inputs(6, 8, 10, dtype, requires_grad=False)
    rows = [0, 2, 3, 5]
    x[rows] = sign * w[y[rows]]
    got = compare_to_reference(name, x, w, y, reduction="sum", cancellation=True, **kwargs)
    assert torch.isfinite(got.loss) and torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name,kwargs", [("arcface", dict(m=0.5)), ("arcface", dict(m=0.5, easy_margin=True)),
                                         ("combined", dict(m1=1.2, m2=0.3, m3=0.1)),
                                         ("sphereface", dict(m=4)), ("cosface", dict())])
def test_every_row_parallel_to_its_class(name, kwargs, dtype):
    """All rows at |cos| = 1 (half +1, half −1), with one feature dimension too few to be
    anything else: D = 1. Finite everywhere."""
    for d in (1, 4):
        x, w, y = make_inputs(6, d, 5, dtype, requires_grad=False)
        x = w[y] * torch.tensor([1.0, -1.0] * 3).to(dtype).unsqueeze(1) * 2
        got = run_with_grads(_op(name), x, w, y, reduction="mean", **kwargs)
        assert torch.isfinite(got.loss)
        assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()
        if dtype != BF16:
            compare_to_reference(name, x, w, y, cancellation=True, **kwargs)


def test_duplicate_labels_accumulate_weight_gradient():
    """Many rows with the same class: their contributions to that class's gradient add up."""
    x, w, y = make_inputs(12, 8, 4, F64)
    y[:] = 2
    compare_to_reference("arcface", x, w, y, reduction="sum")
    compare_to_reference("sphereface", x, w, y, m=3, reduction="mean")


def test_large_logits_do_not_overflow():
    """s = 1e4: logits up to 1e4, far past exp's float32 range; log-sum-exp must stay finite."""
    x, w, y = make_inputs(5, 8, 30, F32)
    for name in ("arcface", "cosface"):
        got = compare_to_reference(name, x, w, y, s=1e4, rtol=1e-3)
        assert torch.isfinite(got.loss)
    ref = reference.cosface(x.double(), w.double(), y, s=1e4)
    assert torch.isfinite(ref)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("gamma", [0.1, 0.5, 2.0])
def test_focal_on_confident_rows(gamma, dtype):
    """p → 1 (a row equal to its class's weight, s = 200): the focal factor (1 − p)^γ has an
    unbounded derivative for γ < 1 at p = 1; loss and gradients stay finite and match."""
    x, w, y = make_inputs(6, 8, 10, dtype, requires_grad=False)
    x[:3] = 5 * w[y[:3]]
    got = compare_to_reference("sphereface", x, w, y, m=2, s=200.0, gamma=gamma, cancellation=True)
    assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
def test_nan_propagates(dtype):
    check_nan_propagation("cpu", "cpu", dtype)
