#!/usr/bin/env python3
"""Kernel report of margin_ops' CUDA kernels, built offline from their SASS (issue 11).

Compiles every ``csrc/cuda/*.cu`` for one architecture (no GPU needed: nvcc + ptxas only),
with the flags of ``.ci/run``, caches the cubins and the ``ptxas -v`` log in a temporary
directory, disassembles them (``cuobjdump -sass``, from CUDA or from the triton wheel) and
prints:

1. per kernel (demangled, grouped by template instantiation: dtype, K > 1 sub-centers,
   hard examples): registers, spill stores / loads, stack, static shared memory (ptxas),
   dynamic shared memory (the launch's figure, from the tile configuration mirrored below),
   and SASS counts of HMMA / HGMMA / DMMA / MUFU / LDGSTS / LDSM;
2. a loop analysis of the GEMM kernels: the *mainloop* is the innermost loop (a backward
   branch ``BRA`` to a lower address; its body is [target, branch]; ptxas' loop exit
   ``CALL.REL.NOINC addr`` counts as a jump) that contains MMA
   instructions, the one with the most MMAs when several are innermost; its SASS
   instructions per MMA are counted along the *hot path* (below). The *epilogue* is the
   code after the mainloop up to the back edge of the enclosing loop (the forward's class-tile
   loop) or to EXIT (one tile per CTA), counted along the hot path, divided by the
   accumulator elements per thread (BM·BN / 256 threads = 64);
3. a PREDICTED time per named shape (benchmarks/contenders.py GPU_SHAPES), forward and
   backward, for the bf16 K = 1 instantiations, from the model printed after the tables.

Hot path: the loop body (or the epilogue region) is cut into basic blocks; back edges inside
it are dropped (an inner loop counts once) and edges leaving it are ignored; among the paths
from its entry to its end, the tool takes the one that executes the most MMAs, then the most
16-byte async copies (LDGSTS) and ldmatrix (LDSM), then the most MUFU.EX2 up to one per
accumulator element (the epilogue's exponentials), then the fewest instructions. This is the
path of an interior tile: vector copies, no scalar fallbacks, no zero fills, and no rare
branch (the target column, the NaN row). Its limits: a warp-divergent branch that some lane
always takes (the lane-0 merge of the row statistics) is left out although the warp issues
it, so the epilogue figure is a lower bound; "all paths" (every instruction of the region
once) is printed beside it as the upper bound. Predicated-off instructions still take an
issue slot and are counted; a call to a non-inlined function counts as one instruction (its
body is not followed). For K > 1 the mainloop sits in the sub-center pass loop, so the
"epilogue" is that loop's tail.

Everything this script prints about time is a PREDICTION of a simple throughput model,
never a measurement.

Usage:
    python tools/kernel_report.py                 # sm_90a, every table
    python tools/kernel_report.py --arch sm_80
    python tools/kernel_report.py --markdown      # the tables as Markdown (RESULTS.md)
    python tools/kernel_report.py --kernels-only  # no model
    python tools/kernel_report.py --gate          # CI's sm_90a check: HGMMA, no spills
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The flags of .ci/run (a GPU install's: setup.py's and torch's half/bfloat16 macros).
NVCC_FLAGS = [
    "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]

COUNTED = ("HMMA", "HGMMA", "DMMA", "MUFU", "LDGSTS", "LDSM")
MMA_OPS = ("HMMA", "HGMMA", "DMMA", "IMMA")

# ---------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------


def find_tool(name: str) -> str:
    """nvcc / cuobjdump from PATH or /usr/local/cuda, else the copy in the triton wheel."""
    path = shutil.which(name)
    if path:
        return path
    for base in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        cand = Path(base) / "bin" / name
        if base and cand.exists():
            return str(cand)
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            cand = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
            if cand.exists():
                return str(cand)
    except Exception:  # noqa: BLE001 - any failure: not found
        pass
    raise FileNotFoundError(f"{name} not found (PATH, CUDA_HOME, /usr/local/cuda, triton wheel)")


def arch_gencode(arch: str) -> str:
    num = arch.removeprefix("sm_")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def source_digest(sources: list[Path], arch: str, extra: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "csrc").rglob("*")):
        if p.suffix in (".cu", ".cuh", ".h") and p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    for s in sources:
        h.update(str(s).encode())
        h.update(s.read_bytes())
    h.update(" ".join(NVCC_FLAGS + extra + [arch]).encode())
    try:
        h.update(subprocess.run([find_tool("nvcc"), "--version"], capture_output=True,
                                text=True).stdout.encode())
    except FileNotFoundError:
        pass
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Compiled:
    source: Path
    cubin: Path
    ptxas_log: str
    sass: str


def compile_one(source: Path, arch: str, cache: Path, includes: list[Path] | None = None,
                extra: list[str] | None = None) -> Compiled:
    """nvcc -cubin -Xptxas -v of one .cu for `arch`, cached under `cache` (by content)."""
    includes = includes if includes is not None else [ROOT / "csrc"]
    extra = extra or []
    key = source_digest([source], arch, extra + [str(i) for i in includes])
    d = cache / f"{source.stem}-{arch}-{key}"
    cubin, log, sass = d / "out.cubin", d / "ptxas.log", d / "out.sass"
    if not (cubin.exists() and log.exists() and sass.exists()):
        d.mkdir(parents=True, exist_ok=True)
        cmd = [find_tool("nvcc"), *NVCC_FLAGS, *(f"-I{i}" for i in includes), *extra,
               arch_gencode(arch), "-Xptxas", "-v", "-cubin", str(source), "-o", str(cubin)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{r.stderr[-4000:]}")
        log.write_text(r.stdout + r.stderr)
        r = subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuobjdump failed on {cubin}:\n{r.stderr[-4000:]}")
        sass.write_text(r.stdout)
    return Compiled(source, cubin, log.read_text(), sass.read_text())


def default_cache() -> Path:
    return Path(os.environ.get("MARGIN_OPS_KERNEL_REPORT_CACHE",
                               Path(tempfile.gettempdir()) / "margin_ops_kernel_report"))


# ---------------------------------------------------------------------------------------
# Parsing: ptxas -v, cuobjdump -sass, demangled names
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Resources:
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # static shared memory (bytes)


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Entry function (mangled) -> its ptxas -v figures."""
    out: dict[str, Resources] = {}
    current: Resources | None = None
    props_for: str | None = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = out.setdefault(m.group(1), Resources())
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_for = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and props_for in out:
            r = out[props_for]
            r.stack, r.spill_stores, r.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return out


