"""Drop-in replacements for pytorch-metric-learning 2.x's large-margin losses.

``ArcFaceLoss``, ``CosFaceLoss``, ``SphereFaceLoss`` and ``SubCenterArcFaceLoss`` here take
the constructor arguments of ``pytorch_metric_learning.losses`` (2.x) of the same name, own
the same parameter ``W`` of shape (embedding_size, num_classes) — (embedding_size,
num_classes·sub_centers) for sub-centers — so ``state_dict``\\ s load both ways — and
``forward(embeddings, labels)`` returns the loss PML returns, with the same gradients with
respect to ``embeddings`` and ``W``, computed by margin_ops' fused op (the N x C logits are
never materialized). pytorch-metric-learning itself is not needed to use them.

The mapping onto ``torch.ops.margin`` (x = embeddings, c = cos θ of a row and a column of W):

* ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)``: ``margin`` is in
  degrees, as in PML. PML's target logit is scale·cos(θ + m) where θ ≤ π − m, else
  scale·(cos θ − m·sin m), m = radians(margin); that is margin_ops' ``arcface`` (its
  non-easy branch, c > cos(π − m), is the same set), so the loss is
  ``torch.ops.margin.arcface(x, W.t(), labels, s=scale, m=radians(margin))``.
* ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)`` (``margin`` and
  ``scale`` keyword-only, as in PML): ``torch.ops.margin.cosface(x, W.t(), labels, s=scale,
  m=margin)``.
* ``SphereFaceLoss(num_classes, embedding_size, margin=4, scale=1)``: ``margin`` is the
  integer angle multiplier (PML takes ``int(margin)``), not an angle. PML's target
  cosine is ψ(θ) = (−1)^k cos(mθ) − 2k, k = ⌊θ/(π/m)⌋ (no λ annealing), and every logit is
  multiplied by ‖x_i‖·scale (the embedding norm, not the weight norms). margin_ops'
  ``sphereface`` with ``s=None`` scales by ‖x_i‖, and ‖scale·x_i‖ = scale·‖x_i‖ while the
  cosines of scale·x_i are those of x_i, so the loss is
  ``torch.ops.margin.sphereface(scale * x, W.t(), labels, m=int(margin), lamb=0, s=None)``
  (the gradient of the product carries the factor scale to x, as PML's does).
* ``SubCenterArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3)``
  (``margin``, ``scale`` and ``sub_centers`` keyword-only: PML silently ignores them when
  passed by position). PML's ``W`` has num_classes·K columns, K = sub_centers, column
  c·K + k being sub-center k of class c; the cosine of class c is the largest of its K
  (the gradient goes to that sub-center), then ArcFace as above. That is margin_ops'
  sub-center layout of ``weight = W.t()``, so the loss is ``torch.ops.margin.arcface(x,
  W.t(), labels, s=scale, m=radians(margin), subcenters=K)``; the N × C·K cosines are never
  materialized. ``get_outliers(embeddings, labels, threshold=75,
  return_dominant_centers=True)`` computes what PML's does without its per-class loop
  (one dot product per row and sub-center of its class), with two differences: the columns
  of ``dominant_centers`` of classes absent from ``labels`` are 0 here (PML leaves them
  uninitialized memory), and ``outliers`` is int64 also when empty (PML: float32). As PML
  (whose ``return a if not flag else a, b`` parses as ``(a), b``), it always returns the pair
  ``(outliers, dominant_centers)``, whatever ``return_dominant_centers`` says.

The reduction is PML's default ``MeanReducer``: the mean over all N rows (rows selected by
``indices_tuple`` are weighted as PML's ``convert_to_weights`` weights them).

Where the results differ from PML (see tests/test_compat_pml.py, which checks both the
agreement and these differences):

* ArcFace (and sub-center ArcFace) gradients where the target angle is tiny: margin_ops
  floors sin θ at ``margin_ops.spec.SIN_THETA_EPS`` (1e-4) in dθ/dc = −1/sin θ, PML does not. So for
  sin θ_y < 1e-4 (c_y > 1 − 5e-9) the loss is the same but margin_ops' gradient of that
  row's target term is smaller by the factor sin θ_y / 1e-4 (PML's is exact there, and
  NaN at c_y = 1 exactly, where margin_ops' stays finite). CosFace and SphereFace have no
  such floor (their φ is a polynomial in c): they agree everywhere.
* Branch ties: PML tests θ ≤ π − m in the angle, margin_ops c > cos(π − m) in the cosine;
  within a few ulps of the threshold (where φ jumps) the two may pick different branches.
* The cosines: margin_ops clamps every cosine to [−1, 1] (gradient passed straight
  through), PML only the target's angle; they differ only where rounding puts a cosine
  ulps outside [−1, 1].
* Labels equal to -100: PML's ``CrossEntropyLoss`` ignores such rows (loss 0, still counted
  in the mean) when num_classes ≥ 100 and raises an IndexError otherwise; here they are
  always ignored and counted. Other labels outside [0, num_classes) raise an error.
* Loss dtype: float32 for float16/bfloat16 embeddings (PML computes in the input dtype).
* Margins outside margin_ops' range raise ValueError at construction: ArcFace ``margin``
  outside [0, 180) degrees, ``scale`` not finite and > 0, SphereFace ``margin`` < 1.

As PML does, ``forward`` moves ``W`` to the embeddings' device, and (outside autocast)
converts it to their dtype, in place (``W.data``).

Constructor options: ``weight_init_func`` (any callable, called on ``W`` as PML does),
``weight_reg_weight`` and ``embedding_reg_weight`` (no effect without a regularizer, as in
PML) are accepted. ``distance`` may only be None or PML's default ``CosineSimilarity()``,
``reducer`` only None or ``MeanReducer()``, ``collect_stats`` only None or False;
``weight_regularizer`` and ``embedding_regularizer`` must be None. Anything else raises a
ValueError naming the option. ``forward``'s ``ref_emb`` is refused as PML refuses it.

Not provided yet: PML's ``LargeMarginSoftmaxLoss`` (its logits are also scaled by the weight
norms), and the statistics PML records with ``collect_stats=True`` (``avg_angle``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import spec as registry

__all__ = ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "SubCenterArcFaceLoss"]

#: The label PML's CrossEntropyLoss(reduction="none") ignores (its default ignore_index).
_CE_IGNORE_INDEX = -100


def _class_names(obj) -> set:
    return {cls.__name__ for cls in type(obj).__mro__}


def _check_options(distance, reducer, collect_stats, weight_regularizer, embedding_regularizer) -> None:
    """Refuses the PML options whose effect these classes do not reproduce."""
    if distance is not None:
        # PML requires a CosineSimilarity; its only settings that change the math are
        # `power` (cos**power) and the normalization, which CosineSimilarity fixes.
        if (type(distance).__name__ != "CosineSimilarity" or getattr(distance, "power", 1) != 1
                or getattr(distance, "p", 2) != 2 or not getattr(distance, "normalize_embeddings", True)):
            raise ValueError(f"distance={distance!r} is not supported: only None or the default "
                             "CosineSimilarity() (the cosines are computed inside the fused op)")
    if reducer is not None and type(reducer).__name__ != "MeanReducer":
        raise ValueError(f"reducer={reducer!r} is not supported: only None or MeanReducer() "
                         "(the mean over the batch, PML's default)")
    if collect_stats not in (None, False):
        raise ValueError(f"collect_stats={collect_stats!r} is not supported: the fused op does not "
                         "record PML's statistics (avg_angle)")
    if weight_regularizer is not None:
        raise ValueError(f"weight_regularizer={weight_regularizer!r} is not supported (only None)")
    if embedding_regularizer is not None:
        raise ValueError(f"embedding_regularizer={embedding_regularizer!r} is not supported (only None)")


def _check_labels(embeddings, labels) -> None:
    """PML's checks of ``labels`` against ``embeddings`` (c_f.check_shapes, labels_required)."""
    if labels is not None and embeddings.shape[0] != labels.shape[0]:
        raise ValueError("Number of embeddings must equal number of labels")
    if labels is not None and labels.ndim != 1:
        raise ValueError("labels must be a 1D tensor of shape (batch_size,)")
    if labels is None:
        raise ValueError("labels are required for this loss function")


