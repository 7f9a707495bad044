// The backward's fused recompute + dW kernel for sm_90a (H100 / H200), bf16 and fp16:
// bwd_fused_sm90_kernel, which replaces a class chunk's bwd_tile + bwd_dw launches
// (margin_lse_backward.cu) where sm90_bwd_fused_eligible holds, and its host side (declared
// in margin_lse_bwd_fused_sm90.cuh). A CTA owns 64 classes of the chunk: it keeps their W
// rows resident and walks every 64-row tile of x, forming dS' as bwd_tile does (same scratch
// and corr_part, same per-element math: GradEpilogue of margin_lse_bwd_epilogue.cuh) and
// accumulating dW of its classes in registers; dW is written once, at the end. dS' thus
// makes one round trip through global memory per chunk (written here, read by bwd_dx)
// instead of two, and a chunk takes 2 launches instead of 3.
//
//   * 384 threads: warpgroup 0 the producer (setmaxnreg.dec 40; one thread issues every TMA
//     copy: W's tile once, then the x tiles through two buffers with full / empty
//     mbarriers), warpgroups 1 and 2 the consumers (setmaxnreg.inc 232).
//   * Per x tile, consumer warpgroup w: S = x_tile W_wᵀ for its 32 classes 32w .. 32w + 31
//     (wgmma m64n32k16, K-major x and W, 16 fp32 per thread), the cosines formed from the
//     raw products as in the forward (acc · 1 / ‖x_i‖ · 1 / ‖w_c‖), dS' stored to the scratch
//     as column pairs, Σ dc·ĉ kept per thread over all tiles (fixed order), and dS' / ‖x_i‖
//     staged in 16-bit into a 64 x 64 shared tile (rows = x rows, 128B-swizzled like a TMA
//     box); after a fence.proxy.async and a barrier of the 256 consumers, warpgroup w adds
//     dW[64 classes, its half of D] += stagedᵀ x_tile (tnsp-a and tnsp-b: the staged tile
//     and x's k-blocks are read MN-major, x's k-blocks being 64-wide D boxes LBO = 8 KiB
//     apart; the same x k-blocks are S's K-major A operand). dW accumulates in registers:
//     kDB·32 fp32 per thread, kDB = ceil(D / 128) 64-wide D blocks per warpgroup; m64n256k16
//     at kDB = 4, m64n128k16 at 2, else kDB x m64n64k16.
//   * W and both x buffers have 2·kDB D blocks; the one past D when D / 64 is odd is zeroed
//     once and never loaded, so S's k loop is unrolled with no trip count to branch on, and
//     its first k16 step writes the accumulator without reading it (..._zero): the last
//     tile's epilogue writes it in lane-divergent code, after which ptxas would otherwise
//     serialize every wgmma of the kernel (C7518).
//   * Why raw x instead of bwd_dw's x̂ workspace: dS' / ‖x_i‖ is rounded once to 16 bits,
//     where bwd_dw rounds dS' and x̂ = x / ‖x‖ each once; x itself is exact, so the product
//     carries one rounding of the same size as before (and prep need not write x̂).
//   * Double buffers, no extra barriers: the x buffer of tile t is released after the
//     consumer's wait on tile t + 1's S (which also retires tile t's dW); the staging tile
//     and the feature-scale row sums alternate by tile parity, so a consumer writing tile
//     t + 2's has passed tile t + 1's barrier, after every consumer's reads of tile t's.
//   * End: Σ dc·ĉ over the lanes and warps in fixed order gives r_c; dW = acc − w_c r_c /
//     ‖w_c‖² (‖w_c‖ and w_c from the resident W tile) is staged as 16-bit in the first x
//     buffer (16-byte chunks swizzled by class row) and copied out as 16-byte stores: the
//     CTA's 64 classes are 64 consecutive rows of dW, one contiguous block.
//   * Shared memory: W and 2 x buffers (2·kDB blocks of 8 KiB each) + 2 staging tiles +
//     mbarriers and small arrays (2952 bytes): 67.9 / 115.9 / 163.9 / 211.9 KiB at kDB = 1..4
//     (D <= 128, 256, 384, 512). Grid: ceil(kc / 64) CTAs, 1 per SM; each reads all of x
//     per chunk (from L2 after the first CTAs), hence Backward::sm90_fused asks for CTAs on
//     at least 7/8 of the SMs.
//   * Deterministic: fixed summation orders, each output element written by one thread of one
//     CTA, no atomics.
//   * 2-CTA clusters (kCtas = 2, where a chunk has an even number of class tiles): the CTAs of
//     a cluster own adjacent 64-class tiles and read the same x tiles, so each CTA's producer
//     loads only half the rows of each x tile (a 32-row box, the x_half tensor map) and
//     multicasts it into both CTAs' buffer at the same offset: x's L2 -> SM traffic halves.
//     Each CTA's x_full still expects the whole tile's bytes (half from each producer), and a
//     buffer may be refilled only once the consumers of BOTH CTAs are done with it: x_empty
//     counts 2 x 256 arrivals, the CTA's own and the peer's (remote arrivals through mapa).
//     A cluster barrier after the mbarrier inits (published by fence.mbarrier_init) comes
//     before any remote use, and one at the end keeps each CTA alive until the peer's last
//     release has arrived on its x_empty. The shared-memory image of a tile is the same as
//     with one 64-row box (32 rows are 4 KiB, a multiple of the 128B swizzle's 1 KiB
//     period), so every product and sum is the same: the outputs are bitwise those of
//     kCtas = 1.
#include <cuda.h>  // CUtensorMap (types only: no -lcuda)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_bwd_fused_sm90.cuh"
#include "margin_lse_dtype.cuh"
#include "margin_lse_layout.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_ptx.cuh"
#include "margin_lse_reduce.cuh"
#include "margin_lse_sm90_mainloop.cuh"  // WgmmaFragN
#include "margin_lse_tile_gemm.cuh"  // WeightNorm::sq16
#include "margin_lse_tma.cuh"
#include "margin_lse_wgmma_desc.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

