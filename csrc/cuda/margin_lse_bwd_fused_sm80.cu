// The backward's fused recompute + dW kernel on mma.sync (sm_80 and every device where
// bwd_fused_sm90 does not run), bf16 and fp16: bwd_fused_kernel, which replaces a class
// chunk's bwd_tile + bwd_dw launches (margin_lse_backward.cu) where bwd_fused_eligible and
// Backward's occupancy rule hold, and its host side (margin_lse_bwd_fused_sm80.cuh). The
// structure is bwd_fused_sm90's (margin_lse_bwd_fused_sm90.cu) on mma.sync: a CTA owns 64
// classes of the chunk, keeps their W rows resident and walks every row tile of x, forming
// dS' as bwd_tile does (same scratch and corr_part, same per-element math: GradEpilogue of
// margin_lse_bwd_epilogue.cuh) and accumulating dW of its classes in registers; dW is
// written once, at the end. dS' makes one round trip through global memory per chunk
// (written here, read by bwd_dx) instead of two, a chunk takes 2 launches instead of 3, and
// prep writes no x̂.
//
//   * 256 threads, 8 warps, the tile GEMM's mma.sync m16n8k16 pieces (ldsm_a16 / ldsm_b16 /
//     mma_m16n16 of margin_lse_tile_gemm.cuh) on padded shared-memory tiles (rows of d + 8
//     elements: 16 bytes of padding, so ldmatrix and ldmatrix.trans rows hit distinct banks).
//   * Shared memory: W's 64 rows [class][d] (cp.async once), two x row tiles [row][d]
//     (cp.async, double-buffered: tile t + 1's copy is issued at the start of tile t and has
//     all of tile t's S, epilogue and dW to land, so a third buffer would hide nothing and
//     would not fit beside W at d = 384), a staging tile [row][class] for dS' / ‖x_i‖, and a
//     tail (norms, column sums, feature-scale row sums, the margin).
//   * Per x tile of BM rows: S = x_tile Wᵀ (BM x 64) as 2 x 4 warps of BM / 2 rows x 16
//     classes, K = d; the cosines and dS' (GradEpilogue on the fragment layout of Cfg<T,
//     true>, TR = BM / 16 rows x TC = 4 columns per thread); dS' to the scratch as column
//     pairs, Σ dc·ĉ kept per thread over all tiles (fixed order), dS' / ‖x_i‖ rounded to T
//     into the staging tile; one barrier; then dW[64 classes, d] += stagedᵀ x_tile (K = BM
//     rows) as 2 x 4 warps of 32 classes x d / 4 columns: warp column wn owns the 16-column
//     groups g = wn + 4p, p < d / 64 (balanced for every d % 64 == 0). The staging tile is
//     read MN-major (ldmatrix.trans) as A, the x tile's rows MN-major as B: the same x tile
//     that was S's K-major A. dW accumulates in registers: 4 x 8·kDB fp32 per thread, kDB =
//     ceil(d / 128) (128 at d = 512), groups p >= d / 64 skipped (uniform branch).
//   * BM = 64 rows (kDB <= 3: d <= 384), else 32: W and two 64-row x tiles at d = 448 / 512
//     (193 KiB) exceed sm_80's 163 KiB. dynamic shared memory (bwd_fused_smem_bytes):
//     (64 + 2·BM)·(d + 8)·2 + BM·144 + 2392 bytes: 38.3 / 62.3 / 86.3 / 110.3 / 134.3 / 158.3
//     KiB at d = 64 .. 384 (BM = 64), 120.8 / 136.8 KiB at d = 448 / 512 (BM = 32); 1 CTA per
//     SM. Grid: ceil(kc / 64) CTAs, each reading all of x per chunk (from L2 after the
//     first), hence Backward's rule of CTAs on at least 7/8 of the SMs (shared with
//     bwd_fused_sm90).
//   * Barriers: two per tile. The one at the top (after the wait for tile t's copies) also
//     orders every warp's dW of tile t − 1 before the copy into its x buffer and before the
//     epilogue's writes to the staging tile and the row sums: one staging tile suffices.
//   * End: Σ dc·ĉ over the lanes and the 2 warp rows in fixed order gives r_c; dW = acc −
//     w_c r_c / ‖w_c‖² (‖w_c‖ and w_c from the resident W rows) is staged as T in the x
//     buffers and copied out as 16-byte stores: the CTA's 64 classes are 64 consecutive rows
//     of dW, one contiguous block.
//   * Why raw x instead of bwd_dw's x̂ workspace: as bwd_fused_sm90, dS' / ‖x_i‖ is rounded
//     once to 16 bits and x itself is exact (bwd_dw rounds dS' and x̂ each once).
//   * Deterministic: fixed summation orders, each output element written by one thread of one
//     CTA, no atomics.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_bwd_fused_sm80.cuh"
#include "margin_lse_dtype.cuh"
#include "margin_lse_layout.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_ptx.cuh"
#include "margin_lse_reduce.cuh"
#include "margin_lse_tile_gemm.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

