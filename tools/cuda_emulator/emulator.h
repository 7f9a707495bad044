// A host emulator of the CUDA execution model, for running the source of CUDA C++ kernels
// (.cu files) on a machine without a GPU. Included first by every kernel source the build
// rewrites (build.py), before the CUDA headers.
//
// What it models:
//   * a launch runs its blocks one after another, or, launched with a cluster shape
//     (cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension), its clusters one after
//     another, the CTAs of a cluster together; the threads of the running block or cluster
//     are cooperative fibers on one OS thread, scheduled in one of four reproducible orders
//     (set_schedule);
//   * __syncthreads is a block barrier that exited threads no longer count in;
//   * warp-synchronous operations (__shfl_xor_sync, ldmatrix, mma.sync) are rendezvous of
//     the warp's 32 lanes, which must all be alive and at the same kind of operation;
//   * __shared__ variables are function statics (one block runs at a time; refused in
//     cluster launches, whose CTAs run together); they and the
//     dynamic shared buffer are poisoned with 0xff bytes (NaN in every float type) at
//     block start;
//   * cp.async copies are snapshots of the source, landed only by the cp.async.wait_group
//     that covers their group; the destination reads as 0xff bytes until then, so a read
//     before the wait (or a copy into a stage another warp still reads) shows up as NaN.
//   * sm_90a: mbarriers with phases and transaction counts, bulk and 2-D TMA copies landing
//     on them, wgmma with shared-memory matrix descriptors and its fence / commit / wait
//     rules, the generic / async proxy split of shared memory, setmaxnreg's warpgroup
//     rendezvous, and clusters: %cluster_ctarank, barrier.cluster, mapa and remote mbarrier
//     arrivals, TMA multicast (the Hopper and cluster sections below; docs/design.md §3.3.1).
// What it reports as a launch failure (cudaGetLastError, then emu::last_error()): a
// deadlock, a diverged or partial warp at a warp-synchronous operation (or warpgroup at a
// warpgroup-wide one), a missing proxy fence (the Hopper section below), a misaligned or
// non-shared address given to cp.async / ldmatrix, a cp.async group never waited for, a
// bulk or TMA copy issued into shared memory that a wgmma not yet retired reads (of any CTA
// of the cluster), a CTA exiting while a peer may still access its shared memory or with a
// bulk / TMA copy still in flight into it, a remote
// arrive or multicast on a peer's mbarrier whose init is not published to the cluster, a
// multicast ctaMask naming a CTA outside the cluster,
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
#include <vector>

namespace emu {

// The value of a bfloat16 (bf16) or float16 bit pattern: the operands of the emulated
// tensor-core instructions (mma.sync, wgmma).
inline float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t f = uint32_t(bits) << 16;
    float v;
    std::memcpy(&v, &f, 4);
    return v;
  }
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __half2float(h);
}

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

// ---- Hopper (sm_90a) asynchronous operations; emulated_ptx.cuh has the PTX-named wrappers ----

// The shared-memory address (__cvta_generic_to_shared) of a pointer into the block's dynamic
// shared memory, and back. The emulated dynamic shared memory starts at address 0, 1024-byte
// aligned on the host too (the swizzle modes depend on address bits 4..9).
uint32_t smem_address(const void* p);
void* smem_pointer(uint32_t address);

// mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier"):
// a phase completes when its pending arrival count and its tx-count both reach zero; then
// the phase number advances, the arrival count is reset to the init count, tx to zero.
// try_wait.parity(p) passes when the phase of parity p is complete, i.e. the current
// phase's parity differs from p; otherwise the thread blocks until it does (a wait that can
// never pass is reported as a deadlock, not a hang). Bulk copies land, completing their
// bytes, when a thread waits on their mbarrier's incomplete phase or when no thread can run.
void mbarrier_init(void* bar, unsigned count);
void mbarrier_inval(void* bar);
uint64_t mbarrier_arrive(void* bar, unsigned count = 1);  // returns the phase's token
void mbarrier_expect_tx(void* bar, unsigned tx_bytes);
uint64_t mbarrier_arrive_expect_tx(void* bar, unsigned tx_bytes);
bool mbarrier_test_wait_parity(void* bar, unsigned parity);  // never blocks
bool mbarrier_try_wait_parity(void* bar, unsigned parity);   // blocks until true
// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes: the source is read at
// issue, the destination reads as 0xff bytes until the copy lands. A copy may land any time
// after its issue, so it fails at issue if a wgmma reads any of its destination bytes that
// the issuing thread does not know to be retired: no wgmma.wait_group retiring it happens
// before the issue (its own program order, __syncthreads, warp and warpgroup rendezvous, or
// mbarrier arrivals carried to the wait that sees their phase complete), whenever the copy
// lands and whatever the emulated order of the wait_group and the issue.
void bulk_copy_g2s(void* smem_dst, const void* gmem_src, unsigned bytes, void* bar);
// cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes of the box
// at element coordinates (x: dim 0, y: dim 1) of a tensor map made by the emulator's
// cuTensorMapEncodeTiled (emulator.cpp: 2-D, swizzle none/32B/64B/128B, OOB -> zeros);
// completes box bytes on `bar` when it lands, and spares in-flight wgmma operands (as bulk_copy_g2s).
void tma_load_2d(void* smem_dst, const void* tensor_map, int x, int y, void* bar);

// Proxies (PTX ISA, memory consistency model). Threads' stores and cp.async landings write
// shared memory through the generic proxy; wgmma reads its shared-memory operands, and bulk
// and TMA copies write, through the async proxy. A wgmma that reads a byte written through
// the generic proxy after the block's last fence.proxy.async fails (no fence is needed for
// bytes landed by bulk / TMA copies, nor for generic reads of them after the mbarrier wait).
// fence.proxy.async.shared::cta: by any thread, it makes every generic write that precedes
// it in the emulated execution visible to the async proxy (emulator.cpp: the approximation).
void fence_proxy_async_shared();
// fence.mbarrier_init.release.cluster: makes the block's initialised mbarriers visible to
// the async proxy (so does fence.proxy.async); a bulk or TMA copy on an mbarrier initialised
// with neither fence after its mbarrier.init fails.
// Also a release at cluster scope: a peer may arrive on (or multicast to) an mbarrier of this
// CTA only once such a fence after its mbarrier.init happens before (a cluster barrier).
void fence_mbarrier_init();
// setmaxnreg.{inc,dec}.sync.aligned.u32 regs: a rendezvous of the warpgroup's 128 threads,
// which must all give the same direction and count (a multiple of 8 in [24, 256]). The
// registers themselves are not modelled: the call changes nothing else.
void setmaxnreg(bool increase, unsigned regs);

// wgmma (warpgroup = 4 consecutive warps, threads 128 g .. 128 g + 127): see emulated_ptx.cuh.
// type 0 bf16, 1 f16; a_regs nullptr: A from shared memory through a_desc.
void wgmma_fence();
void wgmma_mma_async(int type, int n, float* d, const uint32_t* a_regs, uint64_t a_desc, uint64_t b_desc,
                     int scale_d, int scale_a, int scale_b, int tnsp_a, int tnsp_b);
void wgmma_commit_group();
void wgmma_wait_group(int pending_groups_allowed);
// Fails if a wgmma still in flight writes any of d[0..count) (for a kernel's operand fence).
void wgmma_check_registers(const float* d, int count);

// ---- clusters (PTX ISA: barrier.cluster, mapa, mbarrier .shared::cluster, cp.async.bulk.tensor
// .multicast::cluster; the CUDA programming guide, "Thread Block Clusters") ----

