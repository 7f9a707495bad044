// The sm_90a fused backward kernel's host entry (margin_lse_bwd_fused_sm90.cu): when it
// applies, its tensor maps and its launch per class chunk, for margin_lse_backward.cu's
// Backward::run (it replaces that chunk's bwd_tile + bwd_dw launches).
#pragma once

#include <cuda.h>  // CUtensorMap (types only)
#include <cuda_runtime_api.h>

#include <cstdint>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_kernels.cuh"
#include "margin_lse_tma.cuh"  // XwTensorMaps

namespace margin_ops {
namespace cuda {

// Classes per CTA: the chunk's corr_part has one row block per such tile (cc / 64 of them).
constexpr int kBwdFusedClasses = 64;

// Compute capability 9.0, 16-bit, K = 1, no class_index, 64 <= d <= 512 with d % 64 == 0
// (x's row tiles, W's class tile and the dW accumulators fit the shared memory and register
// budgets), x, W and grad_weight 16-byte aligned.
bool sm90_bwd_fused_eligible(const BackwardParams& p);

// Encodes the maps (x, x_half, w) and allows both variants' dynamic shared memory (T:
// __nv_bfloat16 or __half); tensor-map encoding failures are returned as a cudaError.
template <class T>
cudaError_t prepare_bwd_fused_sm90(const BackwardParams& p, XwTensorMaps& maps);

// bwd_fused_sm90_kernel for the chunk of kc classes from args.c0: bwd_tile's scratch and
// corr_part (per 64-class tile: corr_part[ct, i], ct < ceil(kc / 64)), and the chunk's dW
// rows in p.grad_weight (r_part and w_norm are neither written nor needed). An even number
// of class tiles runs as 2-CTA clusters sharing each x tile by TMA multicast (maps.x_half),
// an odd one without clusters (maps.x); the outputs are the same bits.
template <class T>
cudaError_t launch_bwd_fused_sm90(const BackwardParams& p, const XwTensorMaps& maps,
                                  const dev::TileArgs<T>& args, int64_t kc, cudaStream_t stream);

}  // namespace cuda
}  // namespace margin_ops
