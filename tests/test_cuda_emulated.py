"""What is specific to the host emulator that runs the CUDA kernels (csrc/cuda/*.cu) on CPU
(tools/cuda_emulator, tools/margin_emulated): its source rewrite, that the public ops
really run on it, results independent of thread timing under its four schedules, inputs
at unaligned addresses, many row tiles, and its PTX semantics against CuTe's layouts.

What the kernels compute is the conformance suite's (tests/conformance, backend
'cuda-emulated'): the kernels' own source compiled with g++ (only the launch syntax and the
PTX wrappers are swapped), its blocks run as cooperative fibers with barriers, warp
rendezvous, ldmatrix / mma.sync with their PTX semantics, and cp.async copies that land
only when waited for. It checks the math and the indexing, not timing, races that none
of its schedules exposes, or the code nvcc generates (tests/test_cuda.py on a GPU).
"""

import pytest
import torch

from margin_ops import reference

from backends_under_test import BY_NAME, TF32, emulator
from conformance.cases import DTYPE_IDS, PRIMITIVE_ARGS
from conftest import assert_close, call_op, leaf_copy, make_inputs, primitive_options, primitive_vs_reference
from cute_layouts import cute_index

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
EMULATED = BY_NAME["cuda-emulated"]
#: Kernel paths: (input dtype, TF32 products).
KERNEL_DTYPES = {"f64": (F64, False), "f32": (F32, False), "tf32": (F32, True), "bf16": (BF16, False),
                 "f16": (F16, False)}


@pytest.fixture(autouse=True)
def emulated_cuda_backend():
    """Backend "cuda" = the emulated CUDA kernels, for CPU tensors, inside each test (or a
    skip saying why the emulator cannot be built here)."""
    why = EMULATED.missing()
    if why is not None:
        pytest.skip(why)
    with EMULATED.active():
        yield


def _tolerances(kind: str) -> tuple:
    dtype, tf32 = KERNEL_DTYPES[kind]
    return TF32 if tf32 else EMULATED.tolerances[dtype]


def _emulated_vs_reference(x, w, y, args, tolerances, tf32=False, options=(None,)):
    """primitive_vs_reference for the emulated primitive, its TF32 products on or off
    (``options``' allow_tf32 is replaced by ``tf32``)."""
    primitive_vs_reference(torch.ops.margin.margin_lse_cuda_emulated, x, w, y, args, tolerances, tf32=tf32,
                           options=(tf32, *options[1:]))


def test_rewrite_keeps_everything_but_the_launch_syntax():
    from margin_emulated import build_emulator

    src = ("  k<T><<<unsigned(g), kThreads, 0, stream>>>(args);\n"
           "  extern __shared__ __align__(16) unsigned char s[];\n"
           "  __shared__ Acc s_max[C::kWarpsN][C::BM];")
    out = build_emulator.rewrite_kernel_source(src).splitlines()[1:]
    assert out == ["  ::emu::launch(unsigned(g), kThreads, 0, stream, k<T>, args);",
                   "  unsigned char* s = reinterpret_cast<unsigned char*>(::emu::dynamic_smem());",
                   "  __shared__ Acc s_max[C::kWarpsN][C::BM]; ::emu::poison_shared(&s_max, sizeof(s_max));"]


def test_the_public_ops_run_on_the_emulated_kernels(monkeypatch):
    """The fixture's wiring is real: the op's loss comes from the emulated forward."""
    calls = []
    original = emulator().forward
    monkeypatch.setattr(emulator(), "forward", lambda *a: calls.append(1) or original(*a))
    x, w, y = make_inputs(4, 8, 9, F32)
    call_op("arcface", x, w, y, backend="cuda")
    assert calls == [1]


#: The timing test's variants: the margin arguments and the primitive's options
#: (conftest.primitive_options): plain ArcFace; feature-scaled "external" with a sampled
#: class_index and hard examples (every v2 path: gathered W rows, the hard-example
#: epilogue, the target out of the lse, the feature-scale row sums of bwd_corr).
TIMING_VARIANTS = {"plain": (PRIMITIVE_ARGS[0], {}), "options": (PRIMITIVE_ARGS[9], dict(sampled=True, hard=True))}


#: (kind, variant) pairs: every kind with both variants but TF32 with hard examples, where
#: TF32's cosine error (~1e-3) moves cosines across the hard-example threshold, a jump of the
#: logit's slope from 1 to t + 2c, so its gradients are not comparable with the reference's.
TIMING_CASES = [pytest.param(k, v, marks=() if k == "f32" else pytest.mark.slow)
                for k in KERNEL_DTYPES for v in TIMING_VARIANTS if (k, v) != ("tf32", "options")]