// %cluster_ctarank and %cluster_nctarank: the CTA's rank in its cluster (x fastest, as
// blockIdx within the cluster) and the cluster's CTA count (1 without a cluster launch).
unsigned cluster_ctarank();
unsigned cluster_nctarank();
// barrier.cluster.arrive.release / barrier.cluster.wait.acquire (not .aligned: per thread).
// A phase completes when every thread of the cluster that has not exited has arrived
// (exiting releases it, as the PTX ISA says of exit); the wait blocks until the phase the
// thread arrived on completes, and acquires what every arrival knew. A second arrive without
// a wait between, or a wait without an arrive, fails.
void cluster_arrive();
void cluster_wait();
// mapa.shared::cluster.u32: the shared::cluster address of the byte at shared::cta address
// `address` in the CTA of rank `rank` (a rank outside the cluster fails). Shared::cta
// addresses are shared::cluster addresses of the CTA's own shared memory.
uint32_t mapa_shared(uint32_t address, unsigned rank);
// mbarrier.arrive.release.cluster.shared::cluster.b64 _, [address]: one arrival on the
// mbarrier at a shared::cluster address, possibly a peer CTA's. A peer's mbarrier must have
// been published (fence_mbarrier_init) by a fence that happens before the arrive, and the
// peer must not have exited; the arrive counts as an access to its shared memory, which the
// peer must not exit before (a final cluster barrier). The arrival carries the arriving
// thread's knowledge (wgmma retirements) to the peer's waiters: a release by a consumer of
// one CTA orders its wait_group before a multicast by the peer's producer.
void mbarrier_arrive_cluster(uint32_t address);
// cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
// .multicast::cluster: the box lands at the same CTA-relative offset as smem_dst in every CTA
// whose bit is set in cta_mask (bit r: rank r; a bit outside the cluster, or an empty mask,
// fails), and the mbarrier at bar's offset in each of them gets the complete_tx of the bytes
// landed there. Each destination is checked as tma_load_2d's (and as a remote access).
void tma_load_2d_multicast(void* smem_dst, const void* tensor_map, int x, int y, void* bar, uint16_t cta_mask);

// Records a failure of the running launch (the first one wins) and stops it.
[[noreturn]] void fail(const std::string& what);

// The message of the last failed launch ("" if none since the last call), and clears it.
std::string last_error();

// The kernels launched since the last call, in launch order, and clears the list: each the
// demangled name of its exported symbol (dladdr), or "?" for one without (a kernel in an
// anonymous namespace). Lets a test check which kernels a path ran.
std::vector<std::string> take_launched_kernels();

// Which runnable thread goes next. kRoundRobin interleaves the warps finely; the two warp
// orders run one warp as far as it can get (to a block barrier) before the next, lowest or
// highest warp first, so that a missing barrier between a warp's shared-memory writes and
// another warp's reads shows up as stale or poisoned data; kRandom picks any runnable
// thread (a seeded generator: reproducible), which also reorders the lanes of one warp
// between its warp-synchronous operations.
enum class Schedule : int { kRoundRobin = 0, kWarpsAscending = 1, kWarpsDescending = 2, kRandom = 3 };
void set_schedule(Schedule schedule, uint64_t seed);

// Runs `body` as the kernel `kernel_id` on every thread of every block, in clusters of
// `cluster` blocks.
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const void* kernel_id,
                     const std::function<void()>& body, dim3 cluster = dim3(1, 1, 1));

// kernel<<<grid, block, smem, stream>>>(args...), as build.py rewrites it.
template <class... Params, class... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   void (*kernel)(Params...), Args&&... args) {
  return run_grid(grid, block, smem_bytes, reinterpret_cast<const void*>(kernel),
                  [&] { kernel(args...); });
}

// cudaLaunchKernelEx(config, kernel, args...), as build.py rewrites it: the cluster shape
// from cudaLaunchAttributeClusterDimension, the only attribute modelled (others refused).
template <class... Params, class... Args>
cudaError_t launch_ex(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension) return cudaErrorNotSupported;
    cluster = dim3(a.val.clusterDim.x, a.val.clusterDim.y, a.val.clusterDim.z);
  }
  return run_grid(config->gridDim, config->blockDim, config->dynamicSmemBytes,
                  reinterpret_cast<const void*>(kernel), [&] { kernel(args...); }, cluster);
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
