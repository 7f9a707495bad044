"""The math of margin_ops in plain PyTorch: the single readable statement of it.

Every backend (C++ CPU, CUDA, Triton) computes exactly what this file computes and is
tested against it. It materializes the N x C logits, so it is also the "eager"
contender of ``benchmarks/run.py``. It is differentiable and runs in float64.

Shapes and dtypes used throughout:

* ``x``       (N, D) floating: features, one row per sample.
* ``weight``  (C, D) same dtype: one row per class (the ``nn.Linear`` layout; classic
  ArcFace/SphereFace code keeps the transpose, (D, C)).
* ``labels``  (N,) int64: the target class of each row, or ``ignore_index``.

With K sub-centers ``weight`` is (C·K, D): row c·K + k is sub-center k of class c
(pytorch-metric-learning's order), and the cosine of class c is the largest of its K.

Logits and losses are computed in the accumulation dtype: float64 for float64 inputs,
float32 for everything else (bfloat16/float16 inputs are multiplied in their own dtype,
as ``F.linear`` does, then upcast).

The margins, their parameters and their rules are the registry's (:mod:`margin_ops.spec`),
tensor checks are :mod:`margin_ops.checks`'. The public losses check their tensors as the
ops do (a label outside [0, C) that is not ``ignore_index`` raises instead of counting as a
row without a target); the primitive :func:`margin_lse` and the helpers assume valid input.
"""

from __future__ import annotations

import math

import torch

from . import checks
from . import spec as margin_spec
from .spec import NORM_EPS, SIN_THETA_EPS, MarginSpec

#: AdaFace's clamp of θ̃ to [ε, π − ε] (angle_mode "clip").
ADAPTIVE_CLIP = 1e-3


class _FlooredAcos(torch.autograd.Function):
    """θ = acos(c) with derivative −1 / max(sin θ, SIN_THETA_EPS): finite at |c| = 1."""

    @staticmethod
    def forward(ctx, c):
        ctx.save_for_backward(c)
        return torch.acos(c)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        sin_theta = (1 - c * c).clamp_min(0).sqrt().clamp_min(SIN_THETA_EPS)
        return -grad / sin_theta


