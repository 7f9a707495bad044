// The CTA tile GEMM of the margin_lse kernels and the cosine tile built on it: tile
// configurations per element type, the cp.async global -> shared tile loads, the warp-level
// MMA (mma.sync with ldmatrix for 16-bit types, mma.sync on TF32, FFMA/DFMA otherwise) in a
// pipelined CTA GEMM, and the cosine tile of both passes (x·W products with the W norms
// accumulated from the same shared-memory stages). See margin_lse_kernels.cuh for the design.
// Only CUDA headers here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "margin_lse_dtype.cuh"
#include "margin_lse_layout.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_ptx.cuh"
#include "margin_lse_reduce.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

constexpr int kStages = 3;  // cp.async pipeline depth

// ------------------------------------------------------------------------------------
// Tile configurations (all 256 threads = 8 warps as kWarpsM x kWarpsN).
// A thread's accumulator is TR x TC values; row(ri) / col(ci) give their coordinates
// inside the warp tile (WM x WN), at(acc, ri, ci) the value, col_quad(col) the lane bits
// 0-1 of the lanes holding column col (the fragment mapping of margin_lse_epilogue.cuh).
// Lanes sharing a row differ only in lane bits 0-1 and lanes sharing a column only in lane
// bits 2-4, for every config.
// ------------------------------------------------------------------------------------
template <class T, bool kTC = Type<T>::kTensorCore>
struct Cfg;

// The calling thread's place in a CTA tile of config C: its lane, its warp's row and column
// in the kWarpsM x kWarpsN grid of warps, and the first row and column of the warp's
// WM x WN tile (so `const auto [lane, warp_m, warp_n, wm0, wn0] = warp_place<C>();`).
struct WarpPlace {
  int lane, warp_m, warp_n, wm0, wn0;
};

template <class C>
__device__ __forceinline__ WarpPlace warp_place() {
  const int warp = int(threadIdx.x) >> 5;
  const int warp_m = warp / C::kWarpsN, warp_n = warp % C::kWarpsN;
  return {int(threadIdx.x) & 31, warp_m, warp_n, warp_m * C::WM, warp_n * C::WN};
}

// bf16 / fp16: mma.sync.m16n8k16, TF32: mma.sync.m16n8k8; per warp 4 x 4 blocks of 16 x 8,
// whose accumulator fragments have the same layout for both instructions. A k tile is 64
// bytes of a row (32 16-bit or 16 TF32 elements).
template <class T>
struct Cfg<T, true> {
  static constexpr bool kTensorCore = true;
  static constexpr int BM = 128, BN = 128, BK = 64 / int(sizeof(T));
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int WM = 64, WN = 32;
  static constexpr int TR = 8, TC = 8;
  // m16 block ri/2, upper/lower 8 rows ri%2; n8 block ci/2, column pair element ci%2.
  static __device__ __forceinline__ int row(int ri, int lane) {
    return (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2);
  }
  static __device__ __forceinline__ int col(int ci, int lane) {
    return (ci >> 1) * 8 + (lane & 3) * 2 + (ci & 1);
  }
  static __device__ __forceinline__ int col_quad(int col) { return (col >> 1) & 3; }
  template <class A>
  static __device__ __forceinline__ A& at(A (&acc)[TR][TC], int ri, int ci) { return acc[ri][ci]; }
  static constexpr bool kPairCols = true;  // col(2j + 1) == col(2j) + 1
  static constexpr int kMinBlocks = 2;     // 2 CTAs per SM: at most 128 registers
};

// float / double: SIMT outer products; lanes as 8 (rows) x 4 (columns), strided.
template <class T>
struct Cfg<T, false> {
  static constexpr bool kTensorCore = false;
  static constexpr bool kWide = sizeof(T) == 8;
  static constexpr int BM = kWide ? 64 : 128, BN = kWide ? 64 : 128, BK = 16;
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;
  static constexpr int TR = WM / 8, TC = WN / 4;
  static __device__ __forceinline__ int row(int ri, int lane) { return (lane >> 2) + 8 * ri; }
  static __device__ __forceinline__ int col(int ci, int lane) { return (lane & 3) + 4 * ci; }
  static __device__ __forceinline__ int col_quad(int col) { return col & 3; }
  template <class A>
  static __device__ __forceinline__ A& at(A (&acc)[TR][TC], int ri, int ci) { return acc[ri][ci]; }
  static constexpr bool kPairCols = false;
  static constexpr int kMinBlocks = 1;
};

