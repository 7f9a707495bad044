"""Model-parallel margin losses: the classes are sharded over the ranks, W is never gathered.

    import torch.distributed as dist
    from margin_ops import distributed

    head = distributed.PartialFC(512, num_classes, kind="arcface", sample_rate=0.1)
    loss = head(features, labels)   # the loss of the global batch, the same on every rank

Layout. The W ranks q = 0..W-1 of ``group`` hold, in rank order:

* ``x_q``       (N_q, D) floating: this rank's features; N_q may differ per rank and be 0.
* ``labels_q``  (N_q,) int64: their *global* class ids in [0, C), or ``ignore_index``.
* ``weight_q``  (C_q, D), x's dtype: rows [o_q, o_q + C_q) of the full (C, D) class weight,
  o_q = C_0 + … + C_{q−1}; C_q ≥ 1 and may differ per rank (:class:`PartialFC` gives the
  first C mod W ranks one class more).

The global batch is the rows of every rank in rank order: X (N, D), Y (N,), N = Σ N_q.

What one call does, on every rank:

1. The size and argument exchange: one all-gather of a small int64 row per rank (4 sizes,
   an error code and 13 argument values: 18 int64, 144 bytes per rank; on the CPU, or on
   x's GPU for NCCL). It carries (N_q, C_q, D, dtype) — the sizes must be on the host to
   gather uneven batches, so this is the one host synchronization of a step — and the
   argument check, which so costs no collective of its own. Before it, each rank checks its
   own arguments without communicating; the row then holds an error code (which argument
   this rank rejected, 0 if none) and the value of every argument the ranks must pass alike
   (kind, reduction, ignore_index and every margin argument, label_smoothing included).
   After it, every rank sees every rank's status and raises the same way: the rank whose
   argument was invalid raises its own error (prefixed with its rank); the others raise a
   ValueError naming that rank and argument; arguments valid on every rank but different
   between ranks (e.g. ``s``) raise on every rank, naming the argument and each rank's
   value. No rank is left waiting in a collective until the process-group timeout.
2. All-gather of x and labels (padded to max N_q) into X and Y.
3. The fused primitive on this rank's shard for the whole global batch, with labels
   Y − o_r (rows of other shards have no target here): per-row partials
   lse_r, target_logit_r, nontarget_sum_r (N,), each in the accumulation dtype (float64
   for float64 inputs, else float32).
4. All-reduce MAX of lse_r (a stabilizer, no gradient), all-reduce SUM of
   [exp(lse_r − max), target_logit_r, nontarget_sum_r]: lse = max + log Σ_q exp(lse_q − max),
   target_logit = Σ_q target_logit_q and nontarget_sum = Σ_q nontarget_sum_q, the
   single-process statistics of the global batch.
5. :func:`margin_ops.reference.loss_from_lse` on the global batch (label smoothing's mean
   logit is (nontarget_sum + target_logit) / C).

Gradients. Every rank computes the same loss from the same lse and target logit, so the
upstream gradient of the loss is the same on every rank and is the gradient of ONE copy of
the loss. The sum of step 4 therefore back-propagates as the identity (an all-reduce there
would count the loss once per rank); the primitive's backward gives this shard's exact
dL/dweight_r and its share of dL/dX; the all-gather of step 2 back-propagates as a
reduce-scatter that sums the shares of every shard and hands each rank its own rows. So
x_r.grad and weight_r.grad are exactly the slices of the single-process gradients of the
global loss. Collectives run in backward too: every rank must run the same backward.

Reductions. ``"mean"`` (over the global batch's rows not ignored) and ``"sum"`` return the
scalar loss of the global batch, identical on every rank: back-propagate it on every rank as
one loss (do not divide it by W, do not all-reduce it). ``"none"`` returns this rank's rows,
(N_r,): the rows that go with ``x``. Its backward all-gathers the rows' gradients first, so
each rank back-propagating its own rows (e.g. ``(w_r * loss_r).sum()``) gives every rank its
slice of the gradient of Σ_q (rank q's objective).

With DDP on the backbone. Keep the head (its weight is a shard, not a replica) outside the
DDP wrapper. The backbone's true gradient of the global loss is the *sum* over ranks of
each rank's backbone gradient (each rank's x_r.grad is its exact share); DDP *averages*,
so the backbone receives 1/W of it while the head shards receive their exact gradients.
To train exactly like one process on the global batch, scale the features' gradient by W
before DDP averages it::

    features = ddp_backbone(images)
    features.register_hook(lambda grad: grad * world_size)   # DDP's mean becomes the sum
    loss = head(features, labels)

(InsightFace's PartialFC_V2 does the same inside its all-gather.) If the features also feed
losses computed per rank in the DDP way, whose gradients DDP should keep averaging, scale
only this loss's share: hook a view that only this loss uses::

    head_input = features.view_as(features)   # its own autograd node
    head_input.register_hook(lambda grad: grad * world_size)
    loss = head(head_input, labels) + other_loss(features)

Without the factor,
SGD trains the backbone with a W times smaller learning rate than the head; optimizers that
normalize each parameter's gradient (Adam, AdamW) are nearly insensitive to it.
"""

