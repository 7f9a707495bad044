// The sm_90a GEMM of the backward (bwd_dw, bwd_dx on H100 / H200, bf16 and fp16):
// gemm_sm90 computes one 128 x BN fp32 tile of A (M x K) B (K x N) per CTA and hands it to
// an epilogue policy, which also says where the tile is, how A is stored and BN
// (Sm90GemmShape): 128 for dW, 256 for dX where D_pad >= 256 (each dS' tile is then read
// D_pad / 256 times instead of D_pad / 128: the operand bytes through L2 drop by 1/4 at
// D = 512, (1/256 + 1/128) against (1/128 + 1/128) per output element and k).
//
//   * Operands come from 2-D tensor maps (margin_lse_tma.cuh) as 128B-swizzled boxes of 64
//     elements (128 bytes) along the contiguous dimension. B is always MN-major in global
//     memory (x̂ [rows = K][D = N], W [classes = K][D = N]): BN / 64 boxes of 64 (N) x 64 (K).
//     A is MN-major (dS'ᵀ of dW: the scratch [rows = K][classes = M], two boxes of 64 (M) x
//     64 (K)) or K-major (dS' of dX: [rows = M][classes = K], one box of 64 (K) x 128 (M)).
//     Out-of-bounds elements land as zeros, so partial tiles need no masking in the mainloop.
//   * 384 threads = 3 warpgroups: warpgroup 0 the producer (setmaxnreg.dec 40; one thread
//     issues the TMA copies, the others exit), warpgroups 1 and 2 the consumers
//     (setmaxnreg.inc 232), each owning 64 rows x BN columns: one wgmma m64n<BN> fp32
//     accumulator, BN / 2 registers per thread (128 at BN = 256: of the 232, the rest holds
//     descriptors, addresses and the epilogue's regrouping).
//   * A ring of kStages = 4 stages of BK = 64 (A 16 KiB + B BN / 64 x 8 KiB), full[s] (the
//     stage landed: one arrival + tx bytes) and empty[s] (its wgmmas retired: 256 consumer
//     arrivals) mbarriers. Per stage, each consumer warpgroup issues 4 wgmma m64n<BN>k16
//     (k16 steps), commits, then waits for the previous stage's group (wait_group 1) and
//     releases that stage: the next stage's wgmmas queue behind this one's, and the TMA
//     copies of the stages ahead overlap both.
//   * Descriptors: K-major SW128 (8 rows of 128 bytes = 1024-byte atoms, SBO 1024, a k16
//     step is +32 bytes), MN-major SW128 (64 MN x 8 k atoms of 1024 bytes: SBO 1024 between
//     8-k groups, LBO 8192 between consecutive 64-wide MN boxes, a k16 step is +2048 bytes),
//     with wgmma's tnsp flag set for the MN-major operands.
//
//   * The epilogue gets the accumulator in registers; for_each_row_run regroups it across
//     each quad of lanes so that the policy's global accesses are 16 bytes wide and cover
//     whole 32-byte sectors (no shared memory: the ring may still be read by the other
//     consumer warpgroup's last wgmmas, and a warp needs no barrier for shuffles).
//
// Shared memory: 1024 (alignment) + 4 x 32 KiB + mbarriers ≈ 129 KiB at BN = 128, 4 x 48 KiB
// ≈ 193 KiB at BN = 256 (5 stages would be 241 KiB), 1 CTA per SM (the K loops are short:
// ceil(N / 64) blocks for dW, k_split / 64 >= 4 for dX). Two CTAs per SM at BN = 128
// would take a shallower ring (3 stages ≈ 97 KiB) and 80 registers per thread at launch
// (65536 / 768, a multiple of 8), which ptxas applies to the whole kernel, setmaxnreg
// regions included: a wgmma m64n128 (64 accumulator registers + descriptors) needs >= 90.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "margin_lse_ptx.cuh"
#include "margin_lse_wgmma_desc.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

