"""The backend switch (context manager, environment variable, defaults, errors), the CPU
kernel's threading, and the TF32 setting both GPU backends read. What every backend must
compute is the conformance suite's (tests/conformance)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import margin_ops
from margin_ops import backends, reference

from conftest import REFERENCE_FNS, assert_close, call_op, compare_to_reference, make_inputs, make_op_inputs

F32 = torch.float32
LOSSES = margin_ops.ops.LOSSES


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result(threads):
    """Per-thread accumulators in the CPU kernel's backward: any thread count gives the reference."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, w, y = make_inputs(4, 64, 9000, F32)  # 3 class blocks (4096 rows each)
        compare_to_reference("arcface", x, w, y)
        compare_to_reference("sphereface", x, w, y, m=2)
    finally:
        torch.set_num_threads(before)


def test_default_backend_on_cpu_is_the_cpu_kernel():
    assert margin_ops.current_backend("cpu") == "cpu"
    assert backends.available_backends()["cpu"] is None
    assert backends.available_backends()["reference"] is None


class _LogOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", LOSSES)
def test_backend_switch_routes_to_cpu_kernel_or_reference(name):
    (x, w, y), kwargs = make_op_inputs(name, {}, 6, 9, 11, F32)
    with _LogOps() as log:
        loss_cpu = call_op(name, x, w, y, backend="cpu", **kwargs)
    assert "margin.margin_lse.default" in log.calls
    with _LogOps() as log:
        loss_ref = call_op(name, x, w, y, backend="reference", **kwargs)
    assert not any(c.startswith("margin.") for c in log.calls), log.calls
    want = REFERENCE_FNS[name](x, w, y, **kwargs)
    if name in ("adaptive", "curricular"):
        # these ops add their per-row margin around the primitive (docs/design.md §1.8), which
        # the reference states with the whole logits: the same value, not the same rounding
        assert_close(loss_ref, want, 1e-6, "reference backend vs margin_ops.reference")
    else:  # the reference backend computes exactly what margin_ops.reference computes
        assert torch.equal(loss_ref, want)
    assert_close(loss_cpu, loss_ref, 1e-4, "cpu vs reference backend")


# ---------------------------------------------------------------------------------------
# Backend selection


def test_env_var_selects_backend(monkeypatch):
    x, w, y = make_inputs(4, 8, 9, F32)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert margin_ops.current_backend("cpu") == "reference"
    with _LogOps() as log:
        loss = torch.ops.margin.cosface(x, w, y)
    assert "margin.margin_lse.default" not in log.calls
    assert torch.equal(loss, reference.cosface(x, w, y))
    # the context manager overrides the environment
    with margin_ops.backend("cpu"), _LogOps() as log:
        torch.ops.margin.cosface(x, w, y)
    assert "margin.margin_lse.default" in log.calls
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with _LogOps() as log:
        torch.ops.margin.cosface(x, w, y)
    assert "margin.margin_lse.default" in log.calls


def test_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with margin_ops.backend("nope"):
            pass
    x, w, y = make_inputs(4, 8, 9, F32)
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        torch.ops.margin.arcface(x, w, y)


def test_cuda_backend_on_cpu_tensors_raises():
    """'not available' without CUDA kernels, 'cannot run on cpu tensors' with them."""
    x, w, y = make_inputs(4, 8, 9, F32)
    with pytest.raises(RuntimeError, match="backend 'cuda' (is not available|cannot run on cpu tensors)"):
        call_op("arcface", x, w, y, backend="cuda")


def test_backend_that_cannot_run_on_the_device_raises(monkeypatch):
    """A usable backend for the wrong device type is an error, never a silent fallback."""
    fake = backends.Backend(reference.margin_lse, lambda: ("cuda",), lambda: None)
    monkeypatch.setitem(backends._registry, "cuda", fake)
    x, w, y = make_inputs(4, 8, 9, F32)
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        call_op("arcface", x, w, y, backend="cuda")


@pytest.mark.slow
def test_python_m_margin_ops_lists_backends():
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    run = subprocess.run([sys.executable, "-m", "margin_ops"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    for name in backends.BACKENDS:
        assert name in run.stdout
    assert "default for cpu: cpu" in run.stdout
    assert margin_ops.__version__ in run.stdout


@pytest.mark.slow
def test_tf32_follows_both_precision_apis():
    """float32 may be TF32 when either torch.set_float32_matmul_precision or the newer
    torch.backends...fp32_precision says so (legacy getters raise once only the new API
    was used). In a child process: these settings are global."""
    script = """
import json
import torch
from margin_ops.backends import tf32_allowed
seen = [tf32_allowed()]
torch.set_float32_matmul_precision("high"); seen.append(tf32_allowed())
torch.set_float32_matmul_precision("highest"); seen.append(tf32_allowed())
if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
    torch.backends.cuda.matmul.fp32_precision = "tf32"; seen.append(tf32_allowed())
    torch.backends.cuda.matmul.fp32_precision = "ieee"; seen.append(tf32_allowed())
print(json.dumps(seen))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == [False, True, False, True, False][:len(seen)] and len(seen) >= 3, seen
