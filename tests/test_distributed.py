"""margin_ops.distributed against the single-process ops, on 2 and 4 gloo processes (CPU).

Spawning processes is slow, so each world size is spawned once (a module-scoped fixture):
every rank runs every check of ``CHECKS`` in order and records its traceback, or "" when it
passed; each test then asserts one check on every rank. A check runs all its collectives
before asserting anything, so a failure on one rank does not desynchronize the next checks.

Every rank builds the same full problem from a seed — x (N, D), W (C, D), labels (N,) — takes
its slices, and compares the sharded loss and gradients with ``torch.ops.margin.<kind>`` on
the full problem (recomputed on every rank: it is small).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import margin_ops
from margin_ops import distributed

from spawned_checks import spawned_results

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZES = (2, 4)
D = 8
IGNORE = -100
#: Margin arguments per kind; s below the defaults keeps float32 gradients well conditioned.
MARGINS = {
    "arcface": dict(s=32.0, m=0.4),
    "cosface": dict(s=30.0, m=0.35),
    "combined": dict(s=32.0, m1=0.9, m2=0.3, m3=0.1, margin_grad="detach"),
    "sphereface": dict(m=4, lamb=5.0, s=None, gamma=1.0),  # feature-norm scale, focal term
}
#: The sharded path sums the same terms as the op in another order (and rounds 16-bit
#: gradients after summing W float32 partials, the op after one float32 sum).
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5),
              torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=2e-2, atol=2e-3)}


# --------------------------------------------------------------------------------------
# Problems and the single-process reference


def rows_of(world: int, case: int) -> list[int]:
    """Uneven batch sizes N_q, one rank empty for world size 4."""
    return [[5, 3], [4, 6], [0, 4]][case % 3] if world == 2 else [[3, 0, 4, 2], [2, 5, 1, 3], [0, 0, 5, 0]][case % 3]


def classes_of(world: int, case: int) -> list[int]:
    """Uneven, not-standard shard sizes C_q (C not divisible by the world size)."""
    return [[4, 3], [2, 5], [6, 1]][case % 3] if world == 2 else [[3, 2, 2, 2], [1, 4, 2, 3], [2, 2, 2, 3]][case % 3]


def problem(rows, classes, dtype, seed, ignore_index=IGNORE):
    """Full x (N, D), W (C, D) and labels (N,); every fourth row is ignored."""
    g = torch.Generator().manual_seed(seed)
    n, c = sum(rows), sum(classes)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, D, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[3::4] = ignore_index
    return x, w, labels


def span(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def single_process(kind, x, w, labels, reduction, row_weights, ignore_index=IGNORE, **margin_kwargs):
    """Loss of the full problem and the gradients of its objective (see `objective`)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = getattr(torch.ops.margin, kind)(x, w, labels, **margin_kwargs, reduction=reduction,
                                           ignore_index=ignore_index)
    objective(loss, row_weights).backward()
    return loss.detach(), x.grad, w.grad


def objective(loss, row_weights):
    """A non-trivial upstream gradient: 1.7 · loss for scalars, Σ w_i loss_i per row."""
    return (loss * row_weights).sum() if loss.dim() else 1.7 * loss


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def gather_objects(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# --------------------------------------------------------------------------------------
# Checks: each runs on every rank


def check_against_single_process(kind, dtype, reduction, case, ignore_index=IGNORE, **extra):
    def check(rank, world):
        rows, classes = rows_of(world, case), classes_of(world, case)
        x, w, labels = problem(rows, classes, dtype, seed=case, ignore_index=ignore_index)
        margin_kwargs = {**MARGINS[kind], **extra}
        row_weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64)
        ref_loss, ref_dx, ref_dw = single_process(kind, x, w, labels, reduction, row_weights, ignore_index,
                                                  **margin_kwargs)

        mine, shard = span(rows, rank), span(classes, rank)
        x_r, w_r = x[mine].clone().requires_grad_(), w[shard].clone().requires_grad_()
        loss = distributed.margin_loss(x_r, w_r, labels[mine], kind=kind, reduction=reduction,
                                       ignore_index=ignore_index, **margin_kwargs)
        objective(loss, row_weights[mine]).backward()
        every_loss = gather_objects(loss.detach())

        if reduction == "none":
            assert loss.shape == (rows[rank],), loss.shape
            close(loss, ref_loss[mine], dtype, "loss rows")
        else:
            assert all(torch.equal(other, loss) for other in every_loss), f"losses differ: {every_loss}"
            close(loss, ref_loss, dtype, "loss")
        assert loss.dtype == ref_loss.dtype
        close(x_r.grad, ref_dx[mine], dtype, "x grad")
        close(w_r.grad, ref_dw[shard], dtype, "weight grad")
    return check