// The tile of one instantiation: BM = 128 rows (two consumer warpgroups of 64) x kBN columns
// (128 or 256: one wgmma m64n<kBN>k16 per warpgroup and k16 step, kBN / 2 fp32 accumulator
// registers per consumer thread). B's stage is kBN / 64 boxes of 64 (N) x BK.
template <int kBN>
struct Sm90GemmShape : Sm90WarpRoles {
  static_assert(kBN == 128 || kBN == 256, "wgmma m64n128k16 or m64n256k16");
  static constexpr int BM = 128, BN = kBN;
  static constexpr int kHalfBytes = 64 * BK * 2;          // 64 rows (M or N) x BK: 8 KiB
  static constexpr int kABytes = BM / 64 * kHalfBytes;    // A of a stage: 16 KiB
  static constexpr int kBBytes = BN / 64 * kHalfBytes;    // B of a stage: 16 or 32 KiB
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kAccRegs = BN / 2;                 // per consumer thread
  // 4 stages: 128 KiB at BN = 128, 192 KiB at BN = 256 (5 would be 240 KiB, over the limit)
  static constexpr int kStages = 4;
  static constexpr size_t kSmemBytes = 1024 + size_t(kStages) * kStageBytes + 2 * kStages * 8;
  static_assert(kSmemBytes <= 227 * 1024, "sm_90a: 227 KiB of shared memory per block");
};
using Sm90GemmCfg = Sm90GemmShape<128>;  // dW, and dX where d_pad = 128

// Where a CTA's tile is, in its operands' tensor-map coordinates: the first M index in A's
// map (a_mn), the first N index in B's (b_mn), the first K index in both (k0), and the
// number of BK blocks from k0 (0: the tile is zero).
struct Sm90GemmTile {
  int a_mn, b_mn, k0, k_blocks;
};

// The body of a kernel of Sm90WarpRoles::kThreads threads (launch bounds (kThreads, 1)),
// given its tensor maps (__grid_constant__ parameters), its epilogue policy and its dynamic
// shared memory (Epi::G::kSmemBytes; the kernel declares it: the emulator's build
// rewrites extern __shared__ in .cu files only). kAMnMajor: A is stored MN-major (B always
// is). Epi, the epilogue policy, has
//   using G = Sm90GemmShape<BN>;                       // its tile
//   __device__ Sm90GemmTile tile() const;              // from blockIdx
//   __device__ void store(const float (&acc)[G::kAccRegs], int row0, int lane) const;
// store gets a consumer warp's accumulator: rows row0 .. row0 + 15 of the tile (thread
// 4g + q of the warp: d[4c + 2r + e] = D(row0 + g + 8r, 8c + 2q + e), c < BN / 8).
template <class T, bool kAMnMajor, class Epi>
__device__ __forceinline__ void gemm_sm90(const CUtensorMap& tmap_a, const CUtensorMap& tmap_b,
                                          const Epi& epi, unsigned char* smem_raw) {
#if MARGIN_OPS_SM90A
  using G = typename Epi::G;
  constexpr int kTransA = kAMnMajor ? 1 : 0;

  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023u)) & 1023u);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + G::kStages * G::kStageBytes);
  uint64_t* empty = full + G::kStages;

  const int tid = threadIdx.x;
  const Sm90GemmTile tile = epi.tile();
  if (tid == 0) {
    for (int s = 0; s < G::kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], G::kConsumers);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (tid < 128) {  // producer warpgroup
    setmaxnreg_dec<G::kProducerRegs>();
    if (tid != 0) return;
    for (int kb = 0; kb < tile.k_blocks; ++kb) {
      const int s = kb % G::kStages;
      // Round kb / kStages reuses the stage once round - 1's consumers released it (the
      // first round passes at once: the phase "before" phase 0 counts as complete).
      mbarrier_wait_parity(&empty[s], unsigned((kb / G::kStages) & 1) ^ 1u);
      mbarrier_arrive_expect_tx(&full[s], G::kStageBytes);
      unsigned char* sa = smem + s * G::kStageBytes;
      unsigned char* sb = sa + G::kABytes;
      const int k = tile.k0 + kb * G::BK;
      if constexpr (kAMnMajor) {
        tma_load_2d(sa, &tmap_a, tile.a_mn, k, &full[s]);
        tma_load_2d(sa + G::kHalfBytes, &tmap_a, tile.a_mn + 64, k, &full[s]);
      } else {
        tma_load_2d(sa, &tmap_a, k, tile.a_mn, &full[s]);  // 128 rows x 64 k
      }
#pragma unroll
      for (int h = 0; h < G::BN / 64; ++h) {  // B's 64-wide MN boxes, LBO kHalfBytes apart
        tma_load_2d(sb + h * G::kHalfBytes, &tmap_b, tile.b_mn + 64 * h, k, &full[s]);
      }
    }
    return;
  }

  setmaxnreg_inc<G::kConsumerRegs>();
  const int ctid = tid - 128;          // consumer thread 0..255
  const int cw = ctid >> 7;            // consumer warpgroup: rows 64·cw ..
  const int warp = (ctid >> 5) & 3, lane = tid & 31;
  const uint32_t base = smem_addr(smem);

  // Zero, and every wgmma accumulates (scale-d 1): a tile without k blocks stores zeros, and
  // the registers have one definition reaching the epilogue (ptxas otherwise serializes the
  // wgmmas with injected waits).
  float acc[G::kAccRegs];
