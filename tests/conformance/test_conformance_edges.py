"""Every backend on the edges: empty batches, ignored rows, zero-norm rows, |cos| = 1, NaN,
huge logits, confident focal rows, float16 rows past float16's range."""

import math

import pytest
import torch

import margin_ops
from margin_ops import reference

from conformance.cases import DTYPE_IDS, OP_CONFIGS, PRIMITIVE_ARGS, config_id
from conftest import (assert_close, call_op, cancellation_scales, compare_to_reference, leaf_copy, make_inputs,
                      make_op_inputs, reference_result, run_with_grads)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
slow = pytest.mark.slow


def _op(name, backend):
    return lambda *a, **k: call_op(name, *a, backend=backend, **k)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("config", OP_CONFIGS[::3], ids=config_id)
def test_empty_batch(config, reduction, backend):
    name, kwargs = config
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 0, 6, 9, F32, device=backend.device)
    got = run_with_grads(_op(name, backend), x, w, y, reduction=reduction, **kwargs)
    want = reference_result(name, x, w, y, reduction=reduction, **kwargs)
    if reduction == "none":
        assert got.loss.shape == (0,)
    else:
        assert got.loss.shape == () and got.loss.item() == 0 and want.loss.item() == 0
    assert got.grad_x.shape == (0, 6)
    assert got.grad_weight.shape == w.shape and (got.grad_weight == 0).all()
    stats = margin_ops.with_stats(name, x, w, y, **kwargs)
    assert stats.lse.shape == (0,) and stats.pred.shape == (0,)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS[::2], ids=config_id)
def test_all_rows_ignored(config, dtype, backend):
    """A batch whose rows are all ignored: loss 0 under every reduction (not NaN), zero
    gradients."""
    name, kwargs = config
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 5, 6, 9, dtype, ignore_rows=range(5), device=backend.device)
    for reduction in ("mean", "sum", "none"):
        got = run_with_grads(_op(name, backend), x, w, y, reduction=reduction, **kwargs)
        assert (got.loss == 0).all(), f"{reduction}: {got.loss}"
        assert (got.grad_x == 0).all() and (got.grad_weight == 0).all()


def _compare_by_rows(got, want, zero_x_rows, zero_w_rows, rtol, what, scales):
    """Gradients of zero-norm rows are ~1/eps = 1e12 times larger than the others: compare
    the two groups of rows separately, each at its own scale. A zero row's gradient is
    Σ_c dc_ic ŵ_c / eps, a sum whose terms partly cancel: its 16-bit rounding is judged
    against the size of the terms, ``scales`` (:func:`conftest.cancellation_scales`)."""
    for grad_got, grad_want, zero_rows, label, scale in (
            (got.grad_x, want.grad_x, zero_x_rows, "grad_x", scales[0]),
            (got.grad_weight, want.grad_weight, zero_w_rows, "grad_weight", scales[1])):
        mask = torch.zeros(grad_want.shape[0], dtype=torch.bool, device=grad_want.device)
        mask[list(zero_rows)] = True
        assert torch.isfinite(grad_got).all(), f"{what} {label} not finite"
        zero_atol = rtol * max(grad_want[mask].abs().max().item(), scale)
        assert_close(grad_got[mask], grad_want[mask], rtol, f"{what} {label} (zero-norm rows)", atol=zero_atol)
        assert_close(grad_got[~mask], grad_want[~mask], rtol, f"{what} {label} (other rows)")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS[::3], ids=config_id)
def test_zero_norm_rows(config, dtype, backend):
    """x̂ = x / max(‖x‖, eps): a zero row has cosine 0 with every class and gradient dx̂ / eps
    (the true derivative of x / eps near 0); the same for rows of weight, including a row's
    target class. float16 is left out: 1/eps = 1e12 overflows it whatever computes it."""
    name, kwargs = config
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 6, 8, 10, dtype, device=backend.device)
    x, w = x.detach(), w.detach()
    x[1] = 0
    w[3] = 0
    w[7] = 0
    y[2] = 3
    y[1] = 5
    got = run_with_grads(_op(name, backend), x, w, y, reduction="sum", **kwargs)
    want = reference_result(name, x, w, y, reduction="sum", **kwargs)
    loss_rtol, grad_rtol = backend.tolerances[dtype]
    assert_close(got.loss, want.loss, loss_rtol, "loss")
    _compare_by_rows(got, want, [1], [3, 7], grad_rtol, name,
                     cancellation_scales(name, x, w, y, reduction="sum", **kwargs))
    assert torch.isfinite(margin_ops.with_stats(name, x, w, y, **kwargs).lse).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, F32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("sign", [1, -1], ids=["cos+1", "cos-1"])
