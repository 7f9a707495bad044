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
