"""``nn.Module`` heads that own the class weights and return the loss.

Each head holds ``weight`` of shape (num_classes, embedding_size) — the ``nn.Linear``
layout — initialised from N(0, 0.01²) as InsightFace's PartialFC does (only directions
matter: the weights are normalized inside the loss). ``forward(features, labels)``
takes features (N, embedding_size) and labels (N,) int64 and returns the loss; with
``return_stats=True`` it returns a :class:`margin_ops.MarginOutput` (loss, lse, pred).
"""

from __future__ import annotations

import torch
from torch import nn

from . import spec as registry
from .ops import margin_loss
from .spec import MarginSpec


class _MarginHead(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int, reduction: str, ignore_index: int,
                 device=None, dtype=None):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size}, {num_classes}")
        registry.check_choice("reduction", reduction, registry.REDUCTIONS)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def spec(self) -> MarginSpec:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        return self._loss(features, labels, self.spec(), return_stats)

    def _loss(self, features, labels, spec: MarginSpec, return_stats: bool):
        out = margin_loss(features, self.weight, labels, spec, self.reduction, self.ignore_index)
        return out if return_stats else out.loss

    def extra_repr(self) -> str:
        num_classes, embedding_size = self.weight.shape
        return f"embedding_size={embedding_size}, num_classes={num_classes}, reduction={self.reduction!r}"


class ArcFace(_MarginHead):
    """Additive angular margin: target logit s·cos(θ + m). See ``torch.ops.margin.arcface``."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False, margin_grad: str = "exact", reduction: str = "mean",
                 ignore_index: int = -100, device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, device, dtype)
        self._spec = registry.arcface(s, m, easy_margin, margin_grad)

    def spec(self) -> MarginSpec:
        return self._spec


class CosFace(_MarginHead):
    """Additive cosine margin: target logit s·(cos θ − m). See ``torch.ops.margin.cosface``."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35,
                 reduction: str = "mean", ignore_index: int = -100, device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, device, dtype)
        self._spec = registry.cosface(s, m)

    def spec(self) -> MarginSpec:
        return self._spec


class CombinedMargin(_MarginHead):
    """InsightFace's combined margin: target logit s·(cos(m1·θ + m2) − m3)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, margin_grad: str = "exact", reduction: str = "mean",
                 ignore_index: int = -100, device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, device, dtype)
        self._spec = registry.combined(s, m1, m2, m3, margin_grad)

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
                 reduction: str = "mean", ignore_index: int = -100, device=None, dtype=None):
        super().__init__(embedding_size, num_classes, reduction, ignore_index, device, dtype)
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

    def spec(self) -> MarginSpec:
        return registry.sphereface(self.m, self.lamb, self.s, self.gamma)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        if not self.training:
            return super().forward(features, labels, return_stats)
        # A training step runs with the next iteration's λ; the counter advances only once
        # the step has succeeded (a forward that raises leaves the schedule where it was).
        step_spec = registry.sphereface(self.m, self.lamb_at(int(self.iteration) + 1), self.s, self.gamma)
        out = self._loss(features, labels, step_spec, return_stats)
        self.iteration += 1
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m={self.m}, s={self.s}, gamma={self.gamma}, "
                f"lambda_min={self.lambda_min}, lambda_max={self.lambda_max}")
