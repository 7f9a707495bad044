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
      "int ignore_index=-100, float label_smoothing=0.0, int subcenters=1) -> Tensor");
  m.def(
      "cosface(Tensor x, Tensor weight, Tensor labels, float s=64.0, float m=0.35, "
      "str reduction=\"mean\", int ignore_index=-100, float label_smoothing=0.0, "
      "int subcenters=1) -> Tensor");
  m.def(
      "combined(Tensor x, Tensor weight, Tensor labels, float s=64.0, float m1=1.0, "
      "float m2=0.5, float m3=0.0, str margin_grad=\"exact\", str reduction=\"mean\", "
      "int ignore_index=-100, float label_smoothing=0.0, int subcenters=1) -> Tensor");
  // m is a Scalar, not an int, so that the check sees what the caller passed: an int
  // argument would turn True into 1 and refuse 4.0 with the dispatcher's own message.
  m.def(
      "sphereface(Tensor x, Tensor weight, Tensor labels, Scalar m=4, float lamb=0.0, "
      "float? s=None, float gamma=0.0, str reduction=\"mean\", int ignore_index=-100, "
      "float label_smoothing=0.0) -> Tensor");
  // Per-row margins (AdaFace, MagFace, ElasticFace): target logit s·(cos θ̃_i − m_add_i),
  // θ̃ from θ_iy and m_angle_i as angle_mode says ("clip", "arcface", "plain").
  m.def(
      "adaptive(Tensor x, Tensor weight, Tensor labels, Tensor m_angle, Tensor m_add, "
      "float s=64.0, str angle_mode=\"clip\", str reduction=\"mean\", int ignore_index=-100, "
      "float label_smoothing=0.0) -> Tensor");
  // CurricularFace: ArcFace's target; non-target cosines above cos(θ_iy + m) become c·(t + c).
  m.def(
      "curricular(Tensor x, Tensor weight, Tensor labels, Tensor t, float s=64.0, "
      "float m=0.5, str reduction=\"mean\", int ignore_index=-100, "
      "float label_smoothing=0.0) -> Tensor");
  // The fused primitive. Classes: C = weight.shape[0] / subcenters, or class_index.shape[0]
  // when given. Class j's cosine is c_ij = max_k cos(x_i, w_{r_j·K + k}), K = subcenters,
  // r_j = class_index[j] (or j): the rows of `weight` it reads in place, never copied.
  // Logits: z_ij = s_i·c_ij for j ≠ labels_i, except where hard_threshold is given and
  // c_ij > hard_threshold_i: s_i·c_ij·(hard_t_i + c_ij) (CurricularFace's hard examples);
  // the target's is s_i·φ(c_iy) with the margin `margin`. Per row i:
  //   lse_i = logsumexp_j z_ij (margin "external": over j ≠ labels_i only);
  //   target_logit_i = z_{i,labels_i} ("external": s_i·c_iy), 0 when labels_i is outside [0, C);
  //   max_cos_i / pred_i: the largest c_ij and its j;
  //   nontarget_sum_i = Σ_{j ≠ labels_i} z_ij (label smoothing's mean logit).
  // allow_tf32: whether float32 products may use TF32 on a GPU; None reads torch's float32
  // matmul precision at the call (the autograd formula hands the forward's choice to the
  // backward, whose recomputed cosines must match the forward's).
  m.def(
      "margin_lse(Tensor x, Tensor weight, Tensor labels, str margin, float s, float m1, "
      "float m2, float m3, float lamb, bool feature_scale, bool detach_margin_grad, "
      "bool? allow_tf32=None, int subcenters=1, Tensor? class_index=None, "
      "Tensor? hard_threshold=None, Tensor? hard_t=None) -> (Tensor lse, Tensor target_logit, "
      "Tensor max_cos, Tensor pred, Tensor nontarget_sum)");
  // Gradients of margin_lse given the upstream gradients of lse, target_logit and
  // nontarget_sum (N,). grad_weight has weight's shape: zero in rows no class reads.
  m.def(
      "margin_lse_backward(Tensor grad_lse, Tensor grad_target_logit, "
      "Tensor grad_nontarget_sum, Tensor x, Tensor weight, Tensor labels, Tensor lse, "
      "str margin, float s, float m1, float m2, float m3, float lamb, bool feature_scale, "
      "bool detach_margin_grad, bool? allow_tf32=None, int subcenters=1, "
      "Tensor? class_index=None, Tensor? hard_threshold=None, Tensor? hard_t=None) "
      "-> (Tensor grad_x, Tensor grad_weight)");
}

// `import margin_ops._C` loads this library (and so runs the registrations above); the
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
