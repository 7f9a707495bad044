"""The Triton backend (margin_ops/triton) against the float64 reference.

On CPU tensors the kernels run under the Triton interpreter, which TRITON_INTERPRET=1
turns on only if it is set before the kernels are defined, i.e. before margin_ops is
first imported. The suite's conftest imports margin_ops before this file, so in a plain
``pytest`` run the interpreter cases skip here and :func:`test_interpreter_suite` reruns
this file in a subprocess with the variable set (``TRITON_INTERPRET=1 pytest
tests/test_triton.py`` runs them directly). The GPU cases need CUDA, with the variable unset.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import margin_ops  # noqa: E402
import margin_ops.triton  # noqa: E402  (any ImportError here is a bug: triton is installed)
from margin_ops import reference  # noqa: E402

from conftest import (LOSS_TOLERANCES, OP_CONFIGS, PRIMITIVE_ARGS, REFERENCE_FNS, SHAPE_CONFIGS,  # noqa: E402
                      assert_close, call_op, check_nan_propagation, compare_to_reference, config_id,
                      make_inputs, matmul_precision, opcheck_primitive, place_targets, run_with_grads)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}
INTERPRETED = margin_ops.triton.INTERPRETED
ON_GPU = torch.cuda.is_available() and not INTERPRETED

INTERPRETER_OFF = "Triton interpreter off here: run by test_interpreter_suite"
interpreter = pytest.mark.skipif(not INTERPRETED, reason=INTERPRETER_OFF)
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")

# (N, D, C): one row; one class; D = 1 (all |cos| = 1); D over several tl.dot steps and C
# over several class tiles and groups of tiles; several row blocks; D split over programs
# in the backward kernels (> 512).
SHAPES = [(1, 13, 37), (3, 13, 1), (4, 1, 29), (5, 130, 300), (70, 20, 90), (2, 600, 40)]

#: bfloat16 gradient tolerance of this backend. The gradient GEMMs take the gradient tile
#: rounded to bfloat16 (as FlashAttention's dS, or eager autocast's N x C dlogits), not in
#: float32 as the CPU kernel: 8 significant bits per term of sums that partly cancel. Seen:
#: up to 1.06e-2 (max-scaled, N=64 D=128 C=1000; 0.5e-2 to 0.9e-2 at N=128 D=256 C=4000)
#: against the CPU kernel's 3e-3; the ~2e-2 budget of 16-bit training.
BF16_GRAD_RTOL = 2e-2


def compare(name, x, w, y, **kwargs):
    """compare_to_reference on the Triton backend, with :data:`BF16_GRAD_RTOL` for bfloat16
    gradients (the loss keeps its float32-level tolerance)."""
    if x.dtype != BF16:
        return compare_to_reference(name, x, w, y, backend="triton", **kwargs)
    got = compare_to_reference(name, x, w, y, backend="triton", rtol=BF16_GRAD_RTOL, **kwargs)
    if not kwargs.pop("cancellation", False):
        want = REFERENCE_FNS[name](x.detach().double(), w.detach().double(), y, **kwargs)
        assert_close(got.loss, want, LOSS_TOLERANCES[BF16], f"{name} loss (bf16)")
    return got


def primitive_vs_reference(x, w, y, args, tol, grad_tol):
    """margin_lse_triton (values) and margin_lse_backward_triton (grads for random upstream
    gradients of lse and target_logit) against the float64 reference on the same inputs."""
    lse, target, max_cos, pred = torch.ops.margin.margin_lse_triton(x, w, y, *args)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    want = reference.margin_lse(x64, w64, y, *args)
    acc = F64 if x.dtype == F64 else F32
    assert lse.dtype == target.dtype == max_cos.dtype == acc and pred.dtype == torch.int64
    assert_close(lse, want[0], tol, "lse")
    assert_close(target, want[1], tol, "target_logit")
    assert_close(max_cos, want[2], tol, "max_cos")
    assert torch.equal(pred, want[3]), (pred, want[3])
    g_lse, g_target = (torch.randn(x.shape[0], dtype=acc, device=x.device) for _ in range(2))
    grad_x, grad_w = torch.ops.margin.margin_lse_backward_triton(g_lse, g_target, x.detach(), w.detach(), y,
                                                                  lse, *args)
    want_x, want_w = torch.autograd.grad((want[0] * g_lse).sum() + (want[1] * g_target).sum(), [x64, w64])
    assert grad_x.dtype == x.dtype and grad_w.dtype == w.dtype
    # the strides the fake kernel promises (torch.compile relies on them)
    assert grad_x.stride() == torch.empty_like(x).stride() and grad_w.stride() == torch.empty_like(w).stride()
    assert_close(grad_x, want_x, grad_tol, "grad_x")
    assert_close(grad_w, want_w, grad_tol, "grad_weight")
    return grad_x, grad_w


# ---------------------------------------------------------------------------------------
# Under the interpreter (CPU tensors)

#: (values, gradients) relative tolerances of the primitive, per input dtype (see conftest.TOLERANCES).
PRIMITIVE_TOLERANCES = {F64: (1e-12, 1e-10), F32: (1e-5, 1e-4), BF16: (1e-5, BF16_GRAD_RTOL), F16: (1e-5, 4e-3)}


@interpreter
@pytest.mark.parametrize("dtype", PRIMITIVE_TOLERANCES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("args", PRIMITIVE_ARGS, ids=lambda a: a[0])
def test_primitive_matches_reference(args, dtype):
    x, w, y = make_inputs(6, 13, 37, dtype, requires_grad=False)
    y[1], y[4] = -100, 40  # no target: below 0, and past C inside the last class tile
    primitive_vs_reference(x, w, y, args, *PRIMITIVE_TOLERANCES[dtype])


@interpreter
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_op_matches_reference(config, dtype):
    name, kwargs = config
    x, w, y = make_inputs(6, 13, 37, dtype, ignore_rows=(2,))
    compare(name, x, w, y, **kwargs)


@interpreter
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("config", OP_CONFIGS[::5], ids=config_id)
def test_op_reductions(config, reduction):
    name, kwargs = config
    x, w, y = make_inputs(5, 9, 23, F32, ignore_rows=(0, 3))
    compare(name, x, w, y, reduction=reduction, **kwargs)


@interpreter
@pytest.mark.parametrize("dtype", [F64, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", SHAPE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-C{}".format(*s))
def test_op_shapes(shape, config, dtype):
    n, d, c = shape
    name, kwargs = config
    x, w, y = make_inputs(n, d, c, dtype)
    place_targets(y, c, [0, c - 1, 63, 64, 65, 31, 32, 127, 128, 255, 256])  # ends of class tiles
    compare(name, x, w, y, reduction="sum", cancellation=d == 1, **kwargs)


@interpreter
@pytest.mark.parametrize("dtype", [F64, F32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", OP_CONFIGS[::2], ids=config_id)
def test_every_row_parallel_to_its_class(config, dtype):
    """|cos| = 1 at the target: sin θ is floored in the exact margin gradient."""
    name, kwargs = config
    x, w, y = make_inputs(5, 7, 11, dtype)
    with torch.no_grad():
        x.copy_(w[y] * torch.linspace(0.5, 2.0, 5, dtype=dtype).unsqueeze(1))
        x[1] = -w[y[1]]
    compare(name, x, w, y, cancellation=True, **kwargs)


@interpreter
@pytest.mark.parametrize("config", OP_CONFIGS[::3], ids=config_id)
def test_zero_norm_rows(config):
    """x and weight rows of norm 0 sit on the NORM_EPS floor."""
    name, kwargs = config
    x, w, y = make_inputs(5, 8, 13, F64)
    with torch.no_grad():
        x[2] = 0
        w[y[0]] = 0
        w[12] = 0
    compare(name, x, w, y, **kwargs)


@interpreter
def test_max_cos_is_a_clamped_cosine():
    t = torch.tensor([[1.656269907951355, 1.0606399774551392, 0.7503016591072083]])
    args = ("cosface", 1.0, 1.0, 0.0, 0.0, 0.0, False, False)
    max_cos = torch.ops.margin.margin_lse_triton(t, t, torch.tensor([0]), *args)[2]
    assert torch.equal(max_cos, reference.margin_lse(t, t, torch.tensor([0]), *args)[2])
    assert max_cos.item() <= 1.0


@interpreter
def test_pred_ties_pick_the_lowest_class():
    """Identical weight rows in different class tiles and groups of tiles."""
    w = torch.randn(300, 64)
    w[100] = w[5]
    w[250] = w[5]
    x = 2 * w[[5, 5]] + 0.01 * torch.randn(2, 64)
    with margin_ops.backend("triton"):
        out = margin_ops.with_stats("arcface", x, w, torch.tensor([7, 280]))
    assert out.pred.tolist() == [5, 5]


@interpreter
def test_strided_inputs():
    """weight given as the (D, C) parameter of classic code, transposed; x a column slice."""
    x_wide = make_inputs(6, 26, 37, F64, requires_grad=False).x
    _, w, y = make_inputs(6, 13, 37, F64, requires_grad=False)
    w_dc = w.t().contiguous()
    grad_x, grad_w = primitive_vs_reference(x_wide[:, ::2], w_dc.t(), y, PRIMITIVE_ARGS[0], 1e-12, 1e-10)
    assert not grad_w.is_contiguous() and grad_w.t().is_contiguous()


@interpreter
def test_backward_is_deterministic():
    x, w, y = make_inputs(40, 20, 300, F32, requires_grad=False)
    args = PRIMITIVE_ARGS[0]
    lse = torch.ops.margin.margin_lse_triton(x, w, y, *args)[0]
    g = (torch.randn(40), torch.randn(40))
    first = torch.ops.margin.margin_lse_backward_triton(*g, x, w, y, lse, *args)
    second = torch.ops.margin.margin_lse_backward_triton(*g, x, w, y, lse, *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@interpreter
def test_empty_batch():
    x, w, y = make_inputs(0, 8, 5, F32)
    got = compare("arcface", x, w, y, reduction="sum")
    assert got.grad_weight.abs().max() == 0


@interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("args", PRIMITIVE_ARGS[::2], ids=lambda a: a[0])
def test_opcheck(args, dtype):
    opcheck_primitive(torch.ops.margin.margin_lse_triton.default,
                      torch.ops.margin.margin_lse_backward_triton.default, args, dtype)


@interpreter
def test_compile_fullgraph():
    """The op is opaque to torch.compile (fake kernel): no graph break, same values and grads."""
    torch._dynamo.reset()
    x, w, y = make_inputs(6, 16, 37, F32, ignore_rows=(4,))

    def head(x, w, y):
        return torch.ops.margin.arcface(x, w, y, s=32.0, m=0.4) + torch.ops.margin.sphereface(x, w, y, gamma=1.0)

    with margin_ops.backend("triton"):
        got = run_with_grads(torch.compile(head, fullgraph=True), x, w, y)
        want = run_with_grads(head, x, w, y)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
        assert_close(a, b, 1e-5, what)


@interpreter
def test_autocast_bf16():
    x, w, y = make_inputs(6, 16, 21, F32)
    with margin_ops.backend("triton"), torch.autocast("cpu", dtype=BF16):
        autocast = run_with_grads(torch.ops.margin.cosface, x, w, y)
    with margin_ops.backend("triton"):
        manual = run_with_grads(lambda a, b, c: torch.ops.margin.cosface(a.to(BF16), b.to(BF16), c), x, w, y)
    for a, b, what in zip(autocast, manual, ("loss", "grad_x", "grad_w")):
        assert torch.equal(a, b), what


@interpreter
def test_backend_runs_on_cpu_under_the_interpreter():
    assert margin_ops.available_backends()["triton"] is None
    x, w, y = make_inputs(4, 8, 9, F32)
    with margin_ops.backend("triton"):
        assert margin_ops.current_backend("cpu") == "triton"
        with_stats = margin_ops.with_stats("arcface", x, w, y)
    assert_close(with_stats.loss, reference.arcface(x, w, y), 1e-5, "loss")


@interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_nan_propagates(dtype):
    check_nan_propagation("triton", "cpu", dtype)


# ---------------------------------------------------------------------------------------
# Without the interpreter


def test_schemas_are_the_cpp_ones():
    for name in ("margin_lse", "margin_lse_backward"):
        cpp = str(getattr(torch.ops.margin, name).default._schema)
        twin = str(getattr(torch.ops.margin, name + "_triton").default._schema)
        assert twin == cpp.replace(f"margin::{name}(", f"margin::{name}_triton(", 1)


@pytest.mark.skipif(INTERPRETED, reason="checks the message without the interpreter")
def test_cpu_tensors_need_the_interpreter():
    x, w, y = make_inputs(4, 8, 9, F32, requires_grad=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.margin.margin_lse_triton(x, w, y, *PRIMITIVE_ARGS[0])
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu tensors"):
        call_op("arcface", x, w, y, backend="triton")


def test_unsupported_dtype_is_named():
    x = torch.zeros(2, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        torch.ops.margin.margin_lse_triton(x, x, torch.zeros(2, dtype=torch.int64), *PRIMITIVE_ARGS[0])


# Offline builds for NVIDIA targets (ptxas ships with triton; no GPU needed): the GPU code
# path that the interpreter never compiles. Every margin in bfloat16, every dtype with
# ArcFace, and one Ampere build; arguments specialized as the JIT launcher would (unit
# inner strides, 16-divisible pointers and row strides).
COMPILE_CASES = [(90, BF16, margin) for margin in margin_ops.triton.margin.KINDS] + \
    [(90, dtype, "arcface") for dtype in (F16, F32, F64)] + [(80, BF16, "combined")]
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels are not compilable JIT functions")
@pytest.mark.parametrize("arch,dtype,margin", COMPILE_CASES,
                         ids=lambda v: DTYPE_IDS.get(v, f"sm{v}" if isinstance(v, int) else v))
def test_kernels_compile_for_nvidia(arch, dtype, margin):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from margin_ops.triton import margin_lse, margin_lse_backward

    element = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16"}
    acc = "fp64" if dtype == F64 else "fp32"
    common = dict(MARGIN=margin_ops.triton.margin.KINDS[margin], DETACH=margin == "arcface_easy",
                  INPUT_PRECISION="tf32" if dtype == F32 else "ieee", UPCAST=False)
    kernels = [(margin_lse.margin_lse_kernel, margin_lse.TILES, {}),
               (margin_lse_backward.grad_weight_kernel, margin_lse_backward.GRAD_W_TILES, {}),
               (margin_lse_backward.grad_x_kernel, margin_lse_backward.GRAD_X_TILES,
                dict(FEATURE_SCALE=margin == "sphereface"))]
    for kernel, tiles, extra in kernels:
        launch = tiles[dtype.itemsize].launch(512, 512)
        num_warps = launch.pop("num_warps")
        constexprs = {**common, **extra, **launch, "stride_xd": 1, "stride_wd": 1}
        if "stride_gd" in kernel.arg_names:
            constexprs["stride_gd"] = 1
        signature = {}
        for param in kernel.params:
            if param.name in constexprs:
                signature[param.name] = "constexpr"
            elif param.name.endswith("_ptr"):
                signature[param.name] = "*" + ("i64" if param.name in ("labels_ptr", "part_pred_ptr") else
                                               element[dtype] if param.name in ("x_ptr", "w_ptr", "grad_w_ptr") else acc)
            else:
                signature[param.name] = param.annotation or "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name].startswith("*") or name in ("D", "stride_xn", "stride_wc", "stride_gc")}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})
        assert compiled.asm["cubin"], kernel.__name__
        assert compiled.metadata.shared <= MAX_SHARED[arch], (kernel.__name__, compiled.metadata.shared)


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreter cases")
def test_interpreter_suite():
    """This file's interpreter cases, in a fresh process where TRITON_INTERPRET=1 comes first."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(margin_ops.backends.ENV_VAR, None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "not gpu",
                          str(Path(__file__).resolve())], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    summary = run.stdout.strip().splitlines()[-1:] or [run.stderr[-2000:]]
    assert run.returncode == 0, f"{summary}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    # A child that failed to turn the interpreter on would skip every case and still exit 0.
    assert INTERPRETER_OFF not in run.stdout, f"the interpreter cases skipped in the child too: {summary}"
    passed = re.search(r"(\d+) passed", summary[0])
    assert passed and int(passed.group(1)) > 0, summary
    print(summary[0])