// ------------------------------------------------------------------------------------
// Global -> shared tile copy: smem[r * pitch + c] = g[row(r0 + r) * ld + c0 + c] for
// r < ROWS, c < COLS, zero where r0 + r >= r_lim or c0 + c >= c_lim; row(q) = index[q], or q
// when index is nullptr (the stored rows of a gathered operand). 16-byte cp.async when
// `vec` (ld and the base pointer 16-byte aligned, c0 a multiple of 16 bytes) and the chunk
// is fully inside; a synchronous scalar copy for partial chunks or !vec. `pitch` * sizeof(T)
// must be a multiple of 16.
// ------------------------------------------------------------------------------------
template <class T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* smem, int pitch, const T* __restrict__ g, int64_t ld,
                                          int64_t r0, int64_t c0, int64_t r_lim, int64_t c_lim,
                                          bool vec, const int64_t* __restrict__ index) {
  constexpr int V = 16 / int(sizeof(T));
  constexpr int kChunksPerRow = COLS / V;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(COLS % V == 0 && kChunks % kThreads == 0, "tile shape vs. 256 threads");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int q = int(threadIdx.x) + it * kThreads;
    const int r = q / kChunksPerRow;
    const int c = (q % kChunksPerRow) * V;
    T* dst = smem + r * pitch + c;
    const int64_t gr = r0 + r, gc = c0 + c;
    if (gr < r_lim && gc < c_lim) {
      const T* src = g + (index != nullptr ? index[gr] : gr) * ld + gc;
      if (vec && gc + V <= c_lim) {
        cp_async16(dst, src);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) dst[e] = gc + e < c_lim ? src[e] : Type<T>::store(0);
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// ------------------------------------------------------------------------------------
// Warp-level mma.sync pieces (16-bit T), shared by TileGemm and the mma.sync fused backward
// (margin_lse_bwd_fused_sm80.cu), on shared-memory tiles of `pitch` elements per stored row
// (16-byte aligned rows): the A fragment of one m16 x k16 block and the B fragments of one
// n16 x k16 block (two n8 blocks) by ldmatrix(.trans), and their two m16n8k16 products into
// Cfg<T, true>'s accumulator layout, acc[2 mi + h][4 nj + 2 b + e] (m16 block mi, n8 block
// 2 nj + b). kTrans: the operand stored [k][m] (or [k][n]), else [m][k] ([n][k]).
// ------------------------------------------------------------------------------------
template <bool kTrans, class T>
__device__ __forceinline__ void ldsm_a16(uint32_t (&a)[4], const T* s, int pitch, int m0, int k0,
                                         int lane) {
  const T* p;
  if constexpr (kTrans) {  // matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
    p = s + (k0 + (lane & 7) + (lane >> 4) * 8) * pitch + m0 + ((lane >> 3) & 1) * 8;
  } else {
    p = s + (m0 + (lane & 15)) * pitch + k0 + (lane >> 4) * 8;
  }
  ldmatrix_x4<kTrans>(a, p);
}

// Matrices (n0-7, k0-7) (n0-7, k8-15) (n8-15, k0-7) (n8-15, k8-15): b[0..1] the B fragment
// of n8 block n0, b[2..3] that of n0 + 8.
template <bool kTrans, class T>
__device__ __forceinline__ void ldsm_b16(uint32_t (&b)[4], const T* s, int pitch, int n0, int k0,
                                         int lane) {
  const T* p;
  if constexpr (kTrans) {
    p = s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + n0 + (lane >> 4) * 8;
  } else {
    p = s + (n0 + (lane & 7) + (lane >> 4) * 8) * pitch + k0 + ((lane >> 3) & 1) * 8;
  }
  ldmatrix_x4<kTrans>(b, p);
}

template <class T, int TR, int TC>
__device__ __forceinline__ void mma_m16n16(float (&acc)[TR][TC], int mi, int nj,
                                           const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
  mma_16816<T>(acc[2 * mi][4 * nj], acc[2 * mi][4 * nj + 1], acc[2 * mi + 1][4 * nj],
               acc[2 * mi + 1][4 * nj + 1], a, b_lo);
  mma_16816<T>(acc[2 * mi][4 * nj + 2], acc[2 * mi][4 * nj + 3], acc[2 * mi + 1][4 * nj + 2],
               acc[2 * mi + 1][4 * nj + 3], a, b_hi);
}

// One GEMM operand in global memory. For A, "mn" is M (the tile's rows); for B, N (its
// columns). kTrans: stored [K][MN] (MN contiguous), else [MN][K] (K contiguous). Stored row
// q starts at ptr + row(q) * ld, row(q) = index[q] when `index` is given (W's rows of the
// classes of class_index, read in place), else q.
template <class T>
struct Operand {
  const T* ptr;
  int64_t ld;      // elements between consecutive stored rows
  int64_t mn0;     // first M (or N) index of the tile
  int64_t mn_lim;  // M (or N) indices >= mn_lim read as zero
  int64_t k_lim;   // K indices >= k_lim read as zero
  bool vec;        // 16-byte copies allowed (ld and ptr 16-byte aligned)
  const int64_t* index = nullptr;  // stored row -> row of ptr; nullptr: identity

  // The address of stored row q (q within the operand's limits).
  __device__ __forceinline__ const T* row(int64_t q) const {
    return ptr + (index != nullptr ? index[q] : q) * ld;
  }
};

struct NoExtra {
  template <class T>
  __device__ __forceinline__ void operator()(const T*) {}
};

// ------------------------------------------------------------------------------------
// CTA GEMM: acc (BM x BN tile, per-thread TR x TC) = Σ_{k in [k_begin, k_end)} A B.
// `extra(sB)` runs on every B stage after its MMAs (the W-norm accumulation).
// Begins and ends with the pipeline drained and a barrier, so the caller may reuse the
// stage buffers and any shared memory written before the call is visible in it.
// ------------------------------------------------------------------------------------
template <class T, bool kATrans, bool kBTrans>
struct TileGemm {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  static constexpr bool kTf32 = std::is_same_v<T, Tf32>;
  // Row padding: 16 bytes, so that 16-byte copies stay aligned and ldmatrix / the SIMT
  // reads hit distinct banks. TF32 fragments are read one 4-byte element per lane, 4 k
  // values x 8 m/n values per read: an MN-contiguous tile needs rows 8 banks apart (32
  // bytes of padding) for those 32 lanes to use 32 banks.
  static constexpr int kPad = 16 / int(sizeof(T));
  static constexpr int kPadTrans = (kTf32 ? 32 : 16) / int(sizeof(T));
  static constexpr int kPitchA = kATrans ? C::BM + kPadTrans : C::BK + kPad;
  static constexpr int kPitchB = kBTrans ? C::BN + kPadTrans : C::BK + kPad;
  static constexpr int kAElems = kATrans ? C::BK * kPitchA : C::BM * kPitchA;
  static constexpr int kBElems = kBTrans ? C::BK * kPitchB : C::BN * kPitchB;
  static constexpr int kStageElems = kAElems + kBElems;
  static constexpr size_t kSmemBytes = size_t(kStages) * kStageElems * sizeof(T);
  static_assert((kAElems * sizeof(T)) % 16 == 0 && (kStageElems * sizeof(T)) % 16 == 0,
                "stage alignment");

  // Per-thread view of one operand's tile copy: the stored tile is ROWS x COLS (K rows when
  // the operand is stored [K][MN]); this thread copies kIters 16-byte chunks of it.
  template <int ROWS, int COLS, bool kKRows>
  struct Copier {
    static constexpr int V = 16 / int(sizeof(T));
    static constexpr int kChunksPerRow = COLS / V;
    static constexpr int kIters = ROWS * kChunksPerRow / kThreads;
    static_assert(COLS % V == 0 && (ROWS * kChunksPerRow) % kThreads == 0, "tile vs. threads");
    // Chunk address at k = 0 (dereferenced only for interior tiles). Stored rows are K
    // indices when kKRows: a gathered operand (op.index) then has no fixed base, and its
    // chunk addresses are formed per load.
    const T* base[kIters];
    int64_t k_stride;       // elements per unit of k
    bool mn_interior;       // the tile's MN range is entirely below mn_lim
    int pitch;

    __device__ __forceinline__ Copier(const Operand<T>& op, int pitch_) : pitch(pitch_) {
      mn_interior = op.mn0 + (kKRows ? COLS : ROWS) <= op.mn_lim;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int q = int(threadIdx.x) + it * kThreads;
        const int r = q / kChunksPerRow, c = (q % kChunksPerRow) * V;
        if constexpr (kKRows) {
          base[it] = op.ptr + int64_t(r) * op.ld + op.mn0 + c;
        } else {  // rows past mn_lim are never read through base: no index lookup for them
          base[it] = op.mn0 + r < op.mn_lim ? op.row(op.mn0 + r) + c : op.ptr;
        }
      }
      k_stride = kKRows ? op.ld : 1;
    }

    __device__ __forceinline__ void load(T* smem, const Operand<T>& op, int64_t k) const {
      const bool interior = op.vec && mn_interior && k + (kKRows ? ROWS : COLS) <= op.k_lim;
      if (interior) {  // uniform across the CTA
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          const int q = int(threadIdx.x) + it * kThreads;
          const int r = q / kChunksPerRow, c = (q % kChunksPerRow) * V;
          const T* src;
          if constexpr (kKRows) {
            src = op.index != nullptr ? op.row(k + r) + op.mn0 + c : base[it] + k * k_stride;
          } else {
            src = base[it] + k;
          }
          cp_async16(smem + r * pitch + c, src);
        }
      } else if constexpr (kKRows) {
        load_tile<T, ROWS, COLS>(smem, pitch, op.ptr, op.ld, k, op.mn0, op.k_lim, op.mn_lim,
                                 op.vec, op.index);
      } else {
        load_tile<T, ROWS, COLS>(smem, pitch, op.ptr, op.ld, op.mn0, k, op.mn_lim, op.k_lim,
                                 op.vec, op.index);
      }
    }
  };
  using CopyA = Copier<kATrans ? C::BK : C::BM, kATrans ? C::BM : C::BK, kATrans>;
  using CopyB = Copier<kBTrans ? C::BK : C::BN, kBTrans ? C::BN : C::BK, kBTrans>;

  // Tensor cores: per 16-wide k step, ldmatrix the warp's 4 A blocks (16 x 16) and 4 B
  // blocks (16 x 8, two per ldmatrix.x4), then 16 MMAs.
  static __device__ __forceinline__ void warp_mma_tc(Acc (&acc)[C::TR][C::TC], const T* sa,
                                                     const T* sb, int wm0, int wn0, int lane) {
    constexpr int MI = C::TR / 2, NI = C::TC / 2;
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 16) {
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldsm_a16<kATrans>(af[mi], sa, kPitchA, wm0 + mi * 16, kk, lane);
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t bf[4];
        ldsm_b16<kBTrans>(bf, sb, kPitchB, wn0 + nj * 16, kk, lane);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) mma_m16n16<T>(acc, mi, nj, af[mi], bf);
      }
    }
  }

  // Tensor cores on TF32: per 8-wide k step, each lane reads its A (16 x 8) and B (8 x 8)
  // fragment elements from shared memory (ldmatrix moves 16-bit elements only) and rounds
  // them to TF32; g = lane / 4 indexes M (or N), t = lane % 4 indexes K.
  // Order: the k step's B fragments (8 registers) first, then one m16 block's A fragment
  // (4) at a time, dead after its NB MMAs. The 16-bit loop's order (all MI A fragments,
  // then B) keeps 16 A registers live; with the rounding between each load and its MMA
  // that put the TF32 mainloop over the 128 registers of 2 CTAs/SM (fwd_main, bwd_tile
  // spilled). Each accumulator still sees the same MMAs in the same k order: same bits.
  static __device__ __forceinline__ void warp_mma_tf32(Acc (&acc)[C::TR][C::TC], const T* sa,
                                                       const T* sb, int wm0, int wn0, int lane) {
    constexpr int MI = C::TR / 2, NB = C::TC / 2;
    const int g = lane >> 2, t = lane & 3;
    auto a_at = [&](int m, int k) {
      return to_tf32(Type<T>::load(kATrans ? sa[k * kPitchA + m] : sa[m * kPitchA + k]));
    };
    auto b_at = [&](int n, int k) {
      return to_tf32(Type<T>::load(kBTrans ? sb[k * kPitchB + n] : sb[n * kPitchB + k]));
    };
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 8) {
      uint32_t bf[NB][2];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const int n = wn0 + nb * 8 + g;
        bf[nb][0] = b_at(n, kk + t);
        bf[nb][1] = b_at(n, kk + t + 4);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int m = wm0 + mi * 16 + g;
        const uint32_t af[4] = {a_at(m, kk + t), a_at(m + 8, kk + t), a_at(m, kk + t + 4),
                                a_at(m + 8, kk + t + 4)};
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          mma_1688_tf32(acc[2 * mi][2 * nb], acc[2 * mi][2 * nb + 1], acc[2 * mi + 1][2 * nb],
                        acc[2 * mi + 1][2 * nb + 1], af, bf[nb]);
        }
      }
    }
  }

  static __device__ __forceinline__ void warp_mma_simt(Acc (&acc)[C::TR][C::TC], const T* sa,
                                                       const T* sb, int wm0, int wn0, int lane) {
#pragma unroll 4
    for (int kk = 0; kk < C::BK; ++kk) {
      Acc av[C::TR], bv[C::TC];
#pragma unroll
      for (int ri = 0; ri < C::TR; ++ri) {
        const int r = wm0 + C::row(ri, lane);
        av[ri] = Type<T>::load(kATrans ? sa[kk * kPitchA + r] : sa[r * kPitchA + kk]);
      }
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) {
        const int c = wn0 + C::col(ci, lane);
        bv[ci] = Type<T>::load(kBTrans ? sb[kk * kPitchB + c] : sb[c * kPitchB + kk]);
      }
#pragma unroll
      for (int ri = 0; ri < C::TR; ++ri) {
#pragma unroll
        for (int ci = 0; ci < C::TC; ++ci) acc[ri][ci] = fma(av[ri], bv[ci], acc[ri][ci]);
      }
    }
  }

  template <class Extra>
  static __device__ __forceinline__ void run(Acc (&acc)[C::TR][C::TC], const Operand<T>& a,
                                             const Operand<T>& b, int64_t k_begin,
                                             int64_t k_end, T* smem, Extra& extra) {
    const auto [lane, warp_m, warp_n, wm0, wn0] = warp_place<C>();
#pragma unroll
    for (int ri = 0; ri < C::TR; ++ri) {
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) acc[ri][ci] = Acc(0);
    }
    const int64_t k_tiles = k_end > k_begin ? (k_end - k_begin + C::BK - 1) / C::BK : 0;
    const CopyA copy_a(a, kPitchA);
    const CopyB copy_b(b, kPitchB);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) {
        copy_a.load(smem + s * kStageElems, a, k_begin + int64_t(s) * C::BK);
        copy_b.load(smem + s * kStageElems + kAElems, b, k_begin + int64_t(s) * C::BK);
      }
      cp_async_commit();
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<kStages - 2>();  // stage kt has landed (this thread's copies) ...
      __syncthreads();               // ... everyone's; and stage kt-1 is free again
      const int64_t next = kt + kStages - 1;
      if (next < k_tiles) {
        T* stage = smem + int(next % kStages) * kStageElems;
        copy_a.load(stage, a, k_begin + next * C::BK);
        copy_b.load(stage + kAElems, b, k_begin + next * C::BK);
      }
      cp_async_commit();
      const T* sa = smem + int(kt % kStages) * kStageElems;
      const T* sb = sa + kAElems;
      if constexpr (kTf32) {
        warp_mma_tf32(acc, sa, sb, wm0, wn0, lane);
      } else if constexpr (C::kTensorCore) {
        warp_mma_tc(acc, sa, sb, wm0, wn0, lane);
      } else {
        warp_mma_simt(acc, sa, sb, wm0, wn0, lane);
      }
      extra(sb);
    }
    cp_async_wait<0>();
    __syncthreads();
  }
};

