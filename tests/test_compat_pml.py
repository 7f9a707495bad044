"""margin_ops.compat.pml against pytorch-metric-learning itself (a test dependency).

Each drop-in loss is compared with PML's class of the same name in float64 on the same ``W``
(loaded through ``state_dict``): the loss and both gradients (embeddings, ``W``) agree
within 1e-10, on the ``cpu`` backend and on ``reference``. Separate tests pin down where
the two differ (documented in margin_ops.compat.pml): ArcFace's gradient where sin θ_y <
1e-4, labels equal to -100, and SubCenterArcFaceLoss.get_outliers on classes absent from
the batch. The classes are built with keyword arguments: PML's SubCenterArcFaceLoss
takes num_classes and embedding_size by keyword only.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import MeanReducer, SumReducer
from pytorch_metric_learning.regularizers import LpRegularizer

import margin_ops
from margin_ops.compat import pml as compat
from margin_ops.spec import SIN_THETA_EPS

from conftest import assert_close

# PML's SphereFace/LargeMarginSoftmax constructor warns under NumPy 2 (scipy.special.binom).
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

RTOL = 1e-10
NAMES = ("ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "SubCenterArcFaceLoss")

#: (class, margin, scale) cases: PML's defaults first, then others, margins as PML takes
#: them (ArcFace: degrees; CosFace: a cosine; SphereFace: the integer multiplier).
CASES = [
    ("ArcFaceLoss", 28.6, 64), ("ArcFaceLoss", 0.0, 30), ("ArcFaceLoss", 10.0, 16),
    ("ArcFaceLoss", 57.3, 64), ("ArcFaceLoss", 120.0, 8),
    ("CosFaceLoss", 0.35, 64), ("CosFaceLoss", 0.0, 1), ("CosFaceLoss", 0.5, 30), ("CosFaceLoss", -0.1, 10),
    ("SphereFaceLoss", 4, 1), ("SphereFaceLoss", 1, 1), ("SphereFaceLoss", 2, 3.5),
    ("SphereFaceLoss", 3, 0.5), ("SphereFaceLoss", 5, 1), ("SphereFaceLoss", 4.7, 2),
    ("SubCenterArcFaceLoss", 28.6, 64), ("SubCenterArcFaceLoss", 10.0, 16), ("SubCenterArcFaceLoss", 120.0, 8),
]


def case_id(case):
    return f"{case[0]}-margin{case[1]}-scale{case[2]}"


def make_pair(name, num_classes, embedding_size, **kwargs):
    """PML's loss and ours, float64, ours holding PML's W (loaded through state_dict)."""
    theirs = getattr(pml_losses, name)(num_classes=num_classes, embedding_size=embedding_size, **kwargs).double()
    ours = getattr(compat, name)(num_classes=num_classes, embedding_size=embedding_size, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def loss_and_grads(loss_fn, x, labels, **forward_kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x, labels, **forward_kwargs)
    grad_x, grad_w = torch.autograd.grad(loss, [x, loss_fn.W])
    return loss.detach(), grad_x, grad_w


def assert_same(theirs, ours, x, labels, rtol=RTOL, backend="cpu", **forward_kwargs):
    want = loss_and_grads(theirs, x, labels, **forward_kwargs)
    with margin_ops.backend(backend):
        got = loss_and_grads(ours, x, labels, **forward_kwargs)
    for what, g, w in zip(("loss", "grad embeddings", "grad W"), got, want):
        assert g.dtype == w.dtype == torch.float64
        assert_close(g, w, rtol, what)
    return got, want


def random_problem(generator=None):
    """Random N, D, C and embeddings of random norms (labels all valid: PML has no ignore_index)."""
    n = int(torch.randint(1, 40, ()))
    d = int(torch.randint(2, 33, ()))
    c = int(torch.randint(2, 200, ()))
    x = torch.randn(n, d, dtype=torch.float64) * (0.5 + 2.5 * torch.rand(n, 1, dtype=torch.float64))
    return n, d, c, x, torch.randint(0, c, (n,))


def embeddings_at_angles(w, labels, theta):
    """x_i of norm in [0.5, 3] at angle theta_i from its class's column of W: (N, D)."""
    w_hat = torch.nn.functional.normalize(w.detach().t()[labels], dim=1)
    u = torch.randn_like(w_hat)
    u = torch.nn.functional.normalize(u - (u * w_hat).sum(1, keepdim=True) * w_hat, dim=1)
    norms = 0.5 + 2.5 * torch.rand(len(labels), 1, dtype=w.dtype)
    return norms * (torch.cos(theta)[:, None] * w_hat + torch.sin(theta)[:, None] * u)


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_pml(case, backend_name):
    name, margin, scale = case
    for _ in range(3):
        n, d, c, x, labels = random_problem()
        theirs, ours = make_pair(name, c, d, margin=margin, scale=scale)
        assert_same(theirs, ours, x, labels, backend=backend_name)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "CosFaceLoss"], ids=case_id)