from __future__ import annotations

import math
import operator
import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import backends, checks, ops, reference
from . import spec as registry
from .ops import MarginOutput
from .spec import MarginSpec

# torch 2.13 renamed the single-tensor collectives; the old names still exist before it.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

#: The losses that are sharded: one primitive call each (adaptive and curricular also take
#: per-row tensors, which the argument exchange does not carry).
_KINDS = ("arcface", "cosface", "combined", "sphereface")
#: Arguments of the public ops that are not margin arguments here. subcenters is not
#: supported: sub-centers would change the shard's layout (C_r·K rows).
_BATCH_ARGS = ("x", "weight", "labels", "reduction", "ignore_index", "subcenters")
#: Floating dtypes, numbered for the argument check of the size exchange.
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: The arguments every rank must pass alike, in the order of their values in the exchanged row:
#: kind, reduction, ignore_index, then every margin argument of every kind (0 where ``kind``
#: has no such argument).
_SHARED_ARGS = ("kind", "reduction", "ignore_index", "s", "m", "m1", "m2", "m3", "easy_margin", "margin_grad",
                "lamb", "gamma", "label_smoothing")
#: What a rank's error code names: code = 1 + index, 0 when its arguments are valid.
#: ``**margin_kwargs``: a margin argument no kind has, or an error naming none of these.
_CHECKED_ARGS = _SHARED_ARGS + ("x", "weight", "labels", "**margin_kwargs")
#: The exchanged row: these columns, then the values of _SHARED_ARGS.
_ROWS, _CLASSES, _FEATURES, _DTYPE, _ERROR = range(5)
_NONE = struct.unpack("<q", struct.pack("<d", math.nan))[0]  #: the code of None (s of sphereface)


def _margin_arguments(kind: str, margin_kwargs: dict) -> tuple[MarginSpec, dict]:
    """MarginSpec of ``torch.ops.margin.<kind>`` and its margin arguments (name -> value) with
    these margin arguments, the op's defaults for the others (arcface: s, m, easy_margin,
    margin_grad; cosface: s, m; combined: s, m1, m2, m3, margin_grad; sphereface: m, lamb, s,
    gamma; each also label_smoothing)."""
    registry.check_choice("kind", kind, _KINDS)
    signature = ops._SIGNATURES[kind]
    allowed = [name for name in signature.names if name not in _BATCH_ARGS]
    unknown = sorted(set(margin_kwargs) - set(allowed))
    if unknown:
        error = TypeError(f"{kind} takes the margin arguments {allowed}, got unexpected {unknown}")
        error.argument = unknown[0]  # what the argument check reports to the other ranks
        raise error
    bound = signature.bind((None, None, None), margin_kwargs)
    return registry.OP_SPECS[kind](bound), {name: bound[name] for name in allowed}


def _margin_spec(kind: str, margin_kwargs: dict) -> MarginSpec:
    """MarginSpec of ``torch.ops.margin.<kind>`` with these margin arguments (see
    :func:`_margin_arguments`)."""
    return _margin_arguments(kind, margin_kwargs)[0]


