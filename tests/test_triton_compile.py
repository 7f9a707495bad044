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
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import margin_ops  # noqa: E402
import margin_ops.triton  # noqa: E402

from conformance.cases import DTYPE_IDS  # noqa: E402

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

#: The primitive's options as the kernels' constexprs: none; every one (3 sub-centers,
#: class_index, hard examples); those that keep the K = 1 tiles.
NO_OPTIONS = dict(SUBCENTERS=1, INDEXED=False, HARD=False)
ALL_OPTIONS = dict(SUBCENTERS=3, INDEXED=True, HARD=True)
ONE_SUBCENTER_OPTIONS = dict(SUBCENTERS=1, INDEXED=True, HARD=True)
# Every margin in bfloat16, every dtype with ArcFace, one Ampere build, every option on in
# every dtype (Ampere and Hopper), the K = 1 options in two; arguments specialized as the JIT launcher would (unit
# inner strides, 16-divisible pointers and row strides).
COMPILE_CASES = [(90, BF16, margin, NO_OPTIONS) for margin in margin_ops.spec.MARGINS] + \
    [(90, dtype, "arcface", NO_OPTIONS) for dtype in (F16, F32, F64)] + [(80, BF16, "combined", NO_OPTIONS)] + \
    [(arch, dtype, "external" if dtype == F32 else "arcface", ALL_OPTIONS) for arch in (80, 90)
     for dtype in (BF16, F32, F64)] + \
    [(arch, dtype, "arcface", ONE_SUBCENTER_OPTIONS) for arch, dtype in ((80, BF16), (90, F32))]
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
INDEX_POINTERS = ("labels_ptr", "part_pred_ptr", "class_index_ptr")


def _case_id(value) -> str:
    if isinstance(value, dict):
        return {str(NO_OPTIONS): "no-options", str(ALL_OPTIONS): "all-options"}.get(str(value), "k1-options")
    return f"sm{value}" if isinstance(value, int) else DTYPE_IDS.get(value, value)


def resource_usage(cubin: bytes) -> dict:
    """{kernel: "REG:.. STACK:.. SHARED:.. LOCAL:.."} as cuobjdump (shipped with triton) reads the cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", out))


@pytest.mark.compiled_triton
@pytest.mark.parametrize("arch,dtype,margin,options", COMPILE_CASES, ids=_case_id)
def test_kernels_compile_for_nvidia(arch, dtype, margin, options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from margin_ops.triton import margin_lse, margin_lse_backward

    element = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16"}
    acc = "fp64" if dtype == F64 else "fp32"
    common = dict(MARGIN=margin_ops.spec.KINDS[margin], DETACH=margin == "arcface_easy",
                  INPUT_PRECISION="tf32" if dtype == F32 else "ieee", UPCAST=False, **options)
    kernels = [(margin_lse.margin_lse_kernel, margin_lse.TILES, {}),
               (margin_lse_backward.grad_weight_kernel, margin_lse_backward.GRAD_W_TILES, {}),
               (margin_lse_backward.grad_x_kernel, margin_lse_backward.GRAD_X_TILES,
                dict(FEATURE_SCALE=margin == "sphereface"))]
    for kernel, tiles, extra in kernels:
        launch = tiles[dtype.itemsize, options["SUBCENTERS"] > 1].launch(512, 512)
        num_warps = launch.pop("num_warps")
        constexprs = {**common, **extra, **launch, "stride_xd": 1, "stride_wd": 1}
        if "stride_gd" in kernel.arg_names:
            constexprs["stride_gd"] = 1
        signature = {}
        for param in kernel.params:
            if param.name in constexprs:
                signature[param.name] = "constexpr"
            elif param.name.endswith("_ptr"):
                signature[param.name] = "*" + ("i64" if param.name in INDEX_POINTERS else
                                               element[dtype] if param.name in ("x_ptr", "w_ptr", "grad_w_ptr") else acc)
            else:
                signature[param.name] = param.annotation or "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name].startswith("*") or name in ("D", "stride_xn", "stride_wc", "stride_gc")}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "enable_fp_fusion": True})
        assert compiled.asm["cubin"], kernel.__name__
        assert compiled.metadata.shared <= MAX_SHARED[arch], (kernel.__name__, compiled.metadata.shared)
        for name, usage in resource_usage(compiled.asm["cubin"]).items():
            print(f"sm{arch} {DTYPE_IDS[dtype]} {margin} K={options['SUBCENTERS']}: {name} {usage}")


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