def test_matches_pml_over_all_target_angles(case):
    """Target angles spread over [1e-3, π − 1e-3]: ArcFace's fallback branch past θ = π − m
    and every SphereFace k. (ArcFace keeps sin θ_y ≥ 1e-3 > SIN_THETA_EPS and 1e-3 away
    from its threshold π − m, where the two differ: see the tests below.)"""
    name, margin, scale = case
    n, d, c = 64, 8, 11
    theirs, ours = make_pair(name, c, d, margin=margin, scale=scale)
    labels = torch.randint(0, c, (n,))
    theta = torch.linspace(1e-3, math.pi - 1e-3, n, dtype=torch.float64)
    if name == "ArcFaceLoss":
        threshold = math.pi - math.radians(margin)
        theta = torch.where((theta - threshold).abs() < 1e-3, theta + 2e-3, theta).clamp_max(math.pi - 1e-3)
        if margin > 0:
            assert (theta > threshold).any() and (theta < threshold).any(), "both branches covered"
    x = embeddings_at_angles(theirs.W, labels, theta)
    assert_same(theirs, ours, x, labels)


def test_sphereface_matches_pml_at_nearly_parallel_and_opposite():
    """SphereFace's ψ is a polynomial in c: no sin θ floor, so it agrees up to |c| → 1."""
    theirs, ours = make_pair("SphereFaceLoss", 7, 5, margin=4, scale=1.5)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    theta = torch.tensor([1e-7, 1e-5, 3e-4, math.pi - 3e-4, math.pi - 1e-5, math.pi - 1e-7], dtype=torch.float64)
    assert_same(theirs, ours, embeddings_at_angles(theirs.W, labels, theta), labels)


@pytest.mark.parametrize("name", NAMES)
def test_indices_tuple_weights_rows_as_pml(name):
    """A miner's indices_tuple weights each row by count / max count (PML's convert_to_weights)."""
    n, d, c, x, labels = random_problem()
    theirs, ours = make_pair(name, c, d)
    anchors = torch.randint(0, n, (3 * n,))
    indices_tuple = (anchors, torch.randint(0, n, (3 * n,)), torch.randint(0, n, (3 * n,)))
    assert_same(theirs, ours, x, labels, indices_tuple=indices_tuple)
    empty = torch.empty(0, dtype=torch.int64)
    assert_same(theirs, ours, x, labels, indices_tuple=(empty, empty, empty))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name):
    theirs = getattr(pml_losses, name)(num_classes=23, embedding_size=6).double()
    ours = getattr(compat, name)(num_classes=23, embedding_size=6).double()
    assert set(theirs.state_dict()) == set(ours.state_dict()) == {"W"}
    assert ours.W.shape == theirs.W.shape == (6, 23 * getattr(theirs, "sub_centers", 1))
    ours.load_state_dict(theirs.state_dict())          # PML -> ours
    assert torch.equal(ours.W, theirs.W)
    fresh = getattr(pml_losses, name)(num_classes=23, embedding_size=6).double()
    fresh.load_state_dict(ours.state_dict())           # ours -> PML
    assert torch.equal(fresh.W, ours.W)
    x, labels = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 23, (9,))
    assert_same(fresh, ours, x, labels)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_matches_pml(name):
    """Same defaults, same attributes (margin as PML stores it), same W initialisation."""
    theirs_cls, ours_cls = getattr(pml_losses, name), getattr(compat, name)

    def defaults(cls):
        for klass in cls.__mro__:  # PML's CosFaceLoss forwards *args to its base class
            params = inspect.signature(klass.__init__).parameters
            if "margin" in params:
                return params["margin"].default, params["scale"].default

    assert defaults(ours_cls) == defaults(theirs_cls)
    torch.manual_seed(5)
    theirs = theirs_cls(num_classes=13, embedding_size=4)
    torch.manual_seed(5)
    ours = ours_cls(num_classes=13, embedding_size=4)
    assert torch.equal(ours.W, theirs.W) and ours.W.dtype == theirs.W.dtype == torch.float32
    assert ours.margin == theirs.margin  # ArcFace: radians, bit for bit; SphereFace: int(margin)
    assert ours.scale == theirs.scale and ours.num_classes == theirs.num_classes
    assert getattr(ours, "sub_centers", None) == getattr(theirs, "sub_centers", None)
    init = lambda w: torch.nn.init.uniform_(w, -0.5, 0.5)  # noqa: E731
    torch.manual_seed(6)
    theirs = theirs_cls(num_classes=13, embedding_size=4, weight_init_func=init)
    torch.manual_seed(6)
    ours = ours_cls(num_classes=13, embedding_size=4, weight_init_func=init)
    assert torch.equal(ours.W, theirs.W)


