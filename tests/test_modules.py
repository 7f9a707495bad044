"""The nn.Module heads: margin_ops.ArcFace, CosFace, CombinedMargin, SphereFace."""

import io
import math

import pytest
import torch

import margin_ops

from conftest import assert_close, compare_to_reference, make_inputs

F32, F64 = torch.float32, torch.float64

# (module class, constructor kwargs, op name, op kwargs equivalent to the module's)
HEADS = [
    (margin_ops.ArcFace, dict(s=30.0, m=0.4), "arcface", dict(s=30.0, m=0.4)),
    (margin_ops.ArcFace, dict(easy_margin=True, margin_grad="detach", reduction="sum"), "arcface",
     dict(easy_margin=True, margin_grad="detach", reduction="sum")),
    (margin_ops.CosFace, dict(s=20.0, m=0.3, reduction="none"), "cosface", dict(s=20.0, m=0.3, reduction="none")),
    (margin_ops.CombinedMargin, dict(m1=0.9, m2=0.4, m3=0.1, ignore_index=-1), "combined",
     dict(m1=0.9, m2=0.4, m3=0.1, ignore_index=-1)),
    # eval mode: λ of iteration 0 = lambda_max (not advanced)
    (margin_ops.SphereFace, dict(m=3, gamma=1.0), "sphereface", dict(m=3, lamb=1500.0, gamma=1.0)),
    (margin_ops.ArcFace, dict(s=30.0, subcenters=3, label_smoothing=0.1), "arcface",
     dict(s=30.0, subcenters=3, label_smoothing=0.1)),
    (margin_ops.CosFace, dict(subcenters=2, label_smoothing=0.2, reduction="none"), "cosface",
     dict(subcenters=2, label_smoothing=0.2, reduction="none")),
    (margin_ops.SphereFace, dict(m=2, label_smoothing=0.1), "sphereface", dict(m=2, lamb=1500.0, label_smoothing=0.1)),
]


def head_id(h):
    return f"{h[0].__name__}-{'-'.join(f'{k}={v}' for k, v in h[1].items())}"


@pytest.mark.parametrize("cls", [margin_ops.ArcFace, margin_ops.CosFace, margin_ops.CombinedMargin,
                                 margin_ops.SphereFace, margin_ops.AdaFace, margin_ops.MagFace,
                                 margin_ops.ElasticFace, margin_ops.CurricularFace])
def test_weight_shape_and_init(cls):
    head = cls(64, 1000)
    assert head.weight.shape == (1000, 64)
    assert isinstance(head.weight, torch.nn.Parameter) and head.weight.requires_grad
    # N(0, 0.01²) over 64k entries: the sample std is within 2% of 0.01 (σ/√(2n) ≈ 0.3%)
    std, mean = head.weight.std().item(), head.weight.mean().item()
    assert abs(std - 0.01) < 2e-4, std
    assert abs(mean) < 2e-4, mean  # 5 standard errors (0.01 / √64000 = 4e-5)
    w_before = head.weight.detach().clone()
    head.reset_parameters()
    assert not torch.equal(head.weight, w_before), "reset_parameters draws fresh weights"
    head64 = cls(8, 5, dtype=F64)
    assert head64.weight.dtype == F64


@pytest.mark.parametrize("head_spec", HEADS, ids=head_id)
def test_forward_equals_functional_op(head_spec):
    cls, kwargs, name, op_kwargs = head_spec
    head = cls(12, 17, **kwargs)
    if cls is margin_ops.SphereFace:
        head.eval()
    with torch.no_grad():
        head.weight.normal_()  # unit-scale weights (the 0.01 init only sets directions anyway)
    x, _, y = make_inputs(6, 12, 17, F32, ignore_rows=(2,), ignore_index=op_kwargs.get("ignore_index", -100))
    with margin_ops.backend("cpu"):
        loss = head(x, y)
        expected = getattr(torch.ops.margin, name)(x, head.weight, y, **op_kwargs)
    assert torch.equal(loss, expected)
    # gradients reach the head's weight and the features, and match the reference
    loss.sum().backward()
    assert head.weight.grad is not None and x.grad is not None
    compare_to_reference(name, x, head.weight, y, **op_kwargs)


@pytest.mark.parametrize("head_spec", HEADS, ids=head_id)
def test_return_stats(head_spec):
    cls, kwargs, name, op_kwargs = head_spec
    head = cls(12, 17, **kwargs).eval()
    x, _, y = make_inputs(6, 12, 17, F32, ignore_index=op_kwargs.get("ignore_index", -100))
    with margin_ops.backend("cpu"):
        out = head(x, y, return_stats=True)
        expected = margin_ops.with_stats(name, x, head.weight, y, **op_kwargs)
    assert isinstance(out, margin_ops.MarginOutput)
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.lse, expected.lse)
    assert torch.equal(out.pred, expected.pred)
    cos = torch.nn.functional.normalize(x.detach().double()) @ torch.nn.functional.normalize(
        head.weight.detach().double()).t()
    class_cos = cos.view(x.shape[0], head.num_classes, head.subcenters).max(dim=2).values
    assert torch.equal(out.pred, class_cos.argmax(1))


