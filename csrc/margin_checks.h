// The tensor checks of the fused primitive's C++ kernels (csrc/cpu, the CUDA glue in
// csrc/cuda, and the emulator's driver): shapes, dtypes and devices of x, weight, labels and
// the backward's per-row tensors. They assert the rules of the Python check layer
// (margin_ops/checks.py: check_tensors, check_per_row) with its messages, for callers of
// torch.ops.margin.margin_lse(_backward) who reach a kernel directly; TORCH_CHECK_VALUE is a
// ValueError in Python, TORCH_CHECK_TYPE a TypeError. The margin's scalar rules are
// make_params's (margin_params.h). Torch headers only (no CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace margin_ops {

// A dtype as Python writes it ("torch.float32"), so that these messages read as the Python
// layer's (the C++ name for the dtypes no input of these kernels is expected to have).
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return c10::toString(t);
  }
}

// `t` lives on x's device.
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(),
                    ", got ", t.device());
}

// x (N, D) floating with D >= 1; weight (C, D) of x's dtype with C >= 1; labels (N,) int64;
// all on x's device. In the order of margin_ops.checks.check_tensors.
inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be a 2-D tensor (N, D), got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have at least one feature column, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                    "weight must be (C, D) with D = x.shape[1] = ", x.size(1), ", got shape ",
                    weight.sizes(), " (classic code keeps W as (D, C): pass W.t())");
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight must have at least one class (row), got C = 0");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ",
                   dtype_name(x.scalar_type()), ", got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0),
                    "labels must be (N,) with N = x.shape[0] = ", x.size(0), ", got shape ",
                    labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                   dtype_name(labels.scalar_type()));
  check_same_device(weight, "weight", x);
  check_same_device(labels, "labels", x);
}

// A per-row tensor of the backward (grad_lse, grad_target_logit, lse): (N,), floating, on
// x's device. As margin_ops.checks.check_per_row.
inline void check_per_row(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), name,
                    " must be (N,) with N = x.shape[0] = ", x.size(0), ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
                   dtype_name(t.scalar_type()));
  check_same_device(t, name, x);
}

// The primitive's options, as margin_ops.checks.check_primitive checks them: subcenters K >= 1
// dividing weight's rows; class_index (C,) int64 on weight's device, distinct, in
// [0, rows / K) (values checked at once on CPU; on CUDA by an asynchronous device assertion,
// so that no host synchronisation is added); hard_threshold / hard_t per-row, together.
inline void check_options(const at::Tensor& x, const at::Tensor& weight, int64_t subcenters,
                          const std::optional<at::Tensor>& class_index,
                          const std::optional<at::Tensor>& hard_threshold,
                          const std::optional<at::Tensor>& hard_t) {
  TORCH_CHECK_VALUE(subcenters >= 1, "subcenters must be an integer >= 1, got ", subcenters);
  TORCH_CHECK_VALUE(weight.size(0) % subcenters == 0,
                    "weight must have num_classes·subcenters rows: ", weight.size(0),
                    " rows is not a multiple of subcenters=", subcenters);
  if (class_index.has_value()) {
    const at::Tensor& index = *class_index;
    TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) >= 1,
                      "class_index must be a non-empty 1-D tensor (C,), got shape ", index.sizes());
    TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "class_index must be int64, got ",
                     dtype_name(index.scalar_type()));
    TORCH_CHECK_VALUE(index.device() == weight.device(), "class_index must be on weight's device ",
                      weight.device(), ", got ", index.device());
    const int64_t classes = weight.size(0) / subcenters;
    const std::string range = "class_index must lie in [0, " + std::to_string(classes) +
                              ") (the classes of weight)";
    const std::string distinct =
        "class_index must not repeat a class (each is read and written in place once)";
    const auto out_of_range = (index < 0).logical_or_(index >= classes);
    const auto ordered = std::get<0>(index.sort());
    const auto repeated = ordered.slice(0, 1).eq(ordered.slice(0, 0, -1));
    if (index.is_cpu()) {  // name the first offending value, as the Python check does
      TORCH_CHECK_VALUE(!out_of_range.any().item<bool>(), range, "; got ",
                        index.masked_select(out_of_range)[0].item<int64_t>());
      TORCH_CHECK_VALUE(!repeated.any().item<bool>(), distinct, "; got ",
                        ordered.slice(0, 1).masked_select(repeated)[0].item<int64_t>(), " twice");
    } else {
      at::_assert_async(out_of_range.any().logical_not(), range);
      at::_assert_async(repeated.any().logical_not(), distinct);
    }
  }
  TORCH_CHECK_VALUE(hard_threshold.has_value() == hard_t.has_value(),
                    "hard_threshold and hard_t must be given together (or neither)");
  if (hard_threshold.has_value()) {
    check_per_row(*hard_threshold, "hard_threshold", x);
    check_per_row(*hard_t, "hard_t", x);
  }
}

}  // namespace margin_ops
