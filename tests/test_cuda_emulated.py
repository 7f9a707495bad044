"""The CUDA C++ kernels (csrc/cuda/*.cu), run on the CPU by a host emulator of the CUDA
execution model (tests/cuda_emulator), against the float64 reference.

The kernels' own source is compiled with g++ (only the launch syntax and the PTX wrappers are
swapped: see tests/cuda_emulator/build_emulator.py), and its blocks run as cooperative fibers with
barriers, warp-synchronous shuffles, ldmatrix and mma.sync given their PTX semantics, and
cp.async copies that land only when waited for. That checks on any machine what a GPU run
checks of the math and the indexing: tile and fragment layouts, bounds and padding, the
class splits and chunks, the merges, the normalization and margin epilogues, barrier
placement. It does not check timing, races that none of its four thread schedules
exposes, or the code nvcc generates; tests/test_cuda.py does that on a GPU.

The emulated kernels are wired in as the "cuda" backend for CPU tensors (fixture
``emulated_cuda_backend``), so the public ops run on them with their autograd formula.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

import margin_ops
from margin_ops import backends, ops, reference

from conftest import (OP_CONFIGS, PRIMITIVE_ARGS, assert_close, call_op, check_nan_propagation,
                      compare_to_reference, config_id, make_inputs, matmul_precision)

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulator"))
import build_emulator  # noqa: E402

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}

#: The device size the launchers are told (it sets the forward's class splits and the
#: backward's dX splits): 2 SMs give several splits on the small problems here.
NUM_SMS = 2


def _load_emulator():
    if build_emulator.cuda_include_dir() is None and not os.environ.get("MARGIN_OPS_REQUIRE_EMULATOR"):
        pytest.skip("CUDA headers not found (set CUDA_HOME); .ci/run requires them and runs these tests")
    return build_emulator.load()


_module = None


def emulator():
    """The compiled emulator extension (built on first use, incrementally)."""
    global _module
    if _module is None:
        _module = _load_emulator()
    return _module


def _tf32(x: torch.Tensor, allow_tf32) -> bool:
    return x.dtype == F32 and (backends.tf32_allowed() if allow_tf32 is None else allow_tf32)


def _forward(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach, allow_tf32=None):
    return emulator().forward(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach,
                              _tf32(x, allow_tf32), NUM_SMS)


def _backward(grad_lse, grad_target, x, weight, labels, lse, margin, s, m1, m2, m3, lamb, feature_scale,
              detach, allow_tf32=None):
    return emulator().backward(grad_lse, grad_target, x, weight, labels, lse, margin, s, m1, m2, m3, lamb,
                               feature_scale, detach, _tf32(x, allow_tf32), NUM_SMS)


# Twins of the primitives with the emulated kernels for CPU tensors (the schemas are the C++
# block's), with the ops' autograd formula, as margin_ops.triton defines its twins.
_lib = torch.library.Library("margin", "FRAGMENT")
for _original, _name, _kernel in (("margin_lse", "margin_lse_cuda_emulated", _forward),
                                  ("margin_lse_backward", "margin_lse_backward_cuda_emulated", _backward)):
    _schema = str(getattr(torch.ops.margin, _original).default._schema)
    _lib.define(_name + _schema[_schema.index("("):])
    _lib.impl(_name, _kernel, "CPU")
ops.register_primitive(_lib, "margin_lse_cuda_emulated", "margin_lse_backward_cuda_emulated")


@pytest.fixture(autouse=True)
def emulated_cuda_backend(monkeypatch):
    """Backend "cuda" = the emulated CUDA kernels, for CPU tensors, inside each test."""
    emulator()
    monkeypatch.setitem(backends._registry, "cuda", backends.Backend(
        margin_lse=torch.ops.margin.margin_lse_cuda_emulated, devices=lambda: ("cpu",), missing=lambda: None))


def test_rewrite_keeps_everything_but_the_launch_syntax():
    src = ("  k<T><<<unsigned(g), kThreads, 0, stream>>>(args);\n"
           "  extern __shared__ __align__(16) unsigned char s[];\n"
           "  __shared__ Acc s_max[C::kWarpsN][C::BM];")
    out = build_emulator.rewrite_kernel_source(src).splitlines()[1:]
    assert out == ["  ::emu::launch(unsigned(g), kThreads, 0, stream, k<T>, args);",
                   "  unsigned char* s = reinterpret_cast<unsigned char*>(::emu::dynamic_smem());",
                   "  __shared__ Acc s_max[C::kWarpsN][C::BM]; ::emu::poison_shared(&s_max, sizeof(s_max));"]


# ---------------------------------------------------------------------------------------
# The primitive pair against the reference


#: (values, gradients) tolerances per kernel dtype, max-scaled (conftest.assert_close).
#: float64: the DFMA kernel, reduction order only. float32 ("highest"): FFMA cosines.
#: TF32: operands rounded to 10 mantissa bits (2^-11 relative) before the products, a
#: cosine error ~1e-4 times s = 64 in the logits: 2e-2, as tests/test_cuda.py's TF32 case.
#: bf16 / fp16: fp32-exact values from the same rounded inputs; the gradient GEMMs take x̂
#: and dS' rounded to 16 bits (margin_lse_kernels.cuh, "Precision": up to 5.2e-3 seen in bf16).
PRIMITIVE_TOLERANCES = {"f64": (1e-12, 1e-10), "f32": (1e-5, 1e-4), "tf32": (2e-2, 2e-2),
                        "bf16": (1e-5, 1e-2), "f16": (1e-5, 4e-3)}
KERNEL_DTYPES = {"f64": (F64, False), "f32": (F32, False), "tf32": (F32, True), "bf16": (BF16, False),
                 "f16": (F16, False)}


def assert_pred_is_a_max(pred, x, w, max_cos, tol):
    """pred (N,) picks, for each row, a class whose exact cosine is within ``tol`` of the
    row's largest, max_cos (N,): for ties (D = 1) and TF32 cosines that may reorder them."""
    cos = reference.cosine(x.detach().double(), w.detach().double()).clamp(-1, 1)
    assert (cos.gather(1, pred[:, None]).squeeze(1) >= max_cos - tol).all(), (pred, cos.argmax(1))


