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

#include "../margin_checks.h"
#include "../margin_params.h"
#include "launch_params.h"

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

// Whether float32 products use TF32: as allow_tf32 says, or as torch's matmul setting does.
bool use_tf32(const at::Tensor& x, std::optional<bool> allow_tf32) {
  return x.scalar_type() == at::kFloat && (allow_tf32 ? *allow_tf32 : tf32_allowed());
}

// The argument checks of both passes (margin_checks.h, plus what only CUDA needs), then
// the margin's (make_params).
MarginParams check_arguments(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& labels, const cuda::ProblemOptions& options,
                             c10::string_view margin, double s, double m1, double m2, double m3,
                             double lamb, bool feature_scale, bool detach_margin_grad) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  check_inputs(x, weight, labels);
  check_options(x, weight, options.subcenters, options.class_index, options.hard_threshold,
                options.hard_t);
  cuda::kernel_dtype(x.scalar_type(), false);  // admits x's dtype
  return make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
}

// A per-row (N,) tensor of the backward, checked, contiguous in the accumulation dtype.
at::Tensor per_row(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_per_row(t, name, x);
  return t.to(cuda::accumulation_type(x.scalar_type())).contiguous();
}

int multiprocessors(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}

// The compute capability of x's device as major·10 + minor (90 selects the sm_90a forward).
int compute_capability(const at::Tensor& x) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
  return major * 10 + minor;
}

// Fills the fields both passes share from contiguous copies (or the tensors themselves) of
// the inputs, which it returns: the caller keeps them alive until the launch.
cuda::LaunchInputs fill_problem(cuda::ProblemParams& p, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& labels,
                                const cuda::ProblemOptions& options, const MarginParams& mp,
                                std::optional<bool> allow_tf32) {
  return cuda::fill_problem(p, x, weight, labels, options, mp, use_tf32(x, allow_tf32),
                            multiprocessors(x), compute_capability(x),
                            at::globalContext().deterministicAlgorithms(),
                            [](const at::Tensor& t) { return t.contiguous(); });
}

// Allocates the pass's workspace (caching allocator: reused in stream order) and enqueues
// the pass on the current stream of x's device.
template <class Params>
void launch(Params& p, const at::Tensor& x) {
  const auto ws = at::empty({static_cast<int64_t>(cuda::workspace_bytes(p))},
                            x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::launch(p, c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_lse_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad, std::optional<bool> allow_tf32,
    int64_t subcenters, const std::optional<at::Tensor>& class_index,
    const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_t) {
  const cuda::ProblemOptions options{subcenters, class_index, hard_threshold, hard_t};
  const MarginParams mp = check_arguments(x, weight, labels, options, margin, s, m1, m2, m3,
                                          lamb, feature_scale, detach_margin_grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const auto row_opts = x.options().dtype(cuda::accumulation_type(x.scalar_type()));
  auto lse = at::empty({n}, row_opts);
  auto target_logit = at::empty({n}, row_opts);
  auto max_cos = at::empty({n}, row_opts);
  auto pred = at::empty({n}, x.options().dtype(at::kLong));
  auto nontarget_sum = at::empty({n}, row_opts);
  if (n == 0) return {lse, target_logit, max_cos, pred, nontarget_sum};

  cuda::ForwardParams p{};
  const cuda::LaunchInputs inputs = fill_problem(p, x, weight, labels, options, mp, allow_tf32);
  p.lse = lse.data_ptr();
  p.target_logit = target_logit.data_ptr();
  p.max_cos = max_cos.data_ptr();
  p.pred = pred.data_ptr<int64_t>();
  p.nontarget_sum = nontarget_sum.data_ptr();
  launch(p, x);
  return {lse, target_logit, max_cos, pred, nontarget_sum};
}

std::tuple<at::Tensor, at::Tensor> margin_lse_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_target_logit,
    const at::Tensor& grad_nontarget_sum, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& lse, c10::string_view margin, double s,
    double m1, double m2, double m3, double lamb, bool feature_scale, bool detach_margin_grad,
    std::optional<bool> allow_tf32, int64_t subcenters,
    const std::optional<at::Tensor>& class_index, const std::optional<at::Tensor>& hard_threshold,
    const std::optional<at::Tensor>& hard_t) {
  const cuda::ProblemOptions options{subcenters, class_index, hard_threshold, hard_t};
  const MarginParams mp = check_arguments(x, weight, labels, options, margin, s, m1, m2, m3,
                                          lamb, feature_scale, detach_margin_grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto g_lse = per_row(grad_lse, "grad_lse", x);
  const auto g_target = per_row(grad_target_logit, "grad_target_logit", x);
  const auto g_sum = per_row(grad_nontarget_sum, "grad_nontarget_sum", x);
  const auto lse_c = per_row(lse, "lse", x);
  const int64_t n = x.size(0);
  auto grad_x = at::empty({n, x.size(1)}, x.options());
  // Rows no class reads (outside class_index, or every row without rows of x) get zero.
  auto grad_weight = class_index || n == 0 ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                           : at::empty({weight.size(0), weight.size(1)},
                                                       weight.options());
  if (n == 0) return {grad_x, grad_weight};

  cuda::BackwardParams p{};
  const cuda::LaunchInputs inputs = fill_problem(p, x, weight, labels, options, mp, allow_tf32);
  p.lse = lse_c.data_ptr();
  p.grad_lse = g_lse.data_ptr();
  p.grad_target_logit = g_target.data_ptr();
  p.grad_nontarget_sum = g_sum.data_ptr();
  p.grad_x = grad_x.data_ptr();
  p.grad_weight = grad_weight.data_ptr();
  launch(p, x);
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(margin, CUDA, m) {
  m.impl("margin_lse", &margin_lse_cuda);
  m.impl("margin_lse_backward", &margin_lse_backward_cuda);
}

}  // namespace margin_ops
