"""What benchmarks/run.py measures: shapes, margins, inputs and the contenders' fwd+bwd steps.

Shared by ``run.py`` (timing, checks, reports) and ``cpu_memory.py`` (the child process
that measures a contender's peak extra memory on the CPU), so both run exactly the same
computation.

A *step* is a callable ``step(x, weight, labels) -> StepResult``: one forward and one
backward pass, returning the loss (``None`` for the bare-GEMM reference point) and the
gradients ``dx`` (N, D) and ``dW`` (C, D). Shapes: ``x`` (N, D), ``weight`` (C, D) — the
``nn.Linear`` layout — and ``labels`` (N,) int64.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

import margin_ops
from margin_ops import reference


@dataclass(frozen=True)
class Shape:
    """One benchmark problem size: N rows, D features, C classes."""

    name: str
    n: int
    d: int
    c: int

    @property
    def useful_flops(self) -> int:
        """6·N·C·D: 2NCD forward, 4NCD backward (dx and dW)."""
        return 6 * self.n * self.c * self.d

    @property
    def dims(self) -> str:
        return f"{self.n}x{self.d}x{self.c}"


#: docs/design.md §2.4: the face-recognition shapes the CUDA targets are set on.
GPU_SHAPES = {s.name: s for s in (
    Shape("ms1mv2", 512, 512, 85_742),
    Shape("glint360k-8gpu", 1024, 512, 45_029),
    Shape("webface42m-8gpu", 1024, 512, 257_489),
    Shape("1m", 512, 512, 1_000_000),
    Shape("1m-small-batch", 128, 512, 1_000_000),
)}
#: Scaled down for a CPU; "cpu-100k" is the shape the CPU acceptance bar is measured on.
CPU_SHAPES = {s.name: s for s in (
    Shape("cpu-100k", 256, 512, 100_000),
    Shape("cpu-20k", 128, 512, 20_000),
)}


def parse_shape(text: str) -> Shape:
    """A named shape (GPU_SHAPES, CPU_SHAPES) or a custom ``NxDxC``, e.g. ``64x128x5000``."""
    named = {**GPU_SHAPES, **CPU_SHAPES}
    if text in named:
        return named[text]
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not match:
        raise ValueError(f"shape must be one of {', '.join(named)} or NxDxC, got {text!r}")
    n, d, c = map(int, match.groups())
    if min(n, d, c) < 1:
        raise ValueError(f"every dimension of a shape must be >= 1, got {text!r}")
    return Shape(text, n, d, c)


@dataclass(frozen=True)
class Margin:
    """A loss to benchmark: the margin_ops op / reference function name and its arguments."""

    name: str
    op: str  #: name in torch.ops.margin and in margin_ops.reference
    kwargs: dict = field(hash=False)
    description: str = ""
    #: weight rows per class: the problem's weight is (C·subcenters, D) (run.py scales C)
    subcenters: int = 1
    #: x -> the op's per-row tensor arguments (computed inside the timed step, as a head does)
    row_args: Callable | None = field(default=None, hash=False)

    def arguments(self, x: torch.Tensor) -> dict:
        """The keyword arguments of one call on features x (N, D)."""
        kwargs = {**self.kwargs, "subcenters": self.subcenters} if self.subcenters > 1 else dict(self.kwargs)
        return {**kwargs, **self.row_args(x)} if self.row_args else kwargs


def adaface_margins(x: torch.Tensor, m: float = 0.4, h: float = 0.333) -> dict:
    """AdaFace's per-row margins at its initial batch statistics (mean 20, std 100): the
    head's work per step (the norms, the scaler), without its running-statistics update."""
    norms = torch.linalg.vector_norm(x.detach(), dim=1, dtype=torch.float32).clamp(0.001, 100)
    scaler = (h * (norms - 20.0) / (100.0 + 1e-3)).clamp(-1, 1)
    return {"m_angle": -m * scaler, "m_add": m + m * scaler}


