"""Overhead of the class-sharded loss over the plain op (issue 5: <= 10 % at world size 1, NCCL).

    python benchmarks/distributed_overhead.py                        # world size 1, started here
    torchrun --nproc_per_node=8 benchmarks/distributed_overhead.py   # any world size
    python benchmarks/distributed_overhead.py --quick                # a small CPU smoke run

Without torchrun the script starts a world of one itself (nccl on a GPU, gloo on a CPU).
Each rank holds an N x D batch and C / W classes (the whole weight at world size 1). Both
contenders do the same kernel work, forward + backward of ArcFace on the rank's classes for
the global batch of W·N rows:

* ``plain``: ``torch.ops.margin.arcface`` on the (W·N, D) batch and the rank's (C/W, D) shard;
* ``sharded``: ``margin_ops.distributed.margin_loss`` on the rank's (N, D) batch and shard —
  adds the size exchange (one host sync), the gathers, the lse/target-logit all-reduces and
  the gradient reduce-scatter;
* ``partial_fc``: ``PartialFC`` with ``--sample-rate`` (default 1: the same work as sharded;
  below 1 it does less kernel work, so its "overhead" is then negative).

Timing: ``--steps`` back-to-back steps between two device synchronizations (so a host sync
inside a step costs what it costs in a training loop: the host can no longer run ahead),
repeated ``--repeats`` times (the contenders taking turns); the median time per step is printed with the overhead over
``plain``. At world size 1 the collectives are copies; with more ranks the overhead also
counts the communication.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from margin_ops import distributed  # also registers torch.ops.margin

#: docs/design.md §2.4, "ms1mv2" (one GPU), and a CPU-sized problem for --quick.
DEFAULT_SHAPE = (512, 512, 85_742)
QUICK_SHAPE = (64, 64, 2_000)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None, help="NxDxC: rows per rank, features, classes in all "
                        f"(default {'x'.join(map(str, DEFAULT_SHAPE))}; --quick: {'x'.join(map(str, QUICK_SHAPE))})")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shape, few steps: checks that it runs")
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick and args.shape is None else DEFAULT_SHAPE
    args.n, args.d, args.c = map(int, args.shape.split("x")) if args.shape else shape
    if args.quick:
        args.steps, args.repeats = 3, 3
    return args


def init_process_group(use_cuda: bool) -> None:
    """torchrun's environment, or a world of one on a free local port."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0", WORLD_SIZE="1")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(contenders: dict, device: torch.device, steps: int, repeats: int) -> dict:
    """{name: median over ``repeats`` of (wall time of ``steps`` back-to-back steps) / steps}.

    The contenders take turns within each repeat, so drifting machine load hits them alike.
    """
    for step in contenders.values():
        step()  # warm-up: lazy initialization, allocator
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, step in contenders.items():
            synchronize(device)
            dist.barrier()  # every rank starts together
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    init_process_group(use_cuda)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = DTYPES[args.dtype or ("bf16" if use_cuda else "fp32")]

    torch.manual_seed(rank)
    head = distributed.PartialFC(args.d, args.c, sample_rate=args.sample_rate, device=device, dtype=dtype)
    shard = head.weight.detach().clone().requires_grad_()
    x = torch.randn(args.n, args.d, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.c, (args.n,), device=device)
    # The plain op sees what the shard's kernel sees: the global batch, labels local to the shard.
    x_global = torch.randn(world * args.n, args.d, device=device, dtype=dtype, requires_grad=True)
    labels_global = torch.randint(0, shard.shape[0], (world * args.n,), device=device)

    def plain():
        torch.ops.margin.arcface(x_global, shard, labels_global).backward()

    def sharded():
        distributed.margin_loss(x, shard, labels).backward()

    def partial_fc():
        head(x, labels).backward()

    results = seconds_per_step({"plain": plain, "sharded": sharded, "partial_fc": partial_fc}, device,
                               args.steps, args.repeats)
    if rank == 0:
        print(f"world size {world} ({dist.get_backend()}), {device}, {dtype}, N={args.n} per rank, "
              f"D={args.d}, C={args.c} ({shard.shape[0]} on rank 0), sample_rate={args.sample_rate}")
        for name, seconds in results.items():
            overhead = (seconds / results["plain"] - 1) * 100
            print(f"{name:>10}: {seconds * 1e3:9.3f} ms/step   overhead {overhead:+6.1f} %")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
