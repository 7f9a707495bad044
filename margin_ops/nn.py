"""``nn.Module`` heads that own the class weights and return the loss.

Each head holds ``weight`` of shape (num_classes, embedding_size) — the ``nn.Linear``
layout; (num_classes·subcenters, embedding_size) with sub-centers, row c·K + k being
sub-center k of class c — initialised from N(0, 0.01²) as InsightFace's PartialFC does
(only directions matter: the weights are normalized inside the loss).
``forward(features, labels)`` takes features (N, embedding_size), not normalized, and
labels (N,) int64, and returns the loss; with ``return_stats=True`` it returns a
:class:`margin_ops.MarginOutput` (loss, lse, pred).

Every head takes ``label_smoothing`` (``F.cross_entropy``'s, on the margin logits),
``reduction`` and ``ignore_index``. The heads with state (SphereFace's iteration,
AdaFace's norm statistics, CurricularFace's t) keep it in buffers, so ``state_dict``
saves it; only training-mode forwards update it, and only once the step's loss has been
computed without error. Rows labelled ``ignore_index`` take no part in those updates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import checks, reference
from . import spec as registry
from .ops import margin_loss, with_stats
from .spec import MarginSpec


def _masked_mean(values: torch.Tensor, mask: torch.Tensor):
    """(mean of ``values`` where ``mask``, count): the mean is 0 when the count is 0 (no host sync)."""
    count = mask.sum()
    return torch.where(mask, values, 0).sum() / count.clamp_min(1), count


class _Head(nn.Module):
    """The weight and the loss options every head shares."""

    def __init__(self, embedding_size: int, num_classes: int, reduction: str, ignore_index: int,
                 label_smoothing: float, subcenters: int = 1, device=None, dtype=None):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size}, {num_classes}")
        registry.check_choice("reduction", reduction, registry.REDUCTIONS)
        registry.check_label_smoothing(label_smoothing)
        registry.check_integer("subcenters", subcenters, 1)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def _op_loss(self, op, features, labels, return_stats: bool, **op_kwargs):
        """``op(features, weight, labels, **op_kwargs)`` with the head's loss options: the
        loss, or with ``return_stats`` the :class:`MarginOutput` of :func:`with_stats`."""
        op_kwargs.update(reduction=self.reduction, ignore_index=self.ignore_index,
                         label_smoothing=self.label_smoothing)
        if return_stats:
            return with_stats(op, features, self.weight, labels, **op_kwargs)
        return op(features, self.weight, labels, **op_kwargs)

    def extra_repr(self) -> str:
        text = (f"embedding_size={self.weight.shape[1]}, num_classes={self.num_classes}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}")
        return text + (f", subcenters={self.subcenters}" if self.subcenters > 1 else "")


class _MarginHead(_Head):
    """A head whose margin is a fixed :class:`MarginSpec` (or one per step: SphereFace)."""

    def spec(self) -> MarginSpec:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        return self._loss(features, labels, self.spec(), return_stats)

    def _loss(self, features, labels, spec: MarginSpec, return_stats: bool):
        out = margin_loss(features, self.weight, labels, spec, self.reduction, self.ignore_index)
        return out if return_stats else out.loss


class ArcFace(_MarginHead):
    """Additive angular margin: target logit s·cos(θ + m). See ``torch.ops.margin.arcface``.

    ``subcenters`` K > 1: sub-center ArcFace — weight (num_classes·K, embedding_size), the
    cosine of class c being the largest of its K sub-centers'.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False, margin_grad: str = "exact", reduction: str = "mean",
                 ignore_index: int = -100, device=None, dtype=None, *, subcenters: int = 1,
                 label_smoothing: float = 0.0):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, subcenters,
                         device, dtype)
        self._spec = registry.arcface(s, m, easy_margin, margin_grad, label_smoothing, subcenters)

    def spec(self) -> MarginSpec:
        return self._spec


class CosFace(_MarginHead):
    """Additive cosine margin: target logit s·(cos θ − m). See ``torch.ops.margin.cosface``."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35,
                 reduction: str = "mean", ignore_index: int = -100, device=None, dtype=None, *,
                 subcenters: int = 1, label_smoothing: float = 0.0):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, subcenters,
                         device, dtype)
        self._spec = registry.cosface(s, m, label_smoothing, subcenters)

    def spec(self) -> MarginSpec:
        return self._spec


class CombinedMargin(_MarginHead):
    """InsightFace's combined margin: target logit s·(cos(m1·θ + m2) − m3)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, margin_grad: str = "exact", reduction: str = "mean",
                 ignore_index: int = -100, device=None, dtype=None, *, subcenters: int = 1,
                 label_smoothing: float = 0.0):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, subcenters,
                         device, dtype)
        self._spec = registry.combined(s, m1, m2, m3, margin_grad, label_smoothing, subcenters)

    def spec(self) -> MarginSpec:
        return self._spec


