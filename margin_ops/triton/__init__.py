"""The Triton backend: ops ``margin::margin_lse_triton`` and ``margin::margin_lse_backward_triton``.

They are twins of ``margin_lse`` / ``margin_lse_backward`` (same schemas, read from the
C++ schema block so that it stays their one source) with Triton kernels for CUDA tensors,
and for CPU tensors when TRITON_INTERPRET=1 is set before margin_ops is imported (how CI
runs them). Importing this package registers the kernels, the ops' fake kernels,
autograd and autocast (:func:`margin_ops.ops.register_primitive`) and the backend
``"triton"``. Without triton installed the import raises ImportError, which margin_ops
takes to mean "no Triton backend".

Files: ``margin.py`` (φ and dφ/dc in Triton), ``tiles.py`` (cosine / logit / gradient
tiles), ``margin_lse.py`` (forward), ``margin_lse_backward.py`` (backward),
``problem.py`` (host-side argument checks, prologue and launch sizes).
"""

import triton  # noqa: F401  (the one ImportError this package may raise: triton is missing)

import torch

from .. import backends, ops
from . import margin_lse, margin_lse_backward
from .problem import INTERPRETED

__all__ = ["INTERPRETED"]

_lib = torch.library.Library("margin", "FRAGMENT")


def _define_twin(original: str, name: str, kernel) -> None:
    """Defines margin::<name> with the schema of margin::<original>, kernel for CUDA and CPU."""
    schema = str(getattr(torch.ops.margin, original).default._schema)  # "margin::<original>(...) -> ..."
    _lib.define(name + schema[schema.index("("):])
    # On CPU tensors the kernel runs under the interpreter, or raises saying how to enable it.
    for key in ("CUDA", "CPU"):
        _lib.impl(name, kernel, key)


_define_twin("margin_lse", "margin_lse_triton", margin_lse.margin_lse)
_define_twin("margin_lse_backward", "margin_lse_backward_triton", margin_lse_backward.margin_lse_backward)
ops.register_primitive(_lib, "margin_lse_triton", "margin_lse_backward_triton")

backends.register("triton", backends.Backend(
    margin_lse=torch.ops.margin.margin_lse_triton,
    devices=lambda: ("cuda", "cpu") if INTERPRETED else ("cuda",),
    missing=lambda: None,
))