MARGINS = {m.name: m for m in (
    Margin("arcface", "arcface", {"s": 64.0, "m": 0.5}, "ArcFace s=64, m=0.5"),
    Margin("cosface", "cosface", {"s": 64.0, "m": 0.35}, "CosFace s=64, m=0.35"),
    Margin("combined", "combined", {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
           "combined s=64, (m1, m2, m3) = (1, 0.3, 0.2)"),
    Margin("sphereface", "sphereface", {"m": 4, "lamb": 5.0},
           "SphereFace m=4, lambda=5, s = feature norm"),
    Margin("adaface", "adaptive", {"s": 64.0, "angle_mode": "clip"},
           "AdaFace m=0.4, h=0.333 (per-row margins from the feature norms)", row_args=adaface_margins),
    Margin("subcenter-arcface", "arcface", {"s": 64.0, "m": 0.5},
           "sub-center ArcFace K=3 (C·3 weight rows), s=64, m=0.5", subcenters=3),
    # The margin-free problem the peers (torch-lce, Liger, CCE, quack) solve: cross-entropy of s·cos.
    Margin("softmax", "cosface", {"s": 64.0, "m": 0.0},
           "normalized softmax (plain CE of s·cos, s=64, no margin)"),
)}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def parse_dtype(text: str) -> str:
    """Canonical dtype name (a key of DTYPES) of ``text`` (``bf16`` -> ``bfloat16``)."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([*DTYPES, *DTYPE_ALIASES])}, got {text!r}")
    return name


def make_inputs(shape: Shape, dtype: str, device: str, seed: int, subcenters: int = 1):
    """Fresh random ``(x, weight, labels)`` for ``shape``: normal features and weights
    (never zeros), uniform labels; x and weight require grad. ``shape.c`` counts weight
    rows: with K sub-centers they are shape.c / K classes, and the labels are class ids."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape.n, shape.d, generator=generator)
    weight = torch.randn(shape.c, shape.d, generator=generator)
    labels = torch.randint(0, shape.c // subcenters, (shape.n,), generator=generator)
    to = dict(device=device, dtype=DTYPES[dtype])
    return (x.to(**to).requires_grad_(), weight.to(**to).requires_grad_(), labels.to(device))


class StepResult(NamedTuple):
    loss: torch.Tensor | None  #: the scalar loss (None for gemm3, which has none)
    dx: torch.Tensor           #: (N, D)
    dw: torch.Tensor           #: (C, D)


def fwd_bwd(loss_fn: Callable) -> Callable:
    """The step of a loss function: loss, then its gradients with respect to x and weight."""
    def step(x, weight, labels) -> StepResult:
        loss = loss_fn(x, weight, labels)
        dx, dw = torch.autograd.grad(loss, (x, weight))
        return StepResult(loss.detach(), dx, dw)
    return step


def reference_loss(margin: Margin) -> Callable:
    """The plain-PyTorch loss of margin_ops.reference (materializes the N x C logits)."""
    fn = getattr(reference, margin.op)
    return lambda x, weight, labels: fn(x, weight, labels, **margin.arguments(x))


def margin_ops_step(backend: str, margin: Margin) -> Callable:
    """The fused op's step, forward and backward both run with ``backend`` selected."""
    op = getattr(torch.ops.margin, margin.op)
    step = fwd_bwd(lambda x, weight, labels: op(x, weight, labels, **margin.arguments(x)))

    def run(x, weight, labels) -> StepResult:
        with margin_ops.backend(backend):
            return step(x, weight, labels)
    return run


def compiled_reference_step(margin: Margin) -> Callable:
    """The reference under torch.compile (default mode). AOTAutograd compiles the backward
    too. Dynamo is reset first, so every shape gets its own static-shape graph."""
    torch._dynamo.reset()
    return fwd_bwd(torch.compile(reference_loss(margin)))


def gemm3_step(x, weight, labels) -> StepResult:
    """The bare-GEMM reference point: logits = x @ W.T (N x C, materialized), then the two
    gradient products with the logits standing in for dlogits. No softmax, no margin."""
    with torch.no_grad():
        logits = x @ weight.t()
        return StepResult(None, logits @ weight, logits.t() @ x)


def liger_step(margin: Margin) -> Callable:
    """Liger-Kernel's fused linear cross-entropy on s·x̂ and ŵ (margin-free problem only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss()
    s = margin.kwargs["s"]
    return fwd_bwd(lambda x, weight, labels: ce(F.normalize(weight, dim=1), s * F.normalize(x, dim=1), labels))


def cce_step(margin: Margin, impl: str = "cce") -> Callable:
    """Apple's Cut Cross-Entropy on s·x̂ and ŵ (margin-free problem only). ``impl="cce"``:
    its Triton kernels (CUDA only); ``impl="torch_compile"``: its own torch.compile'd
    formulation, the one it offers where its kernels do not run (a CPU included)."""
    from cut_cross_entropy import linear_cross_entropy

    s = margin.kwargs["s"]
    return fwd_bwd(lambda x, weight, labels: linear_cross_entropy(
        s * F.normalize(x, dim=1), F.normalize(weight, dim=1), labels, impl=impl))


def torch_lce_step(margin: Margin, chunked: bool = False) -> Callable:
    """torch's own ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) on s·x̂ and
    ŵ. It has no margin: on every margin it computes the margin-free cross-entropy of s·cos,
    a lower bound of the margin losses' cost, checked against the reference on the
    margin-free problem only.

    ``chunked=False`` ("torch-lce"): the default call (``options=None``, its reference path:
    F.linear then F.cross_entropy, N x C logits materialized). ``chunked=True``
    ("torch-lce-chunked"): the memory-saving path users opt into,
    ``options=LinearCrossEntropyOptions()`` with its own "auto" chunking (batch chunks sized
    for LLM heads, N >> D: at face-recognition shapes, N ≈ D << C, it picks chunks of a
    row or two and accumulates dW once per chunk)."""
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    s = margin.kwargs.get("s", 64.0)
    return fwd_bwd(lambda x, weight, labels: F.linear_cross_entropy(
        s * F.normalize(x, dim=1), F.normalize(weight, dim=1), labels, options=options))


def quack_step(margin: Margin) -> Callable:
    """quack's cross-entropy kernel (Dao-AILab/quack, CuTe DSL, CUDA only) on materialized
    logits s·x̂·ŵᵀ (N x C), the matmuls by torch (margin-free problem only)."""
    from quack import cross_entropy

    s = margin.kwargs["s"]

    def loss(x, weight, labels):
        losses = cross_entropy(s * F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t(), labels)
        return losses.mean() if losses.dim() else losses  # per-row losses in older versions
    return fwd_bwd(loss)


@dataclass(frozen=True)
class Contender:
    """Something timed against the margin_ops backends."""

    name: str
    kind: str  #: "margin_ops" (a backend of this package), "eager", "compile", "gemm3", "peer"
    build: Callable[[Margin], Callable]  #: margin -> step
    margins: tuple | None = None  #: the margins it can compute; None: all
    #: It computes the margin-free loss whatever the margin (torch-lce*): its result is
    #: comparable with the reference on the margin-free problem (MARGIN_FREE) only.
    margin_free: bool = False
    #: Its first call compiles (torch.compile, JIT kernels): run.py reports that warm-up.
    compiles: bool = False

    def applies_to(self, margin: Margin) -> bool:
        return self.margins is None or margin.name in self.margins

    @property
    def label(self) -> str:
        """The name shown in reports: margin_ops' own backends are marked "(ours)"."""
        return f"{self.name} (ours)" if self.kind == "margin_ops" else self.name


BACKENDS = tuple(name for name in margin_ops.backends.BACKENDS if name != "reference")
#: The margin-free problem, the one margin-free contenders are checked on.
MARGIN_FREE = "softmax"
#: Peer contender -> (module it needs, its kernels run on CUDA only). torch-lce needs no
#: module but torch.nn.functional.linear_cross_entropy (torch >= 2.13), torch-lce-chunked
#: also torch.nn.LinearCrossEntropyOptions.
PEERS = {"liger": ("liger_kernel", True), "cce": ("cut_cross_entropy", True),
         "cce-compile": ("cut_cross_entropy", False), "quack": ("quack", True),
         "torch-lce": (None, False), "torch-lce-chunked": (None, False)}


def all_contenders() -> dict[str, Contender]:
    """Every contender run.py knows, in report order: backends, eager, compile, gemm3, peers
    (torch-lce, torch-lce-chunked, then the margin-free-only liger, cce, cce-compile, quack)."""
    contenders = [Contender(b, "margin_ops", lambda margin, b=b: margin_ops_step(b, margin), compiles=b == "triton")
                  for b in BACKENDS]
    contenders += [
        Contender("eager", "eager", lambda margin: fwd_bwd(reference_loss(margin))),
        Contender("compile", "compile", compiled_reference_step, compiles=True),
        Contender("gemm3", "gemm3", lambda margin: gemm3_step),
        Contender("torch-lce", "peer", torch_lce_step, margin_free=True),
        Contender("torch-lce-chunked", "peer", lambda margin: torch_lce_step(margin, chunked=True),
                  margin_free=True),
        Contender("liger", "peer", liger_step, (MARGIN_FREE,), compiles=True),
        Contender("cce", "peer", cce_step, (MARGIN_FREE,), compiles=True),
        Contender("cce-compile", "peer", lambda margin: cce_step(margin, impl="torch_compile"),
                  (MARGIN_FREE,), compiles=True),
        Contender("quack", "peer", quack_step, (MARGIN_FREE,), compiles=True),
    ]
    return {c.name: c for c in contenders}


def unavailable_reason(contender: Contender, device: str, requested: bool) -> str | None:
    """Why ``contender`` cannot (or, unless ``requested`` explicitly, should not) run on
    ``device``; None when it runs."""
    if contender.kind == "margin_ops":
        missing = margin_ops.available_backends()[contender.name]
        if missing:
            return missing
        try:
            with margin_ops.backend(contender.name):
                margin_ops.current_backend(device)
        except RuntimeError as error:
            return str(error)
        if contender.name == "triton" and device == "cpu" and not requested:
            return "the Triton interpreter (TRITON_INTERPRET=1) on the CPU is not timed unless asked for"
    if contender.kind == "peer":
        module, cuda_only = PEERS[contender.name]
        if contender.name.startswith("torch-lce") and not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.13)"
        if contender.name == "torch-lce-chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions (its chunked path)"
        if module is not None and importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if cuda_only and device != "cuda":
            return "its kernels run on CUDA only"
    return None

