// Host side of TMA: the 2-D tensor maps of every sm_90a kernel (cuTensorMapEncodeTiled,
// reached through the runtime's driver entry point so that nothing links -lcuda; in the host
// emulator's build, the emulator's own cuTensorMapEncodeTiled).
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cuda_runtime.h>

#include <cstdint>

namespace margin_ops {
namespace cuda {

// The tensor maps of x and W that an sm_90a backward kernel reads (encoded once per
// backward); x_half: x in boxes of half the row tile, for the fused backward's 2-CTA cluster
// variant (each CTA of the pair loads one half and multicasts it to both).
struct XwTensorMaps {
  CUtensorMap x, w, x_half;
};

// The 2-D tensor of 16-bit elements (bf16 or fp16) at `base`: `outer` rows of `inner`
// elements, `pitch_bytes` from one row to the next (a multiple of 16; base 16-byte
// aligned), as boxes of `box_outer` rows x 64 elements (128 bytes, the swizzle span),
// 128B-swizzled in shared memory; elements outside the tensor read as zeros.
inline cudaError_t encode_tma_2d_b16(CUtensorMap* map, bool bf16, const void* base, int64_t inner,
                                     int64_t outer, int64_t pitch_bytes, int box_outer) {
  const cuuint64_t dims[2] = {cuuint64_t(inner), cuuint64_t(outer)};
  const cuuint64_t strides[1] = {cuuint64_t(pitch_bytes)};
  const cuuint32_t box[2] = {64, cuuint32_t(box_outer)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
#if defined(__CUDACC__)
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode_tiled = nullptr;
  if (encode_tiled == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess) return err;
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode_tiled = reinterpret_cast<Encode>(fn);
  }
#else
  const auto encode_tiled = &cuTensorMapEncodeTiled;
#endif
  const CUresult r = encode_tiled(map, type, 2, const_cast<void*>(base), dims, strides, box,
                                  elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace margin_ops