// ------------------------------------------------------------------------------------
// ‖w_c‖² of the BN classes of a K-contiguous B tile ([BN][pitch]), accumulated stage by
// stage from the W tile already in shared memory. kThreads / BN consecutive threads share a
// class; each reads 32 bytes per stage.
// ------------------------------------------------------------------------------------
template <class T>
struct WeightNorm {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  static constexpr int kThreadsPerClass = kThreads / C::BN;
  static constexpr int kClassLaneBits = kThreadsPerClass == 4 ? 2 : 1;  // consecutive lanes
  static_assert(kThreadsPerClass == 1 << kClassLaneBits, "2 or 4 threads per class");
  static constexpr int kElemsPerThread = C::BK / kThreadsPerClass;
  static_assert(kElemsPerThread * sizeof(T) == 32, "two 16-byte smem reads per thread");
  static constexpr int kPitch = TileGemm<T, false, false>::kPitchB;

  Acc ss = Acc(0);

  static __device__ __forceinline__ float sq16(uint4 v, __nv_bfloat16*) {
    float s = 0.f;
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = __uint_as_float(w[i] << 16), hi = __uint_as_float(w[i] & 0xffff0000u);
      s = fmaf(lo, lo, fmaf(hi, hi, s));
    }
    return s;
  }
  static __device__ __forceinline__ float sq16(uint4 v, __half*) {
    float s = 0.f;
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 f = __half22float2(h);
      s = fmaf(f.x, f.x, fmaf(f.y, f.y, s));
    }
    return s;
  }
  static __device__ __forceinline__ float sq16(uint4 v, float*) {
    const float f[4] = {__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z),
                        __uint_as_float(v.w)};
    return fmaf(f[0], f[0], fmaf(f[1], f[1], fmaf(f[2], f[2], f[3] * f[3])));
  }
  static __device__ __forceinline__ float sq16(uint4 v, Tf32*) {  // norms from exact fp32
    return sq16(v, static_cast<float*>(nullptr));
  }
  static __device__ __forceinline__ double sq16(uint4 v, double*) {
    const double a = __hiloint2double(int(v.y), int(v.x));
    const double b = __hiloint2double(int(v.w), int(v.z));
    return fma(a, a, b * b);
  }

  __device__ __forceinline__ void operator()(const T* sb) {
    const int cls = threadIdx.x / kThreadsPerClass, part = threadIdx.x % kThreadsPerClass;
    const uint4* p = reinterpret_cast<const uint4*>(sb + cls * kPitch + part * kElemsPerThread);
    ss += sq16(p[0], static_cast<T*>(nullptr));
    ss += sq16(p[1], static_cast<T*>(nullptr));
  }

  // Reduces over the class's threads; writes ‖w‖ and 1 / max(‖w‖, eps) for tile column cls.
  // The caller must __syncthreads() before reading them.
  __device__ __forceinline__ void finish(Acc* s_norm, Acc* s_inv) {
    const Acc v = lanes_sum<0, kClassLaneBits>(ss);
    if (threadIdx.x % kThreadsPerClass == 0) {
      const int cls = threadIdx.x / kThreadsPerClass;
      const Acc nrm = vsqrt(v);
      if (s_norm != nullptr) s_norm[cls] = nrm;
      s_inv[cls] = inverse_norm(nrm);
    }
    ss = Acc(0);
  }
};

