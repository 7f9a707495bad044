"""Shared helpers of the margin_ops test suite, and the ``backend`` fixture.

* ``backend``: every test that takes it runs once per backend of
  :data:`backends_under_test.BACKENDS` (``@pytest.mark.backends(...)`` narrows the list);
  a backend that cannot run here skips with its reason. The Triton backend runs on CPU
  tensors under its interpreter, which TRITON_INTERPRET=1 turns on only if set before the
  kernels are defined: this file sets it, on machines without a GPU, before importing
  margin_ops, so those cases run (and count) in this process.
* :func:`make_inputs` draws fresh random features, class weights and labels (never zeros).
* :func:`compare_to_reference` runs an op and the float64 reference on the same inputs
  (the op's inputs rounded to its dtype, then promoted to float64) and compares the loss
  and both gradients with the backend's tolerance for the dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import unittest.mock
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import margin_ops  # noqa: E402
from margin_ops import reference, spec  # noqa: E402

from backends_under_test import BY_NAME, FUSED, BackendUnderTest  # noqa: E402

#: Gradient and loss tolerances of the fused kernels per input dtype (the reasoning is at
#: backends_under_test.FUSED; every backend has its own table there).
TOLERANCES = {dtype: grad for dtype, (_, grad) in FUSED.items()}
LOSS_TOLERANCES = {dtype: loss for dtype, (loss, _) in FUSED.items()}
DTYPES = tuple(TOLERANCES)
IGNORE_INDEX = -100

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: test runs on a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: left out of the quick subset (pytest -m 'not slow')")
    config.addinivalue_line("markers", "backends(*names): the backends a conformance test runs on (default: all)")
    config.addinivalue_line("markers", "compiled_triton: needs Triton's kernels compilable (TRITON_INTERPRET off)")
    config.addinivalue_line("markers", "interpreted_triton_only: runs the compiled_triton cases in a child process")


def pytest_generate_tests(metafunc):
    """``backend``: every backend, or those of the marker; MARGIN_OPS_TEST_BACKENDS (a comma
    list, e.g. "cuda,triton" on a GPU machine) keeps only those it names."""
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else tuple(BY_NAME)
        wanted = os.environ.get("MARGIN_OPS_TEST_BACKENDS")
        if wanted:
            unknown = set(wanted.split(",")) - set(BY_NAME)
            if unknown:
                raise pytest.UsageError(f"MARGIN_OPS_TEST_BACKENDS names unknown backends {sorted(unknown)}; "
                                        f"known: {', '.join(BY_NAME)}")
            names = tuple(n for n in names if n in wanted.split(","))
        metafunc.parametrize("backend", names, indirect=True)


def pytest_collection_modifyitems(config, items):
    """Skips GPU-marked cases without a GPU. Deselects (they run elsewhere, and are counted
    there): the shapes a backend is too slow for (``shape`` parameters past its
    :attr:`BackendUnderTest.max_work`; the fast backends run them), the dtypes a backend
    leaves to another (:meth:`BackendUnderTest.runs_dtype`), and, by whether this
    process runs Triton interpreted, either the offline Triton builds (a child process runs
    them) or the test that would start that child."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    kept, dropped = [], []
    for item in items:
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        params = getattr(getattr(item, "callspec", None), "params", {})
        name, shape = params.get("backend"), params.get("shape")
        if not isinstance(name, str):  # a backends marker none of the selected backends is in:
            name = None                # pytest's own "empty parameter set" skip stands
        elsewhere = item.get_closest_marker("compiled_triton" if interpreted else "interpreted_triton_only")
        if elsewhere is not None or (name is not None and shape is not None and BY_NAME[name].too_slow_for(*shape)) \
                or (name is not None and not BY_NAME[name].runs_dtype(params.get("dtype"))):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def backend(request) -> BackendUnderTest:
    """The backend under test, active (the public ops run on it) for the whole test."""
    chosen = BY_NAME[request.param]
    why = chosen.missing()
    if why is not None:
        pytest.skip(f"backend {chosen.name!r} cannot run here: {why}")
    with chosen.active():
        yield chosen


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
REFERENCE_FNS = {name: getattr(reference, name) for name in spec.LOSSES}


def place_targets(labels: torch.Tensor, num_classes: int, classes) -> None:
    """Gives the leading rows of ``labels`` the targets ``classes`` (those < num_classes),
    one per row, in order: targets on both sides of a backend's tile boundaries."""
    picks = torch.tensor(classes, device=labels.device)
    picks = picks[picks < num_classes][: labels.shape[0]]
    labels[: len(picks)] = picks