struct BwdFusedCfg {
  static constexpr int BN = kBwdFusedClasses;  // classes of a CTA
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kGroup = 16;                  // dW columns per ldmatrix.x4 of x
  static constexpr int kDStep = kGroup * kWarpsN;    // d must be a multiple: 64
  static constexpr int kMaxD = 512;
  static constexpr int kPad = 8;                     // elements (16 bytes) per shared row
  static constexpr int kStagePitch = BN + kPad;      // the staging tile's row
  static constexpr int dw_blocks(int64_t d) { return int((d + 127) / 128); }  // kDB
  static constexpr int rows(int kdb) { return kdb <= 3 ? 64 : 32; }           // BM
};

// The kernel's small shared-memory objects, after the tiles.
struct BwdFusedTail {
  float inv[BwdFusedCfg::BN];   // 1 / max(‖w_c‖, eps)
  float nrm[BwdFusedCfg::BN];   // ‖w_c‖
  float coef[BwdFusedCfg::BN];  // −r_c / ‖w_c‖² (0 at ‖w_c‖ <= eps)
  float r[BwdFusedCfg::kWarpsM][BwdFusedCfg::BN];  // per warp row: its column sums
  float corr[BwdFusedCfg::kWarpsN][64];            // per warp column: feature-scale row terms
  MarginParams margin;
};

constexpr size_t bwd_fused_smem_bytes(int64_t d) {
  using G = BwdFusedCfg;
  const int bm = G::rows(G::dw_blocks(d));
  return size_t(G::BN + 2 * bm) * size_t(d + G::kPad) * 2 + size_t(bm) * G::kStagePitch * 2 +
         sizeof(BwdFusedTail);
}
static_assert(bwd_fused_smem_bytes(384) <= 163 * 1024 && bwd_fused_smem_bytes(512) <= 163 * 1024,
              "W, two x tiles and the staging tile fit sm_80's opt-in shared memory");

// The S accumulators of a warp's (16·MI) x 16 tile: Cfg<T, true>'s fragment mapping (row,
// col, col_quad) with TR = 2·MI rows and TC = 4 columns per thread (GradEpilogue's F).
template <class T, int MI>
struct SFrag : Cfg<T, true> {
  static constexpr int TR = 2 * MI, TC = 4;
  template <class A>
  static __device__ __forceinline__ A& at(A (&acc)[TR][TC], int ri, int ci) { return acc[ri][ci]; }
};

