"""The Python half of ``torch.ops.margin`` (the schemas are in csrc/margin.cpp).

* Public losses ``arcface``, ``cosface``, ``combined``, ``sphereface``, ``adaptive``,
  ``curricular``: composite kernels that check the arguments, run the fused primitive of
  the current backend and reduce. ``adaptive`` applies its per-row margins to the target
  logits the primitive returns (margin "external": O(N) work, differentiable in m_angle and
  m_add); ``curricular`` computes each row's target cosine first (O(N·D)) for the
  threshold of its hard examples.
* Fused primitive ``margin_lse``: fake kernel, autograd (backward = ``margin_lse_backward``),
  and autocast (inputs cast to the autocast dtype, like ``F.linear``; statistics and
  losses stay float32).

Shapes: x (N, D), weight (C, D), labels (N,) int64; see :mod:`margin_ops.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends, checks, reference
from .spec import LOSSES, OP_SPECS, MarginSpec


class MarginOutput(NamedTuple):
    """Result of :func:`with_stats`."""

    loss: torch.Tensor  #: the reduced loss, as the op returns it
    lse: torch.Tensor   #: (N,) float32/float64: log-sum-exp of each row's logits (margin applied)
    pred: torch.Tensor  #: (N,) int64: class with the largest cosine (margin-free top-1)


class _Signature(NamedTuple):
    """A loss op's argument names and defaults, read from its schema once, as plain data
    (torch.compile traces :func:`with_stats` through it; a schema object it cannot)."""

    name: str
    names: tuple
    defaults: dict

    @classmethod
    def of(cls, name: str) -> "_Signature":
        schema = getattr(torch.ops.margin, name).default._schema
        return cls(name, tuple(a.name for a in schema.arguments),
                   {a.name: a.default_value for a in schema.arguments if a.has_default_value()})

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Argument name -> value, defaults filled in."""
        if len(args) > len(self.names):
            raise TypeError(f"{self.name}() takes {len(self.names)} arguments, got {len(args)}")
        unknown = set(kwargs) - set(self.names)
        if unknown:
            raise TypeError(f"{self.name}() got unexpected keyword argument(s) {sorted(unknown)}")
        bound = dict(zip(self.names, args))
        for name in self.names[len(args):]:
            if name in kwargs:
                bound[name] = kwargs[name]
            elif name in self.defaults:
                bound[name] = self.defaults[name]
            else:
                raise TypeError(f"{self.name}() missing required argument {name!r}")
        return bound


_SIGNATURES = {name: _Signature.of(name) for name in LOSSES}


def margin_loss(x, weight, labels, spec: MarginSpec, reduction="mean", ignore_index=-100,
                hard_threshold=None, hard_t=None) -> MarginOutput:
    """Loss of ``spec`` through the current backend, with the per-row statistics.

    Returns a :class:`MarginOutput`: the loss (float32 for 16-bit inputs, else x's dtype)
    reduced as ``reduction`` says, and lse / pred (N,) from the same pass.
    """
    checks.check_loss_inputs(x, weight, labels, reduction, ignore_index, spec.subcenters)
    return _fused_loss(x, weight, labels, spec, reduction, ignore_index, hard_threshold, hard_t)


def _fused_loss(x, weight, labels, spec: MarginSpec, reduction, ignore_index, hard_threshold=None,
                hard_t=None) -> MarginOutput:
    """:func:`margin_loss` on arguments its caller has checked."""
    lse_fn = backends.margin_lse_for(x.device)
    lse, target_logit, _, pred, nontarget_sum = lse_fn(
        x, weight, labels, *spec.primitive_args(), None, spec.subcenters, None, hard_threshold, hard_t)
    loss = reference.loss_from_lse(lse, target_logit, labels, spec.gamma, reduction, ignore_index,
                                   spec.label_smoothing, nontarget_sum, checks.num_classes(weight, spec.subcenters))
    return MarginOutput(loss, lse, pred)


def _check_row_margin(t, name: str, x: torch.Tensor) -> None:
    checks.check_per_row(t, name, x)
    checks.expect(t.dtype != torch.float64 or x.dtype == torch.float64, TypeError,
                  lambda: f"{name} must not be float64 when x is {x.dtype} (the losses are computed in float32)")


