"""Shared helpers of the margin_ops test suite.

* :func:`make_inputs` draws fresh random features, class weights and labels (never zeros).
* :func:`compare_to_reference` runs an op and the float64 reference on the same inputs
  (the op's inputs rounded to its dtype, then promoted to float64) and compares the loss
  and both gradients with the tolerance of the op's dtype (:data:`TOLERANCES`).
* :data:`requires_cuda` / the ``cuda`` marker: GPU cases skip cleanly without a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import NamedTuple

import pytest
import torch

import margin_ops
from margin_ops import reference

#: Relative tolerances against the float64 reference, per input dtype (gradients; the loss
#: uses :data:`LOSS_TOLERANCES`). An error is judged against the largest |value| of the
#: tensor (see :func:`assert_close`).
#:
#: * float64: the kernel and the reference are both float64 and differ only in the order
#:   of the reductions (block-wise logsumexp, GEMMs split by class block): a few ulps,
#:   amplified at most by s·|φ'| ≈ 1e2 to 1e3, so ~1e-10 relative is ample and still
#:   catches any real error.
#: * float32: cosines are float32 GEMM results (error ~ D·2^-24 ≈ 1e-6 for D ≤ 512),
#:   multiplied by s = 64 before exp: logits carry ~1e-5 absolute error, which is ~1e-5
#:   relative on softmax probabilities and gradients; 1e-4 leaves a 10x margin.
#: * bfloat16 / float16: the kernel upcasts the 16-bit inputs and accumulates in float32,
#:   so everything up to the output is as good as the float32 case (the reference sees the
#:   very same rounded inputs); the gradients are then rounded to 16 bits on output:
#:   bfloat16 keeps 8 significant bits (relative rounding ≤ 2^-9 ≈ 2e-3; seen: 3.8e-3
#:   against max-scaled error), float16 11 bits (≤ 2^-12; seen: 5e-4). 1e-2 and 4e-3 are
#:   ≥ 2.5x the worst seen and well inside the ~2e-2 budget of 16-bit training.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-2,
    torch.float16: 4e-3,
}
#: The loss (and lse) is float32 for 16-bit inputs, computed in float32 from the same
#: rounded inputs as the reference: the float32 tolerance applies (seen: ~1e-6).
LOSS_TOLERANCES = {**TOLERANCES, torch.bfloat16: 1e-4, torch.float16: 1e-4}
DTYPES = tuple(TOLERANCES)
IGNORE_INDEX = -100

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: test runs on a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _seed(request):
    """A distinct, reproducible seed per test: fresh inputs for every case, same on rerun."""
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


class Inputs(NamedTuple):
    x: torch.Tensor       # (N, D) leaf, requires grad
    weight: torch.Tensor  # (C, D) leaf, requires grad
    labels: torch.Tensor  # (N,) int64


def make_inputs(n=8, d=16, c=29, dtype=torch.float32, ignore_rows=(), ignore_index=IGNORE_INDEX,
                device="cpu", requires_grad=True, generator=None) -> Inputs:
    """Fresh random inputs: x ~ N(0, 1) features, weight rows ~ N(0, 1), labels uniform in
    [0, C) except ``ignore_rows`` set to ``ignore_index``. Rows of x get random norms in
    [0.5, 3] so that feature-norm scaling (SphereFace s=None) sees distinct scales."""
    kw = dict(dtype=torch.float64, device=device, generator=generator)
    x = torch.randn(n, d, **kw) * (0.5 + 2.5 * torch.rand(n, 1, **kw))
    weight = torch.randn(c, d, **kw) * (0.5 + torch.rand(c, 1, **kw))
    labels = torch.randint(0, c, (n,), device=device, generator=generator)
    for row in ignore_rows:
        labels[row] = ignore_index
    x = x.to(dtype).requires_grad_(requires_grad)
    weight = weight.to(dtype).requires_grad_(requires_grad)
    return Inputs(x, weight, labels)


def leaf_copy(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A detached copy as a new leaf requiring grad, optionally cast (exactly) to ``dtype``."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


#: Reference function per public op name.
REFERENCE_FNS = {
    "arcface": reference.arcface,
    "cosface": reference.cosface,
    "combined": reference.combined,
    "sphereface": reference.sphereface,
}

#: Representative keyword arguments per op: every margin branch and option.
OP_CONFIGS = [
    ("arcface", dict(s=64.0, m=0.5)),
    ("arcface", dict(s=30.0, m=0.5, margin_grad="detach")),
    ("arcface", dict(s=64.0, m=0.5, easy_margin=True)),
    ("arcface", dict(s=16.0, m=0.7, easy_margin=True, margin_grad="detach")),
    ("arcface", dict(s=8.0, m=1.2)),  # large m: the linear branch cos(pi - m) = -0.36 is hit often
    ("cosface", dict(s=64.0, m=0.35)),
    ("cosface", dict(s=10.0, m=-0.2)),
    ("combined", dict(s=64.0, m1=1.0, m2=0.3, m3=0.2)),
    ("combined", dict(s=32.0, m1=0.9, m2=0.4, m3=0.15, margin_grad="detach")),
    ("combined", dict(s=16.0, m1=1.35, m2=0.0, m3=0.0)),
    ("sphereface", dict()),  # m=4, lamb=0, s=None (feature norm), gamma=0
    ("sphereface", dict(m=1, s=16.0)),
    ("sphereface", dict(m=2, lamb=3.0, s=None)),
    ("sphereface", dict(m=3, lamb=0.5, s=20.0, gamma=2.0)),
    ("sphereface", dict(m=4, lamb=5.0, s=None, gamma=1.0)),
    ("sphereface", dict(m=5, lamb=0.0, s=8.0, gamma=0.5)),
]


#: Arguments of the primitive margin_lse after (x, weight, labels): (margin, s, m1, m2, m3,
#: lamb, feature_scale, detach_margin_grad), covering every φ branch and option.
PRIMITIVE_ARGS = [
    ("arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False),
    ("arcface", 8.0, 1.0, 1.2, 0.0, 0.0, False, False),  # linear branch past cos(π − m)
    ("arcface_easy", 30.0, 1.0, 0.5, 0.0, 0.0, False, True),
    ("cosface", 64.0, 1.0, 0.0, 0.35, 0.0, False, False),
    ("combined", 32.0, 0.9, 0.3, 0.1, 0.0, False, False),
    ("sphereface", 1.0, 4.0, 0.0, 0.0, 5.0, True, False),
    ("sphereface", 16.0, 3.0, 0.0, 0.0, 0.0, False, False),
    ("sphereface", 1.0, 1.0, 0.0, 0.0, 0.0, True, False),
]


#: One exact-gradient configuration per op, and ArcFace's detached gradient: the configs
#: the odd-shape tests run.
SHAPE_CONFIGS = [("arcface", dict(s=64.0, m=0.5)), ("cosface", dict(s=64.0, m=0.35)),
                 ("combined", dict(s=32.0, m1=0.95, m2=0.3, m3=0.1)),
                 ("sphereface", dict(m=4, lamb=2.0)), ("arcface", dict(s=64.0, m=0.5, margin_grad="detach"))]


def place_targets(labels: torch.Tensor, num_classes: int, classes) -> None:
    """Gives the leading rows of ``labels`` the targets ``classes`` (those < num_classes),
    one per row, in order: targets on both sides of a backend's tile boundaries."""
    picks = torch.tensor(classes, device=labels.device)
    picks = picks[picks < num_classes][: labels.shape[0]]
    labels[: len(picks)] = picks


