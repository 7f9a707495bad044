// The sm_90a bwd_tile kernel's host entry (margin_lse_bwd_tile_sm90.cu): when it applies,
// its tensor maps and its launch per class chunk, for margin_lse_backward.cu's Backward::run.
#pragma once

#include <cuda.h>  // CUtensorMap (types only)
#include <cuda_runtime_api.h>

#include <cstdint>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_kernels.cuh"
#include "margin_lse_tma.cuh"  // XwTensorMaps

namespace margin_ops {
namespace cuda {

// sm90_forward_eligible's conditions (compute capability 9.0, 16-bit, K = 1, no
// class_index, TMA alignment, x's row tile resident beside a W ring of >= 2 stages).
bool sm90_bwd_tile_eligible(const ProblemParams& p);

// Encodes the maps and allows the kernel's dynamic shared memory (T: __nv_bfloat16 or
// __half); tensor-map encoding failures are returned as a cudaError.
template <class T>
cudaError_t prepare_bwd_tile_sm90(const ProblemParams& p, XwTensorMaps& maps);

// bwd_tile_sm90_kernel for the chunk of kc classes from args.c0: exactly bwd_tile_kernel's
// outputs (scratch, r_part, w_norm, corr_part), on a grid of (row tile, class-tile range).
template <class T>
cudaError_t launch_bwd_tile_sm90(const ProblemParams& p, const XwTensorMaps& maps,
                                 const dev::TileArgs<T>& args, int row_tiles, int64_t kc,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace margin_ops
