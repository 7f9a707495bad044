"""The launch table: each kernel's tile sizes, warps and pipeline stages, keyed on
(dtype, N bucket, D bucket), plus an opt-in autotune that records what it picks.

Default (deterministic, nothing is timed at run time). :func:`lookup` returns the entry
of :data:`TABLE` for the key, else :func:`default`'s rule; the same inputs on the same
GPU architecture always get the same launch. The rule, checked by offline builds for
sm_90a and sm_80 (tests/test_triton_compile.py: no register spills, shared memory within
the limit, ``wgmma.mma_async`` in every 16-bit / TF32 GEMM kernel on sm_90a):

* 16-bit and float32 on Hopper (sm_90): 8 warps (two warpgroups), BLOCK_M = 64 rows per
  warpgroup, 128-wide class tiles, BLOCK_K = 64 (16-bit) / 32 (float32), 4 pipeline
  stages (3 in the backward's cosine-tile kernel, whose epilogue holds more registers);
  N ≤ 64 keeps the same tiles (the kernels shrink a tile to the problem: powers of two
  ≥ 16, so a small N or D never pads far past itself).
* Other architectures (sm_80 and older): the same GEMM tiles but 64-wide class tiles in
  the two cosine kernels (at 128 their epilogue spills on sm_80), 3 stages (2 with
  float32, whose stages are twice the bytes).
* float64: wgmma has no float64 (the builds issue DMMA mma.sync): 32 x 64 cosine tiles
  (64 x 64 spills on sm_90a), 64 x 64 gradient GEMMs, BLOCK_K 32, 8 warps, 2 stages.
  Exact float32 (INPUT_PRECISION "ieee") runs on the FMA units with the float32 tiles.
* Sub-centers (K > 1): the cosine kernels hold the running best tile and the next
  sub-center's: half the classes per tile.

Buckets: N ≤ 64, ≤ 256, larger ("n64", "n256", "nbig"); D ≤ 128, ≤ 512, larger ("d128",
"d512", "dbig"). A GPU session fills :data:`TABLE` from the autotune's record.

Autotune (opt-in): with ``MARGIN_OPS_TRITON_AUTOTUNE=1`` (compiled kernels on a GPU only;
ignored under the interpreter), the first launch of each key times :func:`candidates`
(triton.testing.do_bench, outputs restored between tries so that accumulating launches
stay correct) and keeps the fastest for the process. Each choice is printed to stderr
and, when ``MARGIN_OPS_TRITON_AUTOTUNE_FILE`` names a file, appended to it as one JSON
line {"key": [...], "launch": {...}, "ms": ..., "tried": [[launch, ms], ...]}; a GPU
session copies the winners into :data:`TABLE`. Choices can differ between sessions (timing
noise decides) and tile sizes set the GEMMs' summation order, so with the autotune on,
results are bitwise reproducible only within one process: it is for filling the table,
not for production.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, NamedTuple

import torch
import triton


class Launch(NamedTuple):
    """A kernel's tile and launch: ``tile`` its three BLOCK_* sizes in the order of
    :data:`AXES` (powers of two ≥ 16, as tl.dot needs), ``num_warps`` and ``num_stages``."""

    tile: tuple
    num_warps: int
    num_stages: int

    def constexprs(self, kernel: str, extents: tuple) -> dict:
        """The kernel's BLOCK_* constexprs, num_warps and num_stages, each block shrunk to
        its axis' extent in ``extents`` (same order as :data:`AXES`) where that is smaller."""
        sizes = {name: _pow2(extent, block) for name, block, extent in zip(AXES[kernel], self.tile, extents)}
        return dict(sizes, num_warps=self.num_warps, num_stages=self.num_stages)


#: Each kernel's tile axes: output rows, output columns, reduction step.
AXES = {
    "forward": ("BLOCK_M", "BLOCK_C", "BLOCK_K"),       # rows x classes, over D
    "grad_tile": ("BLOCK_M", "BLOCK_C", "BLOCK_K"),     # rows x classes, over D
    "grad_weight": ("BLOCK_C", "BLOCK_D", "BLOCK_M"),   # (class, sub-center) columns x D, over N
    "grad_x": ("BLOCK_M", "BLOCK_D", "BLOCK_C"),        # rows x D, over (class, sub-center) columns
}

#: Launches a GPU session measured to beat :func:`default`, by key (see :func:`key`).
#: Empty: no GPU has run these kernels yet.
TABLE: dict[tuple, Launch] = {}


def _pow2(extent: int, high: int) -> int:
    return max(16, min(high, triton.next_power_of_2(max(extent, 1))))


def _bucket(value: int, bounds: tuple, names: tuple) -> str:
    return next((name for bound, name in zip(bounds, names) if value <= bound), names[-1])