def check_stats(rank, world):
    """return_stats: this rank's rows of the single-process lse and top-1 class."""
    rows, classes = rows_of(world, 1), classes_of(world, 1)
    x, w, labels = problem(rows, classes, torch.float64, seed=7)
    ref = margin_ops.with_stats(torch.ops.margin.cosface, x, w, labels, **MARGINS["cosface"])
    mine = span(rows, rank)
    out = distributed.margin_loss(x[mine], w[span(classes, rank)], labels[mine], kind="cosface",
                                  return_stats=True, **MARGINS["cosface"])
    close(out.loss, ref.loss, torch.float64, "loss")
    close(out.lse, ref.lse[mine], torch.float64, "lse")
    assert torch.equal(out.pred, ref.pred[mine]), (out.pred, ref.pred[mine])


def check_empty_global_batch(rank, world):
    classes = classes_of(world, 0)
    x = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(classes[rank], D, dtype=torch.float64, requires_grad=True)
    loss = distributed.margin_loss(x, w, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, D) and not w.grad.any()


def check_errors_raise_on_every_rank(rank, world):
    """Bad arguments on one rank, or a label out of range, raise everywhere instead of hanging."""
    x, w, labels = torch.randn(2, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 1])
    last = rank == world - 1
    scenarios = {  # (x, weight, labels) of this rank
        "last rank's weight has the wrong D": (x, w[:, :5] if last else w, labels),
        "last rank's label is out of range": (x, w, labels + 3 * world if last else labels),
        "last rank's dtype differs": (x.float(), w.float(), labels) if last else (x, w, labels),
    }
    caught = {}
    for name, arguments in scenarios.items():
        try:
            distributed.margin_loss(*arguments)
        except (TypeError, ValueError) as error:
            caught[name] = str(error)
    assert list(caught) == list(scenarios), caught
    messages = list(caught.values())
    expected = (f"margin_loss: rank {world - 1}: weight must be (C, D)" if last else
                f"margin_loss: rank {world - 1} rejected argument 'weight' (see that rank's error)")
    assert expected in messages[0], messages
    assert f"labels must lie in [0, {3 * world})" in messages[1], messages
    assert "same size D and dtype" in messages[2], messages


