"""Runs a test module's multi-process checks in spawned gloo process groups, once per world size.

A test module defines ``CHECKS`` ({name: check(rank, world)}) and
``results = spawned_results(__name__, timeout_s)``; its tests then read
``results(world)``: for each rank, {check name: traceback, or "" if the check passed}.
Spawning processes is slow, so each world size is spawned once per module.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, out_dir: str, module: str, timeout_s: float):
    torch.set_num_threads(1)  # 2-4 processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    for name, check in importlib.import_module(module).CHECKS.items():
        try:
            check(rank, world)
            results[name] = ""
        except Exception:  # noqa: BLE001  (reported by the test of that check)
            results[name] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    # Tear down together, then leave without interpreter finalization, where gloo's threads
    # can abort a process (cf. pytorch/pytorch#179291): a rank died of SIGABRT ("terminate
    # called without an active exception") in about 1 of 15 runs on 2 busy cores.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_results(module: str, timeout_s: float):
    """A module-scoped fixture: world size -> [{check name: traceback or ""} per rank] of
    ``module``'s CHECKS, run with a process-group timeout of ``timeout_s``."""

    @pytest.fixture(scope="module")
    def results(tmp_path_factory):
        cache = {}

        def get(world: int):
            if world not in cache:
                out_dir = tmp_path_factory.mktemp(f"{module}_world{world}")
                try:
                    mp.spawn(_worker, args=(world, _free_port(), str(out_dir), module, timeout_s),
                             nprocs=world)
                except mp.ProcessExitedException as error:
                    written = sorted(p.name for p in out_dir.glob("*.pt"))
                    raise AssertionError(f"{error}; result files written before it: {written}") from error
                cache[world] = [torch.load(out_dir / f"{rank}.pt") for rank in range(world)]
            return cache[world]
        return get

    return results
