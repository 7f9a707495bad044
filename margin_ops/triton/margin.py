"""φ(c) and dφ/dc inside Triton kernels: csrc/margin_math.h's ``target_margin`` and
``hard_example``, vectorized.

The readable statement of this math is :func:`margin_ops.reference.target_margin` and
:func:`margin_ops.reference.hard_example_logits`. The kernels call :func:`target_margin`
on one target cosine per row (a (BLOCK_M,) vector), never on a whole cosine tile: only the
target logit carries a margin. :func:`hard_example` modulates the non-target cosines.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .. import spec
from ..spec import KINDS
ARCFACE = tl.constexpr(KINDS["arcface"])
ARCFACE_EASY = tl.constexpr(KINDS["arcface_easy"])
COSFACE = tl.constexpr(KINDS["cosface"])
COMBINED = tl.constexpr(KINDS["combined"])
EXTERNAL = tl.constexpr(KINDS["external"])
SPHEREFACE = tl.constexpr(KINDS["sphereface"])

NORM_EPS = tl.constexpr(spec.NORM_EPS)
SIN_THETA_EPS = tl.constexpr(spec.SIN_THETA_EPS)
PI = tl.constexpr(math.pi)


def host_params(margin: str, m1: float, m2: float, m3: float, lamb: float) -> tuple:
    """The margin's kernel arguments ``(m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m)``.

    cos m, sin m and ArcFace's threshold cos(π − m) of m = m2 are the registry's
    :func:`margin_ops.spec.derived_constants` (margin_math.h's ``finalize``).
    """
    return (m1, m2, m3, lamb, *spec.derived_constants(m2), int(m1))


@triton.jit
def _acos_ratio(z):
    # fdlibm's rational approximation R(z) = (asin(√z) − √z) / √z^3, |error| < 2^-58.
    p = z * (1.66666666666666657415e-01 + z * (-3.25565818622400915405e-01 + z * (
        2.01212532134862925881e-01 + z * (-4.00555345006794114027e-02 + z * (
            7.91534994289814532176e-04 + z * 3.47933107596021167570e-05)))))
    q = 1.0 + z * (-2.40339491173441421878e+00 + z * (2.02094576023350569471e+00 + z * (
        -6.88283971605453293030e-01 + z * 7.70381505559019352791e-02)))
    return p / q


@triton.jit
def acos(c):
    """acos(c) for c ∈ [−1, 1], float32 or float64, within an ulp or two of libm.

    Triton has no portable acos (libdevice's is missing under TRITON_INTERPRET), so this is
    fdlibm's ``__ieee754_acos``: a rational approximation of asin on |c| < 1/2 and the
    half-angle identity acos(c) = 2·asin(√((1 − |c|)/2)) (mirrored for c < 0) elsewhere.
    """
    pio2_lo = 6.12323399573676603587e-17
    r_inner = _acos_ratio(c * c)
    inner = 1.57079632679489655800e+00 - (c - (pio2_lo - c * r_inner))
    z = (1.0 - tl.abs(c)) * 0.5
    s = tl.sqrt(z)
    half = s + s * _acos_ratio(z)  # asin(√z)
    outer = tl.where(c > 0, 2.0 * half, PI - 2.0 * (half - pio2_lo))
    return tl.where(tl.abs(c) < 0.5, inner, outer)


@triton.jit
def target_margin(c, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                  MARGIN: tl.constexpr, DETACH: tl.constexpr):
    """φ(c) and the dφ/dc the backward pass uses (1 when ``DETACH``), as c's shape and dtype.

    c: target cosines in [−1, 1], float32/float64. The scalars are :func:`host_params`;
    they arrive as float64 (or Python floats under the interpreter) and are brought to
    c's dtype here so that float32 kernels stay in float32.
    """
    dtype = c.dtype
    m1 = tl.full((), m1, dtype)
    m2 = tl.full((), m2, dtype)
    m3 = tl.full((), m3, dtype)
    lamb = tl.full((), lamb, dtype)
    cos_m = tl.full((), cos_m, dtype)
    sin_m = tl.full((), sin_m, dtype)
    threshold = tl.full((), threshold, dtype)
    sin_theta = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
    sin_floor = tl.maximum(sin_theta, tl.full((), SIN_THETA_EPS, dtype))  # d acos/dc = −1/sin_floor
    phi = c
    slope = tl.full(c.shape, 1.0, dtype)
    if MARGIN == COSFACE:
        phi = c - m3
    elif MARGIN == ARCFACE or MARGIN == ARCFACE_EASY:
        if MARGIN == ARCFACE:
            angular = c > threshold
            linear = c - m2 * sin_m  # keeps φ monotonic once θ + m > π
        else:
            angular = c > 0
            linear = c
        phi = tl.where(angular, c * cos_m - sin_theta * sin_m, linear)
        slope = tl.where(angular, (sin_theta * cos_m + c * sin_m) / sin_floor, slope)
    elif MARGIN == COMBINED:
        angle = m1 * acos(c) + m2
        phi = tl.cos(angle) - m3
        slope = m1 * tl.sin(angle) / sin_floor
    # EXTERNAL: φ = c, slope 1 (the op applies its own margin outside the kernels).
    elif MARGIN == SPHEREFACE:
        m = tl.full((), sphere_m, dtype)
        k = tl.floor(m * acos(c) / tl.full((), PI, dtype))
        k = tl.minimum(tl.maximum(k, 0.0), m - 1.0)
        # T_m(c) and T_m'(c) = m·U_{m−1}(c) by the Chebyshev recurrences, from T_0, T_1, U_{−1}, U_0.
        t_prev = tl.full(c.shape, 1.0, dtype)
        t = c
        u_prev = tl.zeros(c.shape, dtype)
        u = tl.full(c.shape, 1.0, dtype)
        for _ in range(1, sphere_m):
            t_next = 2.0 * c * t - t_prev
            u_next = 2.0 * c * u - u_prev
            t_prev = t
            t = t_next
            u_prev = u
            u = u_next
        sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(0.5 * k))  # (−1)^k
        phi = (sign * t - 2.0 * k + lamb * c) / (1.0 + lamb)
        slope = (sign * m * u + lamb) / (1.0 + lamb)
    if DETACH:
        slope = tl.full(c.shape, 1.0, dtype)
    return phi, slope


@triton.jit
def hard_example(c, threshold, t):
    """CurricularFace's modulation of non-target cosines: c·(t + c) where c > threshold,
    else c; and its derivative t + 2c, else 1. c (BLOCK_M, BLOCK_C) ACC; threshold, t
    broadcast against it (per row). NaN cosines fail the comparison and stay NaN."""
    hard = c > threshold
    return tl.where(hard, c * (t + c), c), tl.where(hard, t + 2.0 * c, 1.0)
