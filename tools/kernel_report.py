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
   branch ``BRA`` to a lower address whose source the target reaches inside [target, branch],
   which drops ptxas' out-of-line mbarrier retry stubs; ptxas' loop exit
   ``CALL.REL.NOINC addr`` counts as a jump) that contains MMA
   instructions, the one with the most MMAs when several are innermost; its SASS
   instructions per MMA are counted along the *hot path* (below). The *epilogue* is the
   code after the mainloop up to the back edge of the enclosing loop (the forward's class-tile
   loop) or to EXIT (one tile per CTA), counted along the hot path, divided by the
   accumulator elements per thread (BM·BN / 256 threads = 64: mma.sync's 8 warps, or the
   sm_90a kernels' 2 consumer warpgroups, whose producer warp is not counted). k-blocks
   on an epilogue's path (bwd_gemm_sm90's peeled last k-block) are taken out at the
   mainloop's rate (its instructions per MMA). A class-tile loop holding several copies of
   the mainloop (fwd_main_sm90: unrolled by two for its two accumulator sets, the next
   tile's first k-blocks issued before the current tile's epilogue) is that many tiles: a
   tile is its body's hot path divided by the copies, the epilogue that tile beyond its
   k-blocks. bwd_fused_sm90 has no k-loop: its S and dW wgmmas are unrolled, so its
   mainloop is the row-tile loop (one iteration = one 64-row x tile; "insts/MMA" mixes
   S's m64n32k16 and dW's m64n256k16), and its epilogue is the segment of that loop with
   no MMA in flight (from the wait for all wgmmas to dW's first: serial_segment), per S
   element of a thread (16 per tile);
3. a PREDICTED time per named shape (benchmarks/contenders.py GPU_SHAPES), forward and
   backward, for the bf16 K = 1 instantiations, from the model printed after the tables: on
   sm_90a for three paths side by side, the mma.sync kernels, the sm_90a kernels (TMA +
   wgmma) that replace them where the host's eligibility rules allow, and the sm_90a path
   with the fused backward (bwd_fused_sm90 for bwd_tile + bwd_dw) where Backward::sm90_fused
   holds (``--chunk-study`` adds the 3-launch sm_90a backward under class-chunk caps at
   D = 512, C = 1M).

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
body is not followed). For K > 1 the region after the mainloop holds the other
sub-centers' passes, their mainloop included, so the "epilogue" is not comparable with K = 1.
An mbarrier wait counts its first try (the wait succeeds at once): the model has no stalls.

Everything this script prints about time is a PREDICTION of a simple throughput model,
never a measurement.

Usage:
    python tools/kernel_report.py                 # sm_90a, every table
    python tools/kernel_report.py --arch sm_80
    python tools/kernel_report.py --markdown      # the tables as Markdown (RESULTS.md)
    python tools/kernel_report.py --kernels-only  # no model
    python tools/kernel_report.py --gate          # CI's sm_90a check: HGMMA, no spills
    python tools/kernel_report.py --machine h200 --chunk-study
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
    ints: tuple[tuple[str, int], ...] = ()  # int template parameters after the flags (INT_PARAMS)

    @property
    def label(self) -> str:
        opts = [o for o, on in (("K>1", self.sub), ("hard", self.hard)) if on] + \
            ([self.policy] if self.policy else []) + [f"{k}={v}" for k, v in self.ints]
        return f"{self.name}<{self.dtype}{''.join(', ' + o for o in opts)}>"

    def int_param(self, name: str) -> int | None:
        return dict(self.ints).get(name)


#: The bool template parameters after the element type, in order, of each kernel family
#: (the others: <T, kSub, kHard>).
FLAG_PARAMS = {"fwd_main_sm90": ("hard",), "bwd_tile_sm90": ("hard",), "bwd_gemm_sm90": (),
               "bwd_fused_sm90": ("hard",), "bwd_fused": ("hard",)}
#: Kernel families whose second template parameter is an epilogue policy (a type).
POLICY_FAMILIES = ("bwd_gemm_sm90",)
#: The int template parameters after the flags, in order: bwd_fused_sm90's kDB, the 64-wide
#: D blocks of dW per consumer warpgroup (ceil(D / 128): D <= 128·kDB), and kCtas, the CTAs
#: of its cluster (2: pairs of class tiles sharing each x tile by TMA multicast); the mma.sync
#: bwd_fused's kDB, the same ceil(D / 128).
INT_PARAMS = {"bwd_fused_sm90": ("kDB", "kCtas"), "bwd_fused": ("kDB",)}
#: The int template parameters of an epilogue policy after its element type: DxSm90's tile
#: width BN (128, or 256 where D_pad >= 256: Backward::layout's dx_bn).
POLICY_INT_PARAMS = {"DxSm90": ("BN",)}


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
    rest = args[1 + len(params):]
    ints = tuple((p, int(re.sub(r"^\(\w+\)", "", a)))  # "4" or "(int)4"
                 for p, a in zip(INT_PARAMS.get(name, ()), rest))
    if policy:  # the policy's own parameters: "DxSm90<__nv_bfloat16, 256>" -> BN = 256
        ints += tuple((p, int(re.sub(r"^\(\w+\)|>+$", "", a)))
                      for p, a in zip(POLICY_INT_PARAMS.get(policy, ()), args[2:]))
    return KernelId(name, dtype, flags.get("sub", False), flags.get("hard", False), policy, ints)


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
    """The loops of a function: a backward branch whose source is reachable from its target
    without leaving [target, branch]. The reachability test drops ptxas' out-of-line retry
    stubs (an mbarrier try_wait that failed jumps to a stub after the function's EXIT, which
    branches back behind the wait: a backward branch, but no loop of the code)."""
    index = {i.addr: k for k, i in enumerate(insts)}
    # next_ctl[k]: the first control transfer at or after k (len(insts) if none)
    next_ctl = [len(insts)] * (len(insts) + 1)
    for k in range(len(insts) - 1, -1, -1):
        i = insts[k]
        ctl = i.branch_target is not None or i.base in ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET",
                                                         "CALL")
        next_ctl[k] = k if ctl else next_ctl[k + 1]

    def reaches(start: int, end: int) -> bool:
        seen, todo = set(), [start]
        while todo:
            k = todo.pop()
            if k in seen or not start <= k <= end:
                continue
            seen.add(k)
            b = next_ctl[k]
            if b >= end:  # straight on into the back edge (end is one)
                return True
            i = insts[b]
            t = i.branch_target
            if i.base in ("BRX", "JMX") or (i.base in ("BRA", "JMP") and t is None):
                return True  # an indirect jump: assume the loop is real
            if t is not None and t in index:
                todo.append(index[t])
            if i.conditional or i.base == "CALL":  # a call returns
                todo.append(b + 1)
        return False

    loops = []
    for k, i in enumerate(insts):
        t = i.branch_target
        if t is not None and t <= i.addr and t in index and reaches(index[t], k):
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


def innermost_mma_loops(insts: list[Inst], loops: list[Loop]) -> list[Loop]:
    """The loops containing MMAs with no such loop inside them."""
    mma = [lp for lp in loops if count_ops(insts, lp.start, lp.end)["MMA"] > 0]
    return [lp for lp in mma if not any(lp.contains(o) for o in mma)]


def find_mainloop(insts: list[Inst], loops: list[Loop] | None = None) -> Loop | None:
    """The innermost loop containing MMAs (no loop with MMAs inside it); the most MMAs wins."""
    loops = find_loops(insts) if loops is None else loops
    inner = innermost_mma_loops(insts, loops)
    if not inner:
        return None
    return max(inner, key=lambda lp: (count_ops(insts, lp.start, lp.end)["MMA"], -lp.size))


def unroll_factor(insts: list[Inst], loops: list[Loop], main: Loop, outer: Loop) -> int:
    """How many copies of the mainloop the enclosing loop holds: the innermost MMA loops
    directly inside it (it is their enclosing loop) with the mainloop's MMA count: 2 in
    fwd_main_sm90, whose class-tile loop is unrolled by two for its two accumulator sets; 1
    elsewhere (fwd_main K > 1's second mainloop sits in the sub-center pass loop)."""
    n_mma = count_ops(insts, main.start, main.end)["MMA"]
    return sum(1 for lp in innermost_mma_loops(insts, loops)
               if enclosing_loop(loops, lp) == outer
               and count_ops(insts, lp.start, lp.end)["MMA"] == n_mma)