@dataclasses.dataclass
class Inst:
    addr: int
    text: str  # without the trailing ';'
    pred: str  # "@P0", "@!P1", "" ...
    opcode: str  # full opcode, e.g. HMMA.16816.F32.BF16
    base: str  # HMMA

    @property
    def branch_target(self) -> int | None:
        # CALL.REL.NOINC to an address is a jump (ptxas' loop-exit idiom: no return pushed)
        if self.base not in ("BRA", "JMP") and not self.opcode.startswith("CALL.REL.NOINC"):
            return None
        m = re.search(r"0x([0-9a-f]+)\s*$", self.text)
        return int(m.group(1), 16) if m else None

    @property
    def conditional(self) -> bool:
        # "@P0 BRA x" or "BRA P0, x" / "BRA !P0, x" (predicate operand) are conditional
        return bool(self.pred) and self.pred not in ("@PT",) or bool(
            re.search(r"\bBRA\s+!?U?P\d", self.text))


_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict[str, list[Inst]]:
    """cuobjdump -sass (or nvdisasm) text -> mangled function name -> its instructions."""
    funcs: dict[str, list[Inst]] = {}
    cur: list[Inst] | None = None
    for line in text.splitlines():
        m = re.search(r"Function\s*:\s*(\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        m = _INST.search(line)
        if not m:
            continue
        body = m.group(2)
        pred = ""
        pm = re.match(r"(@!?U?P[T0-9]+)\s+", body)
        if pm:
            pred = pm.group(1)
            body = body[pm.end():]
        opcode = body.split()[0] if body.split() else ""
        cur.append(Inst(int(m.group(1), 16), m.group(2), pred, opcode, opcode.split(".")[0]))
    return funcs


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    outs = r.stdout.splitlines()
    return dict(zip(names, outs)) if len(outs) == len(names) else {n: n for n in names}


DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64",
          "margin_ops::cuda::dev::Tf32": "tf32"}


@dataclasses.dataclass
class KernelId:
    name: str  # fwd_main, bwd_tile, ...
    dtype: str  # bf16 ...
    sub: bool = False  # K > 1 sub-centers
    hard: bool = False  # hard examples
    policy: str = ""  # the epilogue policy of a kernel family that takes one (bwd_gemm_sm90)

    @property
    def label(self) -> str:
        opts = [o for o, on in (("K>1", self.sub), ("hard", self.hard)) if on] + \
            ([self.policy] if self.policy else [])
        return f"{self.name}<{self.dtype}{''.join(', ' + o for o in opts)}>"


#: The bool template parameters after the element type, in order, of each kernel family
#: (the others: <T, kSub, kHard>).
FLAG_PARAMS = {"fwd_main_sm90": ("hard",), "bwd_tile_sm90": ("hard",), "bwd_gemm_sm90": ()}
#: Kernel families whose second template parameter is an epilogue policy (a type).
POLICY_FAMILIES = ("bwd_gemm_sm90",)


def kernel_id(demangled: str) -> KernelId:
    """'void ns::fwd_main_kernel<__nv_bfloat16, true, false>(...)' -> fwd_main bf16 K>1."""
    m = re.search(r"(\w+?)(?:_kernel)?<(.*?)>\(", demangled)
    if not m:  # not a template: the name before its parameter list
        plain = re.search(r"(\w+)\(", demangled)
        return KernelId(plain.group(1) if plain else demangled, "-")
    name = m.group(1)
    args = [a.strip() for a in m.group(2).split(",")]
    dtype = DTYPES.get(args[0], args[0]) if args else "?"
    params = FLAG_PARAMS.get(name, ("sub", "hard"))
    flags = {p: a == "true" for p, a in zip(params, args[1:1 + len(params)])}
    policy = re.sub(r".*::", "", re.sub(r"<.*", "", args[1])) \
        if name in POLICY_FAMILIES and len(args) > 1 else ""
    return KernelId(name, dtype, flags.get("sub", False), flags.get("hard", False), policy)


# ---------------------------------------------------------------------------------------
# Control flow: loops, basic blocks, hot paths
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction of the body (the branch target)
    end: int  # index of the backward branch

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def find_loops(insts: list[Inst]) -> list[Loop]:
    index = {i.addr: k for k, i in enumerate(insts)}
    loops = []
    for k, i in enumerate(insts):
        t = i.branch_target
        if t is not None and t <= i.addr and t in index:
            loops.append(Loop(index[t], k))
    return loops


