// Probe kernels for the emulator's sm_90a instructions (emulated_ptx.cuh: mbarrier, bulk
// copies, wgmma, proxy fences, setmaxnreg, copies into an in-flight wgmma's operands,
// clusters with TMA multicast and remote mbarrier arrivals), run
// one instruction sequence at a time on operands given from Python, so that
// tests/test_emulator_hopper.py can check them against an independent transcription of
// CuTe's GMMA layout atoms and MMA traits, and show that the expected mistakes fail. Built
// with emulator.cpp alone (build.py: build_hopper_probe), independent of any project kernel.
#include <torch/extension.h>  // before emulator.h, whose macros are for kernel code

#include "emulator.h"
#include "emulated_ptx.cuh"

#include <cuda.h>  // CUtensorMap; cuTensorMapEncodeTiled is the emulator's (emulator.cpp)

namespace {

namespace ptx = emu::ptx;

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "probe failed in the emulator: ", emu::last_error());
}

// ---- wgmma ----

// What a probe does wrong on purpose (the negative tests).
enum Mistake : int {
  kNone = 0,
  kNoFence = 1,            // no wgmma.fence before the first wgmma
  kReadBeforeWait = 2,     // copies the accumulators out before wgmma.wait_group
  kWriteBeforeWait = 3,    // zeroes an accumulator while the wgmma is in flight
  kOverwriteOperand = 4,   // thread 0 overwrites the shared-memory operands in flight
  kFenceOperandEarly = 5,  // the operand fence (wgmma_fence_operand) before the wait
  kPipelined = 6,          // correct: one commit group per k-block, wait_group<1>
  kPipelinedNoRefence = 7, // as 6 but without a wgmma.fence after each wait_group
};

struct WgmmaProbe {
  int kind, n, kblocks, scale_d, tnsp_a, tnsp_b, scale_a, scale_b, mistake, a_in_regs;
  const int16_t* image;
  int64_t image_elems;
  const int64_t* desc_a;  // (kblocks,)
  const int64_t* desc_b;  // (kblocks,)
  const int32_t* a_regs;  // (kblocks, 128, 4)
  float* d;               // (128, n/2): in C, out D
};

template <class T, int N>
void wgmma_kernel(const WgmmaProbe* p) {
  if (threadIdx.x == 0) {
    std::memcpy(emu::dynamic_smem(), p->image, size_t(p->image_elems) * 2);
    ptx::fence_proxy_async_shared_cta();  // generic stores, read by wgmma (the async proxy)
  }
  __syncthreads();
  const int t = int(threadIdx.x);
  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = p->d[t * (N / 2) + i];
  if (p->mistake != kNoFence) ptx::wgmma_fence();
  for (int kb = 0; kb < p->kblocks; ++kb) {
    if (p->mistake == kPipelined && kb > 0) ptx::wgmma_fence();
    const bool pipelined = p->mistake == kPipelined || p->mistake == kPipelinedNoRefence;
    const int scale_d = kb == 0 ? p->scale_d : 1;
    const uint64_t db = uint64_t(p->desc_b[kb]);
    if (p->a_in_regs) {
      uint32_t a[4];
      for (int j = 0; j < 4; ++j) a[j] = uint32_t(p->a_regs[(kb * 128 + t) * 4 + j]);
      ptx::wgmma_rs<T, N>(acc, a, db, scale_d, p->tnsp_b, p->scale_a, p->scale_b);
    } else {
      ptx::wgmma_ss<T, N>(acc, uint64_t(p->desc_a[kb]), db, scale_d, p->tnsp_a, p->tnsp_b, p->scale_a,
                          p->scale_b);
    }
    if (pipelined) {
      ptx::wgmma_commit_group();
      ptx::wgmma_wait_group<1>();
    }
  }
  if (p->mistake != kPipelined && p->mistake != kPipelinedNoRefence) ptx::wgmma_commit_group();
  if (p->mistake == kReadBeforeWait) {
    for (int i = 0; i < N / 2; ++i) p->d[t * (N / 2) + i] = acc[i];
  }
  if (p->mistake == kWriteBeforeWait && t == 5) acc[0] = 0.f;
  if (p->mistake == kOverwriteOperand && t == 0) {
    std::memset(emu::dynamic_smem(), 0, size_t(p->image_elems) * 2);
  }
  if (p->mistake == kFenceOperandEarly) ptx::wgmma_fence_operand(acc);
  ptx::wgmma_wait_group<0>();
  ptx::wgmma_fence_operand(acc);
  if (p->mistake != kReadBeforeWait) {
    for (int i = 0; i < N / 2; ++i) p->d[t * (N / 2) + i] = acc[i];
  }
}

