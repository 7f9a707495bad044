// Torch-side construction of MarginParams from an op's margin arguments, shared by the CPU
// kernels, the CUDA glue and the emulator's driver (host code only: it reports bad values
// with TORCH_CHECK_VALUE, a ValueError in Python). The rules and messages are the margin
// registry's (margin_ops/spec.py, check_primitive_margin).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "margin_math.h"

namespace margin_ops {

// A double as Python's repr writes it (0.0, 2.5, 1e-05, nan, -inf), so that the messages
// read as the Python layer's.
inline std::string python_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  int digits = 0;  // after the point, in scientific notation: the shortest that round-trips
  for (; digits < 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*e", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  const int exponent = std::atoi(std::strchr(buf, 'e') + 1);
  if (exponent < -4 || exponent >= 16) return buf;  // as repr: 1e-05, 1.5e+16
  std::snprintf(buf, sizeof buf, "%.*f", digits > exponent ? digits - exponent : 0, v);
  std::string s = buf;
  return s.find('.') == std::string::npos ? s + ".0" : s;
}

inline MarginKind parse_margin(c10::string_view margin) {
  std::string names;
  for (int32_t kind = 0; kind < kNumMarginKinds; ++kind) {
    if (margin == kMarginNames[kind]) return static_cast<MarginKind>(kind);
    names += std::string(names.empty() ? "'" : ", '") + kMarginNames[kind] + "'";
  }
  TORCH_CHECK_VALUE(false, "margin must be one of ", names, ", got '", margin, "'");
}

// `value` is a finite number.
inline void check_finite(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be a finite number, got ",
                    python_repr(value));
}

// The primitive's margin arguments, checked as margin_ops.spec.check_primitive_margin does
// (in its order, with its messages), then finalize()d.
inline MarginParams make_params(c10::string_view margin, double s, double m1, double m2,
                                double m3, double lamb, bool feature_scale,
                                bool detach_margin_grad) {
  MarginParams p{};
  p.kind = parse_margin(margin);
  check_finite("s", s);  // checked even with feature_scale, which does not use it
  TORCH_CHECK_VALUE(s > 0, "s must be > 0, got ", python_repr(s));
  check_finite("m1", m1);
  check_finite("m2", m2);
  check_finite("m3", m3);
  check_finite("lamb", lamb);
  if (p.kind == MarginKind::ArcFace || p.kind == MarginKind::ArcFaceEasy ||
      p.kind == MarginKind::Combined) {
    TORCH_CHECK_VALUE(m2 >= 0 && m2 < kPi, "m2 must lie in [0, π) (an angle in radians), got ",
                      python_repr(m2));
  }
  if (p.kind == MarginKind::Combined) {
    TORCH_CHECK_VALUE(m1 > 0, "m1 must be > 0 for margin='combined', got ", python_repr(m1));
  }
  if (p.kind == MarginKind::SphereFace) {
    TORCH_CHECK_VALUE(m1 >= 1 && m1 == std::floor(m1),
                      "m1 must be an integer >= 1 for margin='sphereface', got ", python_repr(m1));
    TORCH_CHECK_VALUE(lamb >= 0, "lamb must be >= 0, got ", python_repr(lamb));
  }
  p.s = s;
  p.m1 = m1;
  p.m2 = m2;
  p.m3 = m3;
  p.lamb = lamb;
  p.feature_scale = feature_scale;
  p.detach_grad = detach_margin_grad;
  finalize(p);
  return p;
}

}  // namespace margin_ops