def check_partial_fc_layout(rank, world):
    """Standard layout (first ranks get the extra class), init, full head = functional loss."""
    num_classes = 4 * world + 3
    head = distributed.PartialFC(D, num_classes, kind="combined", dtype=torch.float64, **MARGINS["combined"])
    sizes = gather_objects((head.class_start, head.weight.shape[0]))
    assert [s[1] for s in sizes] == [num_classes // world + (q < num_classes % world) for q in range(world)], sizes
    assert [s[0] for s in sizes] == [sum(t[1] for t in sizes[:q]) for q in range(world)], sizes
    assert abs(head.weight.std().item() - 0.01) < 0.005

    rows = rows_of(world, 0)
    x, w, labels = problem(rows, [s[1] for s in sizes], torch.float64, seed=11)
    with torch.no_grad():
        head.weight.copy_(w[head.class_start:head.class_start + head.weight.shape[0]])
    mine = span(rows, rank)
    loss = head(x[mine], labels[mine])
    close(loss, torch.ops.margin.combined(x, w, labels, **MARGINS["combined"]), torch.float64, "loss")


def subproblem(indices, labels, num_classes):
    """The sub-problem of a sampled step: every rank's sampled classes (global ids, ``indices``
    in rank order), concatenated (K_total,), and the global batch's labels (N,) renumbered to
    positions in it (IGNORE kept)."""
    sampled = torch.cat(indices)
    position = torch.full((num_classes,), -1, dtype=torch.int64)
    position[sampled] = torch.arange(sampled.numel())
    sub_labels = torch.where(labels == IGNORE, IGNORE, position[labels.clamp_min(0)])
    assert not (sub_labels == -1).any(), "a positive class was not sampled"
    return sampled, sub_labels


def sampled_subproblem(head, x, w, labels, sizes, rows, rank, seed):
    """Runs one sampled step of `head` and the same sub-problem on one process.

    Returns index, positives, loss, (x grad, sampled weight rows' grad, the others' grad) of
    my rows and their expected (loss, x grad, sampled weight rows' grad)."""
    mine = span(rows, rank)
    offset = head.class_start
    shard_labels = labels - offset
    torch.manual_seed(seed + rank)
    index, _ = head.sample(shard_labels, labels != IGNORE)
    torch.manual_seed(seed + rank)  # forward draws the same sample again
    x_r = x[mine].clone().requires_grad_()
    head.weight.grad = None
    loss = head(x_r, labels[mine])
    (1.7 * loss).backward()
    indices = gather_objects(index + offset)
    sampled, sub_labels = subproblem(indices, labels, w.shape[0])
    ref_loss, ref_dx, ref_dw = single_process("arcface", x, w[sampled], sub_labels, "mean", None,
                                              **MARGINS["arcface"])
    my_rows = span([i.numel() for i in indices], rank)
    positives = torch.unique(shard_labels[(labels != IGNORE) & (shard_labels >= 0) &
                                          (shard_labels < head.weight.shape[0])])
    unsampled = torch.ones(head.weight.shape[0], dtype=torch.bool)
    unsampled[index] = False
    grads = (x_r.grad, head.weight.grad[index], head.weight.grad[unsampled])
    return index, positives, loss, grads, (ref_loss, ref_dx[mine], ref_dw[my_rows])


def check_sampling(rank, world):
    """Positives kept, K = ceil(rate · C_r) negatives included, loss = sub-problem on one process."""
    num_classes = 20 * world + 3  # num_sample >= N: the path without host sync
    head = distributed.PartialFC(D, num_classes, sample_rate=0.5, dtype=torch.float64, **MARGINS["arcface"])
    sizes = [num_classes // world + (q < num_classes % world) for q in range(world)]
    rows = rows_of(world, 1)
    x, w, labels = problem(rows, sizes, torch.float64, seed=5)
    with torch.no_grad():
        head.weight.copy_(w[span(sizes, rank)])
    index, positives, loss, (dx, dw, dw_unsampled), (ref_loss, ref_dx, ref_dw) = sampled_subproblem(
        head, x, w, labels, sizes, rows, rank, seed=3)
    again = sampled_subproblem(head, x, w, labels, sizes, rows, rank, seed=3)
    other = sampled_subproblem(head, x, w, labels, sizes, rows, rank, seed=4)
    head.eval()  # every class
    eval_loss = head(x[span(rows, rank)], labels[span(rows, rank)])
    expected_eval = torch.ops.margin.arcface(x, w, labels, **MARGINS["arcface"])

    assert index.numel() == math.ceil(0.5 * sizes[rank]) == head.num_sample
    assert torch.equal(index, index.unique()), index  # ascending, no repeats
    assert torch.isin(positives, index).all(), (positives, index)
    close(loss, ref_loss, torch.float64, "sampled loss")
    close(dx, ref_dx, torch.float64, "sampled x grad")
    close(dw, ref_dw, torch.float64, "sampled weight grad")
    assert not dw_unsampled.any()
    assert torch.equal(again[0], index) and torch.equal(again[2], loss), "not reproducible under manual_seed"
    assert gather_objects(not torch.equal(other[0], index)) != [False] * world, "seed did not change the draw"
    close(eval_loss, expected_eval, torch.float64, "eval loss")


class WeightReads(TorchDispatchMode):
    """Records the name of every op (below autograd) that gets a tensor sharing ``weight``'s storage."""

    def __init__(self, weight):
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.storage
               for t in pytree.tree_leaves((args, kwargs))):
            self.ops.append(func.name())
        return func(*args, **kwargs)


def copy_path_step(head, x_r, labels, rows, rank, seed):
    """PartialFC's sampled step as it was before ``class_index``: the sampled rows copied with
    ``index_select`` (autograd scatters their gradient back into a full-shape zero tensor), the
    copy being this rank's consecutive shard of the sub-problem. Returns the sampled rows and
    (loss, x grad, weight grad)."""
    torch.manual_seed(seed + rank)  # the draw of head's forward
    index, _ = head.sample(labels - head.class_start, labels != IGNORE)
    _, sub_labels = subproblem(gather_objects(index + head.class_start), labels, head.num_classes)
    weight = head.weight.detach().clone().requires_grad_()
    x_r = x_r.detach().clone().requires_grad_()
    loss = distributed.margin_loss(x_r, weight.index_select(0, index), sub_labels[span(rows, rank)],
                                   kind=head.kind, **head.margin_kwargs)
    (1.7 * loss).backward()
    return index, (loss.detach(), x_r.grad, weight.grad)


def check_sampling_in_place(rank, world):
    """The sampled rows are read and written in place (class_index): the same loss and gradients
    as the copy path (float32, label smoothing over the sampled classes, shards sampling a
    different K), and no op but the primitive touches the weight's storage."""
    num_classes = 10 * world + 1  # shards of 11, 10, …: K = 6, 5, … at sample_rate 0.5
    head = distributed.PartialFC(D, num_classes, sample_rate=0.5, dtype=torch.float32, label_smoothing=0.1,
                                 **MARGINS["arcface"])
    rows = rows_of(world, 1)
    x, _, labels = problem(rows, [num_classes], torch.float32, seed=13)
    x_r = x[span(rows, rank)].clone().requires_grad_()
    torch.manual_seed(21 + rank)
    with WeightReads(head.weight) as reads:
        loss = head(x_r, labels[span(rows, rank)])
        (1.7 * loss).backward()
    index, (ref_loss, ref_dx, ref_dw) = copy_path_step(head, x_r, labels, rows, rank, seed=21)
    sizes = gather_objects(index.numel())

    close(loss, ref_loss, torch.float32, "loss vs copy path")
    close(x_r.grad, ref_dx, torch.float32, "x grad vs copy path")
    close(head.weight.grad, ref_dw, torch.float32, "weight grad (full shape, zero where not sampled) vs copy path")
    assert len(set(sizes)) > 1, f"every shard sampled the same K {sizes}: the class count is not exercised"
    if margin_ops.current_backend("cpu") != "reference":  # the reference backend materializes (it copies)
        assert reads.ops == ["margin::margin_lse", "margin::margin_lse_backward"], reads.ops


def check_sampling_more_positives_than_sample(rank, world):
    """A global batch with more positives in a shard than num_sample keeps them all."""
    num_classes = 5 * world
    head = distributed.PartialFC(D, num_classes, sample_rate=0.2, dtype=torch.float64, **MARGINS["arcface"])
    rows = [4] * world
    x, w, _ = problem(rows, [5] * world, torch.float64, seed=9)
    labels = torch.tensor([5 * q + k for q in range(world) for k in (0, 2, 3, 2)])  # 3 positives per shard
    with torch.no_grad():
        head.weight.copy_(w[5 * rank:5 * rank + 5])
    index, positives, loss, (dx, dw, _), (ref_loss, ref_dx, ref_dw) = sampled_subproblem(
        head, x, w, labels, [5] * world, rows, rank, seed=1)
    assert head.num_sample == 1 and torch.equal(index, positives) and index.tolist() == [0, 2, 3], index
    close(loss, ref_loss, torch.float64, "loss")
    close(dx, ref_dx, torch.float64, "x grad")
    close(dw, ref_dw, torch.float64, "weight grad")


def check_ddp_backbone(rank, world):
    """DDP averages backbone gradients: ×world_size on the features gives the global gradient."""
    rows, num_classes = rows_of(world, 0), 4 * world + 1
    torch.manual_seed(0)  # same backbone on every rank
    backbone = torch.nn.Linear(6, D, dtype=torch.float64)
    reference_backbone = torch.nn.Linear(6, D, dtype=torch.float64)
    reference_backbone.load_state_dict(backbone.state_dict())
    ddp = DistributedDataParallel(backbone)
    head = distributed.PartialFC(D, num_classes, kind="cosface", dtype=torch.float64, **MARGINS["cosface"])
    sizes = gather_objects(head.weight.shape[0])
    g = torch.Generator().manual_seed(2)
    images = torch.randn(sum(rows), 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (sum(rows),), generator=g)
    w = torch.randn(num_classes, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w[span(sizes, rank)])
    mine = span(rows, rank)

    grads = []
    for scale in (True, False):
        backbone.zero_grad()
        head.weight.grad = None
        features = ddp(images[mine])
        if scale:
            features.register_hook(lambda grad: grad * world)
        head(features, labels[mine]).backward()
        grads.append((backbone.weight.grad.clone(), head.weight.grad.clone()))

    w_full = w.clone().requires_grad_()
    torch.ops.margin.cosface(reference_backbone(images), w_full, labels, **MARGINS["cosface"]).backward()
    (scaled, head_grad), (averaged, _) = grads
    close(scaled, reference_backbone.weight.grad, torch.float64, "backbone grad, scaled")
    close(averaged, reference_backbone.weight.grad / world, torch.float64, "backbone grad, DDP average")
    close(head_grad, w_full.grad[span(sizes, rank)], torch.float64, "head grad")


#: The process group's timeout (see _worker): a rank left waiting in a collective raises after it.
PG_TIMEOUT_S = 60
#: An argument error must reach every rank far sooner than the timeout.
PROMPT_S = 10


def raised_on_this_rank(call):
    """(exception type, message, seconds) of ``call()``, which must raise TypeError/ValueError.

    The ranks start together (a barrier) and the clock stops when this rank raises. Afterwards
    a valid call runs on every rank: the failed call must have left no collective pending.
    """
    dist.barrier()
    start = time.monotonic()
    try:
        call()
    except (TypeError, ValueError) as error:
        outcome = type(error), str(error), time.monotonic() - start
    else:
        outcome = None, "returned instead of raising", time.monotonic() - start
    x, w = torch.randn(2, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    assert torch.isfinite(distributed.margin_loss(x, w, torch.tensor([0, 1]))), "the ranks lost sync"
    return outcome


def assert_raised(outcome, error_type, message, what):
    got_type, got_message, elapsed = outcome
    assert (got_type, got_message) == (error_type, message), \
        f"{what}: expected {error_type.__name__}({message!r}), got {got_type and got_type.__name__}({got_message!r})"
    assert elapsed < PROMPT_S, f"{what}: took {elapsed:.1f} s (process-group timeout {PG_TIMEOUT_S} s)"


def check_invalid_argument_on_one_rank(rank, world):
    """An invalid reduction, kind or margin value on the last rank only: every rank raises at once,
    that rank with its own message, the others naming the argument and the rank."""
    x, w, labels = torch.randn(2, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 1])
    last = world - 1
    mine = rank == last
    reduction = raised_on_this_rank(lambda: distributed.margin_loss(
        x, w, labels, reduction="avg" if mine else "mean"))
    kind = raised_on_this_rank(lambda: distributed.margin_loss(
        x, w, labels, kind="softmax" if mine else "arcface"))
    scale = raised_on_this_rank(lambda: distributed.margin_loss(
        x, w, labels, kind="cosface", s=-1.0 if mine else 64.0))
    # PartialFC checks its constructor's arguments on this rank alone (no collective) ...
    try:
        distributed.PartialFC(D, 2 * world, s=-1.0 if mine else 64.0, dtype=torch.float64)
        built = "built"
    except ValueError as error:
        built = str(error)
    # ... and a forward with an argument gone bad on one rank raises on every rank.
    head = distributed.PartialFC(D, 2 * world, dtype=torch.float64)
    head.reduction = "avg" if mine else "mean"
    forward = raised_on_this_rank(lambda: head(x, labels))

    def other(who, name):
        return f"{who}: rank {last} rejected argument {name!r} (see that rank's error)"
    if mine:
        assert_raised(reduction, ValueError, f"margin_loss: rank {last}: reduction must be one of 'mean', 'sum', "
                      "'none', got 'avg'", "reduction")
        assert_raised(kind, ValueError, f"margin_loss: rank {last}: kind must be one of 'arcface', 'cosface', "
                      "'combined', 'sphereface', got 'softmax'", "kind")
        assert_raised(scale, ValueError, f"margin_loss: rank {last}: s must be > 0, got -1.0", "s")
        assert built == f"PartialFC: rank {last}: s must be > 0, got -1.0", built
        assert_raised(forward, ValueError,
                      f"PartialFC: rank {last}: reduction must be one of 'mean', 'sum', 'none', got 'avg'", "forward")
    else:
        assert_raised(reduction, ValueError, other("margin_loss", "reduction"), "reduction")
        assert_raised(kind, ValueError, other("margin_loss", "kind"), "kind")
        assert_raised(scale, ValueError, other("margin_loss", "s"), "s")
        assert built == "built", built
        assert_raised(forward, ValueError, other("PartialFC", "reduction"), "forward")


def check_arguments_differ_between_ranks(rank, world):
    """Valid arguments that differ between ranks (s, ignore_index, kind, PartialFC's s): every rank
    raises naming the argument and every rank's value."""
    x, w, labels = torch.randn(2, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 1])
    last = world - 1
    mine = rank == last
    scale = raised_on_this_rank(lambda: distributed.margin_loss(x, w, labels, s=30.0 if mine else 64.0))
    ignore = raised_on_this_rank(lambda: distributed.margin_loss(x, w, labels, ignore_index=-1 if mine else -100))
    kind = raised_on_this_rank(lambda: distributed.margin_loss(x, w, labels, kind="cosface" if mine else "arcface"))
    smoothing = raised_on_this_rank(lambda: distributed.margin_loss(x, w, labels, label_smoothing=0.1 if mine else 0))
    head = distributed.PartialFC(D, 2 * world, kind="cosface", s=30.0 if mine else 64.0, dtype=torch.float64)
    forward = raised_on_this_rank(lambda: head(x, labels))

    def differs(who, name, value, last_value):
        values = ", ".join(f"rank {q}: {last_value if q == last else value}" for q in range(world))
        return f"{who}: argument {name!r} differs between ranks: {values}"
    assert_raised(scale, ValueError, differs("margin_loss", "s", 64.0, 30.0), "s")
    assert_raised(ignore, ValueError, differs("margin_loss", "ignore_index", -100, -1), "ignore_index")
    assert_raised(kind, ValueError, differs("margin_loss", "kind", "'arcface'", "'cosface'"), "kind")
    assert_raised(smoothing, ValueError, differs("margin_loss", "label_smoothing", 0.0, 0.1), "label_smoothing")
    assert_raised(forward, ValueError, differs("PartialFC", "s", 64.0, 30.0), "PartialFC s")


