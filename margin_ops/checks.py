"""The user-facing argument checks of every op, written once.

Each check names the argument and says what was expected. One function serves the eager
call (a ValueError / TypeError at once), dynamo tracing a caller (the same test on the
traced shapes, guarded), and the fake kernels that torch.compile runs on symbolic shapes
(``torch._check_value`` / ``torch._check_type``: the same message, raised while the graph
is built): see :func:`expect`.

Callers: the public losses (:mod:`margin_ops.ops`), the fake kernels of the primitive
pair, and the Triton backend. The C++ kernels assert the same rules with the same
messages (``csrc/margin_checks.h``) for callers of ``torch.ops.margin.margin_lse`` who
reach them directly; the margin-parameter rules are the registry's
(:func:`margin_ops.spec.check_primitive_margin`).

Shapes: x (N, D), weight (C, D), labels (N,) int64; the backward's per-row tensors (N,).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import spec


def _shape(t) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def expect(condition, error: type, message) -> None:
    """Raises ``error(message())`` unless ``condition``.

    A symbolic condition (a fake kernel on dynamic shapes) goes to torch._check_value /
    _check_type, which record it as a runtime assertion of the graph; dynamo, which cannot
    pass a closure to those, tests it as a plain ``if`` (installing a guard).
    """
    if isinstance(condition, torch.SymBool) and not torch.compiler.is_compiling():
        (torch._check_type if error is TypeError else torch._check_value)(condition, message)
    elif not condition:
        raise error(message())


def check_tensors(x, weight, labels) -> None:
    """Shapes, dtypes and devices of x (N, D), weight (C, D) and labels (N,)."""
    for name, t in (("x", x), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    expect(x.dim() == 2, ValueError, lambda: f"x must be a 2-D tensor (N, D), got {_shape(x)}")
    expect(x.is_floating_point(), TypeError, lambda: f"x must be floating point, got {x.dtype}")
    expect(x.shape[1] >= 1, ValueError, lambda: f"x must have at least one feature column, got {_shape(x)}")
    expect(weight.dim() == 2 and weight.shape[1] == x.shape[1],
                       ValueError, lambda: f"weight must be (C, D) with D = x.shape[1] = {x.shape[1]}, got {_shape(weight)}"
                               " (classic code keeps W as (D, C): pass W.t())")
    expect(weight.shape[0] >= 1, ValueError, lambda: "weight must have at least one class (row), got C = 0")
    expect(weight.dtype == x.dtype, TypeError, lambda: f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    expect(labels.dim() == 1 and labels.shape[0] == x.shape[0],
                       ValueError, lambda: f"labels must be (N,) with N = x.shape[0] = {x.shape[0]}, got {_shape(labels)}")
    expect(labels.dtype == torch.int64, TypeError, lambda: f"labels must be int64, got {labels.dtype}")
    for name, t in (("weight", weight), ("labels", labels)):
        expect(t.device == x.device, ValueError, lambda: f"{name} must be on x's device {x.device}, got {t.device}")


def is_traced(t: torch.Tensor) -> bool:
    """True while torch.compile / make_fx trace: the data is not there to look at."""
    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every label lies in [0, num_classes) or equals ignore_index.

    Eagerly this is a clear ValueError (a host sync on CUDA); while torch.compile traces
    or a CUDA graph captures, the data is not there, so the check becomes an asynchronous
    assertion in the graph.
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    message = f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
    if is_traced(labels) or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(f"{message}; got {labels[bad][0].item()}")


def check_loss_inputs(x, weight, labels, reduction: str, ignore_index: int) -> None:
    """Everything a loss checks beyond its margin's parameters (those are the registry's)."""
    spec.check_choice("reduction", reduction, spec.REDUCTIONS)
    check_tensors(x, weight, labels)
    check_labels(labels, weight.shape[0], ignore_index)


def check_primitive(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale,
                    detach_margin_grad) -> None:
    """The arguments of ``margin_lse``: the tensors, then the margin's rules. Labels outside
    [0, C) are allowed here: such a row has no target."""
    check_tensors(x, weight, labels)
    spec.check_primitive_margin(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad)


def check_per_row(t, name: str, x: torch.Tensor) -> None:
    """A per-row (N,) floating tensor of the backward (grad_lse, grad_target_logit, lse)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    expect(t.dim() == 1 and t.shape[0] == x.shape[0],
                       ValueError, lambda: f"{name} must be (N,) with N = x.shape[0] = {x.shape[0]}, got {_shape(t)}")
    expect(t.is_floating_point(), TypeError, lambda: f"{name} must be floating point, got {t.dtype}")
    expect(t.device == x.device, ValueError, lambda: f"{name} must be on x's device {x.device}, got {t.device}")


def check_primitive_backward(grad_lse, grad_target_logit, x, weight, labels, lse, *margin_args) -> None:
    """The arguments of ``margin_lse_backward``."""
    check_primitive(x, weight, labels, *margin_args)
    for name, t in (("grad_lse", grad_lse), ("grad_target_logit", grad_target_logit), ("lse", lse)):
        check_per_row(t, name, x)