def _lamb(it, lambda_min=5.0, lambda_max=1500.0):
    return max(lambda_min, lambda_max / (1 + 0.1 * it))


def test_sphereface_lambda_schedule():
    head = margin_ops.SphereFace(10, 13, m=4)
    x, _, y = make_inputs(5, 10, 13, F32)
    assert int(head.iteration) == 0
    assert head.lamb == _lamb(0)
    with margin_ops.backend("cpu"):
        for it in range(1, 4):
            loss = head(x, y)  # training mode: iteration advances before λ is taken
            assert int(head.iteration) == it
            assert head.lamb == pytest.approx(_lamb(it))
            expected = torch.ops.margin.sphereface(x, head.weight, y, m=4, lamb=_lamb(it))
            assert torch.equal(loss, expected), it
        head.eval()
        loss = head(x, y)
        assert int(head.iteration) == 3, "eval forwards do not advance the schedule"
        assert torch.equal(loss, torch.ops.margin.sphereface(x, head.weight, y, m=4, lamb=_lamb(3)))
        with torch.no_grad():
            head(x, y)
        assert int(head.iteration) == 3
    # far along the schedule λ reaches its floor lambda_min
    head.iteration.fill_(10**6)
    assert head.lamb == 5.0
    # custom bounds
    custom = margin_ops.SphereFace(10, 13, lambda_min=1.0, lambda_max=100.0)
    custom.iteration.fill_(50)
    assert custom.lamb == pytest.approx(_lamb(50, 1.0, 100.0))


def test_sphereface_state_dict_restores_iteration():
    head = margin_ops.SphereFace(10, 13, m=2, s=None)
    x, _, y = make_inputs(5, 10, 13, F32)
    with margin_ops.backend("cpu"):
        for _ in range(7):
            head(x, y)
    assert "iteration" in head.state_dict()
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    fresh = margin_ops.SphereFace(10, 13, m=2, s=None)
    assert int(fresh.iteration) == 0
    fresh.load_state_dict(torch.load(buffer))
    assert int(fresh.iteration) == 7 and fresh.lamb == head.lamb
    assert torch.equal(fresh.weight, head.weight)
    head.eval(), fresh.eval()
    with margin_ops.backend("cpu"):
        assert torch.equal(fresh(x, y), head(x, y))


@pytest.mark.parametrize("cls,kwargs", [(margin_ops.ArcFace, dict(s=16.0, m=0.3)), (margin_ops.CosFace, dict(s=16.0)),
                                        (margin_ops.CombinedMargin, dict(s=16.0, m2=0.2, m3=0.1)),
                                        (margin_ops.SphereFace, dict(m=2, s=8.0)),
                                        (margin_ops.ArcFace, dict(s=16.0, m=0.3, subcenters=3)),
                                        (margin_ops.AdaFace, dict(s=16.0)), (margin_ops.MagFace, dict(s=16.0)),
                                        (margin_ops.ElasticFace, dict(s=16.0, m=0.3, plus=True)),
                                        (margin_ops.CurricularFace, dict(s=16.0, m=0.3))])
