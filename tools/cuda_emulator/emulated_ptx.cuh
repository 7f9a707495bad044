// Host versions of common PTX instructions (cp.async, ldmatrix, mma.sync, ex2.approx,
// cvt.rna.tf32), with the semantics of the PTX ISA, for kernels run by the emulator
// (emulator.h). A project's own PTX wrappers header is swapped, in the staged sources
// (build.py), for one that forwards its functions to these. Warp-collective instructions
// (ldmatrix, mma.sync) gather the 32 lanes' operands through emu::warp_exchange and give
// each lane its own fragment of the result, so the kernels' fragment indexing is exercised
// exactly as on the GPU. The fragment maps below follow the PTX ISA's figures for these
// shapes; a test should check them, independently of any kernel, against the (thread,
// value) -> element layouts CUTLASS's CuTe declares for SM80_16x8x16_F32BF16BF16F32_TN (and
// F16), SM80_16x8x8_F32TF32TF32F32_TN, SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T (margin_ops
// does: tests/test_cuda_emulated.py through tools/margin_emulated/ptx_probe.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emulator.h"

namespace emu {
namespace ptx {

// ex2.approx.ftz.f32: 2^x with subnormal results flushed to zero (the approximation's
// ~2^-22 relative error is not modelled: the result is exact).
inline float ex2_approx(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline void cp_async16(void* smem, const void* gmem) { emu::cp_async16(smem, gmem); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait(N);
}

namespace detail {

inline uint16_t load_b16(const void* row, int element) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * element, 2);
  return v;
}

inline uint32_t pack(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// One lane's A and B fragment registers.
struct MmaOperands {
  uint32_t a[4], b[2];
};

// Every lane's A and B fragments (all[lane]), gathered through a warp rendezvous.
inline void gather_operands(emu::WarpOp op, const uint32_t (&a)[4], const uint32_t (&b)[2],
                            MmaOperands (&all)[32]) {
  MmaOperands mine{};
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  emu::warp_exchange(op, &mine, sizeof(mine), all);
}

// D (lane's 4 values) = C + A B with products summed in double and rounded once.
inline void mma_finish(const double (&a)[16][16], const double (&b)[16][8], int k, int lane,
                       float& d0, float& d1, float& d2, float& d3) {
  const int g = lane >> 2, t = lane & 3;
  float* d[4] = {&d0, &d1, &d2, &d3};
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q >> 1) * 8, col = 2 * t + (q & 1);
    double acc = *d[q];
    for (int kk = 0; kk < k; ++kk) acc += a[row][kk] * b[kk][col];
    *d[q] = float(acc);
  }
}

}  // namespace detail

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 address the rows of
// matrix j; lane L receives, of matrix j, the pair (row L/4, columns 2(L%4), 2(L%4)+1), of
// the transposed matrix with kTrans.
template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const int lane = emu::lane();
  const emu::WarpOp op = kTrans ? emu::WarpOp::kLdmatrixTrans : emu::WarpOp::kLdmatrix;
  const unsigned char* rows[32];
  const unsigned char* mine = static_cast<const unsigned char*>(p);
  const unsigned char* base = emu::dynamic_smem();
  if (mine < base || mine + 16 > base + emu::dynamic_smem_bytes()) {
    emu::fail("ldmatrix: row address outside the block's dynamic shared memory");
  }
  if (reinterpret_cast<uintptr_t>(mine) % 16 != 0) emu::fail("ldmatrix: row address not 16-byte aligned");
  emu::warp_exchange(op, &mine, sizeof(mine), rows);
  for (int j = 0; j < 4; ++j) {
    const int row = lane / 4, col = 2 * (lane % 4);
    if constexpr (kTrans) {
      r[j] = detail::pack(detail::load_b16(rows[8 * j + col], row),
                              detail::load_b16(rows[8 * j + col + 1], row));
    } else {
      r[j] = detail::pack(detail::load_b16(rows[8 * j + row], col),
                              detail::load_b16(rows[8 * j + row], col + 1));
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32. Fragments (g = lane/4,
// t = lane%4): a0 A[g][2t..2t+1], a1 A[g+8][2t..], a2 A[g][2t+8..], a3 A[g+8][2t+8..];
// b0 B[2t..2t+1][g], b1 B[2t+8..2t+9][g]; d0 d1 D[g][2t..2t+1], d2 d3 D[g+8][2t..].
template <class T>
inline void mma_16816(float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4],
                      const uint32_t (&b)[2]) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "mma_16816: bf16 or fp16");
  detail::MmaOperands all[32];
  detail::gather_operands(kBf16 ? emu::WarpOp::kMmaBf16 : emu::WarpOp::kMmaF16, a, b, all);
  double am[16][16], bm[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    auto lo = [&](uint32_t w) { return emu::b16_to_float(uint16_t(w & 0xffffu), kBf16); };
    auto hi = [&](uint32_t w) { return emu::b16_to_float(uint16_t(w >> 16), kBf16); };
    const uint32_t* fa = all[l].a;
    am[g][2 * t] = lo(fa[0]), am[g][2 * t + 1] = hi(fa[0]);
    am[g + 8][2 * t] = lo(fa[1]), am[g + 8][2 * t + 1] = hi(fa[1]);
    am[g][2 * t + 8] = lo(fa[2]), am[g][2 * t + 9] = hi(fa[2]);
    am[g + 8][2 * t + 8] = lo(fa[3]), am[g + 8][2 * t + 9] = hi(fa[3]);
    const uint32_t* fb = all[l].b;
    bm[2 * t][g] = lo(fb[0]), bm[2 * t + 1][g] = hi(fb[0]);
    bm[2 * t + 8][g] = lo(fb[1]), bm[2 * t + 9][g] = hi(fb[1]);
  }
  detail::mma_finish(am, bm, 16, emu::lane(), d0, d1, d2, d3);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: a0 A[g][t], a1 A[g+8][t], a2 A[g][t+4],
// a3 A[g+8][t+4]; b0 B[t][g], b1 B[t+4][g]; D as above. Only the TF32 bits of an operand
// (sign, exponent, 10 mantissa bits) are used.
inline void mma_1688_tf32(float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4],
                          const uint32_t (&b)[2]) {
  detail::MmaOperands all[32];
  detail::gather_operands(emu::WarpOp::kMmaTf32, a, b, all);
  auto value = [](uint32_t bits) {
    bits &= 0xffffe000u;
    float v;
    std::memcpy(&v, &bits, 4);
    return double(v);
  };
  double am[16][16] = {}, bm[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    am[g][t] = value(all[l].a[0]);
    am[g + 8][t] = value(all[l].a[1]);
    am[g][t + 4] = value(all[l].a[2]);
    am[g + 8][t + 4] = value(all[l].a[3]);
    bm[t][g] = value(all[l].b[0]);
    bm[t + 4][g] = value(all[l].b[1]);
  }
  detail::mma_finish(am, bm, 8, emu::lane(), d0, d1, d2, d3);
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (NaN and inf kept).
inline uint32_t to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;
  return (bits + 0x1000u) & 0xffffe000u;
}

