"""Drop-in replacements for other libraries' margin losses, computed with margin_ops' fused ops.

* :mod:`margin_ops.compat.pml`: pytorch-metric-learning 2.x's ``ArcFaceLoss``,
  ``CosFaceLoss`` and ``SphereFaceLoss`` (same constructor, same parameter ``W``, same loss
  and gradients). pytorch-metric-learning itself is not needed to use them.
* :mod:`margin_ops.compat.insightface`: arcface_torch's ``CombinedMarginLoss`` and
  ``PartialFC_V2`` (same constructors, ``state_dict`` and gradients; train_v2.py runs by
  changing its import lines).
"""
