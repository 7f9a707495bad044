"""margin_ops.compat.insightface against re-statements of InsightFace arcface_torch's code.

Two re-statements of arcface_torch's ``PartialFC_V2`` + ``CombinedMarginLoss`` (written here,
in plain PyTorch, from recognition/arcface_torch/partial_fc_v2.py and losses.py):

* ``gathered``: the full problem in one process — logits = linear(normalize(X), normalize(W)),
  clamp, CombinedMarginLoss's in-place margin under no_grad, cross-entropy over all classes,
  mean over the global batch — differentiated by autograd. arcface_torch's gradients are
  then: weight shard: the slice of dL/dW; local embeddings: world_size × the slice of dL/dX
  (its AllGatherFunc backward multiplies the reduced gradient by the world size).
* ``sharded``: the same algorithm distributed as arcface_torch runs it (gloo): an all-gather
  whose backward reduces each rank's rows and multiplies by the world size, each rank's
  logits of its class shard, and a distributed cross-entropy whose backward is
  (softmax − one_hot) / N — so the world-size factor is checked mechanically, not only by
  reading.

Distributed checks run in spawned gloo processes (world sizes 1 and 2, once each, as in
tests/test_distributed.py); each test asserts one check on every rank.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from margin_ops.compat import insightface
from margin_ops.compat.insightface import CombinedMarginLoss, PartialFC_V2

from spawned_checks import spawned_results

D = 64  #: wide enough that random cosines stay small: no row's probability below arcface_torch's 1e-30 floor
ROWS = 5          #: rows per rank (arcface_torch needs the same batch size on every rank)
CLASSES = 11      #: not divisible by 2: shards of 6 and 5 classes
CONFIGS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4)}
#: Distributed checks only: one row's target cosine below cos(π − m2), where arcface_torch
#: keeps cos(θ + m2) (no fallback); s = 16 keeps that row's loss clear of its 1e-30 floor.
PAST_PI = {"arcface-past-pi": (16.0, 1.0, 0.5, 0.0)}
TOL = dict(rtol=1e-10, atol=1e-12)
PG_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------
# arcface_torch, re-stated


def arcface_torch_margin(logits, labels, s, m1, m2, m3):
    """losses.CombinedMarginLoss.forward: edits ``logits`` in place, returns s · logits."""
    index = torch.where(labels != -1)[0]
    target = logits[index, labels[index].view(-1)]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target.arccos_()
            logits.arccos_()
            logits[index, labels[index].view(-1)] = target + m2
            logits.cos_()
        return logits * s
    if m3 > 0:
        logits[index, labels[index].view(-1)] = target - m3
        return logits * s
    raise RuntimeError("arcface_torch raises here")


def gathered(x, w, labels, config):
    """(loss, dL/dX, dL/dW) of the full problem in one process."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    logits = arcface_torch_margin(logits, labels.view(-1, 1), *config)
    loss = F.cross_entropy(logits, labels, reduction="none")
    # arcface_torch floors each row's probability at 1e-30 (margin_ops does not): keep clear of it.
    assert loss.max() < 60, f"a row's loss is {loss.max().item()}: too close to arcface_torch's floor"
    loss = loss.mean()
    loss.backward()
    return loss.detach(), x.grad, w.grad


