"""tools/kernel_report.py: SASS / ptxas parsing, loop and hot-path analysis, the time model.

Fast: canned SASS and ptxas text, and one tiny .cu (a loop of two mma.sync per iteration)
compiled for sm_80 and sm_90a when nvcc is available (a few seconds). One test compiles the
real kernels for sm_90a (about a minute, cached by content): CI's gate that the sm_90a GEMM
kernels issue HGMMA without spilling.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "tools" / "kernel_report.py")
kr = importlib.util.module_from_spec(_spec)
sys.modules["kernel_report"] = kr
_spec.loader.exec_module(kr)

# A function in cuobjdump -sass form: a prologue, a loop [0x40, 0x120] whose body has a
# vector-copy path (LDGSTS) and a slow scalar path, 2 HMMA, then an epilogue with a rare
# branch and an EXIT, and the trailing self-branch ptxas emits.
CANNED = """
	code for sm_90a
		Function : _Z6canned
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x0000 */
                                                                           /* 0x0000 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;     /* 0x0000 */
        /*0030*/               @P0 EXIT ;                                 /* 0x0000 */
        /*0040*/              @!P1 BRA 0x80 ;                             /* 0x0000 */
        /*0050*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;  /* 0x0 */
        /*0060*/                   BRA 0xd0 ;                             /* 0x0000 */
        /*0070*/                   NOP ;                                  /* 0x0000 */
        /*0080*/                   LDG.E.U16 R6, desc[UR4][R4.64] ;       /* 0x0000 */
        /*0090*/                   LDG.E.U16 R7, desc[UR4][R4.64+0x2] ;   /* 0x0000 */
        /*00a0*/                   STS.U16 [R2], R6 ;                     /* 0x0000 */
        /*00b0*/                   STS.U16 [R2+0x2], R7 ;                 /* 0x0000 */
        /*00c0*/                   IADD3 R4, R4, 0x4, RZ ;                /* 0x0000 */
        /*00d0*/                   LDSM.16.M88.4 R8, [R3] ;               /* 0x0000 */
        /*00e0*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ; /* 0x0000 */
        /*00f0*/                   HMMA.16816.F32.BF16 R16, R8, R11, R16 ; /* 0x0000 */
        /*0100*/                   IADD3 R0, R0, 0x1, RZ ;                /* 0x0000 */
        /*0110*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x210], PT ; /* 0x0 */
        /*0120*/              @!P0 BRA 0x40 ;                             /* 0x0000 */
        /*0130*/                   MUFU.EX2 R20, R12 ;                    /* 0x0000 */
        /*0140*/               @P2 BRA 0x180 ;                            /* 0x0000 */
        /*0150*/                   MUFU.EX2 R21, R13 ;                    /* 0x0000 */
        /*0160*/                   FADD R20, R20, R21 ;                   /* 0x0000 */
        /*0170*/                   BRA 0x190 ;                            /* 0x0000 */
        /*0180*/                   MOV R20, RZ ;                          /* 0x0000 */
        /*0190*/                   STG.E desc[UR4][R2.64], R20 ;          /* 0x0000 */
        /*01a0*/                   EXIT ;                                 /* 0x0000 */
        /*01b0*/                   BRA 0x1b0;                             /* 0x0000 */
		..........
"""

PTXAS = """\
ptxas info    : 272 bytes gmem
ptxas info    : Compiling entry function '_Z6canned' for 'sm_90a'
ptxas info    : Function properties for _Z6canned
    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size, 13408 bytes smem