class SphereFace(_MarginHead):
    """SphereFace (A-Softmax) with the classic λ annealing.

    Each training-mode forward first increments the buffer ``iteration`` (so it is 1 on
    the first step), then uses λ = max(lambda_min, lambda_max / (1 + 0.1·iteration)).
    Eval-mode forwards use λ of the current iteration without advancing it. The counter
    is a buffer, so it is saved and restored with ``state_dict``. ``s=None`` (default)
    scales by the feature norm ‖x_i‖ as the original; ``gamma`` is the focal exponent.
    """

    def __init__(self, embedding_size: int, num_classes: int, m: int = 4, s: float | None = None,
                 gamma: float = 0.0, lambda_min: float = 5.0, lambda_max: float = 1500.0,
                 reduction: str = "mean", ignore_index: int = -100, device=None, dtype=None, *,
                 label_smoothing: float = 0.0):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, 1, device, dtype)
        registry.check_finite("lambda_min", lambda_min, nonnegative=True)
        registry.check_finite("lambda_max", lambda_max, nonnegative=True)
        registry.sphereface(m, lambda_min, s, gamma, lamb_name="lambda_min")  # validates m, s, gamma
        self.m, self.s, self.gamma = m, s, gamma
        self.lambda_min, self.lambda_max = lambda_min, lambda_max
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64, device=device))

    def lamb_at(self, iteration: int) -> float:
        """λ of a given iteration: max(lambda_min, lambda_max / (1 + 0.1·iteration))."""
        return max(self.lambda_min, self.lambda_max / (1 + 0.1 * iteration))

    @property
    def lamb(self) -> float:
        """λ for the current iteration."""
        return self.lamb_at(int(self.iteration))

    def _spec_at(self, iteration: int) -> MarginSpec:
        return registry.sphereface(self.m, self.lamb_at(iteration), self.s, self.gamma, self.label_smoothing)

    def spec(self) -> MarginSpec:
        return self._spec_at(int(self.iteration))

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        if not self.training:
            return super().forward(features, labels, return_stats)
        # A training step runs with the next iteration's λ; the counter advances only once
        # the step has succeeded (a forward that raises leaves the schedule where it was).
        out = self._loss(features, labels, self._spec_at(int(self.iteration) + 1), return_stats)
        self.iteration += 1
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m={self.m}, s={self.s}, gamma={self.gamma}, "
                f"lambda_min={self.lambda_min}, lambda_max={self.lambda_max}")


class AdaFace(_Head):
    """AdaFace (Kim et al., CVPR 2022), the official head (mk-minchul/AdaFace ``head.py``).

    The margin adapts to the feature norm ‖x_i‖, a proxy of image quality. With
    norm_i = clamp(‖x_i‖, 0.001, 100) (detached) and the buffers ``batch_mean`` (init 20)
    and ``batch_std`` (init 100), a training-mode forward first updates the buffers,
    each to t_alpha·(the batch's mean, resp. unbiased std, of the norms) + (1 − t_alpha)·itself;
    then scaler_i = clamp(h·(norm_i − batch_mean)/(batch_std + 1e-3), −1, 1) and the target
    logit is s·(cos θ̃_i − m_add_i), θ̃_i = clamp(θ_i + m_angle_i, 1e-3, π − 1e-3),
    m_angle_i = −m·scaler_i, m_add_i = m + m·scaler_i (``torch.ops.margin.adaptive``,
    angle_mode "clip"). Eval-mode forwards use the buffers as they are.

    The statistics are taken over the rows not labelled ``ignore_index``; a batch with no
    such row leaves ``batch_mean`` as it is, one with fewer than two leaves ``batch_std``
    (the official head would store NaN there).
    """

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.4, h: float = 0.333,
                 s: float = 64.0, t_alpha: float = 0.01, *, label_smoothing: float = 0.0,
                 reduction: str = "mean", ignore_index: int = -100, device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, 1, device, dtype)
        registry.adaptive(s, "clip", label_smoothing)  # validates s
        registry.check_finite("m", m)
        registry.check_finite("h", h, nonnegative=True)
        registry.check_finite("t_alpha", t_alpha)
        if not 0 <= t_alpha <= 1:
            raise ValueError(f"t_alpha must lie in [0, 1], got {t_alpha!r}")
        self.m, self.h, self.s, self.t_alpha = float(m), float(h), float(s), float(t_alpha)
        factory = dict(device=device, dtype=dtype)
        self.register_buffer("batch_mean", torch.full((1,), 20.0, **factory))
        self.register_buffer("batch_std", torch.full((1,), 100.0, **factory))

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        checks.check_tensors(features, self.weight, labels)
        norms = reference.row_norms(features.detach()).squeeze(1).clamp(0.001, 100)
        mean, std = self.batch_mean, self.batch_std
        if self.training:
            has_target = labels != self.ignore_index
            batch_mean, count = _masked_mean(norms, has_target)
            batch_var, _ = _masked_mean((norms - batch_mean) ** 2, has_target)
            batch_std = (batch_var * count / (count - 1).clamp_min(1)).sqrt()  # unbiased, as torch.std
            mean = torch.where(count >= 1, batch_mean * self.t_alpha + (1 - self.t_alpha) * mean, mean)
            std = torch.where(count >= 2, batch_std * self.t_alpha + (1 - self.t_alpha) * std, std)
        scaler = ((norms - mean) / (std + 1e-3) * self.h).clamp(-1, 1).to(norms.dtype)
        out = self._op_loss(torch.ops.margin.adaptive, features, labels, return_stats,
                            m_angle=-self.m * scaler, m_add=self.m + self.m * scaler, s=self.s, angle_mode="clip")
        if self.training:
            with torch.no_grad():
                self.batch_mean.copy_(mean)
                self.batch_std.copy_(std)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, h={self.h}, s={self.s}, t_alpha={self.t_alpha}"


