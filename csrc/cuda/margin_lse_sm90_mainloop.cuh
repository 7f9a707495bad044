// The sm_90a engine of the cosine tiles, shared by the forward's fwd_main_sm90_kernel
// (margin_lse_forward_sm90.cu) and the backward's bwd_tile_sm90_kernel
// (margin_lse_bwd_tile_sm90.cu), bf16 / fp16: a CTA keeps x's 128-row tile resident in
// shared memory and walks a contiguous range of 128-class tiles of W, each tile's products
// x_i · w_c (fp32) landing in the wgmma accumulators of two consumer warpgroups, with the
// tile's 1 / ‖w_c‖ computed from the same shared-memory W stages. The kernels differ only in
// their epilogues.
//
//   * 384 threads = 3 warpgroups. Warpgroup 0 is the producer (setmaxnreg.dec to 40
//     registers; one thread issues every TMA copy, the others exit). Warpgroups 1 and 2 are
//     consumers (setmaxnreg.inc to 232), each owning 64 of the CTA's 128 rows and all 128
//     columns of a class tile: one wgmma.m64n128k16 accumulator (64 fp32 per thread, mapped
//     by WgmmaFrag).
//   * Shared memory (dynamic, from a 1024-byte boundary): x's row tile, 128 rows x D, as
//     ceil(D / 64) k-blocks of 128 x 64 elements (16 KiB each), loaded once by TMA and kept
//     for the whole class walk; a ring of `stages` W tiles (128 classes x 64, 16 KiB each);
//     all 128B-swizzled (the TMA box's inner dimension is the 128-byte swizzle span), read
//     by wgmma through K-major descriptors (SBO 1024 bytes = 8 rows of 128 bytes; a 16-wide
//     k step advances the start address by 32 bytes). TMA zero-fills rows past n or C and
//     columns past D, so partial tiles need no masking in the GEMM. Then the mbarriers, the
//     two 1 / ‖w‖ buffers and the kernel's own tail (Sm90Smem).
//   * Synchronisation by mbarriers: x_full (the x tile landed), full[s] / empty[s] per ring
//     stage (TMA bytes landed / 256 consumer arrivals: the stage's wgmmas completed and its
//     W norms read), norms[2] (the tile's 1 / ‖w_c‖ written, 256 arrivals; double-buffered,
//     so a consumer passing tile t's barrier knows every consumer finished tile t - 1's
//     epilogue, the reader of the buffer tile t + 1 writes).
//   * Per k-block (issue_kblock): wait full, wgmma.fence, 4 wgmma (k16) into the accumulators
//     (the tile's first with scale-d 0), commit; then, while they run, the W norms from the
//     same stage (two threads per class, each 64 bytes of the 128-byte row, rotated by class
//     so that 8 consecutive lanes read 8 distinct 16-byte bank groups; the swizzle only
//     permutes a row's 16-byte chunks, so the row sum is unchanged); then wait_group 1 and
//     release the stages of the k-blocks before it.
//   * A tile is issued in two parts, begin<kAhead>() (its first kAhead k-blocks, no wait)
//     and finish() (the rest, then wait_group 0 and the last releases), so that a caller
//     can run the previous tile's epilogue on a second accumulator set in between, while
//     the tensor cores work: the forward does (kAhead = 2, margin_lse_forward_sm90.cu, where
//     the schedule and its SASS estimate are); bwd_tile_sm90 keeps the serial schedule,
//     products() = begin<0>() + finish(). The k-blocks, their order and the W norms' sums
//     are the same either way, so are the products' bits.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "margin_lse_dtype.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_ptx.cuh"
#include "margin_lse_tile_gemm.cuh"  // WeightNorm::sq16
#include "margin_lse_wgmma_desc.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

struct Sm90Cfg : Sm90WarpRoles {
  static constexpr int BM = 128, BN = 128;
  static constexpr int kMaxStages = 4;  // W ring
  static constexpr int kBlockBytes = BM * BK * 2;  // one x k-block or one W stage (16 KiB)
  static_assert(BN * BK * 2 == kBlockBytes, "W stage = x k-block");
  static constexpr size_t kMaxSmem = 227 * 1024;
  // After the tiles: x_full, full[S], empty[S], norms[2] (S = kMaxStages: a ring of fewer
  // stages leaves some unused), the two 1 / ‖w‖ buffers, then the kernel's tail (16-aligned).
  static constexpr int kBarriers = 1 + 2 * kMaxStages + 2;
  static constexpr size_t kEngineTail = (kBarriers * 8 + 2 * BN * sizeof(float) + 15) / 16 * 16;

