"""The Triton backend: ops ``margin::margin_lse_triton`` and ``margin::margin_lse_backward_triton``.

They are twins of ``margin_lse`` / ``margin_lse_backward`` (same schemas, read from the
C++ schema block so that it stays their one source) with Triton kernels for CUDA tensors,
and for CPU tensors when TRITON_INTERPRET=1 is set before margin_ops is imported (how CI
runs them). Importing this package registers the kernels, the ops' fake kernels,
autograd and autocast (:func:`margin_ops.ops.register_primitive`) and the backend
``"triton"``. Without triton installed the import raises ImportError, which margin_ops
takes to mean "no Triton backend".

Threads. Under TRITON_INTERPRET=1 the interpreter patches module-level state of
``triton.language`` while a kernel runs, so two interpreted launches from different
threads corrupt each other (wrong results or an InterpreterError). The kernels of both ops
therefore run under one process-wide lock when interpreted: calls from several threads are
safe but run one at a time. Compiled (GPU) Triton launches are thread-safe and are not
serialized. The lock covers only this package's ops: other interpreted Triton kernels
running at the same time in other threads are not excluded.

Files: ``margin.py`` (φ, dφ/dc and the hard-example modulation in Triton), ``tiles.py``
(cosine / logit / gradient tiles), ``margin_lse.py`` (forward), ``margin_lse_backward.py``
(backward: one cosine recompute per class chunk, then the dW and dX GEMMs), ``problem.py``
(host-side argument checks, prologue, class splits), ``launch.py`` (the launch table keyed
on dtype, N and D buckets, and the opt-in autotune ``MARGIN_OPS_TRITON_AUTOTUNE=1``).
"""

import functools
import threading

import triton  # noqa: F401  (the one ImportError this package may raise: triton is missing)

import torch

from .. import backends, ops
from . import margin_lse, margin_lse_backward
from .problem import INTERPRETED

__all__ = ["INTERPRETED"]

_lib = torch.library.Library("margin", "FRAGMENT")

#: Serializes interpreted kernel calls (see "Threads" above); None when compiled. Reentrant,
#: in case a kernel wrapper ever calls the other op.
_INTERPRETER_LOCK = threading.RLock() if INTERPRETED else None


def _serialized(kernel):
    """``kernel`` run under :data:`_INTERPRETER_LOCK` when interpreted; as is when compiled."""
    if _INTERPRETER_LOCK is None:
        return kernel

    @functools.wraps(kernel)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return kernel(*args, **kwargs)
    return locked


def _define_twin(original: str, name: str, kernel) -> None:
    """Defines margin::<name> with the schema of margin::<original>, kernel for CUDA and CPU."""
    schema = str(getattr(torch.ops.margin, original).default._schema)  # "margin::<original>(...) -> ..."
    _lib.define(name + schema[schema.index("("):])
    kernel = _serialized(kernel)
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
