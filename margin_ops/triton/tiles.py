"""Tile helpers shared by the forward and backward kernels.

A tile is BLOCK_M rows (samples) x BLOCK_C classes. Every pass recomputes its cosine tile
from x and W with :func:`cosine_tile` and derives the logits or their gradients from it
with :func:`margin_tile` / :func:`logit_grad_tile`: one definition of the logits for both
passes. Tiles are in the accumulation dtype ACC (float32, or float64 for float64 inputs)
unless said otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .margin import NORM_EPS, target_margin


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on the tensor cores: a (M, K), b (K, N) of one dtype; acc (M, N) ACC.

    ``UPCAST`` (interpreter with bfloat16 only): the interpreter keeps bfloat16 as uint16
    and its tl.dot multiplies those bit patterns (triton-lang/triton#11584, unsupported
    as of triton 3.9), so the operands go through float32, where every bfloat16 product is
    exact as on the tensor cores.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def inverse_norm(norm):
    """1 / max(‖·‖, NORM_EPS), in norm's dtype."""
    return 1.0 / tl.maximum(norm, tl.full((), NORM_EPS, norm.dtype))


@triton.jit
def split_blocks(split, blocks_per_split, C, BLOCK_C: tl.constexpr):
    """The class blocks [first, last) of class group ``split``: ``blocks_per_split``
    consecutive blocks of BLOCK_C classes (problem.class_splits), the last group short."""
    first = split * blocks_per_split
    return first, tl.minimum(first + blocks_per_split, tl.cdiv(C, BLOCK_C))


@triton.jit
def cosine_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, inv_x_norm,
                D, stride_xn, stride_xd, stride_wc, stride_wd,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """c = clamp(x̂_i · ŵ_c, −1, 1) for rows × cols, and the norms ‖w_c‖.

    rows (BLOCK_M,) / cols (BLOCK_C,) int64 indices with their in-range masks;
    inv_x_norm (BLOCK_M,) ACC. Returns cos (BLOCK_M, BLOCK_C) ACC and w_norm (BLOCK_C,)
    ACC. The raw x and W tiles are multiplied (their products are exact in the fp32
    accumulator) and the result scaled by both inverse norms: no normalized copy of W
    exists, its norms come from the chunks loaded for the product. Out-of-range entries
    are 0.
    """
    acc_dtype = inv_x_norm.dtype
    dot = tl.zeros((BLOCK_M, BLOCK_C), acc_dtype)
    w_sq = tl.zeros((BLOCK_C,), acc_dtype)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wc + ks[None, :] * stride_wd,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        w_acc = w.to(acc_dtype)
        w_sq += tl.sum(w_acc * w_acc, axis=1)
        dot = mma(x, tl.trans(w), dot, INPUT_PRECISION, UPCAST)
    w_norm = tl.sqrt(w_sq)
    cos = dot * inv_x_norm[:, None] * inverse_norm(w_norm)[None, :]
    # The clamp only keeps rounding out of acos's domain; gradients pass straight through
    # it, and NaN passes too (as torch.clamp): a NaN input must not become a cosine of ±1.
    # (Comparisons rather than tl.clamp(propagate_nan=ALL): its float64 lowering on sm_90a
    # calls an NVVM intrinsic that does not exist.)
    return tl.where(cos < -1.0, -1.0, tl.where(cos > 1.0, 1.0, cos)), w_norm


@triton.jit
def margin_tile(cos, cols, col_mask, labels, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                MARGIN: tl.constexpr, DETACH: tl.constexpr):
    """The margin on the tile's target entries.

    cos (BLOCK_M, BLOCK_C) ACC; cols (BLOCK_C,) int64 with col_mask; labels (BLOCK_M,)
    int64 (any value: only labels equal to an in-range column of this tile count).
    Returns u (BLOCK_M, BLOCK_C) ACC — the cosine, φ(c) on the target — so that
    logit = s_i·u; is_target (BLOCK_M, BLOCK_C) bool; slope (BLOCK_M,) ACC: dφ/dc of the
    row's target (meaningless for rows whose target is not in the tile).
    """
    is_target = (cols[None, :] == labels[:, None]) & col_mask[None, :]
    c_target = tl.sum(tl.where(is_target, cos, 0.0), axis=1)
    phi, slope = target_margin(c_target, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                               MARGIN, DETACH)
    return tl.where(is_target, phi[:, None], cos), is_target, slope


@triton.jit
def logits(u, scale, col_mask):
    """s_i·u_ic (BLOCK_M, BLOCK_C) ACC, −inf on out-of-range classes (they drop out of every softmax)."""
    return tl.where(col_mask[None, :], scale[:, None] * u, float("-inf"))


@triton.jit
def logit_grad_tile(cos, cols, col_mask, labels, scale, lse, grad_lse, grad_target,
                    m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                    MARGIN: tl.constexpr, DETACH: tl.constexpr):
    """Gradients of the tile's logits and cosines.

    cos (BLOCK_M, BLOCK_C) from :func:`cosine_tile`; labels, scale s_i, lse, grad_lse,
    grad_target (BLOCK_M,) (0 for out-of-range rows, so those contribute nothing).
    Returns, each (BLOCK_M, BLOCK_C) ACC and 0 on out-of-range entries:

    * dlogit = g_lse·P + g_target·[c = y] with P = exp(logit − lse);
    * dcos = s_i·dlogit, times dφ/dc on the target;
    * u, the cosine with φ on the target (logit = s_i·u), for the feature-scale gradient.
    """
    u, is_target, slope = margin_tile(cos, cols, col_mask, labels, m1, m2, m3, lamb,
                                      cos_m, sin_m, threshold, sphere_m, MARGIN, DETACH)
    p = tl.exp(logits(u, scale, col_mask) - lse[:, None])
    dlogit = grad_lse[:, None] * p + tl.where(is_target, grad_target[:, None], 0.0)
    dcos = scale[:, None] * dlogit * tl.where(is_target, slope[:, None], 1.0)
    return dlogit, dcos, u