def primitive_vs_reference(x, w, y, args, allow_tf32, tol, grad_tol):
    lse, target, max_cos, pred = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args, allow_tf32)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    want = reference.margin_lse(x64, w64, y, *args)
    acc = F64 if x.dtype == F64 else F32
    assert lse.dtype == target.dtype == max_cos.dtype == acc and pred.dtype == torch.int64
    scale = args[1] if not args[6] else x64.detach().norm(dim=1).max().item()
    assert_close(lse, want[0], tol, "lse", atol=tol * max(1.0, scale))
    assert_close(target, want[1], tol, "target_logit", atol=tol * max(1.0, scale))
    assert_close(max_cos, want[2], tol, "max_cos", atol=tol)
    if allow_tf32:  # TF32 cosines may reorder near-ties
        assert_pred_is_a_max(pred, x, w, want[2], 2 * tol)
    else:
        assert torch.equal(pred, want[3]), (pred, want[3])
    g_lse, g_target = torch.randn(x.shape[0], dtype=acc), torch.randn(x.shape[0], dtype=acc)
    grad_x, grad_w = torch.ops.margin.margin_lse_backward_cuda_emulated(g_lse, g_target, x, w, y, lse, *args,
                                                                        allow_tf32)
    want_x, want_w = torch.autograd.grad((want[0] * g_lse).sum() + (want[1] * g_target).sum(), [x64, w64])
    assert grad_x.dtype == x.dtype and grad_w.dtype == w.dtype
    assert_close(grad_x, want_x, grad_tol, "grad_x")
    assert_close(grad_w, want_w, grad_tol, "grad_weight")


@pytest.mark.parametrize("kind", KERNEL_DTYPES)
@pytest.mark.parametrize("args", PRIMITIVE_ARGS, ids=lambda a: a[0])
def test_primitive_matches_reference(args, kind):
    """Rows with no target (below 0; past C inside the last class tile); D = 40: 16-byte
    cp.async rows for every dtype; C = 300: three class tiles and splits, and in the
    backward several class chunks."""
    dtype, allow_tf32 = KERNEL_DTYPES[kind]
    x, w, y = make_inputs(7, 40, 300, dtype, requires_grad=False)
    y[1], y[4] = -100, 310
    primitive_vs_reference(x, w, y, args, allow_tf32, *PRIMITIVE_TOLERANCES[kind])