@pytest.mark.parametrize("name", NAMES)
def test_get_logits_matches_pml(name):
    theirs, ours = make_pair(name, 17, 5, scale=3.0)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert_close(ours.get_logits(x), theirs.get_logits(x), RTOL, "get_logits")


@pytest.mark.parametrize("name", NAMES)
def test_equivalent_options_are_accepted(name):
    """PML's defaults spelled out (CosineSimilarity(), MeanReducer(), collect_stats=False,
    regularizer weights without a regularizer) change nothing."""
    kwargs = dict(distance=CosineSimilarity(), reducer=MeanReducer(), collect_stats=False,
                  weight_reg_weight=3, embedding_reg_weight=2)
    theirs, ours = make_pair(name, 9, 4, **kwargs)
    x, labels = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 9, (7,))
    assert_same(theirs, ours, x, labels)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("option, value", [
    ("distance", LpDistance()),
    ("distance", CosineSimilarity(power=2)),
    ("reducer", SumReducer()),
    ("weight_regularizer", LpRegularizer()),
    ("embedding_regularizer", LpRegularizer()),
    ("collect_stats", True),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_unsupported_options_raise(name, option, value):
    with pytest.raises(ValueError, match=option):
        getattr(compat, name)(10, 4, **{option: value})


@pytest.mark.parametrize("name, kwargs, match", [
    ("ArcFaceLoss", dict(margin=180.0), "margin"),
    ("ArcFaceLoss", dict(margin=-1.0), "margin"),
    ("ArcFaceLoss", dict(margin=float("nan")), "margin"),
    ("ArcFaceLoss", dict(scale=0), "scale"),
    ("CosFaceLoss", dict(scale=float("inf")), "scale"),
    ("CosFaceLoss", dict(margin=float("nan")), "margin"),
    ("SphereFaceLoss", dict(margin=0), "margin"),
    ("SphereFaceLoss", dict(scale=-1.0), "scale"),
])
def test_out_of_range_arguments_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(compat, name)(10, 4, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_and_forward_arguments_raise(name):
    with pytest.raises(TypeError, match="no_such_option"):
        getattr(compat, name)(10, 4, no_such_option=1)
    loss = getattr(compat, name)(10, 4)
    x, labels = torch.randn(3, 4), torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match="labels are required"):
        loss(x)
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, labels, ref_emb=x.clone(), ref_labels=labels)
    with pytest.raises(ValueError, match="Number of embeddings"):
        loss(x, labels[:2])


def test_cosface_margin_and_scale_are_keyword_only_as_in_pml():
    with pytest.raises(TypeError):
        pml_losses.CosFaceLoss(10, 4, 0.2)
    with pytest.raises(TypeError):
        compat.CosFaceLoss(10, 4, 0.2)


@pytest.mark.parametrize("name", NAMES)
def test_weight_follows_embeddings_dtype_as_in_pml(name):
    theirs = getattr(pml_losses, name)(num_classes=9, embedding_size=4)
    ours = getattr(compat, name)(num_classes=9, embedding_size=4)
    ours.load_state_dict(theirs.state_dict())
    x, labels = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 9, (5,))
    param = ours.W
    assert_same(theirs, ours, x, labels)  # both cast their float32 W to float64, in place
    assert ours.W is param and ours.W.dtype == theirs.W.dtype == torch.float64