template <class T>
cudaError_t launch_wgmma(const WgmmaProbe& p) {
  const size_t smem = size_t(p.image_elems) * 2;
  cudaFuncSetAttribute(wgmma_kernel<T, 8>, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 << 10);
  switch (p.n) {
#define EMU_PROBE_N(N)                                                                     \
  case N:                                                                                  \
    cudaFuncSetAttribute(wgmma_kernel<T, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                         227 << 10);                                                       \
    return emu::launch(dim3(1), dim3(128), smem, nullptr, wgmma_kernel<T, N>, &p);
    EMU_PROBE_N(8)
    EMU_PROBE_N(16)
    EMU_PROBE_N(64)
    EMU_PROBE_N(128)
    EMU_PROBE_N(256)
#undef EMU_PROBE_N
  }
  TORCH_CHECK(false, "probe_wgmma: N must be one of 8, 16, 64, 128, 256");
}

// ---- mbarrier + bulk copy pipeline ----

struct PipelineProbe {
  const float* data;  // (iters, chunk)
  int iters, chunk, stages, consumer_flip, producer_flip, tx_extra;
  float* out;  // (iters,)
};

void pipeline_kernel(const PipelineProbe* p) {
  unsigned char* smem = emu::dynamic_smem();
  const size_t stage_bytes = size_t(p->chunk) * 4;
  auto* full = reinterpret_cast<uint64_t*>(smem + stage_bytes * p->stages);
  uint64_t* empty = full + p->stages;
  const int t = int(threadIdx.x), warp = t / 32, lane = t % 32;
  if (t == 0) {
    for (int s = 0; s < p->stages; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      ptx::mbarrier_init(&empty[s], 32);
    }
    ptx::fence_barrier_init();
  }
  __syncthreads();
  if (warp == 0) {  // producer: lane 0 alone
    if (lane != 0) return;
    for (int it = 0; it < p->iters; ++it) {
      const int s = it % p->stages;
      const unsigned phase = unsigned(it / p->stages) & 1u;
      ptx::mbarrier_wait_parity(&empty[s], (phase ^ 1u) ^ unsigned(p->producer_flip));
      ptx::mbarrier_arrive_expect_tx(&full[s], unsigned(stage_bytes) + unsigned(p->tx_extra));
      ptx::bulk_copy_g2s(smem + stage_bytes * s, p->data + size_t(it) * p->chunk, unsigned(stage_bytes), &full[s]);
    }
  } else {  // consumer warp
    for (int it = 0; it < p->iters; ++it) {
      const int s = it % p->stages;
      const unsigned phase = unsigned(it / p->stages) & 1u;
      ptx::mbarrier_wait_parity(&full[s], phase ^ unsigned(p->consumer_flip));
      const float* stage = reinterpret_cast<const float*>(smem + stage_bytes * s);
      float sum = 0.f;
      for (int i = lane; i < p->chunk; i += 32) sum += stage[i];
      for (int m = 16; m >= 1; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
      if (lane == 0) p->out[it] = sum;
      ptx::mbarrier_arrive(&empty[s]);
    }
  }
}

// ---- mbarrier phase semantics, step by step on one thread ----

struct SemanticsProbe {
  const float* src;  // 16 floats
  int32_t* log;      // observations, in order
  float* landed;     // 16 floats
};

void semantics_kernel(const SemanticsProbe* p) {
  if (threadIdx.x != 0) return;
  unsigned char* smem = emu::dynamic_smem();
  auto* bar = reinterpret_cast<uint64_t*>(smem + 64);
  int n = 0;
  auto log = [&](int v) { p->log[n++] = v; };
  ptx::mbarrier_init(bar, 2);
  ptx::fence_mbarrier_init();
  log(emu::mbarrier_test_wait_parity(bar, 0));  // 0: phase 0 in progress
  log(emu::mbarrier_test_wait_parity(bar, 1));  // 1: "phase -1" (parity 1) counts as complete
  log(int(ptx::mbarrier_arrive(bar)));          // token 0
  log(emu::mbarrier_test_wait_parity(bar, 0));  // 0: one arrival of two
  ptx::mbarrier_arrive(bar);
  log(emu::mbarrier_test_wait_parity(bar, 0));  // 1: phase 0 complete
  log(emu::mbarrier_test_wait_parity(bar, 1));  // 0: phase 1 in progress
  ptx::mbarrier_expect_tx(bar, 64);
  ptx::bulk_copy_g2s(smem, p->src, 64, bar);
  ptx::mbarrier_arrive(bar);
  log(int(ptx::mbarrier_arrive(bar)));          // token 1
  log(emu::mbarrier_test_wait_parity(bar, 1));  // 0: 64 bytes still in flight
  uint32_t first;
  std::memcpy(&first, smem, 4);
  log(first == 0xffffffffu);                    // 1: destination unreadable until landed
  log(ptx::mbarrier_try_wait_parity(bar, 1));   // 1: the wait lands the copy
  log(emu::mbarrier_test_wait_parity(bar, 1));  // 1
  log(emu::mbarrier_test_wait_parity(bar, 0));  // 0: phase 2 (parity 0) in progress
  std::memcpy(p->landed, smem, 64);
}

// ---- TMA: one 2-D box into shared memory ----

struct TmaProbe {
  const CUtensorMap* map;
  int x, y, bytes;
  int16_t* out;
};

void tma_kernel(const TmaProbe* p) {
  unsigned char* smem = emu::dynamic_smem();
  auto* bar = reinterpret_cast<uint64_t*>(smem + p->bytes);
  if (threadIdx.x == 0) {
    ptx::mbarrier_init(bar, 1);
    ptx::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ptx::mbarrier_arrive_expect_tx(bar, unsigned(p->bytes));
    ptx::tma_load_2d(smem, p->map, p->x, p->y, bar);
  }
  ptx::mbarrier_wait_parity(bar, 0);
  if (threadIdx.x == 0) std::memcpy(p->out, smem, size_t(p->bytes));
}

// ---- proxies: generic stores vs the async proxy's reads (wgmma operands) ----

// How a proxy probe puts the wgmma's operands into shared memory (correct first).
enum ProxyCase : int {
  kStoresFenced = 0,          // each thread stores its share, fence.proxy.async, __syncthreads
  kStoresFencedByReader = 1,  // stores, __syncthreads, thread 0 fences, __syncthreads
  kBulkLanded = 2,            // a bulk copy (async proxy) and its mbarrier wait: no fence needed
  kStoresUnfenced = 3,        // stores, __syncthreads: the typical mistake
  kFenceBeforeStores = 4,     // the fence before the stores instead of after
  kPatchAfterBulk = 5,        // a bulk copy lands, one thread rewrites an element in place
  kCpAsyncUnfenced = 6,       // cp.async (a generic-proxy write) landed and waited for, no fence
};

struct ProxyProbe {
  const int16_t* image;  // A (64 x 16) and B (8 x 16) as the descriptors address them
  int image_elems, mode, b_element;  // b_element: the image index kPatchAfterBulk rewrites
  uint64_t desc_a, desc_b;
  float* d;  // (128, 4): D = A B^T
};

void proxy_kernel(const ProxyProbe* p) {
  unsigned char* smem = emu::dynamic_smem();
  auto* image = reinterpret_cast<int16_t*>(smem);
  const unsigned bytes = unsigned(p->image_elems) * 2;
  auto* bar = reinterpret_cast<uint64_t*>(smem + bytes);
  const int t = int(threadIdx.x);
  if (p->mode == kBulkLanded || p->mode == kPatchAfterBulk) {
    if (t == 0) {
      ptx::mbarrier_init(bar, 1);
      ptx::fence_mbarrier_init();
      ptx::mbarrier_arrive_expect_tx(bar, bytes);
      ptx::bulk_copy_g2s(smem, p->image, bytes, bar);
    }
    __syncthreads();
    ptx::mbarrier_wait_parity(bar, 0);
    if (p->mode == kPatchAfterBulk && t == 5) image[p->b_element] = int16_t(image[p->b_element] ^ 0x8000);
  } else if (p->mode == kCpAsyncUnfenced) {
    for (int c = t; c < p->image_elems / 8; c += 128) ptx::cp_async16(image + 8 * c, p->image + 8 * c);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
  } else {
    if (p->mode == kFenceBeforeStores) ptx::fence_proxy_async_shared_cta();
    for (int i = t; i < p->image_elems; i += 128) image[i] = p->image[i];
    if (p->mode == kStoresFenced) ptx::fence_proxy_async_shared_cta();
    if (p->mode == kStoresFencedByReader) {
      __syncthreads();
      if (t == 0) ptx::fence_proxy_async_shared_cta();
    }
  }
  __syncthreads();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  ptx::wgmma_fence();
  ptx::wgmma_ss<__nv_bfloat16, 8>(acc, p->desc_a, p->desc_b, 0);
  ptx::wgmma_commit_group();
  ptx::wgmma_wait_group<0>();
  for (int i = 0; i < 4; ++i) p->d[t * 4 + i] = acc[i];
}

// ---- mbarrier.init made visible to the async proxy before a bulk copy completes on it ----

enum InitCase : int {
  kInitFenceMbarrierInit = 0,  // init, fence.mbarrier_init.release.cluster
  kInitFenceProxyAsync = 1,    // init, fence.proxy.async.shared::cta
  kInitUnfenced = 2,           // init and nothing: the mistake
  kFenceBeforeInit = 3,        // the fence before the init
};

struct InitProbe {
  const float* src;  // 16 floats
  int mode;
  float* landed;     // 16 floats
};

void init_kernel(const InitProbe* p) {
  unsigned char* smem = emu::dynamic_smem();
  auto* bar = reinterpret_cast<uint64_t*>(smem + 64);
  if (threadIdx.x == 0) {
    if (p->mode == kFenceBeforeInit) ptx::fence_mbarrier_init();
    ptx::mbarrier_init(bar, 1);
    if (p->mode == kInitFenceMbarrierInit) ptx::fence_mbarrier_init();
    if (p->mode == kInitFenceProxyAsync) ptx::fence_proxy_async_shared_cta();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ptx::mbarrier_arrive_expect_tx(bar, 64);
    ptx::bulk_copy_g2s(smem, p->src, 64, bar);
  }
  ptx::mbarrier_wait_parity(bar, 0);
  if (threadIdx.x == 0) std::memcpy(p->landed, smem, 64);
}

// ---- a copy into a buffer that an in-flight wgmma reads ----

// Where the consumer releases the buffer to the producer (correct first).
enum ReleaseCase : int {
  kReleaseAfterWait = 0,   // wgmma, commit, wait_group<0>, arrive on `empty`
  kReleaseBeforeWait = 1,  // wgmma, commit, arrive on `empty`, wait_group<0>: the race
  kRefillBeforeWait = 2,   // wgmma, commit, the consumer's thread 0 refills the buffer itself
};

struct RefillProbe {
  const CUtensorMap* map;  // rows of 64 int16; the two images are rows 0-17 and 18-35
  const int16_t* images;   // the same rows, for bulk copies
  uint64_t desc_a, desc_b;
  int mode, tma;           // tma: TMA boxes, else bulk copies
  float* d;                // (2, 128, 4): D = A B^T of each image
};

// Warpgroup 1's thread 128 (the producer) copies image 0, then, once the consumer has
// released the buffer on `empty`, image 1 into the same 2304 bytes; warpgroup 0 (the
// consumer) runs one m64n8k16 wgmma on each image as it lands on `full`.
void refill_kernel(const RefillProbe* p) {
  constexpr unsigned kBytes = 2304;
  unsigned char* smem = emu::dynamic_smem();
  auto* full = reinterpret_cast<uint64_t*>(smem + kBytes);
  uint64_t* empty = full + 1;
  const int t = int(threadIdx.x);
  auto copy = [&](int image) {
    ptx::mbarrier_arrive_expect_tx(full, kBytes);
    if (p->tma) {
      ptx::tma_load_2d(smem, p->map, 0, 18 * image, full);
    } else {
      ptx::bulk_copy_g2s(smem, p->images + image * kBytes / 2, kBytes, full);
    }
  };
  if (t == 0) {
    ptx::mbarrier_init(full, 1);
    ptx::mbarrier_init(empty, 128);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (t >= 128) {
    if (t != 128) return;
    for (int image = 0; image < 2; ++image) {
      ptx::mbarrier_wait_parity(empty, unsigned(image & 1) ^ 1u);
      if (image == 0 || p->mode != kRefillBeforeWait) copy(image);
    }
    return;
  }
  for (int image = 0; image < 2; ++image) {
    ptx::mbarrier_wait_parity(full, unsigned(image & 1));
    float acc[4];
    ptx::wgmma_fence();
    ptx::wgmma_ss<__nv_bfloat16, 8>(acc, p->desc_a, p->desc_b, 0);
    ptx::wgmma_commit_group();
    if (image == 0 && p->mode == kReleaseBeforeWait) ptx::mbarrier_arrive(empty);
    if (image == 0 && p->mode == kRefillBeforeWait && t == 0) copy(1);
    ptx::wgmma_wait_group<0>();
    if (image == 0 && p->mode != kReleaseBeforeWait) ptx::mbarrier_arrive(empty);
    for (int i = 0; i < 4; ++i) p->d[(image * 128 + t) * 4 + i] = acc[i];
  }
}

// ---- setmaxnreg: warpgroup-wide ----

enum RegsCase : int {
  kRegsWarpSpecialized = 0,  // warpgroup 0 setmaxnreg.dec 40, warpgroup 1 setmaxnreg.inc 232
  kRegsOneWarp = 1,          // only warp 0 of warpgroup 0 (the producer warp): the others exit
  kRegsMismatch = 2,         // warp 0 asks for 40 registers, warps 1-3 of its warpgroup for 48
  kRegsCount = 3,            // every thread, with the count given (emu::setmaxnreg: unchecked by a compiler)
  kRegsBesideWgmma = 4,      // warps 0-1 at setmaxnreg while warps 2-3 are at a wgmma
};

void setmaxnreg_kernel(int mode, int regs, int32_t* done) {
  const int t = int(threadIdx.x), group = t / 128, warp = t / 32 % 4;
  if (mode == kRegsWarpSpecialized) {
    if (group == 0) {
      ptx::setmaxnreg_dec<40>();
    } else {
      ptx::setmaxnreg_inc<232>();
    }
  } else if (mode == kRegsOneWarp && group == 0) {
    if (warp != 0) return;
    ptx::setmaxnreg_dec<40>();
  } else if (mode == kRegsMismatch && group == 0) {
    if (warp == 0) {
      ptx::setmaxnreg_dec<40>();
    } else {
      ptx::setmaxnreg_dec<48>();
    }
  } else if (mode == kRegsCount) {
    emu::setmaxnreg(group == 1, unsigned(regs));
  } else if (mode == kRegsBesideWgmma && group == 0) {
    if (warp < 2) {
      ptx::setmaxnreg_inc<232>();
    } else {
      float acc[4] = {};
      ptx::wgmma_fence();
      ptx::wgmma_ss<__nv_bfloat16, 8>(acc, 0, 0, 0);
    }
  }
  done[t] = 1;
}

// ---- clusters: TMA multicast into a 2-CTA cluster, remote releases, the final cluster barrier ----

// What the cluster probe does (correct first).
enum ClusterCase : int {
  kClusterCorrect = 0,         // init, fence.mbarrier_init, cluster sync; releases after wait_group; final cluster sync
  kRemoteReleaseBeforeWait = 1,// the release on the peer's `empty` between commit_group and wait_group
  kInitNotFencedForCluster = 2,// fence.proxy.async instead of fence.mbarrier_init after the init
  kNoClusterSyncAfterInit = 3, // fence.mbarrier_init, but no cluster barrier before the peers use the mbarriers
  kNoFinalClusterSync = 4,     // the CTAs exit without a final cluster barrier
  kMaskOutsideCluster = 5,     // the producer's ctaMask also names rank 2 (the cluster has 2 CTAs)
  kFinalArriveBeforeRelease = 6,  // the consumers' final cluster arrive before their last remote release
  kCopyNeverWaited = 7,        // the producers multicast a third image that no consumer waits for
};

struct ClusterProbe {
  const CUtensorMap* map;  // rows of 64 int16; image i is rows 18 i .. 18 i + 17
  uint64_t desc_a, desc_b;
  int mode;
  float* d;       // (2 ranks, 2 images, 128, 4): D = A B^T of each image, as each CTA computed it
  int32_t* ids;   // (2 ranks, 4): blockIdx.x, %cluster_ctarank, %cluster_nctarank, 1
};

// A cluster of 2 CTAs shares each 2304-byte image: the producer of rank r (thread 128) loads
// its half (rows 9 r .. 9 r + 8) with one TMA multicast to both CTAs, so each CTA's `full`
// gets both halves' bytes. A buffer is refilled once the consumers of BOTH CTAs have
// released it: each CTA's `empty` counts its own 128 consumer threads and the peer's (remote
// arrivals through mapa). Each consumer warpgroup runs one m64n8k16 wgmma per image.
void cluster_kernel(const ClusterProbe* p) {
  constexpr unsigned kBytes = 2304, kHalf = kBytes / 2;
  unsigned char* smem = emu::dynamic_smem();
  auto* full = reinterpret_cast<uint64_t*>(smem + kBytes);
  uint64_t* empty = full + 1;
  const int t = int(threadIdx.x);
  const unsigned rank = ptx::cluster_ctarank(), peer = rank ^ 1u;
  if (t == 0) {
    int32_t* id = p->ids + 4 * rank;
    id[0] = int32_t(blockIdx.x), id[1] = int32_t(rank), id[2] = int32_t(ptx::cluster_nctarank()), id[3] = 1;
    ptx::mbarrier_init(full, 1);
    ptx::mbarrier_init(empty, 256);
    if (p->mode == kInitNotFencedForCluster) {
      ptx::fence_proxy_async_shared_cta();
    } else {
      ptx::fence_mbarrier_init();
    }
  }
  __syncthreads();
  if (p->mode != kNoClusterSyncAfterInit) ptx::cluster_sync();
  const uint32_t peer_empty = ptx::mapa_shared(ptx::smem_address(empty), peer);
  if (t >= 128) {
    if (t == 128) {
      const uint16_t mask = p->mode == kMaskOutsideCluster ? 0x7 : 0x3;
      for (int image = 0; image < (p->mode == kCopyNeverWaited ? 3 : 2); ++image) {
        ptx::mbarrier_wait_parity(empty, unsigned(image & 1) ^ 1u);
        ptx::mbarrier_arrive_expect_tx(full, kBytes);
        ptx::tma_load_2d_multicast(smem + rank * kHalf, p->map, 0, 18 * (image % 2) + 9 * int(rank), full, mask);
      }
    }
  } else {
    for (int image = 0; image < 2; ++image) {
      ptx::mbarrier_wait_parity(full, unsigned(image & 1));
      float acc[4];
      ptx::wgmma_fence();
      ptx::wgmma_ss<__nv_bfloat16, 8>(acc, p->desc_a, p->desc_b, 0);
      ptx::wgmma_commit_group();
      if (p->mode == kRemoteReleaseBeforeWait) ptx::mbarrier_arrive_cluster(peer_empty);
      ptx::wgmma_wait_group<0>();
      ptx::mbarrier_arrive(empty);
      if (image == 1 && p->mode == kFinalArriveBeforeRelease) ptx::cluster_arrive();
      if (p->mode != kRemoteReleaseBeforeWait) ptx::mbarrier_arrive_cluster(peer_empty);
      for (int i = 0; i < 4; ++i) p->d[((rank * 2 + image) * 128 + t) * 4 + i] = acc[i];
    }
  }
  // The peer's last releases arrive on this CTA's `empty`: it must not exit before them.
  if (p->mode == kFinalArriveBeforeRelease && t < 128) {
    ptx::cluster_wait();
  } else if (p->mode != kNoFinalClusterSync) {
    ptx::cluster_sync();
  }
}

}  // namespace

// The shared-memory image (int16) of one TMA load of the box (box0 x box1 elements of 2
// bytes, swizzle 0/32/64/128) at (x, y) of the 2-D int16 tensor `t` (rows = dim 1, row
// stride a multiple of 8 elements).
at::Tensor probe_tma(const at::Tensor& t, int64_t box0, int64_t box1, int64_t x, int64_t y, int64_t swizzle) {
  TORCH_CHECK(t.stride(1) == 1, "rows must be contiguous");
  const at::Tensor& tc = t;
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(tc.size(1)), cuuint64_t(tc.size(0))};
  const cuuint64_t strides[1] = {cuuint64_t(tc.stride(0) * 2)};
  const cuuint32_t box[2] = {cuuint32_t(box0), cuuint32_t(box1)};
  const cuuint32_t ones[2] = {1, 1};
  const CUtensorMapSwizzle sw = swizzle == 0 ? CU_TENSOR_MAP_SWIZZLE_NONE : swizzle == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                : swizzle == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
  const CUresult r = cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tc.data_ptr(), dims, strides, box,
                                            ones, CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, emu::last_error());
  auto out = at::zeros({box0 * box1}, at::kShort);
  TmaProbe p{&map, int(x), int(y), int(box0 * box1 * 2), out.data_ptr<int16_t>()};
  check(emu::launch(dim3(1), dim3(32), size_t(p.bytes) + 8, nullptr, tma_kernel, &p));
  return out;
}