ptxas info    : Compile time = 1.0 ms
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z5other' for 'sm_90a'
ptxas info    : Function properties for _Z5other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
"""


def test_parse_sass_counts_and_predicates():
    funcs = kr.parse_sass(CANNED)
    assert list(funcs) == ["_Z6canned"]
    insts = funcs["_Z6canned"]
    assert len(insts) == 28
    assert insts[3].pred == "@P0" and insts[3].base == "EXIT" and insts[3].conditional
    assert insts[4].branch_target == 0x80 and insts[4].conditional
    assert insts[6].branch_target == 0xD0 and not insts[6].conditional
    call = kr.parse_sass("Function : f\n /*0010*/ @P0 CALL.REL.NOINC 0x40 ;\n /*0020*/ CALL.REL 0x80 ;\n")["f"]
    assert call[0].branch_target == 0x40 and call[0].conditional  # ptxas' loop exit
    assert call[1].branch_target is None  # a subroutine call returns: not a jump
    c = kr.count_ops(insts)
    assert (c["HMMA"], c["LDGSTS"], c["LDSM"], c["MUFU"], c["EX2"], c["MMA"]) == (2, 1, 1, 2, 2, 2)


def test_mainloop_and_hot_paths_of_canned_sass():
    insts = kr.parse_sass(CANNED)["_Z6canned"]
    loops = kr.find_loops(insts)
    ml = kr.find_mainloop(insts, loops)
    assert (insts[ml.start].addr, insts[ml.end].addr) == (0x40, 0x120)
    assert ml.size == 15
    hot = kr.hot_path(insts, ml.start, ml.end)
    # 0x40, 0x50 (LDGSTS), 0x60 (BRA), then 0xd0..0x120: the vector path, not the scalar one
    assert (hot.insts, hot.mma, hot.copies) == (9, 2, 2)
    worst = kr.hot_path(insts, ml.start, ml.end, worst=True)
    assert worst.insts == 12  # 0x40, 0x80..0x120 (the scalar path falls through)
    a = kr.analyze_function(insts)
    assert a["outer_kind"] == "exit" and a["main"].insts == 9 and a["main_static"] == 15
    # epilogue: 0x130..0x1a0 with the most MUFU.EX2: 0x130 0x140 0x150 0x160 0x170 0x190 0x1a0
    assert (a["epi"].insts, a["epi"].ex2) == (7, 2)
    # the function's hot path: 0x0..0x30, the loop once (9), the epilogue (7)
    assert a["func"].insts == 4 + 9 + 7
    # with one exponential per element (cap 1), the second MUFU.EX2 branch is no hotter:
    # 0x130 0x140 -> 0x180 0x190 0x1a0
    epi = kr.hot_path(insts, ml.end + 1, len(insts) - 1, ends_at_exit=True, ex2_cap=1)
    assert (epi.insts, epi.ex2) == (5, 1)


# An sm_90a consumer in cuobjdump -sass form: a class-tile loop [0x30, 0x1a0] unrolled by two
# (two k-block loops of 2 HGMMA, the second copy's look-ahead k-blocks straight-line), each
# mbarrier wait with ptxas' out-of-line retry stub after EXIT, which branches back behind the
# wait: backward branches that are no loops (the one back into 0x120 spans 4 HGMMA and no
# loop, so taking it for a loop makes it the "mainloop").
SM90_TILE_LOOP = """
		Function : _Z4sm90
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x80, PT ;
        /*0020*/              @!P0 EXIT ;
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2 ;
        /*0040*/              @!P1 BRA 0x1e0 ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0080*/               @P2 BRA 0x30 ;
        /*0090*/                   MUFU.EX2 R40, R24 ;
        /*00a0*/                   FADD R41, R40, R41 ;
        /*00b0*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8], R88 ;
        /*00c0*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8], R88, gsb0 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*00e0*/                   IADD3 R3, R3, 0x1, RZ ;
        /*00f0*/               @P2 BRA 0xb0 ;
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2 ;
        /*0110*/              @!P1 BRA 0x210 ;
        /*0120*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0160*/                   MUFU.EX2 R42, R88 ;
        /*0170*/                   FADD R41, R42, R41 ;
        /*0180*/                   IADD3 R5, R5, 0x2, RZ ;
        /*0190*/                   ISETP.GE.AND P3, PT, R5, R6, PT ;
        /*01a0*/              @!P3 BRA 0x30 ;
        /*01b0*/                   STG.E desc[UR4][R8.64], R41 ;
        /*01c0*/                   EXIT ;
        /*01d0*/                   BRA 0x1d0 ;
        /*01e0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2 ;
        /*01f0*/              @!P1 BRA 0x1e0 ;
        /*0200*/                   BRA 0x50 ;
        /*0210*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2 ;
        /*0220*/              @!P1 BRA 0x210 ;
        /*0230*/                   BRA 0x120 ;
"""


def test_retry_stubs_are_no_loops_and_an_unrolled_tile_loop_is_two_tiles():
    insts = kr.parse_sass(SM90_TILE_LOOP)["_Z4sm90"]
    addr = {i.addr: k for k, i in enumerate(insts)}
    loops = {(insts[lp.start].addr, insts[lp.end].addr) for lp in kr.find_loops(insts)}
    # the two k-block loops, the tile loop, the trailing self-branch, the stubs' retries;
    # not the stubs' branches back (0x50..0x200, 0x120..0x230)
    assert loops == {(0x30, 0x80), (0xB0, 0xF0), (0x30, 0x1A0), (0x1D0, 0x1D0),
                     (0x1E0, 0x1F0), (0x210, 0x220)}
    ml = kr.find_mainloop(insts)
    assert (insts[ml.start].addr, insts[ml.end].addr) == (0xB0, 0xF0)  # the smaller copy
    a = kr.analyze_function(insts)
    assert a["unroll"] == 2 and a["outer_kind"] == "loop"
    assert a["main"].insts == 5 and a["main"].mma == 2
    assert a["mma_flop"] == 2 * 64 * 128 * 16 / 4  # a warp's share of m64n128k16
    # the tile: the loop body's 24 instructions (8 HGMMA = 4 k-blocks, 2 MUFU.EX2) per copy
    assert (a["tile"].insts, a["tile"].mma, a["tile"].ex2) == (12, 4, 1)
    r = kr.KernelReport("m", "d", kr.KernelId("x_sm90", "bf16"), "x.cu", kr.Resources(),
                        kr.count_ops(insts), len(insts), **a)
    # beyond its k-blocks (4 HGMMA = 2 iterations of the 5-instruction mainloop): 12 - 10
    assert r.tile_extra == r.epi_insts == 2
    assert r.epi_per_elem == pytest.approx(2 / 64)
    # "all": the body's 24 instructions less 8 / 2 k-blocks of the 5-instruction loop, per copy
    assert a["epi_static"] == (24 - 4 * 5) / 2
    # outside the tiles: 0x0..0x20 and 0x1b0, 0x1c0 (the function's path holds both copies)
    assert r.cta_extra == a["func"].insts - 4 * 5 - 2 * 2 == 5
    assert r.k_per_iter() == 8 * 2 * 65536 / (2 * 128 * 128) == 32


def test_peeled_kblock_leaves_the_epilogue_of_a_one_tile_kernel():
    # the GEMM shape of bwd_gemm_sm90: a k-loop of one k-block (2 HGMMA), the last k-block
    # peeled after it, then the stores; the epilogue is the stores (and the exit)
    text = """
		Function : _Z4gemm
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0080*/                   STG.E.64 desc[UR4][R2.64], R24 ;
        /*0090*/                   EXIT ;