# (N, D, C): one row, one class, D = 1 (|cos| = 1); D = 13 (no 16-byte rows: the scalar
# loads); N over one row tile (128); D over one dW/dX tile (128) and many k steps; C over
# several forward splits of several tiles each and several backward chunks and dX splits;
# Liger-Kernel's "weird" 3 x 131 x 1009 (odd D, prime C).
PRIMITIVE_SHAPES = [(1, 16, 1), (3, 1, 29), (5, 13, 300), (130, 24, 70), (3, 136, 40), (9, 64, 1100),
                    (3, 131, 1009)]


@pytest.mark.parametrize("kind", ["f32", "tf32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("shape", PRIMITIVE_SHAPES, ids=lambda s: "N{}-D{}-C{}".format(*s))
def test_primitive_shapes(shape, kind):
    dtype, allow_tf32 = KERNEL_DTYPES[kind]
    x, w, y = make_inputs(*shape, dtype, requires_grad=False)
    args = PRIMITIVE_ARGS[PRIMITIVE_SHAPES.index(shape) % len(PRIMITIVE_ARGS)]  # a different φ per shape
    if shape[1] == 1:
        # |cos| = 1 everywhere: the gradients are cancellation noise and the classes tie
        # for the max, so pred may be any class whose exact cosine is the maximum.
        _, _, max_cos, pred = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args, allow_tf32)
        want = reference.margin_lse(x.double(), w.double(), y, *args)
        assert_close(max_cos, want[2], PRIMITIVE_TOLERANCES[kind][0], "max_cos", atol=1e-6)
        assert_pred_is_a_max(pred, x, w, want[2], 1e-6)
        return
    primitive_vs_reference(x, w, y, args, allow_tf32, *PRIMITIVE_TOLERANCES[kind])


# ---------------------------------------------------------------------------------------
# The public ops on the emulated kernels (autograd through margin_lse_backward)


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_op_matches_reference(config, dtype):
    name, kwargs = config
    x, w, y = make_inputs(8, 16, 29, dtype, ignore_rows=(3,))
    compare_to_reference(name, x, w, y, backend="cuda", **kwargs)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("config", OP_CONFIGS[::4], ids=config_id)
def test_op_reductions(config, reduction):
    name, kwargs = config
    x, w, y = make_inputs(6, 24, 140, BF16, ignore_rows=(0,))
    compare_to_reference(name, x, w, y, backend="cuda", reduction=reduction, **kwargs)


@pytest.mark.parametrize("config", OP_CONFIGS[::3], ids=config_id)
def test_float32_high_precision_is_tf32(config):
    """Under matmul precision "high" the float32 kernels take the TF32 path: within 2e-2 of
    the reference, and not the bits of "highest"."""
    name, kwargs = config
    x, w, y = make_inputs(8, 48, 200, F32)
    exact = call_op(name, x, w, y, backend="cuda", **kwargs)
    with matmul_precision("high"):
        tf32 = compare_to_reference(name, x, w, y, backend="cuda", rtol=2e-2, **kwargs)
    assert not torch.equal(tf32.loss, exact), "float32 gave the same bits under high and highest"


def test_every_row_parallel_to_its_class():
    """|cos| = 1 at every target (x_i = a multiple of w_{y_i}): φ at the end of its domain."""
    x, w, y = make_inputs(6, 32, 50, F32)
    x = (w.detach()[y] * torch.rand(6, 1, dtype=F32).add(0.5)).requires_grad_()
    for name, kwargs in OP_CONFIGS[::2]:
        compare_to_reference(name, x, w, y, backend="cuda", cancellation=True, **kwargs)


def test_zero_norm_rows():
    """A zero feature row and a zero class row: cosines 0 through the eps floor, finite grads."""
    x, w, y = make_inputs(5, 24, 40, F32)
    with torch.no_grad():
        x[2] = 0
        w[7] = 0
    y[4] = 7
    for name, kwargs in OP_CONFIGS[::3]:
        compare_to_reference(name, x, w, y, backend="cuda", **kwargs)


def test_pred_ties_pick_the_lowest_class():
    x, w, y = make_inputs(4, 16, 300, F32, requires_grad=False)
    w[250] = w[3]  # same cosine, classes in different tiles and splits
    x[0] = w[3] * 2
    _, _, max_cos, pred = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *PRIMITIVE_ARGS[0], False)
    assert pred[0].item() == 3 and abs(max_cos[0].item() - 1) < 1e-6


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_results_do_not_depend_on_thread_timing(dtype):
    """The kernels reduce in a fixed order (no atomics): forward and backward give the same
    bits whichever order the threads run in (the deterministic-mode claim)."""
    x, w, y = make_inputs(130, 64, 600, dtype, requires_grad=False)
    args = PRIMITIVE_ARGS[0]
    g = torch.randn(130), torch.randn(130)
    results = []
    try:
        for schedule in (0, 1, 2, 3):
            emulator().set_schedule(schedule)
            fwd = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args, False)
            bwd = torch.ops.margin.margin_lse_backward_cuda_emulated(*g, x, w, y, fwd[0], *args, False)
            results.append(fwd + bwd)
    finally:
        emulator().set_schedule(0)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_nan_propagates(dtype):
    check_nan_propagation("cuda", "cpu", dtype)