def count_ops(insts: list[Inst], lo: int = 0, hi: int | None = None) -> dict[str, int]:
    hi = len(insts) - 1 if hi is None else hi
    c = {k: 0 for k in COUNTED}
    for i in insts[lo:hi + 1]:
        if i.base in c:
            c[i.base] += 1
    c["MMA"] = sum(1 for i in insts[lo:hi + 1] if i.base in MMA_OPS)
    c["EX2"] = sum(1 for i in insts[lo:hi + 1] if i.opcode.startswith("MUFU.EX2"))
    return c


def find_mainloop(insts: list[Inst], loops: list[Loop] | None = None) -> Loop | None:
    """The innermost loop containing MMAs (no loop with MMAs inside it); the most MMAs wins."""
    loops = find_loops(insts) if loops is None else loops
    mma = [lp for lp in loops if count_ops(insts, lp.start, lp.end)["MMA"] > 0]
    inner = [lp for lp in mma if not any(lp.contains(o) for o in mma)]
    if not inner:
        return None
    return max(inner, key=lambda lp: (count_ops(insts, lp.start, lp.end)["MMA"], -lp.size))


def enclosing_loop(loops: list[Loop], inner: Loop) -> Loop | None:
    outer = [lp for lp in loops if lp.contains(inner)]
    return min(outer, key=lambda lp: lp.size) if outer else None


@dataclasses.dataclass
class HotPath:
    insts: int
    mma: int
    copies: int  # LDGSTS + LDSM
    ex2: int

    def key(self, ex2_cap: int | None = None):
        ex2 = self.ex2 if ex2_cap is None else min(self.ex2, ex2_cap)
        return (self.mma, self.copies, ex2, -self.insts)


def hot_path(insts: list[Inst], lo: int, hi: int, *, ends_at_exit: bool = False,
             worst: bool = False, ex2_cap: int | None = None) -> HotPath | None:
    """The hot path through insts[lo..hi] (see the module docstring); `worst`: the path
    with the most instructions instead (an upper bound). Ends at hi, or at an unpredicated
    EXIT / the last instruction when `ends_at_exit`. `ex2_cap`: MUFU.EX2 beyond this many
    do not make a path hotter (an epilogue: one exponential per accumulator element; the
    rare target-column branch adds more, and must not win for that)."""
    index = {i.addr: k for k, i in enumerate(insts)}
    # block leaders
    leaders = {lo}
    for k in range(lo, hi + 1):
        i = insts[k]
        t = i.branch_target
        if t is not None and t in index and lo <= index[t] <= hi:
            leaders.add(index[t])
        if (t is not None or i.base in ("EXIT", "RET", "BRX", "JMX")) and k + 1 <= hi:
            leaders.add(k + 1)
    starts = sorted(leaders)
    bounds = [(s, (starts[j + 1] - 1) if j + 1 < len(starts) else hi) for j, s in enumerate(starts)]
    block_of = {s: j for j, (s, _) in enumerate(bounds)}

    def weight(s: int, e: int) -> HotPath:
        c = count_ops(insts, s, e)
        return HotPath(e - s + 1, c["MMA"], c["LDGSTS"] + c["LDSM"], c["EX2"])

    def better(a: HotPath | None, b: HotPath) -> bool:
        if a is None:
            return True
        ka, kb = a.key(ex2_cap), b.key(ex2_cap)
        if worst:
            ka, kb = (a.insts, a.mma), (b.insts, b.mma)
        return kb > ka

    # best[j]: per state, the best path from lo to the end of block j. The state is the
    # path's MUFU.EX2 count capped at ex2_cap (with a cap, a prefix with fewer exponentials
    # may still end best, so one path per block would not be exact), else a single state.
    def state(p: HotPath) -> int:
        return 0 if worst or ex2_cap is None else min(p.ex2, ex2_cap)

    best: list[dict[int, HotPath]] = [dict() for _ in bounds]
    w0 = weight(*bounds[0])
    best[0][state(w0)] = w0
    result: HotPath | None = None
    for j, (s, e) in enumerate(bounds):
        if not best[j]:
            continue
        last = insts[e]
        succ: list[int] = []
        t = last.branch_target
        terminal = False
        if t is not None:
            if t in index and lo <= index[t] <= hi and index[t] > e:
                succ.append(index[t])
            if last.conditional and e + 1 <= hi:
                succ.append(e + 1)
        elif last.base in ("EXIT", "RET") and not last.conditional:
            terminal = True
        elif last.base in ("BRX", "JMX"):
            terminal = True
        elif e + 1 <= hi:
            succ.append(e + 1)
        for cur in best[j].values():
            if e == hi or (ends_at_exit and terminal):
                if better(result, cur):
                    result = cur
            for k in succ:
                b = block_of[k]
                w = weight(*bounds[b])
                cand = HotPath(cur.insts + w.insts, cur.mma + w.mma, cur.copies + w.copies,
                               cur.ex2 + w.ex2)
                st = state(cand)
                if better(best[b].get(st), cand):
                    best[b][st] = cand
    return result


# ---------------------------------------------------------------------------------------
# Per-kernel analysis
# ---------------------------------------------------------------------------------------

#: The tile configuration of the tensor-core kernels (csrc/cuda/margin_lse_tile_gemm.cuh,
#: Cfg<T, true>): 128 x 128 CTA tiles, BK = 32 16-bit elements, 256 threads (8 warps), each
#: thread holding TR x TC = 64 accumulators; 3 cp.async stages. Update with the kernels.
BM = BN = 128
THREADS = 256
WARPS = THREADS // 32
ACC_PER_THREAD = BM * BN // THREADS
STAGES = 3