// ---- sm_90a: mbarrier, bulk copies, proxy fences, clusters, wgmma, setmaxnreg (emulator.h has the semantics) ----

inline uint32_t smem_address(const void* p) { return emu::smem_address(p); }
inline void mbarrier_init(uint64_t* bar, unsigned count) { emu::mbarrier_init(bar, count); }
inline void mbarrier_inval(uint64_t* bar) { emu::mbarrier_inval(bar); }
inline uint64_t mbarrier_arrive(uint64_t* bar) { return emu::mbarrier_arrive(bar, 1); }
inline uint64_t mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  return emu::mbarrier_arrive_expect_tx(bar, bytes);
}
inline void mbarrier_expect_tx(uint64_t* bar, unsigned bytes) { emu::mbarrier_expect_tx(bar, bytes); }
inline bool mbarrier_try_wait_parity(uint64_t* bar, unsigned parity) {
  return emu::mbarrier_try_wait_parity(bar, parity);
}
inline void mbarrier_wait_parity(uint64_t* bar, unsigned parity) {
  while (!emu::mbarrier_try_wait_parity(bar, parity)) {
  }
}
inline void bulk_copy_g2s(void* smem_dst, const void* gmem_src, unsigned bytes, uint64_t* bar) {
  emu::bulk_copy_g2s(smem_dst, gmem_src, bytes, bar);
}
inline void tma_load_2d(void* smem_dst, const void* tensor_map, int x, int y, uint64_t* bar) {
  emu::tma_load_2d(smem_dst, tensor_map, x, y, bar);
}
// fence.proxy.async.shared::cta and fence.mbarrier_init.release.cluster (emulator.h: what
// they make visible to the async proxy, and what fails without them).
inline void fence_proxy_async_shared_cta() { emu::fence_proxy_async_shared(); }
inline void fence_mbarrier_init() { emu::fence_mbarrier_init(); }
// The same two fences under their earlier names.
inline void fence_proxy_async() { fence_proxy_async_shared_cta(); }
inline void fence_barrier_init() { fence_mbarrier_init(); }

