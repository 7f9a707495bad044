"""Peak extra memory of one contender's forward + backward on the CPU, in a fresh process.

``run.py`` starts this script once per CPU measurement; it prints one JSON line::

    python benchmarks/cpu_memory.py '{"contender": "cpu", "margin": "arcface", "n": 256,
        "d": 512, "c": 100000, "dtype": "float32", "seed": 0}'
    {"extra_bytes": ..., "rss_before": ..., "rss_peak": ..., "gradient_bytes": ...}

Method. The CPU allocator keeps no statistics, so this reads the kernel's counters of this
process's resident memory (Linux /proc/self/status). It builds the inputs, runs one warm-up
step (lazy initialization, code pages, torch.compile's compilation), frees its results and
hands the freed heap back to the OS (glibc ``malloc_trim``), records VmRSS, resets the
high-water mark VmHWM (writing 5 to /proc/self/clear_refs), runs one step and reads VmHWM:

    extra = VmHWM − VmRSS before the step − bytes of the returned gradients dx, dW

so inputs and gradients are excluded and everything else the step touched counts, tensors
and non-tensor scratch (BLAS buffers, thread stacks) alike, at page granularity. A fresh
process keeps other contenders' freed memory out of the measurement.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys

from contenders import MARGINS, Shape, all_contenders, make_inputs


def status_kib(field: str) -> int:
    """A ``VmXXX`` field of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def reset_peak_rss() -> None:
    """Sets VmHWM to the current VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def release_freed_heap() -> None:
    """Collects garbage and returns the freed heap pages of every malloc arena to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(spec: dict) -> dict:
    """Runs the contender of ``spec`` twice and measures the second run (see module docstring)."""
    shape = Shape("custom", spec["n"], spec["d"], spec["c"])
    inputs = make_inputs(shape, spec["dtype"], "cpu", spec["seed"])
    step = all_contenders()[spec["contender"]].build(MARGINS[spec["margin"]])
    step(*inputs)
    release_freed_heap()
    rss_before = status_kib("VmRSS") * 1024
    reset_peak_rss()
    result = step(*inputs)
    rss_peak = status_kib("VmHWM") * 1024
    gradient_bytes = result.dx.nbytes + result.dw.nbytes
    return {"extra_bytes": max(rss_peak - rss_before - gradient_bytes, 0), "rss_before": rss_before,
            "rss_peak": rss_peak, "gradient_bytes": gradient_bytes}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
