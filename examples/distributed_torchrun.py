"""Trains a tiny model with the class-sharded PartialFC head, one process per device.

    torchrun --nproc_per_node=2 examples/distributed_torchrun.py [--steps 40] [--sample-rate 0.5]

Backend: nccl with one GPU per process (cuda:LOCAL_RANK) when CUDA is available, else gloo
on CPU. Data: synthetic — NUM_CLASSES class centres in an INPUT_DIM-d space, samples are
centre + noise, drawn by each rank with its own seed; the ranks use different batch sizes
(BATCH_SIZE + rank) to show that uneven batches are fine. Model: an MLP backbone wrapped in
DDP, and ``margin_ops.distributed.PartialFC`` (ArcFace, classes sharded over the ranks,
``--sample-rate`` of each shard's classes per step) outside DDP. The features' gradient is
scaled by the world size, so that DDP's average becomes the gradient of the global-batch
loss (see the margin_ops.distributed docstring).

Rank 0 prints the loss and the training accuracy every step (top-1 over the classes sampled
that step), then the accuracy on a fresh batch over all classes (the head in eval mode).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from margin_ops import distributed

INPUT_DIM = 32
EMBEDDING_SIZE = 16
NUM_CLASSES = 101  # not divisible by the world size: the first shards get one class more
BATCH_SIZE = 64
NOISE = 0.5


def make_batch(centres: torch.Tensor, size: int, generator: torch.Generator, device):
    """inputs (size, INPUT_DIM) float32 and labels (size,) int64, on ``device``."""
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    inputs = centres[labels] + NOISE * torch.randn(size, INPUT_DIM, generator=generator)
    return inputs.to(device), labels.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sample-rate", type=float, default=0.5)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same backbone and class centres on every rank
    centres = torch.randn(NUM_CLASSES, INPUT_DIM)
    backbone = nn.Sequential(nn.Linear(INPUT_DIM, 64), nn.ReLU(), nn.Linear(64, EMBEDDING_SIZE)).to(device)
    backbone = DistributedDataParallel(backbone, device_ids=[device.index] if use_cuda else None)
    torch.manual_seed(1 + rank)  # each rank: its own shard's init, class sampling and data
    head = distributed.PartialFC(EMBEDDING_SIZE, NUM_CLASSES, kind="arcface", sample_rate=args.sample_rate,
                                 device=device, s=16.0, m=0.3)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)
    if rank == 0:
        print(f"world size {world} ({dist.get_backend()}), {NUM_CLASSES} classes, this rank's head: {head}")

    for step in range(1, args.steps + 1):
        inputs, labels = make_batch(centres, BATCH_SIZE + rank, data, device)
        features = backbone(inputs)
        if world > 1:
            features.register_hook(lambda grad: grad * world)  # DDP averages; the global loss needs the sum
        out = head(features, labels, return_stats=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        correct = torch.stack([(out.pred == labels).sum(), torch.tensor(labels.numel(), device=device)])
        dist.all_reduce(correct)
        if rank == 0:
            print(f"step {step}/{args.steps}  loss {out.loss.item():.4f}  "
                  f"train accuracy (sampled classes) {correct[0].item() / correct[1].item():.3f}")

    backbone.eval()
    head.eval()
    with torch.no_grad():
        inputs, labels = make_batch(centres, BATCH_SIZE, data, device)
        out = head(backbone(inputs), labels, return_stats=True)
        correct = (out.pred == labels).sum()
        dist.all_reduce(correct)
    if rank == 0:
        print(f"eval loss {out.loss.item():.4f}  eval accuracy (all classes) "
              f"{correct.item() / (world * BATCH_SIZE):.3f}")
    # Free DDP (and its reducer) while every rank is still connected: left to interpreter
    # exit, its teardown intermittently hangs under gloo once the peer has exited (seen in
    # about one run in three on 2 CPU ranks).
    del backbone
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