// D (128, n/2) float32: the warpgroup's accumulators after `kblocks` wgmma.mma_async of
// m64n{n}k16 (kind 0 bf16, 1 f16) over the shared-memory image (int16), with per-k-block
// descriptors (int64) and, if a_regs is not empty, A from registers (kblocks, 128, 4) int32.
at::Tensor probe_wgmma(int64_t kind, int64_t n, const at::Tensor& image, const at::Tensor& desc_a,
                       const at::Tensor& desc_b, const at::Tensor& a_regs, const at::Tensor& c, int64_t scale_d,
                       int64_t tnsp_a, int64_t tnsp_b, int64_t scale_a, int64_t scale_b, int64_t mistake) {
  const auto ic = image.contiguous(), dac = desc_a.contiguous(), dbc = desc_b.contiguous();
  const auto ac = a_regs.contiguous();
  auto d = c.contiguous().clone();
  TORCH_CHECK(d.numel() == 128 * n / 2, "C must be (128, n/2)");
  WgmmaProbe p{int(kind), int(n), int(dbc.numel()), int(scale_d), int(tnsp_a), int(tnsp_b), int(scale_a),
               int(scale_b), int(mistake), ac.numel() > 0, ic.data_ptr<int16_t>(), ic.numel(),
               dac.data_ptr<int64_t>(), dbc.data_ptr<int64_t>(), ac.numel() > 0 ? ac.data_ptr<int32_t>() : nullptr,
               d.data_ptr<float>()};
  check(kind == 0 ? launch_wgmma<__nv_bfloat16>(p) : launch_wgmma<__half>(p));
  return d;
}