class MagFace(_Head):
    """MagFace (Meng et al., CVPR 2021): the official ``MagLinear`` + ``MagLoss``
    (IrvingMeng/MagFace ``models/magface.py``), as one head.

    a_i = clamp(‖x_i‖, l_a, u_a) (differentiated as torch.clamp), margin
    m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m, target logit s·cos(θ + m(a_i)) with
    InsightFace's fallback c − m(a_i)·sin m(a_i) past θ + m(a_i) > π
    (``torch.ops.margin.adaptive``, angle_mode "arcface": the gradient reaches ‖x_i‖
    through the margin too). The loss adds lambda_g·g(a_i), g(a) = a/u_a² + 1/a, to each
    row's cross-entropy: loss = CE + lambda_g·mean_i g(a_i) with ``reduction="mean"``, the
    means over the rows not labelled ``ignore_index`` (``"sum"``: sums; ``"none"``: per
    row, 0 on ignored rows).
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, *,
                 label_smoothing: float = 0.0, reduction: str = "mean", ignore_index: int = -100,
                 device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, 1, device, dtype)
        registry.adaptive(s, "arcface", label_smoothing)  # validates s
        registry.check_finite("l_a", l_a, positive=True)
        registry.check_finite("u_a", u_a, positive=True)
        if not l_a < u_a:
            raise ValueError(f"u_a must be > l_a, got l_a={l_a!r}, u_a={u_a!r}")
        registry.check_angle("l_m", l_m)
        registry.check_angle("u_m", u_m)
        registry.check_finite("lambda_g", lambda_g, nonnegative=True)
        self.s, self.l_a, self.u_a = float(s), float(l_a), float(u_a)
        self.l_m, self.u_m, self.lambda_g = float(l_m), float(u_m), float(lambda_g)

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        """m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m, for clamped norms a (any shape)."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        checks.check_tensors(features, self.weight, labels)
        a = reference.row_norms(features).squeeze(1).clamp(self.l_a, self.u_a)
        out = with_stats(torch.ops.margin.adaptive, features, self.weight, labels, self.margin(a),
                         torch.zeros_like(a), s=self.s, angle_mode="arcface", reduction=self.reduction,
                         ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)
        has_target = labels != self.ignore_index
        g = torch.where(has_target, 1 / self.u_a ** 2 * a + 1 / a, 0)  # as MagLoss.calc_loss_G
        if self.reduction == "mean":
            g = g.sum() / has_target.sum().clamp_min(1)
        elif self.reduction == "sum":
            g = g.sum()
        loss = out.loss + self.lambda_g * g.to(out.loss.dtype)
        return out._replace(loss=loss) if return_stats else loss

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
                f"u_m={self.u_m}, lambda_g={self.lambda_g}")