def chebyshev_t(c: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(c) = cos(m·acos c), by the recurrence T_{n+1} = 2c·T_n − T_{n−1}."""
    previous, current = torch.ones_like(c), c
    for _ in range(m - 1):
        previous, current = current, 2 * c * current - previous
    return current


def target_margin(c: torch.Tensor, spec: MarginSpec) -> torch.Tensor:
    """φ(c): the margin applied to the target cosine ``c`` (any shape, accumulation dtype)."""
    if spec.margin == "cosface":
        return c - spec.m3
    theta = _FlooredAcos.apply(c)
    if spec.margin == "arcface":
        m = spec.m2
        # Past θ + m > π, cos(θ + m) would turn back up; the linear branch keeps φ monotonic.
        return torch.where(c > math.cos(math.pi - m), torch.cos(theta + m), c - m * math.sin(m))
    if spec.margin == "arcface_easy":
        return torch.where(c > 0, torch.cos(theta + spec.m2), c)
    if spec.margin == "combined":
        return torch.cos(spec.m1 * theta + spec.m2) - spec.m3
    if spec.margin == "external":  # the op applies its own per-row margin
        return c
    if spec.margin == "sphereface":
        m = int(spec.m1)
        k = torch.floor(m * theta.detach() / math.pi).clamp(0, m - 1)  # piecewise constant
        psi = (1 - 2 * torch.remainder(k, 2)) * chebyshev_t(c, m) - 2 * k
        return (psi + spec.lamb * c) / (1 + spec.lamb)
    raise ValueError(f"margin must be one of {margin_spec.MARGINS}, got {spec.margin!r}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_r‖ as (R, 1), in the accumulation dtype (a float16 row's norm may exceed 65504)."""
    return torch.linalg.vector_norm(t, dim=1, keepdim=True, dtype=accumulation_dtype(t.dtype))


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """t / max(‖t‖, NORM_EPS) row-wise: (R, D) -> (R, D) in t's dtype, as ``F.normalize``.

    float16 alone is normalized in float32: its range (65504) is too small for the norm of
    a row whose entries are not (a float16 row of norm 7e4 would become 0, not a unit row).
    """
    if t.dtype == torch.float16:
        return (t / row_norms(t).clamp_min(NORM_EPS)).to(t.dtype)
    return t / t.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def cosine(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """c = clamp(x̂ · ŵ, −1, 1): (N, C) in the accumulation dtype.

    The clamp only keeps rounding out of acos's domain; its gradient passes straight
    through (a sample matching its class to the last bit still gets a gradient).
    """
    dot = (normalize_rows(x) @ normalize_rows(weight).t()).to(accumulation_dtype(x.dtype))
    return dot + (dot.clamp(-1, 1) - dot).detach()


def class_cosines(x, weight, subcenters=1, class_index=None):
    """c (N, C) accumulation dtype: the cosine of each class, the largest of its sub-centers'.

    Class j reads rows r_j·K .. r_j·K + K − 1 of ``weight`` (K = ``subcenters``), with
    r_j = ``class_index[j]`` ((C,) int64) when given, else j. Its gradient goes to the
    maximizing sub-center (the first of equal ones).
    """
    if class_index is not None:
        rows = (class_index.unsqueeze(1) * subcenters + torch.arange(subcenters, device=weight.device)).flatten()
        weight = weight.index_select(0, rows)
    c = cosine(x, weight)
    if subcenters > 1:
        c = c.unflatten(1, (-1, subcenters)).max(dim=2).values
    return c


def hard_example_logits(c, hard_threshold, hard_t):
    """CurricularFace's modulation of the non-target cosines c (N, C): c·(t_i + c) where
    c > threshold_i (a comparison, not differentiated), else c. threshold, t: (N,)."""
    return torch.where(c > hard_threshold.unsqueeze(1), c * (hard_t.unsqueeze(1) + c), c)


def margin_lse(x, weight, labels, margin, s, m1=1.0, m2=0.0, m3=0.0, lamb=0.0,
               feature_scale=False, detach_margin_grad=False, allow_tf32=None, subcenters=1,
               class_index=None, hard_threshold=None, hard_t=None):
    """The fused primitive every backend implements, computed the plain way.

    logit_ij = s_i·c_ij (c: :func:`class_cosines`), with CurricularFace's modulation
    (:func:`hard_example_logits`) where ``hard_threshold`` / ``hard_t`` ((N,)) are given,
    except the target class where it is s_i·φ(c_iy); s_i = s, or ‖x_i‖ when
    ``feature_scale``. Rows whose label is outside [0, C) have no target. ``allow_tf32``
    only concerns GPU kernels.

    Returns ``(lse, target_logit, max_cos, pred, nontarget_sum)``, each (N,): the
    log-sum-exp of the row's logits and its target logit (0 without a target), both in the
    accumulation dtype and differentiable; the largest cosine of the row and its class
    (int64), the margin-free top-1 prediction used for accuracy logging; the sum of the
    non-target logits (differentiable). With margin "external" the target is left out of
    the log-sum-exp and its logit is s_i·c_iy: the op applies the margin.
    """
    spec = MarginSpec(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad)
    c = class_cosines(x, weight, subcenters, class_index)
    num_classes = c.shape[1]
    has_target = (labels >= 0) & (labels < num_classes)
    column = torch.where(has_target, labels, 0).unsqueeze(1)
    c_target = c.gather(1, column)
    phi = target_margin(c_target, spec)
    if detach_margin_grad:
        phi = c_target + (phi - c_target).detach()
    phi = torch.where(has_target.unsqueeze(1), phi, c_target)
    scale = row_norms(x) if feature_scale else s
    nontarget = c if hard_threshold is None else hard_example_logits(c, hard_threshold, hard_t)
    is_target = has_target.unsqueeze(1) & (torch.arange(num_classes, device=c.device) == column)
    logits = torch.where(is_target, phi, nontarget) * scale
    target_logit = torch.where(has_target, logits.gather(1, column).squeeze(1), 0)
    nontarget_sum = torch.where(is_target, 0, logits).sum(dim=1)
    in_lse = logits.masked_fill(is_target, -math.inf) if margin == "external" else logits
    max_cos, pred = c.detach().max(dim=1)
    return in_lse.logsumexp(dim=1), target_logit, max_cos, pred, nontarget_sum


def adaptive_target(c, m_angle, m_add, angle_mode):
    """``adaptive``'s target margin: cos θ̃ − m_add with θ = acos(c) and, by ``angle_mode``,

    * ``"clip"`` (AdaFace): θ̃ = clamp(θ + m_angle, 1e-3, π − 1e-3);
    * ``"arcface"`` (MagFace): cos θ̃ = cos(θ + m_angle) where c > cos(π − m_angle), else
      c − m_angle·sin(m_angle) (InsightFace's fallback, per row);
    * ``"plain"`` (ElasticFace): θ̃ = θ + m_angle.

    c, m_angle, m_add: (N,) in the accumulation dtype; differentiable in all three.
    """
    theta = _FlooredAcos.apply(c)
    if angle_mode == "clip":
        cos_tilde = torch.cos((theta + m_angle).clamp(ADAPTIVE_CLIP, math.pi - ADAPTIVE_CLIP))
    elif angle_mode == "arcface":
        cos_tilde = torch.where(c > torch.cos(math.pi - m_angle), torch.cos(theta + m_angle),
                                c - m_angle * torch.sin(m_angle))
    elif angle_mode == "plain":
        cos_tilde = torch.cos(theta + m_angle)
    else:
        raise ValueError(f"angle_mode must be one of {margin_spec.ANGLE_MODES}, got {angle_mode!r}")
    return cos_tilde - m_add


def target_cosines(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   has_target: torch.Tensor) -> torch.Tensor:
    """clamp(x̂_i · ŵ_{y_i}, −1, 1): (N,) in the accumulation dtype, not differentiated.

    One dot product per row (O(N·D), never N × C): CurricularFace's threshold and its ``t``
    update, ElasticFace+'s ordering. Rows without a target (and labels out of range, which
    the loss then refuses) read row 0.
    """
    with torch.no_grad():
        index = torch.where(has_target, labels, 0).clamp(0, weight.shape[0] - 1)
        rows = weight.index_select(0, index)
        acc = accumulation_dtype(x.dtype)
        return (normalize_rows(x).to(acc) * normalize_rows(rows).to(acc)).sum(1).clamp(-1, 1)


def curricular_threshold(c_target, m):
    """CurricularFace's per-row threshold cos(θ_iy + m), without ArcFace's fallback: the
    non-target cosines above it are hard examples. c_target (N,); not differentiated."""
    c_target = c_target.detach()
    return c_target * math.cos(m) - (1 - c_target * c_target).clamp_min(0).sqrt() * math.sin(m)


def loss_from_lse(lse, target_logit, labels, gamma=0.0, reduction="mean", ignore_index=-100,
                  label_smoothing=0.0, nontarget_sum=None, num_classes=None):
    """Cross-entropy (focal when γ > 0, label-smoothed when ε > 0) from per-row statistics.

    lse, target_logit, nontarget_sum: (N,) float. loss_i = −(1 − p_i)^γ · log p_i with
    log p_i = target_logit_i − lse_i; with label smoothing ε, as ``F.cross_entropy``:
    (1 − ε)·that + ε·(lse_i − mean_c z_ic), the mean logit being
    (nontarget_sum_i + target_logit_i) / num_classes. Rows labelled ``ignore_index``
    contribute 0. ``mean`` divides by the number of rows not ignored, or by 1 when there
    are none (so an all-ignored or empty batch gives a loss of 0, not NaN).
    """
    margin_spec.check_choice("reduction", reduction, margin_spec.REDUCTIONS)
    valid = labels != ignore_index
    log_p = target_logit - lse
    loss = -log_p
    if gamma:
        # (1 − p)^γ with its base floored: finite gradient when p rounds to 1.
        one_minus_p = -torch.expm1(log_p)
        loss = one_minus_p.clamp_min(torch.finfo(log_p.dtype).tiny) ** gamma * loss
    if label_smoothing:
        mean_logit = (nontarget_sum + target_logit) / num_classes
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean_logit)
    loss = torch.where(valid, loss, 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def margin_loss(x, weight, labels, spec: MarginSpec, reduction="mean", ignore_index=-100,
                lse_fn=margin_lse):
    """The loss of ``spec`` from a ``margin_lse`` implementation (the reference by default)."""
    checks.check_loss_inputs(x, weight, labels, reduction, ignore_index, spec.subcenters)
    lse, target_logit, _, _, nontarget_sum = lse_fn(x, weight, labels, *spec.primitive_args(), None,
                                                    spec.subcenters)
    return loss_from_lse(lse, target_logit, labels, spec.gamma, reduction, ignore_index, spec.label_smoothing,
                         nontarget_sum, weight.shape[0] // spec.subcenters)


def arcface(x, weight, labels, s=64.0, m=0.5, easy_margin=False, margin_grad="exact",
            reduction="mean", ignore_index=-100, label_smoothing=0.0, subcenters=1):
    """ArcFace: φ(c) = cos(θ + m) (see :func:`target_margin`). Returns the reduced loss."""
    spec = margin_spec.arcface(s, m, easy_margin, margin_grad, label_smoothing, subcenters)
    return margin_loss(x, weight, labels, spec, reduction, ignore_index)


def cosface(x, weight, labels, s=64.0, m=0.35, reduction="mean", ignore_index=-100, label_smoothing=0.0,
            subcenters=1):
    """CosFace: φ(c) = c − m."""
    return margin_loss(x, weight, labels, margin_spec.cosface(s, m, label_smoothing, subcenters), reduction,
                       ignore_index)


def combined(x, weight, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_grad="exact",
             reduction="mean", ignore_index=-100, label_smoothing=0.0, subcenters=1):
    """InsightFace's combined margin: φ(c) = cos(m1·θ + m2) − m3."""
    spec = margin_spec.combined(s, m1, m2, m3, margin_grad, label_smoothing, subcenters)
    return margin_loss(x, weight, labels, spec, reduction, ignore_index)


def sphereface(x, weight, labels, m=4, lamb=0.0, s=None, gamma=0.0, reduction="mean",
               ignore_index=-100, label_smoothing=0.0):
    """SphereFace (A-Softmax): φ = (ψ(θ) + λc) / (1 + λ), ψ = (−1)^k cos(mθ) − 2k.

    ``s=None`` scales each row by its feature norm ‖x_i‖, as the original SphereFace.
    """
    return margin_loss(x, weight, labels, margin_spec.sphereface(m, lamb, s, gamma, label_smoothing), reduction,
                       ignore_index)


def _smoothed_loss(logits, labels, reduction, ignore_index, label_smoothing):
    """The loss of the materialized logits (N, C) — ``F.cross_entropy``'s, except that an
    all-ignored batch gives 0 (see :func:`loss_from_lse`)."""
    has_target = labels != ignore_index
    column = torch.where(has_target, labels, 0).unsqueeze(1)
    target_logit = torch.where(has_target, logits.gather(1, column).squeeze(1), 0)
    return loss_from_lse(logits.logsumexp(dim=1), target_logit, labels, 0.0, reduction, ignore_index,
                         label_smoothing, logits.sum(dim=1) - target_logit, logits.shape[1])


def adaptive_logits(x, weight, labels, m_angle, m_add, s=64.0, angle_mode="clip", ignore_index=-100, **_):
    """``adaptive``'s logits (N, C): s·c, with s·(cos θ̃_i − m_add_i) on the target
    (:func:`adaptive_target`). m_angle, m_add: (N,) floating, differentiable."""
    c = cosine(x, weight)
    has_target = labels != ignore_index
    column = torch.where(has_target, labels, 0).unsqueeze(1)
    phi = adaptive_target(c.gather(1, column).squeeze(1), m_angle.to(c.dtype), m_add.to(c.dtype), angle_mode)
    return s * torch.where(has_target.unsqueeze(1), c.scatter(1, column, phi.unsqueeze(1)), c)


def adaptive(x, weight, labels, m_angle, m_add, s=64.0, angle_mode="clip", reduction="mean",
             ignore_index=-100, label_smoothing=0.0):
    """Per-row margins (AdaFace, MagFace, ElasticFace) of :func:`adaptive_logits`."""
    margin_spec.adaptive(s, angle_mode, label_smoothing)
    checks.check_loss_inputs(x, weight, labels, reduction, ignore_index)
    logits = adaptive_logits(x, weight, labels, m_angle, m_add, s, angle_mode, ignore_index)
    return _smoothed_loss(logits, labels, reduction, ignore_index, label_smoothing)


def curricular_logits(x, weight, labels, t, s=64.0, m=0.5, ignore_index=-100, **_):
    """CurricularFace's logits (N, C): ArcFace's target (with its fallback); the non-target
    cosines above cos(θ_iy + m) become c·(t + c). t: 0-d tensor, not differentiated."""
    spec = margin_spec.curricular(s, m)
    c = cosine(x, weight)
    has_target = labels != ignore_index
    column = torch.where(has_target, labels, 0).unsqueeze(1)
    c_target = c.gather(1, column)
    threshold = torch.where(has_target, curricular_threshold(c_target.squeeze(1), m), 2.0)
    hard_t = t.detach().to(c.dtype).expand(c.shape[0])
    nontarget = hard_example_logits(c, threshold, hard_t)
    return s * torch.where(has_target.unsqueeze(1), nontarget.scatter(1, column, target_margin(c_target, spec)),
                           nontarget)


def curricular(x, weight, labels, t, s=64.0, m=0.5, reduction="mean", ignore_index=-100,
               label_smoothing=0.0):
    """CurricularFace, from :func:`curricular_logits`."""
    margin_spec.curricular(s, m, label_smoothing)
    checks.check_loss_inputs(x, weight, labels, reduction, ignore_index)
    logits = curricular_logits(x, weight, labels, t, s, m, ignore_index)
    return _smoothed_loss(logits, labels, reduction, ignore_index, label_smoothing)
