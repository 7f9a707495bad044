// Host-side layout helpers of the margin_lse launchers: rounding, padded sizes, the
// workspace carving (one Carve pass both measures the workspace and, given its base, lays
// the buffers out in it), the vector-load test of a row-major matrix, and the entry points
// of a pass (dtype dispatch, workspace size, layout -> buffers -> launches). Each pass's
// own layout (class splits, chunks, grids) is in its .cu file.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "margin_lse_dtype.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

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

// The entry points of a pass whose host side is `Pass`, three static function templates:
// layout<T>(p) (padded sizes, splits, grids), carve<T>(cv, layout) (its buffers, taken from
// a Carve) and run<T>(p, layout, buffers, stream) (its launches).
template <class Pass, class Params>
size_t pass_workspace_bytes(const Params& p) {
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    Carve cv{nullptr};
    Pass::template carve<T>(cv, Pass::template layout<T>(p));
    return cv.used;
  });
}

template <class Pass, class Params>
cudaError_t launch_pass(const Params& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const auto layout = Pass::template layout<T>(p);
    Carve cv{static_cast<char*>(p.workspace)};
    return Pass::template run<T>(p, layout, Pass::template carve<T>(cv, layout), stream);
  });
}

// Lets `kernel` use `bytes` of dynamic shared memory (above the 48 KiB default).
template <class K>
cudaError_t allow_smem(K* kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