// D (128, 4) float32 of one m64n8k16 bf16 wgmma (scale-d 0) on the operands of `image`
// (int16) through the descriptors, put in shared memory as ProxyCase `mode` says.
at::Tensor probe_proxy(const at::Tensor& image, int64_t desc_a, int64_t desc_b, int64_t mode, int64_t b_element) {
  const auto ic = image.contiguous();
  TORCH_CHECK(ic.numel() % 8 == 0, "the image must be whole 16-byte chunks");
  auto d = at::zeros({128, 4}, at::kFloat);
  ProxyProbe p{ic.data_ptr<int16_t>(), int(ic.numel()), int(mode), int(b_element), uint64_t(desc_a),
               uint64_t(desc_b), d.data_ptr<float>()};
  check(emu::launch(dim3(1), dim3(128), size_t(ic.numel()) * 2 + 8, nullptr, proxy_kernel, &p));
  return d;
}

// The 16 floats a bulk copy lands on an mbarrier initialised as InitCase `mode` says.
at::Tensor probe_mbarrier_init(const at::Tensor& src, int64_t mode) {
  const auto sc = src.contiguous();
  auto landed = at::zeros({16}, at::kFloat);
  InitProbe p{sc.data_ptr<float>(), int(mode), landed.data_ptr<float>()};
  check(emu::launch(dim3(1), dim3(32), 128, nullptr, init_kernel, &p));
  return landed;
}

