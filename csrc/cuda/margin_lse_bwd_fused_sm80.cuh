// The mma.sync fused backward kernel's host entry (margin_lse_bwd_fused_sm80.cu): when it
// applies and its launch per class chunk, for margin_lse_backward.cu's Backward::run (it
// replaces that chunk's bwd_tile + bwd_dw launches where bwd_fused_sm90 does not run).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_bwd_fused_sm90.cuh"  // kBwdFusedClasses: both fused kernels' class tile
#include "margin_lse_kernels.cuh"

namespace margin_ops {
namespace cuda {

// bf16 / fp16, K = 1, no class_index, 64 <= d <= 512 with d % 64 == 0, x, W and grad_weight
// 16-byte aligned, and the kernel's dynamic shared memory (W's 64 rows, two x row tiles, the
// staging tile) within what a block may opt in to on compute capability p.arch (8.0 / 8.7:
// 163 KiB, 8.6 / 8.9: 99 KiB, 9.0: 227 KiB; other devices: never).
bool bwd_fused_eligible(const BackwardParams& p);

// Allows the kernel's dynamic shared memory (T: __nv_bfloat16 or __half).
template <class T>
cudaError_t prepare_bwd_fused(const BackwardParams& p);

// bwd_fused_kernel for the chunk of kc classes from args.c0: bwd_tile's scratch and
// corr_part (per 64-class tile: corr_part[ct, i], ct < ceil(kc / 64)), and the chunk's dW
// rows in p.grad_weight (r_part, w_norm and x̂ are neither written nor needed).
template <class T>
cudaError_t launch_bwd_fused(const BackwardParams& p, const dev::TileArgs<T>& args, int64_t kc,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace margin_ops
