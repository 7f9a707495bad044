"""The margin registry: every margin margin_ops knows, its parameters, their rules, the constants.

This module is the one place that says which margins exist and what their parameters may
be. The math of φ lives in :func:`margin_ops.reference.target_margin` (and its kernel
twins); everything else about a margin is here:

* :data:`MARGINS`: the target-logit transforms of the fused primitive ``margin_lse``, in
  the order of the C++ ``MarginKind`` enum. ``csrc/margin_kinds.h`` is generated from this
  module (``python -m margin_ops --cpp-header > csrc/margin_kinds.h``); a test checks the
  checked-in header is current.
* :class:`MarginSpec`: one margin with its parameters, as the primitive takes them.
* :func:`check_primitive_margin`: the rules of the primitive's margin arguments (the C++
  ``make_params`` asserts the same rules; the check layer and every backend rely on them).
* Builders from each public op's arguments (:data:`OP_SPECS`), which check the op's own
  arguments and name them as the user wrote them.
* :func:`derived_constants`: cos m, sin m and ArcFace's threshold, computed once in double.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

#: Floor of the row norms: ``x̂ = x / max(‖x‖, NORM_EPS)``, as ``F.normalize`` does.
NORM_EPS = 1e-12
#: Floor of sin θ in the derivative of θ = acos(c), so the exact margin gradient stays
#: finite at |c| = 1. In float32 it only changes c = ±1 exactly (the nearest float32 below 1
#: already has sin θ ≈ 3.5e-4).
SIN_THETA_EPS = 1e-4


class Margin(NamedTuple):
    """One registered target-logit transform of the primitive."""

    name: str       #: the primitive's ``margin`` string
    cpp_name: str   #: its C++ ``MarginKind`` enumerator
    summary: str    #: φ(c) in words (docs and the generated header)


#: Every margin, in ``MarginKind`` order (the position is the kernels' integer kind).
REGISTRY = (
    Margin("arcface", "ArcFace", "cos(θ + m2) where c > cos(π − m2), else c − m2·sin m2"),
    Margin("arcface_easy", "ArcFaceEasy", "cos(θ + m2) where c > 0, else c"),
    Margin("cosface", "CosFace", "c − m3"),
    Margin("combined", "Combined", "cos(m1·θ + m2) − m3"),
    Margin("sphereface", "SphereFace", "((−1)^k cos(m1·θ) − 2k + lamb·c) / (1 + lamb), k = ⌊m1·θ/π⌋"),
    Margin("external", "External", "none: the target is left out of lse, target_logit = s·c "
           "(the op applies a per-row margin)"),
)
MARGINS = tuple(m.name for m in REGISTRY)
#: Margin name -> the kernels' integer kind (C++ MarginKind, the Triton MARGIN constexpr).
KINDS = {m.name: kind for kind, m in enumerate(REGISTRY)}
REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "detach")
#: How ``adaptive`` turns θ_iy and m_angle_i into θ̃_i (see :func:`margin_ops.reference.adaptive_target`).
ANGLE_MODES = ("clip", "arcface", "plain")


class MarginSpec(NamedTuple):
    """Everything the fused primitive needs to know about a margin, plus the focal γ.

    ``margin`` selects φ (see :func:`margin_ops.reference.target_margin`); ``m1, m2, m3``
    are its parameters (ArcFace: m2 = m; CosFace: m3 = m; SphereFace: m1 = the integer m;
    combined: all three); ``lamb`` is SphereFace's annealing λ; ``feature_scale`` replaces
    ``s`` by the feature norm ‖x_i‖; ``detach_margin_grad`` makes dφ/dc = 1.
    """

    margin: str
    s: float
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    lamb: float = 0.0
    feature_scale: bool = False
    detach_margin_grad: bool = False
    gamma: float = 0.0
    label_smoothing: float = 0.0
    subcenters: int = 1

    def primitive_args(self) -> tuple:
        """The margin arguments of ``margin_lse`` (margin … detach_margin_grad), in schema order."""
        return tuple(self)[:8]


# ---------------------------------------------------------------------------------------
# Scalar rules. Each raises ValueError naming the argument as the caller spelled it.


def check_finite(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    """``value`` is a real number (not a bool), finite, and > 0 / >= 0 if asked."""
    # `value - value == 0` is math.isfinite written so that torch.compile can trace it on
    # a symbolic float (it guards on the answer).
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat, torch.SymInt)) \
            or not value - value == 0:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_choice(name: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_angle(name: str, value) -> None:
    """An additive angular margin lies in [0, π): past π, cos(θ + m) and the linear
    fallback below cos(π − m) no longer describe a margin (φ stops being monotonic)."""
    check_finite(name, value)
    if not 0 <= value < math.pi:
        raise ValueError(f"{name} must lie in [0, π) (an angle in radians), got {value!r}")


def check_integer(name: str, value, low: int) -> None:
    """An int (not a bool, not a float) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_label_smoothing(value) -> None:
    """ε in [0, 1], as ``F.cross_entropy``'s label_smoothing."""
    check_finite("label_smoothing", value)
    if not 0 <= value <= 1:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {value!r}")


