"""CuTe's layouts as plain data, for the tests that check the emulator's tensor-core
instructions against them (tests/test_cuda_emulated.py: mma.sync, ldmatrix;
tests/test_emulator_hopper.py: wgmma, TMA). Transcribed from CuTe, independently of the
emulator, so that the two cannot share one misunderstanding."""


def cute_index(shape, stride, i: int) -> int:
    """The index a CuTe layout (shape, stride), flattened, maps the flat coordinate i to:
    i is decomposed first-mode-fastest (colexicographic), as CuTe does."""
    index = 0
    for s, d in zip(shape, stride):
        index += (i % s) * d
        i //= s
    return index
