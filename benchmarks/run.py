"""Benchmark margin_ops against what users would pick instead, forward + backward.

Usage::

    python benchmarks/run.py                                   # the default shapes of the device
    python benchmarks/run.py --shapes 64x128x5000 --repeats 3  # a custom NxDxC, quickly
    python benchmarks/run.py --shapes ms1mv2 1m --dtypes bf16 fp32 --margins arcface sphereface
    python benchmarks/run.py --contenders cuda eager gemm3 --no-compile --out /tmp/bench
    python benchmarks/run.py --help

Contenders, side by side in one run on every (shape, dtype, margin):

* every margin_ops backend usable on the device (``margin_ops.available_backends()``:
  "cpu", "cuda", "triton"; the Triton interpreter on a CPU only when asked for by name),
  marked "(ours)" in every report (the JSON rows: "kind": "margin_ops");
* "eager": the plain-PyTorch reference (margin_ops.reference, N x C logits materialized);
* "compile": the same function under ``torch.compile`` (default mode; the backward is
  compiled by AOTAutograd; compilation excluded from the timing, dynamo reset per graph);
* "gemm3": the three bare matrix products (x @ W.T, then dx and dW, logits materialized,
  no softmax, no margin) — a reference point, not a loss;
* "torch-lce" and "torch-lce-chunked": torch's own
  ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13, CPU and GPU) on s·x̂ and ŵ,
  called as is (``options=None``: logits materialized) and on its memory-saving chunked
  path (``options=LinearCrossEntropyOptions()``, its "auto" chunking). They have no margin:
  they run on every margin as a lower bound (the margin-free loss of the same size), and
  are checked against the reference on the margin-free problem only — elsewhere their
  check reads "no margin: not comparable";
* "liger" (Liger-Kernel's fused linear cross-entropy), "cce" (Apple's Cut Cross-Entropy,
  its Triton kernels) and "quack" (quack's cross-entropy kernel on materialized logits)
  when installed, on a GPU, and "cce-compile" (Cut Cross-Entropy's own torch.compile
  formulation, ``impl="torch_compile"``) when installed, on a GPU or a CPU: all on the
  margin-free problem only (``--margins softmax``: cross-entropy of s·x̂·ŵ, which
  margin_ops computes as CosFace with m = 0). ``pip install liger-kernel
  cut-cross-entropy`` adds them (quack: ``pip install quack-kernels``, CUDA only).

Margins (``--margins``): arcface, cosface, combined, sphereface, adaface (per-row margins
from the feature norms, through ``adaptive``), subcenter-arcface (K = 3: the shape's C is
multiplied by 3, so its rows report C·3 weight rows and that much work), and softmax (the
margin-free problem).

A contender that cannot run here (not installed, CUDA only, too old a torch) is listed
under "Not run" with the reason.

Default shapes: with a GPU the named shapes of docs/design.md §2.4 in bfloat16; on a CPU
"cpu-100k" (256 x 512 x 100,000, the CPU acceptance shape) and "cpu-20k" in float32.

Measured per (shape, dtype, margin, contender): the median forward + backward time
after warm-up (CUDA events, with the L2 cache flushed before each run, on a GPU;
perf_counter on a CPU); useful TFLOP/s = 6·N·C·D / time and its fraction of a peak
measured once per run (the fastest of several runs of a large dense matmul in that dtype
on that device); the peak extra memory: memory beyond the inputs (x, W, labels) and the
returned gradients (dx, dW) — on a GPU torch.cuda.max_memory_allocated, on a CPU the
resident-set high-water mark of a fresh process (see benchmarks/cpu_memory.py); and the
speed-up of each margin_ops backend over each contender (contender time / backend time).
All contenders get the same fresh random inputs and compute the same loss (same margin,
s, m); each one's loss and gradients are checked once against the eager reference.

Outputs, in ``--out`` (default bench-out/): results.md (the table), results.json (every
number), results.png (two panels side by side, log scale: time and extra memory per
contender per shape). Progress is printed one line per measurement; long warm-ups
(torch.compile, JIT-compiled kernels, the fresh memory-measuring process that compiles
again) print what they are doing and how long it took to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import margin_ops
from contenders import (CPU_SHAPES, DTYPES, GPU_SHAPES, MARGIN_FREE, MARGINS, Contender, Margin, Shape, StepResult,
                        all_contenders, fwd_bwd, make_inputs, parse_dtype, parse_shape, reference_loss,
                        unavailable_reason)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 2 ** 20
#: Relative error allowed between a contender and the eager reference in the same dtype,
#: for the loss and for the gradients (‖a − b‖ / ‖b‖).
TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
#: Side of the square matmul that measures the peak, per device type.
PEAK_MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}
#: Bytes written between timed GPU runs so that no run finds W in the L2 cache.
L2_FLUSH_BYTES = 256 * MIB
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one fwd+bwd, minus the memory allocated "
            "before it (the inputs) and minus the returned gradients dx, dW",
    "cpu": "a fresh process per measurement (benchmarks/cpu_memory.py): after a warm-up "
           "step and malloc_trim, VmHWM (peak resident set, reset via /proc/self/clear_refs) "
           "during one fwd+bwd minus VmRSS before it, minus the returned gradients dx, dW; "
           "counts all memory touched (tensors, BLAS buffers), at page granularity",
}


def argument_type(parse):
    """An argparse ``type`` that reports ``parse``'s ValueError message."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = parse.__name__
    return convert


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; defaults depend on whether a GPU is present."""
    contenders = all_contenders()
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=argument_type(parse_shape), metavar="SHAPE",
                        help=f"named shapes ({', '.join([*GPU_SHAPES, *CPU_SHAPES])}) or NxDxC; "
                             f"default: the GPU shapes on cuda, the CPU shapes on cpu")
    parser.add_argument("--dtypes", nargs="+", type=argument_type(parse_dtype), metavar="DTYPE",
                        help="float32/fp32, bfloat16/bf16, float16/fp16, float64; "
                             "default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--margins", nargs="+", choices=tuple(MARGINS), metavar="MARGIN",
                        help=f"any of {', '.join(MARGINS)}; default: arcface, plus softmax when a "
                             f"margin-free-only peer (liger, cce, cce-compile, quack) is usable")
    parser.add_argument("--contenders", nargs="+", choices=tuple(contenders), metavar="NAME",
                        help=f"any of {', '.join(contenders)}; default: every one usable here "
                             f"(triton on a CPU only when named)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median); default 20 on cuda, 5 on cpu")
    parser.add_argument("--warmup", type=int, help="untimed runs after the first call; default 3 on cuda, 1 on cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-memory measurement")
    parser.add_argument("--fp32-precision", choices=("highest", "high", "medium"), default="highest",
                        help="torch.set_float32_matmul_precision for the run: float32 products of every "
                             "contender (and the fp32 peak) may use TF32 under high/medium; default highest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out", help="output folder (default: bench-out/)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    gpu = args.device == "cuda"
    args.shapes = args.shapes or list((GPU_SHAPES if gpu else CPU_SHAPES).values())
    args.dtypes = args.dtypes or (["bfloat16"] if gpu else ["float32"])
    if args.repeats is None:
        args.repeats = 20 if gpu else 5
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def select_contenders(args) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run, and {name: why not} for the ones left out."""
    requested = set(args.contenders or ())
    chosen, skipped = [], {}
    for contender in all_contenders().values():
        if requested and contender.name not in requested:
            continue
        if contender.name == "compile" and args.no_compile:
            skipped["compile"] = "--no-compile"
            continue
        reason = unavailable_reason(contender, args.device, contender.name in requested)
        if reason:
            skipped[contender.name] = reason
        else:
            chosen.append(contender)
    return chosen, skipped


