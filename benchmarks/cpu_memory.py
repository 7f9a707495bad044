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

PartialFC's sampled rows, read in place or copied (issue 15), the same way at world size 1
(gloo), one fresh process per (path, sample rate), printed as a markdown table::

    python benchmarks/cpu_memory.py --partial-fc            # C = 2M, D = 512, N = 256, rates 0.1 0.3
    python benchmarks/cpu_memory.py --partial-fc --c 100000 --sample-rates 0.2   # quick

* ``in_place``: ``PartialFC.forward``, whose primitive reads the sampled rows of ``weight``
  in place (``class_index``) and writes their gradients into the full-shape dW;
* ``copy``: the step before ``class_index``, re-stated: the same draw (``head.sample``),
  ``weight.index_select(0, index)`` — a K×D copy, whose K×D gradient autograd scatters into
  a zero dW — and :func:`margin_ops.distributed.margin_loss` on the copy.

Also printed: what the step holds from its forward to its backward (VmRSS after the
forward − VmRSS before), where a training step's backbone activations peak too.
Predicted savings (K = ceil(rate·C)): held after the forward, the copy, K·D·itemsize bytes;
at the step's peak, the copy and its gradient, 2·K·D·itemsize — but autograd frees the copy
once the primitive's backward has run, before ``index_select``'s backward allocates the
C×D dW, so at the high-water mark (dW's allocation) only the copy's gradient is still live:
K·D·itemsize when C ≫ K (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import socket
import subprocess
import sys
import time

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
    margin = MARGINS[spec["margin"]]
    inputs = make_inputs(shape, spec["dtype"], "cpu", spec["seed"], margin.subcenters)
    step = all_contenders()[spec["contender"]].build(margin)
    step(*inputs)
    release_freed_heap()
    rss_before = status_kib("VmRSS") * 1024
    reset_peak_rss()
    result = step(*inputs)
    rss_peak = status_kib("VmHWM") * 1024
    gradient_bytes = result.dx.nbytes + result.dw.nbytes
    return {"extra_bytes": max(rss_peak - rss_before - gradient_bytes, 0), "rss_before": rss_before,
            "rss_peak": rss_peak, "gradient_bytes": gradient_bytes}


def measure_partial_fc(spec: dict) -> dict:
    """One PartialFC training step of ``spec`` ({"partial_fc": "in_place" | "copy", "n", "d",
    "c", "sample_rate", "seed"}, float32 ArcFace) measured as :func:`measure` does, at world
    size 1; also returns the step's loss and wall time."""
    import torch
    import torch.distributed as dist

    from margin_ops import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.manual_seed(spec["seed"])
    head = distributed.PartialFC(spec["d"], spec["c"], sample_rate=spec["sample_rate"])
    x = torch.randn(spec["n"], spec["d"], requires_grad=True)
    labels = torch.randint(0, spec["c"], (spec["n"],))

    def step():
        """(loss, VmRSS in bytes after the forward)"""
        x.grad = head.weight.grad = None
        torch.manual_seed(spec["seed"])  # the same draw every step
        if spec["partial_fc"] == "in_place":
            loss = head(x, labels)
        else:  # world size 1: the rank's sample is the sub-problem, its positions are the labels
            index, sub_labels = head.sample(labels - head.class_start, labels != head.ignore_index)
            loss = distributed.margin_loss(x, head.weight.index_select(0, index), sub_labels, kind=head.kind,
                                           **head.margin_kwargs)
        rss_forward = status_kib("VmRSS") * 1024
        loss.backward()
        return loss.item(), rss_forward

    step()
    x.grad = head.weight.grad = None
    release_freed_heap()
    rss_before = status_kib("VmRSS") * 1024
    reset_peak_rss()
    start = time.perf_counter()
    loss, rss_forward = step()
    seconds = time.perf_counter() - start
    rss_peak = status_kib("VmHWM") * 1024
    gradient_bytes = x.grad.nbytes + head.weight.grad.nbytes
    dist.destroy_process_group()
    return {"extra_bytes": max(rss_peak - rss_before - gradient_bytes, 0), "held_bytes": rss_forward - rss_before,
            "rss_before": rss_before, "rss_peak": rss_peak, "gradient_bytes": gradient_bytes, "loss": loss,
            "seconds": seconds, "sampled": head.num_sample}


def partial_fc_table(argv: list[str]) -> None:
    """``--partial-fc``: both paths at each sample rate, each in a fresh process; a markdown table."""
    parser = argparse.ArgumentParser(prog="cpu_memory.py --partial-fc", description=measure_partial_fc.__doc__)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--c", type=int, default=2_000_000)
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mib = 2 ** 20
    print(f"PartialFC step (fwd+bwd), world size 1 (gloo), float32 ArcFace, N={args.n}, D={args.d}, C={args.c:,}; "
          f"W and dW are {args.c * args.d * 4 / mib:,.0f} MiB each")
    print("| sample rate | K | path | held after fwd MiB | extra MiB (peak) | peak RSS MiB | step s | loss "
          "| predicted saving MiB: held (K·D·4) / peak (2·K·D·4) | measured saving MiB: held / peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rate in args.sample_rates:
        runs = {}
        for path in ("copy", "in_place"):
            spec = {"partial_fc": path, "n": args.n, "d": args.d, "c": args.c, "sample_rate": rate, "seed": args.seed}
            child = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"{path} at sample rate {rate} failed:\n{child.stderr}")
            runs[path] = json.loads(child.stdout.splitlines()[-1])
        copy_mib = runs["copy"]["sampled"] * args.d * 4 / mib  # K = num_sample: N < K, so no extra positives
        held, peak = ((runs["copy"][key] - runs["in_place"][key]) / mib for key in ("held_bytes", "extra_bytes"))
        for path, r in runs.items():
            saving = f"{copy_mib:,.1f} / {2 * copy_mib:,.1f} | {held:,.1f} / {peak:,.1f}" if path == "in_place" else " | "
            print(f"| {rate} | {r['sampled']:,} | {path} | {r['held_bytes'] / mib:,.1f} | "
                  f"{r['extra_bytes'] / mib:,.1f} | {r['rss_peak'] / mib:,.0f} | {r['seconds']:.2f} | "
                  f"{r['loss']:.6f} | {saving} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--partial-fc"]:
        partial_fc_table(sys.argv[2:])
    else:
        spec = json.loads(sys.argv[1])
        print(json.dumps((measure_partial_fc if "partial_fc" in spec else measure)(spec)), flush=True)