// (2, 128, 4) float32: D of one m64n8k16 bf16 wgmma (scale-d 0) on each of the two images
// (2, 1152) int16 (A and B K-major without swizzle, as the descriptors address them), copied
// one after the other into the same shared-memory buffer, by TMA boxes (tma) or bulk
// copies, the consumer releasing it as ReleaseCase `mode` says.
at::Tensor probe_refill(const at::Tensor& images, int64_t desc_a, int64_t desc_b, int64_t mode, bool tma) {
  const auto ic = images.contiguous();
  TORCH_CHECK(ic.numel() == 2 * 1152, "two images of 2304 bytes");
  CUtensorMap map;
  const cuuint64_t dims[2] = {64, 36};
  const cuuint64_t strides[1] = {128};
  const cuuint32_t box[2] = {64, 18};
  const cuuint32_t ones[2] = {1, 1};
  const CUresult r = cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ic.data_ptr(), dims, strides,
                                            box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                            CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, emu::last_error());
  auto d = at::zeros({2, 128, 4}, at::kFloat);
  RefillProbe p{&map, ic.data_ptr<int16_t>(), uint64_t(desc_a), uint64_t(desc_b), int(mode), int(tma),
                d.data_ptr<float>()};
  check(emu::launch(dim3(1), dim3(256), 2304 + 16, nullptr, refill_kernel, &p));
  return d;
}

