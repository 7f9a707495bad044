// wgmma shared-memory matrix descriptors of the sm_90a kernels' 128B-swizzled operand tiles
// (PTX ISA "Matrix Descriptor Format": start address >> 4 in bits 0-13, leading byte offset
// (LBO) >> 4 at bit 16, stride byte offset (SBO) >> 4 at bit 32, base offset 0 (every
// 1024-byte swizzle atom is 1024-aligned), layout 1 = 128B swizzle at bit 62). Both kinds
// of tile are rows of 128 bytes (64 16-bit elements, the TMA box's inner dimension), 8-row
// groups 1024 bytes apart (SBO).
#pragma once

#include <cstdint>

namespace margin_ops {
namespace cuda {

// The warp roles every sm_90a kernel shares: one producer warpgroup (TMA) and two consumer
// warpgroups (wgmma), k blocks of one 128-byte swizzle span of 16-bit elements.
struct Sm90WarpRoles {
  static constexpr int kThreads = 384;
  static constexpr int kConsumers = 256;
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128·40 + 256·232 <= 64K
  static constexpr int BK = 64;
};

namespace dev {

__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo) {
  return uint64_t((addr & 0x3ffff) >> 4) | (uint64_t(lbo >> 4) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// K-major: a row per M/N index holding 64 k; LBO unused (1). A k16 step is +32 bytes.
__device__ __forceinline__ uint64_t sw128_desc_kmajor(uint32_t addr) { return sw128_desc(addr, 16); }

// MN-major: a row per k holding 64 M/N indices; the next 64 M/N (the next TMA box)
// `next_box_bytes` on (LBO). A k16 step is +2048 bytes (16 rows of 128 bytes).
__device__ __forceinline__ uint64_t sw128_desc_mnmajor(uint32_t addr, uint32_t next_box_bytes) {
  return sw128_desc(addr, next_box_bytes);
}

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
