"""margin_ops's CUDA kernels (csrc/cuda) under the host emulator of tools/cuda_emulator:
build_emulator.load() builds and imports them as a CPU torch extension (driver.cpp: the
Python entry points; ptx_probe.cpp: single emulated PTX instructions, for layout tests).
Import with ``tools/`` on sys.path: ``from margin_emulated import build_emulator``."""
