// Staged in place of csrc/cuda/margin_lse_ptx.cuh for the emulated build (build_emulator.py):
// the kernels' PTX wrappers, with the same names and meaning, forwarded to the emulator's
// host versions of those instructions (tools/cuda_emulator/emulated_ptx.cuh).
#pragma once

#include "emulated_ptx.cuh"

// The emulator models the sm_90a instructions: the Hopper kernels' bodies compile here.
#define MARGIN_OPS_SM90A 1

namespace margin_ops {
namespace cuda {
namespace dev {

using ::emu::ptx::cp_async16;
using ::emu::ptx::cp_async_commit;
using ::emu::ptx::cp_async_wait;
using ::emu::ptx::ex2_approx;
using ::emu::ptx::ldmatrix_x4;
using ::emu::ptx::mma_16816;
using ::emu::ptx::mma_1688_tf32;
using ::emu::ptx::to_tf32;

// sm_90a
using ::emu::ptx::cluster_arrive;
using ::emu::ptx::cluster_ctarank;
using ::emu::ptx::cluster_wait;
using ::emu::ptx::fence_mbarrier_init;
using ::emu::ptx::fence_proxy_async_shared_cta;
using ::emu::ptx::mapa_shared;
using ::emu::ptx::mbarrier_arrive;
using ::emu::ptx::mbarrier_arrive_cluster;
using ::emu::ptx::mbarrier_arrive_expect_tx;
using ::emu::ptx::mbarrier_init;
using ::emu::ptx::mbarrier_wait_parity;
using ::emu::ptx::setmaxnreg_dec;
using ::emu::ptx::setmaxnreg_inc;
using ::emu::ptx::tma_load_2d;
using ::emu::ptx::tma_load_2d_multicast;
using ::emu::ptx::wgmma_commit_group;
using ::emu::ptx::wgmma_fence;
using ::emu::ptx::wgmma_fence_operand;
using ::emu::ptx::wgmma_wait_group;

inline uint32_t smem_addr(const void* p) { return ::emu::ptx::smem_address(p); }

template <class T, int kTransA = 0, int kTransB = 0>
inline void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  ::emu::ptx::wgmma_ss<T, 128>(d, desc_a, desc_b, scale_d, kTransA, kTransB);
}
template <class T, int kTransA = 0, int kTransB = 0>
inline void wgmma_m64n128k16_ss_zero(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  ::emu::ptx::wgmma_ss<T, 128>(d, desc_a, desc_b, 0, kTransA, kTransB);
}
template <class T, int kTransA = 0, int kTransB = 0>
inline void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  ::emu::ptx::wgmma_ss<T, 32>(d, desc_a, desc_b, scale_d, kTransA, kTransB);
}
template <class T, int kTransA = 0, int kTransB = 0>
inline void wgmma_m64n32k16_ss_zero(float (&d)[16], uint64_t desc_a, uint64_t desc_b) {
  ::emu::ptx::wgmma_ss<T, 32>(d, desc_a, desc_b, 0, kTransA, kTransB);
}
template <class T, int kTransA = 0, int kTransB = 0>
inline void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  ::emu::ptx::wgmma_ss<T, 64>(d, desc_a, desc_b, scale_d, kTransA, kTransB);
}
template <class T, int kTransA = 0, int kTransB = 0>
inline void wgmma_m64n256k16_ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  ::emu::ptx::wgmma_ss<T, 256>(d, desc_a, desc_b, scale_d, kTransA, kTransB);
}

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