# ---------------------------------------------------------------------------------------
# On a GPU (unmeasured in the session that wrote them: no GPU was at hand)


@gpu
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("args", PRIMITIVE_ARGS, ids=lambda a: a[0])
@pytest.mark.parametrize("shape", [(3, 13, 37), (64, 128, 3001), (256, 512, 20011)], ids=str)
def test_gpu_primitive_matches_reference(shape, args, dtype):
    x, w, y = make_inputs(*shape, dtype, device="cuda", requires_grad=False)
    y[0] = -100
    with matmul_precision("highest"):
        primitive_vs_reference(x, w, y, args, *PRIMITIVE_TOLERANCES[dtype])


@gpu
@pytest.mark.parametrize("config", OP_CONFIGS, ids=config_id)
def test_gpu_op_matches_reference(config):
    name, kwargs = config
    x, w, y = make_inputs(33, 64, 1000, BF16, ignore_rows=(5,), device="cuda")
    compare(name, x, w, y, **kwargs)


@gpu
def test_gpu_tf32_follows_matmul_precision():
    x, w, y = make_inputs(64, 256, 4099, F32, device="cuda", requires_grad=False)
    args = PRIMITIVE_ARGS[0]
    with matmul_precision("highest"):
        exact = torch.ops.margin.margin_lse_triton(x, w, y, *args)[0]
    with matmul_precision("high"):
        tf32 = torch.ops.margin.margin_lse_triton(x, w, y, *args)[0]
    assert_close(tf32, exact, 1e-2, "tf32 lse")
    assert not torch.equal(tf32, exact)