def _miner_weights(indices_tuple, labels, dtype) -> torch.Tensor | None:
    """PML's ``lmu.convert_to_weights``: None when every row has weight 1, else (N,) weights
    count_i / max(count) of how often row i appears in ``indices_tuple``."""
    if indices_tuple is None or all(len(t) == 0 for t in indices_tuple):
        return None
    weights = torch.zeros(labels.shape[0], device=labels.device, dtype=dtype)
    indices, counts = torch.unique(torch.cat(tuple(indices_tuple), dim=0), return_counts=True)
    weights[indices] = counts.to(dtype) / torch.max(counts)
    return weights


class _PMLMarginLoss(nn.Module):
    """What the three losses share: ``W``, the options, the forward protocol."""

    def __init__(self, num_classes, embedding_size, margin, scale, *, weight_init_func=None,
                 weight_regularizer=None, weight_reg_weight=1, embedding_regularizer=None,
                 embedding_reg_weight=1, reducer=None, distance=None, collect_stats=None):
        super().__init__()
        _check_options(distance, reducer, collect_stats, weight_regularizer, embedding_regularizer)
        for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        registry.check_finite("scale", scale, positive=True)
        self.num_classes = num_classes
        self.scale = scale
        self.margin = self._init_margin(margin)
        self.weight_reg_weight = weight_reg_weight
        self.embedding_reg_weight = embedding_reg_weight
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
        if weight_init_func is None:
            nn.init.normal_(self.W)  # PML's default: c_f.TorchInitWrapper(torch.nn.init.normal_)
        else:
            weight_init_func(self.W)

    def _init_margin(self, margin):
        raise NotImplementedError

    def _loss(self, x, weight, labels, reduction):
        """The fused op, (C, D) weight, ``reduction`` in ("sum", "none")."""
        raise NotImplementedError

    def _cast_weight(self, embeddings) -> None:
        # PML's cast_types: W follows the embeddings' device, and their dtype outside autocast.
        data = self.W.data
        if data.device != embeddings.device:
            data = data.to(embeddings.device)
        if not torch.is_autocast_enabled() and data.dtype != embeddings.dtype:
            data = data.type(embeddings.dtype)
        if data is not self.W.data:
            self.W.data = data

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss PML returns: mean over the batch of the per-row cross-entropy."""
        _check_labels(embeddings, labels)
        if ref_emb is not None and (ref_emb is not embeddings or ref_labels is not labels):
            raise ValueError("ref_emb is not supported for this loss function")
        labels = labels.to(embeddings.device)
        self._cast_weight(embeddings)
        weights = _miner_weights(indices_tuple, labels, embeddings.dtype)
        n = embeddings.shape[0]
        if weights is None:
            return self._loss(embeddings, self.W.t(), labels, "sum") / n
        losses = self._loss(embeddings, self.W.t(), labels, "none")
        return (losses * weights.to(losses.dtype)).mean()

    def _logit_scale(self, embeddings):
        return self.scale

    def _cosine(self, embeddings):
        """The cosines of the embeddings and the columns of W, (N, columns of W) (materialized)."""
        return nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(self.W.t(), dim=1).t()

    def get_logits(self, embeddings):
        """PML's ``get_logits``: the scaled cosines, (N, num_classes), no margin (materialized)."""
        return self._cosine(embeddings) * self._logit_scale(embeddings)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.W.shape[0]}, margin={self.margin}, "
                f"scale={self.scale}")