#pragma unroll
  for (int i = 0; i < G::kAccRegs; ++i) acc[i] = 0.f;
  for (int kb = 0; kb < tile.k_blocks; ++kb) {
    const int s = kb % G::kStages;
    mbarrier_wait_parity(&full[s], unsigned((kb / G::kStages) & 1));
    const uint32_t sa = base + uint32_t(s * G::kStageBytes) + uint32_t(cw * G::kHalfBytes);
    const uint32_t sb = base + uint32_t(s * G::kStageBytes + G::kABytes);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < G::BK / 16; ++j) {
      const uint64_t da = kAMnMajor ? sw128_desc_mnmajor(sa + j * 2048, G::kHalfBytes)
                                    : sw128_desc_kmajor(sa + j * 32);
      const uint64_t db = sw128_desc_mnmajor(sb + j * 2048, G::kHalfBytes);
      if constexpr (G::BN == 256) {
        wgmma_m64n256k16_ss<T, kTransA, 1>(acc, da, db, 1);
      } else {
        wgmma_m64n128k16_ss<T, kTransA, 1>(acc, da, db, 1);
      }
    }
    wgmma_commit_group();
    // This stage's wgmmas stay in flight; the previous stage's are done with it: release it.
    wgmma_wait_group<1>();
    if (kb > 0) mbarrier_arrive(&empty[(kb - 1) % G::kStages]);
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);
  epi.store(acc, cw * 64 + warp * 16, lane);
#else
  __trap();  // sm_90a only: its callers never launch it elsewhere
#endif
}

// The accumulator of store() regrouped across each quad of the warp (lanes 4g .. 4g + 3,
// which share rows g and g + 8) by __shfl_xor_sync, so that each thread holds kRun
// contiguous columns of one row:
//   kRun = 4, one exchange with lane q ^ 1: columns 8c + 4 (q >> 1) .. + 3 of c = 2p + (q & 1)
//   kRun = 8, then one with lane q ^ 2:     columns 8c .. 8c + 7 of c = 4p + q
// (q = lane & 3; before, lane q holds columns 8c + 2q, + 1 of every c). f(r, col, v) is
// called for each run: row g + 8r of the warp's 16, first column col, v[0 .. kRun);
// kAcc = BN / 2 accumulators per thread (64 or 128): column blocks c < kAcc / 4.
template <int kRun, int kAcc, class F>
__device__ __forceinline__ void for_each_row_run(const float (&acc)[kAcc], int lane, F&& f) {
  static_assert(kRun == 4 || kRun == 8, "runs of 4 or 8 columns");
  constexpr int kGroup = kRun / 2;  // column blocks c regrouped together
  const int q = lane & 3;
  const bool odd = (q & 1) != 0, hi = (q & 2) != 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c0 = 0; c0 < kAcc / 4; c0 += kGroup) {
      // Exchange 1: of the blocks c0 + 2h, c0 + 2h + 1, keep the one of parity q & 1 and
      // send the other: t[h][s] = block c0 + 2h + (q & 1), columns 2 (q & 2 | s) .. + 1.
      float t[kGroup / 2][2][2];
#pragma unroll
      for (int h = 0; h < kGroup / 2; ++h) {
        const int ce = 4 * (c0 + 2 * h) + 2 * r, co = ce + 4;  // blocks c0 + 2h, + 1
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float keep = odd ? acc[co + e] : acc[ce + e];
          const float got = __shfl_xor_sync(0xffffffffu, odd ? acc[ce + e] : acc[co + e], 1);
          t[h][0][e] = odd ? got : keep;
          t[h][1][e] = odd ? keep : got;
        }
      }
      float v[kRun];
      if constexpr (kRun == 4) {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = t[0][e / 2][e % 2];
        f(r, 8 * (c0 + (q & 1)) + 4 * (q >> 1), v);
      } else {
        // Exchange 2: keep h = q >> 1 (block c0 + q, from lanes of bit 1 = hi), send the other.
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float keep = hi ? t[1][s][e] : t[0][s][e];
            const float got = __shfl_xor_sync(0xffffffffu, hi ? t[0][s][e] : t[1][s][e], 2);
            v[2 * s + e] = hi ? got : keep;      // columns 2s + e: from the lanes of bit 1 clear
            v[4 + 2 * s + e] = hi ? keep : got;  // columns 4 + 2s + e: of bit 1 set
          }
        }
        f(r, 8 * (c0 + q), v);
      }
    }
  }
}

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
