// The PTX instructions the kernels use, each behind a small inline function: the async
// global->shared copy, ldmatrix, the mma.sync tensor-core products, two conversions, and the
// sm_90a instructions of the Hopper forward (mbarrier, TMA, wgmma, fences, setmaxnreg).
// Nothing else in the kernels is written in PTX, so this file is the whole of what the host
// emulator must re-implement to run the kernels' source on the CPU (the emulated build
// stages tools/margin_emulated/margin_lse_ptx.cuh in its place: the same functions with the
// same meaning, forwarded to tools/cuda_emulator/emulated_ptx.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// 1 where the sm_90a instructions below may be emitted: nvcc's device pass for sm_90a (the
// architecture-specific feature macro). Kernels that use them guard their body with it and
// trap elsewhere (sm_80 machine code, compute_80 PTX, the host pass).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MARGIN_OPS_SM90A 1
#else
#define MARGIN_OPS_SM90A 0
#endif

namespace margin_ops {
namespace cuda {
namespace dev {

// 2^x by the MUFU approximation (rel. error ~2^-22; ex2(-inf) = 0, subnormals flushed).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  }
}

// D = A (16x16, row) * B (16x8, col) + D, fp32 accumulate.
template <class T>
__device__ __forceinline__ void mma_16816(float& d0, float& d1, float& d2, float& d3,
                                          const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16816: bf16 or fp16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// D = A (16x8, row) * B (8x8, col) + D on TF32 operands, fp32 accumulate.
__device__ __forceinline__ void mma_1688_tf32(float& d0, float& d1, float& d2, float& d3,
                                              const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// fp32 -> TF32 (10-bit mantissa), rounded to nearest, ties away from zero.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

// ------------------------------------------------------------------------------------
// sm_90a (use only under MARGIN_OPS_SM90A). mbarriers are 8-byte shared-memory objects.
// ------------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrive and raise the phase's expected transaction bytes (the TMA copies complete them).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// fence.mbarrier_init: the initialised mbarriers are visible to the async proxy (TMA).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// fence.proxy.async.shared::cta: orders generic-proxy shared-memory accesses with later
// async-proxy (TMA, wgmma) ones.
__device__ __forceinline__ void fence_proxy_async_shared_cta() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// TMA: the box of the 2-D tensor map at element coordinates (x: inner dim, y: outer dim)
// into shared memory (128-byte aligned), completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(void* smem, const void* tensor_map, int x, int y,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
}
// ---- Thread block clusters (the fused backward's 2-CTA variant) ----
// %cluster_ctarank: the CTA's rank in its cluster.
__device__ __forceinline__ unsigned cluster_ctarank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// barrier.cluster.arrive.release / barrier.cluster.wait.acquire (every non-exited thread of
// the cluster arrives; exited threads count as arrived).
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
}
// mapa.shared::cluster: the shared::cluster address of shared::cta address `addr` in the
// CTA of rank `rank`.
__device__ __forceinline__ uint32_t mapa_shared(uint32_t addr, unsigned rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// One arrival on the mbarrier at a shared::cluster address (a peer CTA's, through mapa), with
// the default .release.cta semantics: it signals that this thread's wgmma reads of a buffer
// are retired (a wait_group before it), which the peer's TMA may then overwrite; nothing it
// wrote needs to be visible to the peer. (.release.cluster would add a MEMBAR.ALL.GPU before
// every release, waiting for the thread's dS' stores to global memory.)
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}
// tma_load_2d multicast: the box lands at the same CTA-relative offset in every CTA of the
// cluster whose bit is set in cta_mask, each completing its bytes on its mbarrier at bar's
// offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* smem, const void* tensor_map, int x,
                                                      int y, uint64_t* bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(x), "r"(y), "r"(smem_addr(bar)),
      "h"(cta_mask)
      : "memory");
}
// setmaxnreg.{inc,dec}: the warpgroup's per-thread register budget (warpgroup-wide).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of the accumulators across a wgmma fence / wait
// (CUTLASS's warpgroup_fence_operand).
template <int kCount>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define MARGIN_OPS_WGMMA_D64                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "    \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "     \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "     \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define MARGIN_OPS_WGMMA_ASM(TYPE, C)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE                        \
               " " MARGIN_OPS_WGMMA_D64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"                      \
               : C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]),                             \
                 C(d[6]), C(d[7]), C(d[8]), C(d[9]), C(d[10]), C(d[11]),                           \
                 C(d[12]), C(d[13]), C(d[14]), C(d[15]), C(d[16]), C(d[17]),                       \
                 C(d[18]), C(d[19]), C(d[20]), C(d[21]), C(d[22]), C(d[23]),                       \
                 C(d[24]), C(d[25]), C(d[26]), C(d[27]), C(d[28]), C(d[29]),                       \
                 C(d[30]), C(d[31]), C(d[32]), C(d[33]), C(d[34]), C(d[35]),                       \
                 C(d[36]), C(d[37]), C(d[38]), C(d[39]), C(d[40]), C(d[41]),                       \
                 C(d[42]), C(d[43]), C(d[44]), C(d[45]), C(d[46]), C(d[47]),                       \
                 C(d[48]), C(d[49]), C(d[50]), C(d[51]), C(d[52]), C(d[53]),                       \
                 C(d[54]), C(d[55]), C(d[56]), C(d[57]), C(d[58]), C(d[59]),                       \
                 C(d[60]), C(d[61]), C(d[62]), C(d[63])                                            \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))