def _float_code(value: float) -> int:
    """The bits of float64 ``value`` as an int64: exact, and equal only for equal values."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _encode(name: str, value) -> int:
    """int64 code of a valid value of shared argument ``name`` (see :func:`_decode`)."""
    if name == "kind":
        return _KINDS.index(value)
    if name == "reduction":
        return registry.REDUCTIONS.index(value)
    if name == "margin_grad":
        return registry.MARGIN_GRADS.index(value)
    if name in ("ignore_index", "easy_margin"):
        return int(value)
    return _NONE if value is None else _float_code(float(value))


def _decode(name: str, code: int):
    if name == "kind":
        return _KINDS[code]
    if name == "reduction":
        return registry.REDUCTIONS[code]
    if name == "margin_grad":
        return registry.MARGIN_GRADS[code]
    if name == "ignore_index":
        return code
    if name == "easy_margin":
        return bool(code)
    return None if code == _NONE else struct.unpack("<d", struct.pack("<q", code))[0]


class _Arguments(NamedTuple):
    """What a rank passed besides the tensors, as the caller named it."""

    kind: object
    margin_kwargs: dict
    reduction: object
    ignore_index: object


class _Checked(NamedTuple):
    """The outcome of this rank's local argument check."""

    spec: MarginSpec | None  #: the margin (None if an argument was rejected)
    codes: list[int]         #: _SHARED_ARGS' values, encoded (zeros if rejected)
    rejected: str | None     #: the name (from _CHECKED_ARGS) of the argument rejected, or None
    error: Exception | None  #: the error this rank would have raised


def _named_argument(error: Exception, default: str) -> str:
    """The argument an error of the checks is about: each message starts with "<name> must"."""
    name = getattr(error, "argument", None) or str(error).split(" ", 1)[0]
    return name if name in _CHECKED_ARGS else default


