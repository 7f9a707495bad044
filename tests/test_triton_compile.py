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
    [(arch, dtype, "arcface", ONE_SUBCENTER_OPTIONS) for arch, dtype in ((80, BF16), (90, F32))] + \
    [(90, F16, "arcface", ALL_OPTIONS)]
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
INDEX_POINTERS = ("labels_ptr", "part_pred_ptr", "class_index_ptr")
#: Pointers to input-dtype tensors; the other pointers are to accumulation-dtype ones.
INPUT_POINTERS = ("x_ptr", "w_ptr", "grad_w_ptr", "x_hat_ptr", "scratch_ptr")
ELEMENT = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16"}
#: (kernel, its launch-table name) of every kernel both passes launch.
KERNELS = [("margin_lse", "margin_lse_kernel", "forward"),
           ("margin_lse_backward", "grad_tile_kernel", "grad_tile"),
           ("margin_lse_backward", "grad_weight_kernel", "grad_weight"),
           ("margin_lse_backward", "grad_x_kernel", "grad_x")]
#: The launch-table problem size the builds use: N = 512, D = 512 (the named shapes').
N = D = 512


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


def spills(ptx: str, arch: int) -> dict:
    """ptxas -v's figures for the PTX (ptxas ships with triton): stack frame bytes and spill
    stores / loads. A stack frame without spills is a local array, e.g. the slow path of
    cos / sin's argument reduction (margin "combined")."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch).path  # the ptxas triton itself runs for this architecture
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        out = subprocess.run([str(tool), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", str(source),
                              "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    stack, stores, loads = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                     out.stdout + out.stderr).groups()
    return {"stack": int(stack), "spill_stores": int(stores), "spill_loads": int(loads)}


def build(module: str, name: str, table_name: str, arch: int, dtype, margin: str, options: dict,
          input_precision: str | None = None):
    """Compiles one kernel offline for sm_<arch> with the launch table's default launch for
    N = D = 512, arguments specialized as the JIT launcher would (unit inner strides,
    16-divisible pointers and row strides). Returns (compiled kernel, launch constexprs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from margin_ops.triton import launch as table

    kernel = getattr(getattr(margin_ops.triton, module), name)
    acc = "fp64" if dtype == F64 else "fp32"
    precision = input_precision or ("tf32" if dtype == F32 else "ieee")
    options_ = dict(MARGIN=margin_ops.spec.KINDS[margin], DETACH=margin == "arcface_easy", INPUT_PRECISION=precision,
                    UPCAST=False, FEATURE_SCALE=margin == "sphereface", **options)
    launch = table.default(table_name, dtype, arch == 90, options["SUBCENTERS"])
    columns = N * options["SUBCENTERS"]  # classes (x sub-centers) of a chunk: the scratch's columns
    sizes = launch.constexprs(table_name, {"grad_weight": (columns, D, N), "grad_x": (N, D, columns)}.get(
        table_name, (N, N, D)))
    num_warps, num_stages = sizes.pop("num_warps"), sizes.pop("num_stages")
    constexprs = {key: value for key, value in options_.items() if key in kernel.arg_names}
    constexprs.update(sizes)
    constexprs.update({stride: 1 for stride in ("stride_xd", "stride_wd", "stride_gd") if stride in kernel.arg_names})
    signature = {}
    for param in kernel.params:
        if param.name in constexprs:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + ("i64" if param.name in INDEX_POINTERS else
                                           ELEMENT[dtype] if param.name in INPUT_POINTERS else acc)
        else:
            signature[param.name] = param.annotation or ("i1" if param.name == "accumulate" else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in ("D", "stride_xn", "stride_wc", "stride_gc", "stride_s")}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    return compiled, dict(sizes, num_warps=num_warps, num_stages=num_stages)


def tensor_core_ops(ptx: str) -> dict:
    """How many warpgroup (wgmma.mma_async) and warp (mma.sync) MMA instructions the PTX has."""
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)), "mma.sync": len(re.findall(r"\bmma\.sync\.", ptx))}


def uses_wgmma(arch: int, dtype, precision: str) -> bool:
    """Whether a GEMM kernel must issue wgmma: on sm_90a for 16-bit inputs and TF32 (wgmma
    has no float64, and exact float32 runs on the FMA units)."""
    return arch == 90 and (dtype.itemsize == 2 or precision == "tf32")


@pytest.mark.compiled_triton
@pytest.mark.parametrize("arch,dtype,margin,options", COMPILE_CASES, ids=_case_id)
def test_kernels_compile_for_nvidia(arch, dtype, margin, options):
    """Every kernel builds with the launch table's tiles: shared memory within the GPU's
    limit, no register spills (ptxas), and on sm_90a wgmma.mma_async in each GEMM kernel."""
    precision = "tf32" if dtype == F32 else "ieee"
    for module, name, table_name in KERNELS:
        compiled, launch = build(module, name, table_name, arch, dtype, margin, options)
        assert compiled.asm["cubin"], name
        assert compiled.metadata.shared <= MAX_SHARED[arch], (name, compiled.metadata.shared)
        mma = tensor_core_ops(compiled.asm["ptx"])
        if uses_wgmma(arch, dtype, precision):
            assert mma["wgmma"] > 0, (name, launch, mma)
        spilled = spills(compiled.asm["ptx"], arch)
        assert spilled["spill_stores"] == spilled["spill_loads"] == 0, (name, launch, spilled)
        for function, usage in resource_usage(compiled.asm["cubin"]).items():
            print(f"sm{arch} {DTYPE_IDS[dtype]} {margin} K={options['SUBCENTERS']}: {function} {launch} {mma} "
                  f"{spilled} {usage}")


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



if __name__ == "__main__":
    # The offline compile figures of benchmarks/RESULTS.md (run with TRITON_INTERPRET unset).
    print("| arch | dtype | kernel | tile | warps | stages | registers | shared (B) | stack / spill st / spill ld (B) | wgmma | mma.sync |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in (90, 80):
        for dtype in (BF16, F16, F32, F64):
            for module, name, table_name in KERNELS:
                compiled, launch = build(module, name, table_name, arch, dtype, "arcface", NO_OPTIONS)
                usage = next(iter(resource_usage(compiled.asm["cubin"]).values()))
                reg = re.search(r"REG:(\d+)", usage)[1]
                spilled = spills(compiled.asm["ptx"], arch)
                stack = f"{spilled['stack']} / {spilled['spill_stores']} / {spilled['spill_loads']}"
                mma = tensor_core_ops(compiled.asm["ptx"])
                tile = " x ".join(str(v) for k, v in launch.items() if k.startswith("BLOCK_"))
                print(f"| sm_{arch}{'a' if arch == 90 else ''} | {ELEMENT[dtype]}{' (tf32)' if dtype == F32 else ''} "
                      f"| {name} | {tile} | {launch['num_warps']} | {launch['num_stages']} | {reg} "
                      f"| {compiled.metadata.shared} | {stack} | {mma['wgmma']} | {mma['mma.sync']} |", flush=True)
