"""Builds csrc/cuda's kernels for the host emulator (emulator.h) as a CPU torch extension.

The kernel sources are copied into ``build/cuda_emulator/src`` and rewritten in the only two
places where CUDA C++ is not C++: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::emu::launch(grid, block, smem, stream, kernel, args)`` and ``extern __shared__ T name[]``
becomes a pointer to the emulated block's dynamic shared memory; each static ``__shared__``
declaration is followed by a call that poisons the variable once per block (on the same
line: compiler messages keep the kernels' line numbers). margin_lse_ptx.cuh is replaced by
emulated_ptx.cuh. Everything else (the device code, the launchers, the layouts
and workspace carving) compiles unchanged with g++.

Needs the CUDA toolkit's headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h; no GPU, no
libcudart): found through $CUDA_HOME, the nvcc on PATH, or /usr/local/cuda.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
BUILD = REPO / "build" / "cuda_emulator"

#: Backward workspace budgets for the emulated build (bytes), far below the GPU build's so
#: that small test problems take several class chunks (and, in 16-bit, several dX splits).
SCRATCH_BUDGET = 128 << 10
PARTIAL_BUDGET = 64 << 10

_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;()]*>)?)<<<(.+?)>>>\(")
_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
_STATIC_SHARED = re.compile(r"^(\s*)__shared__ ([^;=]+?) (\w+)((?:\[[^\]]+\])*);", re.MULTILINE)


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory, or None if there is none."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").is_file()), None)


def rewrite_kernel_source(text: str) -> str:
    """The .cu text as host C++ for the emulator (see the module docstring)."""
    launches = len(_LAUNCH.findall(text))
    text = _LAUNCH.sub(r"::emu::launch(\2, \1, ", text)
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", text)
    text = _STATIC_SHARED.sub(r"\1__shared__ \2 \3\4; ::emu::poison_shared(&\3, sizeof(\3));", text)
    if "<<<" in text or "extern __shared__" in text:
        raise RuntimeError("a kernel launch or extern __shared__ declaration the rewrite does not handle")
    return f'#include "emulator.h"  // rewritten for the host emulator ({launches} launches)\n' + text


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def stage_sources() -> list[Path]:
    """Copies and rewrites the kernel sources into BUILD/src; returns the .cpp files to compile."""
    src = BUILD / "src"
    for header in CSRC.glob("*.h"):
        _write_if_changed(src / header.name, header.read_text())
    for header in (CSRC / "cuda").glob("*.cuh"):
        text = (HERE / "emulated_ptx.cuh").read_text() if header.name == "margin_lse_ptx.cuh" else header.read_text()
        _write_if_changed(src / "cuda" / header.name, text)
    kernels = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        out = src / "cuda" / (cu.stem + ".cpp")
        _write_if_changed(out, rewrite_kernel_source(cu.read_text()))
        kernels.append(out)
    return kernels


def load(verbose: bool = False):
    """Compiles (incrementally) and imports the emulated kernels' extension module."""
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("CUDA headers not found (set CUDA_HOME): the emulator compiles the kernels "
                           "against cuda_runtime.h, cuda_bf16.h and cuda_fp16.h")
    from torch.utils import cpp_extension

    kernels = stage_sources()
    build_dir = BUILD / "obj"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="margin_ops_cuda_emulator",
        sources=[str(HERE / "driver.cpp"), str(HERE / "emulator.cpp"), str(HERE / "ptx_probe.cpp"),
                 *map(str, kernels)],
        extra_include_paths=[str(BUILD / "src"), str(BUILD / "src" / "cuda"), str(HERE), str(include)],
        extra_cflags=[
            "-O2", "-std=c++17", "-Wno-unknown-pragmas",
            # as torch's BuildExtension compiles the real kernels: no implicit 16-bit conversions
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            f"-DMARGIN_OPS_BWD_SCRATCH_BUDGET={SCRATCH_BUDGET}",
            f"-DMARGIN_OPS_BWD_PARTIAL_BUDGET={PARTIAL_BUDGET}",
        ],
        build_directory=str(build_dir),
        verbose=verbose,
    )


if __name__ == "__main__":
    load(verbose=True)
    print("built", BUILD)
