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


def num_classes(weight: torch.Tensor, subcenters: int = 1, class_index=None):
    """C: the classes the primitive sees (class_index's length, else weight's rows / K)."""
    return class_index.shape[0] if class_index is not None else weight.shape[0] // subcenters


def check_loss_inputs(x, weight, labels, reduction: str, ignore_index: int, subcenters: int = 1) -> None:
    """Everything a loss checks beyond its margin's parameters (those are the registry's)."""
    spec.check_choice("reduction", reduction, spec.REDUCTIONS)
    check_tensors(x, weight, labels)
    check_subcenters(weight, subcenters)
    check_labels(labels, num_classes(weight, subcenters), ignore_index)


def check_subcenters(weight: torch.Tensor, subcenters) -> None:
    """K >= 1 sub-centers per class: weight has C·K rows."""
    spec.check_integer("subcenters", subcenters, 1)
    expect(weight.shape[0] % subcenters == 0, ValueError,
           lambda: f"weight must have num_classes·subcenters rows: {weight.shape[0]} rows is not a multiple of "
                   f"subcenters={subcenters}")


def check_class_index(class_index, weight: torch.Tensor, subcenters: int) -> None:
    """class_index (C,) int64 on weight's device: distinct classes of weight, in [0, rows / K).

    The values are checked eagerly (a host sync on CUDA); while torch.compile traces or a
    CUDA graph captures, as an asynchronous assertion in the graph.
    """
    if not isinstance(class_index, torch.Tensor):
        raise TypeError(f"class_index must be a tensor or None, got {type(class_index).__name__}")
    expect(class_index.dim() == 1 and class_index.shape[0] >= 1, ValueError,
           lambda: f"class_index must be a non-empty 1-D tensor (C,), got {_shape(class_index)}")
    expect(class_index.dtype == torch.int64, TypeError, lambda: f"class_index must be int64, got {class_index.dtype}")
    expect(class_index.device == weight.device, ValueError,
           lambda: f"class_index must be on weight's device {weight.device}, got {class_index.device}")
    classes = weight.shape[0] // subcenters
    out_of_range = (class_index < 0) | (class_index >= classes)
    ordered = class_index.sort().values
    repeated = ordered[1:] == ordered[:-1]
    range_message = f"class_index must lie in [0, {classes}) (the classes of weight)"
    distinct_message = "class_index must not repeat a class (each is read and written in place once)"
    if is_traced(class_index) or (class_index.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(~out_of_range.any(), range_message)
        torch._assert_async(~repeated.any(), distinct_message)
        return
    if out_of_range.any():
        raise ValueError(f"{range_message}; got {class_index[out_of_range][0].item()}")
    if repeated.any():
        raise ValueError(f"{distinct_message}; got {ordered[1:][repeated][0].item()} twice")


def check_hard_examples(hard_threshold, hard_t, x: torch.Tensor) -> None:
    """CurricularFace's per-row threshold and t: both (N,) floating, or both None."""
    expect((hard_threshold is None) == (hard_t is None), ValueError,
           lambda: "hard_threshold and hard_t must be given together (or neither)")
    if hard_threshold is not None:
        check_per_row(hard_threshold, "hard_threshold", x)
        check_per_row(hard_t, "hard_t", x)


def check_primitive(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale,
                    detach_margin_grad, allow_tf32=None, subcenters=1, class_index=None,
                    hard_threshold=None, hard_t=None) -> None:
    """The arguments of ``margin_lse``: the tensors, the margin's rules, then the options.
    Labels outside [0, C) are allowed here: such a row has no target."""
    check_tensors(x, weight, labels)
    spec.check_primitive_margin(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad)
    if allow_tf32 is not None and not isinstance(allow_tf32, bool):
        raise ValueError(f"allow_tf32 must be a bool or None, got {allow_tf32!r}")
    check_subcenters(weight, subcenters)
    if class_index is not None:
        check_class_index(class_index, weight, subcenters)
    check_hard_examples(hard_threshold, hard_t, x)


def check_per_row(t, name: str, x: torch.Tensor) -> None:
    """A per-row (N,) floating tensor (the backward's gradients and lse, hard_threshold, hard_t)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    expect(t.dim() == 1 and t.shape[0] == x.shape[0],
                       ValueError, lambda: f"{name} must be (N,) with N = x.shape[0] = {x.shape[0]}, got {_shape(t)}")
    expect(t.is_floating_point(), TypeError, lambda: f"{name} must be floating point, got {t.dtype}")
    expect(t.device == x.device, ValueError, lambda: f"{name} must be on x's device {x.device}, got {t.device}")


def check_primitive_backward(grad_lse, grad_target_logit, grad_nontarget_sum, x, weight, labels, lse,
                             *primitive_args) -> None:
    """The arguments of ``margin_lse_backward``."""
    check_primitive(x, weight, labels, *primitive_args)
    for name, t in (("grad_lse", grad_lse), ("grad_target_logit", grad_target_logit),
                    ("grad_nontarget_sum", grad_nontarget_sum), ("lse", lse)):
        check_per_row(t, name, x)
