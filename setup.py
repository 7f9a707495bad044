"""Builds margin_ops._C against the installed PyTorch.

The CPU kernels are always built; the CUDA kernels (csrc/cuda/*.cu and their glue
csrc/cuda/*.cpp) are added when this torch has CUDA and nvcc is found, for the
architectures in TORCH_CUDA_ARCH_LIST (default: sm_80 and sm_90a). Install with

    pip install --no-build-isolation .

so the build sees the torch you run with.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pip's isolated build environment has no torch
    raise SystemExit(
        "margin_ops compiles against the installed PyTorch, which this build cannot see "
        f"({error}).\nInstall torch first, then build without isolation:\n"
        "    pip install torch ninja\n"
        "    pip install --no-build-isolation ."
    ) from None

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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension("margin_ops._C", cpp + cuda,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         extra_link_args=link_flags)


setup(
    packages=find_packages(include=["margin_ops", "margin_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