# ---------------------------------------------------------------------------------------
# Where margin_ops and PML differ (documented in margin_ops.compat.pml).


def test_arcface_gradient_differs_where_sin_theta_is_floored():
    """Row 0's target angle has sin θ < SIN_THETA_EPS: margin_ops floors sin θ in dθ/dc,
    PML does not. The loss agrees (to acos's conditioning near c = 1), the other rows'
    gradients agree to 1e-10, row 0's gradient and its class's W column do not. The same
    construction with sin θ = 1e-3 agrees everywhere (the control)."""
    n, d, c, scale = 5, 6, 7, 4.0
    labels = torch.tensor([0, 1, 2, 3, 4])
    for theta0, differs in ((5e-5, True), (1e-3, False)):
        assert (math.sin(theta0) < SIN_THETA_EPS) == differs
        theirs, ours = make_pair("ArcFaceLoss", c, d, scale=scale)
        theta = torch.tensor([theta0, 0.4, 1.0, 2.0, 2.9], dtype=torch.float64)
        x = embeddings_at_angles(theirs.W, labels, theta)
        if not differs:
            assert_same(theirs, ours, x, labels)
            continue
        (loss, gx, gw), (want_loss, want_gx, want_gw) = (
            loss_and_grads(ours, x, labels), loss_and_grads(theirs, x, labels))
        assert_close(loss, want_loss, 1e-6, "loss")
        assert_close(gx[1:], want_gx[1:], RTOL, "grad embeddings, other rows", atol=RTOL * want_gx.abs().max().item())
        row_err = (gx[0] - want_gx[0]).norm() / want_gx[0].norm()
        col_err = (gw[:, 0] - want_gw[:, 0]).norm() / want_gw[:, 0].norm()
        assert row_err > 1e-2 and col_err > 1e-3, f"expected a difference, got {row_err:.3g}, {col_err:.3g}"


def test_arcface_exactly_parallel_target_is_nan_in_pml_finite_here():
    """c_y = 1 exactly (D = 1): PML's acos' is infinite, its gradient NaN; margin_ops' finite."""
    theirs, ours = make_pair("ArcFaceLoss", 2, 1)
    with torch.no_grad():
        theirs.W.copy_(torch.tensor([[3.0, -1.0]]))
        ours.W.copy_(theirs.W)
    x, labels = torch.tensor([[2.0], [-0.5]], dtype=torch.float64), torch.tensor([0, 1])
    loss, gx, gw = loss_and_grads(ours, x, labels)
    want_loss, want_gx, want_gw = loss_and_grads(theirs, x, labels)
    assert_close(loss, want_loss, RTOL, "loss")
    assert torch.isnan(want_gx).any() or torch.isnan(want_gw).any()
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all(), "margin_ops' gradient must stay finite"


@pytest.mark.parametrize("name", NAMES)
def test_label_minus_100(name):
    """PML's CrossEntropyLoss ignores label -100 (loss 0, still counted in the mean) when
    num_classes >= 100, and raises an IndexError below; margin_ops always ignores it."""
    d, n = 5, 6
    labels = torch.tensor([3, -100, 7, 1, -100, 0])
    x = torch.randn(n, d, dtype=torch.float64)
    theirs, ours = make_pair(name, 120, d)
    assert_same(theirs, ours, x, labels)
    theirs, ours = make_pair(name, 12, d)
    with pytest.raises(IndexError):
        theirs(x, labels)
    loss, gx, _ = loss_and_grads(ours, x, labels)
    keep = labels != -100
    kept, kept_gx, _ = loss_and_grads(ours, x[keep], labels[keep])
    assert_close(loss, kept * keep.sum() / n, RTOL, "loss")
    assert_close(gx[keep], kept_gx * keep.sum() / n, RTOL, "grad")
    assert (gx[~keep] == 0).all()