// rows x d elements of 16-bit rows from src (d apart) into a padded shared tile, by 16-byte
// cp.async; rows >= valid are zero-filled (their products must be 0, not poison).
template <class T>
__device__ __forceinline__ void load_rows(T* dst, int pitch, const T* src, int64_t d, int rows,
                                          int64_t valid) {
  const int chunks = int(d / 8);
  for (int idx = threadIdx.x; idx < rows * chunks; idx += kThreads) {
    const int r = idx / chunks, ch = idx % chunks;
    T* p = dst + r * pitch + ch * 8;
    if (r < valid) {
      cp_async16(p, src + int64_t(r) * d + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(p) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <class T>
__device__ __forceinline__ uint32_t pack_pair(float v0, float v1) {
  const T pair[2] = {Type<T>::store(v0), Type<T>::store(v1)};
  uint32_t bits;
  memcpy(&bits, pair, sizeof(bits));
  return bits;
}

template <class T, bool kHard, int kDB>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_fused_kernel(const TileArgs<T> args, T* const grad_weight) {
  using G = BwdFusedCfg;
  constexpr int BM = G::rows(kDB);
  constexpr int MI = BM / 32;        // S: m16 blocks per warp (BM / 2 rows)
  constexpr int kGroups = 2 * kDB;   // dW: 16-column groups per warp, at most
  using F = SFrag<T, MI>;
  using Epi = GradEpilogue<F, kHard>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t d = args.in.d, n = args.in.n, c = args.in.c;
  const int pitch = int(d) + G::kPad;  // elements per row of W and of the x tiles
  T* const sw = reinterpret_cast<T*>(smem_raw);  // [BN][pitch]
  T* const sx = sw + G::BN * pitch;              // 2 x [BM][pitch]
  T* const sds = sx + 2 * BM * pitch;            // [BM][kStagePitch]
  BwdFusedTail* const tail = reinterpret_cast<BwdFusedTail*>(sds + BM * G::kStagePitch);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / G::kWarpsN, warp_n = warp % G::kWarpsN;
  const int64_t ct = blockIdx.x;  // the chunk's 64-class tile
  const int64_t ct_local0 = ct * G::BN;
  const int64_t cls0 = args.c0 + ct_local0;  // its first class
  const int row_tiles = int((n + BM - 1) / BM);
  const int groups = int(d / G::kDStep);  // dW: the warp's 16-column groups, <= kGroups

  if (tid == 0) tail->margin = args.margin;
  load_rows(sw, pitch, args.in.weight + cls0 * d, d, G::BN, c - cls0);
  cp_async_commit();
  load_rows(sx, pitch, args.in.x, d, BM, n);
  cp_async_commit();

  // ‖w_c‖ from the resident W rows: 4 consecutive threads per class, 16-byte chunks
  // part, part + 4, ... each, then over the 4 lanes (fixed order).
  cp_async_wait<1>();
  __syncthreads();
  {
    const int cls = tid >> 2, part = tid & 3;
    const uint4* row = reinterpret_cast<const uint4*>(sw + cls * pitch);
    float ss = 0.f;
    for (int ch = part; ch < int(d / 8); ch += 4) ss += WeightNorm<T>::sq16(row[ch], static_cast<T*>(nullptr));
    ss = lanes_sum<0, 2>(ss);
    if (part == 0) {
      const float nrm = vsqrt(ss);
      tail->nrm[cls] = nrm;
      tail->inv[cls] = inverse_norm(nrm);
    }
  }
  // (read after the first tile's barrier)

  const int wm0 = warp_m * (BM / 2);             // S: the warp's first row of the x tile
  const int wn0 = warp_n * 16;                   // S: its first class of the CTA's 64
  const int dm0 = warp_m * 32;                   // dW: its first class
  const int64_t col0 = cls0 + wn0;               // S: its first class, global
  const int64_t c_left = c - col0;               // < 0: past c
  const int c_lim = int(c_left < 0 ? 0 : c_left < 16 ? c_left : 16);
  const float* const inv = tail->inv + wn0;
  const bool external = args.margin.kind == MarginKind::External;
  const bool fs = args.margin.feature_scale;

  float acc_w[4][4 * kGroups];  // dW: acc_w[2 mi + h][4 p + 2 b + e] (mma_m16n16's layout)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4 * kGroups; ++j) acc_w[i][j] = 0.f;
  }
  float rsum[F::TC];  // Σ over the walk of dc·ĉ, per column of the thread
#pragma unroll
  for (int ci = 0; ci < F::TC; ++ci) rsum[ci] = 0.f;

  for (int t = 0; t < row_tiles; ++t) {
    const int b = t & 1;
    const int64_t row0 = int64_t(t) * BM;
    const T* const xs = sx + b * BM * pitch;
    cp_async_wait<0>();
    __syncthreads();  // tile t landed; every warp is past tile t − 1's dW (see the header)
    if (t + 1 < row_tiles) {
      load_rows(sx + (b ^ 1) * BM * pitch, pitch, args.in.x + (row0 + BM) * d, d, BM,
                n - row0 - BM);
    }
    cp_async_commit();

    // S = x_tile Wᵀ: the warp's BM / 2 rows x 16 classes.
    float acc[F::TR][F::TC];
#pragma unroll
    for (int ri = 0; ri < F::TR; ++ri) {
#pragma unroll
      for (int ci = 0; ci < F::TC; ++ci) acc[ri][ci] = 0.f;
    }
#pragma unroll 4
    for (int kk = 0; kk < int(d); kk += 16) {
      uint32_t bf[4];
      ldsm_b16<false>(bf, sw, pitch, wn0, kk, lane);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        uint32_t af[4];
        ldsm_a16<false>(af, xs, pitch, wm0 + 16 * mi, kk, lane);
        mma_m16n16<T>(acc, mi, 0, af, bf);
      }
    }

    // dS' per row, into the scratch and (/ ‖x_i‖, 16-bit) into the staging tile.
#pragma unroll
    for (int ri = 0; ri < F::TR; ++ri) {
      const int r = wm0 + F::row(ri, lane);
      const int64_t gr = row0 + r;
      const bool row_ok = gr < n;
      const RowInputs<kHard> row = load_row_inputs<kHard>(args, gr);
      const int64_t yt = int64_t(row.label) - col0;
      const int yl = row.label >= 0 && yt >= 0 && yt < 16 ? int(yt) : -1;
      float corr = 0.f;
      Epi::row(acc, ri, lane, row.g, row.xinv, inv, row_ok && c_lim == 16, row_ok ? c_lim : 0,
               yl, row.gt, &tail->margin, external, fs, rsum, corr);
      T* const out = args.scratch + gr * args.ld + ct_local0 + wn0;
#pragma unroll
      for (int j = 0; j < F::TC / 2; ++j) {
        const int cl = F::col(2 * j, lane);
        const float v0 = acc[ri][2 * j], v1 = acc[ri][2 * j + 1];
        *reinterpret_cast<uint32_t*>(out + cl) = pack_pair<T>(v0, v1);
        *reinterpret_cast<uint32_t*>(sds + r * G::kStagePitch + wn0 + cl) =
            pack_pair<T>(v0 * row.xinv, v1 * row.xinv);
      }
      if (fs) {  // uniform
        corr = lanes_sum<0, 2>(corr);
        if ((lane & 3) == 0) tail->corr[warp_n][r] = corr;
      }
    }
    __syncthreads();  // the staging tile and the row sums are complete
    if (fs && tid < BM) {
      float v = tail->corr[0][tid];
#pragma unroll
      for (int w = 1; w < G::kWarpsN; ++w) v += tail->corr[w][tid];
      args.corr_part[ct * args.n_pad + row0 + tid] = v;
    }

    // dW += stagedᵀ x_tile over the tile's BM rows.
#pragma unroll
    for (int kk = 0; kk < BM; kk += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) ldsm_a16<true>(af[mi], sds, G::kStagePitch, dm0 + 16 * mi, kk, lane);
#pragma unroll
      for (int p = 0; p < kGroups; ++p) {
        if (p < groups) {
          uint32_t bf[4];
          ldsm_b16<true>(bf, xs, pitch, G::kGroup * (warp_n + G::kWarpsN * p), kk, lane);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) mma_m16n16<T>(acc_w, mi, p, af[mi], bf);
        }
      }
    }
  }
  cp_async_wait<0>();

  // r_c: over the lanes of a column (lane bits 2-4), then the 2 warp rows in order.
#pragma unroll
  for (int ci = 0; ci < F::TC; ++ci) rsum[ci] = lanes_sum<2, 5>(rsum[ci]);
  if ((lane >> 2) == 0) {
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) tail->r[warp_m][wn0 + F::col(ci, lane)] = rsum[ci];
  }
  __syncthreads();  // also: every warp's last dW is done, the x buffers are free
  if (tid < G::BN) {
    const float r = tail->r[0][tid] + tail->r[1][tid];
    const float nrm = tail->nrm[tid];
    tail->coef[tid] = nrm > Consts<float>::kNormEps ? -r / (nrm * nrm) : 0.f;
  }
  __syncthreads();

  // dW = acc − w_c r_c / ‖w_c‖² as T, staged [class][pitch] over the x buffers.
  T* const out_stage = sx;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = dm0 + 16 * mi + 8 * h + (lane >> 2);
      const float coef = tail->coef[m];
