"""Every backend against the float64 reference: losses, gradients, the primitive's
statistics, φ itself, for every margin, option, reduction, dtype and odd shape."""

import math

import pytest
import torch

import margin_ops
from margin_ops import reference

from conformance.cases import (BOUNDARY_TARGETS, DTYPE_IDS, DTYPES, ODD_SHAPES, OP_CONFIGS, PRIMITIVE_ARGS,
                               PRIMITIVE_OPTIONS, SHAPE_CONFIGS, config_id, options_id, primitive_id)
from conftest import (assert_close, closed_form_phi, compare_to_reference, leaf_copy, make_inputs, make_op_inputs,
                      matmul_precision, place_targets, primitive_options, primitive_vs_reference)

from backends_under_test import TF32

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
slow = pytest.mark.slow


def _quick_unless(condition: bool):
    """The quick subset keeps one case per backend and config: the others are slow."""
    return () if condition else (slow,)


@pytest.mark.parametrize("dtype,reduction", [
    pytest.param(dtype, reduction, marks=_quick_unless(dtype == F32 and reduction == "mean"),
                 id=f"{DTYPE_IDS[dtype]}-{reduction}")
    for dtype in DTYPES for reduction in ("mean", "sum", "none")])
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_op_matches_reference(config, dtype, reduction, backend):
    name, kwargs = config
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 8, 16, 29, dtype, ignore_rows=(3,), device=backend.device)
    compare_to_reference(name, x, w, y, backend=backend, reduction=reduction, **kwargs)


@slow
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ignore_index", [-1, 7, 10**6])
@pytest.mark.parametrize("name", margin_ops.ops.LOSSES)
def test_ignore_index(name, ignore_index, dtype, backend):
    """Custom ignore_index values: negative, inside [0, C) (the row keeps its target in the
    primitive but contributes nothing), and beyond C."""
    (x, w, y), kwargs = make_op_inputs(name, {}, 9, 10, 12, dtype, ignore_rows=(0, 5), ignore_index=ignore_index,
                                       device=backend.device)
    for reduction in ("mean", "sum", "none"):
        got = compare_to_reference(name, x, w, y, backend=backend, ignore_index=ignore_index, reduction=reduction,
                                   **kwargs)
        if reduction == "none":
            assert (got.loss[y == ignore_index] == 0).all()


@slow
@pytest.mark.parametrize("dtype", [F64, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", SHAPE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}-D{}-C{}".format(*s))
def test_odd_shapes(shape, config, dtype, backend):
    n, d, c = shape
    name, kwargs = config
    x, w, y = make_inputs(n, d, c, dtype, device=backend.device)
    if c >= 3:
        place_targets(y, c, [c - 1] + BOUNDARY_TARGETS)
    # D = 1: every cosine is ±1 and the gradients are sums that cancel to (nearly) 0.
    compare_to_reference(name, x, w, y, backend=backend, reduction="sum", cancellation=d == 1, **kwargs)


def test_non_contiguous_inputs(backend):
    """The classic layout keeps W as (D, C): passing W.t() gives a non-contiguous weight;
    x a column slice, labels a strided view."""
    w_classic = torch.randn(16, 300, device=backend.device)
    x = torch.randn(32, 12, device=backend.device).t()[:, ::2]  # (12, 16), strided both ways
    y = torch.randint(0, 300, (24,), device=backend.device)[::2]
    assert not (x.is_contiguous() or w_classic.t().is_contiguous() or y.is_contiguous())
    for name, kwargs in (("arcface", {}), ("sphereface", dict(m=3, lamb=1.0))):
        compare_to_reference(name, leaf_copy(x), leaf_copy(w_classic).t(), y, backend=backend, **kwargs)


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=_quick_unless(d == BF16), id=DTYPE_IDS[d]) for d in DTYPES])
@pytest.mark.parametrize("args", PRIMITIVE_ARGS, ids=primitive_id)
def test_primitive_matches_reference(args, dtype, backend):
    """lse, target_logit, max_cos, pred and both gradients; rows with no target (below 0;
    past C inside the last class tile); D = 40 (16-byte rows for every dtype); C = 300:
    several class tiles and splits of every backend."""
    x, w, y = make_inputs(7, 40, 300, dtype, requires_grad=False, device=backend.device)
    y[1], y[4] = -100, 310
    primitive_vs_reference(backend.lse_fn(), x, w, y, args, backend.tolerances[dtype])


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=_quick_unless(d == F64), id=DTYPE_IDS[d]) for d in (F64, BF16)])
@pytest.mark.parametrize("options", PRIMITIVE_OPTIONS, ids=options_id)
@pytest.mark.parametrize("args", [PRIMITIVE_ARGS[i] for i in (0, 3, 5, 8)], ids=primitive_id)
def test_primitive_options_match_reference(args, options, dtype, backend):
    """Sub-centers (K passes over strided rows, the gradient to the winner), a shuffled
    class_index (rows read and written in place; the others' gradient exactly 0) and the
    hard-example modulation, alone and together, for ArcFace, CosFace, SphereFace's feature
    scale and the external margin. 300 physical classes: several tiles of every backend."""
    made = primitive_options(7, 300, device=backend.device, **options)
    x, w, y = make_inputs(7, 40, made.weight_rows, dtype, requires_grad=False, device=backend.device)
    y = y % made.num_classes
    y[1], y[4] = -100, made.num_classes + 10
    # the reference's 16-bit products round x̂ and ŵ first (as F.linear): like TF32, its pred
    # may be any class within the tolerance of the largest cosine
    primitive_vs_reference(backend.lse_fn(), x, w, y, args, backend.tolerances[dtype], options=made.options,
                           tf32=backend.name == "reference" and dtype != F64)