def call_op(name: str, x, weight, labels, backend: str | BackendUnderTest | None = "cpu", **kwargs):
    """torch.ops.margin.<name>(x, weight, labels, **kwargs) under ``backend`` (a backend
    name or the fixture's backend; None: the default)."""
    op = getattr(torch.ops.margin, name)
    if backend is None:
        return op(x, weight, labels, **kwargs)
    with margin_ops.backend(getattr(backend, "op_backend", backend)):
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


def spec_for(name: str, **kwargs) -> spec.MarginSpec:
    """The MarginSpec of torch.ops.margin.<name>(x, w, y, **kwargs), schema defaults filled in."""
    return spec.OP_SPECS[name]({**margin_ops.ops._SIGNATURES[name].defaults, **kwargs})


def cancellation_scales(name: str, x, weight, labels, upstream=None, **kwargs) -> tuple[float, float]:
    """Scales of the sums that make grad_x and grad_weight, in float64.

    dx_i = P_i (Σ_c dc_ic ŵ_c) / ‖x_i‖ (P_i: projection off x̂_i) and likewise for dw_c, with
    dc = dloss/dcos. When the terms cancel (D = 1, |cos| = 1: x̂ ∥ ŵ, the projection removes
    everything; a zero row, whose 1/eps factor magnifies the sum's rounding), the result is
    rounding noise of the size of max_i Σ_c |dc_ic| / ‖x_i‖ times the working precision,
    however small the exact gradient. Returns those two maxima (rows of x, rows of weight),
    with dc taken from the reference loss of op ``name`` itself: its cosine matrix (every
    weight row's, sub-centers included) is made a leaf for the autograd call.
    """
    x64, w64 = x.detach().double(), weight.detach().double()
    leaves = []
    cosine = reference.cosine

    def leaf_cosine(a, b):
        leaves.append(cosine(a, b).detach().requires_grad_(True))
        return leaves[-1]

    with unittest.mock.patch.object(reference, "cosine", leaf_cosine):
        loss = REFERENCE_FNS[name](x64, w64, labels, **kwargs)
    if not loss.numel():
        return 0.0, 0.0
    grad_out = torch.ones_like(loss) if loss.dim() == 0 or upstream is None else upstream.to(loss)
    (dc,) = torch.autograd.grad(loss, leaves, grad_out)
    x_norm = x64.norm(dim=1).clamp_min(spec.NORM_EPS)
    w_norm = w64.norm(dim=1).clamp_min(spec.NORM_EPS)
    return (dc.abs().sum(1) / x_norm).max().item(), (dc.abs().sum(0) / w_norm).max().item()


