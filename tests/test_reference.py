"""margin_ops.reference (the oracle) against closed forms written independently here
(docs/design.md §1) and F.cross_entropy on explicitly built N x C logits, in float64."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import margin_ops
from margin_ops import reference
from margin_ops.spec import MarginSpec

from conftest import assert_close, closed_form_logits, closed_form_phi, make_inputs, run_with_grads

F64 = torch.float64
RTOL = 1e-9  # both sides float64; they differ only in evaluation order (Chebyshev vs cos(mθ), ...)

# (reference function name, reference kwargs, closed-form kwargs of closed_form_logits)
CASES = [
    ("arcface", dict(s=64.0, m=0.5), dict(s=64.0, m=0.5)),
    ("arcface", dict(s=10.0, m=1.3), dict(s=10.0, m=1.3)),  # threshold cos(π − 1.3) = −0.27: linear branch common
    ("arcface", dict(s=30.0, m=0.5, easy_margin=True), dict(s=30.0, m=0.5, easy_margin=True)),
    ("arcface", dict(s=30.0, m=0.4, margin_grad="detach"), dict(s=30.0, m=0.4, detach=True)),
    ("arcface", dict(s=30.0, m=0.4, easy_margin=True, margin_grad="detach"),
     dict(s=30.0, m=0.4, easy_margin=True, detach=True)),
    ("cosface", dict(s=64.0, m=0.35), dict(s=64.0, m=0.35)),
    ("cosface", dict(s=5.0, m=-0.3), dict(s=5.0, m=-0.3)),
    ("combined", dict(s=64.0, m1=1.0, m2=0.3, m3=0.2), dict(s=64.0, m1=1.0, m2=0.3, m3=0.2)),
    ("combined", dict(s=20.0, m1=0.9, m2=0.4, m3=0.15), dict(s=20.0, m1=0.9, m2=0.4, m3=0.15)),
    ("combined", dict(s=20.0, m1=1.35, m2=0.0, m3=0.1, margin_grad="detach"),
     dict(s=20.0, m1=1.35, m2=0.0, m3=0.1, detach=True)),
] + [
    ("sphereface", dict(m=m, lamb=lamb, s=s), dict(m=m, lamb=lamb, s=s))
    for m in (1, 2, 3, 4, 5) for lamb, s in ((0.0, None), (2.5, 12.0))
]


def case_id(case):
    name, kwargs, _ = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def closed_form_loss_fn(name, closed, reduction, ignore_index):
    def fn(x, weight, labels):
        logits = closed_form_logits(name, x, weight, labels, **closed)
        return F.cross_entropy(logits, labels, reduction=reduction, ignore_index=ignore_index)
    return fn


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_equals_cross_entropy_of_explicit_logits(case, reduction):
    name, kwargs, closed = case
    x, w, y = make_inputs(7, 6, 11, F64, ignore_rows=(2,))
    upstream = torch.randn(7, dtype=F64) if reduction == "none" else None
    got = run_with_grads(getattr(reference, name), x, w, y, upstream, reduction=reduction, **kwargs)
    want = run_with_grads(closed_form_loss_fn(name, closed, reduction, -100), x, w, y, upstream)
    assert_close(got.loss, want.loss, RTOL, "loss")
    assert_close(got.grad_x, want.grad_x, RTOL, "grad_x")
    assert_close(got.grad_weight, want.grad_weight, RTOL, "grad_weight")


def _opposite_inputs(n=6, d=8, c=5, noise=0.05):
    """Rows of x nearly opposite to their class's weight row: target cosine close to −1."""
    x, w, y = make_inputs(n, d, c, F64, requires_grad=False)
    x = -w[y] * (1 + torch.rand(n, 1, dtype=F64)) + noise * torch.randn(n, d, dtype=F64)
    return x, w, y


def _target_cos(x, w, y):
    return (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)


@pytest.mark.parametrize("m", [0.3, 0.5, 0.8])
def test_arcface_linear_branch_when_past_pi(m):
    x, w, y = _opposite_inputs()
    c = _target_cos(x, w, y)
    assert (c < math.cos(math.pi - m)).all(), "setup: every target cosine must be past the threshold"
    lse, target_logit, _, _, _ = reference.margin_lse(x, w, y, "arcface", 3.0, m2=m)
    assert_close(target_logit, 3.0 * (c - m * math.sin(m)), RTOL, "φ = c − m·sin m")
    # the gradient of the linear branch: dφ/dc = 1, i.e. plain softmax logits shifted by a constant
    got = run_with_grads(reference.arcface, x, w, y, s=3.0, m=m, reduction="sum")
    want = run_with_grads(closed_form_loss_fn("arcface", dict(s=3.0, m=m), "sum", -100), x, w, y)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_weight")):
        assert_close(a, b, RTOL, what)