def check_primitive_margin(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad) -> None:
    """The rules of ``margin_lse``'s margin arguments, naming them as its schema does.

    ``s`` finite > 0 (unused, but still checked, with ``feature_scale``); m1, m2, m3, lamb
    finite; arcface / arcface_easy: m2 in [0, π); combined: m1 > 0, m2 in [0, π);
    sphereface: m1 an integer >= 1, lamb >= 0. The C++ ``make_params`` asserts the same.
    """
    check_choice("margin", margin, MARGINS)
    check_finite("s", s, positive=True)
    for name, value in (("m1", m1), ("m2", m2), ("m3", m3), ("lamb", lamb)):
        check_finite(name, value)
    if margin in ("arcface", "arcface_easy", "combined"):
        check_angle("m2", m2)
    if margin == "combined" and m1 <= 0:
        raise ValueError(f"m1 must be > 0 for margin='combined', got {m1!r}")
    if margin == "sphereface":
        if m1 < 1 or m1 != math.floor(m1):
            raise ValueError(f"m1 must be an integer >= 1 for margin='sphereface', got {m1!r}")
        check_finite("lamb", lamb, nonnegative=True)
    for name, value in (("feature_scale", feature_scale), ("detach_margin_grad", detach_margin_grad)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")


def derived_constants(spec_or_m2) -> tuple[float, float, float]:
    """(cos m, sin m, cos(π − m)) of m = m2, in double precision: what the kernels read
    instead of recomputing them per element (C++: ``finalize``)."""
    m2 = spec_or_m2.m2 if isinstance(spec_or_m2, MarginSpec) else spec_or_m2
    return math.cos(m2), math.sin(m2), math.cos(math.pi - m2)


# ---------------------------------------------------------------------------------------
# Builders: the public ops' arguments -> MarginSpec, checked under the names users pass.


def detach_flag(margin_grad: str) -> bool:
    check_choice("margin_grad", margin_grad, MARGIN_GRADS)
    return margin_grad == "detach"


def _options(label_smoothing, subcenters=1) -> dict:
    """The loss options every builder shares, checked."""
    check_label_smoothing(label_smoothing)
    check_integer("subcenters", subcenters, 1)
    return {"label_smoothing": float(label_smoothing), "subcenters": subcenters}


def arcface(s: float, m: float, easy_margin: bool, margin_grad: str, label_smoothing: float = 0.0,
            subcenters: int = 1) -> MarginSpec:
    check_finite("s", s, positive=True)
    check_angle("m", m)
    if not isinstance(easy_margin, bool):
        raise ValueError(f"easy_margin must be a bool, got {easy_margin!r}")
    return MarginSpec("arcface_easy" if easy_margin else "arcface", float(s), m2=float(m),
                      detach_margin_grad=detach_flag(margin_grad), **_options(label_smoothing, subcenters))


def cosface(s: float, m: float, label_smoothing: float = 0.0, subcenters: int = 1) -> MarginSpec:
    check_finite("s", s, positive=True)
    check_finite("m", m)
    return MarginSpec("cosface", float(s), m3=float(m), **_options(label_smoothing, subcenters))


def combined(s: float, m1: float, m2: float, m3: float, margin_grad: str, label_smoothing: float = 0.0,
             subcenters: int = 1) -> MarginSpec:
    check_finite("s", s, positive=True)
    check_finite("m1", m1, positive=True)
    check_angle("m2", m2)
    check_finite("m3", m3)
    return MarginSpec("combined", float(s), float(m1), float(m2), float(m3),
                      detach_margin_grad=detach_flag(margin_grad), **_options(label_smoothing, subcenters))


def sphereface(m: int, lamb: float, s: float | None, gamma: float, label_smoothing: float = 0.0, *,
               lamb_name: str = "lamb") -> MarginSpec:
    """``lamb_name``: how the caller calls λ (the module derives it from lambda_min/max)."""
    check_integer("m", m, 1)
    check_finite(lamb_name, lamb, nonnegative=True)
    check_finite("gamma", gamma, nonnegative=True)
    if s is not None:
        check_finite("s", s, positive=True)
    return MarginSpec("sphereface", 1.0 if s is None else float(s), m1=float(m), lamb=float(lamb),
                      feature_scale=s is None, gamma=float(gamma), **_options(label_smoothing))


def adaptive(s: float, angle_mode: str, label_smoothing: float = 0.0) -> MarginSpec:
    """The primitive's part of ``adaptive``: no margin in the kernel ("external"); the op
    applies the per-row margins (m_angle, m_add) to the target as ``angle_mode`` says."""
    check_finite("s", s, positive=True)
    check_choice("angle_mode", angle_mode, ANGLE_MODES)
    return MarginSpec("external", float(s), **_options(label_smoothing))


def curricular(s: float, m: float, label_smoothing: float = 0.0) -> MarginSpec:
    """The primitive's part of ``curricular``: ArcFace's target (with its fallback); the op
    adds the hard-example modulation of the non-targets (hard_threshold, hard_t)."""
    check_finite("s", s, positive=True)
    check_angle("m", m)
    return MarginSpec("arcface", float(s), m2=float(m), **_options(label_smoothing))


#: Public loss op name -> builder of its MarginSpec from the op's bound arguments (a dict).
OP_SPECS: dict[str, Callable[[dict], MarginSpec]] = {
    "arcface": lambda a: arcface(a["s"], a["m"], a["easy_margin"], a["margin_grad"], a["label_smoothing"],
                                 a["subcenters"]),
    "cosface": lambda a: cosface(a["s"], a["m"], a["label_smoothing"], a["subcenters"]),
    "combined": lambda a: combined(a["s"], a["m1"], a["m2"], a["m3"], a["margin_grad"], a["label_smoothing"],
                                   a["subcenters"]),
    "sphereface": lambda a: sphereface(a["m"], a["lamb"], a["s"], a["gamma"], a["label_smoothing"]),
    "adaptive": lambda a: adaptive(a["s"], a["angle_mode"], a["label_smoothing"]),
    "curricular": lambda a: curricular(a["s"], a["m"], a["label_smoothing"]),
}
LOSSES = tuple(OP_SPECS)


# ---------------------------------------------------------------------------------------
# The C++ header generated from this registry.


def cpp_header() -> str:
    """The text of ``csrc/margin_kinds.h``."""
    names = ", ".join(f'"{m.name}"' for m in REGISTRY)
    kinds = "\n".join(f"  {m.cpp_name} = {k},  // {m.name}: {m.summary}" for k, m in enumerate(REGISTRY))
    return (
        "// Generated by `python -m margin_ops --cpp-header > csrc/margin_kinds.h` from the margin\n"
        "// registry margin_ops/spec.py; do not edit (tests/test_registry.py checks it is current).\n"
        "#pragma once\n\n"
        "#include <cstdint>\n\n"
        "namespace margin_ops {\n\n"
        f"constexpr double kNormEps = {NORM_EPS!r};\n"
        f"constexpr double kSinThetaEps = {SIN_THETA_EPS!r};\n\n"
        f"enum class MarginKind : int32_t {{\n{kinds}\n}};\n"
        f"constexpr int32_t kNumMarginKinds = {len(REGISTRY)};\n\n"
        "// The primitive's `margin` argument of each kind, indexed by MarginKind.\n"
        f"inline constexpr const char* kMarginNames[kNumMarginKinds] = {{{names}}};\n\n"
        "}  // namespace margin_ops\n"
    )