class ArcFaceLoss(_PMLMarginLoss):
    """PML's ``ArcFaceLoss``: target logit scale·cos(θ + m), m = radians(``margin``) (degrees).

    ``self.margin`` holds the margin in radians, as PML's does after construction.
    """

    _subcenters = 1  #: weight rows per class (SubCenterArcFaceLoss: sub_centers)

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def _init_margin(self, margin):
        registry.check_finite("margin", margin)
        radians = math.radians(margin)  # bit-for-bit numpy's np.radians, which PML uses
        if not 0 <= radians < math.pi:
            raise ValueError(f"margin must lie in [0, 180) degrees, got {margin!r}")
        return radians

    def _loss(self, x, weight, labels, reduction):
        return torch.ops.margin.arcface(x, weight, labels, s=float(self.scale), m=self.margin,
                                        easy_margin=False, margin_grad="exact", reduction=reduction,
                                        ignore_index=_CE_IGNORE_INDEX, subcenters=self._subcenters)


class CosFaceLoss(_PMLMarginLoss):
    """PML's ``CosFaceLoss``: target logit scale·(cos θ − ``margin``)."""

    def __init__(self, num_classes, embedding_size, *, margin=0.35, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def _init_margin(self, margin):
        registry.check_finite("margin", margin)
        return margin

    def _loss(self, x, weight, labels, reduction):
        return torch.ops.margin.cosface(x, weight, labels, s=float(self.scale), m=float(self.margin),
                                        reduction=reduction, ignore_index=_CE_IGNORE_INDEX)


class SphereFaceLoss(_PMLMarginLoss):
    """PML's ``SphereFaceLoss``: target cosine ψ(θ) = (−1)^k cos(mθ) − 2k, m = int(``margin``),
    every logit scaled by ‖x_i‖·``scale``."""

    def __init__(self, num_classes, embedding_size, margin=4, scale=1, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def _init_margin(self, margin):
        registry.check_finite("margin", margin)
        m = int(margin)  # as PML's LargeMarginSoftmaxLoss.init_margin
        if m < 1:
            raise ValueError(f"margin must be >= 1 (SphereFace's integer angle multiplier), got {margin!r}")
        return m

    def _loss(self, x, weight, labels, reduction):
        if self.scale != 1:
            x = x * self.scale  # ‖scale·x‖ = scale·‖x‖, same cosines
        return torch.ops.margin.sphereface(x, weight, labels, m=self.margin, lamb=0.0, s=None, gamma=0.0,
                                           reduction=reduction, ignore_index=_CE_IGNORE_INDEX)

    def _logit_scale(self, embeddings):
        return torch.norm(embeddings, p=2, dim=1).unsqueeze(1) * self.scale


class SubCenterArcFaceLoss(ArcFaceLoss):
    """PML's ``SubCenterArcFaceLoss``: ArcFace on the largest cosine of each class's
    ``sub_centers`` columns of W (embedding_size, num_classes·sub_centers).

    ``num_classes`` is the number of classes (not of columns), as PML stores it.
    """

    def __init__(self, num_classes, embedding_size, *, margin=28.6, scale=64, sub_centers=3, **kwargs):
        for name, value in (("num_classes", num_classes), ("sub_centers", sub_centers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        # As PML: an ArcFaceLoss over num_classes·sub_centers columns (W drawn by its init).
        super().__init__(num_classes * sub_centers, embedding_size, margin, scale, **kwargs)
        self.num_classes = num_classes
        self._subcenters = sub_centers

    @property
    def sub_centers(self) -> int:
        return self._subcenters

    def _cosine(self, embeddings):
        return super()._cosine(embeddings).view(-1, self.num_classes, self.sub_centers).max(dim=2).values

    def get_outliers(self, embeddings, labels, threshold=75, return_dominant_centers=True):
        """PML's ``get_outliers``: the rows of each class far from its dominant sub-center.

        Per class c present in ``labels`` (labels outside [0, num_classes) are skipped, as
        PML's loop over the classes skips them): each row's nearest sub-center of its class,
        the dominant one being the most frequent (lowest index on ties); a row is an
        outlier when its cosine to the dominant sub-center is below cos(``threshold``
        degrees). Returns ``(outliers, dominant_centers)``: outliers (M,) int64, the row
        indices ordered by class then row, as PML; dominant_centers (embedding_size,
        num_classes) in the embeddings' dtype, column c the dominant sub-center of class c
        (0 for classes absent from ``labels``). ``return_dominant_centers`` is accepted and,
        as in PML, does not change the result.
        """
        del return_dominant_centers  # PML returns the pair either way (see the module docstring)
        _check_labels(embeddings, labels)
        self._cast_weight(embeddings)
        labels = labels.to(embeddings.device)
        k, num_classes = self.sub_centers, self.num_classes
        cos_threshold = math.cos(math.radians(threshold))  # math.radians: bit for bit PML's np.radians
        with torch.no_grad():
            rows = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
            own = labels[rows]
            columns = own.unsqueeze(1) * k + torch.arange(k, device=labels.device)  # (M, K) its class's sub-centers
            centers = nn.functional.normalize(self.W.t()[columns.flatten()], dim=1).view(len(rows), k, self.W.shape[0])
            cosines = torch.einsum("md,mkd->mk", nn.functional.normalize(embeddings[rows], dim=1), centers)
            counts = torch.bincount(own * k + cosines.argmax(dim=1), minlength=num_classes * k)
            dominant = counts.view(num_classes, k).argmax(dim=1)  # (C,) the first most frequent
            outlier = cosines.gather(1, dominant[own].unsqueeze(1)).squeeze(1) < cos_threshold
            by_class = torch.sort(own[outlier], stable=True).indices
            outliers = rows[outlier][by_class]
            dominant_centers = torch.zeros(self.W.shape[0], num_classes, dtype=embeddings.dtype,
                                           device=embeddings.device)
            present = torch.unique(own)
            dominant_centers[:, present] = self.W[:, present * k + dominant[present]].to(embeddings.dtype)
        return outliers, dominant_centers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sub_centers={self.sub_centers}"