// [(2, 2, 128, 4) float32: D of one m64n8k16 bf16 wgmma (scale-d 0) per image per CTA of a
// 2-CTA cluster, (2, 4) int32: per CTA its blockIdx.x, %cluster_ctarank, %cluster_nctarank]:
// the two images (2, 1152) int16 (A and B K-major without swizzle, as the descriptors address
// them) land in both CTAs by TMA multicast of halves, as ClusterCase `mode` says. The grid
// is `clusters` clusters of 2 along x; d and ids are those of the last cluster.
std::vector<at::Tensor> probe_cluster(const at::Tensor& images, int64_t desc_a, int64_t desc_b, int64_t mode,
                                      int64_t clusters) {
  const auto ic = images.contiguous();
  TORCH_CHECK(ic.numel() == 2 * 1152, "two images of 2304 bytes");
  CUtensorMap map;
  const cuuint64_t dims[2] = {64, 36};
  const cuuint64_t strides[1] = {128};
  const cuuint32_t box[2] = {64, 9};
  const cuuint32_t ones[2] = {1, 1};
  const CUresult r = cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ic.data_ptr(), dims, strides,
                                            box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                            CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, emu::last_error());
  auto d = at::full({2, 2, 128, 4}, std::nanf(""), at::kFloat);
  auto ids = at::full({2, 4}, -1, at::kInt);
  ClusterProbe p{&map, uint64_t(desc_a), uint64_t(desc_b), int(mode), d.data_ptr<float>(), ids.data_ptr<int32_t>()};
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 2, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  // {gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs}: positional, since the
  // emulator's gridDim / blockDim macros (for kernel code) would rewrite the member names.
  const cudaLaunchConfig_t config = {dim3(unsigned(2 * clusters)), dim3(256), 2304 + 16, nullptr, &attr, 1};
  check(emu::launch_ex(&config, cluster_kernel, &p));
  return {d, ids};
}

