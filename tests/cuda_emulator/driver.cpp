// Python entry points of the emulated CUDA kernels (tests/test_cuda_emulated.py): the part
// of csrc/cuda/margin_lse_cuda.cpp that fills the launch parameters, for CPU tensors. Every
// buffer the kernels write starts as NaN / 0xff bytes (as uninitialised device memory may)
// and is followed by a canary region that must be intact after the launch; every input is
// a copy between two NaN regions, at its original address offset modulo 256 (the kernels'
// alignment-dependent paths stay as the caller's pointers choose), so that a read outside
// an input shows up as NaN in the results.
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "margin_lse_kernels.cuh"
#include "margin_params.h"

namespace emu {
std::string last_error();
enum class Schedule : int;
void set_schedule(Schedule schedule, uint64_t seed);
}

namespace {

using margin_ops::cuda::DType;

constexpr int64_t kCanaryBytes = 4096;
constexpr unsigned char kCanary = 0xa5;

DType kernel_dtype(const at::Tensor& x, bool tf32) {
  switch (x.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return tf32 ? DType::kFloat32Tf32 : DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", x.scalar_type());
  }
}

// A buffer of `bytes` poisoned bytes, 256-byte aligned, with a canary region after it.
struct Guarded {
  at::Tensor storage;
  unsigned char* data;
  int64_t bytes;

  Guarded(int64_t bytes_, unsigned char poison) : bytes(bytes_) {
    storage = at::empty({bytes + 256 + kCanaryBytes}, at::kByte);
    auto base = reinterpret_cast<uintptr_t>(storage.data_ptr());
    data = reinterpret_cast<unsigned char*>((base + 255) / 256 * 256);
    std::memset(data, poison, size_t(bytes));
    std::memset(data + bytes, kCanary, size_t(kCanaryBytes));
  }

  void check(const char* what) const {
    for (int64_t i = 0; i < kCanaryBytes; ++i) {
      TORCH_CHECK(data[bytes + i] == kCanary, what, ": written ", i, " bytes past its end");
    }
  }

  // A tensor view of the data (the storage stays alive with it).
  at::Tensor view(at::IntArrayRef sizes, at::ScalarType dtype) const {
    auto keep = storage;
    return at::from_blob(data, sizes, [keep](void*) {}, at::TensorOptions().dtype(dtype));
  }
};

// A contiguous copy of `t` between two kCanaryBytes regions of 0xff bytes, at t's address
// offset modulo 256.
at::Tensor guarded_input(const at::Tensor& t_) {
  const auto t = t_.contiguous();
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  auto storage = at::empty({bytes + 2 * kCanaryBytes + 512}, at::kByte);
  auto* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(storage.data_ptr()) + 255) / 256 * 256);
  std::memset(base, 0xff, size_t(bytes + 2 * kCanaryBytes + 256));
  unsigned char* data = base + kCanaryBytes + reinterpret_cast<uintptr_t>(t.data_ptr()) % 256;
  if (bytes > 0) std::memcpy(data, t.data_ptr(), size_t(bytes));
  return at::from_blob(data, t.sizes(), [storage](void*) {}, t.options());
}

int64_t elements(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

Guarded output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return Guarded(elements(sizes) * int64_t(c10::elementSize(dtype)), 0xff);
}

void check_launch(cudaError_t err, const char* which) {
  TORCH_CHECK(err == cudaSuccess, which, " failed in the emulator (cudaError ", int(err), "): ",
              emu::last_error());
}

// The guarded copies of the inputs both passes read.
struct Problem {
  at::Tensor x, w, y;
};