class _AllGather(torch.autograd.Function):
    """partial_fc_v2.AllGatherFunc: backward sums every rank's gradient of this rank's rows
    (its reduce to each owner) and multiplies by the world size."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        world, rank = dist.get_world_size(), dist.get_rank()
        rows = grad.shape[0] // world
        return grad[rank * rows:(rank + 1) * rows] * world


class _DistCrossEntropy(torch.autograd.Function):
    """partial_fc_v2.DistCrossEntropyFunc: forward over the class shards; backward
    (softmax − one_hot) / N, the gradient of one copy of the mean loss."""

    @staticmethod
    def forward(ctx, logits, labels):
        peak = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(peak, dist.ReduceOp.MAX)
        p = (logits - peak).exp()
        total = p.sum(dim=1, keepdim=True)
        dist.all_reduce(total)
        p = p / total
        index = torch.where(labels != -1)[0]
        target = torch.zeros(logits.shape[0], 1, dtype=logits.dtype)
        target[index] = p[index].gather(1, labels[index])
        dist.all_reduce(target)
        ctx.save_for_backward(index, p, labels)
        return -target.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad):
        index, p, labels = ctx.saved_tensors
        g = p.clone()
        g[index] -= torch.zeros(index.shape[0], p.shape[1], dtype=p.dtype).scatter_(1, labels[index], 1)
        return g / p.shape[0] * grad, None


def arcface_torch_sample(labels, positive_rows, num_local, num_sample):
    """partial_fc_v2.PartialFC_V2.sample (on the CPU): the rows of the shard, and the labels
    remapped to them (in place, as arcface_torch)."""
    positive = torch.unique(labels[positive_rows], sorted=True)
    if num_sample >= positive.shape[0]:
        perm = torch.rand(size=[num_local])
        perm[positive] = 2.0
        index = torch.topk(perm, k=num_sample)[1].sort()[0]
    else:
        index = positive
    labels[positive_rows] = torch.searchsorted(index, labels[positive_rows])
    return index


def sharded(x_r, weight_r, labels_r, config, class_start, sample_rate=1.0):
    """arcface_torch's PartialFC_V2.forward on this rank (every rank calls it)."""
    x = _AllGather.apply(x_r)
    parts = [torch.empty_like(labels_r) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels_r)
    labels = torch.cat(parts).view(-1, 1)
    num_local = weight_r.shape[0]
    local = (class_start <= labels) & (labels < class_start + num_local)
    labels[~local] = -1
    labels[local] -= class_start
    weight = weight_r
    if sample_rate < 1:
        index = arcface_torch_sample(labels, local, num_local, int(sample_rate * num_local))
        weight = weight_r[index]
    logits = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1, 1)
    return _DistCrossEntropy.apply(arcface_torch_margin(logits, labels, *config), labels)


# --------------------------------------------------------------------------------------
# Checks, run on every rank of the spawned groups


def problem(world, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * ROWS, D, generator=g, dtype=torch.float64)
    w = 0.01 * torch.randn(CLASSES, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (world * ROWS,), generator=g)
    return x, w, labels


def shard_of(rank, world):
    """arcface_torch's (class_start, num_local)."""
    base, extra = divmod(CLASSES, world)
    return base * rank + min(rank, extra), base + int(rank < extra)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def check_against_arcface_torch(name):
    def check(rank, world):
        config = {**CONFIGS, **PAST_PI}[name]
        x, w, labels = problem(world, seed=list(CONFIGS).index(name) if name in CONFIGS else 5)
        if name in PAST_PI:
            noise = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
            x[0] = -3 * F.normalize(w[labels[0]], dim=0) + 0.05 * noise
            assert F.cosine_similarity(x[0], w[labels[0]], dim=0) < math.cos(math.pi - config[2])
        ref_loss, ref_dx, ref_dw = gathered(x, w, labels, config)

        head = PartialFC_V2(CombinedMarginLoss(*config), D, CLASSES).double()
        start, num_local = shard_of(rank, world)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        with torch.no_grad():
            head.weight.copy_(w[start:start + num_local])
        x_r = x[rows].clone().requires_grad_()
        loss = head(x_r, labels[rows])
        loss.backward()

        w_r = w[start:start + num_local].clone().requires_grad_()
        x_r2 = x[rows].clone().requires_grad_()
        loss2 = sharded(x_r2, w_r, labels[rows].clone(), config, start)
        loss2.backward()

        close(loss.detach(), ref_loss, "loss vs gathered")
        close(head.weight.grad, ref_dw[start:start + num_local], "weight grad vs gathered")
        close(x_r.grad, world * ref_dx[rows], "embedding grad vs world_size x gathered")
        close(loss2.detach(), ref_loss, "sharded re-statement vs gathered (the test's own consistency)")
        close(loss.detach(), loss2.detach(), "loss vs sharded")
        close(head.weight.grad, w_r.grad, "weight grad vs sharded")
        close(x_r.grad, x_r2.grad, "embedding grad vs sharded")
    return check