def test_arcface_easy_margin_below_zero_is_plain_softmax():
    x, w, y = _opposite_inputs(noise=0.3)
    assert (_target_cos(x, w, y) < 0).all()
    got = run_with_grads(reference.arcface, x, w, y, s=7.0, m=0.5, easy_margin=True, reduction="none",
                         upstream=torch.rand(6, dtype=F64))
    plain = run_with_grads(lambda a, b, c: F.cross_entropy(7.0 * F.normalize(a) @ F.normalize(b).t(), c,
                                                           reduction="none"), x, w, y,
                           upstream=torch.rand(6, dtype=F64))
    assert_close(got.loss, plain.loss, RTOL, "easy margin below 0: φ = c")


@pytest.mark.parametrize("margin,params", [
    ("arcface", dict(m2=0.5)), ("arcface", dict(m2=1.1)), ("arcface_easy", dict(m2=0.5)),
    ("cosface", dict(m3=0.35)), ("combined", dict(m1=1.2, m2=0.3, m3=0.1)),
] + [("sphereface", dict(m1=float(m), lamb=lamb)) for m in (1, 2, 3, 4, 5) for lamb in (0.0, 1.5)])
def test_target_margin_on_a_grid_of_angles(margin, params):
    """φ(c) and its exact derivative on θ ∈ (0, π) against the closed forms of docs/design.md §1."""
    theta = torch.linspace(1e-3, math.pi - 1e-3, 2001, dtype=F64)
    c = torch.cos(theta).requires_grad_(True)
    spec = MarginSpec(margin, 1.0, **params)
    phi = reference.target_margin(c, spec)
    name = {"arcface_easy": "arcface"}.get(margin, margin)
    closed = {"arcface": lambda: dict(m=params["m2"], easy_margin=margin == "arcface_easy"),
              "cosface": lambda: dict(m=params["m3"]),
              "combined": lambda: dict(m1=params["m1"], m2=params["m2"], m3=params["m3"]),
              "sphereface": lambda: dict(m=int(params["m1"]), lamb=params["lamb"])}[name]()
    c2 = c.detach().clone().requires_grad_(True)
    want = closed_form_phi(name, c2, **closed)
    assert_close(phi, want, 1e-12, "φ")
    (dphi,) = torch.autograd.grad(phi.sum(), c)
    (dwant,) = torch.autograd.grad(want.sum(), c2)
    assert_close(dphi, dwant, 1e-9, "dφ/dc")
    if margin in ("arcface", "sphereface", "cosface"):
        # the point of the th/mm trick and of ψ's −2k: φ is nondecreasing in c (the easy
        # margin is not: it jumps from −sin m up to 0 at c = 0)
        assert (phi.detach().diff() <= 1e-12).all(), "φ must be nonincreasing in θ"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_sphereface_psi_branches(m):
    """ψ(θ) = (−1)^k cos(mθ) − 2k with k = ⌊mθ/π⌋: every k in [0, m−1] is reached, ψ is
    continuous across the branch boundaries and goes from 1 (θ = 0) to 1 − 2m (θ = π)."""
    theta = torch.linspace(0, math.pi, 4001, dtype=F64)
    c = torch.cos(theta)
    psi = reference.target_margin(c, MarginSpec("sphereface", 1.0, m1=float(m)))
    k = torch.floor(m * theta / math.pi).clamp(0, m - 1)
    assert set(k.tolist()) == set(float(i) for i in range(m))
    assert_close(psi, (-1.0) ** k * torch.cos(m * theta) - 2 * k, 1e-12, "ψ")
    assert abs(psi[0].item() - 1) < 1e-12 and abs(psi[-1].item() - (1 - 2 * m)) < 1e-9
    assert psi.diff().abs().max().item() < 4 * m * math.pi / 4000  # no jumps
    assert (psi.diff() <= 1e-12).all()


def test_chebyshev_matches_cos_m_theta():
    c = torch.rand(100, dtype=F64) * 2 - 1
    for m in range(1, 8):
        assert_close(reference.chebyshev_t(c, m), torch.cos(m * torch.acos(c)), 1e-12, f"T_{m}")