class ElasticFace(_Head):
    """ElasticFace (Boutros et al., CVPRW 2022): the official ``ElasticArcFace`` /
    ``ElasticCosFace`` (fdbtrs/ElasticFace ``utils/losses.py``).

    In training mode row i's margin m_i is the i-th of N draws from N(m, std) with torch's
    global generator, so ``torch.manual_seed`` reproduces them: with every row labelled,
    the very draws of the official ``torch.normal(mean=m, std=std, size=(N, 1))`` (the
    official draws one per labelled row; rows labelled ``ignore_index`` draw here too, and
    their draw is unused). ``kind="arc"``:
    target logit s·cos(θ + m_i) (no fallback past π: angle_mode "plain");
    ``kind="cos"``: s·(cos θ − m_i). Eval-mode forwards use m for every row.

    ``plus`` (ElasticFace+): the labelled rows' draws are sorted ascending and handed out
    by their target cosines sorted descending, exactly as the official code does: the j-th
    labelled row gets ascending[order[j]], order = argsort(target cosines, descending).
    (That indexes by the sort permutation, not its inverse: the row with the largest
    cosine gets the smallest margin only where the permutation is its own inverse. It is
    the official behaviour, kept for equal numbers.)
    """

    KINDS = ("arc", "cos")

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 std: float = 0.0125, kind: str = "arc", plus: bool = False, *, label_smoothing: float = 0.0,
                 reduction: str = "mean", ignore_index: int = -100, device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, 1, device, dtype)
        registry.adaptive(s, "plain", label_smoothing)  # validates s
        registry.check_choice("kind", kind, self.KINDS)
        (registry.check_angle if kind == "arc" else registry.check_finite)("m", m)
        registry.check_finite("std", std, nonnegative=True)
        if not isinstance(plus, bool):
            raise ValueError(f"plus must be a bool, got {plus!r}")
        self.s, self.m, self.std, self.kind, self.plus = float(s), float(m), float(std), kind, plus

    def _row_margins(self, features, labels) -> torch.Tensor:
        """(N,) each row's margin: drawn in the default dtype, as the official draws; in eval
        mode m in the accumulation dtype."""
        n = labels.shape[0]
        if not self.training:
            return torch.full((n,), self.m, dtype=reference.accumulation_dtype(features.dtype), device=features.device)
        draws = torch.normal(self.m, self.std, size=(n,), device=features.device)
        if not self.plus:
            return draws
        has_target = labels != self.ignore_index
        c_target = reference.target_cosines(features, self.weight, labels, has_target)
        # The labelled rows by descending target cosine, and their draws ascending (ignored
        # rows sort last in both); the j-th labelled row gets ascending[order[j]], order[j]
        # counted among the labelled rows, as the official indexes its (labelled) rows.
        order = torch.sort(torch.where(has_target, c_target, -math.inf), descending=True).indices
        ascending = torch.sort(torch.where(has_target, draws, math.inf)).values
        position = (has_target.cumsum(0) - 1).clamp_min(0)  # a labelled row's index among the labelled rows
        return torch.where(has_target, ascending[position[order[position]]], self.m)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        checks.check_tensors(features, self.weight, labels)
        acc = reference.accumulation_dtype(features.dtype)
        margins = self._row_margins(features, labels).to(acc)
        zero = torch.zeros_like(margins)
        m_angle, m_add = (margins, zero) if self.kind == "arc" else (zero, margins)
        return self._op_loss(torch.ops.margin.adaptive, features, labels, return_stats, m_angle=m_angle,
                             m_add=m_add, s=self.s, angle_mode="plain")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, std={self.std}, kind={self.kind!r}, plus={self.plus}"


class CurricularFace(_Head):
    """CurricularFace (Huang et al., CVPR 2020), the official head (HuangYG123/CurricularFace
    ``head/metrics.py``).

    Target logit: ArcFace's, s·cos(θ + m) with the fallback c − m·sin m past θ + m > π.
    Non-target cosines above the row's cos(θ_y + m) (hard examples) become c·(t + c),
    the others stay c (``torch.ops.margin.curricular``). The buffer ``t`` (init 0) follows
    the mean target cosine: a training-mode forward first sets t ← 0.01·mean_i c_iy +
    0.99·t, the mean over the rows not labelled ``ignore_index`` (none: t stays);
    eval-mode forwards use t as it is.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, *,
                 label_smoothing: float = 0.0, reduction: str = "mean", ignore_index: int = -100,
                 device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, label_smoothing, 1, device, dtype)
        registry.curricular(s, m, label_smoothing)  # validates s and m
        self.s, self.m = float(s), float(m)
        self.register_buffer("t", torch.zeros(1, device=device, dtype=dtype))

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        checks.check_tensors(features, self.weight, labels)
        t = self.t
        if self.training:
            has_target = labels != self.ignore_index
            c_target = reference.target_cosines(features, self.weight, labels, has_target)
            mean_target, count = _masked_mean(c_target, has_target)
            t = torch.where(count >= 1, mean_target * 0.01 + (1 - 0.01) * t, t)
        out = self._op_loss(torch.ops.margin.curricular, features, labels, return_stats, t=t, s=self.s, m=self.m)
        if self.training:
            with torch.no_grad():
                self.t.copy_(t)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}"
