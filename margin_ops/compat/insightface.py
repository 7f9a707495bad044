"""Drop-in for InsightFace arcface_torch's ``PartialFC_V2`` and ``CombinedMarginLoss``.

In arcface_torch's ``train_v2.py`` replace the two imports::

    from margin_ops.compat.insightface import CombinedMarginLoss, PartialFC_V2

and keep everything else: the same constructors, the same parameter ``weight`` (this rank's
(num_local, embedding_size) class shard, same sharding, init N(0, 0.01²), the only entry of
``state_dict``, so checkpoints load both ways), the same loss and the same gradients. The
loss is computed by :class:`margin_ops.distributed.PartialFC` (fused: the (N, C_r) logits of
the shard are never materialized).

What arcface_torch computes, and how it maps onto margin_ops (read from
``recognition/arcface_torch/losses.py`` and ``partial_fc_v2.py``):

* ``CombinedMarginLoss(s, m1, m2, m3)`` has two branches, tested in this order:

  - ``m1 == 1 and m3 == 0``: the target logit becomes s·cos(θ + m2), for *every* θ — the
    ``th`` / ``mm`` / ``easy_margin`` attributes it sets are never used, so there is no
    fallback past θ + m2 > π. Computed in place under ``torch.no_grad()``, so the gradient
    passes straight through the margin (dφ/dc = 1). margin_ops: ``kind="combined"``,
    m1 = 1, m2, m3 = 0, ``margin_grad="detach"`` (not ``"arcface"``, whose linear fallback
    arcface_torch does not have).
  - else ``m3 > 0``: s·(c − m3) — m1 and m2 are ignored (a warning says so when they are
    not 1 and 0). margin_ops: ``kind="cosface"``, m = m3.
  - anything else (m1 ≠ 1 with m3 ≤ 0, or m3 < 0) makes arcface_torch's forward fail on a
    bare ``raise``; here the constructor raises a ValueError. So does an m2 outside
    [0, π) in the first branch (cos(θ + m2) is not a margin there; margin_ops rejects it)
    and ``interclass_filtering_threshold > 0`` (not supported).

* ``PartialFC_V2``: the loss is the mean over the global batch of −log softmax, the same
  on every rank. Gradients: ``weight.grad`` is the exact gradient of that loss w.r.t. this
  rank's shard (arcface_torch's ``DistCrossEntropyFunc`` backward: (softmax − one_hot) / N).
  ``local_embeddings.grad`` is **world_size times** the exact gradient: arcface_torch's
  ``AllGatherFunc`` backward sums the shards' gradients for this rank's rows and then
  multiplies by the world size ("cooperate with distributed loss function"), so that DDP's
  *average* over ranks of the backbone's gradients becomes their sum. margin_ops.distributed
  returns the exact gradient (see its module docstring); this class multiplies by
  world_size, as arcface_torch does.

Differences (none matters for train_v2.py):

* ``sample_rate < 1`` samples as arcface_torch (every positive class of the global batch in
  the shard, then negatives uniformly: the top ``num_sample = int(sample_rate · num_local)``
  of U[0, 1) scores with positives at 2, or all positives if there are more), but only in
  training mode (eval mode uses every class) and with the random generator of the weight's
  device (arcface_torch draws on the CPU). ``sample_rate`` giving ``num_sample == 0`` raises.
  The sampled rows are not copied: arcface_torch's ``self.weight[index]`` copies them (and
  its backward scatters their gradient back into a zero ``weight.grad``); here the fused op
  reads them in place and writes their gradient in place, with the same ``weight.grad`` (the
  full shard, zero on the rows not sampled). With ``fp16=True`` they are copied, as there,
  and cast to float16.
* The loss of a row is lse − target logit; arcface_torch floors the row's probability at
  1e-30 (a row loss of at most 69.08). Gradients are the same (its backward ignores the floor).
* The cosines are clamped to [−1, 1] with the gradient passed straight through the clamp;
  arcface_torch's ``clamp`` zeroes it where rounding pushed |c| past 1 (only for features
  parallel to a class weight).
* Batches may differ in size between ranks and steps (arcface_torch asserts they do not).
  ``local_labels`` may be (N,) or (N, 1) and are not modified in place (arcface_torch
  ``squeeze_()``\\ s them); they must be class ids in [0, num_classes).
* ``fp16=True`` runs the fused op under ``torch.autocast(float16)`` on the features' device
  (cosines from float16 inputs, accumulated in float32), where arcface_torch autocasts its
  normalize + linear under ``torch.cuda.amp.autocast``: the same precision, not the same bits.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]


class CombinedMarginLoss(nn.Module):
    """arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)``.

    Given to :class:`PartialFC_V2`, it says which margin the fused op applies (:attr:`kind`,
    :attr:`margin_kwargs`; see the module docstring). Called directly on a (N, C) tensor of
    cosines and labels (N,) or (N, 1) (−1: no target in these columns), it returns what
    arcface_torch's does: s · logits with the margin on each row's target (plain PyTorch,
    materialized). Unlike arcface_torch it does not modify ``logits`` in place.
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        if interclass_filtering_threshold > 0:
            raise ValueError("CombinedMarginLoss: interclass_filtering_threshold > 0 is not supported by "
                             f"margin_ops (got {interclass_filtering_threshold!r}); use 0")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        if m1 == 1.0 and m3 == 0.0:
            if not 0 <= m2 < math.pi:
                raise ValueError(f"CombinedMarginLoss: m2 must lie in [0, π) with m1 == 1 and m3 == 0 "
                                 f"(the ArcFace branch), got {m2!r}")
            self.kind = "combined"
            self.margin_kwargs = dict(s=float(s), m1=1.0, m2=float(m2), m3=0.0, margin_grad="detach")
        elif m3 > 0:
            if m1 != 1.0 or m2 != 0.0:
                warnings.warn(f"CombinedMarginLoss(m1={m1!r}, m2={m2!r}, m3={m3!r}): with m3 > 0 arcface_torch "
                              "applies only the CosFace margin m3 and ignores m1 and m2; so does margin_ops",
                              stacklevel=2)
            self.kind = "cosface"
            self.margin_kwargs = dict(s=float(s), m=float(m3))
        else:
            raise ValueError(f"CombinedMarginLoss: arcface_torch supports m1 == 1 with m3 == 0 (ArcFace, margin "
                             f"m2) or m3 > 0 (CosFace); got m1={m1!r}, m2={m2!r}, m3={m3!r}")
        try:
            self.margin_spec = distributed._margin_spec(self.kind, self.margin_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"CombinedMarginLoss: {error}") from error

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1, 1)
        index = torch.where(labels != -1)[0]
        columns = labels[index].view(-1)
        out = logits.clone()  # gradient: the identity, as arcface_torch's in-place edits
        if self.kind == "combined":
            with torch.no_grad():  # straight through the margin, as arcface_torch
                target = out[index, columns].arccos_()
                out.arccos_()
                out[index, columns] = target + self.m2
                out.cos_()
        else:
            out[index, columns] = out[index, columns] - self.m3
        return out * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3} -> kind={self.kind!r}"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class PartialFC_V2(distributed.PartialFC):
    """arcface_torch's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0,
    fp16=False)`` on :class:`margin_ops.distributed.PartialFC` (see the module docstring).

    ``margin_loss`` must be this module's :class:`CombinedMarginLoss`. ``forward(local_embeddings,
    local_labels)`` returns the mean loss of the global batch (the same on every rank);
    ``local_embeddings.grad`` is world_size × the exact gradient, as arcface_torch's.
    """

    def __init__(self, margin_loss, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False):
        if not isinstance(margin_loss, CombinedMarginLoss):
            raise TypeError("PartialFC_V2: margin_loss must be margin_ops.compat.insightface.CombinedMarginLoss "
                            f"(same arguments as arcface_torch's), got {type(margin_loss).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("PartialFC_V2: must initialize torch.distributed before creating it")
        super().__init__(embedding_size, num_classes, margin_loss.kind, sample_rate, **margin_loss.margin_kwargs)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.embedding_size, self.fp16 = embedding_size, fp16
        self.num_local = self.weight.shape[0]
        self.num_sample = int(sample_rate * self.num_local)  # arcface_torch floors (PartialFC: ceil)
        if self.num_sample < 1:
            raise ValueError(f"PartialFC_V2: rank {self.rank}: sample_rate {sample_rate!r} samples no class of "
                             f"this rank's {self.num_local}")
        self.margin_softmax = margin_loss

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor):
        labels = local_labels.reshape(-1).long()
        features = _ScaleGrad.apply(local_embeddings, self.world_size)
        device_type = local_embeddings.device.type
        with torch.autocast(device_type, dtype=torch.float16, enabled=bool(self.fp16)):
            return super().forward(features, labels)