  static constexpr int64_t k_blocks(int64_t d) { return (d + BK - 1) / BK; }
  // Dynamic shared memory for feature dimension d, a ring of `stages` and a kernel tail of
  // tail_bytes (1024 bytes of alignment slack first).
  static constexpr size_t smem_bytes(int64_t d, int stages, size_t tail_bytes) {
    return 1024 + size_t(k_blocks(d) + stages) * kBlockBytes + kEngineTail + tail_bytes;
  }
  // The deepest ring (<= kMaxStages) that fits; < 2 when none with two stages does.
  static constexpr int stages_for(int64_t d, size_t tail_bytes) {
    int s = kMaxStages;
    while (s > 0 && smem_bytes(d, s, tail_bytes) > kMaxSmem) --s;
    return s;
  }
};

// The wgmma m64nN accumulator fragment of one warp of a consumer warpgroup (the fragment
// mapping of margin_lse_epilogue.cuh): thread 4g + q of the warp holds d[i] at row
// g + 8·((i / 2) % 2) of the warp's 16 rows, column 8·(i / 4) + 2q + i % 2; ri = (i / 2) % 2,
// ci = 2·(i / 4) + i % 2 (so columns ci and ci + 1, ci even, are adjacent: kPairCols).
// kN: the wgmma's N (its kN / 2 accumulators per thread, TC = kN / 4 columns).
template <int kN>
struct WgmmaFragN {
  static constexpr int TR = 2, TC = kN / 4;
  static constexpr bool kPairCols = true;
  static __device__ __forceinline__ int row(int ri, int lane) { return (lane >> 2) + 8 * ri; }
  static __device__ __forceinline__ int col(int ci, int lane) {
    return (ci >> 1) * 8 + (lane & 3) * 2 + (ci & 1);
  }
  static __device__ __forceinline__ int col_quad(int col) { return (col >> 1) & 3; }
  static __device__ __forceinline__ float& at(float (&d)[kN / 2], int ri, int ci) {
    return d[(ci >> 1) * 4 + ri * 2 + (ci & 1)];
  }
  static __device__ __forceinline__ float at(const float (&d)[kN / 2], int ri, int ci) {
    return d[(ci >> 1) * 4 + ri * 2 + (ci & 1)];
  }
};
using WgmmaFrag = WgmmaFragN<128>;  // m64n128k16

// The engine's shared memory, carved from the kernel's dynamic shared memory.
struct Sm90Smem {
  unsigned char* sx;  // [k-block][128 rows][64], swizzled
  unsigned char* sw;  // [stage][128 classes][64], swizzled
  uint64_t* x_full;   // 1
  uint64_t* full;     // [kMaxStages]
  uint64_t* empty;    // [kMaxStages]
  uint64_t* norms;    // [2]
  float* inv;         // [2][BN]: 1 / max(‖w_c‖, eps) of the tile, buffer t % 2
  unsigned char* tail;  // the kernel's own (16-byte aligned)

  static __device__ __forceinline__ Sm90Smem carve(unsigned char* raw, int kb_count, int stages) {
    using G = Sm90Cfg;
    Sm90Smem m;
    m.sx = raw + ((1024 - (smem_addr(raw) & 1023u)) & 1023u);
    m.sw = m.sx + size_t(kb_count) * G::kBlockBytes;
    m.x_full = reinterpret_cast<uint64_t*>(m.sw + size_t(stages) * G::kBlockBytes);
    m.full = m.x_full + 1;
    m.empty = m.full + G::kMaxStages;
    m.norms = m.empty + G::kMaxStages;
    m.inv = reinterpret_cast<float*>(m.norms + 2);
    m.tail = reinterpret_cast<unsigned char*>(m.x_full) + G::kEngineTail;
    return m;
  }
};