#pragma unroll
      for (int p = 0; p < kGroups; ++p) {
        if (p >= groups) continue;
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          const int col = G::kGroup * (warp_n + G::kWarpsN * p) + 8 * bb + 2 * (lane & 3);
          T w2[2];
          memcpy(w2, sw + m * pitch + col, sizeof(w2));
          *reinterpret_cast<uint32_t*>(out_stage + m * pitch + col) =
              pack_pair<T>(acc_w[2 * mi + h][4 * p + 2 * bb] + coef * Type<T>::load(w2[0]),
                           acc_w[2 * mi + h][4 * p + 2 * bb + 1] + coef * Type<T>::load(w2[1]));
        }
      }
    }
  }
  __syncthreads();
  // Copy out: the CTA's valid classes are consecutive rows of dW, 16 bytes per store.
  const int64_t left = c - cls0;
  const int rows = int(left < G::BN ? left : G::BN);
  const int chunks = int(d / 8);
  uint4* const dst = reinterpret_cast<uint4*>(grad_weight + cls0 * d);
  for (int idx = tid; idx < rows * chunks; idx += kThreads) {
    const int m = idx / chunks, ch = idx % chunks;
    dst[idx] = *reinterpret_cast<const uint4*>(out_stage + m * pitch + ch * 8);
  }
}

}  // namespace dev

