"""The math of margin_ops in plain PyTorch: the single readable statement of it.

Every backend (C++ CPU, CUDA, Triton) computes exactly what this file computes and is
tested against it. It materializes the N x C logits, so it is also the "eager"
contender of ``benchmarks/run.py``. It is differentiable and runs in float64.

Shapes and dtypes used throughout:

* ``x``       (N, D) floating: features, one row per sample.
* ``weight``  (C, D) same dtype: one row per class (the ``nn.Linear`` layout; classic
  ArcFace/SphereFace code keeps the transpose, (D, C)).
* ``labels``  (N,) int64: the target class of each row, or ``ignore_index``.

Logits and losses are computed in the accumulation dtype: float64 for float64 inputs,
float32 for everything else (bfloat16/float16 inputs are multiplied in their own dtype,
as ``F.linear`` does, then upcast).

The reference assumes valid input: the margins, their parameters and their rules are the
registry's (:mod:`margin_ops.spec`), tensor checks are :mod:`margin_ops.checks`'.
"""

from __future__ import annotations

import math

import torch

from . import spec as margin_spec
from .spec import NORM_EPS, SIN_THETA_EPS, MarginSpec


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


def margin_lse(x, weight, labels, margin, s, m1=1.0, m2=0.0, m3=0.0, lamb=0.0,
               feature_scale=False, detach_margin_grad=False):
    """The fused primitive every backend implements, computed the plain way.

    logit_ic = s_i·c_ic, except the target class where it is s_i·φ(c_iy); s_i = s, or
    ‖x_i‖ when ``feature_scale``. Rows whose label is outside [0, C) have no target.

    Returns ``(lse, target_logit, max_cos, pred)``, each (N,): the log-sum-exp of the
    row's logits and its target logit (0 without a target), both in the accumulation
    dtype and differentiable; the largest cosine of the row and its class (int64), the
    margin-free top-1 prediction used for accuracy logging.
    """
    spec = MarginSpec(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad)
    c = cosine(x, weight)
    has_target = (labels >= 0) & (labels < weight.shape[0])
    column = torch.where(has_target, labels, 0).unsqueeze(1)
    c_target = c.gather(1, column)
    phi = target_margin(c_target, spec)
    if detach_margin_grad:
        phi = c_target + (phi - c_target).detach()
    phi = torch.where(has_target.unsqueeze(1), phi, c_target)
    scale = row_norms(x) if feature_scale else s
    logits = c.scatter(1, column, phi) * scale
    target_logit = torch.where(has_target, logits.gather(1, column).squeeze(1), 0)
    max_cos, pred = c.detach().max(dim=1)
    return logits.logsumexp(dim=1), target_logit, max_cos, pred


def loss_from_lse(lse, target_logit, labels, gamma=0.0, reduction="mean", ignore_index=-100):
    """Cross-entropy (focal when γ > 0) from the per-row log-sum-exp and target logit.

    lse, target_logit: (N,) float. loss_i = −(1 − p_i)^γ · log p_i with
    log p_i = target_logit_i − lse_i; rows labelled ``ignore_index`` contribute 0.
    ``mean`` divides by the number of rows not ignored, or by 1 when there are none
    (so an all-ignored or empty batch gives a loss of 0, not NaN).
    """
    margin_spec.check_choice("reduction", reduction, margin_spec.REDUCTIONS)
    valid = labels != ignore_index
    log_p = target_logit - lse
    loss = -log_p
    if gamma:
        # (1 − p)^γ with its base floored: finite gradient when p rounds to 1.
        one_minus_p = -torch.expm1(log_p)
        loss = one_minus_p.clamp_min(torch.finfo(log_p.dtype).tiny) ** gamma * loss
    loss = torch.where(valid, loss, 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def margin_loss(x, weight, labels, spec: MarginSpec, reduction="mean", ignore_index=-100,
                lse_fn=margin_lse):
    """The loss of ``spec`` from a ``margin_lse`` implementation (the reference by default)."""
    lse, target_logit, _, _ = lse_fn(x, weight, labels, *spec.primitive_args())
    return loss_from_lse(lse, target_logit, labels, spec.gamma, reduction, ignore_index)


def arcface(x, weight, labels, s=64.0, m=0.5, easy_margin=False, margin_grad="exact",
            reduction="mean", ignore_index=-100):
    """ArcFace: φ(c) = cos(θ + m) (see :func:`target_margin`). Returns the reduced loss."""
    return margin_loss(x, weight, labels, margin_spec.arcface(s, m, easy_margin, margin_grad),
                       reduction, ignore_index)


def cosface(x, weight, labels, s=64.0, m=0.35, reduction="mean", ignore_index=-100):
    """CosFace: φ(c) = c − m."""
    return margin_loss(x, weight, labels, margin_spec.cosface(s, m), reduction, ignore_index)


def combined(x, weight, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_grad="exact",
             reduction="mean", ignore_index=-100):
    """InsightFace's combined margin: φ(c) = cos(m1·θ + m2) − m3."""
    return margin_loss(x, weight, labels, margin_spec.combined(s, m1, m2, m3, margin_grad),
                       reduction, ignore_index)


def sphereface(x, weight, labels, m=4, lamb=0.0, s=None, gamma=0.0, reduction="mean",
               ignore_index=-100):
    """SphereFace (A-Softmax): φ = (ψ(θ) + λc) / (1 + λ), ψ = (−1)^k cos(mθ) − 2k.

    ``s=None`` scales each row by its feature norm ‖x_i‖, as the original SphereFace.
    """
    return margin_loss(x, weight, labels, margin_spec.sphereface(m, lamb, s, gamma), reduction,
                       ignore_index)
