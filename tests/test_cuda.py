"""The same comparisons on CUDA tensors, for each GPU backend this install has ('cuda':
the CUDA C++ kernels, 'triton'). Every test here is skipped cleanly without a GPU."""

import pytest
import torch

import margin_ops
from margin_ops import backends, reference

from conftest import (OP_CONFIGS, SHAPE_CONFIGS, assert_close, call_op, check_nan_propagation,
                      compare_to_reference, config_id, leaf_copy, make_inputs, matmul_precision,
                      place_targets, requires_cuda, run_with_grads)

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


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", SHAPE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}-D{}-C{}".format(*s))
def test_op_odd_shapes(shape, config, dtype, gpu_backend):
    n, d, c = shape
    name, kwargs = config
    x, w, y = make_inputs(n, d, c, dtype, device=DEVICE)
    if c >= 3:
        place_targets(y, c, [0, c - 1, 63, 64, 127, 128, 511, 512, 1008])
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
def test_nan_propagates(dtype, gpu_backend):
    check_nan_propagation(gpu_backend, DEVICE, dtype)


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


@pytest.mark.parametrize("config", [("arcface", dict(s=16.0, m=0.5)), ("sphereface", dict(m=4, lamb=5.0))],
                         ids=config_id)
def test_float32_high_precision_is_tf32(config, gpu_backend):
    """Under torch.set_float32_matmul_precision("high") float32 products may be TF32, as
    cuBLAS's are: 10-bit mantissas, so cosines carry ~1e-4 and logits ~s·1e-4 of error, a
    ~1 % relative error on each probability; the loss and both gradients must stay within
    2e-2 (max-scaled) of the float64 reference, and differ from "highest" (TF32 ran)."""
    name, kwargs = config
    x, w, y = make_inputs(64, 256, 4099, F32, device=DEVICE)
    with matmul_precision("high"):
        tf32 = compare_to_reference(name, x, w, y, backend=gpu_backend, rtol=2e-2, **kwargs)
    exact = call_op(name, x.detach(), w.detach(), y, backend=gpu_backend, **kwargs)
    assert not torch.equal(tf32.loss, exact), "float32 gave the same bits under high and highest"


def test_backward_keeps_the_forwards_tf32_choice(gpu_backend):
    """The backward recomputes the cosines with the forward's TF32 choice, not with the
    precision in force when it runs (else P = exp(logit − lse) would mix two cosines)."""
    x, w, y = make_inputs(64, 256, 4099, F32, device=DEVICE)

    def grads(backward_precision):
        xl, wl = leaf_copy(x), leaf_copy(w)
        with matmul_precision("high"), margin_ops.backend(gpu_backend):
            loss = torch.ops.margin.arcface(xl, wl, y)
        with matmul_precision(backward_precision):
            loss.backward()
        return xl.grad, wl.grad

    same, switched = grads("high"), grads("highest")
    assert torch.equal(same[0], switched[0]) and torch.equal(same[1], switched[1])


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


def _step(name, x, w, y, **kwargs):
    """Loss, grad_x, grad_weight of torch.ops.margin.<name> on fresh leaves of x and w."""
    return run_with_grads(getattr(torch.ops.margin, name), x, w, y, **kwargs)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_bitwise_repeatable(dtype, deterministic, gpu_backend):
    """Same inputs, same device: bitwise identical loss and gradients, run after run (the
    kernels have no atomics; torch.use_deterministic_algorithms only records the wish)."""
    x, w, y = make_inputs(300, 96, 20011, dtype, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with margin_ops.backend(gpu_backend):
            runs = [_step("arcface", x, w, y) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        for got, first, what in zip(run, runs[0], ("loss", "grad_x", "grad_weight")):
            assert torch.equal(got, first), f"{what} differs between runs"


def test_cuda_graph_training_step(gpu_backend):
    """A training step (forward, backward, SGD update) that calls the op is captured in a
    CUDA graph (no host synchronisation inside) and its replay on new data matches eager."""
    x, w, y = make_inputs(64, 128, 5003, BF16, requires_grad=False, device=DEVICE)
    static_x, static_y = x.clone(), y.clone()
    weight = w.clone().requires_grad_(True)
    features = static_x.clone().requires_grad_(True)

    def train_step():
        features.grad = weight.grad = None
        loss = torch.ops.margin.arcface(features, weight, static_y)
        loss.backward()
        with torch.no_grad():
            weight.sub_(0.1 * weight.grad)
        return loss

    with margin_ops.backend(gpu_backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                train_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = train_step()

        new_x, _, new_y = make_inputs(64, 128, 5003, BF16, requires_grad=False, device=DEVICE)
        weight_before = weight.detach().clone()
        with torch.no_grad():
            features.copy_(new_x)
            static_y.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        loss, grad_x, grad_w = _step("arcface", new_x, weight_before, new_y)
    assert torch.equal(static_loss, loss)
    assert torch.equal(features.grad, grad_x)
    assert torch.equal(weight.detach(), weight_before - 0.1 * grad_w)


def test_non_default_stream(gpu_backend):
    """Work enqueued on a side stream (inputs produced there too) gives the default stream's
    results: the kernels launch on the current stream, not on the legacy default one."""
    x, w, y = make_inputs(100, 64, 3001, BF16, requires_grad=False, device=DEVICE)
    with margin_ops.backend(gpu_backend):
        expected = _step("cosface", x, w, y)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)  # keeps the side stream busy: a kernel on the wrong
            xs, ws = x * 1, w * 1          # stream would read xs, ws before they are written
            got = _step("cosface", xs, ws, y)
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for g, e, what in zip(got, expected, ("loss", "grad_x", "grad_weight")):
        assert torch.equal(g, e), f"{what} differs on a side stream"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device(gpu_backend):
    """Tensors on cuda:1 while cuda:0 is current: computed on cuda:1, equal to cuda:0's."""
    x, w, y = make_inputs(40, 32, 1001, F32, requires_grad=False, device="cuda:0")
    with margin_ops.backend(gpu_backend):
        expected = _step("sphereface", x, w, y, m=4, lamb=5.0)
        with torch.cuda.device(0):
            got = _step("sphereface", x.to("cuda:1"), w.to("cuda:1"), y.to("cuda:1"), m=4, lamb=5.0)
    for g, e, what in zip(got, expected, ("loss", "grad_x", "grad_weight")):
        assert g.device == torch.device("cuda:1"), f"{what} on {g.device}"
        assert torch.equal(g.cpu(), e.cpu()), f"{what} differs on cuda:1"
