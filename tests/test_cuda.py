"""What only a GPU can show, for each GPU backend this install has ('cuda': the CUDA C++
kernels, 'triton'): N·C past int32 without an N x C buffer, run-to-run bitwise
repeatability at scale, CUDA graphs, streams, a second device, the backward's TF32 choice.
What every backend must compute is the conformance suite's (tests/conformance, whose
'cuda' and 'triton' backends run there). Every test here is skipped cleanly without a GPU."""

import pytest
import torch

import margin_ops
from margin_ops import backends, reference

from conftest import assert_close, leaf_copy, make_inputs, matmul_precision, requires_cuda, run_with_grads

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


def _kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


#: Which kernels a bf16 ArcFace step runs on compute capability 9.0, per problem
#: (csrc/cuda/margin_lse_kernels.cuh says where each applies): (N, D, C, sub-centers, W's
#: storage offset in elements, kernels that must run, kernels that must not).
SM90_CASES = {
    # d % 64 == 0, d <= 512, N <= 1024: the fused backward; bwd_gemm_sm90 for dX
    "fused": (256, 512, 20011, 1, 0, ("fwd_main_sm90_kernel", "bwd_fused_sm90_kernel", "bwd_gemm_sm90_kernel"),
              ("bwd_tile_sm90_kernel", "fwd_main_kernel")),
    # d % 64 != 0: the three-launch sm_90a backward
    "d-not-64": (256, 520, 20011, 1, 0, ("fwd_main_sm90_kernel", "bwd_tile_sm90_kernel", "bwd_gemm_sm90_kernel"),
                 ("bwd_fused_sm90_kernel", "fwd_main_kernel")),
    # sub-centers: the mma.sync cosine kernels; dW / dX read them through strided tensor maps
    "subcenters": (256, 512, 20011, 2, 0, ("fwd_main_kernel", "bwd_gemm_sm90_kernel"),
                   ("fwd_main_sm90_kernel", "bwd_tile_sm90_kernel", "bwd_fused_sm90_kernel")),
    # W 4 bytes past a 16-byte boundary: no TMA of W (the mma.sync cosine kernels, bwd_dx),
    # the sm_90a dW GEMM storing element by element (its 16-byte path needs aligned rows)
    "unaligned-weight": (100, 136, 3001, 1, 2, ("fwd_main_kernel", "bwd_gemm_sm90_kernel", "bwd_dx_kernel"),
                         ("fwd_main_sm90_kernel", "bwd_tile_sm90_kernel", "bwd_fused_sm90_kernel")),
}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a compute capability 9.0 GPU (H100 / H200)")
@pytest.mark.parametrize("case", SM90_CASES)
def test_sm90_kernels_run_where_eligible(case):
    """No silent slow path and no wrong fast one: on sm_90 each problem runs the kernels its
    conditions select, and its loss and gradients match the float64 reference at bf16's
    fused tolerances."""
    if backends.available_backends()["cuda"] is not None:
        pytest.skip("the CUDA kernels are not built")
    n, d, c, k, offset, must, must_not = SM90_CASES[case]
    x, w, y = make_inputs(n, d, c * k, BF16, requires_grad=False, device=DEVICE)
    y = y % c
    storage = torch.cat([torch.zeros(offset, dtype=BF16, device=DEVICE), w.flatten()]).requires_grad_()
    w_in = storage[offset:].view(w.shape)
    x = x.clone().requires_grad_()
    with margin_ops.backend("cuda"):
        def step():
            loss = torch.ops.margin.arcface(x, w_in, y, subcenters=k)
            loss.backward()
            return loss.detach()
        names = _kernel_names(step)
        x.grad = storage.grad = None
        loss = step()
    for kernel in must:
        assert any(kernel in name for name in names), f"{kernel} did not run; ran: {sorted(names)}"
    for kernel in must_not:
        assert not any(kernel in name for name in names), f"{kernel} ran: {sorted(names)}"
    x64, w64 = x.detach().double().requires_grad_(), w.double().requires_grad_()
    want = reference.arcface(x64, w64, y, subcenters=k)
    want.backward()
    assert_close(loss, want, 1e-4, "loss")
    assert_close(x.grad, x64.grad, 1e-2, "grad_x")
    assert_close(storage.grad[offset:].view(w.shape), w64.grad, 1e-2, "grad_weight")