def dynamic_smem(kid: KernelId, subcenters: int = 2) -> int | None:
    """The launch's dynamic shared memory (TileGemm<T, ATrans, BTrans>::kSmemBytes mirrored;
    K > 1 adds K x BN x 4 bytes, printed for K = `subcenters`); None for the sm_90a kernels,
    whose figure depends on D (Sm90Cfg::smem_bytes: 194 KiB at D = 512) or is fixed
    (Sm90GemmCfg::kSmemBytes: 129 KiB)."""
    if kid.name.endswith("_sm90"):
        return None
    if kid.dtype in ("bf16", "fp16"):
        size, bk, pad, pad_t, bm, bn = 2, 32, 8, 8, 128, 128
    elif kid.dtype == "tf32":
        size, bk, pad, pad_t, bm, bn = 4, 16, 4, 8, 128, 128
    elif kid.dtype == "fp32":
        size, bk, pad, pad_t, bm, bn = 4, 16, 4, 4, 128, 128
    elif kid.dtype == "fp64":
        size, bk, pad, pad_t, bm, bn = 8, 16, 2, 2, 64, 64
    else:
        return None
    trans = {"fwd_main": (False, False), "bwd_tile": (False, False), "bwd_dw": (True, True),
             "bwd_dx": (False, True)}.get(kid.name)
    if trans is None:
        return 0
    a = bk * (bm + pad_t) if trans[0] else bm * (bk + pad)
    b = bk * (bn + pad_t) if trans[1] else bn * (bk + pad)
    smem = STAGES * (a + b) * size
    if kid.sub:
        smem += subcenters * bn * (8 if kid.dtype == "fp64" else 4)
    return smem


@dataclasses.dataclass
class KernelReport:
    mangled: str
    demangled: str
    kid: KernelId
    source: str
    res: Resources
    counts: dict[str, int]
    n_insts: int
    main: HotPath | None = None  # mainloop hot path (one iteration)
    main_static: int = 0  # every instruction of the mainloop body
    epi: HotPath | None = None  # epilogue hot path (per tile)
    epi_static: int = 0
    tile: HotPath | None = None  # the tile's whole hot path (prologue + mainloop once + epilogue)
    func: HotPath | None = None  # the whole function's hot path (mainloop once)
    outer_kind: str = ""  # "loop" (class-tile loop) or "exit"

    @property
    def main_per_mma(self) -> float | None:
        return self.main.insts / self.main.mma if self.main and self.main.mma else None

    @property
    def epi_per_elem(self) -> float | None:
        return self.epi.insts / ACC_PER_THREAD if self.epi else None

    @property
    def epi_static_per_elem(self) -> float | None:
        return self.epi_static / ACC_PER_THREAD if self.epi else None


def analyze_function(insts: list[Inst]) -> dict:
    """Mainloop / epilogue figures of one function's instructions."""
    out: dict = {"main": None, "main_static": 0, "epi": None, "epi_static": 0, "tile": None,
                 "func": None, "outer_kind": ""}
    if not insts:
        return out
    loops = find_loops(insts)
    out["func"] = hot_path(insts, 0, len(insts) - 1, ends_at_exit=True, ex2_cap=ACC_PER_THREAD)
    ml = find_mainloop(insts, loops)
    if ml is None:
        return out
    out["main"] = hot_path(insts, ml.start, ml.end)
    out["main_static"] = ml.size
    outer = enclosing_loop(loops, ml)
    if outer is not None:
        out["outer_kind"] = "loop"
        out["epi"] = hot_path(insts, ml.end + 1, outer.end, ex2_cap=ACC_PER_THREAD)
        out["epi_static"] = outer.end - ml.end
        out["tile"] = hot_path(insts, outer.start, outer.end, ex2_cap=ACC_PER_THREAD)
    else:
        out["outer_kind"] = "exit"
        out["epi"] = hot_path(insts, ml.end + 1, len(insts) - 1, ends_at_exit=True,
                              ex2_cap=ACC_PER_THREAD)
        last_exit = max((k for k, i in enumerate(insts) if i.base == "EXIT"), default=len(insts) - 1)
        out["epi_static"] = last_exit - ml.end
        out["tile"] = out["func"]
    return out


def report_kernels(compiled: list[Compiled]) -> list[KernelReport]:
    reports: list[KernelReport] = []
    for c in compiled:
        res = parse_ptxas(c.ptxas_log)
        funcs = parse_sass(c.sass)
        dm = demangle(list(funcs))
        for name, insts in funcs.items():
            kid = kernel_id(dm[name])
            a = analyze_function(insts)
            reports.append(KernelReport(name, dm[name], kid, c.source.name,
                                        res.get(name, Resources()), count_ops(insts),
                                        len(insts), **a))
    order = {"prep": 0, "fwd_main": 1, "combine": 2, "bwd_tile": 3, "bwd_corr": 4, "bwd_dw": 5,
             "bwd_dx": 6, "bwd_finalize": 7}
    dorder = {"bf16": 0, "fp16": 1, "tf32": 2, "fp32": 3, "fp64": 4}
    reports.sort(key=lambda r: (dorder.get(r.kid.dtype, 9), order.get(r.kid.name, 99), r.kid.sub,
                                r.kid.hard, r.source))
    return reports


# ---------------------------------------------------------------------------------------
# The sm_90a gate (CI: tests/test_kernel_report.py)
# ---------------------------------------------------------------------------------------

#: Kernel families of the sm_90a build that must issue warpgroup MMA (HGMMA) without
#: spilling, in every 16-bit instantiation.
HGMMA_KERNELS = ("fwd_main_sm90", "bwd_tile_sm90", "bwd_gemm_sm90")


