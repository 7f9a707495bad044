// Python entry points of the emulated CUDA kernels (tests/test_cuda_emulated.py): what
// csrc/cuda/margin_lse_cuda.cpp does for CUDA tensors, for CPU tensors, with the same
// parameter filling (csrc/cuda/launch_params.h) and checks (csrc/margin_checks.h). Every
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
#include <vector>

#include "cuda/launch_params.h"
#include "margin_checks.h"
#include "margin_params.h"

namespace emu {
std::string last_error();
enum class Schedule : int;
void set_schedule(Schedule schedule, uint64_t seed);
std::vector<std::string> take_launched_kernels();
}

namespace {

namespace cuda = margin_ops::cuda;

constexpr int64_t kCanaryBytes = 4096;
constexpr unsigned char kCanary = 0xa5;

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

// Checks the arguments as the glue does (but for the device) and, when there are rows (the
// glue launches nothing without), fills the fields both passes share from guarded copies of
// x, w, y and the options, which it returns (the caller keeps them alive until the launch
// ends).
cuda::LaunchInputs fill_problem(cuda::ProblemParams& p, const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& y, const cuda::ProblemOptions& options,
                                const std::string& margin, double s, double m1, double m2,
                                double m3, double lamb, bool feature_scale, bool detach, bool tf32,
                                int64_t num_sms, int64_t arch) {
  margin_ops::check_inputs(x, w, y);
  margin_ops::check_options(x, w, options.subcenters, options.class_index, options.hard_threshold,
                            options.hard_t);
  const auto mp = margin_ops::make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach);
  if (x.size(0) == 0) return {};
  return cuda::fill_problem(p, x, w, y, options, mp, tf32, int(num_sms), int(arch),
                            /*deterministic=*/false, guarded_input);
}