def adaptive_loss(x, weight, labels, m_angle, m_add, spec: MarginSpec, angle_mode: str, reduction="mean",
                  ignore_index=-100) -> MarginOutput:
    """``adaptive``: the primitive without a margin, then the per-row target margin
    (:func:`margin_ops.reference.adaptive_target`) folded into its log-sum-exp."""
    checks.check_loss_inputs(x, weight, labels, reduction, ignore_index)
    _check_row_margin(m_angle, "m_angle", x)
    _check_row_margin(m_add, "m_add", x)
    lse_fn = backends.margin_lse_for(x.device)
    lse_others, scaled_cos, _, pred, nontarget_sum = lse_fn(x, weight, labels, *spec.primitive_args())
    acc = lse_others.dtype
    has_target = labels != ignore_index
    phi = reference.adaptive_target(scaled_cos / spec.s, m_angle.to(acc), m_add.to(acc), angle_mode)
    target_logit = torch.where(has_target, spec.s * phi, 0)
    lse = torch.logaddexp(lse_others, torch.where(has_target, target_logit, -torch.inf))
    loss = reference.loss_from_lse(lse, target_logit, labels, 0.0, reduction, ignore_index, spec.label_smoothing,
                                   nontarget_sum, weight.shape[0])
    return MarginOutput(loss, lse, pred)


def curricular_loss(x, weight, labels, t, spec: MarginSpec, reduction="mean", ignore_index=-100) -> MarginOutput:
    """``curricular``: each row's target cosine (one dot product per row), its threshold
    cos(θ_iy + m), then the primitive with ArcFace's target and the hard-example modulation."""
    checks.check_loss_inputs(x, weight, labels, reduction, ignore_index)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor, got {type(t).__name__}")
    checks.expect(t.numel() == 1 and t.dim() <= 1 and t.is_floating_point(), ValueError,
                  lambda: f"t must be a 0-d (or one-element) floating tensor, got {t.dtype} of shape {list(t.shape)}")
    checks.expect(t.device == x.device, ValueError, lambda: f"t must be on x's device {x.device}, got {t.device}")
    acc = reference.accumulation_dtype(x.dtype)
    has_target = labels != ignore_index
    c_target = reference.target_cosines(x, weight, labels, has_target)
    with torch.no_grad():
        # 2 > every cosine: a row without a target has no hard examples
        threshold = torch.where(has_target, reference.curricular_threshold(c_target, spec.m2), 2.0)
        hard_t = t.detach().reshape(()).to(acc).expand(x.shape[0]).contiguous()
    return _fused_loss(x, weight, labels, spec, reduction, ignore_index, threshold, hard_t)


def _run_loss(name: str, a: dict) -> MarginOutput:
    """The loss op ``name`` on its bound arguments ``a``."""
    spec = OP_SPECS[name](a)
    if name == "adaptive":
        return adaptive_loss(a["x"], a["weight"], a["labels"], a["m_angle"], a["m_add"], spec, a["angle_mode"],
                             a["reduction"], a["ignore_index"])
    if name == "curricular":
        return curricular_loss(a["x"], a["weight"], a["labels"], a["t"], spec, a["reduction"], a["ignore_index"])
    return margin_loss(a["x"], a["weight"], a["labels"], spec, a["reduction"], a["ignore_index"])


_lib = torch.library.Library("margin", "FRAGMENT")


def _register_loss(name: str):
    def composite(*args):
        return _run_loss(name, _SIGNATURES[name].bind(args, {})).loss

    _lib.impl(name, composite, "CompositeImplicitAutograd")


#: What :func:`with_stats` accepts as ``op``: a loss's name, its OpOverloadPacket or default
#: overload (looked up, not parsed, so that torch.compile can trace the call).
_LOSS_NAMES = {key: name for name in LOSSES
               for key in (name, getattr(torch.ops.margin, name), getattr(torch.ops.margin, name).default)}


def with_stats(op, *args, **kwargs) -> MarginOutput:
    """Runs one of the losses and also returns its per-row lse and top-1 class.

    ``op`` is ``torch.ops.margin.arcface`` (or ``cosface``, ``combined``, ``sphereface``,
    ``adaptive``, ``curricular``), or its name; the other arguments are the op's. Example::

        loss, lse, pred = margin_ops.with_stats(torch.ops.margin.arcface, x, w, y, s=64.0)
        accuracy = (pred == y).float().mean()
    """
    name = _LOSS_NAMES.get(op) if isinstance(op, (str, torch._ops.OpOverloadPacket, torch._ops.OpOverload)) else None
    if name is None:
        raise ValueError(f"op must be one of {', '.join(LOSSES)} (or torch.ops.margin.<name>), got {op!r}")
    return _run_loss(name, _SIGNATURES[name].bind(args, kwargs))