def gate(reports: list[KernelReport], families: tuple[str, ...] | None = None) -> list[str]:
    """The violations of the sm_90a gate among `reports` (empty: it passes): a family of
    `families` (default HGMMA_KERNELS) without a bf16 and an fp16 instantiation, or an
    instantiation that issues no HGMMA or spills registers."""
    problems = []
    for family in HGMMA_KERNELS if families is None else families:
        found = [r for r in reports if r.kid.name == family and r.kid.dtype in ("bf16", "fp16")]
        for dtype in ("bf16", "fp16"):
            if not any(r.kid.dtype == dtype for r in found):
                problems.append(f"{family}<{dtype}>: not in the build")
        for r in found:
            if r.counts.get("HGMMA", 0) == 0:
                problems.append(f"{r.kid.label} ({r.source}): no HGMMA")
            if r.res.spill_stores or r.res.spill_loads:
                problems.append(f"{r.kid.label} ({r.source}): spills "
                                f"{r.res.spill_stores}/{r.res.spill_loads} bytes (stores/loads)")
    return problems


# ---------------------------------------------------------------------------------------
# The time model (PREDICTIONS)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Machine:
    name: str = "H100 SXM (model)"
    sms: int = 132
    clock_ghz: float = 1.83  # the clock NVIDIA's 989 TF dense bf16 figure implies
    wgmma_flop_per_clk_sm: float = 4096.0  # dense bf16/fp16, 4 tensor cores x 512 FMA
    mma_sync_fraction: float = 0.625  # ASSUMPTION: mma.sync reaches ~60-65% of wgmma's rate
    issue_per_clk_sm: float = 4.0  # 4 schedulers x 1 warp instruction per clock
    l2_tbps: float = 5.5  # ASSUMPTION: sustained L2 read bandwidth, TB/s
    hbm_tbps: float = 3.0  # measured copy bandwidth (docs/design.md §2), TB/s
    l2_mib: float = 50.0
    launch_us: float = 3.0  # per launch boundary (ramp-up, tail, launch gap)

    def describe(self) -> list[str]:
        rate = self.wgmma_flop_per_clk_sm * self.mma_sync_fraction
        return [
            f"machine: {self.name}: {self.sms} SMs at {self.clock_ghz} GHz (the clock of NVIDIA's "
            f"989 TF dense bf16 figure: {self.wgmma_flop_per_clk_sm:.0f} FLOP/clk/SM x {self.sms} SMs)",
            f"tensor: mma.sync (HMMA) at {self.mma_sync_fraction:.3f} of the wgmma rate = "
            f"{rate:.0f} FLOP/clk/SM ({rate * self.sms * self.clock_ghz / 1e3:.0f} TF) - an "
            "ASSUMPTION (published microbenchmarks put mma.sync at ~60-65% of wgmma on H100); "
            "HGMMA at the full rate",
            f"issue: {self.issue_per_clk_sm:.0f} warp instructions per clock per SM (4 schedulers x 1);"
            " every SASS instruction (MMA, predicated-off, barrier) takes one slot; no stalls "
            "modelled (latency, dependencies, barriers, occupancy): an optimistic bound",
            f"memory: L2 {self.l2_tbps} TB/s (ASSUMPTION), HBM {self.hbm_tbps} TB/s (measured copy, "
            f"design.md), L2 {self.l2_mib:.0f} MiB",
            f"launches: {self.launch_us} us per launch boundary (design.md's figure), added to each",
            "per launch: time = max(issue, tensor, L2, HBM) + launch; issue and tensor per SM from "
            "the busiest SM's CTAs (ceil(grid / SMs) CTAs: waves), i.e. the MMA and the other "
            "instructions overlap perfectly, but nothing hides an idle SM; 'no overlap': "
            "max(issue, tensor) + max(L2, HBM) + launch instead (memory streaming never hidden "
            "behind issue): the two bracket the prediction",
        ]


@dataclasses.dataclass
class LaunchModel:
    name: str
    count: int  # launches of this kind
    grid: int  # CTAs per launch
    insts_per_warp: float  # issue slots per warp per CTA
    mma_flop_per_cta: float
    l2_bytes: float  # per launch
    hbm_bytes: float  # per launch
    hgmma: bool = False

    def time(self, m: Machine) -> tuple[float, str]:
        per_sm = math.ceil(self.grid / m.sms)
        issue = per_sm * WARPS * self.insts_per_warp / m.issue_per_clk_sm / (m.clock_ghz * 1e9)
        rate = m.wgmma_flop_per_clk_sm * (1.0 if self.hgmma else m.mma_sync_fraction)
        tensor = per_sm * self.mma_flop_per_cta / rate / (m.clock_ghz * 1e9)
        l2 = self.l2_bytes / (m.l2_tbps * 1e12)
        hbm = self.hbm_bytes / (m.hbm_tbps * 1e12)
        terms = {"issue": issue, "tensor": tensor, "L2": l2, "HBM": hbm}
        bound = max(terms, key=terms.get)
        self.terms = {k: self.count * v for k, v in terms.items()}
        # the pessimistic variant: memory streaming does not overlap instruction issue
        self.no_overlap = self.count * (max(issue, tensor) + max(l2, hbm) + m.launch_us * 1e-6)
        return self.count * (terms[bound] + m.launch_us * 1e-6), bound