// The factor F(c) of a non-target logit s·F(c) and its slope: CurricularFace's
// hard_example (margin_math.h) in the kernels instantiated for hard examples (kHard), c
// itself in the others (which then carry no per-row threshold and t).
template <bool kHard, class A>
__device__ __forceinline__ TargetMargin<A> nontarget_factor(A c, A threshold, A t) {
  if constexpr (kHard) {
    return hard_example(c, threshold, t);
  } else {
    return {c, A(1)};
  }
}

// ------------------------------------------------------------------------------------
// The cosine tile of both passes, from their inputs x (n, d) and W (R, d) as given
// (K-contiguous, never normalized in memory). Class j has the K = `subcenters` rows
// r_j·K + k, k < K, of W (r_j = class_index[j], or j).
// ------------------------------------------------------------------------------------
template <class T>
struct ProblemInputs {
  using Acc = AccOf<T>;
  const T* x;              // (n, d)
  const T* weight;         // (R, d)
  const int64_t* labels;   // (n,)
  const int64_t* class_index;  // (c,) or nullptr
  const Acc* hard_threshold;   // (n,) or nullptr (then hard_t is too)
  const Acc* hard_t;           // (n,) or nullptr
  int64_t n, c, d;
  int64_t subcenters;      // K >= 1
  bool x_vec, w_vec;       // 16-byte row copies allowed (rows_vec; then also for a row stride K·d)

