"""The Python half of ``torch.ops.margin`` (the schemas are in csrc/margin.cpp).

* Public losses ``arcface``, ``cosface``, ``combined``, ``sphereface``: composite kernels
  that check the arguments, run the fused primitive of the current backend and reduce.
* Fused primitive ``margin_lse``: fake kernel, autograd (backward = ``margin_lse_backward``),
  and autocast (inputs cast to the autocast dtype, like ``F.linear``; statistics and
  losses stay float32).

Shapes: x (N, D), weight (C, D), labels (N,) int64; see :mod:`margin_ops.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import backends, reference
from .reference import MarginSpec

LOSSES = ("arcface", "cosface", "combined", "sphereface")

# Public op name -> builder of its MarginSpec from the op's bound arguments.
_SPEC_BUILDERS = {
    "arcface": lambda a: reference.arcface_spec(a["s"], a["m"], a["easy_margin"], a["margin_grad"]),
    "cosface": lambda a: reference.cosface_spec(a["s"], a["m"]),
    "combined": lambda a: reference.combined_spec(a["s"], a["m1"], a["m2"], a["m3"], a["margin_grad"]),
    "sphereface": lambda a: reference.sphereface_spec(a["m"], a["lamb"], a["s"], a["gamma"]),
}


class MarginOutput(NamedTuple):
    """Result of :func:`with_stats`."""

    loss: torch.Tensor  #: the reduced loss, as the op returns it
    lse: torch.Tensor   #: (N,) float32/float64: log-sum-exp of each row's logits (margin applied)
    pred: torch.Tensor  #: (N,) int64: class with the largest cosine (margin-free top-1)


def _bind(schema: torch.FunctionSchema, args: tuple, kwargs: dict) -> dict:
    """Argument name -> value, defaults filled in from the schema."""
    names = [a.name for a in schema.arguments]
    if len(args) > len(names):
        raise TypeError(f"{schema.name}() takes {len(names)} arguments, got {len(args)}")
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"{schema.name}() got unexpected keyword argument(s) {sorted(unknown)}")
    bound = dict(zip(names, args))
    for arg in schema.arguments[len(args):]:
        if arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise TypeError(f"{schema.name}() missing required argument {arg.name!r}")
    return bound


def _is_traced(t: torch.Tensor) -> bool:
    """True while torch.compile / make_fx trace: the data is not there to look at."""
    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


def check_inputs(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Raises a ValueError/TypeError naming the bad argument (shapes, dtypes, devices, labels)."""
    check_tensors(x, weight, labels)
    check_labels(labels, weight.shape[0], ignore_index)