@pytest.mark.parametrize("kind, variant", TIMING_CASES)
def test_results_do_not_depend_on_thread_timing(kind, variant):
    """Forward and backward give the same bits under every schedule: round robin, each warp
    as far ahead of the others as the barriers let it (lowest or highest first), threads in
    random order (lanes of one warp included). A missing barrier between one thread's
    shared-memory writes and another's reads shows here (poisoned or stale tiles) even where
    round robin hides it; equal bits are the deterministic claim (no atomics, fixed orders).
    Round robin's results are checked against the reference first."""
    dtype, tf32 = KERNEL_DTYPES[kind]
    args, option_kwargs = TIMING_VARIANTS[variant]
    weight_rows, classes, options = primitive_options(130, 600, **option_kwargs)
    x, w, _ = make_inputs(130, 40, weight_rows, dtype, requires_grad=False)
    y = torch.randint(0, classes, (130,))
    y[5] = -100
    options = (tf32, *options[1:])
    _emulated_vs_reference(x, w, y, args, _tolerances(kind), tf32, options)
    g = torch.randn(130), torch.randn(130), torch.randn(130)
    results = []
    try:
        for schedule in (0, 1, 2, 3):
            emulator().set_schedule(schedule)
            fwd = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args, *options)
            bwd = torch.ops.margin.margin_lse_backward_cuda_emulated(*g, x, w, y, fwd[0], *args, *options)
            results.append(fwd + bwd)
    finally:
        emulator().set_schedule(0)
    for schedule, other in enumerate(results[1:], 1):
        assert all(torch.equal(a, b) for a, b in zip(results[0], other)), f"schedule {schedule} differs"


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
    _emulated_vs_reference(x, w, y, PRIMITIVE_ARGS[0], EMULATED.tolerances[dtype])


@pytest.mark.slow
def test_many_row_tiles():
    """Eight row tiles and a class count that is no multiple of any tile."""
    x, w, y = make_inputs(1000, 24, 257, BF16, requires_grad=False)
    _emulated_vs_reference(x, w, y, PRIMITIVE_ARGS[3], EMULATED.tolerances[BF16])


@pytest.mark.parametrize("kind", ["f64", "bf16"])
def test_class_index_reads_only_its_rows(kind):
    """With class_index the kernels read W's rows of those classes in place and no other:
    every other row is NaN here (a read of one would make lse NaN), gets exactly zero
    gradient, and the results are the reference's on the finite weight."""
    dtype, _ = KERNEL_DTYPES[kind]
    n, d, rows = 70, 24, 400  # several class tiles and (backward) chunks of gathered rows
    x, w, _ = make_inputs(n, d, rows, dtype, requires_grad=False)
    class_index = torch.randperm(rows)[:250]
    y = torch.randint(0, 250, (n,))
    unread = torch.ones(rows, dtype=torch.bool)
    unread[class_index] = False
    w_poisoned = w.masked_fill(unread[:, None], float("nan")).requires_grad_()
    x = x.requires_grad_()
    args, options = PRIMITIVE_ARGS[0], (False, 1, class_index, None, None)
    out = torch.ops.margin.margin_lse_cuda_emulated(x, w_poisoned, y, *args, *options)
    assert all(torch.isfinite(t).all() for t in out), "a row outside class_index was read"
    grad_x, grad_w = torch.autograd.grad(out[0].sum() + out[1].sum() + out[4].sum(), [x, w_poisoned])
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all()
    assert (grad_w[unread] == 0).all()
    _emulated_vs_reference(x.detach(), w, y, args, EMULATED.tolerances[dtype], options=options)