@pytest.mark.slow
@pytest.mark.parametrize("config", OP_CONFIGS[::3], ids=config_id)
def test_float32_follows_matmul_precision(config, backend):
    """float32 on a GPU backend follows torch's float32 matmul precision: "high" is TF32
    (within TF32's tolerance, and not the bits of "highest"); the CPU backends, and the
    Triton interpreter (exact products), give the bits of "highest"."""
    name, kwargs = config
    (x, w, y), kwargs = make_op_inputs(name, kwargs, 8, 48, 200, F32, device=backend.device)
    exact = compare_to_reference(name, x, w, y, backend=backend, **kwargs)
    with matmul_precision("high"):
        high = compare_to_reference(name, x, w, y, backend=backend, rtol=TF32[1], **kwargs)
    if backend.follows_tf32:
        assert not torch.equal(high.loss, exact.loss), "float32 gave the same bits under high and highest"
        x0, w0, y0 = make_inputs(9, 40, 300, F32, requires_grad=False, device=backend.device)
        with matmul_precision("high"):
            primitive_vs_reference(backend.lse_fn(), x0, w0, y0, PRIMITIVE_ARGS[0], TF32, tf32=True)
    else:
        assert torch.equal(high.loss, exact.loss), "the matmul precision changed an exact backend's bits"


@pytest.mark.slow
@pytest.mark.parametrize("output", [0, 1, 4], ids=["lse", "target_logit", "nontarget_sum"])
def test_gradient_of_one_primitive_output(output, backend):
    """Backward with only one of lse / target_logit / nontarget_sum used (the others'
    gradients are None)."""
    x, w, y = make_inputs(6, 8, 300, F64, ignore_rows=(4,), device=backend.device)
    args = ("sphereface", 1.0, 3.0, 0.0, 0.0, 2.0, True, False)
    got = torch.autograd.grad(backend.lse_fn()(x, w, y, *args)[output].sum(), [x, w])
    want = torch.autograd.grad(reference.margin_lse(x, w, y, *args)[output].sum(), [x, w])
    for a, b, what in zip(got, want, ("grad_x", "grad_weight")):
        assert_close(a, b, 1e-10, what)


#: (margin, its closed_form_phi keywords, the primitive's margin arguments but s)
PHI_CASES = [
    ("arcface", dict(m=0.5), ("arcface", 1.0, 0.5, 0.0, 0.0, False, False)),
    ("arcface", dict(m=1.2), ("arcface", 1.0, 1.2, 0.0, 0.0, False, False)),
    ("arcface", dict(m=0.5, easy_margin=True), ("arcface_easy", 1.0, 0.5, 0.0, 0.0, False, False)),
    ("cosface", dict(m=0.35), ("cosface", 1.0, 0.0, 0.35, 0.0, False, False)),
    ("combined", dict(m1=0.9, m2=0.3, m3=0.1), ("combined", 0.9, 0.3, 0.1, 0.0, False, False)),
] + [("sphereface", dict(m=m, lamb=lamb), ("sphereface", float(m), 0.0, 0.0, lamb, False, False))
     for m in (1, 2, 3, 4, 5) for lamb in (0.0, 1.5)]


