"""The README's first command, `python benchmarks/run.py`, on a tiny CPU problem: it must run
every margin it offers end to end and its own correctness check must pass for our backend
and the eager reference. No time or speed is asserted (speed is measured, not tested)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import contenders  # noqa: E402  (benchmarks/ is not a package)


@pytest.mark.slow
def test_run_py_checks_every_margin_on_a_tiny_problem(tmp_path):
    margins = list(contenders.MARGINS)
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", "cpu",
               "--shapes", "8x32x300", "--repeats", "1", "--warmup", "0", "--no-memory",
               "--contenders", "cpu", "eager", "torch-lce", "--margins", *margins,
               "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    seen = {(row["margin"], row["contender"]): row for row in rows}
    for margin in margins:
        for contender in ("cpu", "eager"):
            row = seen[(margin, contender)]
            assert row["check"]["status"] == "ok", (margin, contender, row["check"])
            assert row["time_ms"] > 0
        # torch's linear_cross_entropy has no margin: checked on the margin-free problem only
        expected = "ok" if margin == contenders.MARGIN_FREE else "no margin: not comparable"
        assert seen[(margin, "torch-lce")]["check"]["status"] == expected
    assert (tmp_path / "results.md").read_text().count("cpu (ours)") >= len(margins)


@pytest.mark.slow
def test_run_py_measures_memory_with_subcenters(tmp_path):
    """The extra-memory measurement (a fresh process, benchmarks/cpu_memory.py) on the
    margin whose inputs differ most (K = 3 weight rows per class)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", "cpu",
               "--shapes", "8x32x300", "--repeats", "1", "--warmup", "0",
               "--contenders", "cpu", "--margins", "subcenter-arcface", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["check"]["status"] == "ok", row
    assert row["c"] == 900 and row["extra_mib"] >= 0


def test_missing_peers_are_reported_not_run():
    """A peer package that is not installed is listed under "Not run" with the reason, and a
    CUDA-only peer is refused on the CPU even when installed."""
    every = contenders.all_contenders()
    for name, (module, cuda_only) in contenders.PEERS.items():
        reason = contenders.unavailable_reason(every[name], "cpu", requested=True)
        if module is not None and contenders.importlib.util.find_spec(module) is None:
            assert reason == f"{module} is not installed"
        elif cuda_only:
            assert reason == "its kernels run on CUDA only"
        else:
            assert reason is None, (name, reason)