def check_layout(rank, world):
    head = PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), D, CLASSES)
    start, num_local = shard_of(rank, world)
    state = head.state_dict()
    assert list(state) == ["weight"], list(state)
    assert state["weight"].shape == (num_local, D) and state["weight"].dtype == torch.float32
    assert (head.class_start, head.num_local, head.rank, head.world_size) == (start, num_local, rank, world)
    assert head.num_sample == num_local
    # arcface_torch's state_dict ({"weight": its shard}) loads, and ours loads into a module like it.
    theirs = {"weight": torch.normal(0, 0.01, (num_local, D))}
    head.load_state_dict(theirs)
    assert torch.equal(head.weight, theirs["weight"])
    plain = torch.nn.Module()
    plain.weight = torch.nn.Parameter(torch.empty(num_local, D))
    plain.load_state_dict(head.state_dict())
    assert torch.equal(plain.weight, theirs["weight"])
    big = PartialFC_V2(CombinedMarginLoss(64, 1, 0, 0.4), 64, 2000 * world)
    assert abs(big.weight.std().item() - 0.01) < 5e-4 and abs(big.weight.mean().item()) < 5e-4


def check_sampling(rank, world):
    """sample_rate < 1: the same classes as arcface_torch's draw (same CPU generator state),
    the same loss and gradients — with negatives drawn (few positives) and with more
    positives than num_sample (all positives, no negative)."""
    config, sample_rate = CONFIGS["arcface"], 0.5
    x, w, all_labels = problem(world, seed=7)
    few = torch.tensor([0, 6])[torch.arange(world * ROWS) % 2]  # one positive class per shard of 2
    start, num_local = shard_of(rank, world)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    for labels in (few, all_labels):
        head = PartialFC_V2(CombinedMarginLoss(*config), D, CLASSES, sample_rate=sample_rate).double()
        assert head.num_sample == int(sample_rate * num_local)
        with torch.no_grad():
            head.weight.copy_(w[start:start + num_local])
        x_r = x[rows].clone().requires_grad_()
        torch.manual_seed(100 + rank)
        loss = head(x_r, labels[rows])
        loss.backward()

        w_r = w[start:start + num_local].clone().requires_grad_()
        x_r2 = x[rows].clone().requires_grad_()
        torch.manual_seed(100 + rank)
        loss2 = sharded(x_r2, w_r, labels[rows].clone(), config, start, sample_rate)
        loss2.backward()
        close(loss.detach(), loss2.detach(), "sampled loss")
        close(head.weight.grad, w_r.grad, "sampled weight grad")
        close(x_r.grad, x_r2.grad, "sampled embedding grad")
        sampled = (head.weight.grad.abs().sum(1) > 0).sum().item()
        positives = labels[(labels >= start) & (labels < start + num_local)].unique().numel()
        assert sampled == max(head.num_sample, positives), (sampled, head.num_sample, positives)
        assert sampled < num_local


def check_fp16(rank, world):
    """fp16=True: computed under float16 autocast — close to, and not bitwise, float32; also
    with sampling (the same draw for both), where the sampled rows are copied and cast."""
    x, w, labels = problem(world, seed=3)
    config = CONFIGS["arcface"]
    for sample_rate in (1.0, 0.5):
        losses, weight_grads = [], []
        for fp16 in (False, True):
            head = PartialFC_V2(CombinedMarginLoss(*config), D, CLASSES, sample_rate, fp16=fp16)
            start, num_local = shard_of(rank, world)
            with torch.no_grad():
                head.weight.copy_(w[start:start + num_local])
            x_r = x[rank * ROWS:(rank + 1) * ROWS].float().requires_grad_()
            torch.manual_seed(200 + rank)
            loss = head(x_r, labels[rank * ROWS:(rank + 1) * ROWS])
            loss.backward()
            assert loss.dtype == torch.float32 and x_r.grad.dtype == head.weight.grad.dtype == torch.float32
            assert head.weight.grad.shape == (num_local, D)
            losses.append(loss.detach())
            weight_grads.append(head.weight.grad)
        assert not torch.equal(losses[0], losses[1]), "fp16=True computed in float32"
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
        sampled = [grad.abs().sum(1) > 0 for grad in weight_grads]
        assert torch.equal(*sampled), f"fp16 sampled other rows, or wrote gradients to others: {sampled}"