// (256,) int32: 1 for each thread of two warpgroups that got past setmaxnreg as RegsCase
// `mode` uses it (`regs`: the count of kRegsCount).
at::Tensor probe_setmaxnreg(int64_t mode, int64_t regs) {
  auto done = at::zeros({256}, at::kInt);
  check(emu::launch(dim3(1), dim3(256), 0, nullptr, setmaxnreg_kernel, int(mode), int(regs), done.data_ptr<int32_t>()));
  return done;
}

// (iters,) float32: per iteration, the sum of data[it] as a consumer warp reads it from a
// `stages`-deep shared-memory ring filled by bulk copies (producer lane, full/empty
// mbarriers). The flips wait on the wrong parity; tx_extra expects more bytes than come.
at::Tensor probe_pipeline(const at::Tensor& data, int64_t stages, int64_t consumer_flip, int64_t producer_flip,
                          int64_t tx_extra) {
  const auto dc = data.contiguous();
  auto out = at::zeros({dc.size(0)}, at::kFloat);
  PipelineProbe p{dc.data_ptr<float>(), int(dc.size(0)), int(dc.size(1)), int(stages), int(consumer_flip),
                  int(producer_flip), int(tx_extra), out.data_ptr<float>()};
  const size_t smem = size_t(dc.size(1)) * 4 * size_t(stages) + 16 * size_t(stages);
  check(emu::launch(dim3(1), dim3(64), smem, nullptr, pipeline_kernel, &p));
  return out;
}