// Fills the fields ForwardParams and BackwardParams share from guarded copies of x, w, y,
// which it returns (the caller keeps them alive until the launch).
template <class Params>
Problem fill_problem(Params& p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                     const std::string& margin, double s, double m1, double m2, double m3,
                     double lamb, bool feature_scale, bool detach, bool tf32, int64_t num_sms) {
  Problem in{guarded_input(x), guarded_input(w), guarded_input(y)};
  p.dtype = kernel_dtype(in.x, tf32);
  p.n = in.x.size(0);
  p.c = in.w.size(0);
  p.d = in.x.size(1);
  p.x = in.x.data_ptr();
  p.weight = in.w.data_ptr();
  p.labels = in.y.data_ptr<int64_t>();
  p.margin = margin_ops::make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach);
  p.num_sms = int(num_sms);
  p.deterministic = false;
  return in;
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const std::string& margin,
    double s, double m1, double m2, double m3, double lamb, bool feature_scale, bool detach,
    bool tf32, int64_t num_sms) {
  const int64_t n = x.size(0);
  const auto acc = accumulation_type(x);
  const Guarded lse = output({n}, acc), target = output({n}, acc), max_cos = output({n}, acc),
                pred = output({n}, at::kLong);
  margin_ops::cuda::ForwardParams p{};
  const Problem inputs =  // alive until the launch ends
      fill_problem(p, x, w, y, margin, s, m1, m2, m3, lamb, feature_scale, detach, tf32, num_sms);
  p.lse = lse.data;
  p.target_logit = target.data;
  p.max_cos = max_cos.data;
  p.pred = reinterpret_cast<int64_t*>(pred.data);
  const Guarded ws(int64_t(margin_ops::cuda::forward_workspace_bytes(p)), 0xff);
  p.workspace = ws.data;
  check_launch(margin_ops::cuda::launch_margin_lse_forward(p, nullptr), "forward");
  ws.check("forward workspace");
  lse.check("lse");
  target.check("target_logit");
  max_cos.check("max_cos");
  pred.check("pred");
  return {lse.view({n}, acc), target.view({n}, acc), max_cos.view({n}, acc),
          pred.view({n}, at::kLong)};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& y, const at::Tensor& lse, const std::string& margin,
    double s, double m1, double m2, double m3, double lamb, bool feature_scale, bool detach,
    bool tf32, int64_t num_sms) {
  const auto acc = accumulation_type(x);
  const auto g_lse = guarded_input(grad_lse.to(acc)), g_t = guarded_input(grad_target.to(acc)),
             lse_c = guarded_input(lse.to(acc));
  const Guarded gx = output(x.sizes(), x.scalar_type()), gw = output(w.sizes(), w.scalar_type());
  margin_ops::cuda::BackwardParams p{};
  const Problem inputs =  // alive until the launch ends
      fill_problem(p, x, w, y, margin, s, m1, m2, m3, lamb, feature_scale, detach, tf32, num_sms);
  p.lse = lse_c.data_ptr();
  p.grad_lse = g_lse.data_ptr();
  p.grad_target_logit = g_t.data_ptr();
  p.grad_x = gx.data;
  p.grad_weight = gw.data;
  const Guarded ws(int64_t(margin_ops::cuda::backward_workspace_bytes(p)), 0xff);
  p.workspace = ws.data;
  check_launch(margin_ops::cuda::launch_margin_lse_backward(p, nullptr), "backward");
  ws.check("backward workspace");
  gx.check("grad_x");
  gw.check("grad_weight");
  return {gx.view(x.sizes(), x.scalar_type()), gw.view(w.sizes(), w.scalar_type())};
}

}  // namespace

// ptx_probe.cpp
at::Tensor probe_mma(int64_t kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);
at::Tensor probe_ldmatrix(bool trans, const at::Tensor& image, const at::Tensor& row_offset);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA kernels of margin_ops run by a host emulator of the CUDA execution model";
  m.def("forward", &forward, "margin_lse forward: (lse, target_logit, max_cos, pred)");
  m.def("backward", &backward, "margin_lse backward: (grad_x, grad_weight)");
  m.def("probe_mma", &probe_mma, "one emulated mma.sync: kind 0 bf16, 1 fp16, 2 tf32");
  m.def("probe_ldmatrix", &probe_ldmatrix, "one emulated ldmatrix.x4 (.trans)");
  m.def("set_schedule",
        [](int schedule, uint64_t seed) { emu::set_schedule(static_cast<emu::Schedule>(schedule), seed); },
        "thread schedule of later launches: 0 round robin, 1 / 2 warp by warp (lowest / highest "
        "first), 3 random (seeded)",
        pybind11::arg("schedule"), pybind11::arg("seed") = 1);
}