def test_the_public_ops_run_on_the_emulated_kernels(monkeypatch):
    """The fixture's wiring is real: the op's loss comes from the emulated forward."""
    calls = []
    original = emulator().forward
    monkeypatch.setattr(_module, "forward", lambda *a: calls.append(1) or original(*a))
    x, w, y = make_inputs(4, 8, 9, F32)
    call_op("arcface", x, w, y, backend="cuda")
    assert calls == [1]
    assert margin_ops.backends.current_backend("cpu") == "cpu"  # default unchanged


@pytest.mark.parametrize("schedule", [1, 2, 3], ids=["warps-ascending", "warps-descending", "random"])
@pytest.mark.parametrize("kind", ["f32", "tf32", "bf16", "f16", "f64"])
def test_primitive_under_other_schedules(kind, schedule):
    """The same results when each warp runs as far ahead of the others as the barriers let
    it, or when threads run in random order (lanes of one warp included): a missing barrier
    between one thread's shared-memory writes and another's reads would show here (poisoned
    or stale tiles) even where round robin hides it."""
    dtype, allow_tf32 = KERNEL_DTYPES[kind]
    x, w, y = make_inputs(130, 40, 600, dtype, requires_grad=False)
    y[5] = -100
    emulator().set_schedule(schedule)
    try:
        primitive_vs_reference(x, w, y, PRIMITIVE_ARGS[0], allow_tf32, *PRIMITIVE_TOLERANCES[kind])
    finally:
        emulator().set_schedule(0)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_unaligned_inputs(dtype):
    """x and weight starting 2 elements past a 16-byte boundary, with D a multiple of the
    16-byte vector: the kernels must fall back to scalar loads (the emulator fails a
    cp.async from an unaligned address)."""
    n, d, c = 6, 32, 300
    x = torch.randn(n * d + 2, dtype=torch.float64).to(dtype)[2:].view(n, d)
    w = torch.randn(c * d + 2, dtype=torch.float64).to(dtype)[2:].view(c, d)
    y = torch.randint(0, c, (n,))
    assert x.data_ptr() % 16 and w.data_ptr() % 16
    primitive_vs_reference(x, w, y, PRIMITIVE_ARGS[0], False, *PRIMITIVE_TOLERANCES[DTYPE_IDS[dtype]])


def test_large_batch():
    """Eight row tiles and a class count that is no multiple of any tile."""
    x, w, y = make_inputs(1000, 24, 257, BF16, requires_grad=False)
    primitive_vs_reference(x, w, y, PRIMITIVE_ARGS[3], False, *PRIMITIVE_TOLERANCES["bf16"])


# ---------------------------------------------------------------------------------------
# The emulated PTX against fragment layouts written down independently: CUTLASS's CuTe
# traits (mma_traits_sm80.hpp, copy_traits_sm75.hpp), as (shape, stride) data. A CuTe
# layout maps a flat coordinate, decomposed first-mode-fastest, to an index.


def _cute(shape, stride, i):
    index = 0
    for s, d in zip(shape, stride):
        index += (i % s) * d
        i //= s
    return index


# Per MMA kind: (A thread, A value, A rows M), (B thread, B value, B rows N), (C thread,
# C value, C rows M), K, values per 32-bit register. A is M x K, B is N x K, C is M x N,
# each column-major in the layout's index.
_MMA_LAYOUTS = {
    "bf16": (((4, 8), (32, 1)), ((2, 2, 2), (16, 8, 128)), ((4, 8), (16, 1)), ((2, 2), (8, 64)), 16, 2),
    "f16": (((4, 8), (32, 1)), ((2, 2, 2), (16, 8, 128)), ((4, 8), (16, 1)), ((2, 2), (8, 64)), 16, 2),
    "tf32": (((4, 8), (16, 1)), ((2, 2), (8, 64)), ((4, 8), (8, 1)), ((2,), (32,)), 8, 1),
}
_C_LAYOUT = (((4, 8), (32, 1)), ((2, 2), (16, 8)))


