// Device building blocks shared by margin_lse_forward.cu and margin_lse_backward.cu: dtype
// traits, tile configurations, the cp.async tile loader, the warp-level MMA (mma.sync for
// 16-bit types and TF32, FFMA/DFMA otherwise), the pipelined CTA GEMM, reductions and the
// prep kernel; the PTX itself is in margin_lse_ptx.cuh. See margin_lse_kernels.cuh for the
// design. Only CUDA headers here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "margin_lse_kernels.cuh"
#include "margin_lse_ptx.cuh"

namespace margin_ops {
namespace cuda {

namespace dev {

// float32 storage whose products go through the tensor cores as TF32 (kFloat32Tf32): a
// distinct element type, so that every kernel gets a TF32 instantiation beside the
// fp32-exact SIMT one. Same size and layout as float.
struct Tf32 {
  float v;
};

}  // namespace dev

// Calls f(T{}) with the element type T of `dtype` (host side: picks the kernel
// instantiation; the glue admits only these dtypes).
template <class F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32: return f(float{});
    case DType::kFloat32Tf32: return f(dev::Tf32{});
    default: return f(double{});
  }
}
namespace dev {

constexpr int kThreads = 256;  // every kernel
constexpr int kStages = 3;     // cp.async pipeline depth

// ------------------------------------------------------------------------------------
// dtype traits
// ------------------------------------------------------------------------------------
template <class T>
struct Type;

template <>
struct Type<__nv_bfloat16> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Type<__half> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Type<float> {
  using Acc = float;
  static constexpr bool kTensorCore = false;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Type<Tf32> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ float load(Tf32 v) { return v.v; }
  static __device__ __forceinline__ Tf32 store(float v) { return Tf32{v}; }
};

template <>
struct Type<double> {
  using Acc = double;
  static constexpr bool kTensorCore = false;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <class T>
using AccOf = typename Type<T>::Acc;

__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}
__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float vsqrt(float a) { return sqrtf(a); }
__device__ __forceinline__ double vsqrt(double a) { return sqrt(a); }

// 2^x. float: the MUFU approximation (rel. error ~2^-22, ex2(-inf) = 0); double: exact.
__device__ __forceinline__ float fast_exp2(float x) { return ex2_approx(x); }
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }

// Clamp to [-1, 1] that lets NaN through (as torch.clamp does).
template <class A>
__device__ __forceinline__ A clamp_unit(A v) {
  return v < A(-1) ? A(-1) : (v > A(1) ? A(1) : v);
}

template <class A>
struct Consts {
  static constexpr A kLog2e = A(1.4426950408889634073599246810019);
  static constexpr A kLn2 = A(0.69314718055994530941723212145818);
  static constexpr A kNormEps = A(margin_ops::kNormEps);
};

// 1 / max(‖v‖, eps): the normalization factor of a row of x or W (F.normalize's floor).
// One expression for every kernel, so that the forward's and the backward's cosines agree
// to the bit.
template <class A>
__device__ __forceinline__ A inverse_norm(A nrm) {
  return A(1) / vmax(nrm, Consts<A>::kNormEps);
}

// φ(c) and its slope, one out-of-line copy per Acc type: the target entry is rare (one per
// row over all C classes), so the epilogues call it instead of inlining the margin's
// transcendental code at every unrolled call site. `p` points to a shared-memory copy.
template <class A>
__device__ __noinline__ TargetMargin<A> eval_margin(A c, const MarginParams* p) {
  return target_margin<A>(c, *p);
}

// ------------------------------------------------------------------------------------
// Tile configurations (all 256 threads = 8 warps as kWarpsM x kWarpsN).
// A thread's accumulator is TR x TC values; row(ri) / col(ci) give their coordinates
// inside the warp tile (WM x WN). Lanes sharing a row differ only in lane bits 0-1 and
// lanes sharing a column only in lane bits 2-4, for every config.
// ------------------------------------------------------------------------------------
template <class T, bool kTC = Type<T>::kTensorCore>
struct Cfg;

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
  static constexpr bool kPairCols = false;
  static constexpr int kMinBlocks = 1;
};