def test_optimizer_steps_reduce_the_loss(cls, kwargs):
    head = cls(16, 10, **kwargs)
    features = torch.nn.Linear(16, 16)
    x, _, y = make_inputs(32, 16, 10, F32, requires_grad=False)
    params = list(head.parameters()) + list(features.parameters())
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    losses = []
    with margin_ops.backend("cpu"):
        for _ in range(15):
            opt.zero_grad()
            loss = head(features(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        margin_ops.ArcFace(8, 0)
    with pytest.raises(ValueError, match="reduction"):
        margin_ops.CosFace(8, 3, reduction="avg")
    with pytest.raises(ValueError, match="m must be an integer"):
        margin_ops.SphereFace(8, 3, m=0)
    with pytest.raises(ValueError, match="lambda_max must be >= 0"):
        margin_ops.SphereFace(8, 3, lambda_max=-1.0)
    # the error names the argument the user passed, not the λ it feeds
    with pytest.raises(ValueError, match=r"^lambda_min must be >= 0, got -1"):
        margin_ops.SphereFace(8, 3, lambda_min=-1.0)
    with pytest.raises(ValueError, match=r"^lambda_min must be a finite number"):
        margin_ops.SphereFace(8, 3, lambda_min=float("nan"))
    with pytest.raises(ValueError, match=r"m must lie in \[0, π\)"):
        margin_ops.ArcFace(8, 3, m=4.0)
    with pytest.raises(ValueError, match=r"m must be an integer >= 1, got True"):
        margin_ops.SphereFace(8, 3, m=True)


def test_sphereface_schedule_does_not_advance_when_forward_raises():
    """A training forward that raises (here: a label out of range) leaves the iteration
    counter, and so λ, where it was; the next good step uses the λ it would have used."""
    head = margin_ops.SphereFace(6, 9)
    x, _, y = make_inputs(4, 6, 9, F32)
    bad = y.clone()
    bad[0] = 42
    with margin_ops.backend("cpu"):
        head(x, y)
        for _ in range(3):
            with pytest.raises(ValueError, match="labels must lie in"):
                head(x, bad)
        assert int(head.iteration) == 1
        loss = head(x, y)
        assert int(head.iteration) == 2
        assert torch.equal(loss, torch.ops.margin.sphereface(x, head.weight, y, m=4, lamb=_lamb(2)))


def test_module_float64_and_repr():
    head = margin_ops.CombinedMargin(6, 9, dtype=F64)
    x, _, y = make_inputs(4, 6, 9, F64)
    with margin_ops.backend("cpu"):
        loss = head(x, y)
    assert loss.dtype == F64
    assert_close(loss, margin_ops.reference.combined(x, head.weight, y), 1e-10, "float64 module")
    assert "num_classes=9" in repr(head) and "embedding_size=6" in repr(head)


# ---------------------------------------------------------------------------------------
# The margin family v2 heads against their official code.
#
# Each official head is restated below, compactly, from its repository (the logits
# materialized, float64, weight in margin_ops' (C, D) layout: the official `kernel` is
# weight.t()), and the loss is F.cross_entropy of those logits (label_smoothing as given).
# The modules run on the default backend. Float64 throughout: both sides are exact to
# ~1e-15 relative away from |cos| = 1, so RTOL leaves two orders of magnitude of room for
# the differently ordered sums (acos/cos round trips, the fused log-sum-exp).

RTOL = 1e-10
Fn = torch.nn.functional


def unit_rows(t):
    return t / t.norm(dim=1, keepdim=True)


def one_hot(labels, num_classes, dtype=F64):
    return torch.zeros(labels.shape[0], num_classes, dtype=dtype).scatter(1, labels[:, None], 1.0)


def official_adaface(x, weight, labels, batch_mean, batch_std, *, m=0.4, h=0.333, s=64.0, t_alpha=0.01,
                     training=True):
    """mk-minchul/AdaFace head.py, AdaFace.forward (the backbone hands it x/‖x‖ and ‖x‖).
    Returns (logits (N, C), batch_mean, batch_std)."""
    norms = x.norm(dim=1, keepdim=True)
    eps = 1e-3
    cosine = ((x / norms) @ unit_rows(weight).t()).clamp(-1 + eps, 1 - eps)
    safe_norms = torch.clip(norms, min=0.001, max=100).detach()
    if training:
        batch_mean = safe_norms.mean() * t_alpha + (1 - t_alpha) * batch_mean
        batch_std = safe_norms.std() * t_alpha + (1 - t_alpha) * batch_std
    margin_scaler = torch.clip((safe_norms - batch_mean) / (batch_std + eps) * h, -1, 1)
    hot = one_hot(labels, weight.shape[0])
    theta_m = torch.clip(cosine.acos() + hot * (m * margin_scaler * -1), min=eps, max=math.pi - eps)
    logits = (theta_m.cos() - hot * (m + m * margin_scaler)) * s
    return logits, batch_mean, batch_std


def official_magface(x, weight, labels, *, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                     label_smoothing=0.0):
    """IrvingMeng/MagFace models/magface.py: MagLinear.forward (easy_margin=False, the
    InsightFace fallback the issue specifies; the official default is easy_margin=True)
    then MagLoss.forward, loss_id + lambda_g·loss_g as run/trainer.py sums them."""
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = (Fn.normalize(x) @ Fn.normalize(weight.t(), dim=0)).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    mm = torch.sin(math.pi - ada_margin) * ada_margin
    cos_theta_m = torch.where(cos_theta > torch.cos(math.pi - ada_margin), cos_theta_m, cos_theta - mm)
    hot = one_hot(labels, weight.shape[0])
    output = hot * (s * cos_theta_m) + (1.0 - hot) * (s * cos_theta)
    loss_g = torch.mean(1 / (u_a ** 2) * x_norm + 1 / x_norm)
    return Fn.cross_entropy(output, labels, label_smoothing=label_smoothing) + lambda_g * loss_g


def official_elasticface(x, weight, labels, margin, *, s=64.0, kind="arc", plus=False):
    """fdbtrs/ElasticFace utils/losses.py: ElasticArcFace / ElasticCosFace.forward, every
    row labelled, with the (N, 1) draws ``margin`` of its torch.normal(mean=m, std=std, ...)."""
    cos_theta = (unit_rows(x) @ unit_rows(weight).t()).clamp(-1, 1)
    if plus:
        distmat = cos_theta[torch.arange(len(labels)), labels].detach().clone()
        _, idicate_cosie = torch.sort(distmat, dim=0, descending=True)
        margin, _ = torch.sort(margin, dim=0)
        margin = margin[idicate_cosie]
    m_hot = torch.zeros_like(cos_theta).scatter(1, labels[:, None], margin.to(cos_theta.dtype))
    if kind == "arc":
        return (cos_theta.acos() + m_hot).cos() * s
    return (cos_theta - m_hot) * s


def official_curricularface(x, weight, labels, t, *, s=64.0, m=0.5, update=True):
    """HuangYG123/CurricularFace head/metrics.py, CurricularFace.forward (in-place updates
    written out of place; ``update=False``: without its update of t, which it always runs).
    Returns (logits (N, C), t, the number of hard examples among the non-targets)."""
    cos_theta = (unit_rows(x) @ unit_rows(weight).t()).clamp(-1, 1)
    target_logit = cos_theta[torch.arange(x.shape[0]), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
    cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(target_logit > math.cos(math.pi - m), cos_theta_m,
                                     target_logit - math.sin(math.pi - m) * m)
    if update:
        with torch.no_grad():
            t = target_logit.mean() * 0.01 + (1 - 0.01) * t
    hard = int((mask & (one_hot(labels, weight.shape[0]) == 0)).sum())
    cos_theta = torch.where(mask, cos_theta * (t + cos_theta), cos_theta)
    cos_theta = cos_theta.scatter(1, labels.view(-1, 1), final_target_logit)
    return cos_theta * s, t, hard


def official_subcenter_logits(x, weight, labels, subcenters, phi, s):
    """Sub-center ArcFace as pytorch-metric-learning's SubCenterArcFaceLoss.get_cosine
    computes it (cosines (N, C·K) viewed (N, C, K), max over K), target replaced by phi(c)."""
    cosine = (unit_rows(x) @ unit_rows(weight).t()).view(x.shape[0], -1, subcenters).max(dim=2).values
    target = cosine.gather(1, labels[:, None])
    return cosine.scatter(1, labels[:, None], phi(target)) * s


def grads(loss, *leaves):
    return torch.autograd.grad(loss.sum(), leaves)


def spread_inputs(n=12, d=8, c=10, norms=None):
    """float64 features with given row norms (default: random in [0.5, 3]·√d) and unit-scale
    weights; |cos| stays far from 1 at these sizes (checked: acos' is tame there)."""
    x, weight, labels = make_inputs(n, d, c, F64, requires_grad=False)
    if norms is not None:
        x = unit_rows(x) * torch.as_tensor(norms, dtype=F64)[:, None]
    assert (unit_rows(x) @ unit_rows(weight).t()).abs().max() < 0.99
    return x, weight, labels


def head_with(cls, weight, *args, **kwargs):
    head = cls(weight.shape[1], weight.shape[0] // kwargs.get("subcenters", 1), *args, dtype=F64, **kwargs)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_adaface_matches_official_over_training_steps(label_smoothing):
    """Three training steps (the buffers move), then one in eval mode (they stay)."""
    x, weight, labels = spread_inputs(norms=torch.linspace(2.0, 60.0, 12))
    head = head_with(margin_ops.AdaFace, weight, m=0.4, h=0.333, s=32.0, t_alpha=0.3,
                     label_smoothing=label_smoothing)
    batch_mean, batch_std = torch.tensor([20.0], dtype=F64), torch.tensor([100.0], dtype=F64)
    for step in range(4):
        training = step < 3
        head.train(training)
        xs = (x * (1 + 0.5 * step)).requires_grad_()  # the norms change from step to step
        loss = head(xs, labels)
        want_x, want_w = xs.detach().clone().requires_grad_(), weight.clone().requires_grad_()
        logits, batch_mean, batch_std = official_adaface(want_x, want_w, labels, batch_mean, batch_std, m=0.4,
                                                         h=0.333, s=32.0, t_alpha=0.3, training=training)
        want = Fn.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        assert_close(loss, want, RTOL, f"loss, step {step}")
        for got_g, want_g, what in zip(grads(loss, xs, head.weight), grads(want, want_x, want_w), ("x", "weight")):
            assert_close(got_g, want_g, RTOL, f"grad {what}, step {step}")
        assert_close(head.batch_mean, batch_mean.reshape(1), RTOL, f"batch_mean, step {step}")
        assert_close(head.batch_std, batch_std.reshape(1), RTOL, f"batch_std, step {step}")
    assert head.batch_mean.item() != 20.0 and head.batch_std.item() != 100.0


def test_adaface_statistics_skip_ignored_rows_and_tiny_batches():
    x, weight, labels = spread_inputs(norms=torch.linspace(2.0, 60.0, 12))
    labels[[1, 4, 5]] = -100
    keep = labels != -100
    head = head_with(margin_ops.AdaFace, weight, t_alpha=0.5)
    loss = head(x, labels)
    logits, mean, std = official_adaface(x[keep], weight, labels[keep], 20.0, 100.0, t_alpha=0.5)
    assert_close(loss, Fn.cross_entropy(logits, labels[keep]), RTOL, "loss over the kept rows")
    assert_close(head.batch_mean, mean.reshape(1), RTOL, "batch_mean from the kept rows")
    assert_close(head.batch_std, std.reshape(1), RTOL, "batch_std from the kept rows")
    # one labelled row: the mean moves, the (undefined) std stays; none: both stay
    before_std = head.batch_std.clone()
    head(x[:1], labels[:1])
    assert head.batch_mean.item() == pytest.approx(0.5 * x[0].norm().item() + 0.5 * mean.item(), rel=1e-12)
    assert torch.equal(head.batch_std, before_std)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    assert head(x[:0], labels[:0]).item() == 0.0
    assert head(x[1:2], labels[1:2]).item() == 0.0  # only an ignored row
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_magface_matches_official_with_its_gradient_through_the_margin():
    """Norms below l_a, inside (l_a, u_a) and above u_a: the margin m(‖x‖) carries gradient
    inside, none where the clamp is active; both as the official autograd graph."""
    norms = [5.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0, 105.0, 120.0, 20.0, 40.0, 80.0]
    x, weight, labels = spread_inputs(norms=norms)
    kwargs = dict(s=32.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)
    for label_smoothing in (0.0, 0.1):
        head = head_with(margin_ops.MagFace, weight, label_smoothing=label_smoothing, **kwargs)
        xs = x.clone().requires_grad_()
        loss = head(xs, labels)
        want_x, want_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        want = official_magface(want_x, want_w, labels, label_smoothing=label_smoothing, **kwargs)
        assert_close(loss, want, RTOL, "loss")
        got_gx, got_gw = grads(loss, xs, head.weight)
        want_gx, want_gw = grads(want, want_x, want_w)
        assert_close(got_gx, want_gx, RTOL, "grad x")
        assert_close(got_gw, want_gw, RTOL, "grad weight")
    # The margin's share of the gradient is not negligible: with m(a) detached the
    # gradient along x_i (the norm direction) misses it.
    head.margin = lambda a: margin_ops.MagFace.margin(head, a.detach())
    xs = x.clone().requires_grad_()
    detached_gx, = grads(head(xs, labels), xs)
    radial = lambda g: (g * unit_rows(x)).sum(1)  # noqa: E731
    inside = (torch.tensor(norms) > 10.0) & (torch.tensor(norms) < 110.0)
    assert (radial(detached_gx)[inside] - radial(want_gx)[inside]).abs().min() > 1e-3
    assert_close(detached_gx[~inside], want_gx[~inside], RTOL, "clamped rows: no margin gradient",
                 atol=RTOL * want_gx.abs().max().item())


ELASTIC = [("arc", False), ("arc", True), ("cos", False), ("cos", True)]


@pytest.mark.parametrize("kind,plus", ELASTIC, ids=lambda v: str(v))
def test_elasticface_matches_official(kind, plus):
    """Same seed, same draws: the module's training step is the official one, margins and all
    (std large enough that the draws differ visibly, ElasticFace+'s ordering included)."""
    x, weight, labels = spread_inputs()
    m, std = (0.5 if kind == "arc" else 0.35), 0.1
    head = head_with(margin_ops.ElasticFace, weight, s=32.0, m=m, std=std, kind=kind, plus=plus,
                     label_smoothing=0.05)
    torch.manual_seed(1234)
    xs = x.clone().requires_grad_()
    loss = head(xs, labels)
    torch.manual_seed(1234)
    margin = torch.normal(mean=m, std=std, size=labels[:, None].size())  # the official call
    want_x, want_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = official_elasticface(want_x, want_w, labels, margin, s=32.0, kind=kind, plus=plus)
    want = Fn.cross_entropy(logits, labels, label_smoothing=0.05)
    assert_close(loss, want, RTOL, "loss")
    for got_g, want_g, what in zip(grads(loss, xs, head.weight), grads(want, want_x, want_w), ("x", "weight")):
        assert_close(got_g, want_g, RTOL, f"grad {what}")


@pytest.mark.parametrize("kind,plus", ELASTIC, ids=lambda v: str(v))
def test_elasticface_ignored_rows(kind, plus):
    """Ignored rows: the kept rows get the margins the official gives them, with the draws of
    their rows (ElasticFace+ sorts among the kept rows only)."""
    x, weight, labels = spread_inputs()
    labels[[0, 3, 4, 9]] = -1
    keep = labels != -1
    head = head_with(margin_ops.ElasticFace, weight, s=32.0, std=0.1, kind=kind, plus=plus, ignore_index=-1)
    torch.manual_seed(7)
    loss = head(x, labels)
    torch.manual_seed(7)
    margin = torch.normal(mean=0.5, std=0.1, size=labels[:, None].size())
    want = Fn.cross_entropy(official_elasticface(x[keep], weight, labels[keep], margin[keep], s=32.0, kind=kind,
                                                 plus=plus), labels[keep])
    assert_close(loss, want, RTOL, "loss over the kept rows")


def test_elasticface_seed_reproducibility_and_eval():
    x, weight, labels = spread_inputs()
    head = head_with(margin_ops.ElasticFace, weight, std=0.05, plus=True)
    losses = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        losses.append(head(x, labels))
    assert torch.equal(losses[0], losses[1]), "torch.manual_seed reproduces the margins"
    assert not torch.equal(losses[0], losses[2])
    # eval: margin m on every row, no draw (the global generator does not move)
    head.eval()
    state = torch.get_rng_state()
    got = head(x, labels)
    assert torch.equal(torch.get_rng_state(), state)
    margin = torch.full((x.shape[0], 1), 0.5, dtype=F64)
    assert_close(got, Fn.cross_entropy(official_elasticface(x, weight, labels, margin), labels), RTOL, "eval loss")
    cos_head = head_with(margin_ops.ElasticFace, weight, m=0.35, kind="cos").eval()
    assert_close(cos_head(x, labels), torch.ops.margin.cosface(x, weight, labels, m=0.35), RTOL,
                 "eval ElasticFace-Cos is CosFace")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_curricularface_matches_official_over_training_steps(label_smoothing):
    """Three training steps (t moves; large s·m so that hard examples exist), then eval (t stays)."""
    x, weight, labels = spread_inputs(n=16, c=6)
    head = head_with(margin_ops.CurricularFace, weight, s=16.0, m=0.6, label_smoothing=label_smoothing)
    head.t.fill_(0.3)  # a t that changes the hard logits visibly from the first step
    t = torch.tensor([0.3], dtype=F64)
    hard_seen = 0
    for step in range(4):
        training = step < 3
        head.train(training)
        xs = (x + 0.3 * step * weight[labels]).requires_grad_()  # the target cosines grow
        loss = head(xs, labels)
        want_x, want_w = xs.detach().clone().requires_grad_(), weight.clone().requires_grad_()
        logits, t, hard = official_curricularface(want_x, want_w, labels, t, s=16.0, m=0.6, update=training)
        hard_seen += hard
        want = Fn.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        assert_close(loss, want, RTOL, f"loss, step {step}")
        for got_g, want_g, what in zip(grads(loss, xs, head.weight), grads(want, want_x, want_w), ("x", "weight")):
            assert_close(got_g, want_g, RTOL, f"grad {what}, step {step}")
        assert_close(head.t, t.reshape(1), RTOL, f"t, step {step}")
    assert hard_seen >= 4, "hard examples were modulated"


def test_curricularface_t_from_kept_rows():
    x, weight, labels = spread_inputs(n=16, c=6)
    labels[[2, 7]] = -100
    keep = labels != -100
    head = head_with(margin_ops.CurricularFace, weight, s=16.0, m=0.6)
    loss = head(x, labels)
    logits, t, _ = official_curricularface(x[keep], weight, labels[keep], torch.zeros(1, dtype=F64), s=16.0, m=0.6)
    assert_close(loss, Fn.cross_entropy(logits, labels[keep]), RTOL, "loss over the kept rows")
    assert_close(head.t, t.reshape(1), RTOL, "t from the kept rows")
    before = head.t.clone()
    assert head(x[2:3], labels[2:3]).item() == 0.0  # only an ignored row: t stays
    assert torch.equal(head.t, before)


# (class, kwargs) of every stateful v2 head, in float64, with the buffers it owns
STATEFUL = [(margin_ops.AdaFace, dict(t_alpha=0.5), ("batch_mean", "batch_std")),
            (margin_ops.CurricularFace, dict(s=16.0), ("t",))]


@pytest.mark.parametrize("cls,kwargs,buffers", STATEFUL, ids=lambda v: getattr(v, "__name__", None))
def test_buffers_train_eval_and_state_dict(cls, kwargs, buffers):
    x, weight, labels = spread_inputs(norms=torch.linspace(2.0, 60.0, 12))
    head = head_with(cls, weight, **kwargs)
    initial = {name: getattr(head, name).clone() for name in buffers}
    head.eval()
    eval_loss = head(x, labels)
    with torch.no_grad():
        head(x, labels)
    for name in buffers:
        assert torch.equal(getattr(head, name), initial[name]), f"eval forwards leave {name}"
    head.train()
    for _ in range(3):
        train_loss = head(x, labels)
    assert not torch.equal(train_loss, eval_loss)
    for name in buffers:
        assert not torch.equal(getattr(head, name), initial[name]), f"training forwards update {name}"
    assert set(buffers) <= set(head.state_dict())
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    fresh = head_with(cls, torch.zeros_like(weight), **kwargs)
    fresh.load_state_dict(torch.load(buffer))
    for name in buffers:
        assert torch.equal(getattr(fresh, name), getattr(head, name))
    head.eval(), fresh.eval()
    assert torch.equal(fresh(x, labels), head(x, labels))
    # A training forward that raises (a label out of range) leaves the buffers as they were.
    head.train()
    state = {name: getattr(head, name).clone() for name in buffers}
    bad = labels.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match="labels must lie in"):
        head(x, bad)
    for name in buffers:
        assert torch.equal(getattr(head, name), state[name]), name


# (class, kwargs, op name, op kwargs without label_smoothing) of the heads that are one op call
SINGLE_OP = [
    (margin_ops.ArcFace, dict(s=16.0, subcenters=2), "arcface", dict(s=16.0, subcenters=2)),
    (margin_ops.CosFace, dict(s=16.0), "cosface", dict(s=16.0)),
    (margin_ops.CombinedMargin, dict(s=16.0, m1=0.9, m3=0.1, subcenters=3), "combined",
     dict(s=16.0, m1=0.9, m3=0.1, subcenters=3)),
    (margin_ops.SphereFace, dict(m=2, s=8.0), "sphereface", dict(m=2, lamb=1500.0, s=8.0)),  # eval: λ = lambda_max
]


@pytest.mark.parametrize("cls,kwargs,name,op_kwargs", SINGLE_OP, ids=lambda v: getattr(v, "__name__", None))
def test_label_smoothing_zero_is_no_smoothing(cls, kwargs, name, op_kwargs):
    x, weight, labels = spread_inputs(c=12)
    labels = labels % (12 // kwargs.get("subcenters", 1))
    labels[1] = -100
    head = head_with(cls, weight, label_smoothing=0.0, **kwargs).eval()
    assert torch.equal(head(x, labels), getattr(torch.ops.margin, name)(x, weight, labels, **op_kwargs))
    smoothed = head_with(cls, weight, label_smoothing=0.2, **kwargs).eval()
    assert torch.equal(smoothed(x, labels),
                       getattr(torch.ops.margin, name)(x, weight, labels, label_smoothing=0.2, **op_kwargs))


def _arcface_phi(m):
    """InsightFace's ArcFace target (with its fallback) on target cosines c."""
    return lambda c: torch.where(c > math.cos(math.pi - m), torch.cos(c.acos() + m), c - m * math.sin(m))


# (class, kwargs, φ of the official sub-center head)
SUBCENTER_HEADS = [
    (margin_ops.ArcFace, dict(m=0.5), _arcface_phi(0.5)),
    (margin_ops.CosFace, dict(m=0.35), lambda c: c - 0.35),
    (margin_ops.CombinedMargin, dict(m1=0.9, m2=0.3, m3=0.1), lambda c: torch.cos(0.9 * c.acos() + 0.3) - 0.1),
]


@pytest.mark.parametrize("cls,kwargs,phi", SUBCENTER_HEADS, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("subcenters", [1, 3])
def test_subcenters_match_official(cls, kwargs, phi, subcenters):
    """weight (C·K, D), row c·K + k sub-center k of class c; class cosine = the largest of
    its K; gradients to the winning sub-center only; pred a class id. K = 1 is the plain head."""
    x, weight, labels = spread_inputs(c=10 * subcenters)
    labels = labels % 10
    labels[2] = -100
    keep = labels != -100
    head = head_with(cls, weight, s=16.0, subcenters=subcenters, label_smoothing=0.1, **kwargs)
    assert head.weight.shape == (10 * subcenters, 8) and head.num_classes == 10
    xs = x.clone().requires_grad_()
    out = head(xs, labels, return_stats=True)
    want_x, want_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = official_subcenter_logits(want_x, want_w, labels.clamp_min(0), subcenters, phi, 16.0)
    want = Fn.cross_entropy(logits[keep], labels[keep], label_smoothing=0.1)
    assert_close(out.loss, want, RTOL, "loss")
    got_gx, got_gw = grads(out.loss, xs, head.weight)
    want_gx, want_gw = grads(want, want_x, want_w)
    assert_close(got_gx, want_gx, RTOL, "grad x")
    assert_close(got_gw, want_gw, RTOL, "grad weight")
    cosine = (unit_rows(x) @ unit_rows(weight).t()).view(x.shape[0], 10, subcenters)
    assert torch.equal(out.pred, cosine.max(dim=2).values.argmax(dim=1))
    if subcenters > 1:  # the losing sub-centers of every class get no gradient
        read = torch.zeros(10 * subcenters, dtype=torch.bool)
        read[(torch.arange(10) * subcenters)[:, None] + cosine.argmax(dim=2).T] = True  # winners of some row
        assert (got_gw[~read] == 0).all()
    else:  # K = 1 is the head without sub-centers, bit for bit
        plain = head_with(cls, weight, s=16.0, label_smoothing=0.1, **kwargs)
        assert torch.equal(plain(x, labels), out.loss.detach())


def test_v2_heads_return_stats():
    x, weight, labels = spread_inputs(norms=torch.linspace(2.0, 60.0, 12))
    labels[0] = -100
    cosine = unit_rows(x) @ unit_rows(weight).t()
    heads = [head_with(margin_ops.AdaFace, weight), head_with(margin_ops.MagFace, weight),
             head_with(margin_ops.ElasticFace, weight), head_with(margin_ops.CurricularFace, weight)]
    for head in heads:
        head.eval()
        out = head(x, labels, return_stats=True)
        assert isinstance(out, margin_ops.MarginOutput), type(head).__name__
        assert torch.equal(out.loss, head(x, labels))
        assert torch.equal(out.pred, cosine.argmax(1))
        assert out.lse.shape == (12,) and torch.isfinite(out.lse).all()
    for reduction in ("sum", "none"):  # MagFace's regularizer follows the reduction
        head = head_with(margin_ops.MagFace, weight, reduction=reduction)
        per_row = head_with(margin_ops.MagFace, weight, reduction="none")(x, labels)
        assert per_row[0] == 0 and per_row.shape == (12,)
        got = head(x, labels)
        assert_close(got, per_row if reduction == "none" else per_row.sum(), RTOL, f"MagFace {reduction}")
    mean = head_with(margin_ops.MagFace, weight)(x, labels)
    assert_close(mean, per_row.sum() / 11, RTOL, "MagFace mean over the kept rows")


@pytest.mark.parametrize("cls,kwargs,match", [
    (margin_ops.AdaFace, dict(m=float("nan")), "^m must be a finite number"),
    (margin_ops.AdaFace, dict(h=-0.1), "^h must be >= 0"),
    (margin_ops.AdaFace, dict(s=0.0), "^s must be > 0"),
    (margin_ops.AdaFace, dict(t_alpha=1.5), r"^t_alpha must lie in \[0, 1\]"),
    (margin_ops.AdaFace, dict(label_smoothing=1.5), r"^label_smoothing must lie in \[0, 1\]"),
    (margin_ops.MagFace, dict(l_a=0.0), "^l_a must be > 0"),
    (margin_ops.MagFace, dict(l_a=50.0, u_a=20.0), "^u_a must be > l_a"),
    (margin_ops.MagFace, dict(u_m=4.0), r"^u_m must lie in \[0, π\)"),
    (margin_ops.MagFace, dict(l_m=-0.1), r"^l_m must lie in \[0, π\)"),
    (margin_ops.MagFace, dict(lambda_g=-1.0), "^lambda_g must be >= 0"),
    (margin_ops.ElasticFace, dict(kind="sphere"), "^kind must be one of 'arc', 'cos'"),
    (margin_ops.ElasticFace, dict(m=3.5), r"^m must lie in \[0, π\)"),
    (margin_ops.ElasticFace, dict(std=-0.01), "^std must be >= 0"),
    (margin_ops.ElasticFace, dict(plus=1), "^plus must be a bool"),
    (margin_ops.CurricularFace, dict(m=-0.5), r"^m must lie in \[0, π\)"),
    (margin_ops.CurricularFace, dict(s=float("inf")), "^s must be a finite number"),
    (margin_ops.CurricularFace, dict(reduction="avg"), "^reduction must be one of"),
    (margin_ops.ArcFace, dict(subcenters=0), "^subcenters must be an integer >= 1"),
    (margin_ops.CosFace, dict(subcenters=2.0), "^subcenters must be an integer >= 1"),
    (margin_ops.CombinedMargin, dict(label_smoothing=-0.1), r"^label_smoothing must lie in \[0, 1\]"),
    (margin_ops.SphereFace, dict(label_smoothing=float("nan")), "^label_smoothing must be a finite number"),
], ids=lambda v: getattr(v, "__name__", None))
def test_v2_bad_constructor_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(8, 5, **kwargs)


def test_v2_bad_forward_arguments():
    head = margin_ops.ArcFace(8, 5, subcenters=3)
    x, _, labels = make_inputs(4, 8, 5, F32)
    with pytest.raises(ValueError, match="labels must lie in"):
        head(x, labels + 5)  # a class id in [5, 15): a sub-center row, not a class
    for cls in (margin_ops.AdaFace, margin_ops.MagFace, margin_ops.ElasticFace, margin_ops.CurricularFace):
        head = cls(8, 5)
        with pytest.raises(ValueError, match="x must be a 2-D tensor"):
            head(x[0], labels)
        with pytest.raises(ValueError, match="weight must be"):
            head(x[:, :4], labels)
        with pytest.raises(TypeError, match="labels must be int64"):
            head(x, labels.int())


def test_v2_modules_float32_and_repr():
    """float32 (the usual training dtype) against the float64 module on the same inputs."""
    x, weight, labels = spread_inputs(norms=torch.linspace(2.0, 60.0, 12))
    for cls, kwargs in ((margin_ops.AdaFace, {}), (margin_ops.MagFace, {}), (margin_ops.ElasticFace, dict(plus=True)),
                        (margin_ops.CurricularFace, {}), (margin_ops.ArcFace, dict(subcenters=2))):
        c = weight.shape[0] // kwargs.get("subcenters", 1)
        head64 = head_with(cls, weight[: c * kwargs.get("subcenters", 1)], s=16.0, **kwargs)
        head32 = cls(8, c, s=16.0, **kwargs)
        head32.load_state_dict(head64.state_dict())
        torch.manual_seed(0)
        want = head64(x, labels % c)
        torch.manual_seed(0)
        got = head32(x.float(), labels % c)
        assert got.dtype == F32
        assert_close(got, want, 1e-4, cls.__name__)
        assert f"num_classes={c}" in repr(head32) and "embedding_size=8" in repr(head32)
