"""What both passes derive on the host before launching kernels (the CPU kernel's ``Problem``).

Shapes: x (N, D), weight (R, D) in float32 / bfloat16 / float16 / float64, any strides;
labels (N,) int64; class_index (C,) int64 or None; hard_threshold, hard_t (N,) floating or
None. C = R / K (K = subcenters), or class_index's length. ACC, the accumulation dtype, is
float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from triton.runtime.interpreter import InterpretedFunction

from .. import backends, checks, spec
from .margin import KINDS, host_params, target_margin

#: True when TRITON_INTERPRET was set as the kernels were defined: they then run on CPU tensors.
INTERPRETED = isinstance(target_margin, InterpretedFunction)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Problem(NamedTuple):
    x: torch.Tensor           #: (N, D) input dtype, as given
    weight: torch.Tensor      #: (R, D) input dtype, as given
    labels: torch.Tensor      #: (N,) int64, contiguous
    num_classes: int          #: C
    x_norm: torch.Tensor      #: (N,) ACC: ‖x_i‖
    inv_x_norm: torch.Tensor  #: (N,) ACC: 1 / max(‖x_i‖, NORM_EPS)
    scale: torch.Tensor       #: (N,) ACC: s_i = s, or ‖x_i‖ with feature_scale
    #: the kernels' option pointers: class_index (C,) int64, hard_threshold, hard_t (N,) ACC,
    #: all contiguous; an absent option's is a tensor its kernels never read (constexprs)
    options: tuple
    margin_args: tuple        #: the kernels' margin scalars (margin.host_params)
    constexprs: dict          #: MARGIN, DETACH, INPUT_PRECISION, UPCAST, SUBCENTERS, INDEXED, HARD

    @property
    def acc(self) -> torch.dtype:
        return self.scale.dtype

    def strides(self) -> tuple:
        """(stride_xn, stride_xd, stride_wc, stride_wd), in elements."""
        return (*self.x.stride(), *self.weight.stride())


def _check(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, primitive_args: tuple, backward_rows):
    """The check layer's rules (the backward's when ``backward_rows`` = (grad_lse,
    grad_target_logit, grad_nontarget_sum, lse) is given), then what only these kernels
    need: a dtype they compile for, and a device they run on."""
    if backward_rows is None:
        checks.check_primitive(x, weight, labels, *primitive_args)
    else:
        *grads, lse = backward_rows
        checks.check_primitive_backward(*grads, x, weight, labels, lse, *primitive_args)
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton kernels take x of one dtype among {', '.join(map(str, DTYPES))}, got {x.dtype}")
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton kernels run on CPU tensors only under the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before margin_ops is first imported")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton kernels run on cuda tensors, got {x.device}")


def input_precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    """tl.dot's input precision: float32 may be TF32 (allow_tf32 None: as
    :func:`margin_ops.backends.tf32_allowed` says now)."""
    allow = backends.tf32_allowed() if allow_tf32 is None else allow_tf32
    return "tf32" if dtype == torch.float32 and allow else "ieee"


def prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad,
            allow_tf32=None, subcenters=1, class_index=None, hard_threshold=None, hard_t=None, *,
            backward_rows=None) -> Problem:
    """Checks the arguments of margin_lse (of margin_lse_backward with ``backward_rows``,
    see :func:`_check`) and computes the per-row prologue (O(N·D))."""
    primitive_args = (margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad, allow_tf32, subcenters,
                      class_index, hard_threshold, hard_t)
    _check(x, weight, labels, primitive_args, backward_rows)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_norm = x.to(acc).norm(dim=1)
    inv_x_norm = x_norm.clamp_min(spec.NORM_EPS).reciprocal()
    scale = x_norm if feature_scale else torch.full_like(x_norm, s)
    labels = labels.contiguous()
    hard = hard_threshold is not None
    options = (labels if class_index is None else class_index.contiguous(),
               *((t.to(acc).contiguous() for t in (hard_threshold, hard_t)) if hard else (scale, scale)))
    constexprs = dict(
        MARGIN=KINDS[margin],
        DETACH=bool(detach_margin_grad),
        INPUT_PRECISION=input_precision(x.dtype, allow_tf32),
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        SUBCENTERS=subcenters,
        INDEXED=class_index is not None,
        HARD=hard,
    )
    return Problem(x, weight, labels, checks.num_classes(weight, subcenters, class_index), x_norm, inv_x_norm,
                   scale, options, host_params(margin, m1, m2, m3, lamb), constexprs)


def class_splits(row_blocks: int, class_blocks: int, device: torch.device, max_splits: int) -> tuple[int, int]:
    """Cuts the class blocks into consecutive groups, one program per (row block, group).

    Enough groups to give a GPU ~4 programs per SM, at most ``max_splits`` (the
    per-group partial buffers grow with their number). The interpreter runs programs
    one after another, so there a few groups do. Returns (groups, class blocks per group);
    no group is empty.
    """
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" and not INTERPRETED else 4
    splits = max(1, min(class_blocks, max_splits, -(-programs // row_blocks)))
    per_split = -(-class_blocks // splits)
    return -(-class_blocks // per_split), per_split


def device_guard(t: torch.Tensor):
    """Makes t's GPU the current one while kernels launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