// ------------------------------------------------------------------------------------
// Global -> shared tile copy: smem[r * pitch + c] = g[(r0 + r) * ld + c0 + c] for
// r < ROWS, c < COLS, zero where r0 + r >= r_lim or c0 + c >= c_lim. 16-byte cp.async when
// `vec` (ld and the base pointer 16-byte aligned, c0 a multiple of 16 bytes) and the chunk
// is fully inside; a synchronous scalar copy for partial chunks or !vec. `pitch` * sizeof(T)
// must be a multiple of 16.
// ------------------------------------------------------------------------------------
template <class T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* smem, int pitch, const T* __restrict__ g, int64_t ld,
                                          int64_t r0, int64_t c0, int64_t r_lim, int64_t c_lim,
                                          bool vec) {
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
      const T* src = g + gr * ld + gc;
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

// One GEMM operand in global memory. For A, "mn" is M (the tile's rows); for B, N (its
// columns). kTrans: stored [K][MN] (MN contiguous), else [MN][K] (K contiguous).
template <class T>
struct Operand {
  const T* ptr;
  int64_t ld;      // elements between consecutive stored rows
  int64_t mn0;     // first M (or N) index of the tile
  int64_t mn_lim;  // M (or N) indices >= mn_lim read as zero
  int64_t k_lim;   // K indices >= k_lim read as zero
  bool vec;        // 16-byte copies allowed (ld and ptr 16-byte aligned)
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
    const T* base[kIters];  // chunk address at k = 0 (dereferenced only for interior tiles)
    int64_t k_stride;       // elements per unit of k
    bool mn_interior;       // the tile's MN range is entirely below mn_lim
    int pitch;

    __device__ __forceinline__ Copier(const Operand<T>& op, int pitch_) : pitch(pitch_) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int q = int(threadIdx.x) + it * kThreads;
        const int r = q / kChunksPerRow, c = (q % kChunksPerRow) * V;
        base[it] = kKRows ? op.ptr + int64_t(r) * op.ld + op.mn0 + c
                          : op.ptr + (op.mn0 + r) * op.ld + c;
      }
      k_stride = kKRows ? op.ld : 1;
      mn_interior = op.mn0 + (kKRows ? COLS : ROWS) <= op.mn_lim;
    }

    __device__ __forceinline__ void load(T* smem, const Operand<T>& op, int64_t k) const {
      const bool interior = op.vec && mn_interior && k + (kKRows ? ROWS : COLS) <= op.k_lim;
      if (interior) {  // uniform across the CTA
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          const int q = int(threadIdx.x) + it * kThreads;
          cp_async16(smem + (q / kChunksPerRow) * pitch + (q % kChunksPerRow) * V,
                     base[it] + k * k_stride);
        }
      } else if constexpr (kKRows) {
        load_tile<T, ROWS, COLS>(smem, pitch, op.ptr, op.ld, k, op.mn0, op.k_lim, op.mn_lim,
                                 op.vec);
      } else {
        load_tile<T, ROWS, COLS>(smem, pitch, op.ptr, op.ld, op.mn0, k, op.mn_lim, op.k_lim,
                                 op.vec);
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
      for (int mi = 0; mi < MI; ++mi) {
        const T* p;
        if constexpr (kATrans) {  // stored [k][m]: matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
          p = sa + (kk + (lane & 7) + (lane >> 4) * 8) * kPitchA + wm0 + mi * 16 +
              ((lane >> 3) & 1) * 8;
        } else {  // stored [m][k]
          p = sa + (wm0 + mi * 16 + (lane & 15)) * kPitchA + kk + (lane >> 4) * 8;
        }
        ldmatrix_x4<kATrans>(af[mi], p);
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        // matrices: (n0-7, k0-7) (n0-7, k8-15) (n8-15, k0-7) (n8-15, k8-15), i.e. b0 b1 of
        // n8 block 2nj, then b0 b1 of block 2nj + 1.
        const T* p;
        if constexpr (kBTrans) {  // stored [k][n]
          p = sb + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitchB + wn0 + nj * 16 +
              (lane >> 4) * 8;
        } else {  // stored [n][k]
          p = sb + (wn0 + nj * 16 + (lane & 7) + (lane >> 4) * 8) * kPitchB + kk +
              ((lane >> 3) & 1) * 8;
        }
        uint32_t r[4];
        ldmatrix_x4<kBTrans>(r, p);
        const uint32_t b_lo[2] = {r[0], r[1]}, b_hi[2] = {r[2], r[3]};
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma_16816<T>(acc[2 * mi][4 * nj], acc[2 * mi][4 * nj + 1], acc[2 * mi + 1][4 * nj],
                       acc[2 * mi + 1][4 * nj + 1], af[mi], b_lo);
          mma_16816<T>(acc[2 * mi][4 * nj + 2], acc[2 * mi][4 * nj + 3],
                       acc[2 * mi + 1][4 * nj + 2], acc[2 * mi + 1][4 * nj + 3], af[mi], b_hi);
        }
      }
    }
  }

  // Tensor cores on TF32: per 8-wide k step, each lane reads its A (16 x 8) and B (8 x 8)
  // fragment elements from shared memory (ldmatrix moves 16-bit elements only) and rounds
  // them to TF32; g = lane / 4 indexes M (or N), t = lane % 4 indexes K.
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
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int m = wm0 + mi * 16 + g;
        af[mi][0] = a_at(m, kk + t);
        af[mi][1] = a_at(m + 8, kk + t);
        af[mi][2] = a_at(m, kk + t + 4);
        af[mi][3] = a_at(m + 8, kk + t + 4);
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const int n = wn0 + nb * 8 + g;
        const uint32_t bf[2] = {b_at(n, kk + t), b_at(n, kk + t + 4)};
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma_1688_tf32(acc[2 * mi][2 * nb], acc[2 * mi][2 * nb + 1], acc[2 * mi + 1][2 * nb],
                        acc[2 * mi + 1][2 * nb + 1], af[mi], bf);
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
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm0 = (warp / C::kWarpsN) * C::WM, wn0 = (warp % C::kWarpsN) * C::WN;
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
    Acc v = ss;
