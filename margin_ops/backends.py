"""Which implementation of the fused primitive the ops use.

Backends:

* ``"cpu"``: the C++ kernels of ``torch.ops.margin.margin_lse`` for CPU tensors.
* ``"cuda"``: the CUDA C++ kernels, when this install was built with them.
* ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``"reference"``: :mod:`margin_ops.reference`, plain PyTorch with the N x C logits.

By default each device uses its fastest built backend (CPU: ``"cpu"``; CUDA: ``"cuda"``,
else ``"triton"``). ``with margin_ops.backend(name):`` or the environment variable
``MARGIN_OPS_BACKEND`` chooses one explicitly; a backend that cannot run on the
tensors' device is an error, never a silent fallback. Under ``torch.compile`` the backend
in force when the graph is traced is the one compiled in.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, NamedTuple

import torch

from . import reference

ENV_VAR = "MARGIN_OPS_BACKEND"
BACKENDS = ("cpu", "cuda", "triton", "reference")


def tf32_allowed() -> bool:
    """Whether float32 products may use TF32: the setting cuBLAS follows for torch.matmul
    (torch.set_float32_matmul_precision "high"/"medium" sets it too). Read through the
    fp32-precision API where this torch has it: its legacy getters raise once a user has set
    only the new one."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:
        return torch.get_float32_matmul_precision() != "highest"
    if matmul == "none":  # inherits the generic setting
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return matmul == "tf32"


class Backend(NamedTuple):
    #: margin_lse implementation: (x, weight, labels, *margin args, allow_tf32, subcenters, class_index,
    #: hard_threshold, hard_t) -> (lse, target_logit, max_cos, pred, nontarget_sum)
    margin_lse: Callable
    #: device types it runs on, given the current environment
    devices: Callable[[], tuple]
    #: why it is unavailable, or None
    missing: Callable[[], str | None]


#: The CUDA kernels' oldest GPU: they use cp.async and bf16 mma.sync (sm_80).
MIN_CUDA_CAPABILITY = (8, 0)


def _native_missing(device_type: str) -> Callable[[], str | None]:
    def missing():
        if not torch._C._dispatch_has_kernel_for_dispatch_key("margin::margin_lse", device_type.upper()):
            return f"this install has no {device_type.upper()} kernels (see README: building for GPU)"
        if device_type == "cuda" and torch.cuda.is_available() \
                and torch.cuda.get_device_capability() < MIN_CUDA_CAPABILITY:
            major, minor = torch.cuda.get_device_capability()
            return (f"the CUDA kernels need compute capability >= {'.'.join(map(str, MIN_CUDA_CAPABILITY))}; "
                    f"this GPU is {major}.{minor}")
        return None
    return missing


_registry: dict[str, Backend] = {
    "cpu": Backend(lambda *a: torch.ops.margin.margin_lse(*a), lambda: ("cpu",), _native_missing("cpu")),
    "cuda": Backend(lambda *a: torch.ops.margin.margin_lse(*a), lambda: ("cuda",), _native_missing("cuda")),
    # margin_ops.ops installs the reference primitive (behind the checks and autocast rule
    # of the other backends' primitives)
    "reference": Backend(reference.margin_lse, lambda: ("cpu", "cuda"), lambda: None),
    "triton": Backend(None, lambda: (), lambda: "the triton package is not installed"),
}

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("margin_ops_backend", default=None)


def register(name: str, backend: Backend) -> None:
    """Installs an implementation (used by margin_ops.triton when triton imports, and by
    margin_ops.ops for the reference)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    _registry[name] = backend


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")


@contextlib.contextmanager
def backend(name: str):
    """Context manager: the ops use backend ``name`` inside the block."""
    _check_name(name)
    token = _selected.set(name)
    try:
        yield
    finally:
        _selected.reset(token)


def available_backends() -> dict[str, str | None]:
    """{backend: None if usable here, else why not}."""
    return {name: _registry[name].missing() for name in BACKENDS}


def default_backend(device_type: str) -> str:
    """The fastest built backend for a device type ('cpu' or 'cuda')."""
    candidates = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device_type, ())
    for name in candidates:
        if _registry[name].missing() is None and device_type in _registry[name].devices():
            return name
    raise RuntimeError(
        f"margin_ops has no kernels for {device_type} tensors in this install "
        f"({'; '.join(f'{n}: {_registry[n].missing()}' for n in candidates) or 'unsupported device'}). "
        f"Rebuild with nvcc present, install triton, or select backend('reference') explicitly."
    )


# torch.compile evaluates this once while tracing and bakes the answer into the graph.
@torch.compiler.assume_constant_result
def current_backend(device_type: str | torch.device | None = None) -> str:
    """The backend the ops will use for tensors of ``device_type``: ``"cpu"`` or ``"cuda"``
    (a ``torch.device`` or ``"cuda:1"`` works too; only the type matters).

    Without an argument: the device a script's tensors usually live on, ``"cuda"`` when
    ``torch.cuda.is_available()``, else ``"cpu"``. So ``margin_ops.current_backend()`` says
    ``"cuda"`` (or ``"triton"``) on a GPU machine and ``"cpu"`` elsewhere; pass the device
    type to ask about the other one (CPU tensors on a GPU machine use ``"cpu"``).

    Follows ``with margin_ops.backend(name):`` and ``MARGIN_OPS_BACKEND``; raises
    ``RuntimeError`` when the chosen backend, or every candidate, cannot run there.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    elif isinstance(device_type, torch.device) or ":" in device_type:
        device_type = torch.device(device_type).type
    name = _selected.get() or os.environ.get(ENV_VAR) or None
    if name is None:
        return default_backend(device_type)
    _check_name(name)
    chosen = _registry[name]
    why = chosen.missing()
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    if device_type not in chosen.devices():
        hint = " (Triton runs on CPU tensors only under TRITON_INTERPRET=1, set before " \
               "margin_ops is imported)" if name == "triton" and device_type == "cpu" else ""
        raise RuntimeError(f"backend {name!r} cannot run on {device_type} tensors "
                           f"(it runs on: {', '.join(chosen.devices()) or 'nothing here'}){hint}")
    return name


def margin_lse_for(device: torch.device) -> Callable:
    """The margin_lse implementation of the current backend for ``device``."""
    return _registry[current_backend(device.type)].margin_lse
