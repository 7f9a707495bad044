"""The same comparisons on CUDA tensors, for each GPU backend this install has ('cuda':
the CUDA C++ kernels, 'triton'). Every test here is skipped cleanly without a GPU."""

import pytest
import torch

import margin_ops
from margin_ops import backends, reference

from conftest import (OP_CONFIGS, assert_close, call_op, compare_to_reference, config_id, leaf_copy,
                      make_inputs, requires_cuda)

pytestmark = [pytest.mark.cuda, requires_cuda]

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}
DEVICE = "cuda"


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    why = backends.available_backends()[request.param]
    if why is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {why}")
    return request.param


def test_a_gpu_backend_is_installed():
    """On a GPU machine the install must have GPU kernels (default for CUDA tensors)."""
    assert backends.default_backend("cuda") in ("cuda", "triton")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_op_matches_reference(config, reduction, dtype, gpu_backend):
    name, kwargs = config
    x, w, y = make_inputs(8, 16, 29, dtype, ignore_rows=(3,), device=DEVICE)
    compare_to_reference(name, x, w, y, backend=gpu_backend, reduction=reduction, **kwargs)


ODD_SHAPES = [(1, 16, 29), (8, 16, 1), (8, 1, 29), (1, 1, 1), (5, 13, 1009), (3, 7, 513),
              (4, 512, 3000), (3, 4096, 130), (129, 512, 70001), (1000, 64, 257)]
SHAPE_CONFIGS = [("arcface", dict(s=64.0, m=0.5)), ("cosface", dict(s=64.0, m=0.35)),
                 ("combined", dict(s=32.0, m1=0.95, m2=0.3, m3=0.1)),
                 ("sphereface", dict(m=4, lamb=2.0)), ("arcface", dict(s=64.0, m=0.5, margin_grad="detach"))]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", SHAPE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}-D{}-C{}".format(*s))
def test_op_odd_shapes(shape, config, dtype, gpu_backend):
    n, d, c = shape
    name, kwargs = config
    x, w, y = make_inputs(n, d, c, dtype, device=DEVICE)
    if c >= 3:
        picks = torch.tensor([0, c - 1, 63, 64, 127, 128, 511, 512, 1008], device=DEVICE)
        picks = picks[picks < c][:n]
        y[: len(picks)] = picks
    compare_to_reference(name, x, w, y, backend=gpu_backend, reduction="sum", cancellation=d == 1, **kwargs)


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS.get)
def test_gpu_backend_matches_cpu_kernel(dtype, gpu_backend):
    x, w, y = make_inputs(16, 32, 300, dtype, ignore_rows=(0,))
    for name, kwargs in OP_CONFIGS:
        cpu = compare_to_reference(name, x, w, y, backend="cpu", **kwargs)
        gpu = compare_to_reference(name, x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), backend=gpu_backend, **kwargs)
        assert_close(gpu.loss, cpu.loss, 1e-4 if dtype == F32 else 1e-9, f"{name} gpu vs cpu")


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_cos_exactly_one(config, sign, gpu_backend):
    name, kwargs = config
    x, w, y = make_inputs(6, 8, 10, F32, requires_grad=False, device=DEVICE)
    x[[0, 2, 3]] = sign * w[y[[0, 2, 3]]]
    got = compare_to_reference(name, x, w, y, backend=gpu_backend, reduction="sum", cancellation=True, **kwargs)
    assert torch.isfinite(got.grad_x).all() and torch.isfinite(got.grad_weight).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_edge_cases(dtype, gpu_backend):
    # empty batch
    x, w, y = make_inputs(0, 16, 29, dtype, device=DEVICE)
    loss = call_op("arcface", x, w, y, backend=gpu_backend)
    assert loss.item() == 0
    # all rows ignored
    x, w, y = make_inputs(5, 16, 29, dtype, ignore_rows=range(5), device=DEVICE)
    loss = call_op("sphereface", x, w, y, backend=gpu_backend)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and (w.grad == 0).all()
    # zero-norm rows
    x, w, y = make_inputs(6, 16, 29, dtype, requires_grad=False, device=DEVICE)
    x[1] = 0
    w[4] = 0
    y[2] = 4
    loss = call_op("arcface", leaf_copy(x), leaf_copy(w), y, backend=gpu_backend)
    ref = reference.arcface(x.double(), w.double(), y)
    assert_close(loss, ref, 1e-4, "zero-norm rows")