  // Sub-center `sub`'s W rows of classes [c0, c0 + ...) as a GEMM operand stored
  // [class][d]: tile columns from mn0 (relative to c0), K = d; consecutive classes are
  // K·d elements apart.
  __device__ __forceinline__ Operand<T> weight_rows(int64_t c0, int64_t mn0, int64_t sub) const {
    Operand<T> b{weight + sub * d, subcenters * d, mn0, c - c0, d, w_vec};
    if (class_index != nullptr) {
      b.index = class_index + c0;
    } else {
      b.ptr += c0 * subcenters * d;
    }
    return b;
  }
};

// The inputs of either pass (host side).
template <class T>
ProblemInputs<T> problem_inputs(const ProblemParams& p) {
  ProblemInputs<T> in;
  in.x = static_cast<const T*>(p.x);
  in.weight = static_cast<const T*>(p.weight);
  in.labels = p.labels;
  in.class_index = p.class_index;
  in.hard_threshold = static_cast<const AccOf<T>*>(p.hard_threshold);
  in.hard_t = static_cast<const AccOf<T>*>(p.hard_t);
  in.n = p.n;
  in.c = p.c;
  in.d = p.d;
  in.subcenters = p.subcenters;
  in.x_vec = rows_vec(in.x, p.d);
  in.w_vec = rows_vec(in.weight, p.d);
  return in;
}

