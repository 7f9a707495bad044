// Torch glue of the CUDA kernels of margin_lse / margin_lse_backward (the kernels and their
// design: margin_lse_kernels.cuh). Checks the arguments, makes the inputs contiguous,
// allocates outputs and the workspace through the caching allocator, launches on the
// current stream of x's device. No host synchronisation: CUDA-graph capturable.
//
// Determinism: the kernels use no atomics and reduce in a fixed order, so results are
// bitwise reproducible whether or not torch.use_deterministic_algorithms is on; the flag
// is passed along (and costs nothing).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../margin_params.h"
#include "margin_lse_kernels.cuh"

namespace margin_ops {
namespace {

// Whether float32 products may use TF32: the setting cuBLAS follows for torch.matmul and
// F.linear (torch.set_float32_matmul_precision "high"/"medium", or
// torch.backends.cuda.matmul.fp32_precision = "tf32"). Torch 2.13 reads it through the
// fp32-precision API, whose legacy getter allowTF32CuBLAS() raises once a user has set
// only the new one; older torch has the legacy getter alone.
bool tf32_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

// The kernels' dtype; float32 uses TF32 if allow_tf32 says so (None: tf32_allowed()).
cuda::DType kernel_dtype(const at::Tensor& x, std::optional<bool> allow_tf32) {
  switch (x.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat:
      return allow_tf32.value_or(tf32_allowed()) ? cuda::DType::kFloat32Tf32
                                                 : cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "x must be float16, bfloat16, float32 or float64, got ",
                       x.scalar_type());
  }
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on x's device ", x.device(),
              ", got ", weight.device());
  TORCH_CHECK(labels.device() == x.device(), "labels must be on x's device ", x.device(),
              ", got ", labels.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1,
                    "x must be 2-D (N, D) with D >= 1, got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                    "weight must be (C, D) with D = x.size(1) = ", x.size(1), ", got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight must have at least one class (row)");
  TORCH_CHECK_VALUE(weight.size(0) <= std::numeric_limits<int32_t>::max(),
                    "weight must have fewer than 2^31 classes, got ", weight.size(0));
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ",
                   x.scalar_type(), ", got ", weight.scalar_type());
  kernel_dtype(x, false);  // admits x's dtype
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0),
                    "labels must be (N,) with N = x.size(0) = ", x.size(0), ", got shape ",
                    labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                   labels.scalar_type());
}

// A per-row (N,) tensor of the backward: on x's device, floating; returned contiguous in
// the accumulation dtype.
at::Tensor per_row(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), name, " must be (N,) with N = ",
                    x.size(0), ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
                   t.scalar_type());
  return t.to(accumulation_type(x)).contiguous();
}

int multiprocessors(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}

at::Tensor workspace(size_t bytes, const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

// The contiguous inputs the kernels read.
struct Problem {
  at::Tensor x, weight, labels;
};

// Fills the fields ForwardParams and BackwardParams share from contiguous copies (or the
// tensors themselves) of the inputs, which it returns: the caller keeps them alive until
// the launch.
template <class Params>
Problem fill_problem(Params& p, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& labels, const MarginParams& mp,
                     std::optional<bool> allow_tf32) {
  Problem in{x.contiguous(), weight.contiguous(), labels.contiguous()};
  p.dtype = kernel_dtype(in.x, allow_tf32);
  p.n = in.x.size(0);
  p.c = in.weight.size(0);
  p.d = in.x.size(1);
  p.x = in.x.data_ptr();
  p.weight = in.weight.data_ptr();
  p.labels = in.labels.data_ptr<int64_t>();
  p.margin = mp;
  p.num_sms = multiprocessors(in.x);
  p.deterministic = at::globalContext().deterministicAlgorithms();
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_lse_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad, std::optional<bool> allow_tf32) {
  check_inputs(x, weight, labels);
  const MarginParams mp =
      make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const auto row_opts = x.options().dtype(accumulation_type(x));
  auto lse = at::empty({n}, row_opts);
  auto target_logit = at::empty({n}, row_opts);
  auto max_cos = at::empty({n}, row_opts);
  auto pred = at::empty({n}, x.options().dtype(at::kLong));
  if (n == 0) return {lse, target_logit, max_cos, pred};

  cuda::ForwardParams p{};
  const Problem inputs = fill_problem(p, x, weight, labels, mp, allow_tf32);
  p.lse = lse.data_ptr();
  p.target_logit = target_logit.data_ptr();
  p.max_cos = max_cos.data_ptr();
  p.pred = pred.data_ptr<int64_t>();
  const auto ws = workspace(cuda::forward_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::launch_margin_lse_forward(p, c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lse, target_logit, max_cos, pred};
}

std::tuple<at::Tensor, at::Tensor> margin_lse_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_target_logit, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad, std::optional<bool> allow_tf32) {
  check_inputs(x, weight, labels);
  const MarginParams mp =
      make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto g_lse = per_row(grad_lse, "grad_lse", x);
  const auto g_target = per_row(grad_target_logit, "grad_target_logit", x);
  const auto lse_c = per_row(lse, "lse", x);
  const int64_t n = x.size(0);
  auto grad_x = at::empty({n, x.size(1)}, x.options());
  auto grad_weight = at::empty({weight.size(0), weight.size(1)}, weight.options());
  if (n == 0) {
    grad_weight.zero_();
    return {grad_x, grad_weight};
  }

  cuda::BackwardParams p{};
  const Problem inputs = fill_problem(p, x, weight, labels, mp, allow_tf32);
  p.lse = lse_c.data_ptr();
  p.grad_lse = g_lse.data_ptr();
  p.grad_target_logit = g_target.data_ptr();
  p.grad_x = grad_x.data_ptr();
  p.grad_weight = grad_weight.data_ptr();
  const auto ws = workspace(cuda::backward_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::launch_margin_lse_backward(p, c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(margin, CUDA, m) {
  m.impl("margin_lse", &margin_lse_cuda);
  m.impl("margin_lse_backward", &margin_lse_backward_cuda);
}

}  // namespace margin_ops