@pytest.mark.parametrize("config", OP_CONFIGS[::2], ids=config_id)
def test_cos_exactly_one(config, sign, dtype, backend):
    """x rows equal to (or minus) their class's weight row: |cos| = 1 exactly (or within a
    rounding of it). Loss and gradients finite for every margin, including exact ArcFace /
    combined whose dφ/dc ~ 1/sin θ is floored; rounding decides which side of |c| = 1 each
    implementation lands on, so the comparison is loose there (compare_to_reference's
    ``cancellation``)."""
    name, kwargs = config
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 6, 8, 10, dtype, device=backend.device)
    x, w = x.detach(), w.detach()
    rows = [0, 2, 3, 5]
    x[rows] = sign * w[y[rows] * kwargs.get("subcenters", 1)]
    got = compare_to_reference(name, x, w, y, backend=backend, reduction="sum", cancellation=True, **kwargs)
    assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name,kwargs", [("arcface", dict(m=0.5)), ("arcface", dict(m=0.5, easy_margin=True)),
                                         ("combined", dict(m1=1.2, m2=0.3, m3=0.1)),
                                         ("sphereface", dict(m=4)), ("cosface", dict())])
@pytest.mark.slow
def test_every_row_parallel_to_its_class(name, kwargs, dtype, backend):
    """All rows at |cos| = 1 (half +1, half −1), also with one feature dimension (D = 1),
    where nothing else is possible: finite everywhere, and (but in bfloat16, whose 8 bits
    make |cos| = 1 a matter of rounding) equal to the reference."""
    for d in (1, 4):
        x, w, y = make_inputs(6, d, 5, dtype, requires_grad=False, device=backend.device)
        x = w[y] * torch.tensor([1.0, -1.0] * 3, device=backend.device).to(dtype).unsqueeze(1) * 2
        got = run_with_grads(_op(name, backend), x, w, y, **kwargs)
        assert torch.isfinite(got.loss)
        assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()
        if dtype != BF16:
            compare_to_reference(name, x, w, y, backend=backend, cancellation=True, **kwargs)


def _adaptive_target_closed_form(c, m_angle, m_add, angle_mode):
    """The issue's cos θ̃ − m_add, θ = acos(c), written independently of margin_ops.reference
    (which the op and the reference share: comparing them alone cannot catch a wrong θ̃)."""
    theta = torch.acos(c)
    if angle_mode == "clip":  # AdaFace
        return torch.cos(torch.clamp(theta + m_angle, 1e-3, math.pi - 1e-3)) - m_add
    if angle_mode == "arcface":  # InsightFace's fallback, per row (MagFace)
        fallback = c <= torch.cos(math.pi - m_angle)
        return torch.where(fallback, c - m_angle * torch.sin(m_angle), torch.cos(theta + m_angle)) - m_add
    return torch.cos(theta + m_angle) - m_add  # "plain" (ElasticFace): no clamp, no fallback