def test_external_with_a_single_class():
    """margin "external" leaves the target out of the log-sum-exp: with one class lse is
    -inf on rows with a target, and the backward never forms exp(logit − lse) for it (its
    gradients stay finite and equal the reference's)."""
    x, w, _ = make_inputs(5, 8, 1, F64)
    y = torch.tensor([0, 0, -100, 0, 0])
    args = PRIMITIVE_ARGS[8]
    got = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args)
    want = reference.margin_lse(x, w, y, *args)
    assert torch.equal(torch.isinf(got[0]), y == 0) and torch.equal(got[0][y == 0], want[0][y == 0])
    for a, b in zip(got[:3] + got[4:], want[:3] + want[4:]):
        torch.testing.assert_close(a[y != 0], b[y != 0], rtol=1e-12, atol=1e-12)
    upstream = torch.randn(2, 5, dtype=F64)
    grads = [torch.autograd.grad((out[1] * upstream[0]).sum() + (out[4] * upstream[1]).sum(), [x, w])
             for out in (got, want)]
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind, sampled", [("f64", False), ("f64", True), ("bf16", True), ("tf32", False)])
def test_subcenters_across_class_tiles_and_chunks(kind, sampled):
    """K = 3 sub-centers per class: 3·C weight rows, so a class tile (128 classes, 64 in
    float64) spans 384 (192) rows, a count of rows no 128-row tile divides, and the classes
    run over several class tiles, backward chunks and forward splits, with and without a
    class_index (the sub-center rows of a sampled class gathered in place)."""
    dtype, tf32 = KERNEL_DTYPES[kind]
    weight_rows, classes, options = primitive_options(70, 350, subcenters=3, sampled=sampled)
    x, w, _ = make_inputs(70, 24, weight_rows, dtype, requires_grad=False)
    y = torch.randint(0, classes, (70,))
    y[1] = -100
    _emulated_vs_reference(x, w, y, PRIMITIVE_ARGS[0], _tolerances(kind), tf32, (tf32, *options[1:]))


def test_subcenter_ties_go_to_the_first():
    """Sub-centers with equal cosines (here: copies of one row) give the class that cosine;
    the whole gradient goes to the first of them, exactly as the reference routes it, and
    none to the copies."""
    k, classes = 3, 200
    x, w, y = make_inputs(40, 16, classes * k, F64, requires_grad=False)
    w = w.view(classes, k, 16)
    w[:, 2] = w[:, 1]  # sub-center 2 ties with 1 on every class; 0 wins where larger
    w = w.reshape(classes * k, 16).requires_grad_()
    x = x.requires_grad_()
    args, options = PRIMITIVE_ARGS[0], (False, k)
    out = torch.ops.margin.margin_lse_cuda_emulated(x, w, y % classes, *args, *options)
    grad_w, = torch.autograd.grad(out[0].sum() + out[1].sum() + out[4].sum(), [w])
    assert (grad_w.view(classes, k, 16)[:, 2] == 0).all()
    assert (grad_w.view(classes, k, 16)[:, 1] != 0).any()
    _emulated_vs_reference(x.detach(), w.detach(), y % classes, args, EMULATED.tolerances[F64], options=options)


def test_subcenters_beyond_the_kernels_limit_are_refused_by_name():
    """The kernels keep a sub-center index in 8 bits and each sub-center's 1 / ‖w‖ of a tile
    in shared memory: more than 128 sub-centers are refused with an error that names the
    option, never a wrong result."""
    x, w, y = make_inputs(4, 8, 2 * 129, F32, requires_grad=False)
    with pytest.raises(NotImplementedError, match="at most 128 subcenters, got subcenters=129"):
        torch.ops.margin.margin_lse_cuda_emulated(x, w, y % 2, *PRIMITIVE_ARGS[0], None, 129)