"""
    insts = kr.parse_sass(text)["_Z4gemm"]
    a = kr.analyze_function(insts)
    assert a["outer_kind"] == "exit" and a["main"].insts == 4
    assert (a["epi"].insts, a["epi"].mma) == (5, 2)
    r = kr.KernelReport("m", "d", kr.KernelId("g_sm90", "bf16"), "x.cu", kr.Resources(),
                        kr.count_ops(insts), len(insts), **a)
    assert r.epi_insts == 5 - 4  # the peeled k-block at the loop's 4 per k-block
    assert a["epi_static"] == 5 - 4
    assert r.tile_extra == 10 - 2 * 4 and r.cta_extra == 0


def test_parse_ptxas():
    res = kr.parse_ptxas(PTXAS)
    assert set(res) == {"_Z6canned", "_Z5other"}
    r = res["_Z6canned"]
    assert (r.registers, r.stack, r.spill_stores, r.spill_loads, r.smem) == (128, 16, 12, 20, 13408)
    assert (res["_Z5other"].registers, res["_Z5other"].smem) == (30, 0)


def test_kernel_id_from_demangled_names():
    k = kr.kernel_id("void margin_ops::cuda::(anonymous namespace)::fwd_main_kernel<__nv_bfloat16,"
                     " true, false>(margin_ops::cuda::(anonymous namespace)::FwdArgs<__nv_bfloat16>)")
    assert (k.name, k.dtype, k.sub, k.hard, k.label) == ("fwd_main", "bf16", True, False,
                                                         "fwd_main<bf16, K>1>")
    k = kr.kernel_id("void margin_ops::cuda::(anonymous namespace)::bwd_dx_kernel<margin_ops::cuda::"
                     "dev::Tf32>(margin_ops::cuda::(anonymous namespace)::DxArgs<margin_ops::cuda::dev::Tf32>)")
    assert (k.name, k.dtype, k.sub, k.hard) == ("bwd_dx", "tf32", False, False)


def test_kernel_id_of_the_sm90_forward_reads_its_one_flag_as_hard():
    k = kr.kernel_id("void margin_ops::cuda::dev::fwd_main_sm90_kernel<__half, true, margin_ops::"
                     "cuda::(anonymous namespace)::FwdArgs<__half>>(CUtensorMap, CUtensorMap, "
                     "margin_ops::cuda::(anonymous namespace)::FwdArgs<__half>)")
    assert (k.name, k.dtype, k.sub, k.hard) == ("fwd_main_sm90", "fp16", False, True)
    k = kr.kernel_id("void margin_ops::cuda::(anonymous namespace)::bwd_gemm_sm90_kernel<__nv_bfloat16, "
                     "margin_ops::cuda::(anonymous namespace)::DxSm90<__nv_bfloat16>>(CUtensorMap, "
                     "CUtensorMap, margin_ops::cuda::(anonymous namespace)::DxSm90<__nv_bfloat16>)")
    assert (k.name, k.dtype, k.sub, k.hard, k.label) == ("bwd_gemm_sm90", "bf16", False, False,
                                                         "bwd_gemm_sm90<bf16, DxSm90>")
    # the policy's tile width (c++filt's spelling, "> >"): its own model key; 128 keeps the
    # family's
    wide = kr.kernel_id("void margin_ops::cuda::(anonymous namespace)::bwd_gemm_sm90_kernel<"
                        "__half, margin_ops::cuda::(anonymous namespace)::DxSm90<__half, 256> >("
                        "CUtensorMap_st, CUtensorMap_st, margin_ops::cuda::(anonymous namespace)::"
                        "DxSm90<__half, 256>)")
    assert (wide.label, kr.model_key(wide)) == ("bwd_gemm_sm90<fp16, DxSm90, BN=256>",
                                                "bwd_gemm_sm90<DxSm90><BN=256>")
    narrow = kr.kernel_id("void ns::bwd_gemm_sm90_kernel<__half, ns::DxSm90<__half, 128>>(A, B)")
    assert kr.model_key(narrow) == "bwd_gemm_sm90<DxSm90>"
    assert [kr.instance_key("bwd_gemm_sm90<DxSm90>", d) for d in (128, 129, 320, 512)] == [
        "bwd_gemm_sm90<DxSm90>"] + ["bwd_gemm_sm90<DxSm90><BN=256>"] * 3


def _gated(dtype: str, hgmma: int = 8, spills: int = 0) -> "kr.KernelReport":
    return kr.KernelReport("m", "d", kr.KernelId("fwd_main_sm90", dtype), "x.cu",
                           kr.Resources(registers=168, spill_stores=spills, spill_loads=spills),
                           {"HGMMA": hgmma}, 100)


def test_gate_names_each_violation():
    fwd = ("fwd_main_sm90",)  # the family of _gated's reports (the default also gates others)
    assert kr.gate([_gated("bf16"), _gated("fp16")], fwd) == []
    assert kr.gate([_gated("bf16")], fwd) == ["fwd_main_sm90<fp16>: not in the build"]
    assert kr.gate([_gated("bf16", hgmma=0), _gated("fp16")], fwd) == [
        "fwd_main_sm90<bf16> (x.cu): no HGMMA"]
    assert kr.gate([_gated("bf16"), _gated("fp16", spills=4)], fwd) == [
        "fwd_main_sm90<fp16> (x.cu): spills 4/4 bytes (stores/loads)"]
    assert "bwd_tile_sm90<bf16>: not in the build" in kr.gate([_gated("bf16"), _gated("fp16")])


def test_dynamic_smem_mirrors_tile_gemm():
    bf = kr.KernelId("fwd_main", "bf16")
    assert kr.dynamic_smem(bf) == 3 * (128 * 40 + 128 * 40) * 2  # TileGemm<bf16, false, false>
    assert kr.dynamic_smem(kr.KernelId("bwd_dw", "bf16")) == 3 * (32 * 136 * 2) * 2
    assert kr.dynamic_smem(kr.KernelId("bwd_tile", "bf16", sub=True), subcenters=2) == 61440 + 1024


def test_gpu_shapes_read_from_contenders():
    shapes = kr.parse_gpu_shapes()
    assert shapes["ms1mv2"] == (512, 512, 85_742)
    assert shapes["1m-small-batch"] == (128, 512, 1_000_000)
    assert len(shapes) == 5


def test_launch_model_arithmetic():
    m = kr.Machine()
    # 264 CTAs -> 2 per SM; 8 warps x 1000 slots / 4 per clock = 2000 clk per CTA
    lm = kr.LaunchModel("x", 1, 264, 1000, 0, 0, 0)
    t, bound = lm.time(m)
    assert bound == "issue"
    assert t == pytest.approx(2 * 2000 / (m.clock_ghz * 1e9) + m.launch_us * 1e-6)
    # tensor: 2 CTAs of 2560 * 1000 FLOP at 2560 FLOP/clk (0.625 of 4096): 2000 clocks
    lm = kr.LaunchModel("y", 3, 264, 0, 2560 * 1000, 0, 0)
    t, bound = lm.time(m)
    assert bound == "tensor"
    assert t == pytest.approx(3 * (2000 / (m.clock_ghz * 1e9) + 3e-6))
    lm = kr.LaunchModel("z", 1, 1, 0, 0, 0, 3e9)  # 3 GB of HBM at 3 TB/s
    assert lm.time(m) == (pytest.approx(1e-3 + 3e-6), "HBM")


def _synthetic_report(name, main_insts, tile_insts):
    r = kr.KernelReport(name, name, kr.KernelId(name, "bf16"), "x.cu", kr.Resources(),
                        {k: 0 for k in (*kr.COUNTED, "MMA", "EX2")} | {"HMMA": 32}, 0,
                        mma_flop=2 * 16 * 8 * 16)  # m16n8k16
    r.main = kr.HotPath(main_insts, 32, 0, 0)
    r.tile = kr.HotPath(tile_insts, 32, 0, 0)
    r.func = kr.HotPath(tile_insts + 10, 32, 0, 0)
    r.epi = kr.HotPath(tile_insts - main_insts, 0, 0, 0)
    return r


def test_model_shape_counts_launches_and_work():
    reps = {k: _synthetic_report(k, 200, 2200) for k in ("fwd_main", "bwd_tile", "bwd_dw", "bwd_dx")}
    m = kr.Machine()
    res = kr.model_shape(reps, 512, 512, 1_000_000, m)
    lay = res["layout"]
    assert lay["cc"] == 16384 and lay["chunks"] == math.ceil(1_000_000 / 16384) == 62
    fwd = {x[0]: x for x in res["fwd"]}
    bwd = {x[0]: x for x in res["bwd"]}
    assert fwd["fwd_main"][1] == 1 and bwd["bwd_tile"][1] == 62 and bwd["bwd_dx"][1] == 62
    # forward: 4 row tiles x 66 splits; 7813 class tiles, 119 per split
    assert fwd["fwd_main"][2] == 4 * 66
    # tensor term of the forward: 2 CTAs per SM x 119 tiles x 2*128*128*512 FLOP at 2560/clk
    tensor = 2 * 119 * 2 * 128 * 128 * 512 / 2560 / (m.clock_ghz * 1e9)
    assert fwd["fwd_main"][5]["tensor"] == pytest.approx(tensor)
    # issue term: 8 warps x (10 fixed + 119 x (2000 + 16 iterations x 200)) / 4 per clock
    issue = 2 * 8 * (10 + 119 * (2000 + 16 * 200)) / 4 / (m.clock_ghz * 1e9)
    assert fwd["fwd_main"][5]["issue"] == pytest.approx(issue)
    assert res["useful_tflops"] == pytest.approx(6 * 512 * 512 * 1e6 / res["total_s"] / 1e12)


def _sm90_report(name, policy="", *, main_insts=200, hgmma=4, tile_insts=1000, tile_hgmma=8,
                 func_insts=1000, func_hgmma=8, unroll=1):
    r = kr.KernelReport(name, name, kr.KernelId(name, "bf16", policy=policy), "x.cu",
                        kr.Resources(),
                        {k: 0 for k in (*kr.COUNTED, "MMA", "EX2")} | {"HGMMA": func_hgmma}, 0,
                        unroll=unroll, mma_flop=2 * 64 * 128 * 16 / 4)
    r.main = kr.HotPath(main_insts, hgmma, 0, 0)
    r.tile = kr.HotPath(tile_insts, tile_hgmma, 0, 0)
    r.func = kr.HotPath(func_insts, func_hgmma, 0, 0)
    r.epi = r.tile
    return r


def _sm90_dx256_report():
    """bwd_gemm_sm90<DxSm90<·, 256>>: the _sm90_report figures with m64n256k16 (4 HGMMA per
    k-block of 64 for a 128 x 256 tile)."""
    r = _sm90_report("bwd_gemm_sm90", "DxSm90")
    r.kid = kr.KernelId("bwd_gemm_sm90", "bf16", policy="DxSm90", ints=(("BN", 256),))
    r.mma_flop = 2 * 64 * 256 * 16 / 4
    return r


def test_model_of_the_sm90_path_closed_form():
    # per k-block of 64: 4 HGMMA in 200 slots; a tile: 1000 slots with 2 k-blocks (8 HGMMA)
    # on its path, so 1000 - 2 * 200 = 600 beyond its k-blocks; fwd_main_sm90's loop holds
    # two tiles, its function path 2 tiles + 2 look-ahead k-blocks + 100 other slots
    reps = {
        "fwd_main_sm90": _sm90_report("fwd_main_sm90", unroll=2,
                                      func_insts=2 * 1000 + 2 * 200 + 100, func_hgmma=2 * 8 + 8),
        "bwd_tile_sm90": _sm90_report("bwd_tile_sm90", func_insts=1000 + 50),
        "bwd_gemm_sm90<DwSm90>": _sm90_report("bwd_gemm_sm90", "DwSm90"),
        "bwd_gemm_sm90<DxSm90><BN=256>": _sm90_dx256_report(),
    }
    r = reps["fwd_main_sm90"]
    assert (r.tile_extra, r.cta_extra, r.k_per_iter()) == (600, 100, 64)
    m = kr.Machine()
    clk = m.clock_ghz * 1e9
    res = kr.model_shape(reps, 512, 512, 1_000_000, m, path="sm_90a")
    fwd = {x[0]: x for x in res["fwd"]}
    bwd = {x[0]: x for x in res["bwd"]}
    # forward: fwd_main's grid, 4 row tiles x 66 splits of 119 class tiles, at 1 CTA per SM
    name, count, grid, t, bound, terms, _ = fwd["fwd_main_sm90"]
    assert (count, grid) == (1, 264)
    tile_slots = 600 + 512 // 64 * 200  # per warp: beyond the k-blocks + 8 k-blocks
    assert terms["issue"] == pytest.approx(2 * 8 * (100 + 119 * tile_slots) / 4 / clk)
    # HGMMA at the full 4096 FLOP/clk/SM
    assert terms["tensor"] == pytest.approx(2 * 119 * 2 * 128 * 128 * 512 / 4096 / clk)
    # per tile the epilogue issues 8 warps x 600 / 4 = 1200 clocks, 2 look-ahead k-blocks of
    # MMA (2 x 2*128*128*64 / 4096 = 1024 clocks) run under it: 176 exposed
    assert terms["exposed"] == pytest.approx(2 * 119 * (1200 - 1024) / clk)
    # x's row tile once per CTA, W's tile once per row tile and class tile
    assert terms["L2"] == pytest.approx((264 * 128 + 4 * 7813 * 128) * 512 * 2 / 5.5e12)
    assert terms["refill"] == pytest.approx(0.5e-6)  # the second CTA of the busiest SM
    assert t == pytest.approx(max(terms["issue"], terms["tensor"] + terms["exposed"],
                                  terms["L2"], terms["HBM"]) + 0.5e-6 + 3e-6)
    # backward: 16 MiB chunks of 16384 classes (62); bwd_tile_sm90 walks ceil(128 / 33) = 4
    # class tiles per CTA, grid 4 x 32, one per SM: serial epilogues, no refill
    assert (res["layout"]["cc"], res["layout"]["chunks"]) == (16384, 62)
    _, count, grid, _, _, terms, _ = bwd["bwd_tile_sm90"]
    assert (count, grid) == (62, 128)
    assert terms["exposed"] == pytest.approx(62 * 4 * 8 * 600 / 4 / clk)
    assert terms["refill"] == 0
    # dX: 128 x 256 tiles (D_pad = 512 >= 256), 16 splits (the 16 MiB partial budget: 1 MiB
    # each) of k_split = 1024 (a multiple of 64), grid 2 x 4 x 16
    assert (res["layout"]["dx_splits"], res["layout"]["k_split"]) == (16, 1024)
    assert reps["bwd_gemm_sm90<DxSm90><BN=256>"].k_per_iter() == 64
    _, count, grid, _, _, terms, _ = bwd["bwd_gemm_sm90<DxSm90><BN=256>"]
    assert grid == 128
    assert terms["issue"] == pytest.approx(62 * 8 * (600 + 1024 / 64 * 200) / 4 / clk)
    assert terms["tensor"] == pytest.approx(62 * 2 * 128 * 256 * 1024 / 4096 / clk)
    # L2: per CTA dS' 128 x 1024 and W 1024 x 256; the partials read and written
    assert terms["L2"] == pytest.approx(
        62 * (128 * (128 + 256) * 1024 * 2 + 2 * 16 * 512 * 512 * 4) / 5.5e12)
    # dW: 4 x 128 CTAs, 4 per SM: 3 refills per launch; W resident (16 + 16 MiB of L2): HBM
    # is dW's write only
    _, count, grid, _, _, terms, _ = bwd["bwd_gemm_sm90<DwSm90>"]
    assert grid == 512 and terms["refill"] == pytest.approx(62 * 3 * 0.5e-6)
    assert res["layout"]["w_resident"]
    assert terms["HBM"] == pytest.approx(62 * 16384 * 512 * 2 / 3e12)


def test_host_rules_mirrored():
    # Sm90Cfg::stages_for: bwd_tile_sm90 (4 KiB tail) keeps 4 ring stages up to D = 576, 3
    # from 577 (RESULTS.md); the forward keeps its required 4 up to D = 640
    assert kr.sm90_stages(576, kr.BWD_TILE_SM90_TAIL) == 4
    assert kr.sm90_stages(577, kr.BWD_TILE_SM90_TAIL) == 3
    assert kr.sm90_eligible(640, 2) == {"fwd_main": True, "bwd_tile": True, "bwd_dw": True,
                                        "bwd_dx": True}
    assert not kr.sm90_eligible(704, 2)["fwd_main"] and kr.sm90_eligible(704, 2)["bwd_dx"]
    assert kr.sm90_eligible(100, 2) == {"fwd_main": False, "bwd_tile": False, "bwd_dw": True,
                                        "bwd_dx": False}
    assert not any(kr.sm90_eligible(512, 4).values())
    # Backward::layout at N = 128: the 16 MiB budget gives 65536 classes; a cap rounds to 128
    lay = kr.backward_layout(128, 512, 1_000_000, 132, 2, True)
    assert (lay["cc"], lay["chunks"]) == (65536, 16)
    assert kr.backward_layout(128, 512, 1_000_000, 132, 2, True, cc_cap=30000)["cc"] == 29952
    # dX: 64 splits (the 16 MiB partial budget, 256 KiB each) of 30720 / 64 = 480 classes,
    # rounded up to the dX kernel's k-block: 512 for bwd_gemm_sm90<DxSm90> (60 splits of its
    # 2 tiles of 128 x 256), 480 for bwd_dx (64 splits of 4 tiles of 128 x 128)
    for sm90_dx, k_split, splits, bn in ((True, 512, 60, 256), (False, 480, 64, 128)):
        lay = kr.backward_layout(128, 512, 1_000_000, 132, 2, sm90_dx, cc_cap=30720)
        assert (lay["cc"], lay["k_split"], lay["dx_splits"]) == (30720, k_split, splits)
        assert (lay["dx_bn"], lay["dx_d_tiles"]) == (bn, 512 // bn)
    # D_pad = 128 keeps 128-wide dX tiles; D = 320 (D_pad 384): 2, the second partial
    assert kr.backward_layout(128, 128, 10**6, 132, 2, True)["dx_bn"] == 128
    assert kr.backward_layout(128, 320, 10**6, 132, 2, True)["dx_d_tiles"] == 2
    # the chunk rule: W chunk + dS' within 0.75 x 50 MiB: 39321600 / ((512 + 128) x 2)
    assert kr.chunk_rule(128, 512, kr.Machine()) == 30720
    assert kr.chunk_rule(512, 512, kr.Machine()) == 16384  # the budget's


TINY = r"""
// A known loop: 2 mma.sync.m16n8k16 (bf16) per iteration, not unrolled.
__global__ void tiny_mma(const unsigned* a, const unsigned* b, float* c, int n) {
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  unsigned a0 = a[threadIdx.x], a1 = a[threadIdx.x + 32], a2 = a[threadIdx.x + 64],
           a3 = a[threadIdx.x + 96], b0 = b[threadIdx.x], b1 = b[threadIdx.x + 32];
#pragma unroll 1
  for (int i = 0; i < n; ++i) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%9,%8}, {%0,%1,%2,%3};\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  c[threadIdx.x] = d0 + d1 + d2 + d3;
}
"""


def _have_tools():
    try:
        kr.find_tool("nvcc")
        kr.find_tool("cuobjdump")
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _have_tools(), reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_tiny_mma_loop_compiled(arch, tmp_path):
    src = tmp_path / "tiny.cu"
    src.write_text(TINY)
    c = kr.compile_one(src, arch, tmp_path / "cache", includes=[])
    reports = kr.report_kernels([c])
    assert len(reports) == 1
    r = reports[0]
    assert r.kid.name == "tiny_mma"
    assert r.counts["HMMA"] == 2 and r.counts["HGMMA"] == 0
    assert r.res.registers > 0 and r.res.spill_stores == 0
    # the loop body, independently: the one backward BRA of the listing (not the trailing
    # self-branch), its span in 16-byte instructions
    pairs = re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?P\d\s+)?BRA\s+0x([0-9a-f]+)", c.sass)
    back = [(int(a, 16), int(t, 16)) for a, t in pairs if int(t, 16) < int(a, 16)]
    assert len(back) == 1
    span = (back[0][0] - back[0][1]) // 16 + 1
    assert 4 <= span <= 16
    assert r.main.mma == 2 and r.main_static == span
    assert r.main.insts == span  # straight-line body: the hot path is all of it
    assert r.main_per_mma == pytest.approx(span / 2)
    assert r.outer_kind == "exit"


@pytest.mark.skipif(not _have_tools() and not os.environ.get("MARGIN_OPS_REQUIRE_EMULATOR"),
                    reason="needs nvcc and cuobjdump")  # CI (.ci/run) requires them
def test_sm90a_gemm_kernels_issue_hgmma_without_spills(capsys):
    """CI's gate on the real sources: tools/kernel_report.py --gate."""
    status = kr.main(["--gate"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith("PASS"), out


def test_fused_backward_kernel_id_and_shared_memory():
    k = kr.kernel_id("void margin_ops::cuda::dev::bwd_fused_sm90_kernel<__nv_bfloat16, true, 4>"
                     "(CUtensorMap, CUtensorMap, margin_ops::cuda::dev::TileArgs<__nv_bfloat16>, "
                     "__nv_bfloat16*)")
    assert (k.name, k.dtype, k.sub, k.hard, k.int_param("kDB")) == ("bwd_fused_sm90", "bf16",
                                                                    False, True, 4)
    assert k.label == "bwd_fused_sm90<bf16, hard, kDB=4>"
    assert kr.model_key(k) == "bwd_fused_sm90<kDB=4>"
    k1 = kr.kernel_id("void margin_ops::cuda::dev::bwd_fused_sm90_kernel<__half, false, 1>(...)")
    assert (k1.hard, k1.label) == (False, "bwd_fused_sm90<fp16, kDB=1>")
    # bwd_fused_smem_bytes: 1024 + (6 kDB + 2) 8 KiB blocks + sizeof(BwdFusedSm90Tail): 6
    # mbarriers, inv / nrm / coef (64 floats each), r[8][32], corr[2][2][64], MarginParams
    tail = 6 * 8 + 3 * 64 * 4 + 8 * 32 * 4 + 2 * 2 * 64 * 4 + 88
    assert tail == 2952
    assert kr.dynamic_smem(k) == 1024 + 26 * 8192 + tail == 216968  # 211.9 KiB, <= 227 KiB
    assert kr.dynamic_smem(k1) == 1024 + 8 * 8192 + tail == 69512
    assert [kr.fused_dw_blocks(d) for d in (64, 128, 192, 256, 320, 448, 512)] == [1, 1, 2, 2, 3,
                                                                                    4, 4]
    assert "bwd_fused_sm90" in kr.HGMMA_KERNELS
    assert "bwd_fused_sm90<bf16>: not in the build" in kr.gate([_gated("bf16"), _gated("fp16")])


# bwd_fused_sm90's row-tile loop in cuobjdump -sass form: the row factors, a wait that
# leaves a group in flight (no serial point), S (2 unrolled m64n32k16), the wait for all
# wgmmas, an epilogue with a branch, then dW (1 m64n256k16) left in flight at the back edge;
# a prologue before and the dW write after.
FUSED_LOOP = """
		Function : _Z5fused
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDS R2, [R0] ;
        /*0020*/                   LDG.E R3, desc[UR4][R8.64] ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/               @P1 BRA 0xa0 ;
        /*0080*/                   MUFU.EX2 R40, R24 ;
        /*0090*/                   FADD R41, R40, R41 ;
        /*00a0*/                   STG.E desc[UR4][R10.64], R24 ;
        /*00b0*/                   STS [R12], R24 ;
        /*00c0*/                   WARPGROUP.ARRIVE ;
        /*00d0*/                   HGMMA.64x256x16.F32.BF16 R88, gdesc[UR16].tnspA.tnspB, R88, gsb0 ;
        /*00e0*/               @!P0 BRA 0x20 ;
        /*00f0*/                   STG.E.128 desc[UR4][R14.64], R88 ;
        /*0100*/                   EXIT ;
        /*0110*/                   BRA 0x110 ;
"""


def test_fused_row_tile_loop_serial_segment_and_mixed_mma_flop():
    insts = kr.parse_sass(FUSED_LOOP)["_Z5fused"]
    a = kr.analyze_function(insts)
    ml = kr.find_mainloop(insts)
    assert (insts[ml.start].addr, insts[ml.end].addr) == (0x20, 0xE0)
    assert a["outer_kind"] == "exit" and a["main"].insts == 13 and a["main"].mma == 3
    # a warp's share of 2 x m64n32k16 + 1 x m64n256k16
    assert a["main_flop"] == (2 * 2 * 64 * 32 * 16 + 2 * 64 * 256 * 16) / 4
    # no MMA in flight from the wait (0x60) to before dW's first HGMMA (0xd0), the EX2 path
    assert (a["serial"].insts, a["serial"].ex2, a["serial"].mma) == (7, 1, 0)
    r = kr.KernelReport("m", "d", kr.KernelId("bwd_fused_sm90", "bf16", ints=(("kDB", 4),)),
                        "x.cu", kr.Resources(), kr.count_ops(insts), len(insts), **a)
    assert r.outside_main == 2 + 2  # 0x0, 0x10 before the loop; 0xf0, 0x100 after it
    # the k-loops of the other sm_90a kernels wait for older wgmmas only: no serial segment
    assert kr.analyze_function(kr.parse_sass(SM90_TILE_LOOP)["_Z4sm90"])["serial"] is None


def _fused_report(main_insts=900, serial_insts=400, outside=800):
    r = _sm90_report("bwd_fused_sm90", main_insts=main_insts, hgmma=36,
                     tile_insts=main_insts + outside, tile_hgmma=36,
                     func_insts=main_insts + outside, func_hgmma=36)
    r.kid = kr.KernelId("bwd_fused_sm90", "bf16", ints=(("kDB", 4),))
    r.main_flop = (32 * 2 * 64 * 32 * 16 + 4 * 2 * 64 * 256 * 16) / 4  # D = 512: S + dW
    r.serial = kr.HotPath(serial_insts, 0, 0, 16)
    return r


def test_model_of_the_fused_backward_closed_form():
    reps = {
        "fwd_main_sm90": _sm90_report("fwd_main_sm90"),
        "bwd_gemm_sm90<DxSm90><BN=256>": _sm90_dx256_report(),
        "bwd_fused_sm90<kDB=4>": _fused_report(),
    }
    m = kr.Machine()
    clk = m.clock_ghz * 1e9
    n, d, c = 512, 512, 1_000_000
    assert kr.path_applies(kr.FUSED_PATH, n, d, c, m)
    res = kr.model_shape(reps, n, d, c, m, path=kr.FUSED_PATH)
    bwd = {x[0]: x for x in res["bwd"]}
    assert [x[0] for x in res["bwd"]] == ["prep", "bwd_fused_sm90<kDB=4>",
                                          "bwd_gemm_sm90<DxSm90><BN=256>", "finalize"]
    # prep reads x and writes no x̂: n d 2 bytes of HBM
    assert bwd["prep"][5]["HBM"] == pytest.approx(n * d * 2 / 3e12)
    # 62 chunks of 16384 classes: 256 CTAs of 64 classes, each walking 8 row tiles; 2 per SM
    _, count, grid, t, bound, terms, _ = bwd["bwd_fused_sm90<kDB=4>"]
    assert (count, grid) == (62, 256)
    # per tile and CTA: 8 warps x 900 / 4 = 1800 issue clocks; 8 x 1048576 / 4096 = 2048
    # tensor clocks (4 x 64 x 64 x 512 FLOP); the epilogue 8 x 400 / 4 = 800 clocks exposed
    assert 8 * reps["bwd_fused_sm90<kDB=4>"].main_flop == 4 * 64 * 64 * 512
    assert terms["issue"] == pytest.approx(62 * 2 * 8 * (800 + 8 * 900) / 4 / clk)
    assert terms["tensor"] == pytest.approx(62 * 2 * 8 * 2048 / clk)
    assert terms["exposed"] == pytest.approx(62 * 2 * 8 * 800 / clk)
    # L2 per chunk: every CTA reads half of x (512 x 512 x 2 / 2: the 256 tiles pair up
    # into 2-CTA clusters that multicast each x tile) and 64 B of row factors per row; W's
    # 16384 x 512 x 2 once; dS' 512 x 16384 x 2 written; dW written once
    w = 16384 * 512 * 2
    l2 = 256 * 512 * (512 + 64) + w + 512 * 16384 * 2 + w
    assert terms["L2"] == pytest.approx(62 * l2 / 5.5e12)
    assert terms["HBM"] == pytest.approx(62 * 2 * w / 3e12)  # W read, dW written
    assert terms["refill"] == pytest.approx(62 * 0.5e-6)  # 256 CTAs on 132 SMs: 1 more each
    # time = max(issue, tensor + exposed, L2, HBM) + refill + launch: with x shared by the
    # cluster the tensor cores and the serial epilogue bound it (2 x 8 x (2048 + 800) clocks
    # per chunk against 20 us of L2)
    assert 2 * 8 * (800 + 8 * 900) / 4 < l2 / 5.5e12 * clk < 2 * 8 * (2048 + 800)
    assert bound == "tensor+epi"
    assert t == pytest.approx(62 * (2 * 8 * (2048 + 800) / clk + 0.5e-6 + 3e-6))
    # an odd grid (231 class tiles in one chunk) runs without clusters: x whole per CTA
    odd = {x[0]: x for x in kr.model_shape(reps, n, d, 64 * 231, m, path=kr.FUSED_PATH)["bwd"]}
    _, count, grid, _, _, terms, _ = odd["bwd_fused_sm90<kDB=4>"]
    w = 64 * 231 * 512 * 2
    assert (count, grid) == (1, 231)
    assert terms["L2"] == pytest.approx((231 * 512 * (1024 + 64) + w + 512 * 64 * 231 * 2 + w) / 5.5e12)
    assert res["launches"] == 1 + 1 + 1 + 1 + 2 * 62 + 1  # fwd: prep, main, combine


def test_fused_backward_eligibility_mirrored():
    m = kr.Machine()
    # Backward::sm90_fused: 8 ceil(min(cc, C) / 64) >= 7 x 132 = 924 tiles x 8
    assert kr.sm90_fused_eligible(512, 2, 7424, 132)  # 116 tiles: 928
    assert not kr.sm90_fused_eligible(512, 2, 7360, 132)  # 115 tiles: 920
    assert kr.sm90_fused_eligible(512, 2, 7 * 64, 8)  # 8 SMs: 7 tiles, 56 >= 56 exactly
    assert not kr.sm90_fused_eligible(512, 2, 6 * 64 + 64, 9)  # 9 SMs: 7 tiles, 56 < 63
    assert not kr.sm90_fused_eligible(512, 4, 65536, 132)  # fp32
    for d, ok in ((64, True), (192, True), (512, True), (576, False), (328, False), (32, False)):
        assert kr.sm90_fused_eligible(d, 2, 65536, 132) == ok
    # through the layout: N <= 1024 at D = 512 on 132 SMs (cc = 8192: 128 tiles; N = 1152:
    # cc = 7168, 112 tiles); few classes fail too
    assert kr.path_applies(kr.FUSED_PATH, 1024, 512, 1_000_000, m)
    assert not kr.path_applies(kr.FUSED_PATH, 1152, 512, 1_000_000, m)
    assert kr.path_applies(kr.FUSED_PATH, 128, 512, 7424, m)
    assert not kr.path_applies(kr.FUSED_PATH, 128, 512, 7360, m)
    assert kr.path_applies("sm_90a", 1152, 512, 1_000_000, m)
