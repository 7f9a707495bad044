"""Property-based: the CPU op equals the float64 reference for drawn shapes, margins and
options (float32 and float64)."""

import math
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import compare_to_reference, make_inputs

#: raise with MARGIN_OPS_HYPOTHESIS_EXAMPLES=2000 for a longer search
MAX_EXAMPLES = int(os.environ.get("MARGIN_OPS_HYPOTHESIS_EXAMPLES", 40))


@st.composite
def margin_configs(draw):
    name = draw(st.sampled_from(["arcface", "cosface", "combined", "sphereface"]))
    s = draw(st.floats(1.0, 64.0))
    if name == "arcface":
        kwargs = dict(s=s, m=draw(st.floats(0.0, 1.5)), easy_margin=draw(st.booleans()),
                      margin_grad=draw(st.sampled_from(["exact", "detach"])))
    elif name == "cosface":
        kwargs = dict(s=s, m=draw(st.floats(-0.5, 0.8)))
    elif name == "combined":
        kwargs = dict(s=s, m1=draw(st.floats(0.8, 1.5)), m2=draw(st.floats(0.0, 0.8)),
                      m3=draw(st.floats(0.0, 0.4)), margin_grad=draw(st.sampled_from(["exact", "detach"])))
    else:
        kwargs = dict(m=draw(st.integers(1, 5)), lamb=draw(st.sampled_from([0.0, 0.5, 5.0, 100.0])),
                      s=draw(st.sampled_from([None, s])), gamma=draw(st.sampled_from([0.0, 0.5, 2.0])))
    return name, kwargs


def _target_cos(x, w, y):
    valid = (y >= 0) & (y < w.shape[0])
    xn = torch.nn.functional.normalize(x.detach().double(), dim=1)
    wn = torch.nn.functional.normalize(w.detach().double(), dim=1)
    return (xn[valid] * wn[y[valid]]).sum(1)


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 7), d=st.integers(1, 24), c=st.integers(1, 60), config=margin_configs(),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       ignored=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_cpu_op_matches_reference(n, d, c, config, dtype, reduction, ignored, seed):
    name, kwargs = config
    gen = torch.Generator().manual_seed(seed)
    x, w, y = make_inputs(n, d, c, dtype, ignore_rows=range(min(ignored, n)), generator=gen)
    # A target cosine within ~1e-3 of ±1 (always so for D = 1, now and then for D = 2) puts
    # φ in its sqrt(1 − c) regime: compare as for |cos| = 1 (see compare_to_reference).
    near_one = d == 1 or bool((_target_cos(x, w, y).abs() > 1 - 1e-3).any())
    # ArcFace's φ steps at c = cos(π − m) (0 with easy_margin): a target cosine within
    # rounding of it may take either branch in either implementation; not comparable.
    if name == "arcface":
        threshold = 0.0 if kwargs["easy_margin"] else math.cos(math.pi - kwargs["m"])
        assume(not ((_target_cos(x, w, y) - threshold).abs() < 1e-5).any())
    compare_to_reference(name, x, w, y, reduction=reduction, cancellation=near_one, **kwargs)