struct BwdFusedSm90Cfg : Sm90WarpRoles {
  static constexpr int BM = 64;                  // rows of an x tile
  static constexpr int BN = kBwdFusedClasses;    // classes of a CTA
  static constexpr int kHalfN = BN / 2;          // classes of S per consumer warpgroup
  static constexpr int kBlockBytes = 64 * BK * 2;  // an x or W k-block, a staging tile: 8 KiB
  static constexpr int kMaxD = 512;
  static constexpr size_t kMaxSmem = 227 * 1024;
  // 64-wide D blocks of dW per consumer warpgroup.
  static constexpr int dw_blocks(int64_t d) { return int((d / BK + 1) / 2); }
};

// The kernel's small shared-memory objects, after the tiles.
struct BwdFusedSm90Tail {
  uint64_t x_full[2], x_empty[2];  // per x buffer: TMA bytes landed / 256 consumer releases
  uint64_t w_full;                 // W's tile landed
  uint64_t cons;                   // the 256 consumers' barrier (consecutive uses)
  float inv[BwdFusedSm90Cfg::BN];   // 1 / max(‖w_c‖, eps)
  float nrm[BwdFusedSm90Cfg::BN];   // ‖w_c‖
  float coef[BwdFusedSm90Cfg::BN];  // −r_c / ‖w_c‖² (0 at ‖w_c‖ <= eps)
  float r[Sm90WarpRoles::kConsumers / 32][BwdFusedSm90Cfg::kHalfN];  // per warp: its column sums
  float corr[2][2][BwdFusedSm90Cfg::BM];  // [tile parity][warpgroup][row]: feature-scale terms
  MarginParams margin;
};

constexpr size_t bwd_fused_smem_bytes(int64_t d) {
  using G = BwdFusedSm90Cfg;
  return 1024 + size_t(6 * G::dw_blocks(d) + 2) * G::kBlockBytes +
         sizeof(BwdFusedSm90Tail);
}
static_assert(bwd_fused_smem_bytes(BwdFusedSm90Cfg::kMaxD) <= BwdFusedSm90Cfg::kMaxSmem,
              "W, two x buffers and two staging tiles fit at D = 512");

// The 256 consumers' barrier on one mbarrier, used over and over: use k waits for phase k.
struct ConsumerBarrier {
  uint64_t* bar;
  uint32_t uses = 0;
  __device__ __forceinline__ void sync() {
    mbarrier_arrive(bar);
    mbarrier_wait_parity(bar, uses & 1u);
    ++uses;
  }
};

