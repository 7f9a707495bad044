// The one schema block of margin_ops: every op signature lives here.
//
// The public losses (arcface, cosface, combined, sphereface) are implemented in Python
// (margin_ops/ops.py) on top of the fused primitive margin_lse / margin_lse_backward,
// whose kernels are registered per dispatch key (csrc/cpu, csrc/cuda) and, for Triton,
// from margin_ops/triton. Shapes: x (N, D), weight (C, D), labels (N,) int64.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(margin, m) {
  m.def(
      "arcface(Tensor x, Tensor weight, Tensor labels, float s=64.0, float m=0.5, "
      "bool easy_margin=False, str margin_grad=\"exact\", str reduction=\"mean\", "
      "int ignore_index=-100) -> Tensor");
  m.def(
      "cosface(Tensor x, Tensor weight, Tensor labels, float s=64.0, float m=0.35, "
      "str reduction=\"mean\", int ignore_index=-100) -> Tensor");
  m.def(
      "combined(Tensor x, Tensor weight, Tensor labels, float s=64.0, float m1=1.0, "
      "float m2=0.5, float m3=0.0, str margin_grad=\"exact\", str reduction=\"mean\", "
      "int ignore_index=-100) -> Tensor");
  // m is a Scalar, not an int, so that the check sees what the caller passed: an int
  // argument would turn True into 1 and refuse 4.0 with the dispatcher's own message.
  m.def(
      "sphereface(Tensor x, Tensor weight, Tensor labels, Scalar m=4, float lamb=0.0, "
      "float? s=None, float gamma=0.0, str reduction=\"mean\", int ignore_index=-100) -> Tensor");
  // The fused primitive. Per row i: lse_i = logsumexp_c(logit_ic) and target_logit_i =
  // logit_{i,labels_i} (0 when labels_i is outside [0, C)), with the margin `margin`
  // applied to the target; max_cos_i / pred_i: the largest cosine and its class.
  // allow_tf32: whether float32 products may use TF32 on a GPU; None reads torch's float32
  // matmul precision at the call (the autograd formula hands the forward's choice to the
  // backward, whose recomputed cosines must match the forward's).
  m.def(
      "margin_lse(Tensor x, Tensor weight, Tensor labels, str margin, float s, float m1, "
      "float m2, float m3, float lamb, bool feature_scale, bool detach_margin_grad, "
      "bool? allow_tf32=None) -> (Tensor lse, Tensor target_logit, Tensor max_cos, Tensor pred)");
  // Gradients of margin_lse given the upstream gradients of lse and target_logit (N,).
  m.def(
      "margin_lse_backward(Tensor grad_lse, Tensor grad_target_logit, Tensor x, "
      "Tensor weight, Tensor labels, Tensor lse, str margin, float s, float m1, float m2, "
      "float m3, float lamb, bool feature_scale, bool detach_margin_grad, "
      "bool? allow_tf32=None) -> (Tensor grad_x, Tensor grad_weight)");
}

// `import margin_ops._C` loads this library (and so runs the registrations above); the
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