def _check_arguments(arguments: _Arguments, spec_fn=None) -> tuple[MarginSpec, list[int]]:
    """This rank's margin (``spec_fn()`` if given, else the one of ``kind`` and the margin
    arguments) and the codes of _SHARED_ARGS' values; raises ValueError / TypeError naming
    the first invalid argument."""
    spec, margin_args = _margin_arguments(arguments.kind, arguments.margin_kwargs)
    registry.check_choice("reduction", arguments.reduction, registry.REDUCTIONS)
    try:
        ignore_index = operator.index(arguments.ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {arguments.ignore_index!r}") from None
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if spec_fn is not None:
        spec = spec_fn()
    values = {**margin_args, "kind": arguments.kind, "reduction": arguments.reduction, "ignore_index": ignore_index}
    return spec, [_encode(name, values[name]) if name in values else 0 for name in _SHARED_ARGS]


def _check_locally(arguments: _Arguments, x, weight, labels, spec_fn=None) -> _Checked:
    """This rank's half of the argument check, without any collective: catches the
    ValueError / TypeError a bad argument raises and finds which argument it names."""
    rejected = [0] * len(_SHARED_ARGS)
    try:
        spec, codes = _check_arguments(arguments, spec_fn)
    except (TypeError, ValueError) as error:
        return _Checked(None, rejected, _named_argument(error, "**margin_kwargs"), error)
    try:
        # The label range is checked against the global C once the labels are gathered.
        checks.check_tensors(x, weight, labels)
        if x.dtype not in _DTYPES:
            raise TypeError(f"x must be one of {_DTYPES}, got {x.dtype}")
    except (TypeError, ValueError) as error:
        return _Checked(None, rejected, _named_argument(error, "x"), error)
    return _Checked(spec, codes, None, None)


def _exchange_device(group, x) -> torch.device:
    """Where the exchanged row lives, whatever this rank's arguments: the CPU, except for NCCL,
    which only moves CUDA tensors: x's GPU, or the current CUDA device when x is not a CUDA
    tensor (an invalid argument)."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if isinstance(x, torch.Tensor) and x.is_cuda:
        return x.device
    return torch.device("cuda", torch.cuda.current_device())


class _Layout(NamedTuple):
    """Which rows of the global batch and which classes each rank of ``group`` holds."""

    group: dist.ProcessGroup | None
    rank: int
    rows: tuple[int, ...]     #: N_q of every rank q
    classes: tuple[int, ...]  #: C_q of every rank q

    @property
    def row_start(self) -> int:
        """Index of this rank's first row in the global batch."""
        return sum(self.rows[:self.rank])

    @property
    def class_offset(self) -> int:
        """o_r: global id of this rank's first class."""
        return sum(self.classes[:self.rank])


def _exchange_layout(who: str, arguments: _Arguments, x, weight, labels, group,
                     spec_fn=None) -> tuple[_Layout, MarginSpec]:
    """Step 1: checks this rank's arguments, then shares (N_r, C_r, D, dtype, error code,
    argument values) with every rank in one all-gather (see the module docstring).

    Raises on every rank if any rank's arguments are invalid, or the ranks disagree on an
    argument, on D or on the dtype. The label range is checked later, on the gathered labels,
    against the global C. Returns the layout and this rank's margin (``spec_fn()`` if given).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    checked = _check_locally(arguments, x, weight, labels, spec_fn)
    if checked.error is None:
        sizes = [x.shape[0], weight.shape[0], x.shape[1], _DTYPES.index(x.dtype), 0]
    else:
        sizes = [0, 0, 0, 0, 1 + _CHECKED_ARGS.index(checked.rejected)]
    row = sizes + checked.codes
    device = _exchange_device(group, x)
    table = torch.empty(world * len(row), dtype=torch.int64, device=device)
    _all_gather_single(table, torch.tensor(row, dtype=torch.int64, device=device), group=group)
    table = table.view(world, len(row)).tolist()  # the host sync: uneven gathers need the sizes

    if checked.error is not None:
        raise type(checked.error)(f"{who}: rank {rank}: {checked.error}") from checked.error
    rejected = [(q, _CHECKED_ARGS[entry[_ERROR] - 1]) for q, entry in enumerate(table) if entry[_ERROR]]
    if rejected:
        ranks = "those ranks'" if len(rejected) > 1 else "that rank's"
        raise ValueError(f"{who}: " + ", ".join(f"rank {q} rejected argument {name!r}" for q, name in rejected)
                         + f" (see {ranks} error)")
    values = [entry[len(sizes):] for entry in table]
    differ = [i for i in range(len(_SHARED_ARGS)) if len({v[i] for v in values}) > 1]
    if 0 in differ:  # another kind: its margin arguments differ as a consequence
        differ = [0]
    if differ:
        raise ValueError(f"{who}: " + "; ".join(
            f"argument {_SHARED_ARGS[i]!r} differs between ranks: "
            + ", ".join(f"rank {q}: {_decode(_SHARED_ARGS[i], v[i])!r}" for q, v in enumerate(values))
            for i in differ))
    if len({(entry[_FEATURES], entry[_DTYPE]) for entry in table}) > 1:
        raise ValueError(f"{who}: every rank must pass features of the same size D and dtype, got (D, dtype) "
                         f"{[(entry[_FEATURES], _DTYPES[entry[_DTYPE]]) for entry in table]}")
    layout = _Layout(group, rank, tuple(e[_ROWS] for e in table), tuple(e[_CLASSES] for e in table))
    return layout, checked.spec


def _all_gather_rows(t: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(N_r, *) on each rank -> (N, *): every rank's rows, in rank order."""
    width, world = max(layout.rows), len(layout.rows)
    if t.shape[0] < width:  # single-tensor collectives need equal sizes: pad with zero rows
        t = torch.cat([t, t.new_zeros(width - t.shape[0], *t.shape[1:])])
    gathered = t.new_empty(world * width, *t.shape[1:])
    _all_gather_single(gathered, t.contiguous(), group=layout.group)
    if all(n == width for n in layout.rows):
        return gathered
    return torch.cat([gathered[q * width:q * width + n] for q, n in enumerate(layout.rows)])


def _reduce_scatter_rows(t: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(N, *) on each rank -> (N_r, *): this rank's rows, summed over the ranks."""
    width, world = max(layout.rows), len(layout.rows)
    if all(n == width for n in layout.rows):
        padded = t.contiguous()
    else:
        padded = t.new_zeros(world * width, *t.shape[1:])
        start = 0
        for q, n in enumerate(layout.rows):
            padded[q * width:q * width + n] = t[start:start + n]
            start += n
    mine = t.new_empty(width, *t.shape[1:])
    _reduce_scatter_single(mine, padded, group=layout.group)
    return mine[:layout.rows[layout.rank]]


class _GatherRows(torch.autograd.Function):
    """X = all-gather of every rank's features: (N_r, D) -> (N, D).

    Backward: each rank holds dL/dX from its own shard's partials only; the gradient of
    rank r's rows is their sum over the shards: a reduce-scatter (in float32 for 16-bit
    features, so the W partial gradients are rounded once).
    """

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _all_gather_rows(x, layout)

    @staticmethod
    def backward(ctx, grad):
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return _reduce_scatter_rows(grad.to(acc), ctx.layout).to(grad.dtype), None


class _SumOverShards(torch.autograd.Function):
    """all_reduce(SUM) of per-shard partials that every rank turns into the same loss.

    Backward is the identity: the upstream gradient is that of the one loss all ranks share
    (the same on every rank) and d(Σ_q p_q)/dp_r = 1. Summing it over the ranks would count
    the loss once per rank.
    """

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LocalRows(torch.autograd.Function):
    """This rank's rows of a tensor every rank holds in full: (N, *) -> (N_r, *).

    Backward: the gradients of the rows come from their owners: all-gather them, so every
    rank again holds the same gradient of the global batch (what :class:`_SumOverShards`
    assumes).
    """

    @staticmethod
    def forward(ctx, t, layout):
        ctx.layout = layout
        start = layout.row_start
        return t[start:start + layout.rows[layout.rank]].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad, ctx.layout), None


class _Batch(NamedTuple):
    """The global batch, on every rank."""

    x: torch.Tensor       #: (N, D) every rank's features in rank order; gradients go back to their owners
    labels: torch.Tensor  #: (N,) int64 global class ids (or ignore_index)
    layout: _Layout


def _gather_batch(who: str, arguments: _Arguments, x, weight, labels, group,
                  spec_fn=None) -> tuple[_Batch, MarginSpec]:
    """Steps 1-2, and the check of every label against the global number of classes."""
    layout, spec = _exchange_layout(who, arguments, x, weight, labels, group, spec_fn)
    labels = _all_gather_rows(labels, layout)
    # Every rank checks the same gathered labels, so every rank raises.
    checks.check_labels(labels, sum(layout.classes), arguments.ignore_index)
    return _Batch(_GatherRows.apply(x, layout), labels, layout), spec


def _sharded_loss(batch: _Batch, weight, shard_labels, class_index, spec: MarginSpec, reduction: str,
                  ignore_index: int, return_stats: bool):
    """Steps 3-5 on this rank's classes for the global batch.

    weight (C_r, D): this rank's shard. class_index (K,) int64: the rows of ``weight`` this
    step uses, ascending (PartialFC's sample), or None for all C_r rows; the primitive reads
    them in place and writes their gradients in place (``weight``'s gradient is zero on the
    other rows). shard_labels (N,) int64: each row's target among the K (C_r) classes used,
    outside [0, K) when the target is elsewhere or the row is ignored.
    """
    layout = batch.layout
    rows = class_index
    if class_index is not None and torch.is_autocast_enabled(batch.x.device.type):
        # The primitive's autocast rule casts the weight it is given whole (C_r·D 16-bit
        # values): cast a copy of the K rows used instead. Same labels: the copy keeps their order.
        weight, rows = weight.index_select(0, class_index), None
    lse_fn = backends.margin_lse_for(batch.x.device)
    lse_r, target_r, max_cos_r, pred_r, nontarget_r = lse_fn(batch.x, weight, shard_labels, *spec.primitive_args(),
                                                             None, 1, rows, None, None)
    # The max over shards only keeps exp() in range: d lse / d max = 0, so it carries no gradient.
    peaks = torch.stack([lse_r.detach(), max_cos_r])
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=layout.group)
    sums = _SumOverShards.apply(torch.stack([torch.exp(lse_r - peaks[0]), target_r, nontarget_r]), layout.group)
    lse = peaks[0] + sums[0].log()
    num_classes = sum(layout.classes)
    if class_index is not None and spec.label_smoothing:
        # The sampled sub-problem's classes: every rank's K (K may differ between ranks).
        num_classes = torch.tensor(class_index.shape[0], dtype=lse.dtype, device=lse.device)
        dist.all_reduce(num_classes, group=layout.group)
    loss = reference.loss_from_lse(lse, sums[1], batch.labels, spec.gamma, reduction, ignore_index,
                                   spec.label_smoothing, sums[2], num_classes)
    if reduction == "none":
        loss = _LocalRows.apply(loss, layout)
    if not return_stats:
        return loss
    # Top-1 class over all shards: the smallest global id among the shards holding the
    # largest cosine (the single-process op's tie-break).
    pred = (pred_r if class_index is None else class_index[pred_r]) + layout.class_offset
    pred = torch.where(max_cos_r == peaks[1], pred, sum(layout.classes))
    dist.all_reduce(pred, op=dist.ReduceOp.MIN, group=layout.group)
    start = layout.row_start
    return MarginOutput(loss, _LocalRows.apply(lse, layout), pred[start:start + layout.rows[layout.rank]])