def check_tensors(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """Shapes, dtypes and devices of x (N, D), weight (C, D) and labels (N,)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (N, D), got {_describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one feature column, got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (C, D) with D = x.shape[1] = {x.shape[1]}, got {_describe(weight)}"
                         " (classic code keeps W as (D, C): pass W.t())")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class (row), got C = 0")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be (N,) with N = x.shape[0] = {x.shape[0]}, got {_describe(labels)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """Every label lies in [0, num_classes) or equals ignore_index.

    Eagerly this is a clear ValueError (a host sync on CUDA); while torch.compile traces
    or a CUDA graph captures, the data is not there, so the check becomes an asynchronous
    assertion in the graph.
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    message = f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
    if _is_traced(labels) or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(f"{message}; got {labels[bad][0].item()}")


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def margin_loss(x, weight, labels, spec: MarginSpec, reduction="mean", ignore_index=-100):
    """Loss of ``spec`` through the current backend, with the per-row statistics.

    Returns a :class:`MarginOutput`: the loss (float32 for 16-bit inputs, else x's dtype)
    reduced as ``reduction`` says, and lse / pred (N,) from the same pass.
    """
    reference._check_choice("reduction", reduction, reference.REDUCTIONS)
    check_inputs(x, weight, labels, ignore_index)
    lse_fn = backends.margin_lse_for(x.device)
    lse, target_logit, _, pred = lse_fn(x, weight, labels, *spec.primitive_args())
    loss = reference.loss_from_lse(lse, target_logit, labels, spec.gamma, reduction, ignore_index)
    return MarginOutput(loss, lse, pred)


_lib = torch.library.Library("margin", "FRAGMENT")


def _register_loss(name: str):
    op = getattr(torch.ops.margin, name).default

    def composite(*args):
        a = _bind(op._schema, args, {})
        spec = _SPEC_BUILDERS[name](a)
        return margin_loss(a["x"], a["weight"], a["labels"], spec, a["reduction"], a["ignore_index"]).loss

    _lib.impl(name, composite, "CompositeImplicitAutograd")


def with_stats(op, *args, **kwargs) -> MarginOutput:
    """Runs one of the losses and also returns its per-row lse and top-1 class.

    ``op`` is ``torch.ops.margin.arcface`` (or ``cosface``, ``combined``, ``sphereface``),
    or its name; the other arguments are the op's. Example::

        loss, lse, pred = margin_ops.with_stats(torch.ops.margin.arcface, x, w, y, s=64.0)
        accuracy = (pred == y).float().mean()
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", "").split(".")[0]
    if name not in _SPEC_BUILDERS:
        raise ValueError(f"op must be one of {', '.join(LOSSES)} (or torch.ops.margin.<name>), got {op!r}")
    a = _bind(getattr(torch.ops.margin, name).default._schema, args, kwargs)
    return margin_loss(a["x"], a["weight"], a["labels"], _SPEC_BUILDERS[name](a), a["reduction"],
                       a["ignore_index"])


# ---------------------------------------------------------------------------------------
# The fused primitive: fake kernels, autograd, autocast. `register_primitive` is also used
# for the Triton twin of the op, which shares this schema.


def _lse_fake(x, weight, labels, *margin_args):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    row = x.new_empty(n, dtype=acc)
    return row, torch.empty_like(row), torch.empty_like(row), x.new_empty(n, dtype=torch.int64)


def _lse_backward_fake(grad_lse, grad_target_logit, x, weight, labels, lse, *margin_args):
    return torch.empty_like(x), torch.empty_like(weight)


def _autocast_kernel(op, device_type: str):
    key = torch._C.DispatchKey.AutocastCPU if device_type == "cpu" else torch._C.DispatchKey.AutocastCUDA

    def kernel(x, weight, labels, *margin_args):
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype != torch.float64 and x.device.type == device_type:
            x, weight = x.to(dtype), weight.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(x, weight, labels, *margin_args)

    return key, kernel


def register_primitive(lib: torch.library.Library, forward_name: str, backward_name: str):
    """Fake kernels, autograd and autocast for a margin_lse-shaped op pair in namespace margin."""
    forward = getattr(torch.ops.margin, forward_name).default
    backward = getattr(torch.ops.margin, backward_name).default
    torch.library.register_fake(f"margin::{forward_name}", _lse_fake, lib=lib)
    torch.library.register_fake(f"margin::{backward_name}", _lse_backward_fake, lib=lib)

    def setup_context(ctx, inputs, output):
        x, weight, labels, *margin_args, allow_tf32 = inputs
        ctx.save_for_backward(x, weight, labels, output[0])
        # The backward recomputes the cosines: with the forward's TF32 choice, not with
        # whatever the float32 matmul precision is when it runs.
        ctx.margin_args = (*margin_args, backends.tf32_allowed() if allow_tf32 is None else allow_tf32)
        ctx.mark_non_differentiable(output[2], output[3])

    def backward_fn(ctx, grad_lse, grad_target_logit, _grad_max_cos, _grad_pred):
        x, weight, labels, lse = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_target_logit = torch.zeros_like(lse) if grad_target_logit is None else grad_target_logit
        grad_x, grad_weight = backward(grad_lse, grad_target_logit, x, weight, labels, lse, *ctx.margin_args)
        return (grad_x, grad_weight, None) + (None,) * len(ctx.margin_args)

    torch.library.register_autograd(f"margin::{forward_name}", backward_fn, setup_context=setup_context, lib=lib)
    for device_type in ("cpu", "cuda"):
        key, kernel = _autocast_kernel(forward, device_type)
        forward.py_impl(key)(kernel)  # seen by torch.compile's tracing
        lib.impl(forward_name, kernel, key.name)


register_primitive(_lib, "margin_lse", "margin_lse_backward")
for _name in LOSSES:
    _register_loss(_name)
