"""What is specific to the Triton backend (margin_ops/triton): its op twins' schemas and
its own argument checks. What it computes is the conformance suite's (tests/conformance:
backends 'triton-interpreted' on CPU tensors, 'triton' on a GPU); its offline builds are
tests/test_triton_compile.py."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import margin_ops  # noqa: E402
import margin_ops.triton  # noqa: E402  (any ImportError here is a bug: triton is installed)

from conformance.cases import PRIMITIVE_ARGS  # noqa: E402
from conftest import call_op, make_inputs  # noqa: E402

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def test_schemas_are_the_cpp_ones():
    for name in ("margin_lse", "margin_lse_backward"):
        cpp = str(getattr(torch.ops.margin, name).default._schema)
        twin = str(getattr(torch.ops.margin, name + "_triton").default._schema)
        assert twin == cpp.replace(f"margin::{name}(", f"margin::{name}_triton(", 1)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Without the interpreter, CPU tensors are an error that says how to turn it on (the
    suite runs interpreted on CPU-only machines: the switch is flipped here)."""
    monkeypatch.setattr(margin_ops.triton, "INTERPRETED", False)
    monkeypatch.setattr(margin_ops.triton.problem, "INTERPRETED", False)
    x, w, y = make_inputs(4, 8, 9, F32, requires_grad=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.margin.margin_lse_triton(x, w, y, *PRIMITIVE_ARGS[0])
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu tensors"):
        call_op("arcface", x, w, y, backend="triton")


def test_unsupported_dtype_is_named():
    x = torch.zeros(2, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        torch.ops.margin.margin_lse_triton(x, x, torch.zeros(2, dtype=torch.int64), *PRIMITIVE_ARGS[0])


def _forward_backward(fn, x, weight, labels, *primitive_args):
    """fn's five outputs (a margin_lse) and the gradients of lse + target_logit / 2 +
    nontarget_sum / 4 in x and weight."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = fn(x, weight, labels, *primitive_args)
    grads = torch.autograd.grad((out[0] + out[1] / 2 + out[4] / 4).sum(), (x, weight))
    return (*out, *grads)


@pytest.mark.skipif(not margin_ops.triton.INTERPRETED, reason="runs the kernels on CPU tensors (TRITON_INTERPRET=1)")
def test_class_index_reads_weight_in_place():
    """class_index selects W's classes where they lie: NaN in every row it leaves out
    changes no output and no gradient bit, and those rows' gradient is exactly 0."""
    x, _, _ = make_inputs(9, 16, 1, F64, requires_grad=False)
    weight = torch.randn(40 * 2, 16, dtype=F64)
    class_index = torch.randperm(40)[:23]
    labels = torch.randint(0, 23, (9,))
    unread = torch.ones(40, dtype=torch.bool)
    unread[class_index] = False
    poisoned = weight.clone().view(40, 2, 16)
    poisoned[unread] = float("nan")
    args = (*PRIMITIVE_ARGS[0], None, 2, class_index)
    clean = _forward_backward(torch.ops.margin.margin_lse_triton, x, weight, labels, *args)
    dirty = _forward_backward(torch.ops.margin.margin_lse_triton, x, poisoned.view(80, 16), labels, *args)
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty))
    assert (clean[-1].view(40, 2, 16)[unread] == 0).all()


@pytest.mark.skipif(not margin_ops.triton.INTERPRETED, reason="runs the kernels on CPU tensors (TRITON_INTERPRET=1)")
def test_external_margin_with_the_target_as_only_class():
    """Margin "external" leaves the target out of lse: with one class (two sub-centers) lse
    is −inf on rows with a target, and the gradients are finite and the reference's
    (the kernels never form exp(z − lse) there)."""
    x, weight, _ = make_inputs(5, 8, 2, F64, requires_grad=False)
    labels = torch.tensor([0, 0, -100, 0, 0])
    args = (*next(args for args in PRIMITIVE_ARGS if args[0] == "external"), None, 2)
    got = _forward_backward(torch.ops.margin.margin_lse_triton, x, weight, labels, *args)
    expected = _forward_backward(margin_ops.reference.margin_lse, x, weight, labels, *args)
    assert torch.equal(got[0].isneginf(), labels == 0)
    assert all(t.isfinite().all() for t in got[5:])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not margin_ops.triton.INTERPRETED, reason="runs the kernels on CPU tensors (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("subcenters", [1, 2])
def test_backward_over_several_class_chunks(monkeypatch, subcenters):
    """The backward's dS' scratch holds one chunk of classes at a time: with the bound shrunk
    to one CHUNK_ALIGN-class chunk, C = 600 (and class_index, hard examples, feature scale
    with K = 2) takes three chunks, whose dx̂ partials and feature-scale sums accumulate across
    launches; every output must stay the float64 reference's, and bitwise equal to the
    one-chunk backward up to the order of the chunk sums (float64 rounding)."""
    from margin_ops.triton import margin_lse_backward as bwd
    x, _, _ = make_inputs(21, 24, 1, F64, requires_grad=False)
    weight = torch.randn(700 * subcenters, 24, dtype=F64)
    class_index = torch.randperm(700)[:600] if subcenters > 1 else None
    labels = torch.randint(0, 600, (21,))
    labels[3] = -100
    options = (None, subcenters, class_index,
               *((torch.rand(21, dtype=F64) * 0.6 - 0.3, torch.rand(21, dtype=F64)) if subcenters > 1 else ()))
    args = (("sphereface", 1.0, 4.0, 0.0, 0.0, 5.0, True, False) if subcenters > 1 else PRIMITIVE_ARGS[0])
    if class_index is None:
        weight = weight[:600]
    one_chunk = _forward_backward(torch.ops.margin.margin_lse_triton, x, weight, labels, *args, *options)
    monkeypatch.setattr(bwd, "SCRATCH_BYTES", 21 * subcenters * 8 * bwd.CHUNK_ALIGN)
    chunked = _forward_backward(torch.ops.margin.margin_lse_triton, x, weight, labels, *args, *options)
    expected = _forward_backward(margin_ops.reference.margin_lse, x, weight, labels, *args, *options)
    for a, b, c in zip(chunked, one_chunk, expected):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
