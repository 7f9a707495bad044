"""margin_ops: fused large-margin softmax losses (ArcFace, CosFace, SphereFace, combined,
sub-center ArcFace, AdaFace, MagFace, ElasticFace, CurricularFace).

    import torch, margin_ops
    loss = torch.ops.margin.arcface(x, weight, labels, s=64.0, m=0.5)  # x (N, D), weight (C, D)

Importing the package loads the compiled kernels (margin_ops._C) and registers the
Python halves of the ops (margin_ops.ops) and, when triton imports, the Triton backend.
"""

import torch

from . import _C  # noqa: F401  (registers the op schemas and the C++ kernels)
from . import checks, ops, reference, spec
from .backends import available_backends, backend, current_backend
from .nn import AdaFace, ArcFace, CombinedMargin, CosFace, CurricularFace, ElasticFace, MagFace, SphereFace
from .ops import MarginOutput, with_stats

try:  # optional: Triton kernels
    from . import triton as _triton  # noqa: F401
except ImportError:
    pass

arcface = torch.ops.margin.arcface
cosface = torch.ops.margin.cosface
combined = torch.ops.margin.combined
sphereface = torch.ops.margin.sphereface
adaptive = torch.ops.margin.adaptive
curricular = torch.ops.margin.curricular

__version__ = "0.1.0"
__all__ = [
    "AdaFace", "ArcFace", "CombinedMargin", "CosFace", "CurricularFace", "ElasticFace", "MagFace", "MarginOutput",
    "SphereFace", "adaptive", "arcface", "available_backends", "backend", "checks", "combined", "cosface",
    "curricular", "current_backend", "ops", "reference", "spec", "sphereface", "with_stats",
]
