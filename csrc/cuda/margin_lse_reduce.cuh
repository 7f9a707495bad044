// Reductions of the margin_lse kernels, each in a fixed order (so results are bitwise
// reproducible): butterflies over groups of lanes (the lanes that share an accumulator row
// or column of a tile, see Cfg in margin_lse_tile_gemm.cuh), the deterministic block sum,
// and the merges of the forward's running statistics: (max, sum-exp) pairs of an online
// log-sum-exp and (max cosine, class) pairs of the argmax.
#pragma once

#include <cstdint>

#include "margin_lse_dtype.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

// ------------------------------------------------------------------------------------
// Butterflies over the lanes that differ from the caller's in lane bits [kLo, kHi): every
// such lane gets the same result, combined in increasing lane-bit order.
// ------------------------------------------------------------------------------------
template <int kLo, int kHi, class A>
__device__ __forceinline__ A lanes_sum(A v) {
#pragma unroll
  for (int off = 1 << kLo; off < (1 << kHi); off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int kLo, int kHi, class A>
__device__ __forceinline__ A lanes_max(A v) {
#pragma unroll
  for (int off = 1 << kLo; off < (1 << kHi); off <<= 1) {
    v = vmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

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
// Online log-sum-exp and argmax merges
// ------------------------------------------------------------------------------------

// (m, s) <- merge of two (max, sum of 2^(v - max)) pairs; max = -inf means empty.
template <class A>
__device__ __forceinline__ void merge_lse(A& m, A& s, A om, A os) {
  const A mx = vmax(m, om);
  if (mx == neg_inf(A(0))) {  // both empty: sums are 0, or NaN (kept: NaN is sticky)
    s += os;
    return;
  }
  s = s * fast_exp2(m - mx) + os * fast_exp2(om - mx);
  m = mx;
}

// Larger cosine wins, the lower class on ties; NaN beats every number (as torch.max).
template <class A>
__device__ __forceinline__ void merge_best(A& b, int32_t& i, A ob, int32_t oi) {
  const bool o_nan = ob != ob, nan = b != b;
  if (o_nan != nan ? o_nan : (ob > b || ((ob == b || o_nan) && oi < i))) {
    b = ob;
    i = oi;
  }
}

// Whether a later sub-center's cosine `cand` replaces the running maximum `best` of a
// class: when larger (the first sub-center stays on ties), or NaN over a number (the
// maximum is NaN as in torch.max).
template <class A>
__device__ __forceinline__ bool sub_center_wins(A cand, A best) {
  return cand > best || (cand != cand && best == best);
}

// merge_best over the lanes that differ from the caller's in lane bits [kLo, kHi).
template <int kLo, int kHi, class A>
__device__ __forceinline__ void lanes_best(A& b, int32_t& i) {
#pragma unroll
  for (int off = 1 << kLo; off < (1 << kHi); off <<= 1) {
    const A ob = __shfl_xor_sync(0xffffffffu, b, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    merge_best(b, i, ob, oi);
  }
}

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