// One k16 step of dW[64 classes, the warpgroup's kDB·64 columns] += Aᵀ B: A the staged
// dS' / ‖x‖ (descriptor da, MN-major), B the x tile's kDB D blocks from b_addr (MN-major,
// the next block 8 KiB on).
template <class T, int kDB>
__device__ __forceinline__ void dw_mma(float (&acc)[kDB * 32], uint64_t da, uint32_t b_addr) {
  using G = BwdFusedSm90Cfg;
  if constexpr (kDB == 4) {
    wgmma_m64n256k16_ss<T, 1, 1>(acc, da, sw128_desc_mnmajor(b_addr, G::kBlockBytes), 1);
  } else if constexpr (kDB == 2) {
    wgmma_m64n128k16_ss<T, 1, 1>(acc, da, sw128_desc_mnmajor(b_addr, G::kBlockBytes), 1);
  } else {
#pragma unroll
    for (int j = 0; j < kDB; ++j) {
      wgmma_m64n64k16_ss<T, 1, 1>(*reinterpret_cast<float(*)[32]>(acc + 32 * j), da,
                                  sw128_desc_mnmajor(b_addr + j * G::kBlockBytes, G::kBlockBytes),
                                  1);
    }
  }
}

// Byte offset of element (row, col) of a 128B-swizzled tile of 16-bit rows `pitch` bytes
// long (the 16-byte chunks of a row permuted by row % 8, as TMA's SWIZZLE_128B).
__device__ __forceinline__ uint32_t sw128_offset(int row, int col, int pitch) {
  return uint32_t(row * pitch + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 16 + (col & 7) * 2);
}

