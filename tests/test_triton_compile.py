"""Offline builds of the Triton kernels for NVIDIA targets (ptxas ships with triton; no GPU
needed): the GPU code path that the interpreter never compiles.

These need the kernels as compilable JIT functions, i.e. a process where TRITON_INTERPRET
is off when triton and margin_ops are imported. Where the suite runs interpreted (machines
without a GPU, see conftest.py), conftest deselects them and
:func:`test_offline_builds_in_a_compiled_triton_process` runs this file in a child process
with the interpreter off: its cases are counted there, in the summary it prints.
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
import margin_ops.triton  # noqa: E402

from conformance.cases import DTYPE_IDS  # noqa: E402

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# Every margin in bfloat16, every dtype with ArcFace, and one Ampere build; arguments
# specialized as the JIT launcher would (unit inner strides, 16-divisible pointers and row
# strides).
COMPILE_CASES = [(90, BF16, margin) for margin in margin_ops.spec.MARGINS] + \
    [(90, dtype, "arcface") for dtype in (F16, F32, F64)] + [(80, BF16, "combined")]
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.compiled_triton
@pytest.mark.parametrize("arch,dtype,margin", COMPILE_CASES,
                         ids=lambda v: DTYPE_IDS.get(v, f"sm{v}" if isinstance(v, int) else v))
def test_kernels_compile_for_nvidia(arch, dtype, margin):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from margin_ops.triton import margin_lse, margin_lse_backward

    element = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16"}
    acc = "fp64" if dtype == F64 else "fp32"
    common = dict(MARGIN=margin_ops.spec.KINDS[margin], DETACH=margin == "arcface_easy",
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
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "enable_fp_fusion": True})
        assert compiled.asm["cubin"], kernel.__name__
        assert compiled.metadata.shared <= MAX_SHARED[arch], (kernel.__name__, compiled.metadata.shared)


@pytest.mark.interpreted_triton_only
@pytest.mark.slow
def test_offline_builds_in_a_compiled_triton_process():
    """This file's builds, in a child process with the interpreter off (this one runs it)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
                         capture_output=True, text=True, env=env, timeout=900, cwd=Path(__file__).resolve().parents[1])
    summary = (run.stdout.strip().splitlines() or [run.stderr[-2000:]])[-1]
    assert run.returncode == 0, f"{summary}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == len(COMPILE_CASES), summary
    print(f"child process (TRITON_INTERPRET=0): {summary}")