namespace {

using G = dev::BwdFusedCfg;

template <class T>
using FusedKernel = decltype(&dev::bwd_fused_kernel<T, false, 1>);

template <class T, bool kHard>
FusedKernel<T> fused_kernel_for(int dw_blocks) {
  switch (dw_blocks) {
    case 1: return dev::bwd_fused_kernel<T, kHard, 1>;
    case 2: return dev::bwd_fused_kernel<T, kHard, 2>;
    case 3: return dev::bwd_fused_kernel<T, kHard, 3>;
    default: return dev::bwd_fused_kernel<T, kHard, 4>;
  }
}

// The instantiation for p: hard examples or not, kDB from d.
template <class T>
FusedKernel<T> fused_kernel(const BackwardParams& p) {
  const int blocks = G::dw_blocks(p.d);
  return p.hard_threshold != nullptr ? fused_kernel_for<T, true>(blocks)
                                     : fused_kernel_for<T, false>(blocks);
}

// The most dynamic shared memory a block may opt in to on compute capability `arch`
// (major·10 + minor; the CUDA programming guide's table), 0 where this build has no machine
// code the fused kernel runs on.
size_t smem_optin_bytes(int arch) {
  switch (arch) {
    case 80: case 87: return size_t(163) << 10;
    case 86: case 89: return size_t(99) << 10;
    case 90: return size_t(227) << 10;
    default: return 0;
  }
}

}  // namespace

bool bwd_fused_eligible(const BackwardParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) && p.subcenters == 1 &&
         p.class_index == nullptr && p.d % G::kDStep == 0 && p.d >= G::kDStep &&
         p.d <= G::kMaxD && dev::aligned16(p.x) && dev::aligned16(p.weight) &&
         dev::aligned16(p.grad_weight) && dev::bwd_fused_smem_bytes(p.d) <= smem_optin_bytes(p.arch);
}

template <class T>
cudaError_t prepare_bwd_fused(const BackwardParams& p) {
  return dev::allow_smem(fused_kernel<T>(p), dev::bwd_fused_smem_bytes(p.d));
}

template <class T>
cudaError_t launch_bwd_fused(const BackwardParams& p, const dev::TileArgs<T>& args, int64_t kc,
                             cudaStream_t stream) {
  const unsigned grid = unsigned(dev::ceil_div(kc, int64_t(G::BN)));
  const auto kernel = fused_kernel<T>(p);
  kernel<<<grid, dev::kThreads, dev::bwd_fused_smem_bytes(p.d), stream>>>(
      args, static_cast<T*>(p.grad_weight));
  return cudaGetLastError();
}

template cudaError_t prepare_bwd_fused<__nv_bfloat16>(const BackwardParams&);
template cudaError_t prepare_bwd_fused<__half>(const BackwardParams&);
template cudaError_t launch_bwd_fused<__nv_bfloat16>(const BackwardParams&,
                                                     const dev::TileArgs<__nv_bfloat16>&, int64_t,
                                                     cudaStream_t);
template cudaError_t launch_bwd_fused<__half>(const BackwardParams&, const dev::TileArgs<__half>&,
                                              int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace margin_ops
