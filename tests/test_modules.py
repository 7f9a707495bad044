"""The nn.Module heads: margin_ops.ArcFace, CosFace, CombinedMargin, SphereFace."""

import io

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
]


def head_id(h):
    return f"{h[0].__name__}-{'-'.join(f'{k}={v}' for k, v in h[1].items())}"


@pytest.mark.parametrize("cls", [margin_ops.ArcFace, margin_ops.CosFace, margin_ops.CombinedMargin,
                                 margin_ops.SphereFace])
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
    assert torch.equal(out.pred, cos.argmax(1))


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
                                        (margin_ops.SphereFace, dict(m=2, s=8.0))])
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