// One BM x BN cosine tile (rows from row0, classes from col0) and the factors of its
// epilogue, which live in shared memory: a CTA declares `__shared__ CosineTile<T> tile;`
// and gives the GEMM kSmemBytes of dynamic shared memory. The cosine of the thread's
// accumulator entry (ri, ci) is acc * xinv[row] * inv[column], clamped to [-1, 1]: the
// normalization happens here, in the epilogue, not on the operands.
template <class T>
struct CosineTile {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  using Gemm = TileGemm<T, false, false>;
  static constexpr size_t kSmemBytes = Gemm::kSmemBytes;  // dynamic shared memory of `smem`

  Acc inv[C::BN];       // 1 / max(‖w_c‖, eps), by tile column (products)
  Acc xinv[C::BM];      // 1 / max(‖x_i‖, eps), by tile row (load_rows)
  Acc scale[C::BM];     // s_i: prep's scale
  Acc hard_thr[C::BM];  // hard_threshold_i, or 2 (above every cosine: no modulation)
  Acc hard_t[C::BM];    // hard_t_i (0 without)
  int32_t label[C::BM];  // y_i when it is a class in [0, c), else -1

  // The row factors of rows [row0, row0 + BM) (0, 0, 2, 0, -1 past n); visible after a
  // barrier.
  __device__ __forceinline__ void load_rows(const ProblemInputs<T>& in, int64_t row0,
                                            const Acc* x_norm, const Acc* row_scale) {
    for (int r = threadIdx.x; r < C::BM; r += kThreads) {
      const int64_t gr = row0 + r;
      Acc sc = Acc(0), xi = Acc(0), thr = Acc(2), ht = Acc(0);
      int32_t y = -1;
      if (gr < in.n) {
        sc = row_scale[gr];
        xi = inverse_norm(x_norm[gr]);
        const int64_t lab = in.labels[gr];
        if (lab >= 0 && lab < in.c) y = int32_t(lab);
        if (in.hard_threshold != nullptr) {
          thr = in.hard_threshold[gr];
          ht = in.hard_t[gr];
        }
      }
      scale[r] = sc;
      xinv[r] = xi;
      hard_thr[r] = thr;
      hard_t[r] = ht;
      label[r] = y;
    }
  }