CHECKS = {}
for _i, (_kind, _dtype, _reduction) in enumerate(
        (k, d, r) for k in MARGINS for d in (torch.float64, torch.float32) for r in ("mean", "sum", "none")):
    CHECKS[f"{_kind}-{str(_dtype)[6:]}-{_reduction}"] = check_against_single_process(_kind, _dtype, _reduction, _i)
CHECKS.update({
    "arcface-easy-detach": check_against_single_process("arcface", torch.float64, "mean", 1, easy_margin=True,
                                                        margin_grad="detach"),
    "cosface-ignore-index-minus-1": check_against_single_process("cosface", torch.float64, "mean", 2, ignore_index=-1),
    "arcface-label-smoothing": check_against_single_process("arcface", torch.float64, "mean", 1, label_smoothing=0.1),
    "sphereface-label-smoothing-none": check_against_single_process("sphereface", torch.float32, "none", 2,
                                                                    label_smoothing=0.2),
    "arcface-bfloat16": check_against_single_process("arcface", torch.bfloat16, "mean", 0),
    "sphereface-fixed-s-float16": check_against_single_process("sphereface", torch.float16, "sum", 1, s=16.0,
                                                               gamma=0.0),
    "stats": check_stats,
    "empty-global-batch": check_empty_global_batch,
    "errors-raise-on-every-rank": check_errors_raise_on_every_rank,
    "partial-fc-layout": check_partial_fc_layout,
    "sampling": check_sampling,
    "sampling-in-place": check_sampling_in_place,
    "sampling-more-positives-than-sample": check_sampling_more_positives_than_sample,
    "ddp-backbone": check_ddp_backbone,
    # Last: before these were fixed, a rank left waiting desynchronized every later check.
    "invalid-argument-on-one-rank": check_invalid_argument_on_one_rank,
    "arguments-differ-between-ranks": check_arguments_differ_between_ranks,
})