def _absmax(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def _min_norm(t: torch.Tensor) -> float:
    """Smallest row norm among rows that are not (numerically) zero; 1 if none."""
    norms = t.detach().double().norm(dim=1)
    norms = norms[norms > 1e-6]
    return norms.min().item() if norms.numel() else 1.0


def compare_to_reference(name: str, x, weight, labels, *, backend: str | BackendUnderTest | None = "cpu",
                         rtol: float | None = None, upstream=None, cancellation: bool = False,
                         **kwargs) -> Result:
    """Runs torch.ops.margin.<name> (under ``backend``) and the float64 reference on the
    same dtype-rounded inputs; asserts loss, grad_x and grad_weight agree within the
    dtype's tolerance (the backend's table for the fixture's backend, else the fused
    kernels'; ``rtol`` overrides both). Returns the op's result.

    ``cancellation=True`` for inputs with |cos| = 1 (D = 1, x rows parallel to weight rows):
    gradient errors are judged against :func:`cancellation_scales` (the gradients are sums
    that cancel), and everything at s·sqrt(eps) of the accumulation dtype: near c = 1,
    cos(θ + m) = c·cos m − sqrt(1 − c²)·sin m, so a 1-ulp error in c becomes a sqrt(ulp)
    error in φ and an s·sqrt(ulp) error in the target logit (inherent to the formula, not
    to an implementation)."""
    dtype = x.dtype
    table = getattr(backend, "tolerances", FUSED)
    loss_rtol, rtol = table[dtype] if rtol is None else (rtol, rtol)
    reduction = kwargs.get("reduction", "mean")
    if upstream is None and reduction == "none":
        upstream = torch.randn(x.shape[0], dtype=torch.float64)
    got = run_with_grads(lambda *a, **k: call_op(name, *a, backend=backend, **k), x, weight, labels,
                         upstream, **kwargs)
    want = reference_result(name, x, weight, labels, upstream, **kwargs)
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.loss.dtype == expected_loss_dtype, f"loss dtype {got.loss.dtype} for {dtype} inputs"
    assert got.grad_x.dtype == dtype and got.grad_weight.dtype == dtype, "gradients must have the input dtype"
    margin = spec_for(name, **{k: v for k, v in kwargs.items() if k not in ("reduction", "ignore_index")})
    s_max = x.detach().double().norm(dim=1).max().item() if margin.feature_scale and x.numel() else margin.s
    if cancellation:
        # a sqrt(ulp) error in φ, times the scale s_i, shifts every logit-derived quantity
        loose = max(1.0, s_max) * math.sqrt(torch.finfo(expected_loss_dtype).eps)
        loss_rtol, rtol = max(loss_rtol, loose), max(rtol, loose)
    # loss_i = lse_i − target_logit_i, two numbers of size s·|φ| ≤ s·(2m − 1): a confident
    # row (loss ~ 1e-5) still carries their rounding, so the loss also gets an absolute
    # tolerance of 100 ulps of the logit scale per summed row.
    logit_scale = max(1.0, s_max) * (2 * margin.m1 if margin.margin == "sphereface" else 2)
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


def primitive_vs_reference(lse_fn, x, w, y, args, tolerances, tf32=False, options=()):
    """A backend's primitive ``lse_fn`` (values, and gradients through its autograd formula
    for random upstream gradients of lse, target_logit and nontarget_sum) against the
    float64 reference. ``args``: the 8 margin arguments; ``options``: the arguments after
    them (allow_tf32, subcenters, class_index, hard_threshold, hard_t; see
    :func:`primitive_options`). ``tolerances``: (values, gradients) rtol; ``tf32``: pred
    may be any class within the values' tolerance of the largest cosine."""
    x, w = leaf_copy(x), leaf_copy(w)
    lse, target, max_cos, pred, nontarget_sum = lse_fn(x, w, y, *args, *options)
    x64, w64 = leaf_copy(x, torch.float64), leaf_copy(w, torch.float64)
    want = reference.margin_lse(x64, w64, y, *args, *options)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert lse.dtype == target.dtype == max_cos.dtype == nontarget_sum.dtype == acc and pred.dtype == torch.int64
    tol, grad_tol = tolerances
    scale = args[1] if not args[6] else x64.detach().norm(dim=1).max().item()
    num_classes = reference.class_cosines(x64.detach()[:1], w64.detach(), *options[1:3]).shape[1]
    assert_close(lse, want[0], tol, "lse", atol=tol * max(1.0, scale))
    assert_close(target, want[1], tol, "target_logit", atol=tol * max(1.0, scale))
    assert_close(max_cos, want[2], tol, "max_cos", atol=tol)
    # a sum of C logits, each known to the logits' tolerance (hard examples: up to 1 + t times larger)
    hard_t = options[4] if len(options) > 4 and options[4] is not None else torch.zeros(1)
    assert_close(nontarget_sum, want[4], tol, "nontarget_sum",
                 atol=tol * max(1.0, scale) * num_classes * (1 + hard_t.abs().max().item()))
    if tf32:  # TF32 cosines may reorder near-ties: pred must be a class within tol of the max
        cos = reference.class_cosines(x64.detach(), w64.detach(), *options[1:3])
        assert (cos.gather(1, pred[:, None]).squeeze(1) >= want[2] - 2 * tol).all(), (pred, want[3])
    else:
        assert torch.equal(pred, want[3]), (pred, want[3])
    upstream = [torch.randn(x.shape[0], dtype=acc, device=x.device) for _ in range(3)]
    subcenters = options[1] if len(options) > 1 else 1
    if subcenters > 1 and x.dtype != torch.float64:
        # Which of two sub-centers within the dtype's rounding of each other wins is
        # rounding's choice, and the row's gradient goes to the winner: such rows' gradients
        # are not compared (their values are).
        rows = reference.cosine(x64.detach(), w64.detach() if options[2] is None else
                                w64.detach().view(-1, subcenters, w.shape[1])[options[2]].flatten(0, 1))
        top2 = rows.unflatten(1, (-1, subcenters)).topk(2, dim=2).values
        near_tie = ((top2[..., 0] - top2[..., 1]) < 8 * tol).any(dim=1)
        upstream = [torch.where(near_tie, 0, g) for g in upstream]
    got_grads = torch.autograd.grad(sum((out * g).sum() for out, g in zip((lse, target, nontarget_sum), upstream)),
                                    [x, w])
    want_grads = torch.autograd.grad(sum((out * g.double()).sum() for out, g in zip(want[:2] + want[4:], upstream)),
                                     [x64, w64])
    assert got_grads[0].dtype == x.dtype and got_grads[1].dtype == w.dtype
    assert_close(got_grads[0], want_grads[0], grad_tol, "grad_x")
    assert_close(got_grads[1], want_grads[1], grad_tol, "grad_weight")
    if len(options) > 2 and options[2] is not None:  # rows no class reads get no gradient, exactly
        unread = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        subcenters = options[1]
        unread.view(-1, subcenters)[options[2]] = False
        assert (got_grads[1][unread] == 0).all(), "grad_weight is not zero in rows outside class_index"


class PrimitiveOptions(NamedTuple):
    """Inputs for the primitive's options (margin_lse after its margin arguments)."""

    weight_rows: int   #: rows of weight: physical classes × subcenters
    num_classes: int   #: C the primitive sees (labels lie in [0, C))
    options: tuple     #: (allow_tf32, subcenters, class_index, hard_threshold, hard_t)


def primitive_options(n: int, classes: int, *, subcenters=1, sampled=False, hard=False,
                      device="cpu") -> PrimitiveOptions:
    """``classes`` physical classes of ``subcenters`` rows each; ``sampled``: a shuffled
    class_index of about 3/5 of them (not sorted, across every tile); ``hard``: per-row
    thresholds in [−0.3, 0.3] (one row 2: no hard examples) and t in [0, 1.5]."""
    class_index = None
    num_classes = classes
    if sampled:
        num_classes = max(1, classes * 3 // 5)
        class_index = torch.randperm(classes, device=device)[:num_classes]
    hard_threshold = hard_t = None
    if hard:
        hard_threshold = torch.rand(n, device=device) * 0.6 - 0.3
        hard_threshold[0] = 2.0
        hard_t = torch.rand(n, device=device) * 1.5
    return PrimitiveOptions(classes * subcenters, num_classes, (None, subcenters, class_index, hard_threshold, hard_t))


#: The required tensor arguments of the ops that have them, when a test does not care.
REQUIRED_DEFAULTS = {"adaptive": dict(m_angle=(0.2, 0.6), m_add=(0.0, 0.2)), "curricular": dict(t=0.2)}


def op_arguments(name: str, kwargs: dict, n: int, device="cpu") -> dict:
    """An op config's keyword arguments with its per-row tensors made for N = ``n`` rows:
    adaptive's m_angle / m_add are given as (low, high) ranges (spread over the rows),
    curricular's t as a number (a 0-d tensor). Missing ones get defaults."""
    out = {**REQUIRED_DEFAULTS.get(name, {}), **kwargs}
    for key in ("m_angle", "m_add"):
        if isinstance(out.get(key), tuple):
            out[key] = torch.linspace(*out[key], n, device=device)[torch.randperm(n, device=device)]
    if name == "curricular" and not isinstance(out.get("t", 0.0), torch.Tensor):
        out["t"] = torch.tensor(float(out.get("t", 0.0)), device=device)
    return out


def make_op_inputs(name: str, kwargs: dict, n=8, d=16, c=29, dtype=torch.float32, ignore_rows=(),
                   ignore_index=IGNORE_INDEX, device="cpu") -> tuple[Inputs, dict]:
    """:func:`make_inputs` for op config (name, kwargs): weight gets C·subcenters rows (labels
    stay in [0, C)), and the config's per-row tensors are made (:func:`op_arguments`)."""
    subcenters = kwargs.get("subcenters", 1)
    x, w, y = make_inputs(n, d, c * subcenters, dtype, ignore_rows, ignore_index, device)
    y = torch.where(y == ignore_index, y, y % c) if ignore_rows else y % c
    return Inputs(x, w, y), op_arguments(name, kwargs, n, device)


# ----------------------------------------------------------------------------------------
# Closed forms, written independently of margin_ops.reference (plain formulas of docs/design.md §1).


def closed_form_phi(name: str, c: torch.Tensor, *, m=None, easy_margin=False, m1=1.0, m2=0.5,
                    m3=0.0, lamb=0.0) -> torch.Tensor:
    """φ(c) of the target cosine by the formulas of docs/design.md §1, via θ = acos(c)."""
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