#pragma unroll
    for (int off = 1; off < kThreadsPerClass; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x % kThreadsPerClass == 0) {
      const int cls = threadIdx.x / kThreadsPerClass;
      const Acc nrm = vsqrt(v);
      if (s_norm != nullptr) s_norm[cls] = nrm;
      s_inv[cls] = inverse_norm(nrm);
    }
    ss = Acc(0);
  }
};

// ------------------------------------------------------------------------------------
// Deterministic block sum of K values over kThreads threads; every thread gets the result.
// `scratch` holds kThreads / 32 * K values. Ends with a barrier (scratch reusable after).
// ------------------------------------------------------------------------------------
template <class A, int K>
__device__ __forceinline__ void block_sum(A (&v)[K], A* scratch) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  __syncthreads();  // scratch free
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k * kWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A s = scratch[k * kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s += scratch[k * kWarps + w];
    v[k] = s;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------
// Prep: one CTA per padded row i < n_pad.
//   x_hat[i, :] = x_i / max(‖x_i‖, eps) in T for i < n, d < D; zero padding elsewhere
//     (only when x_hat != nullptr: the backward's dW GEMM operand)
//   x_norm[i] = ‖x_i‖, scale[i] = s (or ‖x_i‖ with feature_scale); 0 for padding rows
//   no_target_zero[i] = 0 for rows without a target (when not nullptr: the forward's
//     target_logit, the backward's target correction; the thread holding (i, y_i) writes
//     the rows with one)
// ------------------------------------------------------------------------------------
template <class T>
struct PrepArgs {
  const T* x;
  int64_t n, c, d, n_pad, d_pad;
  const int64_t* labels;
  AccOf<T> s;
  bool feature_scale;
  T* x_hat;  // (n_pad, d_pad) or nullptr
  AccOf<T>* x_norm;
  AccOf<T>* scale;
  AccOf<T>* no_target_zero;
};

// PrepArgs of either pass (P: ForwardParams or BackwardParams).
template <class T, class P>
PrepArgs<T> make_prep_args(const P& p, int64_t n_pad, int64_t d_pad, T* x_hat, AccOf<T>* x_norm,
                           AccOf<T>* scale, AccOf<T>* no_target_zero) {
  PrepArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.n = p.n;
  a.c = p.c;
  a.d = p.d;
  a.n_pad = n_pad;
  a.d_pad = d_pad;
  a.labels = p.labels;
  a.s = AccOf<T>(p.margin.s);
  a.feature_scale = p.margin.feature_scale;
  a.x_hat = x_hat;
  a.x_norm = x_norm;
  a.scale = scale;
  a.no_target_zero = no_target_zero;
  return a;
}

namespace {
template <class T>
__global__ void __launch_bounds__(kThreads) prep_kernel(const PrepArgs<T> args) {
  using Acc = AccOf<T>;
  __shared__ Acc s_red[kThreads / 32];
  const int64_t i = blockIdx.x;
  T* out = args.x_hat == nullptr ? nullptr : args.x_hat + i * args.d_pad;
  if (i >= args.n) {
    if (out != nullptr) {
      for (int64_t k = threadIdx.x; k < args.d_pad; k += kThreads) out[k] = Type<T>::store(Acc(0));
    }
    if (threadIdx.x == 0) {
      args.x_norm[i] = Acc(0);
      args.scale[i] = Acc(0);
    }
    return;
  }
  const T* row = args.x + i * args.d;
  Acc ss[1] = {Acc(0)};
  for (int64_t k = threadIdx.x; k < args.d; k += kThreads) {
    const Acc v = Type<T>::load(row[k]);
    ss[0] = fma(v, v, ss[0]);
  }
  block_sum(ss, s_red);
  const Acc nrm = vsqrt(ss[0]);
  const Acc inv = inverse_norm(nrm);
  if (out != nullptr) {
    for (int64_t k = threadIdx.x; k < args.d_pad; k += kThreads) {
      out[k] = Type<T>::store(k < args.d ? Type<T>::load(row[k]) * inv : Acc(0));
    }
  }
  if (threadIdx.x == 0) {
    args.x_norm[i] = nrm;
    args.scale[i] = args.feature_scale ? nrm : args.s;
    if (args.no_target_zero != nullptr) {
      const int64_t y = args.labels[i];
      if (y < 0 || y >= args.c) args.no_target_zero[i] = Acc(0);
    }
  }
}
}  // namespace

// ------------------------------------------------------------------------------------
// Host helpers
// ------------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline size_t align_bytes(size_t a) { return (a + 255) / 256 * 256; }

// Bump allocator over the caller's workspace (nullptr base: only measures).
struct Carve {
  char* base;
  size_t used = 0;
  template <class U>
  U* take(int64_t count) {
    U* p = base == nullptr ? nullptr : reinterpret_cast<U*>(base + used);
    used += align_bytes(size_t(count) * sizeof(U));
    return p;
  }
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Rows of d elements starting at p can be copied in 16-byte chunks.
template <class T>
inline bool rows_vec(const T* p, int64_t d) {
  return d % (16 / int64_t(sizeof(T))) == 0 && aligned16(p);
}

// Padded sizes shared by both passes.
inline int64_t rows_padded(int64_t n) { return round_up(n, 128); }
inline int64_t dims_padded(int64_t d) { return round_up(d, 128); }

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