def _element_bits(values: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 values (exact in the kind's type) -> their bits as int64."""
    if kind == "tf32":
        return values.float().view(torch.int32).long() & 0xFFFFFFFF
    dtype = BF16 if kind == "bf16" else F16
    return values.to(dtype).view(torch.int16).long() & 0xFFFF


@pytest.mark.parametrize("kind", ["bf16", "f16", "tf32"])
def test_emulated_mma_matches_cute_layouts(kind):
    (a_thr, a_val, b_thr, b_val, k, per_reg) = _MMA_LAYOUTS[kind]
    dtype = F32 if kind == "tf32" else (BF16 if kind == "bf16" else F16)
    a = torch.randn(16, k).to(dtype).double()
    b = torch.randn(8, k).to(dtype).double()
    if kind == "tf32":  # exact in TF32: 10 mantissa bits
        a, b = (t.float().view(torch.int32).bitwise_and(-8192).view(torch.float32).double() for t in (a, b))
    c = torch.randn(16, 8)
    a_bits, b_bits = _element_bits(a, kind), _element_bits(b, kind)
    regs_a = torch.zeros(32, 4, dtype=torch.int64)
    regs_b = torch.zeros(32, 2, dtype=torch.int64)
    c_in = torch.zeros(32, 4)
    shift = 32 // per_reg
    for t in range(32):
        for v in range(4 * per_reg):
            idx = _cute(*a_thr, t) + _cute(*a_val, v)
            regs_a[t, v // per_reg] |= a_bits[idx % 16, idx // 16] << (shift * (v % per_reg))
        for v in range(2 * per_reg):
            idx = _cute(*b_thr, t) + _cute(*b_val, v)
            regs_b[t, v // per_reg] |= b_bits[idx % 8, idx // 8] << (shift * (v % per_reg))
        for v in range(4):
            idx = _cute(*_C_LAYOUT[0], t) + _cute(*_C_LAYOUT[1], v)
            c_in[t, v] = c[idx % 16, idx // 16]
    to_i32 = lambda r: torch.where(r >= 2**31, r - 2**32, r).int()  # noqa: E731
    d = emulator().probe_mma({"bf16": 0, "f16": 1, "tf32": 2}[kind], to_i32(regs_a), to_i32(regs_b), c_in)
    want = a @ b.t() + c.double()
    for t in range(32):
        for v in range(4):
            idx = _cute(*_C_LAYOUT[0], t) + _cute(*_C_LAYOUT[1], v)
            assert abs(d[t, v].item() - want[idx % 16, idx // 16].item()) <= 1e-5 * (1 + abs(want[idx % 16, idx // 16])), \
                (kind, t, v)


# SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T: destination (thread, value) -> bit of the source
# image, where source thread i's 128-bit row holds bits 128 i .. 128 i + 127.
_LDSM_DST = {False: (((32,), (32,)), ((32, 4), (1, 1024))),
             True: (((4, 8), (256, 16)), ((16, 2, 4), (1, 128, 1024)))}


@pytest.mark.parametrize("trans", [False, True], ids=["ldsm-n", "ldsm-t"])
def test_emulated_ldmatrix_matches_cute_layouts(trans):
    pitch = 40  # elements per shared-memory row: 16-byte aligned, as the kernels' padding
    image = torch.randint(-32768, 32767, (32 * pitch,), dtype=torch.int16)
    row_offset = torch.randperm(32) * pitch  # each lane addresses some row: any order
    regs = emulator().probe_ldmatrix(trans, image, row_offset).long() & 0xFFFFFFFF
    thr, val = _LDSM_DST[trans]
    for t in range(32):
        for reg in range(4):
            for half in range(2):
                bit = _cute(*thr, t) + _cute(*val, 16 * half + 32 * reg)
                src_lane, element = bit // 128, (bit % 128) // 16
                want = int(image[row_offset[src_lane] + element]) & 0xFFFF
                assert (int(regs[t, reg]) >> (16 * half)) & 0xFFFF == want, (trans, t, reg, half)
