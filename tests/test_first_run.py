"""What a new user sees first: `python -m margin_ops` on a machine without a GPU,
`margin_ops.current_backend()` without arguments, setup.py's message when the build cannot
see torch, and the architectures a GPU build embeds (tests/test_example.py covers the
example's --help without scikit-learn)."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import margin_ops
from margin_ops import __main__ as cli
from margin_ops import backends, reference

REPO = Path(__file__).resolve().parents[1]


def fake(devices):
    return backends.Backend(reference.margin_lse, lambda: devices, lambda: None)


def test_current_backend_defaults_to_the_gpu_if_there_is_one(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setitem(backends._registry, "cuda", fake(("cuda",)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert margin_ops.current_backend() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert margin_ops.current_backend() == "cpu"
    assert margin_ops.current_backend(torch.device("cuda", 1)) == margin_ops.current_backend("cuda:1") == "cuda"
    with margin_ops.backend("reference"):
        assert margin_ops.current_backend() == "reference"


def describe_triton(monkeypatch, devices, gpu):
    monkeypatch.setitem(backends._registry, "triton", fake(devices))
    return cli.describe("triton", gpu)


def test_triton_without_a_gpu_is_not_called_available(monkeypatch):
    """Compiled Triton (runs on CUDA tensors) on a machine without a GPU: it cannot run here."""
    text = describe_triton(monkeypatch, ("cuda",), gpu=False)
    assert text.startswith("installed, but no GPU: runs only interpreted (TRITON_INTERPRET=1"), text
    assert describe_triton(monkeypatch, ("cuda",), gpu=True) == "runs here on CUDA tensors"
    interpreted = describe_triton(monkeypatch, ("cuda", "cpu"), gpu=False)
    assert interpreted.startswith("interpreted (TRITON_INTERPRET=1): runs on CPU tensors"), interpreted
    assert "for testing" in interpreted


def test_built_cuda_kernels_without_a_gpu_cannot_run_here(monkeypatch):
    monkeypatch.setitem(backends._registry, "cuda", fake(("cuda",)))
    assert cli.describe("cuda", gpu=False) == "built, but no CUDA GPU is visible: cannot run here"
    assert cli.describe("cpu", gpu=False) == "runs here on CPU tensors"


def test_gpus_older_than_sm80_default_to_triton(monkeypatch):
    """A V100 / T4 has no CUDA kernels of ours (cp.async, bf16 mma.sync need sm_80): the
    cuda backend says so, and the default for CUDA tensors is Triton, not a failed launch."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(backends._registry, "triton", fake(("cuda",)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert backends.available_backends()["cuda"] == "the CUDA kernels need compute capability >= 8.0; this GPU is 7.5"
    assert backends.default_backend("cuda") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert backends.available_backends()["cuda"] is None and backends.default_backend("cuda") == "cuda"


def test_python_m_margin_ops_on_a_machine_without_gpu():
    """As a new user runs it: no TRITON_INTERPRET, no backend chosen, no GPU visible."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backends.ENV_VAR)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-m", "margin_ops"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    lines = {line.split()[0]: line for line in run.stdout.splitlines() if line.startswith("  ")}
    assert sorted(lines) == sorted(backends.BACKENDS), run.stdout
    assert "runs here" not in lines["triton"] and "runs here" not in lines["cuda"], run.stdout
    if backends.available_backends()["triton"] is None:  # the triton package is installed
        assert "no GPU: runs only interpreted (TRITON_INTERPRET=1" in lines["triton"], run.stdout
    assert "runs here on CPU tensors" in lines["cpu"], run.stdout
    assert "default for cpu: cpu" in run.stdout


def run_setup_py(monkeypatch):
    """Runs setup.py in this process; returns the SystemExit message, or the setup() arguments."""
    captured = {}
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    try:
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    except SystemExit as exit:
        return str(exit.code)
    return captured


def test_setup_py_explains_build_isolation(tmp_path):
    """pip's isolated build: the same interpreter, but its site-packages (and torch) dropped
    from sys.path and pip's /tmp/pip-build-env-*/site put in front, as pip's sitecustomize does."""
    script = f"""
import runpy, site, sys
import setuptools  # the isolated environment has it (pyproject.toml's build requirement)
hidden = set(site.getsitepackages() + [site.getusersitepackages()])
sys.path[:] = [{str(tmp_path / "pip-build-env-x" / "site")!r}] + [p for p in sys.path if p not in hidden]
for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[name]
runpy.run_path("setup.py", run_name="__main__")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"torch is installed ({Path(torch.__file__).parent})" in run.stderr, run.stderr
    assert "isolated build environment" in run.stderr and "--no-build-isolation" in run.stderr, run.stderr


def test_setup_py_without_torch_gives_the_cpu_install_command():
    script = 'import runpy, sys; sys.modules["torch"] = None; runpy.run_path("setup.py", run_name="__main__")'
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "there is none" in run.stderr, run.stderr
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in run.stderr, run.stderr


def test_gpu_build_embeds_ptx_for_newer_gpus(monkeypatch):
    """With a CUDA torch and nvcc, setup.py's default arch list compiles sm_80 and sm_90a
    machine code and compute_80 PTX (what GPUs after Hopper JIT-compile); a user's
    TORCH_CUDA_ARCH_LIST still replaces it."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    for user, expected in [
        (None, {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                "-gencode=arch=compute_80,code=compute_80"}),
        ("8.6", {"-gencode=arch=compute_86,code=sm_86"}),
    ]:
        if user is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", user)
        setup_args = run_setup_py(monkeypatch)
        extension = setup_args["ext_modules"][0]
        assert any(source.endswith(".cu") for source in extension.sources), extension.sources
        flags = cpp_extension._get_cuda_arch_flags(extension.extra_compile_args["nvcc"])
        assert set(flags) == expected, (user, flags)
