"""Builds margin_ops._C against the installed PyTorch.

The CPU kernels are always built; the CUDA kernels (csrc/cuda/*.cu and their glue
csrc/cuda/*.cpp) are added when this torch has CUDA and nvcc is found, for the
architectures in TORCH_CUDA_ARCH_LIST (default DEFAULT_CUDA_ARCH_LIST below: machine code
for sm_80 and sm_90a, plus compute_80 PTX that the driver JIT-compiles on newer GPUs).
Install with

    pip install --no-build-isolation .

so the build sees the torch you run with.
"""

import glob
import importlib.machinery
import os
import site
import sys

from setuptools import find_packages, setup

#: sm_80 machine code (A100; also runs on sm_86/sm_87/sm_89), sm_90a machine code (Hopper),
#: and compute_80 PTX ("+PTX"), which the driver JIT-compiles for GPUs with neither (sm_100,
#: sm_120 and later). The kernels use only sm_80 features, so compute_80 PTX is as good as a
#: later one and also covers every GPU from sm_80 on. A TORCH_CUDA_ARCH_LIST set by the user
#: replaces this list (torch's syntax: "8.0;8.6;9.0a", "9.0+PTX", "Ampere", ...).
DEFAULT_CUDA_ARCH_LIST = "8.0+PTX;9.0a"

CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def _isolated_build() -> bool:
    """Whether this runs in a PEP 517 frontend's isolated build environment: pip's (its
    /tmp/pip-build-env-* directories on sys.path) or the throw-away virtual environment of
    `python -m build` / uv (sys.prefix differs from the base interpreter's, under a build-env
    directory)."""
    if any("pip-build-env-" in entry for entry in sys.path):
        return True
    return sys.prefix != sys.base_prefix and any(
        marker in sys.prefix for marker in ("build-env-", "builds-v"))


def _hidden_torch() -> str | None:
    """Where torch is installed outside this build's sys.path (pip's isolation keeps the
    interpreter but drops its site-packages from sys.path), or None."""
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d not in sys.path]
    spec = importlib.machinery.PathFinder.find_spec("torch", dirs)
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def _no_torch_message(error: ImportError) -> str:
    why = ("torch is deliberately not among pyproject.toml's build requirements: the extension\n"
           "must be compiled against the torch you will run it with, not a fresh copy that an\n"
           "isolated build environment would download.\n")
    build = ("    pip install --no-build-isolation .      (or -e \".[test]\" to develop; this uses the\n"
             "                                            environment's setuptools: pip install setuptools\n"
             "                                            wheel ninja if they are missing)")
    install = ("    # a machine with an NVIDIA GPU: the CUDA build of torch\n"
               "    pip install torch ninja\n"
               "    # a CPU-only machine: the CPU build (a bare `pip install torch` pulls the multi-GB CUDA one)\n"
               f"    {CPU_TORCH} && pip install ninja\n"
               "    # then\n")
    hidden = _hidden_torch()
    if hidden is not None:
        return (f"margin_ops compiles against the installed PyTorch. torch is installed ({hidden}),\n"
                f"but this build cannot import it ({error}): it runs in pip's isolated build environment\n"
                "(the default of `pip install .`), which holds only the build requirements, not the\n"
                f"packages of your environment.\n{why}"
                f"Build without isolation, in the environment that has torch:\n{build}")
    if _isolated_build():
        return (f"margin_ops compiles against the installed PyTorch, and this build cannot import it\n"
                f"({error}): it runs in an isolated build environment (pip's default build isolation,\n"
                "`python -m build`, uv), which holds only the build requirements, so it would not see\n"
                f"torch even where it is installed.\n{why}"
                f"Install torch if you have not, then build without isolation:\n{install}{build}")
    return (f"margin_ops compiles against the installed PyTorch, and there is none ({error}).\n"
            f"Install torch first, then build without isolation:\n{install}{build}")


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # no torch here, or pip's isolated build environment hides it
    raise SystemExit(_no_torch_message(error)) from None

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx_flags = ["-O3"]
    link_flags = []
    # at::parallel_for is inlined into our code: it needs OpenMP when torch uses it.
    if "OpenMP" in torch._C._parallel_info():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cpp = sources("csrc/margin.cpp") + sources("csrc/cpu/*.cpp")
    cuda = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
    with_cuda = bool(cuda) and torch.version.cuda is not None and CUDA_HOME is not None
    if not with_cuda:
        return CppExtension("margin_ops._C", cpp, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension("margin_ops._C", cpp + cuda,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         extra_link_args=link_flags)


setup(
    packages=find_packages(include=["margin_ops", "margin_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
