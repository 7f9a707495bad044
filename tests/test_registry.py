"""The margin registry (margin_ops.spec) is the one list of margins: the C++ header is
generated from it, every backend's kinds come from it, and the conformance cases cover
every entry."""

from pathlib import Path

import torch

import margin_ops
from margin_ops import spec

from conformance.cases import OP_CONFIGS, PRIMITIVE_ARGS
from conftest import spec_for

REPO = Path(__file__).resolve().parents[1]


def test_generated_header_is_current():
    """csrc/margin_kinds.h (MarginKind, kNormEps, kSinThetaEps) is what the registry
    generates now: regenerate it with `python -m margin_ops --cpp-header > csrc/margin_kinds.h`."""
    assert (REPO / "csrc" / "margin_kinds.h").read_text() == spec.cpp_header()


def test_header_lists_every_margin_in_registry_order():
    text = spec.cpp_header()
    for kind, margin in enumerate(spec.REGISTRY):
        assert f"  {margin.cpp_name} = {kind},  // {margin.name}:" in text
    assert f"kNumMarginKinds = {len(spec.REGISTRY)};" in text


def test_triton_kinds_are_the_registry_kinds():
    import margin_ops.triton.margin as triton_margin
    assert triton_margin.KINDS is spec.KINDS
    for name in ("arcface", "arcface_easy", "cosface", "combined", "sphereface"):
        assert getattr(triton_margin, name.upper()).value == spec.KINDS[name]


def test_conformance_cases_cover_every_margin():
    """A margin added to the registry without conformance cases fails here."""
    assert {args[0] for args in PRIMITIVE_ARGS} == set(spec.MARGINS)
    reached = {spec_for(name, **{k: v for k, v in kwargs.items() if k != "reduction"}).margin
               for name, kwargs in OP_CONFIGS}
    assert reached == set(spec.MARGINS)


def test_every_loss_op_has_a_builder_and_a_reference():
    schema_ops = {name for name in dir(torch.ops.margin) if hasattr(getattr(torch.ops.margin, name), "default")}
    assert set(spec.OP_SPECS) <= schema_ops
    for name in spec.OP_SPECS:
        assert callable(getattr(margin_ops.reference, name))


def test_check_primitive_margin_accepts_the_builders_output():
    for name, kwargs in OP_CONFIGS:
        margin = spec_for(name, **kwargs)
        spec.check_primitive_margin(*margin.primitive_args())
