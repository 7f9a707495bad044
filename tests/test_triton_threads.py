"""The Triton backend under the interpreter (TRITON_INTERPRET=1), called from several threads.

The interpreter swaps module-level state of triton.language while a kernel runs, so two
interpreted launches at once corrupt each other; margin_ops.triton serializes them. Each
thread here runs the forward and backward twins on its own inputs, and every result must
equal bit for bit the same call made on one thread.

Runs only when the kernels are interpreted (TRITON_INTERPRET=1 set before margin_ops is
imported, e.g. ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_threads.py``).
"""

from __future__ import annotations

import threading

import pytest
import torch

import margin_ops
import margin_ops.triton

pytestmark = pytest.mark.skipif(not margin_ops.triton.INTERPRETED,
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1 before import)")

THREADS = 4
ROUNDS = 3
#: Margin arguments of margin_lse after (x, weight, labels): margin, s, m1, m2, m3, lamb,
#: feature_scale, detach_margin_grad (the options follow: see inputs).
MARGINS = [
    ("arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False),
    ("cosface", 30.0, 1.0, 0.0, 0.35, 0.0, False, False),
    ("combined", 32.0, 0.9, 0.3, 0.1, 0.0, False, True),
    ("sphereface", 1.0, 4.0, 0.0, 0.0, 5.0, True, False),
]


def inputs(seed: int):
    """Per-thread problem: several row blocks and class blocks, so each launch has many
    programs; odd seeds also take the options (2 sub-centers, a class_index, hard examples)."""
    g = torch.Generator().manual_seed(seed)
    n, c, d = 40 + seed, 70 + 3 * seed, 24
    subcenters = 1 + seed % 2
    x = torch.randn(n, d, generator=g)
    weight = torch.randn(c * subcenters, d, generator=g)
    class_index = hard_threshold = hard_t = None
    if subcenters > 1:
        class_index = torch.randperm(c, generator=g)[:c // 2]
        hard_threshold = torch.rand(n, generator=g) * 0.6 - 0.3
        hard_t = torch.rand(n, generator=g)
    classes = c if class_index is None else class_index.shape[0]
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[::5] = -100  # rows without a target
    grads = torch.randn(3, n, generator=g).unbind()  # of lse, target_logit, nontarget_sum
    options = (None, subcenters, class_index, hard_threshold, hard_t)  # allow_tf32, ...
    return x, weight, labels, grads, (*MARGINS[seed % len(MARGINS)], *options)


def forward_backward(x, weight, labels, grads, primitive_args):
    lse, target, max_cos, pred, nontarget_sum = torch.ops.margin.margin_lse_triton(x, weight, labels,
                                                                                   *primitive_args)
    grad_x, grad_weight = torch.ops.margin.margin_lse_backward_triton(*grads, x, weight, labels, lse,
                                                                      *primitive_args)
    return lse, target, max_cos, pred, nontarget_sum, grad_x, grad_weight


@pytest.mark.slow
def test_threads_match_single_threaded():
    problems = [inputs(seed) for seed in range(THREADS)]
    expected = [forward_backward(*p) for p in problems]  # one thread at a time
    results = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(i):
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[i].append(forward_backward(*problems[i]))
        except Exception as error:  # noqa: BLE001  (reported below, with its thread)
            errors.append((i, repr(error)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors
    names = ("lse", "target_logit", "max_cos", "pred", "nontarget_sum", "grad_x", "grad_weight")
    mismatches = [(i, r, name) for i in range(THREADS) for r, got in enumerate(results[i])
                  for name, a, b in zip(names, got, expected[i]) if not torch.equal(a, b)]
    assert not mismatches, f"(thread, round, output) differing from the single-threaded call: {mismatches}"
    assert all(len(r) == ROUNDS for r in results)
