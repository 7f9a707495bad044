// Norms of the margin_lse kernels: the normalization factor of a row of x or W, and the
// prologue both passes launch first (prep: ‖x_i‖, the row scales, and x̂ for the
// backward). The W norms are accumulated during the cosine GEMM instead (WeightNorm in
// margin_lse_tile_gemm.cuh): W is never normalized in memory.
#pragma once

#include <cstdint>

#include "margin_lse_dtype.cuh"
#include "margin_lse_reduce.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

// 1 / max(‖v‖, eps): the normalization factor of a row of x or W (F.normalize's floor).
// One expression for every kernel, so that the forward's and the backward's cosines agree
// to the bit.
template <class A>
__device__ __forceinline__ A inverse_norm(A nrm) {
  return A(1) / vmax(nrm, Consts<A>::kNormEps);
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

// PrepArgs of either pass.
template <class T>
PrepArgs<T> make_prep_args(const ProblemParams& p, int64_t n_pad, int64_t d_pad, T* x_hat,
                           AccOf<T>* x_norm, AccOf<T>* scale, AccOf<T>* no_target_zero) {
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

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