results = spawned_results(__name__, PG_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_distributed(results, world, name):
    failures = [f"rank {rank}:\n{r[name]}" for rank, r in enumerate(results(world)) if r[name]]
    assert not failures, "\n".join(failures)


def test_margin_kwargs_are_checked():
    with pytest.raises(TypeError, match="unexpected \\['lamb'\\]"):
        distributed._margin_spec("arcface", {"lamb": 1.0})
    with pytest.raises(ValueError, match="kind must be one of"):
        distributed._margin_spec("softmax", {})
    with pytest.raises(ValueError, match="kind must be one of 'arcface', 'cosface', 'combined', 'sphereface', got "
                                         "'curricular'"):  # per-row tensor arguments: not sharded
        distributed._margin_spec("curricular", {})
    with pytest.raises(TypeError, match="unexpected \\['subcenters'\\]"):  # not sharded
        distributed._margin_spec("arcface", {"subcenters": 2})
    assert distributed._margin_spec("cosface", {"label_smoothing": 0.1}).label_smoothing == 0.1
    defaults = margin_ops.spec.sphereface(4, 0.0, None, 0.0)
    assert distributed._margin_spec("sphereface", {"s": None}) == defaults


@pytest.mark.slow
def test_torchrun_example_and_benchmark():
    """The example trains under torchrun (2 gloo processes); the benchmark runs at world size 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "examples" / "distributed_torchrun.py"), "--steps", "5"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "step 5/5" in run.stdout, run.stdout
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed_overhead.py"), "--quick"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert bench.returncode == 0, f"stdout:\n{bench.stdout}\nstderr:\n{bench.stderr}"
    assert "overhead" in bench.stdout, bench.stdout
