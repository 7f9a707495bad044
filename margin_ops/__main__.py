"""`python -m margin_ops`: which backends this install has, and the default per device.

`python -m margin_ops --cpp-header > csrc/margin_kinds.h` writes the C++ header generated
from the margin registry (margin_ops.spec.cpp_header).
"""

import sys

import torch

import margin_ops
from margin_ops import backends, spec


def main() -> None:
    if sys.argv[1:] == ["--cpp-header"]:
        sys.stdout.write(spec.cpp_header())
        return
    if sys.argv[1:]:
        sys.exit("usage: python -m margin_ops [--cpp-header]")
    print(f"margin_ops {margin_ops.__version__}, torch {torch.__version__}")
    for name, missing in backends.available_backends().items():
        print(f"  {name:<10} {'available' if missing is None else 'unavailable: ' + missing}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            print(f"default for {device}: {backends.default_backend(device)}")
        except RuntimeError as error:
            print(f"default for {device}: none ({error})")


if __name__ == "__main__":
    main()
