"""A host emulator of the CUDA execution model: runs the source of CUDA C++ kernels on a
CPU, as a torch extension compiled with g++ (see emulator.h for what it models, build.py
for how a source tree is turned into host C++, emulated_ptx.cuh for the PTX instructions
it gives host implementations of).

Nothing here knows a particular project: a project supplies its source tree, the headers
to swap (its PTX wrappers for thin forwards to emulated_ptx.cuh) and its Python entry
points (e.g. tools/margin_emulated for margin_ops).
"""

from .build import (HERE, TORCH_CUDA_DEFINES, build_extension, build_hopper_probe, cuda_include_dir, rewrite_header,
                    rewrite_kernel_source, stage_sources)

__all__ = ["HERE", "TORCH_CUDA_DEFINES", "build_extension", "build_hopper_probe", "cuda_include_dir", "rewrite_header",
           "rewrite_kernel_source", "stage_sources"]