def margin_loss(x: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, *, kind: str = "arcface",
                group: dist.ProcessGroup | None = None, reduction: str = "mean", ignore_index: int = -100,
                return_stats: bool = False, **margin_kwargs):
    """Margin loss of the global batch with the classes sharded over the ranks of ``group``.

    Call it on every rank of ``group``, with the same ``kind``, margin arguments, reduction and
    ignore_index. See the module docstring for the layout, the gradients and DDP.

    Arguments are checked on every call, at no extra collective: each rank checks its own
    before communicating, and the size exchange (step 1 of the module docstring: one
    all-gather of 18 int64 per rank, which the call needs anyway) tells every rank every
    rank's verdict and values. So an invalid argument on one rank, or an argument that
    differs between ranks (e.g. ``s``), raises on every rank at once, naming the argument and
    the ranks (a ValueError; the rank whose argument is invalid raises its own error).

    Args:
        x: (N_r, D) floating (float64, float32, bfloat16, float16): this rank's features;
            N_r may differ per rank and be 0.
        weight_shard: (C_r, D), x's dtype: this rank's consecutive slice of the class
            weights (ranks hold consecutive slices in rank order; C_r ≥ 1 may differ per rank).
        labels: (N_r,) int64: global class ids in [0, Σ C_q), or ``ignore_index``.
        kind: ``"arcface"``, ``"cosface"``, ``"combined"`` or ``"sphereface"``.
        margin_kwargs: the margin arguments of ``torch.ops.margin.<kind>`` (arcface: s, m,
            easy_margin, margin_grad; cosface: s, m; combined: s, m1, m2, m3, margin_grad;
            sphereface: m, lamb, s, gamma; each also label_smoothing, over the Σ C_q classes),
            with that op's defaults. ``subcenters`` is not supported.

    Returns:
        The loss (float32 for 16-bit inputs, else x's dtype): for ``"mean"`` and ``"sum"`` the
        scalar loss of the global batch, identical on every rank; for ``"none"`` this rank's
        rows, (N_r,). With ``return_stats=True`` a :class:`margin_ops.MarginOutput` whose lse
        (N_r,) (accumulation dtype, differentiable) and pred (N_r,) (int64 global class id with
        the largest cosine) are this rank's rows (one more all-reduce).
    """
    arguments = _Arguments(kind, margin_kwargs, reduction, ignore_index)
    batch, spec = _gather_batch("margin_loss", arguments, x, weight_shard, labels, group)
    shard_labels = batch.labels - batch.layout.class_offset
    return _sharded_loss(batch, weight_shard, shard_labels, None, spec, reduction, ignore_index, return_stats)