// Clusters (emulator.h): %cluster_ctarank, %cluster_nctarank, barrier.cluster.arrive.release
// and barrier.cluster.wait.acquire, mapa.shared::cluster, a (possibly remote) mbarrier arrive
// at a shared::cluster address, and the 2-D TMA load multicast to the CTAs of cta_mask.
inline unsigned cluster_ctarank() { return emu::cluster_ctarank(); }
inline unsigned cluster_nctarank() { return emu::cluster_nctarank(); }
inline void cluster_arrive() { emu::cluster_arrive(); }
inline void cluster_wait() { emu::cluster_wait(); }
inline void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
inline uint32_t mapa_shared(uint32_t address, unsigned rank) { return emu::mapa_shared(address, rank); }
inline void mbarrier_arrive_cluster(uint32_t cluster_address) { emu::mbarrier_arrive_cluster(cluster_address); }
inline void tma_load_2d_multicast(void* smem_dst, const void* tensor_map, int x, int y, uint64_t* bar,
                                  uint16_t cta_mask) {
  emu::tma_load_2d_multicast(smem_dst, tensor_map, x, y, bar, cta_mask);
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 kRegs: warpgroup-wide (emulator.h); ptxas refuses a
// count outside [24, 256] or not a multiple of 8, so does the compiler here.
template <int kRegs>
inline void setmaxnreg_inc() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg: a multiple of 8 in [24, 256]");
  emu::setmaxnreg(true, kRegs);
}
template <int kRegs>
inline void setmaxnreg_dec() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg: a multiple of 8 in [24, 256]");
  emu::setmaxnreg(false, kRegs);
}

// wgmma.fence.sync.aligned, wgmma.commit_group.sync.aligned, wgmma.wait_group.sync.aligned N.
inline void wgmma_fence() { emu::wgmma_fence(); }
inline void wgmma_commit_group() { emu::wgmma_commit_group(); }
template <int N>
inline void wgmma_wait_group() {
  emu::wgmma_wait_group(N);
}
// The compiler-level register fence CUTLASS calls warpgroup_fence_operand: here it fails if
// a wgmma still in flight writes these registers.
template <int kCount>
inline void wgmma_fence_operand(float (&d)[kCount]) {
  emu::wgmma_check_registers(d, kCount);
}

// wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{bf16,f16}.{bf16,f16}: D (64 x N, fp32; thread
// t = 32 w + 4 g + q of the warpgroup holds d[i] = D(16 w + g + 8 ((i/2)%2), 8 (i/4) + 2 q + i%2))
// = A (64 x 16) B^T (B: N x 16) + (scale_d ? D : 0), A and B negated by scale_a, scale_b = -1,
// products summed in double and rounded once. A and B from shared memory through 64-bit
// matrix descriptors (tnsp 0: K-major, 1: MN-major), or A from four registers per thread
// (t holds in register j the pair (16 w + g + 8 (j%2), 2 q + 8 (j/2) + {0,1}), low half first).
// The results are written at the wgmma.wait_group that covers the instruction's group: the
// registers read as NaN until then; writing them meanwhile, or overwriting a shared-memory
// operand, fails at that wait; so does issuing without a wgmma.fence since the last wait.
template <class T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d, int tnsp_a = 0,
                     int tnsp_b = 0, int scale_a = 1, int scale_b = 1) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "wgmma: bf16 or fp16 inputs");
  emu::wgmma_mma_async(kBf16 ? 0 : 1, N, d, nullptr, desc_a, desc_b, scale_d, scale_a, scale_b, tnsp_a, tnsp_b);
}
template <class T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d, int tnsp_b = 0,
                     int scale_a = 1, int scale_b = 1) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "wgmma: bf16 or fp16 inputs");
  emu::wgmma_mma_async(kBf16 ? 0 : 1, N, d, a, 0, desc_b, scale_d, scale_a, scale_b, 0, tnsp_b);
}

}  // namespace ptx
}  // namespace emu