@gpu
def test_gpu_indices_past_int32():
    """N·C > 2**31: nothing may index the N x C product in 32 bits. Rows are
    independent, so the reference runs on row chunks (its N x C logits would not fit)."""
    n, d, c = 65536, 16, 32771
    assert n * c > 2**31
    x, w, y = make_inputs(n, d, c, F32, device="cuda", requires_grad=False)
    y[-1] = c - 1
    args = PRIMITIVE_ARGS[3]
    with matmul_precision("highest"):
        lse, target, max_cos, pred = torch.ops.margin.margin_lse_triton(x, w, y, *args)
        g_lse, g_target = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
        grad_x, grad_w = torch.ops.margin.margin_lse_backward_triton(g_lse, g_target, x, w, y, lse, *args)
    w64 = w.double().requires_grad_()
    want_w = torch.zeros_like(w64)
    for rows in torch.arange(n, device="cuda").split(4096):
        x64 = x[rows].double().requires_grad_()
        want = reference.margin_lse(x64, w64, y[rows], *args)
        assert_close(lse[rows], want[0], 1e-5, "lse")
        assert_close(target[rows], want[1], 1e-5, "target_logit")
        assert torch.equal(pred[rows], want[3])
        gx, gw = torch.autograd.grad((want[0] * g_lse[rows]).sum() + (want[1] * g_target[rows]).sum(), [x64, w64])
        assert_close(grad_x[rows], gx, 1e-4, "grad_x")
        want_w += gw
    assert_close(grad_w, want_w, 1e-4, "grad_weight")


@gpu
def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    x, w, y = make_inputs(64, 128, 3001, BF16, device="cuda")

    def head(x, w, y):
        return torch.ops.margin.arcface(x, w, y, s=64.0, m=0.5)

    with margin_ops.backend("triton"):
        got = run_with_grads(torch.compile(head, fullgraph=True), x, w, y)
        want = run_with_grads(head, x, w, y)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
        assert_close(a, b, 1e-5, what)