// A k-block's place in the W ring: its stage and the parity of the stage's use (a stage's
// barriers complete one phase per use; the walk of a CTA advances it once per k-block).
struct RingPos {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void next(int stages) {
    if (++stage == stages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// The engine of one CTA (T: __nv_bfloat16 or __half): its shared memory, x's k-block count
// and the ring depth. Call order: thread 0 init(), a __syncthreads(); the producer
// warpgroup: setmaxnreg_dec, thread 0 produce(), return; the consumers: setmaxnreg_inc,
// wait_x(), then per class tile t = 0, 1, ...: products() (or begin() ... finish()), then
// share_norms(t). A begin() of tile t + 1 must follow share_norms(t): every consumer has
// then released tile t's stages, so the k-blocks it waits for can be loaded.
template <class T>
struct Sm90Mainloop {
  using G = Sm90Cfg;
  Sm90Smem sm;
  int kb_count;
  int stages;  // 2 .. kMaxStages

  __device__ __forceinline__ void init() const {
    mbarrier_init(sm.x_full, 1);
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(&sm.full[s], 1);
      mbarrier_init(&sm.empty[s], G::kConsumers);
    }
    mbarrier_init(&sm.norms[0], G::kConsumers);
    mbarrier_init(&sm.norms[1], G::kConsumers);
    fence_mbarrier_init();  // visible to the TMA unit (async proxy)
  }

  // The producer thread: x's rows [row0, row0 + 128) once, then the k-blocks of `tiles`
  // class tiles of W, the first at W row w_row0, through the ring.
  __device__ __forceinline__ void produce(const CUtensorMap& tmap_x, const CUtensorMap& tmap_w,
                                          int row0, int64_t w_row0, int64_t tiles) const {
    mbarrier_arrive_expect_tx(sm.x_full, unsigned(kb_count) * G::kBlockBytes);
    for (int kb = 0; kb < kb_count; ++kb) {
      tma_load_2d(sm.sx + kb * G::kBlockBytes, &tmap_x, kb * G::BK, row0, sm.x_full);
    }
    RingPos pos;
    for (int64_t t = 0; t < tiles; ++t) {
      const int w_row = int(w_row0 + t * G::BN);
      for (int kb = 0; kb < kb_count; ++kb, pos.next(stages)) {
        // The stage's previous use released (the first use passes at once: the phase
        // "before" phase 0 counts as complete).
        mbarrier_wait_parity(&sm.empty[pos.stage], pos.phase ^ 1u);
        mbarrier_arrive_expect_tx(&sm.full[pos.stage], G::kBlockBytes);
        tma_load_2d(sm.sw + pos.stage * G::kBlockBytes, &tmap_w, kb * G::BK, w_row,
                    &sm.full[pos.stage]);
      }
    }
  }

  __device__ __forceinline__ void wait_x() const { mbarrier_wait_parity(sm.x_full, 0); }

  // A class tile's progress through its k-blocks: the ring stage of its oldest k-block not
  // yet released, how many k-blocks are issued, and this thread's half of ‖w_c‖² so far (in
  // k-block order, so the sum is the same whichever way the tile's k-blocks are split
  // between begin() and finish()).
  struct TileIssue {
    int rel_stage;
    int issued;
    float ss;
  };

  // Consumer thread ctid (0..255) of warpgroup cw = ctid / 128: k-block kb of a class tile
  // (ring position pos, advanced) into acc: wait full, wgmma.fence, 4 wgmma (k16; scale-d 0
  // on the tile's first), commit; then, while they run, the W norms from the same stage.
  // kFirst: the tile's first k-block (its first wgmma through wgmma_m64n128k16_ss_zero).
  template <bool kFirst = false>
  __device__ __forceinline__ void issue_kblock(float (&acc)[64], RingPos& pos, TileIssue& ti,
                                               int ctid) const {
    const uint32_t sx_addr = smem_addr(sm.sx) + uint32_t(ctid >> 7) * 64 * 128;  // its rows
    const uint32_t sw_addr = smem_addr(sm.sw);
    const int norm_cls = ctid >> 1, norm_half = ctid & 1;
    const int kb = ti.issued, s = pos.stage;
    mbarrier_wait_parity(&sm.full[s], pos.phase);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < G::BK / 16; ++k) {
      const uint64_t da = sw128_desc_kmajor(sx_addr + kb * G::kBlockBytes + k * 32);
      const uint64_t dw = sw128_desc_kmajor(sw_addr + s * G::kBlockBytes + k * 32);
      if (kFirst && k == 0) {
        wgmma_m64n128k16_ss_zero<T>(acc, da, dw);
      } else {
        wgmma_m64n128k16_ss<T>(acc, da, dw, kFirst || kb > 0 || k > 0);
      }
    }
    wgmma_commit_group();
    const uint4* row = reinterpret_cast<const uint4*>(sm.sw + s * G::kBlockBytes + norm_cls * 128);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      ti.ss += WeightNorm<T>::sq16(row[norm_half * 4 + ((j + norm_cls) & 3)], static_cast<T*>(nullptr));
    }
    ++ti.issued;
    pos.next(stages);
  }