// D (64 x 128, fp32; thread t = 32 w + 4 g + q of the warpgroup holds d[i] = D(16 w + g +
// 8 ((i / 2) % 2), 8 (i / 4) + 2 q + i % 2)) = A (64 x 16) B^T (B: 128 x 16) + (scale_d ? D : 0),
// both operands in shared memory through matrix descriptors, each operand's major mode an
// immediate (imm-trans-a / -b): 0 K-major; kTransA = 1 reads A M-major, kTransB = 1 reads B
// N-major (the descriptor then describes an MN-major layout).
template <class T, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "0 or 1");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MARGIN_OPS_WGMMA_ASM("bf16", "+f");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MARGIN_OPS_WGMMA_ASM("f16", "+f");
  }
}
// The same with scale_d = 0 and d an output only: D = A B^T, d's previous values dead (a
// tile's first wgmma in the forward's overlapped walk, margin_lse_forward_sm90.cu: the
// accumulator set's registers are then free between its epilogue and its next tile).
template <class T, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n128k16_ss_zero(float (&d)[64], uint64_t desc_a,
                                                         uint64_t desc_b) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "0 or 1");
  const int scale_d = 0;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MARGIN_OPS_WGMMA_ASM("bf16", "=f");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MARGIN_OPS_WGMMA_ASM("f16", "=f");
  }
}
#undef MARGIN_OPS_WGMMA_ASM
#undef MARGIN_OPS_WGMMA_D64

// ------------------------------------------------------------------------------------
// wgmma of other widths (the fused backward, margin_lse_bwd_fused_sm90.cu): D (64 x N,
// fp32) = A (64 x 16) B^T (B: N x 16) + (scale_d ? D : 0), the same fragment mapping as
// wgmma_m64n128k16_ss (thread t = 32 w + 4 g + q holds d[i] = D(16 w + g + 8 ((i / 2) % 2),
// 8 (i / 4) + 2 q + i % 2), i < N / 2) and the same operand flags. N = 32: the fused
// kernel's cosine tile per warpgroup; 64 and 256: its dW accumulator per warpgroup.
// ------------------------------------------------------------------------------------
#define MARGIN_OPS_WGMMA_N32_D                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define MARGIN_OPS_WGMMA_N32_ASM(TYPE, C)                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE                         \
               " " MARGIN_OPS_WGMMA_N32_D ", %16, %17, p, 1, 1, %19, %20;\n}\n"                    \
               : C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]),           \
                 C(d[8]), C(d[9]), C(d[10]), C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15])      \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))