def key(kernel: str, dtype: torch.dtype, n: int, dim: int, hopper: bool, subcenters: int) -> tuple:
    """The table key: (kernel, dtype, N bucket, D bucket, "sm90" / "sm80", sub-centers > 1)."""
    return (kernel, str(dtype).removeprefix("torch."), _bucket(n, (64, 256), ("n64", "n256", "nbig")),
            _bucket(dim, (128, 512), ("d128", "d512", "dbig")), "sm90" if hopper else "sm80", subcenters > 1)


def default(kernel: str, dtype: torch.dtype, hopper: bool, subcenters: int) -> Launch:
    """The rule of the module docstring."""
    if dtype == torch.float64:
        tile = {"forward": (32, 64, 32), "grad_tile": (32, 64, 32), "grad_weight": (64, 64, 32),
                "grad_x": (64, 64, 32)}[kernel]
        launch = Launch(tile, 8, 2)
    else:
        step = 64 if dtype.itemsize == 2 else 32
        # Off Hopper the cosine kernels' epilogue and mma.sync fragments take 255 registers at
        # 64 x 128 (margin "combined" spills on sm_80): 64 classes.
        classes = 128 if hopper else 64
        tile = {"forward": (64, classes, step), "grad_tile": (64, classes, step), "grad_weight": (128, 128, step),
                "grad_x": (64, 128, step)}[kernel]
        stages = (3 if kernel == "grad_tile" else 4) if hopper else (3 if dtype.itemsize == 2 else 2)
        launch = Launch(tile, 8, stages)
    if subcenters > 1 and kernel in ("forward", "grad_tile"):
        rows, classes, step = launch.tile
        launch = launch._replace(tile=(rows, classes // 2, step))
    return launch


def is_hopper(device: torch.device) -> bool:
    """sm_90 (Hopper): wgmma and deeper pipelines. False for CPU tensors (interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def lookup(kernel: str, dtype: torch.dtype, n: int, dim: int, device: torch.device, subcenters: int) -> Launch:
    """The launch for this problem: :data:`TABLE`'s entry, else :func:`default`."""
    hopper = is_hopper(device)
    return TABLE.get(key(kernel, dtype, n, dim, hopper, subcenters)) or default(kernel, dtype, hopper, subcenters)


def candidates(kernel: str, dtype: torch.dtype, hopper: bool, subcenters: int) -> list[Launch]:
    """The autotune's small candidate set: the default, its tile halved / doubled in rows and
    classes, and its neighbours in stages and warps (those that compile; a candidate that
    fails to build or launch is skipped)."""
    base = default(kernel, dtype, hopper, subcenters)
    a, b, k = base.tile
    tiles = [base.tile, (a * 2, b, k), (a, b * 2, k), (max(16, a // 2), b, k), (a, max(16, b // 2), k), (a, b, k * 2)]
    found = []
    for tile in tiles:
        for warps, stages in ((base.num_warps, base.num_stages), (base.num_warps, base.num_stages - 1),
                              (base.num_warps, base.num_stages + 1), (4, base.num_stages)):
            launch = Launch(tile, warps, max(1, stages))
            if launch not in found:
                found.append(launch)
    return found


_TUNED: dict[tuple, Launch] = {}


def autotune_enabled(device: torch.device) -> bool:
    from .problem import INTERPRETED
    return os.environ.get("MARGIN_OPS_TRITON_AUTOTUNE") == "1" and device.type == "cuda" and not INTERPRETED


def choose(kernel: str, dtype: torch.dtype, n: int, dim: int, device: torch.device, subcenters: int,
           run: Callable[[Launch], None], outputs: tuple = ()) -> Launch:
    """The launch to use: :func:`lookup`'s, or with the autotune on, the fastest candidate
    for the key (timed once per process, by calling ``run(launch)``; the tensors in
    ``outputs``, which ``run`` writes or accumulates into, are restored after each try)."""
    if not autotune_enabled(device):
        return lookup(kernel, dtype, n, dim, device, subcenters)
    hopper = is_hopper(device)
    k = key(kernel, dtype, n, dim, hopper, subcenters)
    if k in _TUNED:
        return _TUNED[k]
    from triton.testing import do_bench
    saved = [t.clone() for t in outputs]
    tried = []
    for launch in candidates(kernel, dtype, hopper, subcenters):
        try:
            ms = do_bench(lambda: run(launch), warmup=5, rep=20)
        except Exception:  # noqa: BLE001  (out of resources and the like: not a candidate here)
            ms = float("inf")
        finally:
            for t, s in zip(outputs, saved):
                t.copy_(s)
        tried.append((launch, ms))
    best, best_ms = min(tried, key=lambda t: t[1])
    _TUNED[k] = best
    record = {"key": list(k), "launch": best._asdict(), "ms": best_ms,
              "tried": [[launch._asdict(), ms] for launch, ms in tried]}
    line = json.dumps(record)
    print(f"margin_ops.triton autotune: {line}", file=sys.stderr)
    path = os.environ.get("MARGIN_OPS_TRITON_AUTOTUNE_FILE")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    return best
