"""Builds CUDA C++ sources for the host emulator (emulator.h) as a CPU torch extension.

A source tree is staged into a build directory: its headers are copied, and each ``.cu``
file becomes a ``.cpp`` file rewritten in the only places where CUDA C++ is not C++:
``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::emu::launch(grid, block, smem, stream, kernel, args)`` and ``cudaLaunchKernelEx(config,
kernel, args)`` (a launch with a cluster shape) ``::emu::launch_ex(config, kernel, args)``,
``extern __shared__ T name[]``
becomes a pointer to the emulated block's dynamic shared memory, and each static
``__shared__`` declaration (in the ``.cu`` files and in the headers) is followed by a call
that poisons the variable once per block (on the same line: compiler messages keep the
sources' line numbers). Headers may be replaced on the way (the project's PTX wrappers by
host versions: emulated_ptx.cuh has those of the common instructions). Everything else
(the device code, the launchers, the layouts and workspace carving) compiles unchanged
with g++, together with emulator.cpp and the caller's own host sources (Python entry
points) into one extension module.

Needs the CUDA toolkit's headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h; no GPU, no
libcudart): found through $CUDA_HOME, the nvcc on PATH, or /usr/local/cuda.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping

HERE = Path(__file__).resolve().parent

#: Suffixes of the staged (copied, not compiled) files of a source tree.
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")

#: The flags torch's BuildExtension compiles CUDA sources with that change what the source
#: may do: no implicit 16-bit conversions or operators.
TORCH_CUDA_DEFINES = ("__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__",
                      "__CUDA_NO_BFLOAT16_CONVERSIONS__", "__CUDA_NO_HALF2_OPERATORS__")

_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;()]*>)?)<<<(.+?)>>>\(")
_LAUNCH_EX = re.compile(r"\bcudaLaunchKernelEx\(")
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


def _poison_static_shared(text: str) -> str:
    return _STATIC_SHARED.sub(r"\1__shared__ \2 \3\4; ::emu::poison_shared(&\3, sizeof(\3));", text)


def rewrite_header(text: str) -> str:
    """A header as host C++ for the emulator: its static ``__shared__`` declarations poisoned
    (a header has no launches; emulator.h comes first through the .cu file that includes it)."""
    return _poison_static_shared(text)


def rewrite_kernel_source(text: str) -> str:
    """The .cu text as host C++ for the emulator (see the module docstring)."""
    launches = len(_LAUNCH.findall(text)) + len(_LAUNCH_EX.findall(text))
    text = _LAUNCH.sub(r"::emu::launch(\2, \1, ", text)
    text = _LAUNCH_EX.sub("::emu::launch_ex(", text)
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", text)
    text = _poison_static_shared(text)
    if "<<<" in text or "extern __shared__" in text:
        raise RuntimeError("a kernel launch or extern __shared__ declaration the rewrite does not handle")
    return f'#include "emulator.h"  // rewritten for the host emulator ({launches} launches)\n' + text


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def stage_sources(src_root: Path, staged: Path, replacements: Mapping[str, Path] | None = None) -> list[Path]:
    """Copies the headers of ``src_root`` (every level) into ``staged`` and rewrites its .cu
    files into .cpp files beside them; returns the .cpp files, to compile.

    ``replacements``: header path relative to ``src_root`` (as ``"cuda/x_ptx.cuh"``) -> the
    file staged in its place. Files are written only when their text changes, so the
    extension rebuilds incrementally.
    """
    replacements = dict(replacements or {})
    kernels = []
    for path in sorted(src_root.rglob("*")):
        rel = path.relative_to(src_root).as_posix()
        if path.suffix in HEADER_SUFFIXES:
            source = replacements.pop(rel, path)
            _write_if_changed(staged / rel, rewrite_header(source.read_text()))
        elif path.suffix == ".cu":
            out = (staged / rel).with_suffix(".cpp")
            _write_if_changed(out, rewrite_kernel_source(path.read_text()))
            kernels.append(out)
    if replacements:
        raise FileNotFoundError(f"no such headers under {src_root} to replace: {sorted(replacements)}")
    return kernels


def build_extension(name: str, *, src_root: Path, build_root: Path, sources: Iterable[Path],
                    replacements: Mapping[str, Path] | None = None,
                    include_dirs: Iterable[Path] = (), defines: Mapping[str, object] | None = None,
                    torch_cuda_defines: bool = True, verbose: bool = False):
    """Stages ``src_root`` under ``build_root / "src"`` (:func:`stage_sources`), compiles its
    kernels with emulator.cpp and the caller's host ``sources`` (the Python entry points;
    they include emulator.h or the staged headers) and imports the extension module
    ``name``. Compiles incrementally in ``build_root / "obj"``.

    Include path: the staged tree's root, then ``include_dirs``, this directory
    (emulator.h, emulated_ptx.cuh) and the CUDA headers. ``defines``: extra -D macros;
    ``torch_cuda_defines``: also torch's 16-bit macros (:data:`TORCH_CUDA_DEFINES`), as
    BuildExtension compiles the real CUDA sources.
    """
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("CUDA headers not found (set CUDA_HOME): the emulator compiles the kernels "
                           "against cuda_runtime.h, cuda_bf16.h and cuda_fp16.h")
    from torch.utils import cpp_extension

    staged = build_root / "src"
    kernels = stage_sources(src_root, staged, replacements)
    obj = build_root / "obj"
    obj.mkdir(parents=True, exist_ok=True)
    flags = ["-O2", "-std=c++17", "-Wno-unknown-pragmas"]
    flags += [f"-D{d}" for d in TORCH_CUDA_DEFINES] if torch_cuda_defines else []
    flags += [f"-D{k}={v}" for k, v in (defines or {}).items()]
    return cpp_extension.load(
        name=name,
        sources=[*map(str, sources), str(HERE / "emulator.cpp"), *map(str, kernels)],
        extra_include_paths=[str(staged), *map(str, include_dirs), str(HERE), str(include)],
        extra_cflags=flags,
        build_directory=str(obj),
        verbose=verbose,
    )


def build_hopper_probe(build_root: Path, verbose: bool = False):
    """Compiles (incrementally) and imports hopper_probe.cpp with emulator.cpp: the probes of
    the emulated sm_90a instructions (mbarrier, bulk copies, wgmma) that
    tests/test_emulator_hopper.py checks, independently of any project's kernels."""
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("CUDA headers not found (set CUDA_HOME)")
    from torch.utils import cpp_extension

    build_root.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="cuda_emulator_hopper_probe",
        sources=[str(HERE / "hopper_probe.cpp"), str(HERE / "emulator.cpp")],
        extra_include_paths=[str(HERE), str(include)],
        extra_cflags=["-O2", "-std=c++17", "-Wno-unknown-pragmas", *(f"-D{d}" for d in TORCH_CUDA_DEFINES)],
        build_directory=str(build_root),
        verbose=verbose,
    )