def test_combined_special_cases_are_arcface_and_cosface():
    x, w, y = make_inputs(9, 12, 10, F64)
    c = _target_cos(x, w, y)
    assert (c > math.cos(math.pi - 0.5)).all()  # random inputs in D=12: no linear branch
    for a, b in zip(run_with_grads(reference.combined, x, w, y, s=20.0, m1=1.0, m2=0.5, m3=0.0),
                    run_with_grads(reference.arcface, x, w, y, s=20.0, m=0.5)):
        assert_close(a, b, RTOL, "combined(1, m, 0) = arcface")
    for a, b in zip(run_with_grads(reference.combined, x, w, y, s=20.0, m1=1.0, m2=0.0, m3=0.3),
                    run_with_grads(reference.cosface, x, w, y, s=20.0, m=0.3)):
        assert_close(a, b, RTOL, "combined(1, 0, m) = cosface")


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("s", [None, 6.0])
def test_focal_gamma_hand_formula(gamma, s):
    x, w, y = make_inputs(8, 5, 6, F64)

    def hand(x, w, y):
        logits = closed_form_logits("sphereface", x, w, y, s=s, m=3, lamb=1.0)
        p = logits.softmax(1).gather(1, y.unsqueeze(1)).squeeze(1)
        return -((1 - p) ** gamma) * p.log()

    upstream = torch.randn(8, dtype=F64)
    got = run_with_grads(reference.sphereface, x, w, y, upstream, m=3, lamb=1.0, s=s, gamma=gamma,
                         reduction="none")
    want = run_with_grads(hand, x, w, y, upstream)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_weight")):
        assert_close(a, b, RTOL, what)
    # and with γ = 0 it is plain cross-entropy
    p = closed_form_logits("sphereface", x, w, y, s=s, m=3, lamb=1.0).log_softmax(1)
    assert_close(reference.sphereface(x, w, y, m=3, lamb=1.0, s=s, reduction="none"),
                 -p.gather(1, y.unsqueeze(1)).squeeze(1), RTOL, "γ = 0")


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_reductions_and_ignore_index(ignore_index):
    x, w, y = make_inputs(10, 6, 7, F64, ignore_rows=(1, 4, 8), ignore_index=ignore_index)
    valid = y != ignore_index
    per_row = reference.cosface(x, w, y, s=9.0, reduction="none", ignore_index=ignore_index)
    assert (per_row[~valid] == 0).all() and (per_row[valid] > 0).all()
    # per-row loss = cross-entropy of the row's explicit logits (rows labelled ignore_index
    # inside [0, C) keep their target in margin_lse but contribute nothing)
    logits = closed_form_logits("cosface", x, w, y, s=9.0, m=0.35)
    ce = F.cross_entropy(logits, torch.where(valid, y, 0), reduction="none")
    assert_close(per_row[valid], ce[valid], RTOL, "none")
    assert_close(reference.cosface(x, w, y, s=9.0, reduction="sum", ignore_index=ignore_index),
                 ce[valid].sum(), RTOL, "sum")
    assert_close(reference.cosface(x, w, y, s=9.0, reduction="mean", ignore_index=ignore_index),
                 ce[valid].sum() / valid.sum(), RTOL, "mean over non-ignored rows")


def test_all_rows_ignored_mean_is_zero():
    x, w, y = make_inputs(4, 5, 6, F64, ignore_rows=range(4))
    got = run_with_grads(reference.arcface, x, w, y)
    assert got.loss.item() == 0
    assert (got.grad_x == 0).all() and (got.grad_weight == 0).all()


def test_feature_norm_scale():
    """s=None scales each row by ‖x_i‖, with the gradient flowing through the norm."""
    x, w, y = make_inputs(6, 7, 9, F64)
    got = run_with_grads(reference.sphereface, x, w, y, m=2, s=None, reduction="sum")
    want = run_with_grads(closed_form_loss_fn("sphereface", dict(s=None, m=2), "sum", -100), x, w, y)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_weight")):
        assert_close(a, b, RTOL, what)
    # same as a fixed s equal to the norm when every row has that norm (but gradients differ:
    # the fixed s has no radial component)
    xs = F.normalize(x.detach(), dim=1) * 3.0
    assert_close(reference.sphereface(xs, w, y, s=None), reference.sphereface(xs, w, y, s=3.0), RTOL, "s=‖x‖")


@pytest.mark.parametrize("case", [c for c in CASES if "margin_grad" not in c[1]], ids=case_id)
def test_gradcheck_reference(case):
    name, kwargs, _ = case
    kwargs = dict(kwargs)
    if kwargs.get("s") is not None:
        kwargs["s"] = min(kwargs["s"], 4.0)  # keep the loss well-conditioned for finite differences
    x, w, y = make_inputs(3, 4, 5, F64)
    fn = getattr(reference, name)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, y, reduction="sum", **kwargs), (x, w))


