// A host emulator of the CUDA execution model, for running the source of CUDA C++ kernels
// (.cu files) on a machine without a GPU. Included first by every kernel source the build
// rewrites (build.py), before the CUDA headers.
//
// What it models:
//   * a launch runs its blocks one after another; each block's threads are cooperative
//     fibers on one OS thread, scheduled in one of four reproducible orders (set_schedule);
//   * __syncthreads is a block barrier that exited threads no longer count in;
//   * warp-synchronous operations (__shfl_xor_sync, ldmatrix, mma.sync) are rendezvous of
//     the warp's 32 lanes, which must all be alive and at the same kind of operation;
//   * __shared__ variables are function statics (one block runs at a time); they and the
//     dynamic shared buffer are poisoned with 0xff bytes (NaN in every float type) at
//     block start;
//   * cp.async copies are snapshots of the source, landed only by the cp.async.wait_group
//     that covers their group; the destination reads as 0xff bytes until then, so a read
//     before the wait (or a copy into a stage another warp still reads) shows up as NaN.
// What it reports as a launch failure (cudaGetLastError, then emu::last_error()): a
// deadlock, a diverged or partial warp at a warp-synchronous operation, a misaligned or
// non-shared address given to cp.async / ldmatrix, a cp.async group never waited for,
// dynamic shared memory above 48 KiB without cudaFuncSetAttribute (or above 227 KiB).
// It does not detect out-of-bounds global accesses or report timing.
#pragma once

// Before the CUDA headers: host_defines.h keeps these when they are already defined.
#define __shared__ static
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>

namespace emu {

struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

// The running fiber's coordinates, and its lane (linear thread index mod 32).
const ThreadContext& context();
int lane();

// Block barrier of the calling thread.
void sync_block();

// Kinds of warp-synchronous operation: all lanes of a warp must meet at the same kind.
enum class WarpOp : int { kShuffle = 1, kLdmatrix, kLdmatrixTrans, kMmaBf16, kMmaF16, kMmaTf32 };

// Rendezvous of the calling warp: every lane contributes `bytes` (<= 64) bytes from `mine`;
// on return `all` holds the 32 lanes' contributions, lane after lane.
void warp_exchange(WarpOp op, const void* mine, size_t bytes, void* all);

// The block's dynamic shared memory and its size in bytes.
unsigned char* dynamic_smem();
size_t dynamic_smem_bytes();

// Fills a static __shared__ variable with 0xff bytes, the first time a thread of the running
// block reaches its declaration (build.py adds the call after each declaration).
void poison_shared(void* variable, size_t bytes);

// cp.async of 16 bytes by the calling thread, commit and wait_group.
void cp_async16(void* smem, const void* gmem);
void cp_async_commit();
void cp_async_wait(int pending_groups_allowed);

// Records a failure of the running launch (the first one wins) and stops it.
[[noreturn]] void fail(const std::string& what);

// The message of the last failed launch ("" if none since the last call), and clears it.
std::string last_error();

// Which runnable thread goes next. kRoundRobin interleaves the warps finely; the two warp
// orders run one warp as far as it can get (to a block barrier) before the next, lowest or
// highest warp first, so that a missing barrier between a warp's shared-memory writes and
// another warp's reads shows up as stale or poisoned data; kRandom picks any runnable
// thread (a seeded generator: reproducible), which also reorders the lanes of one warp
// between its warp-synchronous operations.
enum class Schedule : int { kRoundRobin = 0, kWarpsAscending = 1, kWarpsDescending = 2, kRandom = 3 };
void set_schedule(Schedule schedule, uint64_t seed);

// Runs `body` as the kernel `kernel_id` on every thread of every block.
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const void* kernel_id,
                     const std::function<void()>& body);

// kernel<<<grid, block, smem, stream>>>(args...), as build.py rewrites it.
template <class... Params, class... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   void (*kernel)(Params...), Args&&... args) {
  return run_grid(grid, block, smem_bytes, reinterpret_cast<const void*>(kernel),
                  [&] { kernel(args...); });
}

}  // namespace emu

#define threadIdx (::emu::context().thread_idx)
#define blockIdx (::emu::context().block_idx)
#define blockDim (::emu::context().block_dim)
#define gridDim (::emu::context().grid_dim)

inline void __syncthreads() { ::emu::sync_block(); }

// cuda_runtime.h declares this overload for nvcc only.
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu || width != 32) {
    ::emu::fail("__shfl_xor_sync: only full-warp shuffles are modelled");
  }
  T all[32];
  ::emu::warp_exchange(::emu::WarpOp::kShuffle, &v, sizeof(T), all);
  return all[(::emu::lane() ^ lane_mask) & 31];
}

// Bit casts the kernels use.
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t bits = (uint64_t(uint32_t(hi)) << 32) | uint32_t(lo);
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}