def default_margins(contenders: list[Contender]) -> list[str]:
    """arcface, plus the margin-free problem when a peer that computes only that one is
    there to be compared on it (torch-lce* run on arcface too, so they add nothing)."""
    return ["arcface"] + ([MARGIN_FREE] if any(c.kind == "peer" and not c.applies_to(MARGINS["arcface"])
                                               for c in contenders) else [])


def git_commit() -> str:
    """Short commit of the repository, with "-dirty" when tracked files differ from it."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if git("diff", "--quiet", "HEAD", "--").returncode else "")


def device_name(device: str) -> str:
    """GPU name, or the CPU model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, device: str, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``: CUDA events with the L2 cache
    flushed before each call on a GPU, perf_counter on a CPU."""
    if device != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def measure_peak(dtype: str, device: str) -> dict:
    """Dense matmul throughput in ``dtype`` on ``device``, from the fastest of several
    runs of a large square matmul: {"tflops", "size"}."""
    size = PEAK_MATMUL_SIZE[device]
    a, b = (torch.randn(size, size, device=device).to(DTYPES[dtype]) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    seconds = min(time_runs(lambda: a @ b, device, 20 if device == "cuda" else 5))
    return {"tflops": 2 * size ** 3 / seconds / 1e12, "size": size}


def first_call(step, inputs, device: str) -> tuple[StepResult, float]:
    """The first run of a step (compilation, lazy initialization) and its seconds."""
    start = time.perf_counter()
    result = step(*inputs)
    synchronize(device)
    return result, time.perf_counter() - start


def median_time(step, inputs, device: str, warmup: int, repeats: int) -> float:
    """Median seconds of one fwd+bwd after ``warmup`` untimed runs."""
    for _ in range(warmup):
        step(*inputs)
    synchronize(device)
    return statistics.median(time_runs(lambda: step(*inputs), device, repeats))


def gpu_extra_memory(step, inputs) -> int:
    """Peak bytes allocated during one step beyond what was allocated before (inputs)
    and beyond the gradients it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step(*inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return max(peak - before - result.dx.nbytes - result.dw.nbytes, 0)


def cpu_extra_memory(contender: Contender, margin: Margin, shape: Shape, dtype: str, seed: int) -> int:
    """Peak extra resident memory of one step, measured by cpu_memory.py in a fresh process."""
    spec = {"contender": contender.name, "margin": margin.name, "n": shape.n, "d": shape.d,
            "c": shape.c, "dtype": dtype, "seed": seed}
    child = subprocess.run([sys.executable, str(HERE / "cpu_memory.py"), json.dumps(spec)],
                           capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"cpu_memory.py failed: {child.stderr.strip().splitlines()[-1:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])["extra_bytes"]


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """‖value − expected‖ / ‖expected‖, in float32 (float64 for float64 tensors)."""
    dtype = torch.promote_types(expected.dtype, torch.float32)
    value, expected = value.to(dtype), expected.to(dtype)
    return ((value - expected).norm() / expected.norm().clamp_min(1e-30)).item()


#: The check status of a margin-free contender (torch-lce*) on a margin loss.
NOT_COMPARABLE = "no margin: not comparable"


def check(result: StepResult, expected: StepResult, dtype: str, comparable: bool = True) -> dict:
    """Loss and gradient agreement of a contender with the eager reference; "n/a" for no
    loss (gemm3), NOT_COMPARABLE when the contender computes another loss (no margin)."""
    if result.loss is None:
        return {"status": "n/a"}
    if not comparable:
        return {"status": NOT_COMPARABLE, "loss": result.loss.item(), "reference_loss": expected.loss.item()}
    errors = {"loss": relative_error(result.loss, expected.loss), "dx": relative_error(result.dx, expected.dx),
              "dw": relative_error(result.dw, expected.dw)}
    ok = all(error <= TOLERANCE[dtype] for error in errors.values())
    return {"status": "ok" if ok else "MISMATCH", "loss": result.loss.item(),
            "reference_loss": expected.loss.item(), "relative_errors": errors}


def measure_contender(contender, margin, shape, dtype, inputs, expected, peak, args) -> dict:
    """Builds, checks, times and (unless --no-memory) measures the memory of one contender."""
    row = {"shape": shape.name, "dims": shape.dims, "n": shape.n, "d": shape.d, "c": shape.c,
           "dtype": dtype, "margin": margin.name, "contender": contender.name, "kind": contender.kind,
           "label": contender.label}
    where = f"{shape.name} {dtype} {margin.name}"
    with warmup_progress(contender, f"compiling {contender.name!r} on {where}"):
        step = contender.build(margin)
        result, row["first_call_s"] = first_call(step, inputs, args.device)
    row["check"] = check(result, expected, dtype,
                         comparable=not contender.margin_free or margin.name == MARGIN_FREE)
    del result
    seconds = median_time(step, inputs, args.device, args.warmup, args.repeats)
    row["time_ms"] = seconds * 1e3
    row["tflops"] = shape.useful_flops / seconds / 1e12
    row["peak_fraction"] = row["tflops"] / peak["tflops"]
    if not args.no_memory:
        try:
            if args.device == "cuda":
                extra = gpu_extra_memory(step, inputs)
            else:  # a fresh process: a compiling contender compiles again there
                with warmup_progress(contender, f"measuring the memory of {contender.name!r} on {where} "
                                                f"(fresh process, compiles again)"):
                    extra = cpu_extra_memory(contender, margin, shape, dtype, args.seed)
            row["extra_mib"] = extra / MIB
        except Exception as error:  # keep the timing when only the memory measurement fails
            row["memory_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
    return row


@contextlib.contextmanager
def warmup_progress(contender: Contender, what: str):
    """For a contender whose first call compiles, "<what>…" to stderr before the block and
    "done in N s" after it, so that a long warm-up is not a minute of silence."""
    if not contender.compiles:
        yield
        return
    print(f"{what}…", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(f" failed after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def status_text(status: str) -> str:
    """The check column of a row: "—" for no loss, bold for a mismatch."""
    return "—" if status == "n/a" else f"**{status}**" if status == "MISMATCH" else status


def progress(prefix: str, row: dict) -> None:
    """One flushed line for a finished measurement."""
    if "error" in row:
        print(f"{prefix} {row['label']:<17} FAILED: {row['error']}", flush=True)
        return
    memory = (f"  extra {row['extra_mib']:,.1f} MiB" if "extra_mib" in row
              else f"  memory measurement failed: {row['memory_error']}" if "memory_error" in row else "")
    status = row["check"]["status"]
    check_text = "" if status == "n/a" else f"  check {status}"
    if status == "MISMATCH":
        check_text += f" (loss {row['check']['loss']:.6g} vs reference {row['check']['reference_loss']:.6g}, " \
                      f"relative errors {fmt_errors(row['check']['relative_errors'])})"
    print(f"{prefix} {row['label']:<17} {row['time_ms']:10.3f} ms  {fmt_number(row['tflops']):>9} TFLOP/s  "
          f"{100 * row['peak_fraction']:5.1f}% of peak  first call {row['first_call_s']:.2f} s"
          f"{memory}{check_text}", flush=True)


def fmt_errors(errors: dict) -> str:
    return ", ".join(f"{name} {value:.1e}" for name, value in errors.items())


def add_speedups(rows: list[dict], backends: list[str]) -> None:
    """row["speedup"][b] = row time / time of margin_ops backend b in the same group."""
    times = {row["contender"]: row["time_ms"] for row in rows if "time_ms" in row}
    for row in rows:
        if "time_ms" in row:
            row["speedup"] = {b: row["time_ms"] / times[b] for b in backends if b in times}


def run_group(shape, dtype, margin, contenders, inputs, peak, args) -> list[dict]:
    """Every contender on one (shape, dtype, margin), with the eager reference as the check."""
    name = shape.name if shape.name == shape.dims else f"{shape.name} {shape.dims}"
    prefix = f"[{name} {dtype} {margin.name}]"
    expected = fwd_bwd(reference_loss(margin))(*inputs)
    rows = []
    for contender in contenders:
        if not contender.applies_to(margin):
            continue
        try:
            row = measure_contender(contender, margin, shape, dtype, inputs, expected, peak, args)
        except Exception as error:  # one failing contender must not end the run
            row = {"shape": shape.name, "dims": shape.dims, "dtype": dtype, "margin": margin.name,
                   "contender": contender.name, "kind": contender.kind, "label": contender.label,
                   "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        progress(prefix, row)
        rows.append(row)
    add_speedups(rows, [c.name for c in contenders if c.kind == "margin_ops"])
    return rows


def fmt_number(value: float, digits: int = 3) -> str:
    """``digits`` significant digits, without exponent notation."""
    if value == 0:
        return "0"
    decimals = max(digits - 1 - int(f"{abs(value):e}".split("e")[1]), 0)
    return f"{value:,.{decimals}f}"


def markdown_table(rows: list[dict], backends: list[str]) -> str:
    """The results as one markdown table (a row per measurement)."""
    head = ["shape", "N×D×C", "dtype", "margin", "contender", "fwd+bwd ms", "TFLOP/s", "% of peak",
            "extra MiB", *(f"{b} (ours) speed-up" for b in backends), "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["shape"], row["dims"], row["dtype"], row["margin"], row.get("label", row["contender"])]
        if "error" in row:
            cells += [f"failed: {row['error']}"] + [""] * (len(head) - len(cells) - 1)
        else:
            speedup = row.get("speedup", {})
            status = row["check"]["status"]
            cells += [fmt_number(row["time_ms"]), fmt_number(row["tflops"]),
                      f"{100 * row['peak_fraction']:.1f}",
                      f"{row['extra_mib']:,.1f}" if "extra_mib" in row
                      else "failed" if "memory_error" in row else "—",
                      *(f"{fmt_number(speedup[b])}×" if b in speedup else "—" for b in backends),
                      status_text(status)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(meta: dict, rows: list[dict]) -> str:
    """results.md: context, definitions, the table and any check warnings."""
    backends = meta["backends"]
    peaks = ", ".join(f"{dtype} {fmt_number(p['tflops'])} TFLOP/s ({p['size']}³ matmul)"
                      for dtype, p in meta["peaks"].items())
    margins = "; ".join(f"{name}: {MARGINS[name].description}" for name in meta["margins"])
    lines = [
        f"## margin_ops benchmark — {meta['device']}",
        "",
        f"{meta['date']} · {meta['device_name']} · torch {meta['torch']} · margin_ops {meta['margin_ops']} "
        f"· commit {meta['commit']} · `{meta['command']}`",
        "",
        f"- Time: median of {meta['repeats']} fwd+bwd runs after {meta['warmup']} untimed warm-up run(s) "
        f"({'CUDA events, L2 flushed before each run' if meta['device'] == 'cuda' else 'perf_counter'}); "
        "the first call (compilation included) is not timed.",
        f"- TFLOP/s: useful work 6·N·C·D / time. Peak (dense matmul, fastest of several runs, measured "
        f"in this run): {peaks}.",
        f"- float32 matmul precision: {meta['fp32_precision']} (torch.set_float32_matmul_precision; "
        f"TF32 allowed unless highest).",
        f"- Extra memory: memory the loss computation needs beyond its inputs (x, W, labels) and the "
        f"gradients it returns (dx, dW). Method: {meta['memory_method'] or 'not measured (--no-memory)'}.",
        "- Contenders: \"(ours)\" marks margin_ops' backends; the others are what users would pick "
        "instead.",
        "- Speed-up of a backend: contender time / backend time (> 1: the backend is faster).",
        f"- Margins: {margins}. gemm3 computes no loss (three bare matmuls, logits materialized).",
        f"- Check: loss, dx and dW against the eager reference in the same dtype (relative error ≤ "
        f"{', '.join(f'{d} {TOLERANCE[d]:g}' for d in meta['dtypes'])}); \"{NOT_COMPARABLE}\": "
        f"torch-lce and torch-lce-chunked compute the margin-free loss (s·x̂·ŵ, no margin), a lower "
        f"bound of a margin loss's cost, checked on the {MARGIN_FREE} rows only.",
    ]
    if meta["skipped"]:
        lines.append("- Not run: " + "; ".join(f"{name}: {why}" for name, why in meta["skipped"].items()) + ".")
    lines += ["", markdown_table(rows, backends)]
    warnings = [row for row in rows if row.get("check", {}).get("status") == "MISMATCH"]
    if warnings:
        lines += ["", "**Warnings — results that disagree with the reference:**", ""]
        lines += [f"- {row['shape']} {row['dtype']} {row['margin']} {row.get('label', row['contender'])}: loss "
                  f"{row['check']['loss']:.6g} vs reference {row['check']['reference_loss']:.6g}, relative "
                  f"errors {fmt_errors(row['check']['relative_errors'])}" for row in warnings]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """results.png: two panels side by side, log scale: fwd+bwd time and extra memory,
    grouped bars per contender for each (shape, dtype, margin), margin_ops' backends
    labelled "(ours)", each bar with its value (up to 40 bars a panel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [row for row in rows if "time_ms" in row]
    groups = list(dict.fromkeys((r["shape"], r["dtype"], r["margin"]) for r in timed))
    names = list(dict.fromkeys(r["contender"] for r in timed))
    labels = {r["contender"]: r.get("label", r["contender"]) for r in timed}
    colors = {name: f"C{k % 10}" for k, name in enumerate(names)}
    width = 0.8 / max(len(names), 1)
    #: Memory bars are drawn at least this high (MiB) on the log axis; the label says 0.
    floor_mib = 1 / 1024
    panels = (("time_ms", "forward + backward time (ms, log scale)", "ms"),
              ("extra_mib", "extra memory beyond inputs and gradients (MiB, log scale)", "MiB"))
    panel_width = min(max(5.5, 0.9 * len(groups) * max(len(names), 1) ** 0.8), 16.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_width, 5.6))
    for ax, (key, ylabel, unit) in zip(axes, panels):
        drawn = []
        for k, name in enumerate(names):
            points = [(g, r[key]) for g, group in enumerate(groups) for r in timed
                      if (r["shape"], r["dtype"], r["margin"]) == group and r["contender"] == name and key in r]
            if not points:
                continue
            drawn += [max(v, floor_mib) for _, v in points]
            bars = ax.bar([g + (k - (len(names) - 1) / 2) * width for g, _ in points],
                          [max(v, floor_mib) for _, v in points], width, color=colors[name], label=labels[name])
            if len(timed) <= 40:  # beyond, the values crowd out the bars: results.md has them
                ax.bar_label(bars, [f"{fmt_number(v)} {unit}" if v > 0 else "0" for _, v in points],
                             rotation=90, fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)), [f"{s}\n{d} {m}" for s, d, m in groups])
        ax.set_ylabel(ylabel)
        if drawn:
            ax.set_yscale("log")
            # bars rise from well below the smallest value; room above for the value labels
            ax.set_ylim(min(drawn) / 5, max(drawn) * 12)
        else:
            ax.text(0.5, 0.5, "not measured (--no-memory)" if key == "extra_mib" else "nothing timed",
                    transform=ax.transAxes, ha="center", va="center")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_title("time (lower is better)")
    axes[1].set_title("extra memory (lower is better)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[name]) for name in names]
    if names:
        fig.legend(handles, [labels[name] for name in names], loc="lower center", ncol=min(len(names), 8),
                   fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_float32_matmul_precision(args.fp32_precision)
    contenders, skipped = select_contenders(args)
    margin_names = args.margins or default_margins(contenders)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
            "margin_ops": margin_ops.__version__, "commit": git_commit(),
            "command": " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
            "repeats": args.repeats, "warmup": args.warmup, "dtypes": args.dtypes, "margins": margin_names,
            "fp32_precision": args.fp32_precision,
            "contenders": [c.name for c in contenders], "skipped": skipped,
            "backends": [c.name for c in contenders if c.kind == "margin_ops"],
            "memory_method": None if args.no_memory else MEMORY_METHOD[args.device]}
    print(f"margin_ops {meta['margin_ops']} benchmark on {args.device} ({meta['device_name']}), "
          f"torch {meta['torch']}, commit {meta['commit']}", flush=True)
    print(f"contenders: {', '.join(c.label for c in contenders)}", flush=True)
    for name, why in skipped.items():
        print(f"not run: {name}: {why}", flush=True)
    meta["peaks"] = {}
    for dtype in args.dtypes:
        meta["peaks"][dtype] = measure_peak(dtype, args.device)
        print(f"peak {dtype} matmul ({meta['peaks'][dtype]['size']}³): "
              f"{fmt_number(meta['peaks'][dtype]['tflops'])} TFLOP/s", flush=True)

    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for subcenters in sorted({MARGINS[name].subcenters for name in margin_names}):
                # K sub-centers: C·K weight rows, and C·K classes' worth of work
                problem = shape if subcenters == 1 else dataclasses.replace(shape, c=shape.c * subcenters)
                inputs = make_inputs(problem, dtype, args.device, args.seed, subcenters)
                for name in margin_names:
                    if MARGINS[name].subcenters == subcenters:
                        rows += run_group(problem, dtype, MARGINS[name], contenders, inputs,
                                          meta["peaks"][dtype], args)
                del inputs

    meta["elapsed_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown_report(meta, rows)
    (args.out / "results.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out / "results.png", f"margin_ops fwd+bwd — {meta['device_name']}")
    print("\n" + report, flush=True)
    print(f"wrote {args.out / 'results.md'}, results.json, results.png "
          f"({meta['elapsed_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