@pytest.mark.parametrize("name,kwargs", [
    ("arcface", dict(s=20.0, m=0.5)), ("arcface", dict(s=20.0, m=0.5, easy_margin=True)),
    ("combined", dict(s=20.0, m1=1.1, m2=0.3, m3=0.1)),
])
def test_detach_is_straight_through(name, kwargs):
    """margin_grad='detach' gives the same loss, and the gradient of logits whose target
    entry is s·(c + const) — dφ/dc := 1 — not the true derivative."""
    x, w, y = make_inputs(6, 8, 9, F64)
    fn = getattr(reference, name)
    exact = run_with_grads(fn, x, w, y, **kwargs)
    detached = run_with_grads(fn, x, w, y, margin_grad="detach", **kwargs)
    assert_close(detached.loss, exact.loss, 1e-14, "detach does not change the loss")

    # straight-through by hand: target logit s·(c − δ) with δ = c − φ(c) a constant per row
    c = _target_cos(x, w, y).detach()
    closed = {k: v for k, v in kwargs.items() if k != "s"}
    delta = c - closed_form_phi(name, c, **closed)

    def shifted(a, b, labels):
        logits = kwargs["s"] * (F.normalize(a) @ F.normalize(b).t())
        shift = F.one_hot(labels, b.shape[0]) * (kwargs["s"] * delta).unsqueeze(1)
        return F.cross_entropy(logits - shift, labels)

    want = run_with_grads(shifted, x, w, y)
    for a, b, what in zip(detached, want, ("loss", "grad_x", "grad_weight")):
        assert_close(a, b, RTOL, what)
    assert not torch.allclose(exact.grad_x, detached.grad_x, rtol=1e-3), "setup: exact and detach must differ"


def test_margin_lse_statistics():
    x, w, y = make_inputs(7, 5, 8, F64, ignore_rows=(3,))
    lse, target_logit, max_cos, pred, _ = reference.margin_lse(x, w, y, "arcface", 16.0, m2=0.5)
    logits = closed_form_logits("arcface", x, w, y, s=16.0, m=0.5)
    assert_close(lse, logits.logsumexp(1), RTOL, "lse")
    has_target = y >= 0
    assert_close(target_logit[has_target], logits[has_target, y[has_target]], RTOL, "target_logit")
    assert (target_logit[~has_target] == 0).all()
    cos = F.normalize(x) @ F.normalize(w).t()
    assert_close(max_cos, cos.max(1).values, RTOL, "max_cos")
    assert torch.equal(pred, cos.argmax(1))


def _defaults(fn):
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()}


@pytest.mark.parametrize("name", ["arcface", "cosface", "combined", "sphereface"])
def test_reference_defaults_equal_schema_defaults(name):
    schema = getattr(torch.ops.margin, name).default._schema
    ref = _defaults(getattr(reference, name))
    assert list(ref) == [a.name for a in schema.arguments], "same argument names in the same order"
    for arg in schema.arguments:
        if arg.has_default_value():
            assert ref[arg.name] == arg.default_value, f"{name}.{arg.name}"
            assert type(ref[arg.name]) is type(arg.default_value) or arg.default_value is None, arg.name
        else:
            assert ref[arg.name] is inspect.Parameter.empty, f"{name}.{arg.name} has no default in the schema"


@pytest.mark.parametrize("module,name", [(margin_ops.ArcFace, "arcface"), (margin_ops.CosFace, "cosface"),
                                         (margin_ops.CombinedMargin, "combined"),
                                         (margin_ops.SphereFace, "sphereface")])
def test_module_defaults_equal_schema_defaults(module, name):
    schema = {a.name: a for a in getattr(torch.ops.margin, name).default._schema.arguments}
    for param, default in _defaults(module.__init__).items():
        if param in schema and schema[param].has_default_value():
            assert default == schema[param].default_value, f"{module.__name__}.{param}"


@pytest.mark.parametrize("name, kwargs", [
    ("arcface", {"subcenters": 3}), ("cosface", {}), ("combined", {}), ("sphereface", {}),
    ("adaptive", {"m_angle": torch.zeros(4), "m_add": torch.zeros(4)}),
    ("curricular", {"t": torch.tensor(0.0)}),
])
def test_reference_losses_refuse_labels_out_of_range(name, kwargs):
    """The public reference losses (the benchmark's "eager" contender, users' oracle) check
    their labels as the ops do: a label ≥ C (here: a weight-row index with K = 3 sub-centers)
    would otherwise count silently as a row without a target."""
    x, weight = torch.randn(4, 8), torch.randn(30, 8)
    classes = 30 // kwargs.get("subcenters", 1)
    labels = torch.tensor([0, 5, -100, classes])
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {classes}\) or equal ignore_index=-100; got {classes}"):
        getattr(reference, name)(x, weight, labels, **kwargs)
    getattr(reference, name)(x, weight, labels.clamp(max=classes - 1), **kwargs)  # in range: no error
