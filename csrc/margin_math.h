// The target-logit margin φ(c) and its derivative, shared by the CPU and CUDA kernels.
// The readable statement of this math is margin_ops/reference.py (target_margin); the margin
// kinds and the eps floors come from the registry margin_ops/spec.py (margin_kinds.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "margin_kinds.h"

#if defined(__CUDACC__)
#define MARGIN_HD __host__ __device__ __forceinline__
#else
#define MARGIN_HD inline
#endif

namespace margin_ops {

constexpr double kPi = 3.14159265358979323846;

// Plain description of a margin, filled by the torch glue; no torch types, so kernels
// compiled with bare nvcc can include it.
struct MarginParams {
  MarginKind kind;
  double s;              // fixed scale (unused when feature_scale)
  double m1, m2, m3;     // ArcFace: m2 = m; CosFace: m3 = m; SphereFace: m1 = integer m
  double lamb;           // SphereFace annealing λ
  bool feature_scale;    // scale row i by ‖x_i‖ instead of s
  bool detach_grad;      // dφ/dc := 1 (straight-through)
  // Derived once on the host by finalize().
  double cos_m, sin_m;   // of m2
  double threshold;      // ArcFace: cos(π − m), past which φ turns linear
  int32_t sphere_m;
};

inline void finalize(MarginParams& p) {
  p.cos_m = std::cos(p.m2);
  p.sin_m = std::sin(p.m2);
  p.threshold = std::cos(kPi - p.m2);
  p.sphere_m = static_cast<int32_t>(p.m1);
}

template <typename T>
struct TargetMargin {
  T phi;    // φ(c)
  T slope;  // dφ/dc used by the backward pass (1 when detached)
};

// φ(c) and dφ/dc for a target cosine c ∈ [−1, 1], computed in T (float or double).
template <typename T>
MARGIN_HD TargetMargin<T> target_margin(T c, const MarginParams& p) {
#if !defined(__CUDA_ARCH__)
  using std::acos, std::cos, std::floor, std::fmax, std::fmin, std::fmod, std::sin, std::sqrt;
#endif
  const T one = T(1);
  const T sin_theta = sqrt(fmax(one - c * c, T(0)));
  const T sin_floor = fmax(sin_theta, T(kSinThetaEps));  // d acos(c)/dc = −1 / sin_floor
  TargetMargin<T> r{c, one};
  switch (p.kind) {
    case MarginKind::CosFace:
      r.phi = c - T(p.m3);
      break;
    case MarginKind::ArcFace:
    case MarginKind::ArcFaceEasy: {
      const bool angular = p.kind == MarginKind::ArcFace ? c > T(p.threshold) : c > T(0);
      if (angular) {  // cos(θ + m)
        r.phi = c * T(p.cos_m) - sin_theta * T(p.sin_m);
        r.slope = (sin_theta * T(p.cos_m) + c * T(p.sin_m)) / sin_floor;
      } else if (p.kind == MarginKind::ArcFace) {
        r.phi = c - T(p.m2 * p.sin_m);
      }
      break;
    }
    case MarginKind::Combined: {
      const T angle = T(p.m1) * acos(c) + T(p.m2);
      r.phi = cos(angle) - T(p.m3);
      r.slope = T(p.m1) * sin(angle) / sin_floor;
      break;
    }
    case MarginKind::External:  // the op applies its margin; the kernels leave c as is
      break;
    case MarginKind::SphereFace: {
      const int m = p.sphere_m;
      T k = floor(T(m) * acos(c) / T(kPi));
      k = fmin(fmax(k, T(0)), T(m - 1));
      // T_m(c) and T_m'(c) = m·U_{m−1}(c) by the Chebyshev recurrences.
      T t_prev = one, t = c, u_prev = one, u = T(2) * c;
      for (int n = 1; n < m; ++n) {
        const T t_next = T(2) * c * t - t_prev;
        t_prev = t;
        t = t_next;
        if (n < m - 1) {
          const T u_next = T(2) * c * u - u_prev;
          u_prev = u;
          u = u_next;
        }
      }
      const T u_m1 = m == 1 ? one : u;
      const T sign = fmod(k, T(2)) == T(0) ? one : -one;
      const T lamb = T(p.lamb);
      r.phi = (sign * t - T(2) * k + lamb * c) / (one + lamb);
      r.slope = (sign * T(m) * u_m1 + lamb) / (one + lamb);
      break;
    }
  }
  if (p.detach_grad) r.slope = one;
  return r;
}

// A non-target cosine's logit factor (the logit is s_i times it) and its derivative:
// CurricularFace's hard examples, c·(t + c) where c > threshold, else c. Rows without the
// modulation pass threshold = 2 (above every cosine).
template <typename T>
MARGIN_HD TargetMargin<T> hard_example(T c, T threshold, T t) {
  if (c > threshold) return {c * (t + c), t + T(2) * c};
  return {c, T(1)};
}

}  // namespace margin_ops