@pytest.mark.parametrize("case", PHI_CASES, ids=lambda c: f"{c[2][0]}-{c[1]}")
def test_phi_value_by_value(case, backend):
    """φ on a grid of angles θ ∈ (0, π), float64, through the backend's own φ: row i of x
    makes angle θ_i with class 0 (D = 2), whose target logit is s·φ(cos θ_i). Compared with
    the closed form of docs/design.md §1 (independent of margin_ops.reference), and dφ/dc
    through the gradient of the target logit against the reference's."""
    name, closed, (margin, *params) = case
    theta = torch.linspace(0.02, math.pi - 0.02, 97, dtype=F64)
    x = torch.stack([torch.cos(theta), torch.sin(theta)], 1).to(backend.device) * 1.7
    w = torch.tensor([[1.0, 0.0], [0.3, -0.8], [-0.5, 0.2]], dtype=F64, device=backend.device) * 0.9
    y = torch.zeros(97, dtype=torch.int64, device=backend.device)
    s = 3.0
    args = (margin, s, *params)
    x, w = leaf_copy(x), leaf_copy(w)
    target = backend.lse_fn()(x, w, y, *args)[1]
    phi = closed_form_phi(name, torch.cos(theta).to(backend.device), **closed)
    assert_close(target / s, phi, 1e-10, f"φ of {margin}", atol=1e-10)
    got = torch.autograd.grad(target.sum(), [x])[0]
    x64 = leaf_copy(x)
    want = torch.autograd.grad(reference.margin_lse(x64, w.detach(), y, *args)[1].sum(), [x64])[0]
    assert_close(got, want, 1e-9, f"dφ/dc of {margin}")


def test_max_cos_is_a_clamped_cosine(backend):
    """Three coordinates whose norm rounds so that x̂·x̂ > 1 in float32."""
    t = torch.tensor([[1.656269907951355, 1.0606399774551392, 0.7503016591072083]], device=backend.device)
    y = torch.tensor([0], device=backend.device)
    args = ("cosface", 1.0, 1.0, 0.0, 0.0, 0.0, False, False)
    max_cos = backend.lse_fn()(t, t, y, *args)[2]
    assert max_cos.item() <= 1.0
    assert torch.equal(max_cos, reference.margin_lse(t, t, y, *args)[2])


@pytest.mark.slow
def test_pred_ties_pick_the_lowest_class(backend):
    """Identical weight rows in different class blocks / tiles / splits of every backend
    (the CPU kernel's blocks are 256 rows at D = 1024): the lowest class wins, as
    torch.max. The tie is exact in every backend's arithmetic: x̂ = e_0 exactly and integer
    weights, so each cosine is w_c0 / ‖w_c‖, the same rounding for identical rows."""
    w = torch.randint(-3, 4, (600, 1024), device=backend.device).float()
    w[5, 0] = 40.0
    w[300] = w[5]
    w[550] = w[5]
    x = torch.zeros(2, 1024, device=backend.device)
    x[:, 0] = 2.0
    y = torch.tensor([7, 580], device=backend.device)
    out = margin_ops.with_stats("arcface", x, w, y)
    assert out.pred.tolist() == [5, 5]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_results_are_bitwise_repeatable(dtype, backend):
    """The same call twice gives the same bits (no atomics, fixed reduction orders)."""
    x, w, y = make_inputs(40, 20, 300, dtype, requires_grad=False, device=backend.device)
    args = PRIMITIVE_ARGS[0]
    runs = []
    for _ in range(2):
        xl, wl = leaf_copy(x), leaf_copy(w)
        lse, target, max_cos, pred, nontarget_sum = backend.lse_fn()(xl, wl, y, *args)
        grads = torch.autograd.grad(lse.sum() + 0.5 * target.sum() + 0.25 * nontarget_sum.sum(), [xl, wl])
        runs.append((lse, target, max_cos, pred, nontarget_sum, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
