// The sm_90a forward main kernel's host entry (margin_lse_forward_sm90.cu): when it applies
// and its launch, for margin_lse_forward.cu's Forward::run.
#pragma once

#include <cuda_runtime_api.h>

#include "margin_lse_epilogue.cuh"
#include "margin_lse_kernels.cuh"

namespace margin_ops {
namespace cuda {

// Its tile: fwd_main_kernel's layout (rows x classes per CTA tile), so that prep, the split
// partials and combine are shared.
constexpr int kSm90TileRows = 128, kSm90TileClasses = 128;

// Compute capability 9.0, 16-bit inputs, one sub-center, no class_index, and TMA's
// constraints: 16-byte aligned bases and row pitch (d·2 a multiple of 16), x's row tile
// resident beside the W ring within 227 KiB of shared memory (d <= 640).
bool sm90_forward_eligible(const ProblemParams& p);

// fwd_main_sm90_kernel on fwd_main_kernel's grid, writing its partials (T: __nv_bfloat16 or
// __half). Tensor-map encoding failures are returned as a cudaError.
template <class T>
cudaError_t launch_fwd_main_sm90(const ProblemParams& p, const dev::FwdArgs<T>& args,
                                 unsigned grid, cudaStream_t stream);

}  // namespace cuda
}  // namespace margin_ops
