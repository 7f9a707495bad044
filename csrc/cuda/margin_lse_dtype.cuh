// Device basics of the margin_lse kernels: the element types (dtype traits, the TF32
// storage type, dispatch from DType), the block size, and scalar helpers (-inf, max, sqrt,
// exp2, the clamp to [-1, 1], constants, the margin φ). The PTX itself is in
// margin_lse_ptx.cuh. Only CUDA headers here. The other device headers, by purpose:
// margin_lse_reduce.cuh (reductions), margin_lse_norms.cuh (norms and the prep kernel),
// margin_lse_tile_gemm.cuh (the CTA tile GEMM and the cosine tile), margin_lse_layout.cuh
// (host-side sizes and workspace carving); the design is in margin_lse_kernels.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// φ(c) and its slope, one out-of-line copy per Acc type: the target entry is rare (one per
// row over all C classes), so the epilogues call it instead of inlining the margin's
// transcendental code at every unrolled call site. `p` points to a shared-memory copy.
template <class A>
__device__ __noinline__ TargetMargin<A> eval_margin(A c, const MarginParams* p) {
  return target_margin<A>(c, *p);
}

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
