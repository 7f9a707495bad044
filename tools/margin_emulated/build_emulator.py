"""Builds margin_ops's CUDA kernels (csrc/cuda/*.cu) for the host emulator as a CPU torch
extension, and imports it: ``load()``.

The generic part (staging and rewriting the sources, compiling them with the emulator) is
tools/cuda_emulator; this module says what margin_ops adds: the source tree csrc/, its PTX
wrappers header swapped for margin_lse_ptx.cuh here (forwards to the emulator's PTX), the
Python entry points (driver.cpp: forward, backward, set_schedule; ptx_probe.cpp:
probe_mma, probe_ldmatrix) and backward workspace budgets small enough that the tests'
problems take several class chunks and dX splits.

Importable with ``tools/`` on sys.path (``from margin_emulated import build_emulator``);
``PYTHONPATH=tools python -m margin_emulated.build_emulator`` builds it verbosely.
"""

from __future__ import annotations

from pathlib import Path

import cuda_emulator
from cuda_emulator import cuda_include_dir, rewrite_kernel_source  # noqa: F401  (this module's API)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
BUILD = REPO / "build" / "cuda_emulator"

#: Backward workspace budgets for the emulated build (bytes), far below the GPU build's so
#: that small test problems take several class chunks and dX splits (the partials: two
#: splits of N_pad = 128 x D_pad = 384 fp32, sm_90a's 128 x 256 dX tile with a partial one).
SCRATCH_BUDGET = 128 << 10
PARTIAL_BUDGET = 384 << 10


def load(verbose: bool = False):
    """Compiles (incrementally) and imports the emulated kernels' extension module: forward,
    backward, set_schedule (driver.cpp), probe_mma, probe_ldmatrix (ptx_probe.cpp)."""
    return cuda_emulator.build_extension(
        "margin_ops_cuda_emulator",
        src_root=CSRC,
        build_root=BUILD,
        sources=[HERE / "driver.cpp", HERE / "ptx_probe.cpp"],
        replacements={"cuda/margin_lse_ptx.cuh": HERE / "margin_lse_ptx.cuh"},
        defines={"MARGIN_OPS_BWD_SCRATCH_BUDGET": SCRATCH_BUDGET,
                 "MARGIN_OPS_BWD_PARTIAL_BUDGET": PARTIAL_BUDGET},
        verbose=verbose,
    )


if __name__ == "__main__":
    load(verbose=True)
    print("built", BUILD)
