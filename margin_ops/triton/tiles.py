"""Tile helpers shared by the forward and backward kernels.

A tile is BLOCK_M rows (samples) x BLOCK_C classes. Every pass recomputes its cosine tile
from x and W with :func:`class_cosine_tile` and derives the logits or their gradients from
it with :func:`margin_tile` / :func:`logit_grad_tile`: one definition of the logits for
both passes. Tiles are in the accumulation dtype ACC (float32, or float64 for float64
inputs) unless said otherwise.

The primitive's options are constexprs, so that a kernel built without them does no work
for them: SUBCENTERS (K, W rows per class), INDEXED (class j reads W's class
class_index[j]), HARD (CurricularFace's hard-example modulation of non-target cosines).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .margin import EXTERNAL, NORM_EPS, hard_example, target_margin


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
def first_weight_rows(class_index_ptr, cols, col_mask, SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr):
    """r_j·K for classes ``cols`` (BLOCK_C,) int64: the W row of their sub-center 0, with
    r_j = class_index[j] when INDEXED, else j. W is read and written in place through these
    rows (out-of-range classes get row 0; their loads and stores are masked)."""
    if INDEXED:
        cols = tl.load(class_index_ptr + cols, mask=col_mask, other=0)
    return cols * SUBCENTERS


@triton.jit
def weight_norms(w_ptr, w_rows, w_mask, D, stride_wc, stride_wd, acc_dtype: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """‖w_r‖ (BLOCK_C,) ACC for W rows ``w_rows`` (BLOCK_C,) int64 with their mask (0 where
    masked), summed over the BLOCK_K chunks of :func:`cosine_tile`: the same numbers."""
    w_sq = tl.zeros((BLOCK_C,), acc_dtype)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + w_rows[:, None] * stride_wc + ks[None, :] * stride_wd,
                    mask=w_mask[:, None] & (ks < D)[None, :], other=0.0).to(acc_dtype)
        w_sq += tl.sum(w * w, axis=1)
    return tl.sqrt(w_sq)


@triton.jit
def cosine_tile(x_ptr, w_ptr, rows, w_rows, row_mask, col_mask, inv_x_norm,
                D, stride_xn, stride_xd, stride_wc, stride_wd,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """c = clamp(x̂_i · ŵ_r, −1, 1) for x rows × W rows, and the norms ‖w_r‖.

    rows (BLOCK_M,) / w_rows (BLOCK_C,) int64 indices with their in-range masks;
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
        w = tl.load(w_ptr + w_rows[:, None] * stride_wc + ks[None, :] * stride_wd,
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
def class_cosine_tile(x_ptr, w_ptr, rows, first_rows, row_mask, col_mask, inv_x_norm,
                      D, stride_xn, stride_xd, stride_wc, stride_wd, SUBCENTERS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The class cosines c_ij = max_k cos(x_i, w_{first_rows_j + k}): one GEMM per sub-center.

    first_rows (BLOCK_C,) int64 from :func:`first_weight_rows`; the rest as
    :func:`cosine_tile`. Returns cos (BLOCK_M, BLOCK_C) ACC; winner (BLOCK_M, BLOCK_C)
    int32, the maximizing k (the first of equal ones; a NaN wins, as torch.max), all 0 when
    K = 1; inv_w_norm, 1 / max(‖w‖, eps) of the winner's row, ACC: (1, BLOCK_C) when K = 1,
    else (BLOCK_M, BLOCK_C). The gradient of c_ij goes to the winner's row only.
    """
    cos, w_norm = cosine_tile(x_ptr, w_ptr, rows, first_rows, row_mask, col_mask, inv_x_norm,
                              D, stride_xn, stride_xd, stride_wc, stride_wd,
                              BLOCK_M, BLOCK_C, BLOCK_K, INPUT_PRECISION, UPCAST)
    winner = tl.zeros((BLOCK_M, BLOCK_C), tl.int32)
    inv_w_norm = inverse_norm(w_norm)[None, :]
    if SUBCENTERS > 1:
        inv_w_norm = tl.broadcast_to(inv_w_norm, (BLOCK_M, BLOCK_C))
        for k in tl.static_range(1, SUBCENTERS):
            cos_k, w_norm_k = cosine_tile(x_ptr, w_ptr, rows, first_rows + k, row_mask, col_mask, inv_x_norm,
                                          D, stride_xn, stride_xd, stride_wc, stride_wd,
                                          BLOCK_M, BLOCK_C, BLOCK_K, INPUT_PRECISION, UPCAST)
            better = (cos_k > cos) | ((cos_k != cos_k) & (cos == cos))
            cos = tl.where(better, cos_k, cos)
            winner = tl.where(better, k, winner)
            inv_w_norm = tl.where(better, inverse_norm(w_norm_k)[None, :], inv_w_norm)
    return cos, winner, inv_w_norm


@triton.jit
def load_hard(rows, row_mask, hard_threshold_ptr, hard_t_ptr, acc_dtype: tl.constexpr, HARD: tl.constexpr):
    """The rows' hard-example threshold and t (BLOCK_M,) ACC when HARD (rows past N:
    threshold 2, above every cosine), else zeros that nothing reads."""
    if HARD:
        threshold = tl.load(hard_threshold_ptr + rows, mask=row_mask, other=2.0)
        t = tl.load(hard_t_ptr + rows, mask=row_mask, other=0.0)
    else:
        threshold = tl.zeros(rows.shape, acc_dtype)
        t = threshold
    return threshold, t


@triton.jit
def margin_tile(cos, cols, col_mask, labels, hard_threshold, hard_t, m1, m2, m3, lamb, cos_m, sin_m, threshold,
                sphere_m, MARGIN: tl.constexpr, DETACH: tl.constexpr, HARD: tl.constexpr):
    """The margin on the tile's target entries, the hard-example modulation (HARD) on the others.

    cos (BLOCK_M, BLOCK_C) ACC; cols (BLOCK_C,) int64 with col_mask; labels (BLOCK_M,)
    int64 (any value: only labels equal to an in-range column of this tile count);
    hard_threshold, hard_t (BLOCK_M,) ACC (:func:`load_hard`). Returns u (BLOCK_M,
    BLOCK_C) ACC — the cosine, φ(c) on the target, c·(t + c) on hard examples — so that
    logit = s_i·u; is_target (BLOCK_M, BLOCK_C) bool; slope (BLOCK_M, BLOCK_C) ACC, du/dc
    (the forward never reads it: compiled away there).
    """
    is_target = (cols[None, :] == labels[:, None]) & col_mask[None, :]
    c_target = tl.sum(tl.where(is_target, cos, 0.0), axis=1)
    phi, target_slope = target_margin(c_target, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                                      MARGIN, DETACH)
    u = cos
    slope = tl.full(cos.shape, 1.0, cos.dtype)
    if HARD:
        u, slope = hard_example(cos, hard_threshold[:, None], hard_t[:, None])
    return tl.where(is_target, phi[:, None], u), is_target, tl.where(is_target, target_slope[:, None], slope)


@triton.jit
def logits(u, scale, col_mask):
    """s_i·u_ic (BLOCK_M, BLOCK_C) ACC, −inf on out-of-range classes (they drop out of every softmax)."""
    return tl.where(col_mask[None, :], scale[:, None] * u, float("-inf"))


@triton.jit
def lse_logits(logit, is_target, MARGIN: tl.constexpr):
    """The logits lse runs over: all of them, or all but the target's (−inf) with margin "external"."""
    if MARGIN == EXTERNAL:
        logit = tl.where(is_target, float("-inf"), logit)
    return logit


@triton.jit
def logit_grad_tile(cos, cols, col_mask, labels, scale, lse, grad_lse, grad_target, grad_sum, hard_threshold,
                    hard_t, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                    MARGIN: tl.constexpr, DETACH: tl.constexpr, HARD: tl.constexpr):
    """Gradients of the tile's logits and cosines.

    cos (BLOCK_M, BLOCK_C) from :func:`class_cosine_tile`; labels, scale s_i, lse,
    grad_lse, grad_target, grad_sum (of nontarget_sum), hard_threshold, hard_t (BLOCK_M,)
    (the grad_* 0 for out-of-range rows, so those contribute nothing). Returns, each
    (BLOCK_M, BLOCK_C) ACC and 0 on out-of-range entries:

    * dlogit = g_lse·P + g_target·[c = y] + g_sum·[c ≠ y] with P = exp(logit − lse)
      (margin "external": P = 0 on the target, which lse leaves out);
    * dcos = s_i·dlogit·du/dc (dφ/dc on the target, the hard-example slope elsewhere);
    * u, the modulated cosine (logit = s_i·u), for the feature-scale gradient.
    """
    u, is_target, slope = margin_tile(cos, cols, col_mask, labels, hard_threshold, hard_t, m1, m2, m3, lamb,
                                      cos_m, sin_m, threshold, sphere_m, MARGIN, DETACH, HARD)
    z = logits(u, scale, col_mask)
    if MARGIN == EXTERNAL:
        # lse leaves the target out, and is −inf when the target is the row's only class:
        # P_iy is 0, never exp(z − lse), and no −inf − (−inf) is formed past C either.
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        p = tl.where(is_target, 0.0, tl.exp(z - lse[:, None]))
    else:
        p = tl.exp(z - lse[:, None])
    others = tl.where(col_mask[None, :], grad_sum[:, None], 0.0)
    dlogit = grad_lse[:, None] * p + tl.where(is_target, grad_target[:, None], others)
    dcos = scale[:, None] * dlogit * slope
    return dlogit, dcos, u
