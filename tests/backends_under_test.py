"""The backends the conformance suite runs every scenario on, and how each is tolerated.

A :class:`BackendUnderTest` says where its tensors live, which ``margin_ops.backend``
name routes the public ops to it, which custom ops are its primitive pair (for opcheck),
how close to the float64 reference it must be per dtype, and why it cannot run here when
it cannot. ``tests/conftest.py`` turns :data:`BACKENDS` into the ``backend`` fixture.

* ``reference``: margin_ops.reference through the backend switch (plain PyTorch).
* ``cpu``: the C++ CPU kernels.
* ``cuda-emulated``: the CUDA kernels' own source run on CPU tensors by the host emulator
  (tools/cuda_emulator); wired in as the ``"cuda"`` backend for CPU tensors while a test runs.
* ``cuda-emulated-sm90``: the same, told compute capability 9.0: the forward runs
  fwd_main_sm90_kernel and the backward bwd_tile_sm90_kernel (TMA, mbarriers, wgmma)
  wherever they apply; bfloat16 and float16
  only (the other dtypes take the mma.sync path ``cuda-emulated`` tests).
* ``triton-interpreted``: the Triton kernels under ``TRITON_INTERPRET=1`` (which
  tests/conftest.py sets on machines without a GPU, before margin_ops is imported).
* ``cuda`` / ``triton``: the same kernels on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import margin_ops
from margin_ops import backends, ops

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ALL_DTYPES = (F64, F32, BF16, F16)

#: Relative tolerances (loss, gradients) against the float64 reference, per input dtype.
#: An error is judged against the largest |value| of the tensor (conftest.assert_close).
#:
#: * float64: kernel and reference are both float64 and differ only in the order of the
#:   reductions (block-wise logsumexp, GEMMs split by class block): a few ulps, amplified
#:   at most by s·|φ'| ≈ 1e2 to 1e3, so 1e-10 is ample and still catches any real error.
#: * float32: cosines are float32 GEMM results (error ~ D·2^-24 ≈ 1e-6 for D ≤ 512),
#:   multiplied by s = 64 before exp: logits carry ~1e-5 absolute error, ~1e-5 relative on
#:   probabilities and gradients; 1e-4 leaves a 10x margin.
#: * bfloat16 / float16 in the fused kernels: the inputs are upcast and everything is
#:   accumulated in float32, so the loss is as good as float32's (same rounded inputs as
#:   the reference: 1e-4); the gradients are rounded to 16 bits on output: bfloat16 keeps
#:   8 significant bits (≤ 2^-9 ≈ 2e-3; seen 3.8e-3 max-scaled), float16 11 bits (≤ 2^-12;
#:   seen 5e-4). 1e-2 and 4e-3 are ≥ 2.5x the worst seen, inside 16-bit training's ~2e-2.
FUSED = {F64: (1e-10, 1e-10), F32: (1e-4, 1e-4), BF16: (1e-4, 1e-2), F16: (1e-4, 4e-3)}
#: The Triton backward rounds x̂ and dS′ to the input dtype for its gradient GEMMs, as the
#: CUDA backward does. Its earlier backward rounded the dcos tile instead (bfloat16 gradients
#: seen up to 1.06e-2 max-scaled, N=64 D=128 C=1000), which set 2e-2; the present one passes
#: it and has not been tried at the CUDA kernels' 1e-2.
TRITON = {**FUSED, BF16: (1e-4, 2e-2)}
#: The reference computes 16-bit inputs as eager PyTorch does: F.linear in the input dtype,
#: so the cosines themselves are rounded to 8 (bfloat16) or 11 (float16) bits before the
#: scale s = 64: logits off by up to s·2^-9 ≈ 0.13 (bfloat16), probabilities by as much
#: relative. Seen (max-scaled, the OP_CONFIGS): bfloat16 loss 5.7e-3, gradients 3.0e-2;
#: float16 loss 2.8e-4, gradients 3.2e-3.
REFERENCE = {**FUSED, BF16: (2e-2, 8e-2), F16: (1e-3, 1e-2)}
#: float32 with TF32 products (matmul precision "high"): operands rounded to 10 mantissa
#: bits (2^-11 relative), a cosine error ~1e-4 times s = 64 in the logits.
TF32 = (2e-2, 2e-2)

INTERPRETER_HINT = ("runs under TRITON_INTERPRET=1, which tests/conftest.py sets only on machines "
                    "without a GPU (set it yourself to run these on a GPU machine)")


class BackendUnderTest(NamedTuple):
    name: str                      #: fixture id
    op_backend: str                #: the ``margin_ops.backend`` name that routes to it
    device: str                    #: where its tensors live
    forward_op: str | None         #: its primitive's op in torch.ops.margin (None: not a custom op)
    tolerances: dict               #: dtype -> (loss rtol, gradient rtol)
    missing: Callable[[], str | None]  #: why it cannot run here, or None
    #: its float32 results change under matmul precision "high" (TF32 products). The
    #: Triton interpreter takes the TF32 code path but multiplies exactly (numpy).
    follows_tf32: bool = False
    #: the largest N·C·D the shape scenarios give it (None: any); the emulator and the
    #: Triton interpreter run a thread / program at a time, ~1e5 products a second
    max_work: int | None = None
    #: the input dtypes of the cases parametrized by dtype it runs (None: all); the others
    #: are deselected, as another backend runs the same kernels for them
    dtypes: tuple | None = None

    def runs_dtype(self, dtype) -> bool:
        return self.dtypes is None or dtype is None or dtype in self.dtypes

    def too_slow_for(self, n: int, d: int, c: int) -> bool:
        return self.max_work is not None and n * c * d > self.max_work

    @property
    def primitive(self):
        """(forward, backward) OpOverloads of its primitive pair."""
        return (getattr(torch.ops.margin, self.forward_op).default,
                getattr(torch.ops.margin, self.forward_op.replace("margin_lse", "margin_lse_backward", 1)).default)

    def lse_fn(self) -> Callable:
        """Its margin_lse (x, weight, labels, *margin args) -> (lse, target_logit, max_cos, pred)."""
        return backends.margin_lse_for(torch.device(self.device))

    @contextlib.contextmanager
    def active(self):
        """The public ops run on this backend inside the block."""
        emulated = self.name in ("cuda-emulated", "cuda-emulated-sm90")
        with _emulated_cuda_installed(90 if self.name == "cuda-emulated-sm90" else 80) if emulated \
                else contextlib.nullcontext(), margin_ops.backend(self.op_backend):
            yield self


def _no_gpu() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA GPU"


def _triton_interpreted() -> bool:
    try:
        import margin_ops.triton as mt
    except ImportError:
        return False
    return mt.INTERPRETED


def _missing_triton(on_gpu: bool) -> Callable[[], str | None]:
    def missing():
        why = backends.available_backends()["triton"]
        if why is not None:
            return why
        if on_gpu:
            return _no_gpu() or ("the Triton interpreter is on in this process" if _triton_interpreted() else None)
        return None if _triton_interpreted() else INTERPRETER_HINT
    return missing


def _missing_cuda() -> str | None:
    return _no_gpu() or backends.available_backends()["cuda"]


# ---------------------------------------------------------------------------------------
# The emulated CUDA kernels, as twins of the primitive pair for CPU tensors.

#: The device size the launchers are told (it sets the forward's class splits and the
#: backward's dX splits): 2 SMs give several splits on the small problems of the tests.
EMULATED_NUM_SMS = 2
#: The compute capability the launchers are told (major·10 + minor): 80, or 90 inside
#: ``cuda-emulated-sm90``'s block (the sm_90a forward where it applies).
_emulated_arch = 80
_emulator = None


def emulator():
    """The compiled emulator extension (built on first use, incrementally), or None with
    the reason in :func:`_missing_emulator` when the CUDA headers are absent."""
    global _emulator
    if _emulator is None:
        _emulator = _build_emulator().load()
    return _emulator


def _build_emulator():
    tools = Path(__file__).resolve().parents[1] / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    from margin_emulated import build_emulator
    return build_emulator


def _missing_emulator() -> str | None:
    if _build_emulator().cuda_include_dir() is None:
        if os.environ.get("MARGIN_OPS_REQUIRE_EMULATOR"):
            raise RuntimeError("MARGIN_OPS_REQUIRE_EMULATOR is set but the CUDA headers were not found")
        return "CUDA headers not found (set CUDA_HOME); .ci/run requires them and runs these cases"
    return None


def _tf32(x: torch.Tensor, allow_tf32) -> bool:
    return x.dtype == F32 and (backends.tf32_allowed() if allow_tf32 is None else allow_tf32)


def _emulated_forward(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach, allow_tf32=None,
                      subcenters=1, class_index=None, hard_threshold=None, hard_t=None):
    return emulator().forward(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach,
                              _tf32(x, allow_tf32), subcenters, class_index, hard_threshold, hard_t,
                              EMULATED_NUM_SMS, _emulated_arch)


def _emulated_backward(grad_lse, grad_target, grad_nontarget_sum, x, weight, labels, lse, margin, s, m1, m2, m3,
                       lamb, feature_scale, detach, allow_tf32=None, subcenters=1, class_index=None,
                       hard_threshold=None, hard_t=None):
    return emulator().backward(grad_lse, grad_target, grad_nontarget_sum, x, weight, labels, lse, margin, s, m1,
                               m2, m3, lamb, feature_scale, detach, _tf32(x, allow_tf32), subcenters, class_index,
                               hard_threshold, hard_t, EMULATED_NUM_SMS, _emulated_arch)


_emulated_lib = None


def _register_emulated_ops() -> None:
    """margin::margin_lse_cuda_emulated and its backward: the C++ block's schemas, the
    emulated kernels for CPU tensors, and the ops' autograd/fake/autocast formulas (as
    margin_ops.triton defines its twins)."""
    global _emulated_lib
    if _emulated_lib is not None:
        return
    _emulated_lib = torch.library.Library("margin", "FRAGMENT")
    for original, name, kernel in (("margin_lse", "margin_lse_cuda_emulated", _emulated_forward),
                                   ("margin_lse_backward", "margin_lse_backward_cuda_emulated", _emulated_backward)):
        schema = str(getattr(torch.ops.margin, original).default._schema)
        _emulated_lib.define(name + schema[schema.index("("):])
        _emulated_lib.impl(name, kernel, "CPU")
    ops.register_primitive(_emulated_lib, "margin_lse_cuda_emulated", "margin_lse_backward_cuda_emulated")


@contextlib.contextmanager
def _emulated_cuda_installed(arch: int = 80):
    """Backend "cuda" = the emulated CUDA kernels, for CPU tensors, told compute capability
    ``arch`` (major·10 + minor), inside the block."""
    global _emulated_arch
    emulator()
    _register_emulated_ops()
    previous, previous_arch = backends._registry["cuda"], _emulated_arch
    _emulated_arch = arch
    backends._registry["cuda"] = backends.Backend(
        margin_lse=torch.ops.margin.margin_lse_cuda_emulated, devices=lambda: ("cpu",), missing=lambda: None)
    try:
        yield
    finally:
        backends._registry["cuda"] = previous
        _emulated_arch = previous_arch


BACKENDS = (
    BackendUnderTest("reference", "reference", "cpu", None, REFERENCE, lambda: None),
    BackendUnderTest("cpu", "cpu", "cpu", "margin_lse", FUSED, lambda: None),
    BackendUnderTest("cuda-emulated", "cuda", "cpu", "margin_lse_cuda_emulated", FUSED, _missing_emulator,
                     follows_tf32=True, max_work=500_000),
    # float32 / float64 take the mma.sync / SIMT kernels on sm_90 too: cuda-emulated runs them
    BackendUnderTest("cuda-emulated-sm90", "cuda", "cpu", "margin_lse_cuda_emulated", FUSED, _missing_emulator,
                     follows_tf32=True, max_work=500_000, dtypes=(BF16, F16)),
    BackendUnderTest("triton-interpreted", "triton", "cpu", "margin_lse_triton", TRITON, _missing_triton(False),
                     max_work=500_000),
    BackendUnderTest("cuda", "cuda", "cuda", "margin_lse", FUSED, _missing_cuda, follows_tf32=True),
    BackendUnderTest("triton", "triton", "cuda", "margin_lse_triton", TRITON, _missing_triton(True),
                     follows_tf32=True),
)
BY_NAME = {b.name: b for b in BACKENDS}
#: Backends whose primitive is a custom op pair (opcheck applies).
CUSTOM_OPS = tuple(b.name for b in BACKENDS if b.forward_op is not None)