def mma_flop_per_warp(opcode: str) -> float | None:
    """FLOP of one warp's share of an MMA instruction, from its SASS shape: HMMA.16816 is
    m16n8k16 per warp (HMMA.1688 k8, DMMA.884 m8n8k4); HGMMA.64x128x16 is m64n128k16 per
    warpgroup, issued by its 4 warps."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        return 2.0 * math.prod(map(int, m.groups())) / 4
    m = re.match(r"[HDI]MMA\.(16|8)(8)(\d+)", opcode)
    return 2.0 * math.prod(map(int, m.groups())) if m else None


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

    def per(self, copies: int) -> "HotPath":
        """One of `copies` identical copies of this path (an unrolled loop's body)."""
        return HotPath(self.insts / copies, self.mma / copies, self.copies / copies,
                       self.ex2 / copies)


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


#: bwd_fused_sm90 (margin_lse_bwd_fused_sm90.cu): BwdFusedSm90Cfg::kBlockBytes (a 64 x 64
#: 16-bit k-block or staging tile) and sizeof(BwdFusedSm90Tail) (5 mbarriers, 3 x 64 floats
#: per class, 8 warps x 32 column sums, 2 x 2 x 64 feature-scale sums, MarginParams: 88 bytes
#: on x86-64).
FUSED_BLOCK_BYTES, FUSED_TAIL = 64 * 64 * 2, 6 * 8 + 3 * 64 * 4 + 8 * 32 * 4 + 2 * 2 * 64 * 4 + 88


def fused_smem(k_db: int) -> int:
    """bwd_fused_smem_bytes: 1024 (alignment) + W and two x buffers of 2·kDB blocks each + two
    staging tiles + the tail."""
    return 1024 + (6 * k_db + 2) * FUSED_BLOCK_BYTES + FUSED_TAIL


#: bwd_fused (margin_lse_bwd_fused_sm80.cu): sizeof(BwdFusedTail) (3 x 64 floats per class,
#: 2 x 64 column sums, 4 x 64 feature-scale sums, MarginParams: 88 bytes on x86-64).
MMA_FUSED_TAIL = 3 * 64 * 4 + 2 * 64 * 4 + 4 * 64 * 4 + 88


def mma_fused_smem(d: int) -> int:
    """bwd_fused_smem_bytes: W's 64 rows and two x tiles of BM rows (64, or 32 at kDB = 4),
    rows of d + 8 16-bit elements, + the BM x 72 staging tile + the tail."""
    bm = 64 if (d + 127) // 128 <= 3 else 32
    return (64 + 2 * bm) * (d + 8) * 2 + bm * 72 * 2 + MMA_FUSED_TAIL


def dynamic_smem(kid: KernelId, subcenters: int = 2) -> int | None:
    """The launch's dynamic shared memory (TileGemm<T, ATrans, BTrans>::kSmemBytes mirrored;
    K > 1 adds K x BN x 4 bytes, printed for K = `subcenters`; bwd_fused_sm90: fused_smem of
    its kDB; bwd_fused: mma_fused_smem at its largest D, 128·kDB); None for the other sm_90a kernels, whose figure depends on D
    (Sm90Cfg::smem_bytes: 194 KiB at D = 512) or is fixed (Sm90GemmShape<BN>::kSmemBytes:
    129 KiB at BN = 128, 193 KiB at BN = 256)."""
    if kid.name == "bwd_fused_sm90" and kid.int_param("kDB") is not None:
        return fused_smem(kid.int_param("kDB"))
    if kid.name == "bwd_fused" and kid.int_param("kDB") is not None:  # at D = 128·kDB
        return mma_fused_smem(128 * kid.int_param("kDB"))
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
    epi_kblocks: float = 0  # issue slots of k-blocks on the epilogue's path (not epilogue)
    epi_static: float = 0  # every instruction of the epilogue region once, k-blocks taken out
    tile: HotPath | None = None  # the tile's whole hot path (prologue + mainloop once + epilogue)
    func: HotPath | None = None  # the whole function's hot path (mainloop once)
    outer_kind: str = ""  # "loop" (class-tile loop) or "exit"
    unroll: int = 1  # copies of the mainloop in the class-tile loop (the tile: 1 / unroll of it)
    mma_flop: float | None = None  # FLOP of one warp's share of one mainloop MMA
    main_flop: float = 0.0  # FLOP of one warp's share of all of one mainloop iteration's MMAs
    serial: HotPath | None = None  # a mainloop's segment with no MMA in flight (serial_segment)

    @property
    def main_per_mma(self) -> float | None:
        return self.main.insts / self.main.mma if self.main and self.main.mma else None

    @property
    def epi_insts(self) -> float | None:
        """The epilogue's issue slots per warp and tile, k-blocks on its path (the next tile's
        look-ahead, a peeled last k-block) taken out."""
        return self.epi.insts - self.epi_kblocks if self.epi and self.main else None

    @property
    def acc_per_thread(self) -> int:
        """Accumulator elements per thread: ACC_PER_THREAD, twice that for DxSm90's BN = 256."""
        return BM * (self.kid.int_param("BN") or BN) // THREADS

    @property
    def epi_per_elem(self) -> float | None:
        return self.epi_insts / self.acc_per_thread if self.epi and self.main else None

    @property
    def epi_static_per_elem(self) -> float | None:
        return self.epi_static / self.acc_per_thread if self.epi else None

    @property
    def tile_extra(self) -> float:
        """A tile's issue slots per warp beyond its k-blocks (what a tile costs besides K)."""
        return self.tile.insts - kblock_slots(self.tile, self.main)

    @property
    def cta_extra(self) -> float:
        """A CTA's issue slots per warp outside its tiles (0 for one tile per CTA)."""
        return self.func.insts - kblock_slots(self.func, self.main) - self.unroll * self.tile_extra

    @property
    def outside_main(self) -> float:
        """Issue slots per warp outside the mainloop (the function's hot path holds one
        iteration): a row-walk kernel's (bwd_fused_sm90) prologue and final dW write."""
        return self.func.insts - self.main.insts

    def k_per_iter(self) -> float:
        """The K depth one mainloop iteration covers for the CTA's BM x BN tile (DxSm90's
        BN where it has one)."""
        return WARPS * self.main.mma * self.mma_flop / (2 * BM * (self.kid.int_param("BN") or BN))


def kblock_slots(path: HotPath, main: HotPath) -> float:
    """The issue slots of the k-blocks on `path` at the mainloop's rate: its MMAs over the
    mainloop's MMAs per iteration, times the iteration's instructions (the part of a path
    that scales with K)."""
    return path.mma / main.mma * main.insts


def analyze_function(insts: list[Inst]) -> dict:
    """Mainloop / epilogue figures of one function's instructions."""
    out: dict = {"main": None, "main_static": 0, "epi": None, "epi_kblocks": 0, "epi_static": 0,
                 "tile": None, "func": None, "outer_kind": "", "unroll": 1, "mma_flop": None,
                 "main_flop": 0.0, "serial": None}
    if not insts:
        return out
    loops = find_loops(insts)
    ml = find_mainloop(insts, loops)
    outer = enclosing_loop(loops, ml) if ml is not None else None
    u = unroll_factor(insts, loops, ml, outer) if outer is not None else 1
    # (the function's path holds the tile loop's body once: u tiles' exponentials)
    out["func"] = hot_path(insts, 0, len(insts) - 1, ends_at_exit=True,
                           ex2_cap=u * ACC_PER_THREAD)
    if ml is None:
        return out
    out["main"] = hot_path(insts, ml.start, ml.end)
    out["main_static"] = ml.size
    out["mma_flop"] = next(mma_flop_per_warp(i.opcode) for i in insts[ml.start:ml.end + 1]
                           if i.base in MMA_OPS)
    main_mma = count_ops(insts, ml.start, ml.end)["MMA"]
    # every MMA of the body (bwd_fused_sm90 mixes S's m64n32k16 and dW's m64n256k16)
    out["main_flop"] = sum(mma_flop_per_warp(i.opcode) or 0.0
                           for i in insts[ml.start:ml.end + 1] if i.base in MMA_OPS)
    out["serial"] = serial_segment(insts, ml)

    # k-blocks outside the mainloop (straight-line ones, the other copies of an unrolled
    # mainloop) count at the mainloop's rate (for "all": its static size per MMA)
    def static_beyond_kblocks(lo: int, hi: int) -> float:
        return hi - lo + 1 - count_ops(insts, lo, hi)["MMA"] / main_mma * ml.size

    if outer is not None:
        out["outer_kind"] = "loop"
        out["unroll"] = u
        tile = hot_path(insts, outer.start, outer.end, ex2_cap=u * ACC_PER_THREAD)
        out["tile"] = tile.per(u)
        if u == 1:  # the epilogue: from the mainloop's end to the tile loop's back edge (for
            # K > 1, with the sub-center pass loop's own mainloop: reported as that tail)
            out["epi"] = hot_path(insts, ml.end + 1, outer.end, ex2_cap=ACC_PER_THREAD)
            out["epi_static"] = outer.end - ml.end
        else:  # the copies interleave tiles (one's epilogue, the next one's first k-blocks):
            # the epilogue is the tile's path beyond its k-blocks
            out["epi"] = out["tile"]
            out["epi_kblocks"] = kblock_slots(out["tile"], out["main"])
            out["epi_static"] = static_beyond_kblocks(outer.start, outer.end) / u
    else:
        out["outer_kind"] = "exit"
        out["epi"] = hot_path(insts, ml.end + 1, len(insts) - 1, ends_at_exit=True,
                              ex2_cap=ACC_PER_THREAD)
        out["epi_kblocks"] = kblock_slots(out["epi"], out["main"])  # a peeled last k-block
        last_exit = max((k for k, i in enumerate(insts) if i.base == "EXIT"), default=len(insts) - 1)
        out["epi_static"] = static_beyond_kblocks(ml.end + 1, last_exit)
        out["tile"] = out["func"]
    return out


def serial_segment(insts: list[Inst], ml: Loop) -> HotPath | None:
    """A mainloop that waits for all its wgmmas (WARPGROUP.DEPBAR.LE gsb0, 0x0) and then
    issues more (bwd_fused_sm90's row-tile loop: S, the epilogue, dW) runs the code between
    that wait and the next MMA with no MMA in flight: that segment's hot path (None where
    the body has no such wait before an MMA: the k-loops of the other kernels)."""
    for k in range(ml.start, ml.end + 1):
        if re.match(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", insts[k].text):
            nxt = next((j for j in range(k + 1, ml.end + 1) if insts[j].base in MMA_OPS), None)
            if nxt is not None:
                return hot_path(insts, k, nxt - 1)
    return None


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
HGMMA_KERNELS = ("fwd_main_sm90", "bwd_tile_sm90", "bwd_gemm_sm90", "bwd_fused_sm90")


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
    wgmma_fraction: float = 1.0  # ASSUMPTION: HGMMA at the full rate
    mma_sync_fraction: float = 0.625  # ASSUMPTION: mma.sync reaches ~60-65% of wgmma's rate
    issue_per_clk_sm: float = 4.0  # 4 schedulers x 1 warp instruction per clock
    l2_tbps: float = 5.5  # ASSUMPTION: sustained L2 read bandwidth, TB/s
    hbm_tbps: float = 3.0  # TB/s
    hbm_source: str = "measured copy, docs/design.md"
    l2_mib: float = 50.0
    l2_resident: float = 0.75  # ASSUMPTION: the share of L2 a backward chunk's W + dS' may fill
    launch_us: float = 3.0  # per launch boundary (ramp-up, tail, launch gap)
    refill_us: float = 0.5  # ASSUMPTION: per CTA after the first on an SM, at 1 CTA/SM

    def describe(self) -> list[str]:
        rate = self.wgmma_flop_per_clk_sm * self.mma_sync_fraction
        peak = self.wgmma_flop_per_clk_sm * self.sms * self.clock_ghz / 1e3
        return [
            f"machine: {self.name}: {self.sms} SMs at {self.clock_ghz} GHz, the clock of NVIDIA's "
            f"989 TF dense bf16 figure ({self.wgmma_flop_per_clk_sm:.0f} FLOP/clk/SM x {self.sms} "
            "SMs; H100 SXM and H200 share it: the 1.98 GHz maximum boost is not what the figure "
            "assumes)",
            f"tensor: HGMMA (wgmma) at {self.wgmma_fraction:.3f} of that peak = "
            f"{self.wgmma_fraction * peak:.0f} TF - an ASSUMPTION (a measured cuBLAS GEMM "
            "reaches ~800 TF: --wgmma-fraction 0.81); mma.sync (HMMA) at "
            f"{self.mma_sync_fraction:.3f} of the peak = {rate:.0f} FLOP/clk/SM "
            f"({rate * self.sms * self.clock_ghz / 1e3:.0f} TF) - an ASSUMPTION (published "
            "microbenchmarks put mma.sync at ~60-65% of wgmma on H100)",
            f"issue: {self.issue_per_clk_sm:.0f} warp instructions per clock per SM (4 schedulers "
            "x 1); every SASS instruction (MMA, predicated-off, barrier) takes one slot; 8 warps "
            "issue per CTA (mma.sync: all 8; sm_90a: the 8 consumer warps, the producer warp's "
            "TMA instructions are left out); no stalls modelled (latency, dependencies, "
            "barriers): an optimistic bound",
            f"memory: L2 {self.l2_tbps} TB/s (ASSUMPTION), HBM {self.hbm_tbps} TB/s "
            f"({self.hbm_source}), L2 {self.l2_mib:.0f} MiB; a backward chunk's W rows stay in L2 "
            f"from bwd_tile to bwd_dw and bwd_dx when W chunk + dS' <= {self.l2_resident:.2f} x L2 "
            "(ASSUMPTION), else bwd_dw's epilogue and bwd_dx read them from HBM again",
            f"launches: {self.launch_us} us per launch boundary (design.md's figure), added to "
            "each; the sm_90a kernels run 1 CTA per SM (384 threads, 168 registers): each CTA "
            f"after the first on an SM adds {self.refill_us} us (ASSUMPTION: barrier init, the "
            "first TMA stage's latency and the last wgmma's drain, which no second CTA hides)",
            "per launch: time = max(issue, tensor + exposed epilogue, L2, HBM) + refills + launch; "
            "issue and tensor per SM from the busiest SM's CTAs (ceil(grid / SMs) CTAs: waves): "
            "MMA and other instructions overlap, nothing hides an idle SM; 'exposed epilogue' "
            "(sm_90a, 1 CTA/SM): per tile, the epilogue's issue time that no queued MMA covers - "
            "all of it in bwd_tile_sm90 and the GEMMs (the consumers wait for their last wgmma "
            f"first), in fwd_main_sm90 beyond the {FWD_AHEAD_KBLOCKS} look-ahead k-blocks' MMA "
            "time (the next tile's wgmmas run under the epilogue); mma.sync kernels: none "
            "(2 CTAs/SM hide each other's epilogue). 'no overlap': max(issue, tensor + exposed) "
            "+ max(L2, HBM) + refills + launch (memory streaming never hidden): the two bracket "
            "the prediction",
        ]


#: Machines of the model (--machine). H200: the H100's die (SMs, clocks, L2) with HBM3e.
MACHINES = {
    "h100": Machine(),
    "h200": Machine(name="H200 SXM (model)", hbm_tbps=4.8,
                    hbm_source="NVIDIA's vendor figure, not a measured copy: H100's measured "
                               "3.0 is 90% of its vendor 3.35"),
}


#: Command-line overrides of the machine: (flag, Machine field, help).
MACHINE_FLAGS = (
    ("--clock-ghz", "clock_ghz", "SM clock of the model (GHz)"),
    ("--wgmma-fraction", "wgmma_fraction", "HGMMA rate as a fraction of the nominal peak (an "
                                           "assumption)"),
    ("--mma-sync-fraction", "mma_sync_fraction", "mma.sync rate as a fraction of the nominal "
                                                 "wgmma peak (an assumption)"),
    ("--l2-tbps", "l2_tbps", "L2 bandwidth of the model (TB/s, an assumption)"),
    ("--hbm-tbps", "hbm_tbps", "HBM bandwidth of the model (TB/s)"),
    ("--launch-us", "launch_us", "cost of one launch boundary (us)"),
    ("--refill-us", "refill_us", "cost of each further CTA on an SM at 1 CTA/SM (us, an "
                                 "assumption)"),
)


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
    serial_tiles: int = 0  # tiles per CTA whose epilogue runs while the tensor cores idle
    serial_insts: float = 0  # per such tile and warp: the epilogue's issue slots
    cover_flop: float = 0  # per such tile: MMA work queued before its epilogue (look-ahead)
    lone: bool = False  # 1 CTA per SM: each CTA after the first on an SM pays a refill

    def time(self, m: Machine) -> tuple[float, str]:
        clk = m.clock_ghz * 1e9
        per_sm = math.ceil(self.grid / m.sms)
        issue = per_sm * WARPS * self.insts_per_warp / m.issue_per_clk_sm / clk
        rate = m.wgmma_flop_per_clk_sm * (m.wgmma_fraction if self.hgmma else m.mma_sync_fraction)
        tensor = per_sm * self.mma_flop_per_cta / rate / clk
        exposed = per_sm * self.serial_tiles * max(
            0.0, WARPS * self.serial_insts / m.issue_per_clk_sm - self.cover_flop / rate) / clk
        l2 = self.l2_bytes / (m.l2_tbps * 1e12)
        hbm = self.hbm_bytes / (m.hbm_tbps * 1e12)
        refill = (per_sm - 1) * m.refill_us * 1e-6 if self.lone else 0.0
        bounds = {"issue": issue, "tensor": tensor + exposed, "L2": l2, "HBM": hbm}
        bound = max(bounds, key=bounds.get)
        label = "tensor+epi" if bound == "tensor" and exposed > 0 else bound
        self.terms = {k: self.count * v for k, v in (("issue", issue), ("tensor", tensor),
                                                      ("exposed", exposed), ("L2", l2),
                                                      ("HBM", hbm), ("refill", refill))}
        # the pessimistic variant: memory streaming does not overlap instruction issue
        self.no_overlap = self.count * (max(issue, tensor + exposed) + max(l2, hbm) + refill
                                        + m.launch_us * 1e-6)
        return self.count * (bounds[bound] + refill + m.launch_us * 1e-6), label


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


# ---------------------------------------------------------------------------------------
# The host's launch rules, mirrored: the one place the model holds them (update with the
# C++ named beside each). bf16/fp16, K = 1, no class_index, 16-byte aligned inputs.
# ---------------------------------------------------------------------------------------

SCRATCH_BUDGET = 16 << 20  # kScratchBudget (margin_lse_backward.cu): the dS' chunk, bytes
PARTIAL_BUDGET = 16 << 20  # kPartialBudget (margin_lse_backward.cu): the fp32 dX partials
SM90_DX_WIDE_BN = 256  # DxSm90's tile width where D_pad >= 256 (Backward::layout's dx_bn)
MMA_SYNC_BK = 32  # Cfg<bf16>::BK (margin_lse_tile_gemm.cuh): mma.sync kernels' k-block
SM90_BK = 64  # Sm90WarpRoles::BK (margin_lse_wgmma_desc.cuh): the sm_90a kernels' k-block
FWD_AHEAD_KBLOCKS = 2  # kFwdAhead (margin_lse_forward_sm90.cu)
# Sm90Cfg (margin_lse_sm90_mainloop.cuh): kMaxSmem, kMaxStages, kEngineTail, and the kernels'
# tails: sizeof(FwdSm90Tail), sizeof(BwdTileSm90Tail) (MarginParams: 88 bytes on x86-64)
SM90_MAX_SMEM, SM90_MAX_STAGES, SM90_ENGINE_TAIL = 227 * 1024, 4, 1120
FWD_SM90_TAIL, BWD_TILE_SM90_TAIL = 88, 4192


def sm90_stages(d: int, tail: int) -> int:
    """Sm90Cfg::stages_for: the deepest W ring (<= 4 stages of 16 KiB) that fits."""
    s = SM90_MAX_STAGES
    while s > 0 and (1024 + (ceil_div(d, SM90_BK) + s) * 16384 + SM90_ENGINE_TAIL + tail
                     > SM90_MAX_SMEM):
        s -= 1
    return s


def sm90_eligible(d: int, esize: int) -> dict[str, bool]:
    """Which roles take their sm_90a kernel on compute capability 9.0: sm90_forward_eligible
    (margin_lse_forward_sm90.cu), sm90_bwd_tile_eligible (margin_lse_bwd_tile_sm90.cu),
    Backward::sm90_dw / sm90_dx (margin_lse_backward.cu)."""
    wgmma = esize == 2  # bf16 / fp16
    fwd = wgmma and (d * 2) % 16 == 0 and sm90_stages(d, FWD_SM90_TAIL) == SM90_MAX_STAGES
    return {"fwd_main": fwd, "bwd_tile": fwd and sm90_stages(d, BWD_TILE_SM90_TAIL) >= 2,
            "bwd_dw": wgmma, "bwd_dx": wgmma and d % 8 == 0}


def forward_layout(n: int, c: int, sms: int) -> dict:
    """Forward::layout (margin_lse_forward.cu): ~2 CTAs per SM, each a contiguous range of
    class tiles of one row tile (fwd_main_sm90 runs on the same grid)."""
    row_tiles, n_ct = round_up(n, 128) // BM, ceil_div(c, BN)
    splits0 = max(1, ceil_div(2 * sms, row_tiles))
    tps = ceil_div(n_ct, splits0)
    return dict(row_tiles=row_tiles, n_ct=n_ct, tiles_per_split=tps, splits=ceil_div(n_ct, tps))


def backward_layout(n: int, d: int, c: int, sms: int, esize: int, sm90_dx: bool, *,
                    budget: int = SCRATCH_BUDGET, cc_cap: int | None = None) -> dict:
    """Backward::layout (margin_lse_backward.cu): class chunks of cc classes from the dS'
    budget (cc_cap: a further cap, the chunk study's), dX tiles (bwd_gemm_sm90<DxSm90>: 256
    wide where D_pad >= 256), dX splits (~2 CTAs per SM, >= 256 classes each, partials
    within their budget), k_split rounded to the k-block of the dX kernel (64 for
    bwd_gemm_sm90<DxSm90>, 32 for bwd_dx)."""
    n_pad, d_pad = round_up(n, 128), round_up(d, 128)
    row_tiles, d_tiles = n_pad // BM, d_pad // BN
    dx_bn = SM90_DX_WIDE_BN if sm90_dx and d_pad >= SM90_DX_WIDE_BN else BN
    dx_d_tiles = ceil_div(d_pad, dx_bn)
    fit = budget // (n_pad * esize) // 128 * 128
    cc = min(round_up(c, 128), max(128, fit))
    if cc_cap is not None:
        cc = min(cc, max(128, cc_cap // 128 * 128))
    splits = ceil_div(2 * sms, row_tiles * dx_d_tiles)
    splits = min(splits, max(1, cc // 256))
    splits = max(1, min(splits, max(1, PARTIAL_BUDGET // (n_pad * d_pad * 4))))
    k_split = round_up(ceil_div(cc, splits), SM90_BK if sm90_dx else MMA_SYNC_BK)
    return dict(n_pad=n_pad, d_pad=d_pad, row_tiles=row_tiles, d_tiles=d_tiles, dx_bn=dx_bn,
                dx_d_tiles=dx_d_tiles, cc=cc, chunks=ceil_div(c, cc),
                dx_splits=ceil_div(cc, k_split), k_split=k_split)


FUSED_CLASSES, FUSED_ROWS = 64, 64  # kBwdFusedClasses, BwdFusedSm90Cfg::BM
FUSED_MAX_D = 512  # BwdFusedSm90Cfg::kMaxD


def fused_dw_blocks(d: int) -> int:
    """BwdFusedSm90Cfg::dw_blocks: the kernel's kDB, 64-wide D blocks per warpgroup."""
    return (d // SM90_BK + 1) // 2


def sm90_fused_eligible(d: int, esize: int, kc: int, sms: int) -> bool:
    """Backward::sm90_fused (margin_lse_backward.cu) with sm90_bwd_fused_eligible
    (margin_lse_bwd_fused_sm90.cu), K = 1, no class_index, aligned inputs: 16-bit, d % 64 == 0,
    64 <= d <= 512, and the chunk's 64-class tiles (kc = min(cc, C) classes) give at least
    7 / 8 of the SMs a CTA."""
    return (esize == 2 and d % SM90_BK == 0 and SM90_BK <= d <= FUSED_MAX_D
            and 8 * ceil_div(kc, FUSED_CLASSES) >= 7 * max(sms, 1))


def bwd_tile_sm90_walk(row_tiles: int, kc: int, sms: int) -> tuple[int, int]:
    """launch_bwd_tile_sm90 (margin_lse_bwd_tile_sm90.cu): (grid, class tiles per CTA): about
    one CTA per SM, a row tile's chunk split over ceil(SMs / row tiles) CTAs."""
    tiles = ceil_div(kc, BN)
    per_split = ceil_div(tiles, min(tiles, ceil_div(sms, row_tiles)))
    return row_tiles * ceil_div(tiles, per_split), per_split


#: The launches of each path, per pass: (role, kernel) in launch order (Forward::run,
#: Backward::run; prep, combine and finalize around them). On "sm_90a" a role whose
#: sm90_eligible entry is false runs mma.sync's kernel. A new kernel: its row here, its
#: CTAS_PER_SM entry and, for a new role, a function in LAUNCHES.
PATHS = {
    "mma.sync": {"fwd": (("fwd_main", "fwd_main"),),
                 "bwd": (("bwd_tile", "bwd_tile"), ("bwd_dw", "bwd_dw"), ("bwd_dx", "bwd_dx"))},
    "sm_90a": {"fwd": (("fwd_main", "fwd_main_sm90"),),
               "bwd": (("bwd_tile", "bwd_tile_sm90"), ("bwd_dw", "bwd_gemm_sm90<DwSm90>"),
                       ("bwd_dx", "bwd_gemm_sm90<DxSm90>"))},
    # where sm90_fused_eligible holds (else the host runs "sm_90a"): bwd_fused_sm90 replaces
    # bwd_tile + bwd_dw, and prep writes no x̂
    "sm_90a fused": {"fwd": (("fwd_main", "fwd_main_sm90"),),
                     "bwd": (("bwd_fused", "bwd_fused_sm90"),
                             ("bwd_dx", "bwd_gemm_sm90<DxSm90>"))},
}
FUSED_PATH = "sm_90a fused"
#: CTAs per SM (launch bounds, registers, shared memory: the mma.sync kernels 2, the sm_90a
#: ones 1: 384 threads x 168 registers). At 1 a tile's epilogue runs with the SM's tensor
#: cores idle but for MMA queued before it (LOOKAHEAD_KBLOCKS), and each CTA after the first
#: on an SM pays Machine.refill_us; at 2 the other CTA hides both.
CTAS_PER_SM = {"fwd_main": 2, "bwd_tile": 2, "bwd_dw": 2, "bwd_dx": 2, "fwd_main_sm90": 1,
               "bwd_tile_sm90": 1, "bwd_gemm_sm90<DwSm90>": 1, "bwd_gemm_sm90<DxSm90>": 1,
               "bwd_fused_sm90": 1}
#: k-blocks of the next tile a kernel issues before a tile's epilogue (kFwdAhead).
LOOKAHEAD_KBLOCKS = {"fwd_main_sm90": FWD_AHEAD_KBLOCKS}


def model_key(kid: KernelId) -> str:
    """A kernel's name in PATHS: its family, with the epilogue policy of bwd_gemm_sm90, and
    the instantiation: bwd_fused_sm90's kDB, DxSm90's BN when it is not 128 (instance_key)."""
    if kid.int_param("kDB") is not None:
        return f"{kid.name}<kDB={kid.int_param('kDB')}>"
    key = f"{kid.name}<{kid.policy}>" if kid.policy else kid.name
    bn = kid.int_param("BN")
    return f"{key}<BN={bn}>" if bn is not None and bn != BN else key


def instance_key(key: str, d: int) -> str:
    """The model key of the instantiation the host runs for a PATHS key at feature dimension
    d: bwd_fused_sm90's kDB (fused_dw_blocks), bwd_gemm_sm90<DxSm90>'s 256-wide tile where
    D_pad >= 256; other keys as they are."""
    if key == "bwd_fused_sm90":
        return f"{key}<kDB={fused_dw_blocks(d)}>"
    if key == "bwd_gemm_sm90<DxSm90>" and round_up(d, 128) >= SM90_DX_WIDE_BN:
        return f"{key}<BN={SM90_DX_WIDE_BN}>"
    return key


def family_key(key: str) -> str:
    """A model key without its instantiation (the key of PATHS and CTAS_PER_SM)."""
    return re.sub(r"<(?:kDB|BN)=\d+>$", "", key)


def tile_bn(r: KernelReport) -> int:
    """The width of a kernel's CTA tile: BN, or DxSm90's BN."""
    return r.kid.int_param("BN") or BN


def is_sm90(r: KernelReport) -> bool:
    return r.kid.name.endswith("_sm90")


def k_block(r: KernelReport) -> int:
    return SM90_BK if is_sm90(r) else MMA_SYNC_BK


def tile_slots(r: KernelReport, k: int) -> float:
    """Issue slots per warp of one BM x tile_bn tile of depth k: the tile's slots beyond its
    k-blocks, plus k (rounded up to the kernel's k-block) at the mainloop's rate."""
    return r.tile_extra + round_up(k, k_block(r)) / r.k_per_iter() * r.main.insts


def tile_flop(r: KernelReport, k: int) -> float:
    return 2.0 * BM * tile_bn(r) * round_up(k, k_block(r))


@dataclasses.dataclass
class Problem:
    """One shape on one machine with the host's layouts: what every launch needs."""
    n: int
    d: int
    c: int
    esize: int
    m: Machine
    fwd: dict  # forward_layout
    bwd: dict  # backward_layout

    @property
    def n_pad(self) -> int:
        return round_up(self.n, 128)

    @property
    def d_pad(self) -> int:
        return round_up(self.d, 128)

    @property
    def kc(self) -> int:  # a chunk's classes (every chunk charged as a full one)
        return min(self.bwd["cc"], self.c)

    @property
    def w_chunk(self) -> int:  # bytes of a chunk's W rows
        return self.kc * self.d * self.esize

    @property
    def scratch(self) -> int:  # bytes of a chunk's dS'
        return self.n_pad * self.kc * self.esize

    @property
    def w_resident(self) -> bool:  # W rows stay in L2 from bwd_tile to bwd_dw and bwd_dx
        return self.w_chunk + self.scratch <= self.m.l2_resident * self.m.l2_mib * 2**20


def launch(r: KernelReport, p: Problem, count: int, grid: int, tiles: int, k: int,
           l2_bytes: float, hbm_bytes: float) -> LaunchModel:
    """The LaunchModel of `count` launches of r on `grid` CTAs, each running `tiles` tiles of
    depth k (plus its slots outside tiles)."""
    key = model_key(r.kid)
    lone = CTAS_PER_SM[family_key(key)] == 1
    return LaunchModel(key, count, grid, r.cta_extra + tiles * tile_slots(r, k),
                       tiles * tile_flop(r, k), l2_bytes, hbm_bytes,
                       hgmma=r.counts.get("HGMMA", 0) > 0, serial_tiles=tiles if lone else 0,
                       serial_insts=r.tile_extra,
                       cover_flop=LOOKAHEAD_KBLOCKS.get(key, 0) * 2.0 * BM * BN * k_block(r),
                       lone=lone)


def fwd_main_launch(r: KernelReport, p: Problem) -> LaunchModel:
    fl = p.fwd
    grid = fl["row_tiles"] * fl["splits"]
    if is_sm90(r):  # x's row tile once per CTA (resident), a W tile per class tile
        l2 = (grid * BM + fl["row_tiles"] * fl["n_ct"] * BN) * p.d_pad * p.esize
    else:  # x's and W's tiles per class tile
        l2 = fl["row_tiles"] * fl["n_ct"] * (BM + BN) * p.d_pad * p.esize
    return launch(r, p, 1, grid, fl["tiles_per_split"], p.d if is_sm90(r) else p.d_pad, l2,
                  p.c * p.d * p.esize)


def bwd_tile_launch(r: KernelReport, p: Problem) -> LaunchModel:
    rt, tiles = p.bwd["row_tiles"], ceil_div(p.kc, BN)
    if is_sm90(r):  # a range of the chunk's class tiles per CTA, x's row tile resident
        grid, per_cta = bwd_tile_sm90_walk(rt, p.kc, p.m.sms)
        l2 = (grid * BM + rt * tiles * BN) * p.d_pad * p.esize + p.scratch
        return launch(r, p, p.bwd["chunks"], grid, per_cta, p.d, l2, p.w_chunk)
    grid = rt * tiles
    return launch(r, p, p.bwd["chunks"], grid, 1, p.d_pad,
                  grid * (BM + BN) * p.d_pad * p.esize + p.scratch, p.w_chunk)


def bwd_dw_launch(r: KernelReport, p: Problem) -> LaunchModel:
    # one tile per CTA; the epilogue reads W and writes dW (W from HBM again if not resident)
    grid = p.bwd["d_tiles"] * ceil_div(p.kc, BM)
    return launch(r, p, p.bwd["chunks"], grid, 1, p.n if is_sm90(r) else p.n_pad,
                  grid * (BM + BN) * p.n_pad * p.esize + 2 * p.w_chunk,
                  p.w_chunk + (0 if p.w_resident else p.w_chunk))


def bwd_dx_launch(r: KernelReport, p: Problem) -> LaunchModel:
    # one BM x dx_bn tile per CTA over k_split classes (dS' once per D tile, W once per row
    # tile); fp32 partials read and written (a last 256-wide tile stores up to D_pad only)
    bl = p.bwd
    assert tile_bn(r) == bl["dx_bn"], (r.kid.label, bl["dx_bn"])
    grid = bl["dx_d_tiles"] * bl["row_tiles"] * bl["dx_splits"]
    return launch(r, p, bl["chunks"], grid, 1, bl["k_split"],
                  grid * (BM + bl["dx_bn"]) * bl["k_split"] * p.esize
                  + 2 * bl["dx_splits"] * p.n_pad * p.d_pad * 4,
                  0 if p.w_resident else p.w_chunk)


#: bwd_fused_sm90's global loads per row and CTA besides x: each consumer warpgroup loads
#: its rows' factors (scale, lse, g_lse, g_sum, x_norm, g_t: fp32; the label: int64).
FUSED_ROW_FACTOR_BYTES = 2 * (6 * 4 + 8)


def bwd_fused_launch(r: KernelReport, p: Problem) -> LaunchModel:
    """bwd_fused_sm90 per chunk: ceil(kc / 64) CTAs, 1 per SM, each walking every 64-row x
    tile (one mainloop iteration: S and dW, see analyze_function). Per CTA: the slots
    outside the row-tile loop + per row tile the loop body's hot path; the MMA work of the
    loop body's wgmmas (S 64 x 64 x D and dW 64 x D x 64, the zero D block of an odd D / 64
    included). The serial segment (from the wait on S to the first dW wgmma: the epilogue)
    runs with the tensor cores idle; the rest of the body (the dW and next S issue, the row
    factors) overlaps the wgmmas in flight. L2: x whole per CTA (TMA: the n rows that exist;
    the rows past n are zero-filled), halved where the chunk's class tiles pair up into 2-CTA
    clusters (an even grid: each CTA loads half of every x tile and multicasts it to both),
    the row factors per CTA, W's tile once, dS' written (every row tile's 64 rows), dW
    written once; HBM: W read and dW written."""
    row_tiles = ceil_div(p.n, FUSED_ROWS)
    grid = ceil_div(p.kc, FUSED_CLASSES)
    key = model_key(r.kid)
    x_share = 0.5 if grid % 2 == 0 else 1.0  # launch_bwd_fused_sm90: clusters of 2 on an even grid
    l2 = (grid * p.n * (x_share * p.d * p.esize + FUSED_ROW_FACTOR_BYTES) + p.w_chunk
          + row_tiles * FUSED_ROWS * grid * FUSED_CLASSES * p.esize + p.w_chunk)
    return LaunchModel(key, p.bwd["chunks"], grid, r.outside_main + row_tiles * r.main.insts,
                       row_tiles * WARPS * r.main_flop, l2, 2 * p.w_chunk, hgmma=True,
                       serial_tiles=row_tiles, serial_insts=r.serial.insts,
                       lone=CTAS_PER_SM[family_key(key)] == 1)


#: The cost of each role's launches.
LAUNCHES = {"fwd_main": fwd_main_launch, "bwd_tile": bwd_tile_launch, "bwd_dw": bwd_dw_launch,
            "bwd_dx": bwd_dx_launch, "bwd_fused": bwd_fused_launch}


def path_keys(path: str, d: int = 512) -> list[str]:
    """The kernels a path launches (PATHS), in order, at feature dimension d (bwd_fused_sm90's
    instantiation: kDB from d)."""
    return [instance_key(key, d) for launches in PATHS[path].values()
            for _, key in launches]


def path_applies(path: str, n: int, d: int, c: int, m: Machine, esize: int = 2) -> bool:
    """Whether the host runs `path` for this shape: the fused path only where
    sm90_fused_eligible holds (the mma.sync and sm_90a paths always, role by role)."""
    if path != FUSED_PATH:
        return True
    kc = min(backward_layout(n, d, c, m.sms, esize, True)["cc"], c)
    return sm90_fused_eligible(d, esize, kc, m.sms)


def path_kernels(kernels: dict[str, KernelReport], path: str, d: int,
                 esize: int) -> dict[str, list[tuple[str, KernelReport]]]:
    """Per pass, the (role, kernel report) of a path's launches at feature dimension d."""
    ok = sm90_eligible(d, esize) if path != "mma.sync" else {}
    fallback = {role: key for launches in PATHS["mma.sync"].values() for role, key in launches}
    return {pas: [(role, kernels[instance_key(key, d) if ok.get(role, True)
                                 else fallback[role]])
                  for role, key in launches] for pas, launches in PATHS[path].items()}


def model_shape(kernels: dict[str, KernelReport], n: int, d: int, c: int, m: Machine,
                esize: int = 2, path: str = "mma.sync", *, budget: int = SCRATCH_BUDGET,
                cc_cap: int | None = None) -> dict:
    """Predicted forward / backward launches of one path (PATHS) for one shape, from the
    kernels' reports keyed as in PATHS (bf16 or fp16, K = 1, no feature_scale)."""
    k = path_kernels(kernels, path, d, esize)
    sm90_dx = any(role == "bwd_dx" and is_sm90(r) for role, r in k["bwd"])
    p = Problem(n, d, c, esize, m, forward_layout(n, c, m.sms),
                backward_layout(n, d, c, m.sms, esize, sm90_dx, budget=budget, cc_cap=cc_cap))
    n_pad, d_pad, splits = p.n_pad, p.d_pad, p.bwd["dx_splits"]
    fwd = [LaunchModel("prep", 1, n_pad, 0, 0, 0, n * d * esize),
           *(LAUNCHES[role](r, p) for role, r in k["fwd"]),
           LaunchModel("combine", 1, ceil_div(n, 256), 0, 0, 0, p.fwd["splits"] * n_pad * 20)]
    fused = any(role == "bwd_fused" for role, _ in k["bwd"])
    # prep reads x and writes x̂ (not on the fused path: its dW reads x itself)
    bwd = [LaunchModel("prep", 1, n_pad, 0, 0, 0, n * d * esize * (1 if fused else 2)),
           *(LAUNCHES[role](r, p) for role, r in k["bwd"]),
           LaunchModel("finalize", 1, n, 0, 0, 0, splits * n_pad * d_pad * 4 + 2 * n * d * esize)]
    out = {"path": path, "fwd": [], "bwd": [],
           "layout": dict(splits=p.fwd["splits"], tiles_per_split=p.fwd["tiles_per_split"],
                          cc=p.bwd["cc"], chunks=p.bwd["chunks"], dx_splits=splits,
                          k_split=p.bwd["k_split"], w_resident=p.w_resident,
                          w_chunk=p.w_chunk, scratch=p.scratch)}
    for key, launches in (("fwd", fwd), ("bwd", bwd)):
        for lm in launches:
            t, bound = lm.time(m)
            out[key].append((lm.name, lm.count, lm.grid, t, bound, lm.terms, lm.no_overlap))
    out["fwd_s"] = sum(x[3] for x in out["fwd"])
    out["bwd_s"] = sum(x[3] for x in out["bwd"])
    out["total_s"] = out["fwd_s"] + out["bwd_s"]
    out["launches"] = sum(x[1] for x in out["fwd"] + out["bwd"])
    out["useful_tflops"] = 6 * n * c * d / out["total_s"] / 1e12
    out["no_overlap_s"] = sum(x[6] for x in out["fwd"] + out["bwd"])
    out["no_overlap_tflops"] = 6 * n * c * d / out["no_overlap_s"] / 1e12
    return out


#: The chunk study (--chunk-study): 1m-small-batch's D and C, N = 128 and 512, class-chunk caps.
STUDY_N, STUDY_D, STUDY_C = (128, 512), 512, 1_000_000
STUDY_CAPS = (8192, 16384, 24576, 32768, 65536)


def chunk_study(kernels: dict[str, KernelReport], m: Machine, path: str = "sm_90a",
                esize: int = 2) -> list[dict]:
    """The backward at D = 512, C = 1M for N in STUDY_N and each cap of STUDY_CAPS on the
    class chunk: under the dS' budget, and (where the cap exceeds it) with the budget lifted
    to fit the cap."""
    rows = []
    for n in STUDY_N:
        n_pad = round_up(n, 128)
        for cap in STUDY_CAPS:
            for budget in sorted({SCRATCH_BUDGET, max(SCRATCH_BUDGET, n_pad * cap * esize)}):
                res = model_shape(kernels, n, STUDY_D, STUDY_C, m, esize, path, budget=budget,
                                  cc_cap=cap)
                rows.append(dict(n=n, cap=cap, budget=budget, res=res))
    return rows


def chunk_rule(n: int, d: int, m: Machine, esize: int = 2, fraction: float | None = None) -> int:
    """The cap the study proposes: cc <= min(the dS' budget's, fraction·L2 / ((D + N_pad)·esize)),
    i.e. the chunk's W rows and its dS' together within the resident share of L2."""
    f = m.l2_resident if fraction is None else fraction
    n_pad = round_up(n, 128)
    budget_cc = SCRATCH_BUDGET // (n_pad * esize) // 128 * 128
    return min(budget_cc, int(f * m.l2_mib * 2**20 // ((d + n_pad) * esize)) // 128 * 128)


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
                                                      "fwd_main_sm90", "bwd_tile_sm90",
                                                      "bwd_gemm_sm90")
               else "-")
        if r.kid.name == "bwd_fused_sm90" and r.serial is not None:
            # per row tile: the segment with no MMA in flight, per S element of a thread
            epi = f"{r.serial.insts / FUSED_ELEMS:.1f} / -"
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


AUX_KERNELS = ("prep", "combine", "finalize")  # charged their HBM bytes and a launch only


def model_kernels(reports: list[KernelReport], dtype: str) -> dict[str, KernelReport]:
    """The K = 1, no-hard-example instantiations of `dtype` whose mainloop the tool found,
    keyed as in PATHS (bwd_fused_sm90: the kCtas = 1 instantiation's SASS stands for both;
    bwd_fused_launch charges the 2-CTA clusters' halved x reads)."""
    return {model_key(r.kid): r for r in reports if r.kid.dtype == dtype and not r.kid.sub
            and not r.kid.hard and r.main is not None and r.tile is not None
            and r.kid.int_param("kCtas") in (None, 1)}


def model_notes(m: Machine) -> list[str]:
    """The model's assumptions, one line each (printed under the tables)."""
    return m.describe() + [
        "work per launch: grids and chunking mirror Forward::layout / Backward::layout and "
        "launch_bwd_tile_sm90 (forward ~2 CTAs per SM of contiguous class tiles, on both paths;"
        " backward: 16 MiB dS' chunks, bwd_tile + bwd_dw + bwd_dx per chunk, dX splits; "
        "bwd_tile_sm90 ~1 CTA per SM walking a range of the chunk's class tiles); the kernels "
        "per path follow the host's eligibility rules (at D = 512 bf16 every role takes its "
        "sm_90a kernel); a CTA's issue slots = 8 warps x (slots outside its tiles + per tile: "
        "the tile's slots beyond its k-blocks + k-blocks x the mainloop's slots per k-block), "
        "k-blocks of 32 (mma.sync) or 64 (sm_90a); fwd_main_sm90's class-tile loop is unrolled "
        "by two: a tile is half its body",
        "L2 bytes: mma.sync kernels stream a CTA tile's A and B tiles through L2 ((BM+BN) x K x "
        "2 B: 16 B per cosine); fwd_main_sm90 / bwd_tile_sm90 read x's row tile once per CTA "
        "(resident in shared memory) and a W tile per class tile; plus dS', the dW epilogue's W "
        "and dW, the dX partials (read and written); HBM bytes: W once per forward; per "
        "backward chunk W (bwd_tile) and dW (bwd_dw), plus W again in bwd_dw's epilogue and in "
        "bwd_dx when the chunk is not resident",
        "the executed MMA work is 8NCD (the backward recomputes the 2NCD cosines) for 6NCD "
        "useful; prep/combine/finalize are charged their HBM bytes and one launch",
        f"'{FUSED_PATH}' (only where Backward::sm90_fused's rule holds: d % 64 == 0, d <= 512, "
        "8 ceil(min(cc, C) / 64) >= 7 SMs): prep (no x̂ write), per chunk bwd_fused_sm90 + "
        "bwd_gemm_sm90<DxSm90>, finalize. bwd_fused_sm90: ceil(kc / 64) CTAs at 1 per SM, "
        "each walking all ceil(N / 64) row tiles; per tile the row-tile loop's hot path (S and "
        "dW issue, row factors, epilogue) and its wgmmas' FLOP from the SASS; its schedule is "
        "serial (S, wait, epilogue, dW issued and left in flight under the next tile's S "
        "issue), so the epilogue - the segment from the wait to the first dW wgmma - is "
        "exposed: tile time = max(issue, tensor + epilogue issue); slots outside the loop "
        "(W norms, the final dW write; its loops counted once) per CTA. L2: all of x (n rows) "
        f"and the row factors ({FUSED_ROW_FACTOR_BYTES} B per row) per CTA, W's tile once, dS' "
        "written, dW written once; HBM: W read, dW written",
    ]


def fused_tile_figures(r: KernelReport, m: Machine) -> dict:
    """bwd_fused_sm90 per 64-row x tile and CTA (8 consumer warps): issue, tensor and serial
    clocks, and the tile's time max(issue, tensor + serial) (LaunchModel.time per tile)."""
    rate = m.wgmma_flop_per_clk_sm * m.wgmma_fraction
    issue = WARPS * r.main.insts / m.issue_per_clk_sm
    tensor = WARPS * r.main_flop / rate
    serial = WARPS * r.serial.insts / m.issue_per_clk_sm
    return dict(issue=issue, tensor=tensor, serial=serial, tile=max(issue, tensor + serial))


FUSED_ELEMS = FUSED_ROWS * FUSED_CLASSES // THREADS  # S elements per consumer thread and tile


def model_tables(reports: list[KernelReport], m: Machine, markdown: bool,
                 dtype: str = "bf16") -> str:
    kernels = model_kernels(reports, dtype)
    if not all(k in kernels for k in path_keys("mma.sync")):
        missing = [k for k in path_keys("mma.sync") if k not in kernels]
        return f"(no model: no mainloop found in {', '.join(missing)} <{dtype}>)"
    shapes = parse_gpu_shapes()
    hot, fused_rows, seen = [], [], set()
    for path in PATHS:
        for d in sorted({d for _, d, _ in shapes.values()}):
            for key in path_keys(path, d):
                if key not in kernels or key in seen:
                    continue
                seen.add(key)
                r = kernels[key]
                if family_key(key) == "bwd_fused_sm90":
                    f = fused_tile_figures(r, m)
                    fused_rows.append([r.kid.label, fmt(r.main.insts, "g"), str(r.main.mma),
                                       fmt(r.main.insts - r.serial.insts, "g"),
                                       fmt(r.serial.insts, "g"),
                                       f"{r.serial.insts / FUSED_ELEMS:.1f}",
                                       f"{WARPS * r.main_flop / 1e6:.2f}",
                                       *(f"{f[k]:.0f}" for k in ("issue", "tensor", "serial",
                                                                 "tile")),
                                       fmt(r.outside_main, ".0f")])
                    continue
                hot.append([r.kid.label, path, fmt(r.main.insts, "g"), fmt(r.main.mma, "g"),
                            f"{r.main_per_mma:.2f}", f"{r.k_per_iter():.0f}", str(r.unroll),
                            fmt(r.tile_extra, ".0f"), fmt(r.epi_insts, ".0f"),
                            f"{r.epi_per_elem:.1f}", fmt(r.cta_extra, ".0f")])
    out = [_table(f"Hot paths per warp, {dtype} K = 1 (input of the model; sm_90a: per consumer "
                  "warp)", ["kernel", "path", "mainloop insts/iter", "MMA/iter", "insts/MMA",
                            "K/iter", "mainloop copies per tile loop",
                            "tile insts beyond its k-blocks", "epilogue insts",
                            "epilogue insts/elem", "CTA insts outside tiles"], hot, markdown)]
    if fused_rows:
        out.append(_table(
            f"bwd_fused_sm90 per 64-row x tile (its mainloop: the row-tile loop, S and dW "
            f"unrolled in it), {dtype}: per consumer warp, and per CTA (8 warps) in clocks "
            "(input of the model)",
            ["kernel", "insts/tile", "HGMMA/tile", "insts beside MMA in flight",
             "insts with no MMA in flight (epilogue)", "epilogue insts/S elem",
             "MFLOP/tile (CTA)", "issue clk", "tensor clk", "epilogue clk",
             "tile clk = max(issue, tensor + epilogue)", "insts outside the loop"],
            fused_rows, markdown))
    rows, side, detail = [], [], []
    for name, (n, d, c) in shapes.items():
        res = {p: model_shape(kernels, n, d, c, m, path=p) for p in PATHS
               if all(k in kernels for k in path_keys(p, d)) and path_applies(p, n, d, c, m)}
        for p, r in res.items():
            rows.append([name, f"{n}x{d}x{c}", p, f"{r['fwd_s'] * 1e3:.3f}",
                         f"{r['bwd_s'] * 1e3:.3f}", f"{r['total_s'] * 1e3:.3f}",
                         f"{r['useful_tflops']:.0f}", f"{r['no_overlap_s'] * 1e3:.3f}",
                         f"{r['no_overlap_tflops']:.0f}", str(r["launches"]),
                         ", ".join(f"{x[0]} {x[3] * 1e3:.3f} ({x[4]})" for x in r["fwd"] + r["bwd"]
                                   if x[0] not in AUX_KERNELS)])
            for x in r["fwd"] + r["bwd"]:
                if x[0] in AUX_KERNELS:
                    continue
                detail.append([name, p, x[0], str(x[1]), str(x[2]),
                               *(f"{x[5][k] * 1e3:.3f}" for k in ("issue", "tensor", "exposed",
                                                                   "L2", "HBM", "refill")),
                               f"{x[1] * m.launch_us / 1e3:.3f}", f"{x[3] * 1e3:.3f}", x[4]])
        cols = [p for p in PATHS if p in res]
        if len(cols) > 1:
            def both(key: str, spec: str, scale: float = 1.0) -> str:
                return " / ".join(format(res[p][key] * scale, spec) if p in res else "n/a"
                                  for p in PATHS)
            base = res["mma.sync"]["total_s"]
            f = res.get(FUSED_PATH)
            side.append([name, both("fwd_s", ".3f", 1e3), both("bwd_s", ".3f", 1e3),
                         both("total_s", ".3f", 1e3), both("useful_tflops", ".0f"),
                         both("no_overlap_tflops", ".0f"),
                         " / ".join(f"{base / res[p]['total_s']:.2f}x" if p in res else "n/a"
                                    for p in PATHS if p != "mma.sync"),
                         f"{res['sm_90a']['bwd_s'] / f['bwd_s']:.2f}x" if f and "sm_90a" in res
                         else "n/a (rule fails: the host runs sm_90a)"])
    if side:
        out.append(_table(f"PREDICTED, {dtype}, K = 1, {m.name}: {' / '.join(PATHS)} (the "
                          f"fused path only where the host's rule holds; a model, not a "
                          "measurement)",
                          ["shape", "fwd ms", "bwd ms", "total ms", "useful TF/s (6NCD/t)",
                           "useful TF/s, no overlap",
                           "speed-up vs mma.sync ("
                           + " / ".join(p for p in PATHS if p != "mma.sync") + ")",
                           "fused bwd speed-up vs sm_90a bwd"], side, markdown))
    out.append(_table(f"PREDICTED fwd+bwd time, {dtype}, K = 1, {m.name} (a model, not a "
                      "measurement)",
                      ["shape", "NxDxC", "path", "fwd ms", "bwd ms", "total ms",
                       "useful TF/s (6NCD/t)", "total ms, no overlap", "useful TF/s, no overlap",
                       "launches", "per kernel ms (bound)"], rows, markdown))
    out.append(_table("PREDICTED per-kernel terms (ms, summed over a pass's launches of the "
                      "kernel)", ["shape", "path", "kernel", "launches", "grid", "issue",
                                  "tensor", "exposed epilogue", "L2", "HBM", "refills",
                                  "launch overhead", "time", "bound"], detail, markdown))
    return "\n\n".join(out)


def bwd_no_overlap(res: dict) -> float:
    """The backward's time under the 'no overlap' variant (memory never hidden)."""
    return sum(x[6] for x in res["bwd"])


def chunk_tables(reports: list[KernelReport], m: Machine, markdown: bool,
                 dtype: str = "bf16") -> str:
    """The chunk study (chunk_study) and the rule it proposes (chunk_rule)."""
    kernels = model_kernels(reports, dtype)
    path = "sm_90a" if all(k in kernels for k in path_keys("sm_90a")) else "mma.sync"
    if not all(k in kernels for k in path_keys(path)):
        return "(no chunk study: the model's kernels are missing)"
    study = chunk_study(kernels, m, path)
    rows, best = [], {}  # best: per N and variant, (cc, time) under the dS' budget
    for row in study:
        res, lay = row["res"], row["res"]["layout"]
        over = row["budget"] > SCRATCH_BUDGET
        fixed = sum(x[1] * m.launch_us * 1e-3 + x[5]["refill"] * 1e3 for x in res["bwd"])
        rows.append([str(row["n"]), str(row["cap"]),
                     f"{row['budget'] >> 20}{' (lifted)' if over else ''}", str(lay["cc"]),
                     str(lay["chunks"]),
                     f"{lay['w_chunk'] / 2**20:.0f} + {lay['scratch'] / 2**20:.1f}",
                     "yes" if lay["w_resident"] else "no", str(lay["dx_splits"]),
                     str(sum(x[1] for x in res["bwd"])), f"{fixed:.3f}",
                     *(f"{x[3] * 1e3:.3f} ({x[4]})" for x in res["bwd"][1:4]),
                     f"{res['bwd_s'] * 1e3:.3f}", f"{bwd_no_overlap(res) * 1e3:.3f}"])
        for variant, t in (("overlap", res["bwd_s"]), ("no overlap", bwd_no_overlap(res))):
            if not over and t < best.get((row["n"], variant), (0, math.inf))[1]:
                best[row["n"], variant] = (lay["cc"], t)
    names = [role for role, _ in PATHS[path]["bwd"]]
    t = _table(f"PREDICTED backward at D = {STUDY_D}, C = {STUDY_C} by class-chunk cap, {path} "
               f"path, {dtype}, {m.name} (a model, not a measurement)",
               ["N", "cc cap", "dS' budget MiB", "cc", "chunks", "W chunk + dS' MiB",
                "resident in L2", "dX splits", "bwd launches", "launch + refill ms",
                *(f"{k} ms (bound)" for k in names), "bwd ms", "bwd ms, no overlap"],
               rows, markdown)

    def bwd(n: int, mm: Machine, cap: int | None) -> dict:
        return model_shape(kernels, n, STUDY_D, STUDY_C, mm, path=path, cc_cap=cap)

    def ms(res: dict) -> str:
        return f"{res['bwd_s'] * 1e3:.3f} / {bwd_no_overlap(res) * 1e3:.3f} ms"

    def rule_wins_from(n: int, rule: int) -> float | None:
        """The L2 bandwidth (the model's weakest input; 4-16 TB/s) from which the rule's
        backward is faster than today's, all else as `m`."""
        for l2 in (x / 2 for x in range(8, 33)):
            mm = dataclasses.replace(m, l2_tbps=l2)
            if bwd(n, mm, rule)["bwd_s"] < bwd(n, mm, None)["bwd_s"]:
                return l2
        return None

    lines = []
    for n in STUDY_N:
        rule = chunk_rule(n, STUDY_D, m)
        today, capped = bwd(n, m, None), bwd(n, m, rule)
        if capped["layout"]["cc"] == today["layout"]["cc"]:
            verdict = "the same chunks as today's"
        else:
            l2 = rule_wins_from(n, rule)
            verdict = (f"faster than today's (with overlap) from L2 >= {l2} TB/s, all else as "
                       "above" if l2 else "slower than today's at every L2 bandwidth of 4-16 TB/s")
        lines.append(
            f"N = {n} (bwd with / without overlap): today's rule cc = {today['layout']['cc']} -> "
            f"{ms(today)}; best cap under the budget: "
            + ", ".join(f"{v}: cc = {best[n, v][0]} ({best[n, v][1] * 1e3:.3f} ms)"
                        for v in ("overlap", "no overlap"))
            + f"; the rule cc <= min(budget / (N_pad esize), {m.l2_resident} L2 / ((D + N_pad) "
            f"esize)) = {capped['layout']['cc']} -> {ms(capped)}: {verdict}")
    return t + "\n\n" + "\n".join(("- " if markdown else "  ") + x for x in lines)


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
               "  python tools/kernel_report.py --l2-tbps 7 --mma-sync-fraction 0.6  # sensitivity\n"
               "  python tools/kernel_report.py --machine h200 --chunk-study\n\n"
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
    ap.add_argument("--machine", default="h100", choices=sorted(MACHINES),
                    help="the model's machine (default %(default)s); the flags below override it")
    # the Machine fields a flag may override: (flag, field, help)
    for flag, field, text in MACHINE_FLAGS:
        ap.add_argument(flag, type=float, default=None, dest=field,
                        help=f"{text} (default: the machine's, h100 {getattr(Machine, field)})")
    ap.add_argument("--chunk-study", action="store_true",
                    help="also the backward at D = 512, C = 1M, N = 128 and 512 under class-chunk "
                         "caps (PREDICTED), and the cap rule the model favours")
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
    m = dataclasses.replace(MACHINES[args.machine], **{
        field: getattr(args, field) for _, field, _ in MACHINE_FLAGS
        if getattr(args, field) is not None})
    print()
    if not args.arch.startswith("sm_90"):
        print(f"NOTE: {args.arch} SASS under the H100 model: an H100 runs the sm_90a build, so this "
              "compares code quality only; it is no prediction for an A100 (other SM count, "
              "clocks, rates and bandwidths).\n")
    print(model_tables(reports, m, args.markdown, args.dtype))
    if args.chunk_study:
        print()
        print(chunk_tables(reports, m, args.markdown, args.dtype))
    print()
    print("Model (PREDICTIONS; every figure above that is a time is one):")
    for line in model_notes(m):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