# ---------------------------------------------------------------------------------------
# The emulated PTX against fragment layouts written down independently: CUTLASS's CuTe
# traits (mma_traits_sm80.hpp, copy_traits_sm75.hpp), as (shape, stride) data
# (tests/cute_layouts.py).


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
            idx = cute_index(*a_thr, t) + cute_index(*a_val, v)
            regs_a[t, v // per_reg] |= a_bits[idx % 16, idx // 16] << (shift * (v % per_reg))
        for v in range(2 * per_reg):
            idx = cute_index(*b_thr, t) + cute_index(*b_val, v)
            regs_b[t, v // per_reg] |= b_bits[idx % 8, idx // 8] << (shift * (v % per_reg))
        for v in range(4):
            idx = cute_index(*_C_LAYOUT[0], t) + cute_index(*_C_LAYOUT[1], v)
            c_in[t, v] = c[idx % 16, idx // 16]
    to_i32 = lambda r: torch.where(r >= 2**31, r - 2**32, r).int()  # noqa: E731
    d = emulator().probe_mma({"bf16": 0, "f16": 1, "tf32": 2}[kind], to_i32(regs_a), to_i32(regs_b), c_in)
    want = a @ b.t() + c.double()
    for t in range(32):
        for v in range(4):
            idx = cute_index(*_C_LAYOUT[0], t) + cute_index(*_C_LAYOUT[1], v)
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
                bit = cute_index(*thr, t) + cute_index(*val, 16 * half + 32 * reg)
                src_lane, element = bit // 128, (bit % 128) // 16
                want = int(image[row_offset[src_lane] + element]) & 0xFFFF
                assert (int(regs[t, reg]) >> (16 * half)) & 0xFFFF == want, (trans, t, reg, half)


# ---- the sm_90a forward (fwd_main_sm90_kernel: TMA, mbarriers, wgmma), told arch 90 ----

SM90 = BY_NAME["cuda-emulated-sm90"]


def _sm90_forward_vs_reference(x, w, y, args, options=(None,)):
    """The emulated forward told compute capability 9.0 against the float64 reference
    (values and pred; the sm_90a backward is tested below)."""
    with SM90.active():
        got = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args, *options)
    want = reference.margin_lse(x.double(), w.double(), y, *args, *options)
    tol = SM90.tolerances[x.dtype][0]
    scale = args[1] if not args[6] else x.double().norm(dim=1).max().item()
    for name, g, e, atol in (("lse", got[0], want[0], tol * scale), ("target_logit", got[1], want[1], tol * scale),
                             ("max_cos", got[2], want[2], tol)):
        assert torch.allclose(g.double(), e, rtol=tol, atol=atol), (name, (g.double() - e).abs().max())
    assert torch.equal(got[3], want[3]), (got[3], want[3])
    hard_t = options[4] if len(options) > 4 and options[4] is not None else torch.zeros(1)
    atol = tol * scale * w.shape[0] * (1 + hard_t.abs().max().item())
    assert torch.allclose(got[4].double(), want[4], rtol=tol, atol=atol), (got[4].double() - want[4]).abs().max()
    return got


#: (N, D, C): 2 row tiles (the second partial), 6 class tiles over 2 splits (the last
#: partial), D = 72: two 64-wide k-blocks, the second zero-filled past D by TMA.
SM90_SHAPE = (200, 72, 700)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("variant", ["plain", "options"])
def test_sm90_forward_across_tiles_and_splits(dtype, variant):
    """fwd_main_sm90_kernel on a problem of several row and class tiles, partial last tiles,
    D not a multiple of the k-block, more class tiles than splits; "options": hard examples
    with margin "external" and feature scale (class_index is not taken by the sm_90a path)."""
    n, d, c = SM90_SHAPE
    args = PRIMITIVE_ARGS[0] if variant == "plain" else PRIMITIVE_ARGS[9]
    _, _, options = primitive_options(n, c, hard=variant == "options")
    x, w, _ = make_inputs(n, d, c, dtype, requires_grad=False)
    y = torch.randint(0, c, (n,))
    y[5] = -100
    y[7] = c - 1  # a target in the partial last tile
    _sm90_forward_vs_reference(x, w, y, args, options)


@pytest.mark.parametrize("case", ["d-not-16-bytes", "class_index", "subcenters"])
def test_sm90_conditions_unmet_take_the_mma_path(case):
    """Told arch 90, problems the sm_90a kernel does not take (a row pitch TMA refuses,
    class_index, sub-centers) still give the reference's results (through fwd_main_kernel)."""
    n, d, c = 70, 36 if case == "d-not-16-bytes" else 40, 300
    weight_rows, classes, options = primitive_options(n, c, sampled=case == "class_index",
                                                      subcenters=2 if case == "subcenters" else 1)
    x, w, _ = make_inputs(n, d, weight_rows, BF16, requires_grad=False)
    y = torch.randint(0, classes, (n,))
    _sm90_forward_vs_reference(x, w, y, PRIMITIVE_ARGS[0], options)


def test_sm90_forward_does_not_depend_on_thread_timing():
    """The sm_90a forward gives the same bits under the four schedules (producer and consumer
    warpgroups interleaved differently; mbarrier phases and the norms barrier must order them)."""
    n, d, c = SM90_SHAPE
    _, _, options = primitive_options(n, c, hard=True)
    x, w, _ = make_inputs(n, d, c, BF16, requires_grad=False)
    y = torch.randint(0, c, (n,))
    results = []
    try:
        for schedule in (0, 1, 2, 3):
            emulator().set_schedule(schedule)
            results.append(_sm90_forward_vs_reference(x, w, y, PRIMITIVE_ARGS[3], options))
    finally:
        emulator().set_schedule(0)
    for schedule, other in enumerate(results[1:], 1):
        assert all(torch.equal(a, b) for a, b in zip(results[0], other)), f"schedule {schedule} differs"


# ---- the sm_90a bwd_tile (bwd_tile_sm90_kernel: the forward's engine + the gradient epilogue) ----

#: (N, D, C): N = 200: 2 row tiles (the second partial), one class split per chunk (each CTA
#: walks 2 class tiles), 3 class chunks of 256, 256 and 188 classes (the emulated build's
#: scratch budget), the last with a partial tile; N = 100: one row tile, 2 chunks (512,
#: 188), 2 class splits of 2 tiles. D = 72: a second k-block zero-filled past D by TMA.
#: D = 320 (D_pad = 384): bwd_gemm_sm90<DxSm90>'s 128 x 256 dX tiles, the second with its
#: last 64 columns zero-filled by TMA and its last 128 past D_pad (not stored), over 2 dX
#: splits of 256 classes (the emulated partial budget) and 2 chunks.
SM90_BACKWARD_SHAPES = {"row-tiles": (200, 72, 700), "splits": (100, 72, 700),
                        "dx-256": (100, 320, 700)}


def _sm90_grads(x, w, y, args, options, upstream, w_offset=0, backend=SM90):
    """(grad_x, grad_weight) of the emulated primitive told arch 90 (or the arch of ``backend``:
    EMULATED, 80), for upstream gradients of (lse, target_logit, nontarget_sum); W read from
    w_offset elements into its storage."""
    x = leaf_copy(x)
    storage = torch.cat([torch.zeros(w_offset, dtype=w.dtype), w.flatten()]).requires_grad_()
    w_in = storage[w_offset:].view(w.shape)
    with backend.active():
        out = torch.ops.margin.margin_lse_cuda_emulated(x, w_in, y, *args, *options)
        loss = sum((o * g).sum() for o, g in zip((out[0], out[1], out[4]), upstream))
        grad_x, grad_storage = torch.autograd.grad(loss, [x, storage])
    return grad_x, grad_storage[w_offset:].view(w.shape)


def _reference_grads(x, w, y, args, options, upstream):
    """The float64 reference's (grad_x, grad_weight) for the upstream gradients of _sm90_grads."""
    x64, w64 = leaf_copy(x, F64), leaf_copy(w, F64)
    want = reference.margin_lse(x64, w64, y, *args, *options)
    return torch.autograd.grad(
        sum((o * g.double()).sum() for o, g in zip((want[0], want[1], want[4]), upstream)), [x64, w64])


def _check_sm90_grads_under_every_schedule(x, w, y, args, options, upstream, dtype, backend=SM90):
    """_sm90_grads (told ``backend``'s arch) against the float64 reference at its gradient
    tolerance of dtype, and the same bits under the emulator's four schedules."""
    want = _reference_grads(x, w, y, args, options, upstream)
    grad_tol = backend.tolerances[dtype][1]
    results = []
    try:
        for schedule in (0, 1, 2, 3):
            emulator().set_schedule(schedule)
            results.append(_sm90_grads(x, w, y, args, options, upstream, backend=backend))
    finally:
        emulator().set_schedule(0)
    assert_close(results[0][0], want[0], grad_tol, "grad_x")
    assert_close(results[0][1], want[1], grad_tol, "grad_weight")
    for schedule, other in enumerate(results[1:], 1):
        assert all(torch.equal(a, b) for a, b in zip(results[0], other)), f"schedule {schedule} differs"


@pytest.mark.parametrize("shape", SM90_BACKWARD_SHAPES)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
def test_sm90_backward_across_chunks_tiles_and_schedules(dtype, shape):
    """bwd_tile_sm90_kernel (with the rest of the backward) on several class chunks, row tiles
    and class tiles per CTA, partial tiles, D not a multiple of 64, hard examples with margin
    "external" and feature scale: the float64 reference's gradients at the FUSED tolerances,
    and the same bits under the emulator's four schedules (mbarrier phases, the norms and
    column-sum barriers must order the warpgroups)."""
    n, d, c = SM90_BACKWARD_SHAPES[shape]
    args = PRIMITIVE_ARGS[9]  # external, feature scale
    _, _, options = primitive_options(n, c, hard=True)
    x, w, _ = make_inputs(n, d, c, dtype, requires_grad=False)
    y = torch.randint(0, c, (n,))
    y[5] = -100
    y[7] = c - 1  # a target in the partial last tile of the last chunk
    y[9] = 255  # the last class of a tile (and of the first chunk at N = 200)
    upstream = [torch.randn(n, dtype=torch.float32) for _ in range(3)]
    _check_sm90_grads_under_every_schedule(x, w, y, args, options, upstream, dtype)


#: dW's sm_90a epilogue (DwSm90::store): (D, sub-centers, class_index, W's storage offset in
#: elements). D = 200: two D tiles, the second partial, 16-byte runs; with 2 sub-centers
#: and a class_index (gathered rows; dX then takes bwd_dx_kernel). D = 132: rows not
#: 16-byte aligned, element by element, a tail of 4 in the second D tile. Offset 2: W
#: 4 bytes past a 16-byte boundary, element by element although D % 8 == 0.
SM90_DW_CASES = {"runs-subcenters-sampled": (200, 2, True, 0), "d-not-8": (132, 1, False, 0),
                 "unaligned-weight": (136, 1, False, 2)}


@pytest.mark.parametrize("case", SM90_DW_CASES)
def test_sm90_weight_gradient_runs_and_tails(case):
    """bwd_gemm_sm90_kernel's dW stores (rows regrouped across each quad of lanes into runs of
    8 columns: 16-byte accesses where the rows allow, element by element otherwise) on
    partial row, class and D tiles: the float64 reference's gradients."""
    d, subcenters, sampled, offset = SM90_DW_CASES[case]
    n = 70
    weight_rows, classes, options = primitive_options(n, 300, subcenters=subcenters, sampled=sampled)
    x, w, _ = make_inputs(n, d, weight_rows, BF16, requires_grad=False)
    y = torch.randint(0, classes, (n,))
    y[1] = -100
    args = PRIMITIVE_ARGS[3]
    upstream = [torch.randn(n, dtype=torch.float32) for _ in range(3)]
    got = _sm90_grads(x, w, y, args, options, upstream, w_offset=offset)
    want = _reference_grads(x, w, y, args, options, upstream)
    grad_tol = SM90.tolerances[BF16][1]
    assert_close(got[0], want[0], grad_tol, "grad_x")
    assert_close(got[1], want[1], grad_tol, "grad_weight")


# ---- the sm_90a fused backward (bwd_fused_sm90_kernel: bwd_tile + bwd_dw in one kernel) ----

#: (N, D, C), each with 4 row tiles of 64 (the last of 8 rows: N = 200, N_pad = 256) and 3
#: class chunks of 256, 256 and the rest (the emulated build's scratch budget): "d64": the
#: last chunk 188 classes, 3 CTAs of 64 classes, the last with 60 (its second warpgroup's S
#: half partial); "d512": the last chunk 150, its last CTA with 22 classes (the second half
#: empty); D = 64: one D block per consumer warpgroup, the second zero (x and W never loaded
#: there); D = 512: m64n256 dW accumulators.
SM90_FUSED_SHAPES = {"d64": (200, 64, 700), "d512": (200, 512, 662)}


def _sm90_fused_problem(shape, dtype, hard=True):
    n, d, c = SM90_FUSED_SHAPES[shape] if isinstance(shape, str) else shape
    _, _, options = primitive_options(n, c, hard=hard)
    x, w, _ = make_inputs(n, d, c, dtype, requires_grad=False)
    y = torch.randint(0, c, (n,))
    y[5] = -100
    y[7] = c - 1  # a target in the last CTA of the last chunk
    y[9] = 255  # the last class of the first chunk
    y[n - 1] = 63  # the last class of a CTA, in the last (8-row) row tile
    upstream = [torch.randn(n, dtype=torch.float32) for _ in range(3)]
    return x, w, y, options, upstream


@pytest.mark.parametrize("shape", SM90_FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DTYPE_IDS.get)
def test_sm90_fused_backward_across_chunks_tiles_and_schedules(dtype, shape):
    """bwd_fused_sm90_kernel (with prep, bwd_corr, bwd_dx, finalize) on several class chunks,
    row tiles and partial class tiles, hard examples with margin "external" and feature scale:
    the float64 reference's gradients at the FUSED tolerances, and the same bits under the
    emulator's four schedules (the x buffers' full / empty phases, the consumer barrier before
    dW, the staging tiles' and row sums' alternation must order the warpgroups)."""
    x, w, y, options, upstream = _sm90_fused_problem(shape, dtype)
    args = PRIMITIVE_ARGS[9]  # external, feature scale
    _check_sm90_grads_under_every_schedule(x, w, y, args, options, upstream, dtype)


def _backward_launches(x, w, y, args, options, upstream, backend=SM90):
    """The gradients and the kernels the emulated backward launched (demangled names; "?" for
    the kernels of anonymous namespaces), told arch 90 (or ``backend``'s)."""
    x, w = leaf_copy(x), leaf_copy(w)
    with backend.active():
        out = torch.ops.margin.margin_lse_cuda_emulated(x, w, y, *args, *options)
        emulator().take_launched_kernels()  # the forward's
        loss = sum((o * g).sum() for o, g in zip((out[0], out[1], out[4]), upstream))
        grads = torch.autograd.grad(loss, [x, w])
        return grads, emulator().take_launched_kernels()


@pytest.mark.parametrize("case", ["eligible", "d-72", "one-class-tile", "class_index"])
def test_sm90_fused_backward_runs_where_eligible(case):
    """Told arch 90, an eligible problem (d % 64 == 0, K = 1, no class_index, 64-class tiles
    for at least 7/8 of the SMs: 2 in the emulated build) runs bwd_fused_sm90_kernel once per class
    chunk (as 2-CTA clusters where the chunk's class tiles are even in number) and besides it
    only prep, bwd_dx per chunk and finalize: 2 launches per chunk (no
    feature scale: no bwd_corr). d = 72 and a single 64-class tile run bwd_tile_sm90_kernel
    instead, class_index the mma.sync path; all give the reference's gradients."""
    # N_pad = 128: chunks of 512 classes (the emulated scratch budget), 2 chunks
    n, c = 100, 60 if case == "one-class-tile" else 700
    d = 72 if case == "d-72" else 128
    weight_rows, classes, options = primitive_options(n, c, sampled=case == "class_index")
    x, w, _ = make_inputs(n, d, weight_rows, BF16, requires_grad=False)
    y = torch.randint(0, classes, (n,))
    upstream = [torch.randn(n, dtype=torch.float32) for _ in range(3)]
    args = PRIMITIVE_ARGS[0]
    grads, names = _backward_launches(x, w, y, args, options, upstream)
    want = _reference_grads(x, w, y, args, options, upstream)
    assert_close(grads[0], want[0], SM90.tolerances[BF16][1], "grad_x")
    assert_close(grads[1], want[1], SM90.tolerances[BF16][1], "grad_weight")
    fused = [name for name in names if "bwd_fused_sm90_kernel" in name]
    tile90 = [name for name in names if "bwd_tile_sm90_kernel" in name]
    if case == "eligible":
        chunks = 2
        assert len(fused) == chunks and not tile90, names
        # 8 class tiles, then 3: 2-CTA clusters (kCtas = 2, x multicast), then single CTAs
        assert [name.split("(")[0].endswith(", 2>") for name in fused] == [True, False], fused
        assert len(names) == 2 + 2 * chunks, names  # prep, {fused, bwd_dx} per chunk, finalize
    else:
        assert not fused, names
        assert bool(tile90) == (case != "class_index"), names


# ---- the mma.sync fused backward (bwd_fused_kernel: bwd_tile + bwd_dw in one kernel), arch 80 ----

#: The sm_90a fused kernel's scenario (_sm90_fused_problem) at the mma.sync kernel's tile
#: shapes: "d64": SM90_FUSED_SHAPES', 64-row x tiles (kDB = 1), one 16-column dW group per
#: warp of the two it holds, 3 chunks, the last CTA 60 classes; "d320": 64-row tiles at
#: kDB = 3, 5 groups of 6; "d512": 32-row x tiles (kDB = 4: two 64-row tiles beside W
#: exceed sm_80's 163 KiB), 7 row tiles, all 8 groups. D = 320 / 512 take 2 chunks (256 and
#: 44 classes: one CTA whose third warp column has 12 classes, its fourth none), to keep
#: the emulator's time down.
MMA_FUSED_SHAPES = {"d64": SM90_FUSED_SHAPES["d64"], "d320": (200, 320, 300), "d512": (200, 512, 300)}
#: (primitive arguments, hard examples): "options": margin "external" with feature scale and
#: hard examples (bwd_fused_kernel<T, true, kDB>, bwd_corr's row sums); "arcface": the target
#: margin and its slope, no hard examples (<T, false, kDB>).
MMA_FUSED_VARIANTS = {"options": (PRIMITIVE_ARGS[9], True), "arcface": (PRIMITIVE_ARGS[0], False)}
#: Every kDB path of the kernel (both x-tile heights) in both variants and dtypes, not every
#: product: 30 to 120 s each on the emulator; D = 320 and 512 are slow.
MMA_FUSED_CASES = [pytest.param(dtype, shape, variant, id=f"{DTYPE_IDS[dtype]}-{shape}-{variant}",
                                marks=() if shape == "d64" else pytest.mark.slow)
                   for dtype, shape, variant in ((BF16, "d64", "options"), (F16, "d64", "options"),
                                                 (BF16, "d64", "arcface"), (BF16, "d320", "options"),
                                                 (F16, "d512", "options"), (BF16, "d512", "arcface"))]


@pytest.mark.parametrize("dtype, shape, variant", MMA_FUSED_CASES)
def test_mma_fused_backward_across_chunks_tiles_and_schedules(dtype, shape, variant):
    """bwd_fused_kernel (with prep, bwd_corr, bwd_dx, finalize), told arch 80, on the sm_90a
    fused kernel's scenario (_sm90_fused_problem): several class chunks, row tiles of 64 or 32
    rows with a partial last one, partial class tiles, targets at tile and chunk ends: the
    float64 reference's gradients at the FUSED tolerances, and the same bits under the
    emulator's four schedules (the x double buffer's waits and barriers, the staging tile
    reused every tile, the row sums and column sums must order the warps)."""
    args, hard = MMA_FUSED_VARIANTS[variant]
    x, w, y, options, upstream = _sm90_fused_problem(MMA_FUSED_SHAPES[shape], dtype, hard=hard)
    _check_sm90_grads_under_every_schedule(x, w, y, args, options, upstream, dtype, backend=EMULATED)


def _emulated_chunks(n: int, classes: int, dtype) -> int:
    """Backward::layout's class chunks in the emulated build (its dS' scratch budget)."""
    from margin_emulated import build_emulator

    n_pad = -(-n // 128) * 128
    cc = max(128, build_emulator.SCRATCH_BUDGET // (n_pad * dtype.itemsize) // 128 * 128)
    return -(-classes // cc)


@pytest.mark.parametrize("case", ["eligible", "d-72", "one-class-tile", "class_index", "f32", "arch-90"])
def test_mma_fused_backward_runs_where_eligible(case):
    """Told arch 80, an eligible problem (16-bit, d % 64 == 0, K = 1, no class_index, 64-class
    tiles for at least 7/8 of the SMs: 2 in the emulated build) runs bwd_fused_kernel once per
    class chunk and besides it only prep, bwd_dx per chunk and finalize: 2 launches per chunk.
    d = 72, a single 64-class tile, class_index and float32 run the 3-launch mma.sync backward
    (prep, {bwd_tile, bwd_dw, bwd_dx} per chunk, finalize); told arch 90, the same eligible
    problem runs bwd_fused_sm90_kernel, not the mma.sync one. All give the reference's
    gradients."""
    n, c = 100, 60 if case == "one-class-tile" else 700  # N_pad = 128: chunks of 512 classes
    d = 72 if case == "d-72" else 128
    dtype = F32 if case == "f32" else BF16
    weight_rows, classes, options = primitive_options(n, c, sampled=case == "class_index")
    x, w, _ = make_inputs(n, d, weight_rows, dtype, requires_grad=False)
    y = torch.randint(0, classes, (n,))
    upstream = [torch.randn(n, dtype=torch.float32) for _ in range(3)]
    args = PRIMITIVE_ARGS[0]
    backend = SM90 if case == "arch-90" else EMULATED
    grads, names = _backward_launches(x, w, y, args, options, upstream, backend=backend)
    want = _reference_grads(x, w, y, args, options, upstream)
    assert_close(grads[0], want[0], backend.tolerances[dtype][1], "grad_x")
    assert_close(grads[1], want[1], backend.tolerances[dtype][1], "grad_weight")
    fused = [name for name in names if "bwd_fused_kernel" in name]
    chunks = _emulated_chunks(n, classes, dtype)
    if case == "eligible":
        assert len(fused) == chunks, names
        assert len(names) == 2 + 2 * chunks, names  # prep, {fused, bwd_dx} per chunk, finalize
    elif case == "arch-90":
        assert not fused and sum("bwd_fused_sm90_kernel" in name for name in names) == chunks, names
    else:
        assert not fused, names
        assert len(names) == 2 + 3 * chunks, names  # prep, {bwd_tile, bwd_dw, bwd_dx}, finalize