template <class T, bool kHard, int kDB, int kCtas>
__global__ void __launch_bounds__(Sm90WarpRoles::kThreads, 1)
    bwd_fused_sm90_kernel(const __grid_constant__ CUtensorMap tmap_x,
                          const __grid_constant__ CUtensorMap tmap_w, const TileArgs<T> args,
                          T* const grad_weight) {
#if MARGIN_OPS_SM90A
  using G = BwdFusedSm90Cfg;
  using F = WgmmaFragN<32>;  // S: m64n32k16
  using Epi = GradEpilogue<F, kHard>;
  constexpr int kBlocks = 2 * kDB;  // D blocks of W and of an x buffer (those past d: zeros)
  constexpr int kXBytes = kBlocks * G::kBlockBytes;
  constexpr int kOutPitch = 2 * kDB * G::BK * 2;     // dW staging row: 128·kDB elements

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* const sw = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const int64_t d = args.in.d;
  const int nkb = int(d / G::BK);  // W and x k-blocks loaded: kBlocks or kBlocks − 1
  unsigned char* const sx = sw + kXBytes;
  unsigned char* const sds = sx + 2 * kXBytes;
  BwdFusedSm90Tail* const tail = reinterpret_cast<BwdFusedSm90Tail*>(sds + 2 * G::kBlockBytes);

  const int tid = threadIdx.x;
  const int64_t ct = blockIdx.x;  // the chunk's 64-class tile
  const int64_t ct_local0 = ct * G::BN;
  const int64_t cls0 = args.c0 + ct_local0;  // its first class
  const int row_tiles = int((args.in.n + G::BM - 1) / G::BM);

  static_assert(kCtas == 1 || kCtas == 2, "clusters of 1 or 2 CTAs");
  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(&tail->x_full[b], 1);
      mbarrier_init(&tail->x_empty[b], G::kConsumers * kCtas);  // both CTAs' consumers
    }
    mbarrier_init(&tail->w_full, 1);
    mbarrier_init(&tail->cons, G::kConsumers);
    tail->margin = args.margin;
    fence_mbarrier_init();
  }
  // The D blocks past d of W and of both x buffers (none or one each, never loaded) are
  // zeros for the wgmmas, whose loops then have no trip count to branch on.
  if (nkb < kBlocks) {
    constexpr int kPerBlock = G::kBlockBytes / 16;
    for (int i = tid; i < 3 * kPerBlock; i += G::kThreads) {
      reinterpret_cast<uint4*>(sw + (i / kPerBlock) * kXBytes + nkb * G::kBlockBytes)[i % kPerBlock] =
          make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async_shared_cta();  // wgmma reads them through the async proxy
  }
  __syncthreads();
  // The peer's mbarriers are initialised (and published by fence.mbarrier_init) before this
  // CTA arrives on them or multicasts to them.
  if constexpr (kCtas > 1) {
    cluster_arrive();
    cluster_wait();
  }
  const unsigned rank = kCtas > 1 ? cluster_ctarank() : 0u;

  if (tid < 128) {  // producer warpgroup
    setmaxnreg_dec<G::kProducerRegs>();
    if (tid == 0) {
      mbarrier_arrive_expect_tx(&tail->w_full, unsigned(nkb) * G::kBlockBytes);
      for (int kb = 0; kb < nkb; ++kb) {
        tma_load_2d(sw + kb * G::kBlockBytes, &tmap_w, kb * G::BK, int(cls0), &tail->w_full);
      }
      for (int t = 0; t < row_tiles; ++t) {
        const int b = t & 1;
        // Use t / 2 of the buffer once use t / 2 − 1 is released (the first passes at once).
        mbarrier_wait_parity(&tail->x_empty[b], (unsigned(t >> 1) & 1u) ^ 1u);
        mbarrier_arrive_expect_tx(&tail->x_full[b], unsigned(nkb) * G::kBlockBytes);
        for (int kb = 0; kb < nkb; ++kb) {
          unsigned char* const dst = sx + b * kXBytes + kb * G::kBlockBytes;
          if constexpr (kCtas > 1) {  // this CTA's half of the rows, into both CTAs
            constexpr int kRows = G::BM / kCtas;
            tma_load_2d_multicast(dst + rank * kRows * 128, &tmap_x, kb * G::BK,
                                  t * G::BM + int(rank) * kRows, &tail->x_full[b],
                                  uint16_t((1u << kCtas) - 1));
          } else {
            tma_load_2d(dst, &tmap_x, kb * G::BK, t * G::BM, &tail->x_full[b]);
          }
        }
      }
    }
    return;
  }

  setmaxnreg_inc<G::kConsumerRegs>();
  const int ctid = tid - 128;  // consumer thread 0..255
  const int wg = ctid >> 7;    // S: classes 32·wg ..; dW: D blocks kDB·wg ..
  const int cwarp = ctid >> 5, lane = tid & 31;
  const int wm0 = (cwarp & 3) * 16;  // the warp's 16 rows of S (x rows) and of dW (classes)
  const bool external = args.margin.kind == MarginKind::External;
  const bool fs = args.margin.feature_scale;
  ConsumerBarrier cons{&tail->cons};
  // The peer's x_empty (kCtas = 2): this CTA's consumers release its buffers there too.
  const uint32_t peer_x_empty = kCtas > 1 ? mapa_shared(smem_addr(tail->x_empty), rank ^ 1u) : 0u;

  // ‖w_c‖ from the resident W tile: 2 threads per class, each 64 bytes of every 128-byte
  // k-block row (the swizzle permutes a row's 16-byte chunks only), in k-block order.
  mbarrier_wait_parity(&tail->w_full, 0);
  if (ctid < 2 * G::BN) {  // warp-uniform
    const int cls = ctid >> 1, half = ctid & 1;
    float ss = 0.f;
    for (int kb = 0; kb < nkb; ++kb) {
      const uint4* row = reinterpret_cast<const uint4*>(sw + kb * G::kBlockBytes + cls * 128);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        ss += WeightNorm<T>::sq16(row[half * 4 + ((j + cls) & 3)], static_cast<T*>(nullptr));
      }
    }
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
    if (half == 0) {
      const float nrm = vsqrt(ss);
      tail->nrm[cls] = nrm;
      tail->inv[cls] = inverse_norm(nrm);
    }
  }
  cons.sync();

  const int64_t col0 = cls0 + G::kHalfN * wg;  // the warpgroup's first class of S
  const bool interior = col0 + G::kHalfN <= args.in.c;
  const int64_t c_left = args.in.c - col0;  // < 0: the second half of a partial tile
  const int c_lim = int(c_left < 0 ? 0 : c_left < G::kHalfN ? c_left : G::kHalfN);
  const float* const inv = tail->inv + G::kHalfN * wg;
  const uint32_t w_addr = smem_addr(sw) + uint32_t(wg * G::kHalfN * 128);  // its 32 W rows

  float acc_w[kDB * 32];  // dW: rows wm0 + g (+8), columns 64·(kDB·wg + i / 32) + ...