# ---------------------------------------------------------------------------------------
# The fused primitive: fake kernels, autograd, autocast. `register_primitive` is also used
# for the Triton twin of the op, which shares this schema.


def _lse_fake(x, weight, labels, *primitive_args):
    checks.check_primitive(x, weight, labels, *primitive_args)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    row = x.new_empty(n, dtype=acc)
    return row, torch.empty_like(row), torch.empty_like(row), x.new_empty(n, dtype=torch.int64), torch.empty_like(row)


def _lse_backward_fake(grad_lse, grad_target_logit, grad_nontarget_sum, x, weight, labels, lse, *primitive_args):
    checks.check_primitive_backward(grad_lse, grad_target_logit, grad_nontarget_sum, x, weight, labels, lse,
                                    *primitive_args)
    return torch.empty_like(x), torch.empty_like(weight)


def _autocast_inputs(x, weight, device_type: str):
    """x and weight as autocast computes them: cast to its dtype like F.linear (float64,
    and tensors of another device, untouched)."""
    if x.dtype != torch.float64 and x.device.type == device_type:
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), weight.to(dtype)
    return x, weight


def _autocast_kernel(op, device_type: str):
    key = torch._C.DispatchKey.AutocastCPU if device_type == "cpu" else torch._C.DispatchKey.AutocastCUDA

    def kernel(x, weight, labels, *margin_args):
        x, weight = _autocast_inputs(x, weight, device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(x, weight, labels, *margin_args)

    return key, kernel


def _reference_margin_lse(x, weight, labels, *margin_args):
    """The "reference" backend's primitive: margin_ops.reference behind the same checks and
    autocast rule as the custom ops' primitives."""
    checks.check_primitive(x, weight, labels, *margin_args)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x, weight = _autocast_inputs(x, weight, device_type)
        with torch.autocast(device_type, enabled=False):
            return reference.margin_lse(x, weight, labels, *margin_args)
    return reference.margin_lse(x, weight, labels, *margin_args)


def register_primitive(lib: torch.library.Library, forward_name: str, backward_name: str):
    """Fake kernels, autograd and autocast for a margin_lse-shaped op pair in namespace margin."""
    forward = getattr(torch.ops.margin, forward_name).default
    backward = getattr(torch.ops.margin, backward_name).default
    torch.library.register_fake(f"margin::{forward_name}", _lse_fake, lib=lib)
    torch.library.register_fake(f"margin::{backward_name}", _lse_backward_fake, lib=lib)

    def setup_context(ctx, inputs, output):
        x, weight, labels, *margin_args, allow_tf32, subcenters, class_index, hard_threshold, hard_t = inputs
        ctx.save_for_backward(x, weight, labels, output[0], class_index, hard_threshold, hard_t)
        # The backward recomputes the cosines: with the forward's TF32 choice, not with
        # whatever the float32 matmul precision is when it runs.
        ctx.margin_args = (*margin_args, backends.tf32_allowed() if allow_tf32 is None else allow_tf32, subcenters)
        ctx.mark_non_differentiable(output[2], output[3])

    def backward_fn(ctx, grad_lse, grad_target_logit, _grad_max_cos, _grad_pred, grad_nontarget_sum):
        x, weight, labels, lse, class_index, hard_threshold, hard_t = ctx.saved_tensors
        zero = torch.zeros_like(lse)
        grads = [zero if g is None else g for g in (grad_lse, grad_target_logit, grad_nontarget_sum)]
        grad_x, grad_weight = backward(*grads, x, weight, labels, lse, *ctx.margin_args, class_index,
                                       hard_threshold, hard_t)
        return (grad_x, grad_weight) + (None,) * (len(ctx.margin_args) + 4)

    torch.library.register_autograd(f"margin::{forward_name}", backward_fn, setup_context=setup_context, lib=lib)
    for device_type in ("cpu", "cuda"):
        key, kernel = _autocast_kernel(forward, device_type)
        forward.py_impl(key)(kernel)  # seen by torch.compile's tracing
        lib.impl(forward_name, kernel, key.name)


register_primitive(_lib, "margin_lse", "margin_lse_backward")
backends.register("reference", backends.Backend(_reference_margin_lse, lambda: ("cpu", "cuda"), lambda: None))
for _name in LOSSES:
    _register_loss(_name)