  // acc = the products x_i · w_c of the tile at (row0, col0) (zero past n and c) with
  // sub-center `sub`'s rows of W, and from the same W stages `inv` and, when `norm` is not
  // nullptr, norm[column] = ‖w_c‖ of those rows. Ends with a barrier.
  __device__ __forceinline__ void products(Acc (&acc)[C::TR][C::TC], const ProblemInputs<T>& in,
                                           int64_t row0, int64_t col0, T* smem, Acc* norm,
                                           int64_t sub = 0) {
    const Operand<T> a{in.x, in.d, row0, in.n, in.d, in.x_vec};
    const Operand<T> b = in.weight_rows(0, col0, sub);
    WeightNorm<T> wnorm;
    Gemm::run(acc, a, b, 0, (in.d + C::BK - 1) / C::BK * C::BK, smem, wnorm);
    wnorm.finish(norm, inv);
    __syncthreads();
  }

  // The (unclamped) cosine of the thread's accumulator entry (ri, ci) of the last
  // products().
  __device__ __forceinline__ Acc raw_cosine(const Acc (&acc)[C::TR][C::TC], int ri, int ci,
                                            int lane, int wm0, int wn0) const {
    return acc[ri][ci] * xinv[wm0 + C::row(ri, lane)] * inv[wn0 + C::col(ci, lane)];
  }