#pragma unroll
  for (int i = 0; i < kDB * 32; ++i) acc_w[i] = 0.f;
  float rsum[F::TC];  // Σ over the walk of dc·ĉ, per column of the thread
#pragma unroll
  for (int ci = 0; ci < F::TC; ++ci) rsum[ci] = 0.f;

  for (int t = 0; t < row_tiles; ++t) {
    const int b = t & 1;
    const int64_t row0 = int64_t(t) * G::BM;

    // The factors of the thread's 2 rows.
    RowInputs<kHard> row[F::TR];
#pragma unroll
    for (int ri = 0; ri < F::TR; ++ri)
      row[ri] = load_row_inputs<kHard>(args, row0 + wm0 + F::row(ri, lane));

    // S = x_tile W_wgᵀ (x's k-blocks K-major as A, the warpgroup's 32 W rows as B).
    const uint32_t x_addr = smem_addr(sx + b * kXBytes);
    float acc[16];
    mbarrier_wait_parity(&tail->x_full[b], unsigned(t >> 1) & 1u);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < kBlocks; ++kb) {
#pragma unroll
      for (int k = 0; k < G::BK / 16; ++k) {
        const uint64_t da = sw128_desc_kmajor(x_addr + kb * G::kBlockBytes + k * 32);
        const uint64_t db = sw128_desc_kmajor(w_addr + kb * G::kBlockBytes + k * 32);
        if (kb == 0 && k == 0) {
          wgmma_m64n32k16_ss_zero<T>(acc, da, db);
        } else {
          wgmma_m64n32k16_ss<T>(acc, da, db, 1);
        }
      }
    }
    wgmma_commit_group();
    wgmma_wait_group<0>();  // S, and tile t − 1's dW: its x buffer and staging tile are read
    wgmma_fence_operand(acc);
    wgmma_fence_operand(acc_w);
    if (t > 0) {
      mbarrier_arrive(&tail->x_empty[b ^ 1]);
      if constexpr (kCtas > 1) mbarrier_arrive_cluster(peer_x_empty + 8u * unsigned(b ^ 1));
    }

    // dS' per row, into the scratch and (/ ‖x_i‖, 16-bit) into the staging tile.
    unsigned char* const stage = sds + b * G::kBlockBytes;
#pragma unroll
    for (int ri = 0; ri < F::TR; ++ri) {
      const int r = wm0 + F::row(ri, lane);
      const int64_t gr = row0 + r;
      const bool row_ok = gr < args.in.n;
      const int64_t yt = int64_t(row[ri].label) - col0;
      const int yl = row[ri].label >= 0 && yt >= 0 && yt < G::kHalfN ? int(yt) : -1;
      float corr = 0.f;
      Epi::row(acc, ri, lane, row[ri].g, row[ri].xinv, inv, interior && row_ok,
               row_ok ? c_lim : 0, yl, row[ri].gt, &tail->margin, external, fs, rsum, corr);
      T* out = args.scratch + gr * args.ld + ct_local0 + G::kHalfN * wg + 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < F::TC / 2; ++j) {
        const float v0 = F::at(acc, ri, 2 * j), v1 = F::at(acc, ri, 2 * j + 1);
        const T pair[2] = {Type<T>::store(v0), Type<T>::store(v1)};
        const float xinv = row[ri].xinv;
        const T staged[2] = {Type<T>::store(v0 * xinv), Type<T>::store(v1 * xinv)};
        uint32_t bits;
        memcpy(&bits, pair, sizeof(bits));
        *reinterpret_cast<uint32_t*>(out + 8 * j) = bits;
        memcpy(&bits, staged, sizeof(bits));
        const int m = G::kHalfN * wg + 8 * j + 2 * (lane & 3);  // the class, dW's M index
        *reinterpret_cast<uint32_t*>(stage + sw128_offset(r, m, 128)) = bits;
      }
      if (fs) {  // uniform
        corr = lanes_sum<0, 2>(corr);
        if ((lane & 3) == 0) tail->corr[b][wg][r] = corr;
      }
    }
    fence_proxy_async_shared_cta();  // the staging tile is read by wgmma (async proxy)
    cons.sync();
    if (fs && ctid < G::BM) {
      args.corr_part[ct * args.n_pad + row0 + ctid] = tail->corr[b][0][ctid] + tail->corr[b][1][ctid];
    }

    // dW += stagedᵀ x_tile over the tile's 64 rows (4 k16 steps of 16 rows, 2048 bytes).
    const uint32_t ds_addr = smem_addr(stage);
    const uint32_t xd_addr = x_addr + uint32_t(wg * kDB * G::kBlockBytes);
    wgmma_fence_operand(acc_w);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < G::BM / 16; ++k) {
      dw_mma<T, kDB>(acc_w, sw128_desc_mnmajor(ds_addr + k * 2048, G::kBlockBytes),
                     xd_addr + k * 2048);
    }
    wgmma_commit_group();
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc_w);
  // This CTA's last remote releases are in; it waits for the peer's at the end (its x_empty
  // must outlive them).
  if constexpr (kCtas > 1) cluster_arrive();

  // r_c: over the lanes of a column (lane bits 2-4), then the warpgroup's 4 warps in order.
