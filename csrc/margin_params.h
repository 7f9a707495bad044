// Torch-side construction of MarginParams from an op's margin arguments, shared by the CPU
// kernels and the CUDA glue (host code only: it reports bad values with TORCH_CHECK).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>

#include "margin_math.h"

namespace margin_ops {

inline MarginKind parse_margin(c10::string_view margin) {
  if (margin == "arcface") return MarginKind::ArcFace;
  if (margin == "arcface_easy") return MarginKind::ArcFaceEasy;
  if (margin == "cosface") return MarginKind::CosFace;
  if (margin == "combined") return MarginKind::Combined;
  if (margin == "sphereface") return MarginKind::SphereFace;
  TORCH_CHECK_VALUE(false,
                    "margin must be one of 'arcface', 'arcface_easy', 'cosface', 'combined', "
                    "'sphereface', got '", margin, "'");
}

inline MarginParams make_params(c10::string_view margin, double s, double m1, double m2,
                                double m3, double lamb, bool feature_scale,
                                bool detach_margin_grad) {
  MarginParams p{};
  p.kind = parse_margin(margin);
  p.s = s;
  p.m1 = m1;
  p.m2 = m2;
  p.m3 = m3;
  p.lamb = lamb;
  p.feature_scale = feature_scale;
  p.detach_grad = detach_margin_grad;
  TORCH_CHECK_VALUE(p.kind != MarginKind::SphereFace || (m1 >= 1 && m1 == std::floor(m1)),
                    "m1 must be an integer >= 1 for margin='sphereface', got ", m1);
  finalize(p);
  return p;
}

}  // namespace margin_ops