  // K > 1: acc = the clamped cosines of the tile's classes, each the largest over its
  // sub-centers (the first on ties, NaN wins as in torch.max: sub_center_wins), by K
  // products() passes. Ends with a barrier; `inv` is then the last sub-center's.
  __device__ __forceinline__ void max_cosines(Acc (&acc)[C::TR][C::TC], const ProblemInputs<T>& in,
                                              int64_t row0, int64_t col0, T* smem) {
    const auto [lane, warp_m, warp_n, wm0, wn0] = warp_place<C>();
    products(acc, in, row0, col0, smem, nullptr, 0);
#pragma unroll
    for (int ri = 0; ri < C::TR; ++ri) {
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) acc[ri][ci] = clamp_unit(raw_cosine(acc, ri, ci, lane, wm0, wn0));
    }
    for (int64_t sub = 1; sub < in.subcenters; ++sub) {
      Acc part[C::TR][C::TC];
      products(part, in, row0, col0, smem, nullptr, sub);
#pragma unroll
      for (int ri = 0; ri < C::TR; ++ri) {
#pragma unroll
        for (int ci = 0; ci < C::TC; ++ci) {
          const Acc cs = clamp_unit(raw_cosine(part, ri, ci, lane, wm0, wn0));
          if (sub_center_wins(cs, acc[ri][ci])) acc[ri][ci] = cs;
        }
      }
    }
  }

  // The tile column of row r's target in the tile of classes from col0, or -1 when the
  // target lies outside the tile (or the row has none).
  __device__ __forceinline__ int target_column(int r, int64_t col0) const {
    const int64_t diff = int64_t(label[r]) - col0;
    return label[r] >= 0 && diff >= 0 && diff < C::BN ? int(diff) : -1;
  }
};

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