def parse_gpu_shapes(path: Path = ROOT / "benchmarks" / "contenders.py") -> dict[str, tuple]:
    """GPU_SHAPES of benchmarks/contenders.py, read with ast (no torch import)."""
    tree = ast.parse(path.read_text())
    shapes: dict[str, tuple] = {}
    for node in ast.walk(tree):
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if not any(isinstance(t, ast.Name) and t.id == "GPU_SHAPES" for t in targets if t):
            continue
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Shape":
                name, n, d, c = (ast.literal_eval(a) for a in call.args[:4])
                shapes[name] = (n, d, c)
    return shapes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def _per_warp(r: KernelReport, k_extent: int) -> tuple[float, float, int]:
    """(issue slots per warp for one tile with a K extent of k_extent, MMA FLOPs per CTA,
    mainloop iterations)."""
    flop_per_mma = 2 * 16 * 8 * 16 if r.counts["HMMA"] else 2 * 64 * 128 * 16
    cta_flop = 2 * BM * BN * k_extent
    iters = cta_flop / (WARPS * r.main.mma * flop_per_mma)
    iters_i = math.ceil(iters)
    per_warp = (r.tile.insts - r.main.insts) + iters_i * r.main.insts
    return per_warp, cta_flop, iters_i


def model_shape(reports: dict[str, KernelReport], n: int, d: int, c: int, m: Machine,
                esize: int = 2) -> dict:
    """Predicted forward / backward launches of the bf16 K = 1 path for one shape."""
    n_pad, d_pad = round_up(n, 128), round_up(d, 128)
    row_tiles, d_tiles = n_pad // BM, d_pad // BN
    n_ct = ceil_div(c, BN)
    sms = m.sms
    # forward (Forward::layout)
    splits0 = max(1, ceil_div(2 * sms, row_tiles))
    tps = ceil_div(n_ct, splits0)
    splits = ceil_div(n_ct, tps)
    fm = reports["fwd_main"]
    tile_w, tile_flop, _ = _per_warp(fm, d_pad)
    fixed = fm.func.insts - fm.tile.insts if fm.func and fm.tile else 0
    fwd = [
        LaunchModel("prep", 1, n_pad, 0, 0, 0, n * d * esize),
        LaunchModel("fwd_main", 1, row_tiles * splits, fixed + tps * tile_w, tps * tile_flop,
                    # x and W tile per class tile: (BM + BN) x D x esize from L2
                    row_tiles * n_ct * (BM + BN) * d_pad * esize, c * d * esize),
        LaunchModel("combine", 1, ceil_div(n, 256), 0, 0, 0, splits * n_pad * 20),
    ]
    # backward (Backward::layout), K = 1, no feature_scale
    c_pad = round_up(c, 128)
    fit = (16 << 20) // (n_pad * esize) // 128 * 128
    cc = min(c_pad, max(128, fit))
    chunks = ceil_div(c, cc)
    tiles = row_tiles * d_tiles
    bsplits = ceil_div(2 * sms, tiles)
    bsplits = min(bsplits, max(1, cc // 256))
    bsplits = min(bsplits, max(1, (8 << 20) // (n_pad * d_pad * 4)))
    bsplits = max(1, bsplits)
    k_split = round_up(ceil_div(cc, bsplits), 32)
    bsplits = ceil_div(cc, k_split)
    kc = min(cc, c)  # the model charges every chunk as a full one (the last one may be partial)
    bt, bw, bx = reports["bwd_tile"], reports["bwd_dw"], reports["bwd_dx"]
    t_w, t_flop, _ = _per_warp(bt, d_pad)
    w_w, w_flop, _ = _per_warp(bw, n_pad)
    x_w, x_flop, _ = _per_warp(bx, k_split)
    w_chunk = kc * d * esize
    scratch = n_pad * kc * esize
    w_resident = w_chunk + scratch <= 0.75 * m.l2_mib * 2**20
    bwd = [
        LaunchModel("prep", 1, n_pad, 0, 0, 0, n * d * esize * 2),
        LaunchModel("bwd_tile", chunks, row_tiles * ceil_div(kc, BN), t_w, t_flop,
                    row_tiles * ceil_div(kc, BN) * (BM + BN) * d_pad * esize + scratch,
                    w_chunk),
        LaunchModel("bwd_dw", chunks, d_tiles * ceil_div(kc, BM), w_w, w_flop,
                    d_tiles * ceil_div(kc, BM) * (BM + BN) * n_pad * esize + 2 * w_chunk,
                    2 * w_chunk + (0 if w_resident else w_chunk)),
        LaunchModel("bwd_dx", chunks, d_tiles * row_tiles * bsplits, x_w, x_flop,
                    d_tiles * row_tiles * bsplits * (BM + BN) * k_split * esize
                    + 2 * bsplits * n_pad * d_pad * 4,
                    0 if w_resident else w_chunk),
        LaunchModel("finalize", 1, n, 0, 0, 0, bsplits * n_pad * d_pad * 4 + 2 * n * d * esize),
    ]
    out = {"fwd": [], "bwd": [], "layout": dict(splits=splits, tiles_per_split=tps, cc=cc,
                                                 chunks=chunks, dx_splits=bsplits,
                                                 w_resident=w_resident)}
    for key, launches in (("fwd", fwd), ("bwd", bwd)):
        for lm in launches:
            t, bound = lm.time(m)
            out[key].append((lm.name, lm.count, lm.grid, t, bound, lm.terms, lm.no_overlap))
    out["fwd_s"] = sum(x[3] for x in out["fwd"])
    out["bwd_s"] = sum(x[3] for x in out["bwd"])
    out["total_s"] = out["fwd_s"] + out["bwd_s"]
    out["useful_tflops"] = 6 * n * c * d / out["total_s"] / 1e12
    out["no_overlap_s"] = sum(x[6] for x in out["fwd"] + out["bwd"])
    out["no_overlap_tflops"] = 6 * n * c * d / out["no_overlap_s"] / 1e12
    return out


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def kernel_table(reports: list[KernelReport], arch: str, markdown: bool) -> str:
    head = ["kernel", "file", "regs", "spill st/ld", "stack", "smem static", "smem dyn", "HMMA",
            "HGMMA", "DMMA", "MUFU", "LDGSTS", "LDSM", "main insts/MMA (hot / all)",
            "epi insts/elem (hot / all)"]
    rows = []
    for r in reports:
        dyn = dynamic_smem(r.kid)
        main = (f"{fmt(r.main_per_mma)} / {r.main_static / r.main.mma:.1f}"
                if r.main and r.main.mma else "-")
        epi = (f"{fmt(r.epi_per_elem)} / {fmt(r.epi_static_per_elem)}"
               if r.epi and r.main and r.kid.name in ("fwd_main", "bwd_tile", "bwd_dw", "bwd_dx",
                                                      "fwd_main_sm90", "bwd_tile_sm90")
               else "-")
        rows.append([r.kid.label, r.source.replace("margin_lse_", ""), str(r.res.registers),
                     f"{r.res.spill_stores}/{r.res.spill_loads}", str(r.res.stack),
                     str(r.res.smem), "-" if dyn is None else str(dyn),
                     *(str(r.counts[k]) for k in COUNTED), main, epi])
    title = f"Kernels, {arch} (ptxas -v; SASS counts are static, per function)"
    return _table(title, head, rows, markdown)


def _table(title: str, head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" for _ in head) + "|"]
        # `code` for names with <...>, which Markdown would take for HTML tags
        lines += ["| " + " | ".join(f"`{c}`" if "<" in c else c for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
              for k, h in enumerate(head)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def model_tables(reports: list[KernelReport], m: Machine, markdown: bool,
                 dtype: str = "bf16") -> str:
    base = {r.kid.name: r for r in reports if r.kid.dtype == dtype and not r.kid.sub
            and not r.kid.hard}
    need = ("fwd_main", "bwd_tile", "bwd_dw", "bwd_dx")
    missing = [k for k in need if k not in base or base[k].main is None or base[k].tile is None]
    if missing:
        return f"(no model: no mainloop found in {', '.join(missing)} <{dtype}>)"
    per_tile = []
    for k in need:
        r = base[k]
        per_tile.append([f"{k}<{dtype}>", str(r.main.insts), str(r.main.mma),
                         f"{r.main_per_mma:.2f}", str(r.tile.insts - r.main.insts),
                         f"{r.epi.insts}", f"{r.epi_per_elem:.1f}"])
    t1 = _table(f"Hot paths per warp, {dtype} K = 1 (input of the model)",
                ["kernel", "mainloop insts/iter", "MMA/iter", "insts/MMA",
                 "tile insts outside mainloop", "epilogue insts", "epilogue insts/elem"],
                per_tile, markdown)
    rows, detail = [], []
    for name, (n, d, c) in parse_gpu_shapes().items():
        res = model_shape(base, n, d, c, m)
        rows.append([name, f"{n}x{d}x{c}", f"{res['fwd_s'] * 1e3:.3f}", f"{res['bwd_s'] * 1e3:.3f}",
                     f"{res['total_s'] * 1e3:.3f}", f"{res['useful_tflops']:.0f}",
                     f"{res['no_overlap_s'] * 1e3:.3f}", f"{res['no_overlap_tflops']:.0f}",
                     str(len([1 for x in res['fwd']]) + sum(x[1] for x in res['bwd'])),
                     ", ".join(f"{x[0]} {x[3] * 1e3:.3f} ({x[4]})" for x in res["fwd"] + res["bwd"]
                               if x[0] not in ("prep", "combine", "finalize"))])
        for x in res["fwd"] + res["bwd"]:
            if x[0] in ("prep", "combine", "finalize"):
                continue
            detail.append([name, x[0], str(x[1]), str(x[2]),
                           *(f"{x[5][k] * 1e3:.3f}" for k in ("issue", "tensor", "L2", "HBM")),
                           f"{x[1] * m.launch_us / 1e3:.3f}", f"{x[3] * 1e3:.3f}", x[4]])
    t2 = _table(f"PREDICTED fwd+bwd time, {dtype}, K = 1, {m.name} (a model, not a measurement)",
                ["shape", "NxDxC", "fwd ms", "bwd ms", "total ms", "useful TF/s (6NCD/t)",
                 "total ms, no overlap", "useful TF/s, no overlap",
                 "launches", "per kernel ms (bound)"], rows, markdown)
    t3 = _table("PREDICTED per-kernel terms (ms, summed over a pass's launches of the kernel)",
                ["shape", "kernel", "launches", "grid", "issue", "tensor", "L2", "HBM",
                 "launch overhead", "time", "bound"], detail, markdown)
    note = ""
    if any(r.kid.name == "fwd_main_sm90" for r in reports):
        note = ("NOTE: on compute capability 9.0 the bf16/fp16 K = 1 forward runs fwd_main_sm90 "
                "(TMA + wgmma, warp-specialized), which this model does not cover: the forward "
                "figures below are fwd_main's (mma.sync), the path of every other forward.\n\n")
    return note + t1 + "\n\n" + t2 + "\n\n" + t3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Offline kernel report of margin_ops' CUDA kernels (issue 11): compiles "
                    "csrc/cuda/*.cu for one architecture with .ci/run's flags (no GPU), prints "
                    "per kernel registers, spills, shared memory, MMA/MUFU/copy counts, SASS "
                    "instructions per MMA in the mainloop and per element in the epilogue, and "
                    "a PREDICTED time per named shape from a stated throughput model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/kernel_report.py                  # sm_90a: kernels, model, predictions\n"
               "  python tools/kernel_report.py --arch sm_80     # the sm_80 build\n"
               "  python tools/kernel_report.py --markdown       # Markdown (benchmarks/RESULTS.md)\n"
               "  python tools/kernel_report.py --kernels-only --filter bwd_tile\n"
               "  python tools/kernel_report.py --l2-tbps 7 --mma-sync-fraction 0.6   # sensitivity\n\n"
               "Cubins are cached by content under $MARGIN_OPS_KERNEL_REPORT_CACHE (default\n"
               "$TMPDIR/margin_ops_kernel_report): a first run compiles each .cu once (~1-3 min\n"
               "on 2 cores). Every time printed is a PREDICTION of the stated model, never a\n"
               "measurement. See the module docstring for the loop and hot-path heuristics.")
    ap.add_argument("--arch", default="sm_90a", help="sm_90a (default), sm_80, ...")
    ap.add_argument("--cache", type=Path, default=None, help="cubin cache directory")
    ap.add_argument("--markdown", action="store_true", help="Markdown tables")
    ap.add_argument("--kernels-only", action="store_true", help="no time model")
    ap.add_argument("--gate", action="store_true",
                    help="only check that the sm_90a GEMM kernels (HGMMA_KERNELS) issue HGMMA "
                         "without spills; exit 1 otherwise")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"],
                    help="instantiation the model uses (default bf16)")
    ap.add_argument("--filter", default="", help="only kernels whose label contains this")
    ap.add_argument("--clock-ghz", type=float, default=Machine.clock_ghz,
                    help="SM clock of the model (GHz) (default %(default)s)")
    ap.add_argument("--mma-sync-fraction", type=float, default=Machine.mma_sync_fraction,
                    help="mma.sync rate as a fraction of wgmma's (an assumption) (default %(default)s)")
    ap.add_argument("--l2-tbps", type=float, default=Machine.l2_tbps,
                    help="L2 bandwidth of the model (TB/s, an assumption) (default %(default)s)")
    ap.add_argument("--hbm-tbps", type=float, default=Machine.hbm_tbps,
                    help="HBM bandwidth of the model (TB/s) (default %(default)s)")
    ap.add_argument("--launch-us", type=float, default=Machine.launch_us,
                    help="cost of one launch boundary (us) (default %(default)s)")
    args = ap.parse_args(argv)

    cache = args.cache or default_cache()
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    compiled = []
    for s in sources:
        print(f"# compiling {s.relative_to(ROOT)} for {args.arch} (cached in {cache})",
              file=sys.stderr, flush=True)
        compiled.append(compile_one(s, args.arch, cache))
    reports = report_kernels(compiled)
    if args.gate:
        if not args.arch.startswith("sm_90"):
            ap.error("--gate checks the sm_90a build (--arch sm_90a)")
        problems = gate(reports)
        for p in problems:
            print(f"FAIL {p}")
        if not problems:
            print(f"PASS: {', '.join(HGMMA_KERNELS)} issue HGMMA without spills")
        return 1 if problems else 0
    shown = [r for r in reports if args.filter in r.kid.label]
    print(kernel_table(shown, args.arch, args.markdown))
    print()
    print("mainloop: innermost backward-branch loop containing MMAs; hot path = most MMAs, then "
          "most LDGSTS+LDSM, then most MUFU.EX2 (up to 1 per element), then fewest instructions; "
          "'all' = every "
          "instruction of the body once. epilogue: mainloop end -> enclosing loop's back edge "
          f"(or EXIT), per accumulator element ({ACC_PER_THREAD} per thread).")
    if args.kernels_only:
        return 0
    m = Machine(clock_ghz=args.clock_ghz, mma_sync_fraction=args.mma_sync_fraction,
                l2_tbps=args.l2_tbps, hbm_tbps=args.hbm_tbps, launch_us=args.launch_us)
    print()
    if not args.arch.startswith("sm_90"):
        print(f"NOTE: {args.arch} SASS under the H100 model: an H100 runs the sm_90a build, so this "
              "compares code quality only; it is no prediction for an A100 (other SM count, "
              "clocks, rates and bandwidths).\n")
    print(model_tables(reports, m, args.markdown, args.dtype))
    print()
    print("Model (PREDICTIONS; every figure above that is a time is one):")
    for line in m.describe():
        print(f"- {line}")
    print("- work per launch: grids and chunking mirror Forward::layout / Backward::layout "
          "(forward ~2 CTAs per SM of contiguous class tiles; backward: 16 MiB dS' chunks, "
          "bwd_tile + bwd_dw + bwd_dx per chunk, dX splits); a CTA's issue slots = 8 warps x "
          "(tile's hot path outside the mainloop + iterations x mainloop hot path); "
          "iterations = 2*BM*BN*K / (8 warps x MMAs per iteration x FLOP per MMA)")
    print("- L2 bytes: each CTA tile streams its A and B tiles through L2 ((BM+BN) x K x 2 B: "
          "16 B per cosine in the forward), plus dS' and partials; HBM bytes: W once per "
          "forward, W (tile) + W and dW (dW epilogue) per backward chunk, plus W again in dX "
          "when the W chunk and dS' exceed 75% of L2")
    print("- the executed MMA work is 8NCD (the backward recomputes the 2NCD cosines) for "
          "6NCD useful; prep/combine/finalize are charged their HBM bytes and one launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