#pragma unroll
  for (int ci = 0; ci < F::TC; ++ci) rsum[ci] = lanes_sum<2, 5>(rsum[ci]);
  if ((lane >> 2) == 0) {
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) tail->r[cwarp][F::col(ci, lane)] = rsum[ci];
  }
  cons.sync();  // also: every consumer's last dW retired, the x buffers are free
  if (ctid < G::BN) {
    const int w4 = (ctid / G::kHalfN) * 4, c = ctid % G::kHalfN;
    float r = tail->r[w4][c];
#pragma unroll
    for (int w = 1; w < 4; ++w) r += tail->r[w4 + w][c];
    const float nrm = tail->nrm[ctid];
    tail->coef[ctid] = nrm > Consts<float>::kNormEps ? -r / (nrm * nrm) : 0.f;
  }
  cons.sync();

  // dW = acc − w_c r_c / ‖w_c‖² as T, staged [class][128·kDB] in the first x buffer.
  unsigned char* const out_stage = sx;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int m = wm0 + (lane >> 2) + 8 * rr;
    const float coef = tail->coef[m];
#pragma unroll
    for (int i = 0; i < kDB * 32; i += 4) {
      const int dcol = 64 * (wg * kDB + i / 32) + 8 * ((i % 32) / 4) + 2 * (lane & 3);
      if (dcol >= d) continue;
      T w2[2];
      memcpy(w2, sw + (dcol / 64) * G::kBlockBytes + sw128_offset(m, dcol % 64, 128), sizeof(w2));
      const T o[2] = {Type<T>::store(acc_w[i + 2 * rr] + coef * Type<T>::load(w2[0])),
                      Type<T>::store(acc_w[i + 2 * rr + 1] + coef * Type<T>::load(w2[1]))};
      memcpy(out_stage + sw128_offset(m, dcol, kOutPitch), o, sizeof(o));
    }
  }
  cons.sync();
  // Copy out: the CTA's valid classes are consecutive rows of dW, 16 bytes per store.
  const int64_t left = args.in.c - cls0;
  const int rows = int(left < G::BN ? left : G::BN);
  const int chunks = int(d / 8);
  uint4* const dst = reinterpret_cast<uint4*>(grad_weight + cls0 * d);
  for (int idx = ctid; idx < rows * chunks; idx += G::kConsumers) {
    const int m = idx / chunks, ch = idx % chunks;
    dst[idx] = *reinterpret_cast<const uint4*>(out_stage + sw128_offset(m, 8 * ch, kOutPitch));
  }
  if constexpr (kCtas > 1) cluster_wait();
#else
  __trap();  // sm_90a only: sm90_bwd_fused_eligible never picks this kernel elsewhere
#endif
}

}  // namespace dev

