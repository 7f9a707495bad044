"""The CUDA emulator's sm_90a instructions (tools/cuda_emulator: emulated_ptx.cuh, emulator.cpp)
checked on their own, through the probe kernels of tools/cuda_emulator/hopper_probe.cpp,
before any kernel uses them: wgmma.mma_async with shared-memory matrix descriptors in every
swizzle mode, K- and MN-major, A from shared memory or registers; wgmma.fence /
commit_group / wait_group; mbarrier phases with arrive / expect_tx / try_wait.parity and
bulk copies completing transaction bytes; the proxy fences (fence.proxy.async before a
wgmma reads generic stores, fence.mbarrier_init before a bulk copy completes on a fresh
mbarrier) and setmaxnreg's warpgroup rendezvous.

The operands are laid out, and the descriptors built, by a transcription written here of
CuTe's GMMA layout atoms and make_gmma_desc (cute/atom/mma_traits_sm90_gmma.hpp, CUTLASS
3.x), and the register fragments by its ALayout_64x16 / CLayout_64xN, as (shape, stride)
data; the results are compared with a plain matmul. A kernel that lays out its tiles the
way CuTe does therefore cannot share a misunderstanding with the emulator unless CuTe has
it too. The negative tests show the emulator failing on the mistakes a Hopper kernel makes:
no wgmma.fence, reading or writing accumulators before wgmma.wait_group, overwriting an
operand in flight, a descriptor with the wrong swizzle, an mbarrier wait on the wrong
phase, an expect_tx that never completes, a missing or misplaced proxy fence, a bulk or TMA
copy issued into an operand of a wgmma not yet retired, setmaxnreg by part of a warpgroup or
with differing counts; and clusters: TMA multicast and remote mbarrier arrivals between the
CTAs of a cluster, failing on a remote release above the wait_group, a peer's mbarrier used
before its init is published to the cluster, a CTA exiting before its peers' last access,
and a ctaMask outside the cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import cuda_emulator  # noqa: E402
from backends_under_test import _missing_emulator  # noqa: E402
from cute_layouts import cute_index  # noqa: E402

BF16, F16 = torch.bfloat16, torch.float16
_probe = None


@pytest.fixture(scope="module")
def probe():
    global _probe
    missing = _missing_emulator()  # raises where MARGIN_OPS_REQUIRE_EMULATOR is set (CI)
    if missing:
        pytest.skip(missing)
    if _probe is None:
        _probe = cuda_emulator.build_hopper_probe(TOOLS.parent / "build" / "cuda_emulator_hopper")
    return _probe


# ---------------------------------------------------------------------------------------
# CuTe, transcribed (layouts as (shape, stride) data: tests/cute_layouts.py).


def _swizzle(b, m, s, offset):
    """CuTe's Swizzle<B,M,S>: offset ^ ((offset & yyy_msk) >> S), yyy_msk = ((1<<B)-1) << (M+S).
    With smem_ptr_flag the GMMA atoms apply it to the shared-memory byte address."""
    yyy = ((1 << b) - 1) << (m + s)
    return offset ^ ((offset & yyy) >> s)


#: GMMA::Layout_{MN,K}_{INTER,SW32,SW64,SW128}_Atom_Bits: (Swizzle B, (shape), (stride)) in
#: bits, before upcast to the element type.
_ATOMS_BITS = {
    ("MN", "INTER"): (0, (128, 8), (1, 128)),
    ("MN", "SW32"): (1, (256, 8), (1, 256)),
    ("MN", "SW64"): (2, (512, 8), (1, 512)),
    ("MN", "SW128"): (3, (1024, 8), (1, 1024)),
    ("K", "INTER"): (0, (8, 128), (128, 1)),
    ("K", "SW32"): (1, (8, 256), (256, 1)),
    ("K", "SW64"): (2, (8, 512), (512, 1)),
    ("K", "SW128"): (3, (8, 1024), (1024, 1)),
}
#: LayoutType of the descriptor (GmmaDescriptor bits 62-63).
_LAYOUT_TYPE = {"INTER": 0, "SW128": 1, "SW64": 2, "SW32": 3}
_W = {"INTER": 1, "SW32": 2, "SW64": 4, "SW128": 8}


class SmemTile:
    """An (MN, K) operand tile of 16-bit elements at byte address ``base`` (1024-aligned):
    tile_to_shape(Layout_<major>_<swizzle>_Atom<16-bit>, (MN, K)), atoms repeated along MN
    first (CuTe's default column-major tile order)."""

    def __init__(self, major, swizzle, mn, k, base):
        b, (s0, s1), (d0, d1) = _ATOMS_BITS[(major, swizzle)]
        # upcast<16>: shapes and strides in bits / 16 (the stride-1 mode shrinks).
        self.atom_shape = (s0 // 16, s1) if major == "MN" else (s0, s1 // 16)
        self.atom_stride = (1, d1 // 16) if major == "MN" else (d0 // 16, 1)
        self.b, self.major, self.swizzle, self.mn, self.k, self.base = b, major, swizzle, mn, k, base
        assert mn % self.atom_shape[0] == 0 and k % self.atom_shape[1] == 0

    def offset(self, mn, k):
        """Element offset before the swizzle."""
        am, ak = self.atom_shape
        atom_size = am * ak
        within = (mn % am) * self.atom_stride[0] + (k % ak) * self.atom_stride[1]
        return within + ((mn // am) + (k // ak) * (self.mn // am)) * atom_size

    def address(self, mn, k):
        return _swizzle(self.b, 4, 3, self.base + 2 * self.offset(mn, k))

    def place(self, image, bits):
        for mn in range(self.mn):
            for k in range(self.k):
                image[self.address(mn, k) // 2] = bits[mn, k]

    def descriptor(self, kblock, layout_type=None):
        """make_gmma_desc<Major> of the (MN, 16) slice at k = 16 kblock, as CuTe's
        DescriptorIterator gives it: the slice's strides in 16-byte units (unswizzled),
        its start address >> 4 in bits 0-13, LBO 16-29, SBO 32-45, base offset 0, layout
        type 62-63."""
        u = lambda mn, k: 2 * self.offset(mn, k) // 16  # noqa: E731  (uint128_t units)
        w = _W[self.swizzle]
        if self.major == "K":
            sbo = u(8, 0)
            lbo = u(0, 8) if self.swizzle == "INTER" else 1
        else:
            stride_01, stride_11 = u(8 * w, 0) if self.mn > 8 * w else 0, u(0, 8)
            if self.swizzle == "INTER":
                stride_01 = u(8, 0)
                sbo, lbo = stride_01, stride_11
            else:
                sbo, lbo = stride_11, stride_01
        start = (self.base + 2 * self.offset(0, 16 * kblock)) >> 4
        layout = _LAYOUT_TYPE[self.swizzle] if layout_type is None else layout_type
        d = (start & 0x3FFF) | ((lbo & 0x3FFF) << 16) | ((sbo & 0x3FFF) << 32) | (layout << 62)
        return d - (1 << 64) if d >= 1 << 63 else d


# SM90::GMMA::CLayout_64xN and ALayout_64x16: (thread, value) -> index of the column-major
# 64 x N (resp. 64 x 16) matrix, m + 64 n.
def _c_layout(n):
    return ((4, 8, 4), (128, 1, 16)), ((2, 2, n // 8), (64, 8, 512))


_A_LAYOUT = (((4, 8, 4), (128, 1, 16)), ((2, 2, 2), (64, 8, 512)))


def _bits(t):
    return t.view(torch.int16)


def _run_wgmma(probe, dtype, n, a_tile, b_tile, *, a_regs=False, k=64, scale_d=1, scale_a=1, scale_b=1,
               mistake=0, b_layout_type=None, seed=0):
    """Random A (64 x k), B (n x k), C (64 x n); returns (D as the probe gives it, per
    (thread, value), and the same positions of A B^T + C computed by torch)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, k, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype)
    c = torch.randn(64, n, generator=g)
    size = max(a_tile.base + 2 * 64 * k, b_tile.base + 2 * n * k)
    image = torch.full((size // 2,), -1, dtype=torch.int16)
    b_tile.place(image, _bits(b))
    kblocks = k // 16
    if a_regs:
        regs = torch.zeros(kblocks, 128, 4, dtype=torch.int64)
        a_bits = _bits(a).long() & 0xFFFF
        (thr, val) = _A_LAYOUT
        for kb in range(kblocks):
            for t in range(128):
                for v in range(8):
                    idx = cute_index(*thr, t) + cute_index(*val, v)
                    regs[kb, t, v // 2] |= a_bits[idx % 64, 16 * kb + idx // 64] << (16 * (v % 2))
        regs = torch.where(regs >= 2**31, regs - 2**32, regs).int()
        desc_a = torch.zeros(kblocks, dtype=torch.int64)
    else:
        a_tile.place(image, _bits(a))
        regs = torch.zeros(0, dtype=torch.int32)
        desc_a = torch.tensor([a_tile.descriptor(kb) for kb in range(kblocks)], dtype=torch.int64)
    desc_b = torch.tensor([b_tile.descriptor(kb, b_layout_type) for kb in range(kblocks)], dtype=torch.int64)
    thr, val = _c_layout(n)
    pos = torch.tensor([[cute_index(*thr, t) + cute_index(*val, v) for v in range(n // 2)] for t in range(128)])
    rows, cols = pos % 64, pos // 64
    c_in = c[rows, cols]
    d = probe.probe_wgmma(0 if dtype == BF16 else 1, n, image, desc_a, desc_b, regs, c_in, scale_d,
                          int(a_tile.major == "MN"), int(b_tile.major == "MN"), scale_a, scale_b, mistake)
    want = (scale_a * scale_b) * (a.double() @ b.double().t()) + (c.double() if scale_d else 0)
    return d, want[rows, cols]


def _assert_matches(d, want):
    torch.testing.assert_close(d.double(), want, rtol=1e-5, atol=1e-5)


# (A major, A swizzle, B major, B swizzle, N, dtype): every swizzle mode on both operands,
# both majors, N from 8 to 256.
SS_CASES = [
    ("K", "SW128", "K", "SW128", 64, BF16),
    ("K", "SW128", "K", "SW128", 256, BF16),
    ("K", "SW64", "K", "SW32", 128, F16),
    ("K", "INTER", "K", "INTER", 64, BF16),
    ("K", "SW32", "K", "INTER", 8, F16),
    ("MN", "SW128", "MN", "SW128", 128, BF16),
    ("K", "SW128", "MN", "SW64", 64, F16),
    ("MN", "INTER", "MN", "SW32", 16, BF16),
    ("MN", "SW64", "K", "SW64", 256, BF16),
]


@pytest.mark.parametrize("am, asw, bm, bsw, n, dtype", SS_CASES,
                         ids=[f"A{c[0]}-{c[1]}_B{c[2]}-{c[3]}_n{c[4]}_{str(c[5])[6:]}" for c in SS_CASES])
def test_wgmma_ss_matches_cute_atoms(probe, am, asw, bm, bsw, n, dtype):
    """D = A B^T + C over four k-blocks (K = 64), A and B in shared memory as CuTe lays them
    out, C and D in CLayout_64xN's (thread, value) order."""
    a_tile = SmemTile(am, asw, 64, 64, base=0)
    b_tile = SmemTile(bm, bsw, n, 64, base=8192)
    _assert_matches(*_run_wgmma(probe, dtype, n, a_tile, b_tile))


@pytest.mark.parametrize("n", [64, 256])
def test_wgmma_rs_matches_cute_a_fragment(probe, n):
    """A from registers in ALayout_64x16's (thread, value) order, B K-major 128B-swizzled."""
    b_tile = SmemTile("K", "SW128", n, 64, base=0)
    _assert_matches(*_run_wgmma(probe, BF16, n, SmemTile("K", "SW128", 64, 64, base=0), b_tile, a_regs=True))


def test_wgmma_scale_flags_and_pipelined_groups(probe):
    """scale-d = 0 ignores C; imm-scale-a = -1 negates A; one commit group per k-block with
    wait_group<1> (the accumulators chained across groups in flight)."""
    a_tile, b_tile = SmemTile("K", "SW128", 64, 64, base=0), SmemTile("K", "SW128", 128, 64, base=8192)
    _assert_matches(*_run_wgmma(probe, BF16, 128, a_tile, b_tile, scale_d=0, scale_a=-1, mistake=6))


def test_wrong_swizzle_in_the_descriptor_gives_wrong_results(probe):
    """B laid out with the 128-byte swizzle but described as 64-byte (or none, or 32-byte):
    the products come out wrong (a kernel's comparison with the reference catches it)."""
    a_tile, b_tile = SmemTile("K", "SW128", 64, 64, base=0), SmemTile("K", "SW128", 64, 64, base=8192)
    for wrong in (0, 2, 3):
        d, want = _run_wgmma(probe, BF16, 64, a_tile, b_tile, b_layout_type=wrong)
        assert not torch.allclose(d.double(), want, rtol=1e-3, atol=1e-3), wrong


def test_missing_fence_fails(probe):
    """No wgmma.fence before the first wgmma, or none after a wait_group before the next
    (CUTLASS calls warpgroup_arrive, i.e. wgmma.fence, before every k-block's wgmmas)."""
    a_tile, b_tile = SmemTile("K", "SW128", 64, 64, base=0), SmemTile("K", "SW128", 64, 64, base=8192)
    for mistake in (1, 7):
        with pytest.raises(RuntimeError, match="without a wgmma.fence"):
            _run_wgmma(probe, BF16, 64, a_tile, b_tile, mistake=mistake)


def test_reading_accumulators_before_wait_group(probe):
    """Read before the wait: every value is NaN; with the operand fence (CUTLASS's
    warpgroup_fence_operand) before the wait, the launch fails."""
    a_tile, b_tile = SmemTile("K", "SW128", 64, 64, base=0), SmemTile("K", "SW128", 64, 64, base=8192)
    d, _ = _run_wgmma(probe, BF16, 64, a_tile, b_tile, mistake=2)
    assert torch.isnan(d).all()
    with pytest.raises(RuntimeError, match="read while a wgmma on them is in flight"):
        _run_wgmma(probe, BF16, 64, a_tile, b_tile, mistake=5)


def test_writing_accumulators_or_operands_in_flight_fails(probe):
    a_tile, b_tile = SmemTile("K", "SW128", 64, 64, base=0), SmemTile("K", "SW128", 64, 64, base=8192)
    with pytest.raises(RuntimeError, match="written before its wait_group"):
        _run_wgmma(probe, BF16, 64, a_tile, b_tile, mistake=3)
    with pytest.raises(RuntimeError, match="operand of an in-flight wgmma was overwritten"):
        _run_wgmma(probe, BF16, 64, a_tile, b_tile, mistake=4)


# ---------------------------------------------------------------------------------------
# mbarrier and bulk copies.


def test_mbarrier_phase_semantics(probe):
    """Step by step (PTX ISA, mbarrier): init(2); parity-0 wait pending, parity-1 passes
    (the phase before the first); two arrivals complete phase 0; expect_tx(64) holds phase 1
    open after both arrivals until the bulk copy's 64 bytes land, which only a wait makes
    happen (the destination reads as 0xff bytes until then); then phase 2 is pending."""
    src = torch.arange(16, dtype=torch.float32) + 0.5
    log, landed = probe.probe_mbarrier_semantics(src)
    assert log.tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 0]
    assert torch.equal(landed, src)


def _pipeline_data(iters=7, chunk=96):
    return torch.randint(-50, 50, (iters, chunk)).float()  # integer sums: exact in any order


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_mbarrier_pipeline_under_every_schedule(probe, schedule):
    """A 2-stage ring: producer lane waits `empty` (parity phase ^ 1), arrive.expect_tx +
    bulk copy on `full`; consumer warp waits `full` (parity phase), reads, arrives on
    `empty`. Seven iterations: every stage's phases wrap more than once."""
    data = _pipeline_data()
    probe.set_schedule(schedule)
    try:
        out = probe.probe_pipeline(data, 2, 0, 0, 0)
    finally:
        probe.set_schedule(0)
    assert torch.equal(out, data.sum(1))


def test_consumer_waiting_on_the_wrong_phase_fails(probe):
    """Parity flipped on `full`: the first wait passes at once (parity 1 names the phase
    before the first, complete), the consumer reads a stage whose copy has not landed (NaN)
    and frees it early; the producer then arrives on a `full` phase whose arrival is already
    in (its bytes outstanding), which the emulator reports."""
    with pytest.raises(RuntimeError, match="mbarrier.arrive.*a wait on the wrong phase"):
        probe.probe_pipeline(_pipeline_data(), 2, 1, 0, 0)


def test_producer_waiting_on_the_wrong_phase_deadlocks(probe):
    """Parity flipped on `empty`: the producer waits for a phase no one completes; the
    emulator reports a deadlock instead of hanging."""
    with pytest.raises(RuntimeError, match="deadlock.*at mbarrier waits"):
        probe.probe_pipeline(_pipeline_data(), 2, 0, 1, 0)


def test_expect_tx_larger_than_the_copy_deadlocks(probe):
    with pytest.raises(RuntimeError, match="deadlock"):
        probe.probe_pipeline(_pipeline_data(), 2, 0, 0, 16)


# ---------------------------------------------------------------------------------------
# TMA: 2-D tensor maps. The box as it lands must be exactly CuTe's K-major atom layout of
# the same swizzle (the layout a wgmma descriptor of that swizzle reads, checked above).


@pytest.mark.parametrize("swizzle, box0", [(128, 64), (64, 32), (32, 16), (0, 24)])
def test_tma_box_lands_in_the_cute_atom_layout(probe, swizzle, box0):
    """A box of box0 x 16 bf16 at (x, y) = (56, 30) of a 40 x 100 tensor: partly outside the
    tensor on both dimensions (those elements land as zeros), rows in CuTe's
    Layout_K_<swizzle>_Atom order (no swizzle: plain rows, box0 elements apart)."""
    rows, cols, box1, x, y = 40, 100, 16, 56, 30
    tensor = torch.randint(-30000, 30000, (rows, cols + 4), dtype=torch.int16)[:, :cols]  # 208-byte rows
    image = probe.probe_tma(tensor, box0, box1, x, y, swizzle)
    want = torch.zeros(box1, box0, dtype=torch.int16)
    inside = tensor[y:y + box1, x:x + box0]
    want[:inside.shape[0], :inside.shape[1]] = inside
    assert (want == 0).any() and (want != 0).any()
    if swizzle == 0:
        expected = want.reshape(-1)
    else:
        tile = SmemTile("K", {128: "SW128", 64: "SW64", 32: "SW32"}[swizzle], box1, box0, base=0)
        expected = torch.full((box0 * box1,), -1, dtype=torch.int16)
        tile.place(expected, want)
    assert torch.equal(image, expected)


# ---------------------------------------------------------------------------------------
# Proxies: shared memory written through the generic proxy (stores, cp.async) must be made
# visible to the async proxy (wgmma operands) by fence.proxy.async; bytes landed by bulk /
# TMA copies (async proxy) need no fence. Modes: hopper_probe.cpp's ProxyCase.

PROXY_CORRECT = {0: "stores_fenced_by_writers", 1: "stores_fenced_by_reader_after_barrier", 2: "bulk_copy_landed"}
PROXY_MISTAKES = {3: "stores_unfenced", 4: "fence_before_stores", 5: "store_after_bulk_copy", 6: "cp_async_unfenced"}


def _run_proxy(probe, mode, schedule=0):
    """One m64n8k16 bf16 wgmma on A (64 x 16) and B (8 x 16), K-major without swizzle,
    placed in shared memory as `mode` says; returns (D per (thread, value), A B^T there)."""
    g = torch.Generator().manual_seed(mode)
    a = torch.randn(64, 16, generator=g).to(BF16)
    b = torch.randn(8, 16, generator=g).to(BF16)
    a_tile, b_tile = SmemTile("K", "INTER", 64, 16, base=0), SmemTile("K", "INTER", 8, 16, base=2048)
    image = torch.zeros(2304 // 2, dtype=torch.int16)
    a_tile.place(image, _bits(a))
    b_tile.place(image, _bits(b))
    probe.set_schedule(schedule)
    try:
        d = probe.probe_proxy(image, a_tile.descriptor(0), b_tile.descriptor(0), mode, b_tile.address(0, 0) // 2)
    finally:
        probe.set_schedule(0)
    thr, val = _c_layout(8)
    pos = torch.tensor([[cute_index(*thr, t) + cute_index(*val, v) for v in range(4)] for t in range(128)])
    return d, (a.double() @ b.double().t())[pos % 64, pos // 64]


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", list(PROXY_CORRECT), ids=list(PROXY_CORRECT.values()))
def test_fenced_or_async_landed_operands_pass(probe, mode, schedule):
    """Stores then fence.proxy.async by every writer, or by one thread after a barrier that
    orders the stores before it; or operands landed by a bulk copy, read after the mbarrier
    wait with no fence: the wgmma reads them, under every schedule."""
    _assert_matches(*_run_proxy(probe, mode, schedule))


@pytest.mark.parametrize("mode", list(PROXY_MISTAKES), ids=list(PROXY_MISTAKES.values()))
def test_generic_writes_read_by_wgmma_without_proxy_fence_fail(probe, mode):
    """Stores, __syncthreads and the wgmma with no fence.proxy.async (the typical mistake);
    the fence before the stores; a store into a bulk-landed operand after its wait; cp.async
    (a generic-proxy write, PTX ISA) waited for but not fenced: the wgmma fails, naming
    the operand element and its shared address."""
    with pytest.raises(RuntimeError, match=r"wgmma.mma_async reads operand [AB] element .* shared address \d+, "
                       r"written through the generic proxy .* fence.proxy.async"):
        _run_proxy(probe, mode)


@pytest.mark.parametrize("mode", [0, 1], ids=["fence_mbarrier_init", "fence_proxy_async"])
def test_mbarrier_init_made_visible_to_the_async_proxy(probe, mode):
    src = torch.arange(16, dtype=torch.float32) - 3.25
    assert torch.equal(probe.probe_mbarrier_init(src, mode), src)


@pytest.mark.parametrize("mode", [2, 3], ids=["no_fence", "fence_before_init"])
def test_bulk_copy_on_an_unfenced_mbarrier_init_fails(probe, mode):
    """A bulk copy completing on an mbarrier with no fence.mbarrier_init (or
    fence.proxy.async) between its mbarrier.init and the copy fails at the copy."""
    with pytest.raises(RuntimeError, match="cp.async.bulk: its mbarrier was initialised without a fence.mbarrier_init"):
        probe.probe_mbarrier_init(torch.zeros(16), mode)


# ---------------------------------------------------------------------------------------
# A bulk or TMA copy issued into shared memory that an in-flight wgmma reads (modes:
# hopper_probe.cpp's ReleaseCase). The copy may land at any time after its issue, so the
# wgmma must be retired by a wait_group ordered before the issue (here: the consumer's
# arrival on `empty`, which the producer waits for). The emulator lands copies only when
# their mbarrier is waited on, after the wait_group in the emulated execution, so only a
# check at the issue, against what the issuing thread knows to be retired, can see it.


def _run_refill(probe, mode, tma, schedule=0):
    """Two (A 64 x 16, B 8 x 16) images, K-major without swizzle, copied one after the other
    into one buffer; returns (D of each image per (thread, value), A B^T of each there)."""
    g = torch.Generator().manual_seed(7)
    a_tile, b_tile = SmemTile("K", "INTER", 64, 16, base=0), SmemTile("K", "INTER", 8, 16, base=2048)
    images = torch.zeros(2, 2304 // 2, dtype=torch.int16)
    products = []
    for i in range(2):
        a, b = torch.randn(64, 16, generator=g).to(BF16), torch.randn(8, 16, generator=g).to(BF16)
        a_tile.place(images[i], _bits(a))
        b_tile.place(images[i], _bits(b))
        products.append(a.double() @ b.double().t())
    probe.set_schedule(schedule)
    try:
        d = probe.probe_refill(images, a_tile.descriptor(0), b_tile.descriptor(0), mode, tma)
    finally:
        probe.set_schedule(0)
    thr, val = _c_layout(8)
    pos = torch.tensor([[cute_index(*thr, t) + cute_index(*val, v) for v in range(4)] for t in range(128)])
    return d, torch.stack([p[pos % 64, pos // 64] for p in products])


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "bulk"])
def test_copy_into_a_buffer_released_after_wait_group_passes(probe, tma, schedule):
    """The consumer arrives on `empty` after the wait_group that retires the wgmma reading the
    buffer; the producer's second copy into it then passes under every schedule, and each
    wgmma reads its own image."""
    _assert_matches(*_run_refill(probe, 0, tma, schedule))


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "bulk"])
def test_copy_into_an_in_flight_wgmma_operand_fails(probe, tma, schedule):
    """The consumer arrives on `empty` between its commit_group and its wait_group (the
    release moved above the wait): the producer's copy into the buffer fails at its issue,
    under every schedule, naming the bytes, the warpgroup and the wgmma; so does the
    consumer's own copy into the buffer before its wait_group."""
    copy = r"TMA copy \(cp.async.bulk.tensor\)" if tma else r"bulk copy \(cp.async.bulk\)"
    for mode in (1, 2):
        with pytest.raises(RuntimeError, match=copy + r" into shared memory bytes \[0, 2304\) read by an in-flight "
                           r"wgmma of warpgroup 0 \(its wgmma.mma_async #1 in this block, operand A, not retired by "
                           r"a wgmma.wait_group ordered before this copy"):
            _run_refill(probe, mode, tma, schedule)


# ---------------------------------------------------------------------------------------
# Clusters (modes: hopper_probe.cpp's ClusterCase). Two CTAs launched as one cluster
# (cudaLaunchKernelEx, cudaLaunchAttributeClusterDimension) share each image: each CTA's
# producer loads one half with a TMA multicast to both (ctaMask 0b11), so each CTA's `full`
# completes only with the peer's bytes too, and each CTA's `empty` counts the consumers of
# both CTAs (remote arrivals through mapa). The CTAs of a cluster must run together for this
# to make progress; the emulator then fails on a remote release placed above the wait_group
# (the peer's multicast overwrites an operand in flight), on a peer's mbarrier used before
# its init is published to the cluster (fence.mbarrier_init.release.cluster, then a cluster
# barrier), on a CTA exiting while a peer may still arrive on its mbarrier (no final cluster
# barrier), and on a ctaMask naming a CTA outside the cluster.


def _run_cluster(probe, mode, schedule=0, clusters=2):
    """Returns (D per CTA rank and image per (thread, value), A B^T of each image there, ids)."""
    g = torch.Generator().manual_seed(11)
    a_tile, b_tile = SmemTile("K", "INTER", 64, 16, base=0), SmemTile("K", "INTER", 8, 16, base=2048)
    images = torch.zeros(2, 2304 // 2, dtype=torch.int16)
    products = []
    for i in range(2):
        a, b = torch.randn(64, 16, generator=g).to(BF16), torch.randn(8, 16, generator=g).to(BF16)
        a_tile.place(images[i], _bits(a))
        b_tile.place(images[i], _bits(b))
        products.append(a.double() @ b.double().t())
    probe.set_schedule(schedule)
    try:
        d, ids = probe.probe_cluster(images, a_tile.descriptor(0), b_tile.descriptor(0), mode, clusters)
    finally:
        probe.set_schedule(0)
    thr, val = _c_layout(8)
    pos = torch.tensor([[cute_index(*thr, t) + cute_index(*val, v) for v in range(4)] for t in range(128)])
    want = torch.stack([p[pos % 64, pos // 64] for p in products])
    return d, torch.stack([want, want]), ids


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_cluster_multicast_with_remote_releases_passes(probe, schedule):
    """Both CTAs of the last of two clusters see their cluster ids, and each computes A B^T of
    each image from the halves multicast by both producers, under every schedule: the data
    lands at the same CTA-relative offset in both CTAs, each CTA's mbarrier gets the bytes,
    and the CTAs of a cluster run together (a producer waits for the peer's consumers)."""
    d, want, ids = _run_cluster(probe, 0, schedule)
    _assert_matches(d, want)
    assert ids.tolist() == [[2, 0, 2, 1], [3, 1, 2, 1]]


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_multicast_into_a_peer_buffer_released_before_its_wait_group_fails(probe, schedule):
    """Each consumer releases the buffer on the PEER's `empty` between its commit_group and
    its wait_group (its own `empty` after the wait): a producer's multicast of the second image
    into the peer CTA fails at its issue, naming that CTA's in-flight wgmma, under every
    schedule (happens-before carried through remote arrivals, not the emulated order)."""
    with pytest.raises(RuntimeError, match=r"TMA multicast copy \(cp.async.bulk.tensor .multicast::cluster\) into "
                       r"shared memory bytes \[\d+, \d+\) read by an in-flight wgmma of warpgroup 0 of CTA rank [01] "
                       r"\(its wgmma.mma_async #1 in that CTA, operand A, not retired by a wgmma.wait_group ordered "
                       r"before this copy"):
        _run_cluster(probe, 1, schedule)


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", [2, 3], ids=["no_fence_mbarrier_init", "no_cluster_sync_after_init"])
def test_remote_use_of_an_unpublished_mbarrier_fails(probe, mode, schedule):
    """A peer's mbarrier used (remote arrive or multicast complete_tx) with only a
    fence.proxy.async after its init, or with fence.mbarrier_init but no cluster barrier
    between it and the use, fails under every schedule (when the peer has not even run its
    init yet in the emulated order, as not initialised)."""
    published = (r"has had no fence.mbarrier_init.release.cluster since its mbarrier.init" if mode == 2 else
                 r"(is initialised and fenced, but that fence is not ordered before this remote use"
                 r"|mbarrier not initialised \(mbarrier.init\) in CTA rank [01])")
    with pytest.raises(RuntimeError, match=published):
        _run_cluster(probe, mode, schedule)


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_cta_exiting_before_a_peer_access_fails(probe, schedule):
    """Without the final cluster barrier a CTA may exit while its peer's consumers still
    arrive on its `empty`: the exit fails (or, when the emulated order runs the exit first,
    the late arrive into the exited CTA), under every schedule."""
    with pytest.raises(RuntimeError, match=r"(exits while CTA rank [01] may still access its shared memory"
                       r"|into the shared memory of CTA rank [01] of the cluster, which has exited)"):
        _run_cluster(probe, 4, schedule)


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_cta_exiting_before_a_peer_access_is_ordered_fails(probe, schedule):
    """The consumers arrive on the final cluster barrier before their last remote release
    (arrive, release, wait): in the emulated order the release always comes before the peer
    resumes from the barrier and exits, but it is not ordered before that exit, which fails
    under every schedule (happens-before, not the emulated order)."""
    with pytest.raises(RuntimeError, match=r"exits while CTA rank [01] may still access its shared memory: a remote "
                       r"mbarrier arrive or multicast copy into it is not ordered before the exit"):
        _run_cluster(probe, 6, schedule)


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_cta_exiting_with_a_copy_in_flight_into_it_fails(probe, schedule):
    """The producers multicast a third image that no consumer waits for: a CTA whose last
    thread exits with that copy (its own or the peer's half) still in flight fails, under every
    schedule."""
    with pytest.raises(RuntimeError, match=r"the last thread of CTA rank [01] of the cluster exits with a bulk / TMA "
                       r"copy still in flight into its shared memory"):
        _run_cluster(probe, 7, schedule)


def test_multicast_mask_outside_the_cluster_fails(probe):
    """A ctaMask naming rank 2 of a 2-CTA cluster fails at the issue."""
    with pytest.raises(RuntimeError, match=r"ctaMask 0x7 names CTA rank 2, outside the cluster of 2 CTAs"):
        _run_cluster(probe, 5)


# ---------------------------------------------------------------------------------------
# setmaxnreg: a .sync.aligned warpgroup-wide instruction (modes: hopper_probe.cpp's RegsCase).


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_setmaxnreg_by_whole_warpgroups_passes(probe, schedule):
    """Warp specialisation: the producer warpgroup decreases to 40, the consumer increases
    to 232, each as a whole warpgroup; also the extreme counts 24 and 256."""
    probe.set_schedule(schedule)
    try:
        assert probe.probe_setmaxnreg(0, 0).eq(1).all()
        for regs in (24, 256):
            assert probe.probe_setmaxnreg(3, regs).eq(1).all()
    finally:
        probe.set_schedule(0)


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_setmaxnreg_by_one_warp_fails(probe, schedule):
    """Only the producer warp executes setmaxnreg, the rest of its warpgroup exits: whether
    they exit before it (warps descending) or while it waits, the launch fails."""
    probe.set_schedule(schedule)
    try:
        with pytest.raises(RuntimeError, match="setmaxnreg.dec in a warpgroup with exited threads|"
                           "a thread exited while its warpgroup waits at a warpgroup-wide instruction"):
            probe.probe_setmaxnreg(1, 0)
    finally:
        probe.set_schedule(0)


def test_setmaxnreg_with_differing_counts_fails(probe):
    """Warp 0 asks for 40 registers, the other warps of its warpgroup for 48."""
    with pytest.raises(RuntimeError, match="setmaxnreg.dec: threads of one warpgroup give different register counts"):
        probe.probe_setmaxnreg(2, 0)


@pytest.mark.parametrize("regs", [16, 100, 264])
def test_setmaxnreg_count_out_of_range_fails(probe, regs):
    with pytest.raises(RuntimeError, match=f"setmaxnreg.(inc|dec): register count {regs} is not a multiple of 8"):
        probe.probe_setmaxnreg(3, regs)


def test_setmaxnreg_beside_a_wgmma_fails(probe):
    """Half a warpgroup at setmaxnreg, the other half at a wgmma: the rendezvous refuses
    to mix warpgroup-wide instructions."""
    with pytest.raises(RuntimeError, match="warpgroup divergence: threads of one warpgroup at different warpgroup-wide"):
        probe.probe_setmaxnreg(4, 0)