  // Release (empty arrival) the stage of the tile's oldest unreleased k-block (its wgmmas
  // are known complete).
  __device__ __forceinline__ void release_one(TileIssue& ti) const {
    mbarrier_arrive(&sm.empty[ti.rel_stage]);
    if (++ti.rel_stage == stages) ti.rel_stage = 0;
  }

  // Starts the next class tile of the walk (pos: its first k-block): issues its first
  // min(kAhead, kb_count) k-blocks into acc and returns without waiting for them, so that
  // the caller's epilogue of the previous tile (other registers) runs while the tensor
  // cores work (the forward's overlap, margin_lse_forward_sm90.cu). kAhead = 0: nothing.
  template <int kAhead>
  __device__ __forceinline__ TileIssue begin(float (&acc)[64], RingPos& pos, int ctid) const {
    static_assert(kAhead == 0 || kAhead == 2, "the forward's look-ahead: 2 k-blocks");
    TileIssue ti{pos.stage, 0, 0.f};
    if constexpr (kAhead == 2) {
      issue_kblock<true>(acc, pos, ti, ctid);  // kb_count >= 1
      if (kb_count > 1) issue_kblock(acc, pos, ti, ctid);
    }
    return ti;
  }

  // Completes the tile begun by begin(): issues its remaining k-blocks, each followed by
  // wait_group 1 and the release of the stages of the k-blocks before it (their wgmmas are
  // done), then waits for the last; returns this thread's half of ‖w_c‖² of the tile's
  // class ctid / 2 (see share_norms).
  __device__ __forceinline__ float finish(float (&acc)[64], RingPos& pos, TileIssue& ti,
                                          int ctid) const {
    // k-blocks issued and not released: those of begin() (0 .. kAhead), then one at a time.
    int pending = ti.issued;
    if (ti.issued < kb_count) {
      issue_kblock(acc, pos, ti, ctid);
      wgmma_wait_group<1>();  // the k-blocks before this one are done with their stages
      for (; pending > 0; --pending) release_one(ti);
      while (ti.issued < kb_count) {  // the steady state: one release per k-block
        issue_kblock(acc, pos, ti, ctid);
        wgmma_wait_group<1>();
        release_one(ti);
      }
      pending = 1;
    }
    wgmma_wait_group<0>();
    wgmma_fence_operand(acc);
    for (; pending > 0; --pending) release_one(ti);
    return ti.ss;
  }

  // The whole next class tile at once (no overlap; bwd_tile_sm90): acc = the products of
  // the warpgroup's 64 rows with it; returns finish()'s half of ‖w_c‖².
  __device__ __forceinline__ float products(float (&acc)[64], RingPos& pos, int ctid) const {
    TileIssue ti = begin<0>(acc, pos, ctid);
    return finish(acc, pos, ti, ctid);
  }

  // Tile t's 1 / ‖w_c‖ (by tile column), shared by both consumer warpgroups: joins the two
  // halves of products()' sum, writes the buffer t % 2 and waits for every consumer's.
  // nrm: ‖w_c‖ of the tile's class ctid / 2.
  __device__ __forceinline__ const float* share_norms(int t, float ss, int ctid, float& nrm) const {
    const int buf = t & 1;
    float* inv = sm.inv + buf * G::BN;
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
    nrm = vsqrt(ss);
    if ((ctid & 1) == 0) inv[ctid >> 1] = inverse_norm(nrm);
    mbarrier_arrive(&sm.norms[buf]);
    mbarrier_wait_parity(&sm.norms[buf], unsigned(t >> 1) & 1u);
    return inv;
  }
};

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