CHECKS = {f"{name}-vs-arcface_torch": check_against_arcface_torch(name) for name in [*CONFIGS, *PAST_PI]}
CHECKS.update({"state_dict-layout": check_layout, "sampling": check_sampling, "fp16": check_fp16})


results = spawned_results(__name__, PG_TIMEOUT_S)


@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("world", (1, 2))
def test_distributed(results, world, name):
    failures = [f"rank {rank}:\n{r[name]}" for rank, r in enumerate(results(world)) if r[name]]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------
# In this process: the margin mapping, direct calls, unsupported options


def test_mapping():
    arc = CombinedMarginLoss(64, 1, 0.5, 0)
    assert (arc.kind, arc.margin_kwargs) == ("combined", dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_grad="detach"))
    cos = CombinedMarginLoss(64, 1, 0, 0.4)
    assert (cos.kind, cos.margin_kwargs) == ("cosface", dict(s=64.0, m=0.4))
    assert CombinedMarginLoss(30, 1.0, 0.0, 0.0).margin_kwargs["m2"] == 0.0  # plain normalized softmax


@pytest.mark.parametrize("config", [*CONFIGS.values(), (64.0, 1.0, 0.0, 0.0)])
def test_direct_call_matches_arcface_torch(config):
    """Called on cosines, it returns arcface_torch's output, bit for bit, with its gradient
    (straight through the margin), also past θ + m2 > π (no fallback) and on rows labelled −1."""
    g = torch.Generator().manual_seed(0)
    cosines = torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1
    cosines[0, 2] = -0.99  # θ + m2 > π for the ArcFace config
    labels = torch.tensor([2, 0, -1, 8, 4, -1]).view(-1, 1)
    mine_in = cosines.clone().requires_grad_()
    theirs_in = cosines.clone().requires_grad_()
    mine = CombinedMarginLoss(*config)(mine_in, labels)
    theirs = arcface_torch_margin(theirs_in.clone(), labels, *config)
    assert torch.equal(mine, theirs)
    assert torch.equal(mine_in, cosines), "the input was modified"
    upstream = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mine.backward(upstream)
    theirs.backward(upstream)
    assert torch.equal(mine_in.grad, theirs_in.grad)


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        CombinedMarginLoss(64, 1, 0.5, 0, interclass_filtering_threshold=0.2)
    with pytest.raises(ValueError, match="m1 == 1 with m3 == 0"):
        CombinedMarginLoss(64, 0.9, 0.4, 0.0)  # arcface_torch fails on a bare `raise` here
    with pytest.raises(ValueError, match="m1 == 1 with m3 == 0"):
        CombinedMarginLoss(64, 1, 0.5, -0.1)
    with pytest.raises(ValueError, match="m2 must lie in"):
        CombinedMarginLoss(64, 1, 4.0, 0)
    with pytest.raises(ValueError, match="s must be"):
        CombinedMarginLoss(-1, 1, 0.5, 0)
    with pytest.warns(UserWarning, match="ignores m1 and m2"):
        assert CombinedMarginLoss(64, 1, 0.5, 0.2).kind == "cosface"  # as arcface_torch: m2 ignored
    with pytest.raises(TypeError, match="margin_loss must be margin_ops.compat.insightface.CombinedMarginLoss"):
        PartialFC_V2(lambda logits, labels: logits, D, CLASSES)


def test_readme_import_line():
    """The README's one-line change names what this module exports."""
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    assert "from margin_ops.compat.insightface import CombinedMarginLoss, PartialFC_V2" in readme
    assert set(insightface.__all__) == {"CombinedMarginLoss", "PartialFC_V2"}