def test_with_stats(gpu_backend):
    x, w, y = make_inputs(7, 16, 300, F32, device=DEVICE)
    with margin_ops.backend(gpu_backend):
        out = margin_ops.with_stats("cosface", x, w, y, m=0.3)
    lse_ref = reference.margin_lse(x.double(), w.double(), y, "cosface", 64.0, m3=0.3)[0]
    assert_close(out.lse, lse_ref, 1e-5, "lse")
    cos = torch.nn.functional.normalize(x.double()) @ torch.nn.functional.normalize(w.double()).t()
    assert torch.equal(out.pred, cos.argmax(1))


@pytest.mark.parametrize("name", ["arcface", "sphereface"])
def test_autocast_cuda(name, gpu_backend):
    x, w, y = make_inputs(8, 64, 100, F32, device=DEVICE)
    x1, w1 = leaf_copy(x), leaf_copy(w)
    with margin_ops.backend(gpu_backend), torch.autocast("cuda", dtype=BF16):
        loss = getattr(torch.ops.margin, name)(x1, w1, y)
    assert loss.dtype == F32
    loss.backward()
    assert x1.grad.dtype == F32 and w1.grad.dtype == F32
    x2, w2 = leaf_copy(x), leaf_copy(w)
    with margin_ops.backend(gpu_backend):
        manual = getattr(torch.ops.margin, name)(x2.to(BF16), w2.to(BF16), y)
    manual.backward()
    assert_close(loss, manual, 1e-6, "loss")
    assert_close(x1.grad, x2.grad, 1e-6, "grad_x")


def test_opcheck_cuda(gpu_backend):
    x, w, y = make_inputs(5, 16, 40, F32, device=DEVICE)
    with margin_ops.backend(gpu_backend):
        torch.library.opcheck(torch.ops.margin.arcface.default, (x, w, y))
        torch.library.opcheck(torch.ops.margin.sphereface.default, (x, w, y), dict(m=3, lamb=1.0))


def test_compile_cuda(gpu_backend):
    torch._dynamo.reset()
    x, w, y = make_inputs(16, 64, 1000, F32, device=DEVICE)

    def head(x, w, y):
        return torch.ops.margin.arcface(x, w, y, s=32.0)

    with margin_ops.backend(gpu_backend):
        compiled = torch.compile(head, fullgraph=True)
        xa, wa = leaf_copy(x), leaf_copy(w)
        la = compiled(xa, wa, y)
        la.backward()
        xb, wb = leaf_copy(x), leaf_copy(w)
        lb = head(xb, wb, y)
        lb.backward()
    assert_close(la, lb, 1e-5, "loss")
    assert_close(xa.grad, xb.grad, 1e-5, "grad_x")
    assert_close(wa.grad, wb.grad, 1e-5, "grad_w")


def test_n_times_c_beyond_int32(gpu_backend):
    """N·C > 2^31: flat indices i·C + c overflow int32. Compared with the reference in row
    chunks (the reference materializes N x C), targets at the far end of both axes. Also
    checks that the op never holds an N x C buffer."""
    n, c, d = 2048, 2**20 + 7, 16
    assert n * c > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory for the chunked reference")
    x, w, y = make_inputs(n, d, c, BF16, device=DEVICE)
    y[-1], y[-2], y[0] = c - 1, c - 2, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with margin_ops.backend(gpu_backend):
        loss = torch.ops.margin.arcface(x, w, y, reduction="sum")
        loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * c * 4 / 8, f"{extra / 2**20:.0f} MiB: an N x C float32 buffer is {n * c * 4 / 2**20:.0f} MiB"

    w64 = w.detach().double().requires_grad_(True)
    total = torch.zeros((), dtype=F64, device=DEVICE)
    grad_x = torch.empty(n, d, dtype=F64, device=DEVICE)
    for start in range(0, n, 32):
        xc = x.detach()[start:start + 32].double().requires_grad_(True)
        lc = reference.arcface(xc, w64, y[start:start + 32], reduction="sum")
        lc.backward()
        grad_x[start:start + 32] = xc.grad
        total += lc.detach()
    assert_close(loss, total, 1e-4, "loss")
    assert_close(x.grad, grad_x, 1e-2, "grad_x")
    assert_close(w.grad, w64.grad, 1e-2, "grad_weight")
