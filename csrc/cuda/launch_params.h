// The launch parameters of the CUDA kernels (margin_lse_kernels.cuh) filled from tensors:
// what the torch glue (margin_lse_cuda.cpp: CUDA tensors made contiguous, the device's SM
// count, torch's deterministic flag) and the host emulator's driver
// (tools/margin_emulated/driver.cpp: guarded copies of CPU tensors, a given SM count) both
// do. ATen headers only, no c10/cuda ones, so that the emulator's CPU-torch build includes
// it too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>

#include "../margin_checks.h"
#include "../margin_params.h"
#include "margin_lse_kernels.cuh"

namespace margin_ops {
namespace cuda {

// The kernels' DType of inputs of dtype `dtype`; float32 products in TF32 when `tf32`.
inline DType kernel_dtype(at::ScalarType dtype, bool tf32) {
  switch (dtype) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return tf32 ? DType::kFloat32Tf32 : DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "x must be float16, bfloat16, float32 or float64, got ",
                       dtype_name(dtype));
  }
}

// The dtype of the per-row statistics and upstream gradients ("Acc"): double for float64
// inputs, else float.
inline at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The tensors whose data the kernels read: the caller keeps them alive until the launch ends.
// The optional ones are undefined when not given.
struct LaunchInputs {
  at::Tensor x, weight, labels, class_index, hard_threshold, hard_t;
};

// The primitive's options beyond the margin (checked already by check_options).
struct ProblemOptions {
  int64_t subcenters;
  const std::optional<at::Tensor>& class_index;
  const std::optional<at::Tensor>& hard_threshold;
  const std::optional<at::Tensor>& hard_t;
};

// Fills the fields both passes share (ProblemParams, all but the workspace) from x (N, D),
// weight (R, D), labels (N,) and the options, checked already, the margin and the device
// (its SM count and compute capability, major·10 + minor). `prepare(t)`
// gives the contiguous tensor whose data the kernels are to read for each input (t.contiguous(),
// or a guarded copy); hard_threshold / hard_t are first converted to the accumulation dtype.
// They are returned, to be kept alive until the launch ends.
template <class Prepare>
LaunchInputs fill_problem(ProblemParams& p, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& labels, const ProblemOptions& options,
                          const MarginParams& margin, bool tf32, int num_sms, int arch,
                          bool deterministic, Prepare&& prepare) {
  TORCH_CHECK_NOT_IMPLEMENTED(options.subcenters <= kMaxSubcenters,
                              "the CUDA kernels take at most ", kMaxSubcenters,
                              " subcenters, got subcenters=", options.subcenters);
  const int64_t classes =
      options.class_index ? options.class_index->size(0) : weight.size(0) / options.subcenters;
  TORCH_CHECK_VALUE(classes <= std::numeric_limits<int32_t>::max(),
                    "the CUDA kernels take fewer than 2^31 classes, got ", classes);
  const auto acc = accumulation_type(x.scalar_type());
  auto optional_input = [&](const std::optional<at::Tensor>& t, bool to_acc) {
    return t ? prepare(to_acc ? t->to(acc) : *t) : at::Tensor();
  };
  LaunchInputs in{prepare(x),
                  prepare(weight),
                  prepare(labels),
                  optional_input(options.class_index, false),
                  optional_input(options.hard_threshold, true),
                  optional_input(options.hard_t, true)};
  p.dtype = kernel_dtype(in.x.scalar_type(), tf32);
  p.n = in.x.size(0);
  p.c = classes;
  p.d = in.x.size(1);
  p.x = in.x.data_ptr();
  p.weight = in.weight.data_ptr();
  p.labels = in.labels.data_ptr<int64_t>();
  p.subcenters = options.subcenters;
  p.class_index = in.class_index.defined() ? in.class_index.data_ptr<int64_t>() : nullptr;
  p.hard_threshold = in.hard_threshold.defined() ? in.hard_threshold.data_ptr() : nullptr;
  p.hard_t = in.hard_t.defined() ? in.hard_t.data_ptr() : nullptr;
  p.margin = margin;
  p.workspace = nullptr;
  p.num_sms = num_sms;
  p.arch = arch;
  p.deterministic = deterministic;
  return in;
}

// Either pass by the type of its parameters, for callers that launch both alike.
inline size_t workspace_bytes(const ForwardParams& p) { return forward_workspace_bytes(p); }
inline size_t workspace_bytes(const BackwardParams& p) { return backward_workspace_bytes(p); }
inline cudaError_t launch(const ForwardParams& p, cudaStream_t stream) {
  return launch_margin_lse_forward(p, stream);
}
inline cudaError_t launch(const BackwardParams& p, cudaStream_t stream) {
  return launch_margin_lse_backward(p, stream);
}

}  // namespace cuda
}  // namespace margin_ops