// The observations of semantics_kernel (int32, 12) and the 16 floats its bulk copy landed.
std::vector<at::Tensor> probe_mbarrier_semantics(const at::Tensor& src) {
  const auto sc = src.contiguous();
  auto log = at::full({12}, -1, at::kInt);
  auto landed = at::zeros({16}, at::kFloat);
  SemanticsProbe p{sc.data_ptr<float>(), log.data_ptr<int32_t>(), landed.data_ptr<float>()};
  check(emu::launch(dim3(1), dim3(32), 128, nullptr, semantics_kernel, &p));
  return {log, landed};
}

void set_schedule(int64_t schedule) { emu::set_schedule(emu::Schedule(schedule), 12345); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("probe_wgmma", &probe_wgmma);
  m.def("probe_pipeline", &probe_pipeline);
  m.def("probe_mbarrier_semantics", &probe_mbarrier_semantics);
  m.def("probe_tma", &probe_tma);
  m.def("probe_proxy", &probe_proxy);
  m.def("probe_mbarrier_init", &probe_mbarrier_init);
  m.def("probe_setmaxnreg", &probe_setmaxnreg);
  m.def("probe_refill", &probe_refill);
  m.def("probe_cluster", &probe_cluster);
  m.def("set_schedule", &set_schedule);
}