template <class T, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "0 or 1");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MARGIN_OPS_WGMMA_N32_ASM("bf16", "+f");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MARGIN_OPS_WGMMA_N32_ASM("f16", "+f");
  }
}
// The same with scale_d = 0 and d an output only (D = A B^T): a tile's first k16 step, so
// that the accumulator's previous values (the last tile's epilogue, partly lane-divergent)
// are dead and ptxas need not order the wgmma after them.
template <class T, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n32k16_ss_zero(float (&d)[16], uint64_t desc_a,
                                                        uint64_t desc_b) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "0 or 1");
  const int scale_d = 0;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MARGIN_OPS_WGMMA_N32_ASM("bf16", "=f");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MARGIN_OPS_WGMMA_N32_ASM("f16", "=f");
  }
}
#undef MARGIN_OPS_WGMMA_N32_ASM
#undef MARGIN_OPS_WGMMA_N32_D
#define MARGIN_OPS_WGMMA_N64_D                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "    \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MARGIN_OPS_WGMMA_N64_ASM(TYPE, C)                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                         \
               " " MARGIN_OPS_WGMMA_N64_D ", %32, %33, p, 1, 1, %35, %36;\n}\n"                    \
               : C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]),           \
                 C(d[8]), C(d[9]), C(d[10]), C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15]),     \
                 C(d[16]), C(d[17]), C(d[18]), C(d[19]), C(d[20]), C(d[21]), C(d[22]), C(d[23]),   \
                 C(d[24]), C(d[25]), C(d[26]), C(d[27]), C(d[28]), C(d[29]), C(d[30]), C(d[31])    \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))
template <class T, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "0 or 1");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MARGIN_OPS_WGMMA_N64_ASM("bf16", "+f");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MARGIN_OPS_WGMMA_N64_ASM("f16", "+f");
  }
}
#undef MARGIN_OPS_WGMMA_N64_ASM
#undef MARGIN_OPS_WGMMA_N64_D
#define MARGIN_OPS_WGMMA_N256_D                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "    \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "     \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "     \
  "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "     \
  "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "     \
  "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, " \
  "%109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "     \
  "%124, %125, %126, %127}"
#define MARGIN_OPS_WGMMA_N256_ASM(TYPE, C)                                                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE                        \
               " " MARGIN_OPS_WGMMA_N256_D ", %128, %129, p, 1, 1, %131, %132;\n}\n"               \
               : C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]),           \
                 C(d[8]), C(d[9]), C(d[10]), C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15]),     \
                 C(d[16]), C(d[17]), C(d[18]), C(d[19]), C(d[20]), C(d[21]), C(d[22]), C(d[23]),   \
                 C(d[24]), C(d[25]), C(d[26]), C(d[27]), C(d[28]), C(d[29]), C(d[30]), C(d[31]),   \
                 C(d[32]), C(d[33]), C(d[34]), C(d[35]), C(d[36]), C(d[37]), C(d[38]), C(d[39]),   \
                 C(d[40]), C(d[41]), C(d[42]), C(d[43]), C(d[44]), C(d[45]), C(d[46]), C(d[47]),   \
                 C(d[48]), C(d[49]), C(d[50]), C(d[51]), C(d[52]), C(d[53]), C(d[54]), C(d[55]),   \
                 C(d[56]), C(d[57]), C(d[58]), C(d[59]), C(d[60]), C(d[61]), C(d[62]), C(d[63]),   \
                 C(d[64]), C(d[65]), C(d[66]), C(d[67]), C(d[68]), C(d[69]), C(d[70]), C(d[71]),   \
                 C(d[72]), C(d[73]), C(d[74]), C(d[75]), C(d[76]), C(d[77]), C(d[78]), C(d[79]),   \
                 C(d[80]), C(d[81]), C(d[82]), C(d[83]), C(d[84]), C(d[85]), C(d[86]), C(d[87]),   \
                 C(d[88]), C(d[89]), C(d[90]), C(d[91]), C(d[92]), C(d[93]), C(d[94]), C(d[95]),   \
                 C(d[96]), C(d[97]), C(d[98]), C(d[99]), C(d[100]), C(d[101]), C(d[102]),          \
                 C(d[103]), C(d[104]), C(d[105]), C(d[106]), C(d[107]), C(d[108]), C(d[109]),      \
                 C(d[110]), C(d[111]), C(d[112]), C(d[113]), C(d[114]), C(d[115]), C(d[116]),      \
                 C(d[117]), C(d[118]), C(d[119]), C(d[120]), C(d[121]), C(d[122]), C(d[123]),      \
                 C(d[124]), C(d[125]), C(d[126]), C(d[127])                                        \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))
template <class T, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "0 or 1");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MARGIN_OPS_WGMMA_N256_ASM("bf16", "+f");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MARGIN_OPS_WGMMA_N256_ASM("f16", "+f");
  }
}
#undef MARGIN_OPS_WGMMA_N256_ASM
#undef MARGIN_OPS_WGMMA_N256_D

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
