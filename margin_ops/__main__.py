"""`python -m margin_ops`: which backends this install has, and the default per device."""

import torch

import margin_ops
from margin_ops import backends


def main() -> None:
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