class PartialFC(nn.Module):
    """Class-sharded margin head with class sampling, after InsightFace's PartialFC_V2.

    Owns ``weight`` (C_r, embedding_size): rank r's consecutive slice of the num_classes
    classes — C // W classes each, one more on the first C mod W ranks (``class_start`` is
    its first global class id) — initialised from N(0, 0.01²) like :mod:`margin_ops.nn`'s
    heads. ``forward(features, labels)``: features (N_r, embedding_size), labels (N_r,) int64
    global class ids; returns :func:`margin_loss` of the global batch (see there for the
    reductions and ``return_stats``). Build it on every rank after
    ``dist.init_process_group``; keep it outside DDP.

    Sampling (``sample_rate`` < 1, training mode only; eval mode uses every class): each step
    each rank keeps, of its own shard, every positive class (the label of some non-ignored row
    of the global batch) and fills up to ``num_sample`` = ceil(sample_rate · C_r) classes with
    negatives drawn uniformly without replacement; if the global batch has more positives in
    the shard than that, all positives are kept and no negative. The loss is then the margin
    loss of the sub-problem made of every rank's sampled classes (see :meth:`sample`; label
    smoothing averages over them, at one more all-reduce of one value), run by the fused op
    on the sampled rows of ``weight`` in place (its ``class_index``): nothing is copied, the
    kernels read those rows and write their gradients into the full-shape ``weight.grad``,
    which is zero on the rows not sampled (as a copy's gradient scattered back would be).
    Under autocast the sampled rows are copied and cast instead, because autocast would
    cast the whole shard. The draw uses torch's default generator of the weight's device
    (reproducible under ``torch.manual_seed``); each rank draws for its shard independently.
    No host sync beyond the size exchange, except when the global batch has more rows than
    ``num_sample``: then counting the positives needs one.

    Arguments. The constructor checks its arguments on this rank alone (no collective: a
    bad argument raises there, prefixed with the rank, like any error in setup code). Every
    forward checks, within its size exchange and at no extra collective, that every rank's
    head is valid and agrees on kind, margin arguments, reduction and ignore_index (see
    :func:`margin_loss`), so a head built or changed differently on one rank raises on every
    rank instead of leaving the others waiting.

    Args:
        embedding_size: D. num_classes: C ≥ world size.
        kind, margin_kwargs: the margin (see :func:`margin_loss`).
        sample_rate: fraction of each shard's classes used per training step, in (0, 1].
        group: the process group the classes are sharded over (default: the world).
    """

    def __init__(self, embedding_size: int, num_classes: int, kind: str = "arcface", sample_rate: float = 1.0,
                 group: dist.ProcessGroup | None = None, *, reduction: str = "mean", ignore_index: int = -100,
                 device=None, dtype=None, **margin_kwargs):
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        try:  # a forward's checks of these arguments, on this rank only (a forward checks agreement too)
            self._spec = _check_arguments(_Arguments(kind, margin_kwargs, reduction, ignore_index))[0]
            if not 0 < sample_rate <= 1:
                raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
            if embedding_size < 1 or num_classes < world:
                raise ValueError(f"need embedding_size >= 1 and num_classes >= world size {world}, "
                                 f"got {embedding_size}, {num_classes}")
        except (TypeError, ValueError) as error:
            raise type(error)(f"PartialFC: rank {rank}: {error}") from error
        self.margin_kwargs = dict(margin_kwargs)
        base, extra = divmod(num_classes, world)
        self.kind, self.group, self.reduction, self.ignore_index = kind, group, reduction, ignore_index
        self.num_classes, self.sample_rate = num_classes, sample_rate
        self.class_start = rank * base + min(rank, extra)
        num_local = base + (rank < extra)
        self.num_sample = math.ceil(sample_rate * num_local)
        self.weight = nn.Parameter(torch.empty(num_local, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def spec(self) -> MarginSpec:
        """The margin of every step (a subclass may schedule it, e.g. SphereFace's λ annealing)."""
        return self._spec

    @torch.no_grad()
    def sample(self, shard_labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws this step's classes of the shard.

        Args:
            shard_labels: (N,) int64: labels of the global batch minus ``class_start``.
            valid: (N,) bool: rows that are not ignored.

        Returns:
            index (K,) int64: the sampled rows of ``weight``, ascending; K = max(num_sample,
            number of positives). labels (N,) int64: each row's position in ``index``, -1 for
            rows whose class lies in another shard or that are ignored.
        """
        num_local = self.weight.shape[0]
        mine = valid & (shard_labels >= 0) & (shard_labels < num_local)
        slot = torch.where(mine, shard_labels, num_local)  # the extra slot collects the others
        positive = torch.zeros(num_local + 1, dtype=torch.bool, device=slot.device).scatter_(0, slot, True)
        positive = positive[:num_local]
        count = self.num_sample
        if shard_labels.shape[0] > count:  # only then can the positives outnumber the sample
            count = max(count, int(positive.sum()))
        # Positives score 2, negatives U[0, 1): the top `count` are every positive plus a
        # uniform draw of the negatives.
        score = torch.rand(num_local, device=slot.device).masked_fill_(positive, 2.0)
        index = score.topk(count, sorted=False).indices.sort().values
        labels = torch.where(mine, torch.searchsorted(index, slot), -1)
        return index, labels

    def forward(self, features: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        arguments = _Arguments(self.kind, self.margin_kwargs, self.reduction, self.ignore_index)
        # self.spec() is called before the exchange: an error there raises on every rank too.
        batch, spec = _gather_batch("PartialFC", arguments, features, self.weight, labels, self.group, self.spec)
        shard_labels = batch.labels - batch.layout.class_offset
        index = None
        if self.training and self.num_sample < self.weight.shape[0]:
            index, shard_labels = self.sample(shard_labels, batch.labels != self.ignore_index)
        return _sharded_loss(batch, self.weight, shard_labels, index, spec, self.reduction,
                             self.ignore_index, return_stats)

    def extra_repr(self) -> str:
        num_local, embedding_size = self.weight.shape
        return (f"embedding_size={embedding_size}, num_classes={self.num_classes}, kind={self.kind!r}, "
                f"classes=[{self.class_start}, {self.class_start + num_local}), sample_rate={self.sample_rate}, "
                f"reduction={self.reduction!r}")