@pytest.mark.parametrize("angle_mode", ["clip", "arcface", "plain"])
def test_adaptive_margins_past_the_ends(angle_mode, backend):
    """m_angle from −3 to 3: θ + m_angle below 0 and past π for some rows (θ̃ wraps for
    "plain", is clamped for "clip", turns linear for "arcface"); |cos| = 1 rows included.
    Finite everywhere and equal to the reference; the per-row losses and the gradients of
    m_angle and m_add equal the closed form of each mode, every branch of it taken."""
    s = 8.0
    (x, w, y), _ = make_op_inputs("adaptive", {}, 8, 8, 10, F64, device=backend.device)
    x = x.detach()
    x[:2] = w.detach()[y[:2]] * torch.tensor([[1.0], [-1.0]], dtype=F64)
    m_angle = torch.linspace(-3.0, 3.0, 8, dtype=F64, device=backend.device)
    m_add = 0.1 * m_angle.flip(0)
    got = compare_to_reference("adaptive", x, w, y, backend=backend, cancellation=True, s=s, angle_mode=angle_mode,
                               m_angle=m_angle, m_add=m_add)
    assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()

    rows = torch.arange(8, device=x.device)
    c = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w.detach()).t()).clamp(-1, 1)
    theta = torch.acos(c[rows, y])
    branches = {"clip": (theta + m_angle < 1e-3, theta + m_angle > math.pi - 1e-3),
                "arcface": (c[rows, y] <= torch.cos(math.pi - m_angle), c[rows, y] > torch.cos(math.pi - m_angle)),
                "plain": (theta + m_angle < 0, theta + m_angle > math.pi)}[angle_mode]
    assert all(branch.any() for branch in branches), f"{angle_mode}: not every branch taken"
    margins = [leaf_copy(m_angle), leaf_copy(m_add)]
    got_loss = call_op("adaptive", x, w.detach(), y, backend=backend, m_angle=margins[0], m_add=margins[1], s=s,
                       angle_mode=angle_mode, reduction="none")
    got_grads = torch.autograd.grad(got_loss.sum(), margins)
    want_margins = [leaf_copy(m_angle), leaf_copy(m_add)]
    target = s * _adaptive_target_closed_form(c[rows, y], *want_margins, angle_mode)
    logits = (s * c).scatter(1, y[:, None], target[:, None])
    want_loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    want_grads = torch.autograd.grad(want_loss.sum(), want_margins)
    # |cos| = 1 rows: the kernels' cosine may be 1 ulp inside, θ off by sqrt(ulp)
    atol = s * math.sqrt(torch.finfo(F64).eps) * 10
    assert_close(got_loss, want_loss, 1e-10, f"{angle_mode}: per-row loss (closed form)", atol=atol)
    for got_g, want_g, what in zip(got_grads, want_grads, ("m_angle", "m_add")):
        assert_close(got_g, want_g, 1e-10, f"{angle_mode}: grad {what} (closed form)", atol=atol)


@pytest.mark.parametrize("name,kwargs", [("arcface", dict(m=0.5)), ("cosface", dict()), ("combined", dict(m3=0.1))])
def test_one_subcenter_and_no_smoothing_are_the_defaults(name, kwargs, backend):
    """subcenters=1 and label_smoothing=0 give the bits of the call without them."""
    x, w, y = make_inputs(6, 8, 30, F32, ignore_rows=(1,), device=backend.device)
    plain = run_with_grads(_op(name, backend), x, w, y, **kwargs)
    explicit = run_with_grads(_op(name, backend), x, w, y, subcenters=1, label_smoothing=0.0, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(plain, explicit))


def test_label_smoothing_is_cross_entropys(backend):
    """label_smoothing has F.cross_entropy's meaning on the margin logits, ignored rows
    included (mean over the rows not ignored): CosFace's logits built by hand."""
    x, w, y = make_inputs(7, 8, 30, F64, ignore_rows=(2, 5), device=backend.device)
    c = torch.nn.functional.normalize(x.detach()) @ torch.nn.functional.normalize(w.detach()).t()
    logits = 30.0 * (c - 0.35 * torch.nn.functional.one_hot(y.clamp(min=0), 30).to(F64) * (y >= 0)[:, None])
    for reduction in ("mean", "sum", "none"):
        got = call_op("cosface", x, w, y, backend=backend, s=30.0, label_smoothing=0.3, reduction=reduction)
        want = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.3, reduction=reduction)
        assert_close(got, want, 1e-10, reduction)


@pytest.mark.slow
def test_duplicate_labels_accumulate_weight_gradient(backend):
    """Many rows with the same class: their contributions to that class's gradient add up."""
    x, w, y = make_inputs(12, 8, 4, F64, device=backend.device)
    y[:] = 2
    compare_to_reference("arcface", x, w, y, backend=backend, reduction="sum")
    compare_to_reference("sphereface", x, w, y, backend=backend, m=3)


