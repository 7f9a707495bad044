"""`python -m margin_ops`: which backends this install has, what each can run on this
machine, and the backend the ops use per device.

`python -m margin_ops --cpp-header > csrc/margin_kinds.h` writes the C++ header generated
from the margin registry (margin_ops.spec.cpp_header).
"""

import os
import sys

import torch

import margin_ops
from margin_ops import backends, spec

_TENSORS = {"cpu": "CPU tensors", "cuda": "CUDA tensors"}


def _where(devices) -> str:
    return " and ".join(_TENSORS.get(d, f"{d} tensors") for d in devices)


def describe(name: str, gpu: bool) -> str:
    """What backend ``name`` can do on this machine (``gpu``: a CUDA GPU is visible)."""
    entry = backends._registry[name]
    missing = entry.missing()
    if missing is not None:
        return f"unavailable: {missing}"
    present = ("cpu", "cuda") if gpu else ("cpu",)
    runs = [d for d in entry.devices() if d in present]
    if name == "triton":
        if "cpu" in entry.devices():  # the interpreter: CPU tensors (and CUDA ones, copied)
            return (f"interpreted (TRITON_INTERPRET=1): runs on {_where(runs)}, "
                    "slowly; for testing only")
        if not runs:
            return ("installed, but no GPU: runs only interpreted (TRITON_INTERPRET=1, set before "
                    "margin_ops is imported), for testing")
    if name == "cuda" and not runs:
        return "built, but no CUDA GPU is visible: cannot run here"
    if not runs:
        return f"cannot run here (it runs on {_where(entry.devices())})"
    note = " (plain PyTorch with the N x C logits: the oracle, not fast)" if name == "reference" else ""
    return f"runs here on {_where(runs)}{note}"


def main() -> None:
    if sys.argv[1:] == ["--cpp-header"]:
        sys.stdout.write(spec.cpp_header())
        return
    if sys.argv[1:]:
        sys.exit("usage: python -m margin_ops [--cpp-header]")
    gpu = torch.cuda.is_available()
    if gpu:
        machine = f"CUDA GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    elif torch.version.cuda is None:
        machine = "no GPU: this torch is a CPU build"
    else:
        machine = f"no CUDA GPU visible (this torch is built for CUDA {torch.version.cuda})"
    print(f"margin_ops {margin_ops.__version__}, torch {torch.__version__}; {machine}")
    print("backends:")
    for name in backends.BACKENDS:
        print(f"  {name:<10} {describe(name, gpu)}")
    chosen = os.environ.get(backends.ENV_VAR)
    for device in ["cpu"] + (["cuda"] if gpu else []):
        try:
            name = backends.current_backend(device)
            how = f"{backends.ENV_VAR}={chosen}" if chosen else "fastest here"
            label = "default" if not chosen else "selected"
            print(f"{label} for {device}: {name} ({how})")
        except (RuntimeError, ValueError) as error:
            print(f"{'default' if not chosen else 'selected'} for {device}: none ({error})")


if __name__ == "__main__":
    main()