namespace {

using G = dev::BwdFusedSm90Cfg;

template <class T>
using FusedKernel = decltype(&dev::bwd_fused_sm90_kernel<T, false, 1, 1>);

template <class T, bool kHard, int kCtas>
FusedKernel<T> fused_kernel_for(int dw_blocks) {
  switch (dw_blocks) {
    case 1: return dev::bwd_fused_sm90_kernel<T, kHard, 1, kCtas>;
    case 2: return dev::bwd_fused_sm90_kernel<T, kHard, 2, kCtas>;
    case 3: return dev::bwd_fused_sm90_kernel<T, kHard, 3, kCtas>;
    default: return dev::bwd_fused_sm90_kernel<T, kHard, 4, kCtas>;
  }
}

// The instantiation for p: hard examples or not, dW blocks per warpgroup from d, CTAs per
// cluster (1 or 2).
template <class T, int kCtas>
FusedKernel<T> fused_kernel(const BackwardParams& p) {
  const int blocks = G::dw_blocks(p.d);
  return p.hard_threshold != nullptr ? fused_kernel_for<T, true, kCtas>(blocks)
                                     : fused_kernel_for<T, false, kCtas>(blocks);
}

}  // namespace

bool sm90_bwd_fused_eligible(const BackwardParams& p) {
  return p.arch == 90 && (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) &&
         p.subcenters == 1 && p.class_index == nullptr && p.d % G::BK == 0 && p.d >= G::BK &&
         p.d <= G::kMaxD && dev::aligned16(p.x) && dev::aligned16(p.weight) &&
         dev::aligned16(p.grad_weight);
}

template <class T>
cudaError_t prepare_bwd_fused_sm90(const BackwardParams& p, XwTensorMaps& maps) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  cudaError_t err = encode_tma_2d_b16(&maps.x, bf16, p.x, p.d, p.n, p.d * 2, G::BM);
  if (err == cudaSuccess) err = encode_tma_2d_b16(&maps.x_half, bf16, p.x, p.d, p.n, p.d * 2, G::BM / 2);
  if (err == cudaSuccess) err = encode_tma_2d_b16(&maps.w, bf16, p.weight, p.d, p.c, p.d * 2, G::BN);
  if (err == cudaSuccess) err = dev::allow_smem(fused_kernel<T, 1>(p), dev::bwd_fused_smem_bytes(p.d));
  if (err != cudaSuccess) return err;
  return dev::allow_smem(fused_kernel<T, 2>(p), dev::bwd_fused_smem_bytes(p.d));
}

template <class T>
cudaError_t launch_bwd_fused_sm90(const BackwardParams& p, const XwTensorMaps& maps,
                                  const dev::TileArgs<T>& args, int64_t kc, cudaStream_t stream) {
  const unsigned grid = unsigned(dev::ceil_div(kc, int64_t(G::BN)));
  const size_t smem = dev::bwd_fused_smem_bytes(p.d);
  T* const grad_weight = static_cast<T*>(p.grad_weight);
  if (grid % 2 != 0) {  // an odd number of class tiles: no pairs, each CTA loads all of x
    const auto kernel = fused_kernel<T, 1>(p);
    kernel<<<grid, G::kThreads, smem, stream>>>(maps.x, maps.w, args, grad_weight);
    return cudaGetLastError();
  }
  // Pairs of adjacent class tiles as 2-CTA clusters sharing each x tile (TMA multicast).
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  // {gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs}, positional (the host
  // emulator's gridDim / blockDim macros would rewrite the member names).
  const cudaLaunchConfig_t config = {dim3(grid), dim3(G::kThreads), smem, stream, &cluster, 1};
  return cudaLaunchKernelEx(&config, fused_kernel<T, 2>(p), maps.x_half, maps.w, args, grad_weight);
}

template cudaError_t prepare_bwd_fused_sm90<__nv_bfloat16>(const BackwardParams&, XwTensorMaps&);
template cudaError_t prepare_bwd_fused_sm90<__half>(const BackwardParams&, XwTensorMaps&);
template cudaError_t launch_bwd_fused_sm90<__nv_bfloat16>(const BackwardParams&,
                                                          const XwTensorMaps&,
                                                          const dev::TileArgs<__nv_bfloat16>&,
                                                          int64_t, cudaStream_t);
template cudaError_t launch_bwd_fused_sm90<__half>(const BackwardParams&, const XwTensorMaps&,
                                                   const dev::TileArgs<__half>&, int64_t,
                                                   cudaStream_t);

}  // namespace cuda
}  // namespace margin_ops