@pytest.mark.slow
def test_large_logits_do_not_overflow(backend):
    """s = 1e4: logits up to 1e4, far past exp's float32 range; log-sum-exp stays finite."""
    x, w, y = make_inputs(5, 8, 30, F32, device=backend.device)
    for name in ("arcface", "cosface"):
        got = compare_to_reference(name, x, w, y, backend=backend, s=1e4, rtol=1e-3)
        assert torch.isfinite(got.loss)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, F32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("gamma", [0.1, 2.0])
def test_focal_on_confident_rows(gamma, dtype, backend):
    """p → 1 (a row equal to its class's weight, s = 200): the focal factor (1 − p)^γ has an
    unbounded derivative for γ < 1 at p = 1; loss and gradients stay finite and match."""
    x, w, y = make_inputs(6, 8, 10, dtype, requires_grad=False, device=backend.device)
    x[:3] = 5 * w[y[:3]]
    got = compare_to_reference("sphereface", x, w, y, backend=backend, m=2, s=200.0, gamma=gamma,
                               cancellation=True)
    assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()


def test_float16_rows_past_float16_range(backend):
    """float16 rows whose norm exceeds 65504 (entries up to 6e4): the norm must be taken in
    float32, or x̂ becomes 0 and the loss silently wrong."""
    x, w, y = make_inputs(6, 16, 40, F16, requires_grad=False, device=backend.device)
    x[:3] = x[:3] / x[:3].abs().amax(1, keepdim=True) * 6e4
    w[5] = w[5] / w[5].abs().max() * 6e4
    y[3] = 5
    assert (x[:3].double().norm(dim=1) > 65504).all() and w[5].double().norm() > 65504
    compare_to_reference("arcface", x, w, y, backend=backend, reduction="none")


@pytest.mark.parametrize("dtype", [F32, pytest.param(BF16, marks=slow)], ids=DTYPE_IDS.get)
def test_nan_propagates(dtype, backend):
    """NaN in the inputs propagates as in the reference, never hidden: a NaN feature makes
    its row's lse, target logit and loss NaN and leaves the other rows exact; a NaN weight
    row makes every row's lse NaN and, as torch.max does, is every row's max_cos (NaN) and
    pred. Values are compared with the float64 reference on the same rounded inputs."""
    args = PRIMITIVE_ARGS[0]
    x, w, y = make_inputs(6, 40, 300, dtype, requires_grad=False, device=backend.device)
    y[y == 7] = 8
    w_nan = w.clone()
    w_nan[7, 3] = float("nan")
    x_nan = x.clone()
    x_nan[2, 5] = float("nan")
    got_x = backend.lse_fn()(x_nan, w, y, *args)
    got_w = backend.lse_fn()(x, w_nan, y, *args)
    want_x = reference.margin_lse(x_nan.double(), w.double(), y, *args)
    want_w = reference.margin_lse(x.double(), w_nan.double(), y, *args)
    rows = torch.arange(6, device=x.device) != 2
    tol = backend.tolerances[dtype][0]
    for got, want, what in zip(got_x[:3], want_x[:3], ("lse", "target_logit", "max_cos")):
        assert torch.isnan(got[2]), f"NaN feature row: {what} is {got[2].item()}, not NaN"
        assert_close(got[rows], want[rows], tol, f"NaN feature row: {what} of the other rows")
    assert torch.equal(got_x[3], want_x[3]), f"NaN feature row: pred {got_x[3]}, reference {want_x[3]}"
    assert torch.isnan(got_w[0]).all(), f"NaN weight row: lse {got_w[0]}"
    assert torch.isnan(got_w[2]).all() and (got_w[3] == 7).all(), f"NaN weight row: max_cos / pred {got_w[2:]}"
    assert_close(got_w[1], want_w[1], tol, "NaN weight row: target logits (no row targets class 7)")
    loss = call_op("arcface", x_nan, w, y, backend=backend, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[rows]).all()