# ---------------------------------------------------------------------------------------
# SubCenterArcFaceLoss beyond the shared cases above.


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("sub_centers", [1, 2, 5])
def test_subcenter_matches_pml_for_any_sub_centers(sub_centers, backend_name):
    for _ in range(2):
        n, d, c, x, labels = random_problem()
        theirs, ours = make_pair("SubCenterArcFaceLoss", c, d, sub_centers=sub_centers, margin=20.0, scale=16)
        assert ours.W.shape == (d, c * sub_centers) and ours.num_classes == c
        assert_same(theirs, ours, x, labels, backend=backend_name)


def test_subcenter_gradient_reaches_only_the_winning_sub_centers():
    theirs, ours = make_pair("SubCenterArcFaceLoss", 6, 5, sub_centers=4)
    x, labels = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 6, (10,))
    _, _, grad_w = assert_same(theirs, ours, x, labels)[0]
    cosine = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(ours.W.detach(), dim=0)
    winners = cosine.view(10, 6, 4).argmax(dim=2) + 4 * torch.arange(6)  # (N, C) column of each class's winner
    losing = torch.ones(24, dtype=torch.bool)
    losing[winners.flatten()] = False
    assert losing.any() and (grad_w[:, losing] == 0).all()


@pytest.mark.parametrize("threshold", [75, 40, 20, 0])
def test_subcenter_get_outliers_matches_pml(threshold):
    """Same outliers, in PML's order (class, then row); same dominant sub-center for every
    class of the batch (PML leaves the other columns uninitialized: here they are 0)."""
    n, d, c, k = 40, 4, 7, 3
    theirs, ours = make_pair("SubCenterArcFaceLoss", c, d, sub_centers=k)
    x = torch.randn(n, d, dtype=torch.float64)
    labels = torch.randint(0, c - 1, (n,))  # class c - 1 absent
    labels[[3, 11]] = -100  # skipped, as PML's loop over the classes skips them
    got = ours.get_outliers(x, labels, threshold=threshold)
    want = theirs.get_outliers(x, labels, threshold=threshold)
    assert isinstance(got, tuple) and len(got) == 2
    assert got[0].tolist() == want[0].tolist() and got[0].dtype == torch.int64
    present = torch.unique(labels[labels >= 0])
    assert torch.equal(got[1][:, present], want[1][:, present])
    assert (got[1][:, c - 1] == 0).all()
    # return_dominant_centers=False: PML still returns the pair (operator precedence)
    got_flag = ours.get_outliers(x, labels, threshold=threshold, return_dominant_centers=False)
    want_flag = theirs.get_outliers(x, labels, threshold=threshold, return_dominant_centers=False)
    assert isinstance(want_flag, tuple) and isinstance(got_flag, tuple)
    assert got_flag[0].tolist() == want_flag[0].tolist()
    if threshold == 0:  # every row sits below cos 0° = 1: all labelled rows, by class
        keep = torch.nonzero(labels >= 0).squeeze(1)
        assert got[0].tolist() == keep[torch.sort(labels[keep], stable=True).indices].tolist()


def test_subcenter_get_outliers_checks_labels_as_pml():
    ours = compat.SubCenterArcFaceLoss(num_classes=5, embedding_size=4)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="Number of embeddings"):
        ours.get_outliers(x, torch.zeros(5, dtype=torch.int64))
    outliers, centers = ours.get_outliers(x[:0], torch.zeros(0, dtype=torch.int64))
    assert outliers.shape == (0,) and outliers.dtype == torch.int64 and (centers == 0).all()


def test_subcenter_constructor_arguments():
    """margin, scale and sub_centers are keyword-only (PML ignores them silently when passed by
    position, and needs num_classes / embedding_size by keyword); sub_centers >= 1."""
    with pytest.raises(KeyError):
        pml_losses.SubCenterArcFaceLoss(10, 4)
    ours = compat.SubCenterArcFaceLoss(10, 4)  # positional class counts are accepted here
    assert ours.W.shape == (4, 30)
    with pytest.raises(TypeError):
        compat.SubCenterArcFaceLoss(10, 4, 20.0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="sub_centers must be an integer >= 1"):
            compat.SubCenterArcFaceLoss(num_classes=10, embedding_size=4, sub_centers=bad)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        compat.SubCenterArcFaceLoss(num_classes=0, embedding_size=4)
    assert "sub_centers=3" in repr(ours) and "num_classes=10" in repr(ours)
