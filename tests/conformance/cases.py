"""The scenarios' parameters, shared by every backend's run of the conformance suite.

Every registered margin (margin_ops.spec.REGISTRY) appears in :data:`PRIMITIVE_ARGS` and,
through its public op, in :data:`OP_CONFIGS`; tests/test_registry.py checks that no
registered margin is missing here. Adding a margin means adding its configs here.
"""

from __future__ import annotations

import torch

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = (F64, F32, BF16, F16)
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}

#: Representative keyword arguments per public op: every margin branch and option.
OP_CONFIGS = [
    ("arcface", dict(s=64.0, m=0.5)),
    ("arcface", dict(s=30.0, m=0.5, margin_grad="detach")),
    ("arcface", dict(s=64.0, m=0.5, easy_margin=True)),
    ("arcface", dict(s=16.0, m=0.7, easy_margin=True, margin_grad="detach")),
    ("arcface", dict(s=8.0, m=1.2)),  # large m: the linear branch cos(pi - m) = -0.36 is hit often
    ("cosface", dict(s=64.0, m=0.35)),
    ("cosface", dict(s=10.0, m=-0.2)),
    ("combined", dict(s=64.0, m1=1.0, m2=0.3, m3=0.2)),
    ("combined", dict(s=32.0, m1=0.9, m2=0.4, m3=0.15, margin_grad="detach")),
    ("combined", dict(s=16.0, m1=1.35, m2=0.0, m3=0.0)),
    ("sphereface", dict()),  # m=4, lamb=0, s=None (feature norm), gamma=0
    ("sphereface", dict(m=1, s=16.0)),
    ("sphereface", dict(m=2, lamb=3.0, s=None)),
    ("sphereface", dict(m=3, lamb=0.5, s=20.0, gamma=2.0)),
    ("sphereface", dict(m=4, lamb=5.0, s=None, gamma=1.0)),
    ("sphereface", dict(m=5, lamb=0.0, s=8.0, gamma=0.5)),
    # v2 options: label smoothing on every loss, sub-centers on the ArcFace family
    ("arcface", dict(s=64.0, m=0.5, label_smoothing=0.1)),
    ("arcface", dict(s=32.0, m=0.5, subcenters=3)),
    ("cosface", dict(s=30.0, m=0.35, subcenters=2, label_smoothing=0.2)),
    ("combined", dict(s=32.0, m1=0.95, m2=0.3, m3=0.1, subcenters=2, margin_grad="detach", label_smoothing=0.05)),
    ("sphereface", dict(m=3, lamb=0.5, s=20.0, gamma=2.0, label_smoothing=0.1)),
    # per-row margins, as (low, high) ranges spread over the rows (conftest.op_arguments):
    # AdaFace's ranges (m = 0.4), MagFace's (l_m, u_m), ElasticFace-arc and -cos around m
    ("adaptive", dict(angle_mode="clip", m_angle=(-0.4, 0.4), m_add=(0.0, 0.8))),
    ("adaptive", dict(s=32.0, angle_mode="arcface", m_angle=(0.45, 0.8), m_add=(0.0, 0.0), label_smoothing=0.1)),
    ("adaptive", dict(s=16.0, angle_mode="plain", m_angle=(0.3, 0.7), m_add=(0.0, 0.0))),
    ("adaptive", dict(angle_mode="plain", m_angle=(0.0, 0.0), m_add=(0.2, 0.5), label_smoothing=0.2)),
    ("curricular", dict(t=0.3)),
    ("curricular", dict(s=32.0, m=0.5, t=2.0, label_smoothing=0.1)),  # t large
]

#: Arguments of the primitive margin_lse after (x, weight, labels): (margin, s, m1, m2, m3,
#: lamb, feature_scale, detach_margin_grad), covering every φ branch and option.
PRIMITIVE_ARGS = [
    ("arcface", 64.0, 1.0, 0.5, 0.0, 0.0, False, False),
    ("arcface", 8.0, 1.0, 1.2, 0.0, 0.0, False, False),  # linear branch past cos(π − m)
    ("arcface_easy", 30.0, 1.0, 0.5, 0.0, 0.0, False, True),
    ("cosface", 64.0, 1.0, 0.0, 0.35, 0.0, False, False),
    ("combined", 32.0, 0.9, 0.3, 0.1, 0.0, False, False),
    ("sphereface", 1.0, 4.0, 0.0, 0.0, 5.0, True, False),
    ("sphereface", 16.0, 3.0, 0.0, 0.0, 0.0, False, False),
    ("sphereface", 1.0, 1.0, 0.0, 0.0, 0.0, True, False),
    ("external", 32.0, 1.0, 0.0, 0.0, 0.0, False, False),
    ("external", 1.0, 1.0, 0.0, 0.0, 0.0, True, False),
]

#: The primitive's options (conftest.primitive_options): sub-centers, a sampled class_index
#: (PartialFC), CurricularFace's hard examples, and all together.
PRIMITIVE_OPTIONS = [dict(subcenters=3), dict(sampled=True), dict(subcenters=2, sampled=True), dict(hard=True),
                     dict(subcenters=2, sampled=True, hard=True)]

#: One exact-gradient configuration per op, and ArcFace's detached gradient: the configs
#: the odd-shape scenarios run.
SHAPE_CONFIGS = [("arcface", dict(s=64.0, m=0.5)), ("cosface", dict(s=64.0, m=0.35)),
                 ("combined", dict(s=32.0, m1=0.95, m2=0.3, m3=0.1)),
                 ("sphereface", dict(m=4, lamb=2.0)), ("arcface", dict(s=64.0, m=0.5, margin_grad="detach"))]

#: (N, D, C): one row; one class; one feature (every |cos| = 1); one of each; odd sizes;
#: Liger-Kernel's "weird" 3 x 131 x 1009; past one row tile of every backend (130 rows); D
#: past the Triton backward's D split (600) and the CUDA kernels' dW/dX tile (136); C over
#: several class blocks / tiles / splits / chunks of every backend (1009, 3000).
ODD_SHAPES = [(1, 16, 29), (8, 16, 1), (8, 1, 29), (1, 1, 1), (5, 13, 1009), (3, 131, 1009),
              (130, 24, 70), (2, 600, 40), (3, 136, 300), (4, 512, 3000)]
#: Classes to put targets on (those < C): both sides of every backend's tile boundaries.
BOUNDARY_TARGETS = [0, 31, 32, 63, 64, 65, 127, 128, 255, 256, 511, 512, 513, 1008]


def config_id(config) -> str:
    name, kwargs = config
    return name + ("-" + "-".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


def options_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


def primitive_id(args) -> str:
    return f"{args[0]}-s{args[1]}-m{args[2]}-{args[3]}-{args[4]}"