// Runs the pass on a poisoned, canaried workspace; `what` names the pass in errors. Without
// rows nothing is launched, as in the glue.
template <class Params>
void launch(Params& p, const char* what) {
  if (p.n == 0) return;  // p is unfilled (zero) then
  const Guarded ws(int64_t(cuda::workspace_bytes(p)), 0xff);
  p.workspace = ws.data;
  const cudaError_t err = cuda::launch(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, what, " failed in the emulator (cudaError ", int(err), "): ",
              emu::last_error());
  ws.check((std::string(what) + " workspace").c_str());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const std::string& margin,
    double s, double m1, double m2, double m3, double lamb, bool feature_scale, bool detach,
    bool tf32, int64_t subcenters, const std::optional<at::Tensor>& class_index,
    const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_t,
    int64_t num_sms, int64_t arch) {
  const cuda::ProblemOptions options{subcenters, class_index, hard_threshold, hard_t};
  cuda::ForwardParams p{};
  const int64_t n = x.size(0);
  const cuda::LaunchInputs inputs =  // alive until the launch ends
      fill_problem(p, x, w, y, options, margin, s, m1, m2, m3, lamb, feature_scale, detach, tf32,
                   num_sms, arch);
  const auto acc = cuda::accumulation_type(x.scalar_type());
  const Guarded lse = output({n}, acc), target = output({n}, acc), max_cos = output({n}, acc),
                pred = output({n}, at::kLong), nts = output({n}, acc);
  p.lse = lse.data;
  p.target_logit = target.data;
  p.max_cos = max_cos.data;
  p.pred = reinterpret_cast<int64_t*>(pred.data);
  p.nontarget_sum = nts.data;
  launch(p, "forward");
  lse.check("lse");
  target.check("target_logit");
  max_cos.check("max_cos");
  pred.check("pred");
  nts.check("nontarget_sum");
  return {lse.view({n}, acc), target.view({n}, acc), max_cos.view({n}, acc),
          pred.view({n}, at::kLong), nts.view({n}, acc)};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& grad_sum,
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const at::Tensor& lse,
    const std::string& margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach, bool tf32, int64_t subcenters,
    const std::optional<at::Tensor>& class_index, const std::optional<at::Tensor>& hard_threshold,
    const std::optional<at::Tensor>& hard_t, int64_t num_sms, int64_t arch) {
  const cuda::ProblemOptions options{subcenters, class_index, hard_threshold, hard_t};
  cuda::BackwardParams p{};
  const int64_t n = x.size(0);
  const cuda::LaunchInputs inputs =  // alive until the launch ends
      fill_problem(p, x, w, y, options, margin, s, m1, m2, m3, lamb, feature_scale, detach, tf32,
                   num_sms, arch);
  const auto acc = cuda::accumulation_type(x.scalar_type());
  auto per_row = [&](const at::Tensor& t, const char* name) {
    margin_ops::check_per_row(t, name, x);
    return guarded_input(t.to(acc));
  };
  const auto g_lse = per_row(grad_lse, "grad_lse"), g_t = per_row(grad_target, "grad_target_logit"),
             g_s = per_row(grad_sum, "grad_nontarget_sum"), lse_c = per_row(lse, "lse");
  const Guarded gx = output(x.sizes(), x.scalar_type()), gw = output(w.sizes(), w.scalar_type());
  p.lse = lse_c.data_ptr();
  p.grad_lse = g_lse.data_ptr();
  p.grad_target_logit = g_t.data_ptr();
  p.grad_nontarget_sum = g_s.data_ptr();
  p.grad_x = gx.data;
  p.grad_weight = gw.data;
  // Rows no class reads (outside class_index; all of them without rows): dW = 0, as the glue
  if (class_index || n == 0) std::memset(gw.data, 0, size_t(gw.bytes));
  launch(p, "backward");
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
  // arch: the compute capability the launchers are told (major·10 + minor); 90 runs the
  // sm_90a forward where it applies.
  m.def("forward", &forward, "margin_lse forward: (lse, target_logit, max_cos, pred, nontarget_sum)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("y"), pybind11::arg("margin"), pybind11::arg("s"),
        pybind11::arg("m1"), pybind11::arg("m2"), pybind11::arg("m3"), pybind11::arg("lamb"),
        pybind11::arg("feature_scale"), pybind11::arg("detach"), pybind11::arg("tf32"), pybind11::arg("subcenters"),
        pybind11::arg("class_index"), pybind11::arg("hard_threshold"), pybind11::arg("hard_t"),
        pybind11::arg("num_sms"), pybind11::arg("arch") = 80);
  m.def("backward", &backward, "margin_lse backward: (grad_x, grad_weight)", pybind11::arg("grad_lse"),
        pybind11::arg("grad_target"), pybind11::arg("grad_sum"), pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("y"), pybind11::arg("lse"), pybind11::arg("margin"), pybind11::arg("s"), pybind11::arg("m1"),
        pybind11::arg("m2"), pybind11::arg("m3"), pybind11::arg("lamb"), pybind11::arg("feature_scale"),
        pybind11::arg("detach"), pybind11::arg("tf32"), pybind11::arg("subcenters"), pybind11::arg("class_index"),
        pybind11::arg("hard_threshold"), pybind11::arg("hard_t"), pybind11::arg("num_sms"),
        pybind11::arg("arch") = 80);
  m.def("probe_mma", &probe_mma, "one emulated mma.sync: kind 0 bf16, 1 fp16, 2 tf32");
  m.def("probe_ldmatrix", &probe_ldmatrix, "one emulated ldmatrix.x4 (.trans)");
  m.def("take_launched_kernels", &emu::take_launched_kernels,
        "the kernels launched since the last call, in order (demangled names; \"?\" for one "
        "in an anonymous namespace), and clears the list");
  m.def("set_schedule",
        [](int schedule, uint64_t seed) { emu::set_schedule(static_cast<emu::Schedule>(schedule), seed); },
        "thread schedule of later launches: 0 round robin, 1 / 2 warp by warp (lowest / highest "
        "first), 3 random (seeded)",
        pybind11::arg("schedule"), pybind11::arg("seed") = 1);
}
