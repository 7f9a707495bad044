// Staged in place of csrc/cuda/margin_lse_ptx.cuh for the emulated build (build_emulator.py):
// the kernels' PTX wrappers, with the same names and meaning, forwarded to the emulator's
// host versions of those instructions (tools/cuda_emulator/emulated_ptx.cuh).
#pragma once

#include "emulated_ptx.cuh"

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

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