def config_id(config) -> str:
    name, kwargs = config
    return name + ("-" + "-".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


def call_op(name: str, x, weight, labels, backend: str | None = "cpu", **kwargs):
    """torch.ops.margin.<name>(x, weight, labels, **kwargs) under ``backend`` (None: default)."""
    op = getattr(torch.ops.margin, name)
    if backend is None:
        return op(x, weight, labels, **kwargs)
    with margin_ops.backend(backend):
        return op(x, weight, labels, **kwargs)


class Result(NamedTuple):
    loss: torch.Tensor
    grad_x: torch.Tensor
    grad_weight: torch.Tensor


@contextlib.contextmanager
def matmul_precision(value: str):
    """torch.set_float32_matmul_precision(value) inside; the GPU backends' float32 products
    follow it (TF32 unless "highest")."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def run_with_grads(fn, x, weight, labels, upstream=None, **kwargs) -> Result:
    """loss = fn(x, weight, labels, **kwargs) and d(Σ upstream·loss)/d(x, weight).

    ``upstream``: the gradient fed to a ``reduction='none'`` loss (a random vector), or
    None for a scalar loss (gradient 1).
    """
    x, weight = leaf_copy(x), leaf_copy(weight)
    loss = fn(x, weight, labels, **kwargs)
    value = loss.detach()
    if loss.numel() == 0:  # reduction='none' on an empty batch
        loss, upstream = loss.sum(), None
    grad_out = torch.ones_like(loss) if upstream is None or loss.dim() == 0 else upstream.to(loss)
    gx, gw = torch.autograd.grad(loss, [x, weight], grad_out, allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    gw = torch.zeros_like(weight) if gw is None else gw
    return Result(value, gx, gw)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                 atol: float | None = None):
    """|actual − expected| ≤ atol + rtol·|expected| elementwise, in float64.

    ``atol`` defaults to rtol times the largest |expected| (at least 1e-300): an error is
    judged against the scale of the whole tensor, so entries that nearly cancel (tiny
    gradients next to large ones) do not need a relative precision they cannot have.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in {a}"
    if atol is None:
        atol = rtol * (e.abs().max().item() if e.numel() else 0.0)
    atol = max(atol, 1e-300)
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if e.numel() and not (err <= bound).all():
        worst = ((err - bound) / bound).argmax()
        idx = tuple(int(i) for i in torch.unravel_index(worst, e.shape)) if e.dim() else ()
        pytest.fail(f"{what}: mismatch at {idx}: got {a[idx].item():.10g}, expected {e[idx].item():.10g} "
                    f"(max abs err {err.max().item():.3g}, rtol {rtol}, atol {atol:.3g})")


def reference_result(name: str, x, weight, labels, upstream=None, **kwargs) -> Result:
    """The float64 reference on ``x``, ``weight`` (already rounded to the op's dtype)."""
    return run_with_grads(REFERENCE_FNS[name], x.detach().double(), weight.detach().double(),
                          labels, upstream, **kwargs)


def spec_for(name: str, **kwargs) -> reference.MarginSpec:
    """The MarginSpec of torch.ops.margin.<name>(x, w, y, **kwargs), schema defaults filled in."""
    schema = getattr(torch.ops.margin, name).default._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(kwargs)
    return margin_ops.ops._SPEC_BUILDERS[name](bound)


def cancellation_scales(name: str, x, weight, labels, upstream=None, **kwargs) -> tuple[float, float]:
    """Scales of the sums that make grad_x and grad_weight, in float64.

    dx_i = P_i (Σ_c dc_ic ŵ_c) / ‖x_i‖ (P_i: projection off x̂_i) and likewise for dw_c, with
    dc = dloss/dcos. When the terms cancel (D = 1, |cos| = 1: x̂ ∥ ŵ, the projection removes
    everything), the result is rounding noise of the size of max_i Σ_c |dc_ic| / ‖x_i‖ times
    the working precision, however small the exact gradient. Returns those two maxima
    (rows of x, rows of weight), computed from the reference's dc.
    """
    reduction = kwargs.pop("reduction", "mean")
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    spec = spec_for(name, **kwargs)
    x64, w64 = x.detach().double(), weight.detach().double()
    c = reference.cosine(x64, w64).detach().requires_grad_(True)
    has_target = (labels >= 0) & (labels < w64.shape[0])
    column = torch.where(has_target, labels, 0).unsqueeze(1)
    c_target = c.gather(1, column)
    phi = reference.target_margin(c_target, spec)
    if spec.detach_margin_grad:
        phi = c_target + (phi - c_target).detach()
    phi = torch.where(has_target.unsqueeze(1), phi, c_target)
    scale = x64.norm(dim=1, keepdim=True) if spec.feature_scale else spec.s
    logits = c.scatter(1, column, phi) * scale
    target_logit = torch.where(has_target, logits.gather(1, column).squeeze(1), 0)
    loss = reference.loss_from_lse(logits.logsumexp(1), target_logit, labels, spec.gamma, reduction,
                                   ignore_index)
    grad_out = torch.ones_like(loss) if upstream is None or reduction != "none" else upstream.to(loss)
    (dc,) = torch.autograd.grad(loss, c, grad_out)
    x_norm = x64.norm(dim=1).clamp_min(reference.NORM_EPS)
    w_norm = w64.norm(dim=1).clamp_min(reference.NORM_EPS)
    sx = (dc.abs().sum(1) / x_norm).max().item() if dc.numel() else 0.0
    sw = (dc.abs().sum(0) / w_norm).max().item() if dc.numel() else 0.0
    return sx, sw


def _absmax(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def _min_norm(t: torch.Tensor) -> float:
    """Smallest row norm among rows that are not (numerically) zero; 1 if none."""
    norms = t.detach().double().norm(dim=1)
    norms = norms[norms > 1e-6]
    return norms.min().item() if norms.numel() else 1.0


def compare_to_reference(name: str, x, weight, labels, *, backend: str | None = "cpu",
                         rtol: float | None = None, upstream=None, cancellation: bool = False,
                         **kwargs) -> Result:
    """Runs torch.ops.margin.<name> (under ``backend``) and the float64 reference on the
    same dtype-rounded inputs; asserts loss, grad_x and grad_weight agree within the
    dtype's tolerance. Returns the op's result.

    ``cancellation=True`` for inputs with |cos| = 1 (D = 1, x rows parallel to weight rows):
    gradient errors are judged against :func:`cancellation_scales` (the gradients are sums
    that cancel), and everything at s·sqrt(eps) of the accumulation dtype: near c = 1,
    cos(θ + m) = c·cos m − sqrt(1 − c²)·sin m, so a 1-ulp error in c becomes a sqrt(ulp)
    error in φ and an s·sqrt(ulp) error in the target logit (inherent to the formula, not
    to an implementation)."""
    dtype = x.dtype
    rtol_given = rtol
    rtol = TOLERANCES[dtype] if rtol is None else rtol
    reduction = kwargs.get("reduction", "mean")
    if upstream is None and reduction == "none":
        upstream = torch.randn(x.shape[0], dtype=torch.float64)
    got = run_with_grads(lambda *a, **k: call_op(name, *a, backend=backend, **k), x, weight, labels,
                         upstream, **kwargs)
    want = reference_result(name, x, weight, labels, upstream, **kwargs)
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.loss.dtype == expected_loss_dtype, f"loss dtype {got.loss.dtype} for {dtype} inputs"
    assert got.grad_x.dtype == dtype and got.grad_weight.dtype == dtype, "gradients must have the input dtype"
    loss_rtol = LOSS_TOLERANCES[dtype] if rtol_given is None else rtol_given
    spec = spec_for(name, **{k: v for k, v in kwargs.items() if k not in ("reduction", "ignore_index")})
    s_max = x.detach().double().norm(dim=1).max().item() if spec.feature_scale and x.numel() else spec.s
    if cancellation:
        # a sqrt(ulp) error in φ, times the scale s_i, shifts every logit-derived quantity
        loose = max(1.0, s_max) * math.sqrt(torch.finfo(expected_loss_dtype).eps)
        loss_rtol, rtol = max(loss_rtol, loose), max(rtol, loose)
    # loss_i = lse_i − target_logit_i, two numbers of size s·|φ| ≤ s·(2m − 1): a confident
    # row (loss ~ 1e-5) still carries their rounding, so the loss also gets an absolute
    # tolerance of 100 ulps of the logit scale per summed row.
    logit_scale = max(1.0, s_max) * (2 * spec.m1 if spec.margin == "sphereface" else 2)
    rows = int((labels != kwargs.get("ignore_index", IGNORE_INDEX)).sum()) if reduction == "sum" else 1
    loss_atol = max(loss_rtol * (want.loss.abs().max().item() if want.loss.numel() else 0.0),
                    100 * torch.finfo(expected_loss_dtype).eps * logit_scale * max(rows, 1))
    assert_close(got.loss, want.loss, loss_rtol, f"{name} loss ({dtype})", atol=loss_atol)
    # The gradients carry the same absolute rounding: dlogit_iy = P_iy − 1 is the difference
    # of numbers of size 1 whose exponent lse − logit is off by ulps of the logit scale, so a
    # confident row (P_iy → 1, tiny gradient) is only known to ~eps·logit_scale in dlogit,
    # i.e. eps·logit_scale·s/‖x_i‖ in dx_i (and summed over rows in dw_c).
    eps = torch.finfo(expected_loss_dtype).eps
    n_valid = max(int((labels != kwargs.get("ignore_index", IGNORE_INDEX)).sum()), 1)
    per_row = {"mean": 1 / n_valid, "sum": 1.0}.get(reduction, upstream.abs().max().item() if upstream is not None
                                                  and upstream.numel() else 1.0)
    floor = 4 * eps * logit_scale * max(1.0, s_max) * per_row
    atol_x = max(rtol * _absmax(want.grad_x), floor / _min_norm(x))
    atol_w = max(rtol * _absmax(want.grad_weight), floor * n_valid / _min_norm(weight))
    if cancellation:
        sx, sw = cancellation_scales(name, x, weight, labels, upstream, **kwargs)
        atol_x = max(atol_x, rtol * sx)
        atol_w = max(atol_w, rtol * sw)
    assert_close(got.grad_x, want.grad_x, rtol, f"{name} grad_x ({dtype})", atol=atol_x)
    assert_close(got.grad_weight, want.grad_weight, rtol, f"{name} grad_weight ({dtype})", atol=atol_w)
    return got


def opcheck_primitive(forward, backward, args: tuple, dtype: torch.dtype) -> None:
    """torch.library.opcheck of a margin_lse-shaped op pair (``forward`` / ``backward``:
    OpOverloads) with primitive arguments ``args``, on small odd inputs with an ignored row."""
    x, w, y = make_inputs(5, 6, 9, dtype, ignore_rows=(1,))
    torch.library.opcheck(forward, (x, w, y) + args)
    lse = forward(x, w, y, *args)[0].detach()
    grads = (torch.randn(5, dtype=lse.dtype), torch.randn(5, dtype=lse.dtype))
    torch.library.opcheck(backward, grads + (x.detach(), w.detach(), y, lse) + args)


def check_nan_propagation(backend: str, device: str, dtype: torch.dtype) -> None:
    """NaN in the inputs propagates as in the reference, never hidden: a NaN feature makes
    its row's lse, target logit and loss NaN and leaves the other rows exact; a NaN weight
    row makes every row's lse NaN and, as torch.max does, is every row's max_cos (NaN) and
    pred. Values are compared with the float64 reference on the same rounded inputs."""
    primitive_args = ("arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False)
    x, w, y = make_inputs(6, 40, 300, dtype, requires_grad=False, device=device)
    y[y == 7] = 8
    w_nan = w.clone()
    w_nan[7, 3] = float("nan")
    x_nan = x.clone()
    x_nan[2, 5] = float("nan")
    with margin_ops.backend(backend):  # the backend's own primitive (not the C++ op's dispatch)
        lse_fn = margin_ops.backends.margin_lse_for(x.device)
        got_x = lse_fn(x_nan, w, y, *primitive_args)
        got_w = lse_fn(x, w_nan, y, *primitive_args)
    want_x = reference.margin_lse(x_nan.double(), w.double(), y, *primitive_args)
    want_w = reference.margin_lse(x.double(), w_nan.double(), y, *primitive_args)
    rows = torch.arange(6, device=device) != 2
    for got, want, what in zip(got_x[:3], want_x[:3], ("lse", "target_logit", "max_cos")):
        assert torch.isnan(got[2]), f"NaN feature row: {what} is {got[2].item()}, not NaN"
        assert_close(got[rows], want[rows], 1e-4, f"NaN feature row: {what} of the other rows")
    assert torch.equal(got_x[3], want_x[3]), f"NaN feature row: pred {got_x[3]}, reference {want_x[3]}"
    assert torch.isnan(got_w[0]).all(), f"NaN weight row: lse {got_w[0]}"
    assert torch.isnan(got_w[2]).all() and (got_w[3] == 7).all(), f"NaN weight row: max_cos / pred {got_w[2:]}"
    assert_close(got_w[1], want_w[1], 1e-4, "NaN weight row: target logits (no row targets class 7)")


# ----------------------------------------------------------------------------------------
# Closed forms, written independently of margin_ops.reference (plain formulas of DESIGN.md §1).


def closed_form_phi(name: str, c: torch.Tensor, *, m=None, easy_margin=False, m1=1.0, m2=0.5,
                    m3=0.0, lamb=0.0) -> torch.Tensor:
    """φ(c) of the target cosine by the formulas of DESIGN.md, via θ = acos(c)."""
    theta = torch.acos(c)
    if name == "arcface":
        m = 0.5 if m is None else m
        if easy_margin:
            return torch.where(c > 0, torch.cos(theta + m), c)
        return torch.where(c > math.cos(math.pi - m), torch.cos(theta + m), c - m * math.sin(m))
    if name == "cosface":
        return c - (0.35 if m is None else m)
    if name == "combined":
        return torch.cos(m1 * theta + m2) - m3
    if name == "sphereface":
        m = 4 if m is None else m
        k = torch.floor(m * theta.detach() / math.pi).clamp(0, m - 1)
        psi = (-1.0) ** k * torch.cos(m * theta) - 2 * k
        return (psi + lamb * c) / (1 + lamb)
    raise ValueError(name)


def closed_form_logits(name: str, x, weight, labels, *, s=64.0, detach=False, **margin):
    """The N x C logits built explicitly: s_i·c_ic, with s_i·φ(c_iy) on the target."""
    c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    valid = (labels >= 0) & (labels < weight.shape[0])
    col = torch.where(valid, labels, 0)
    rows = torch.arange(x.shape[0])
    c_y = c[rows, col]
    phi = closed_form_phi(name, c_y, **margin)
    if detach:
        phi = c_y + (phi - c_y).detach()
    onehot = torch.nn.functional.one_hot(col, weight.shape[0]).bool() & valid.unsqueeze(1)
    logits = torch.where(onehot, phi.unsqueeze(1), c)
    scale = x.norm(dim=1, keepdim=True) if s is None else s
    return logits * scale
