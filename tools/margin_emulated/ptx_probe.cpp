// One-warp kernels that run a single emulated ldmatrix or mma.sync on operands given per
// lane, so that tests/test_cuda_emulated.py can check the PTX the kernels call in the
// emulated build (tools/cuda_emulator/emulated_ptx.cuh, through the names of
// csrc/cuda/margin_lse_ptx.cuh) against fragment layouts written down independently
// (CUTLASS's CuTe traits), not against our kernels.
#include <torch/extension.h>  // before emulator.h, whose macros are for kernel code

#include "emulator.h"
#include "cuda/margin_lse_ptx.cuh"  // as staged by build_emulator.py: margin_lse_ptx.cuh here

namespace {

namespace dev = margin_ops::cuda::dev;

struct MmaProbe {
  int kind;                    // 0 bf16 m16n8k16, 1 fp16 m16n8k16, 2 tf32 m16n8k8
  const int32_t* a;            // (32, 4) register bits per lane
  const int32_t* b;            // (32, 2)
  float* d;                    // (32, 4) in: C, out: D
};

void mma_kernel(const MmaProbe* p) {
  const int lane = int(threadIdx.x);
  uint32_t a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = uint32_t(p->a[lane * 4 + i]);
  for (int i = 0; i < 2; ++i) b[i] = uint32_t(p->b[lane * 2 + i]);
  float* d = p->d + lane * 4;
  if (p->kind == 0) {
    dev::mma_16816<__nv_bfloat16>(d[0], d[1], d[2], d[3], a, b);
  } else if (p->kind == 1) {
    dev::mma_16816<__half>(d[0], d[1], d[2], d[3], a, b);
  } else {
    dev::mma_1688_tf32(d[0], d[1], d[2], d[3], a, b);
  }
}

struct LdmatrixProbe {
  bool trans;
  const int16_t* image;  // copied into shared memory
  int64_t image_elems;
  const int64_t* row_offset;  // (32,) element offset of each lane's row address
  int32_t* r;                 // (32, 4) out
};

void ldmatrix_kernel(const LdmatrixProbe* p) {
  auto* smem = reinterpret_cast<int16_t*>(emu::dynamic_smem());
  if (threadIdx.x == 0) std::memcpy(smem, p->image, size_t(p->image_elems) * 2);
  __syncthreads();
  const int lane = int(threadIdx.x);
  uint32_t r[4];
  if (p->trans) {
    dev::ldmatrix_x4<true>(r, smem + p->row_offset[lane]);
  } else {
    dev::ldmatrix_x4<false>(r, smem + p->row_offset[lane]);
  }
  for (int i = 0; i < 4; ++i) p->r[lane * 4 + i] = int32_t(r[i]);
}

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "probe failed in the emulator: ", emu::last_error());
}

}  // namespace

// D (32, 4) float32 = the lanes' results of one mma.sync with per-lane A (32, 4) and B
// (32, 2) int32 register bits and C (32, 4) float32.
at::Tensor probe_mma(int64_t kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const auto ac = a.contiguous(), bc = b.contiguous();
  auto d = c.contiguous().clone();
  MmaProbe p{int(kind), ac.data_ptr<int32_t>(), bc.data_ptr<int32_t>(), d.data_ptr<float>()};
  check(emu::launch(dim3(1), dim3(32), 0, nullptr, mma_kernel, &p));
  return d;
}

// The (32, 4) int32 registers of one ldmatrix.x4 over a shared-memory image (int16) whose
// lane rows start at row_offset (32,) int64 elements.
at::Tensor probe_ldmatrix(bool trans, const at::Tensor& image, const at::Tensor& row_offset) {
  const auto ic = image.contiguous(), oc = row_offset.contiguous();
  auto r = at::zeros({32, 4}, at::kInt);
  LdmatrixProbe p{trans, ic.data_ptr<int16_t>(), ic.numel(), oc.data_ptr<int64_t>(), r.data_ptr<int32_t>()};
  check(emu::launch(dim3(1), dim3(32), size_t(ic.numel()) * 2, nullptr, ldmatrix_kernel, &p));
  return r;
}
