"""Backward pass of the fused primitive: ``margin_lse_backward`` with Triton kernels.

Both kernels recompute their cosine tiles (nothing N x C is stored between the passes)
and form dlogit / dcos in registers (:func:`tiles.logit_grad_tile`):

* :func:`grad_weight_kernel`: one program per block of classes (and of D, and sub-center),
  looping over all N rows, so each dW row has a single owner: no atomics, deterministic.
  dW rows are written in place at the W rows the classes read (through class_index).
* :func:`grad_x_kernel`: dx̂ is a sum over all C classes. One program per (row block,
  group of class blocks) accumulates its group's share in registers and writes it to a
  (groups, N, D) partial buffer; torch sums the groups in a fixed order (deterministic).

A few torch ops on (N, D) then pull dx̂ back through x̂ = x / max(‖x‖, eps) and add the
feature-scale term, exactly as csrc/cpu/margin_lse_cpu.cpp does.

Precision: the gradient GEMMs take the dcos tile rounded to the input dtype (as
FlashAttention's dS, or eager autocast's N x C logit gradient), where the CPU kernel keeps
it in float32: bfloat16 gradients are off by up to ~1e-2 of their largest entry against
float64, not ~3e-3. Splitting dcos into two bfloat16 terms (a second tl.dot on the
remainder) would buy that back for 1.5x the backward's tensor-core work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import spec
from .margin import NORM_EPS
from .problem import Tiles, class_splits, device_guard, prepare
from .tiles import (class_cosine_tile, first_weight_rows, inverse_norm, load_hard, logit_grad_tile, mma, split_blocks,
                    weight_norms)

#: Tiles per (input element size, K > 1 sub-centers). Untuned (no GPU was at hand): chosen so
#: that sm_80 / sm_90a builds (triton.compile offline, tests/test_triton_compile.py) spill no
#: registers and fit shared memory. A (rows or classes) x block_d float32 accumulator lives in
#: registers; past block_d columns of D the kernels split D over programs, each recomputing its
#: cosine tiles. With sub-centers the winners and the per-sub-center operands take registers:
#: fewer classes or columns per program.
GRAD_W_TILES = {(2, False): Tiles(32, 32, 64, 512, 8), (4, False): Tiles(32, 32, 32, 256, 8),
                (8, False): Tiles(32, 32, 32, 128, 8),
                (2, True): Tiles(32, 32, 64, 512, 8), (4, True): Tiles(32, 32, 32, 256, 8),
                (8, True): Tiles(32, 32, 32, 64, 8)}
GRAD_X_TILES = {(2, False): Tiles(32, 64, 64, 512, 8), (4, False): Tiles(32, 64, 32, 256, 8),
                (8, False): Tiles(32, 32, 32, 128, 8),
                (2, True): Tiles(32, 64, 64, 256, 8), (4, True): Tiles(32, 32, 32, 256, 8),
                (8, True): Tiles(32, 32, 32, 64, 8)}
#: Bound on the dx̂ partials: groups x N x D accumulation-dtype numbers.
MAX_PARTIAL_BYTES = 32 << 20


@triton.jit
def load_rows(rows, row_mask, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr,
              grad_sum_ptr):
    """The per-row inputs of both kernels for a block of rows: labels (-1 past N), and
    inv_x_norm, scale, lse, grad_lse, grad_target, grad_sum (0 past N)."""
    return (tl.load(labels_ptr + rows, mask=row_mask, other=-1),
            tl.load(inv_x_norm_ptr + rows, mask=row_mask, other=0.0),
            tl.load(scale_ptr + rows, mask=row_mask, other=0.0),
            tl.load(lse_ptr + rows, mask=row_mask, other=0.0),
            tl.load(grad_lse_ptr + rows, mask=row_mask, other=0.0),
            tl.load(grad_target_ptr + rows, mask=row_mask, other=0.0),
            tl.load(grad_sum_ptr + rows, mask=row_mask, other=0.0))


@triton.jit
def grad_weight_kernel(
    x_ptr, w_ptr, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr,
    class_index_ptr, hard_threshold_ptr, hard_t_ptr, grad_w_ptr,
    N, C, D, stride_xn, stride_xd, stride_wc, stride_wd, stride_gc, stride_gd,
    m1: tl.float64, m2: tl.float64, m3: tl.float64, lamb: tl.float64,
    cos_m: tl.float64, sin_m: tl.float64, threshold: tl.float64, sphere_m,
    MARGIN: tl.constexpr, DETACH: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr, HARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dW of sub-center pid2 of classes [pid0·BLOCK_C, +BLOCK_C), columns [pid1·BLOCK_D, +BLOCK_D).

    x (N, D), w (R, D): input dtype, strided; labels (N,) int64; inv_x_norm, scale, lse,
    grad_lse, grad_target, grad_sum (N,) ACC; class_index, hard_threshold, hard_t as
    :func:`margin_lse.margin_lse_kernel`'s. Writes the W rows r = r_j·K + pid2 of grad_w
    (R, D) (w's dtype, strided): dw = (dŵ − ŵ (ŵ·dŵ)) / ‖w‖ above the norm floor, dŵ / eps
    on it, with dŵ_r = Σ_i dcos_ij x̂_i and ŵ_r·dŵ_r = Σ_i dcos_ij c_ij over the (i, j)
    whose winning sub-center is r. With K > 1 each program recomputes all K cosine tiles
    to find the winners (K programs per class block: K² cosine GEMMs for K gradient GEMMs).
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_mask = cols < C
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = ds < D
    subcenter = tl.program_id(2)
    first_rows = first_weight_rows(class_index_ptr, cols, col_mask, SUBCENTERS, INDEXED)
    own_rows = first_rows + subcenter
    acc_dtype = scale_ptr.dtype.element_ty
    w_norm = weight_norms(w_ptr, own_rows, col_mask, D, stride_wc, stride_wd, acc_dtype, BLOCK_C, BLOCK_K)
    grad_w_hat = tl.zeros((BLOCK_C, BLOCK_D), acc_dtype)
    radial = tl.zeros((BLOCK_C,), acc_dtype)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        labels, inv_x_norm, scale, lse, grad_lse, grad_target, grad_sum = load_rows(
            rows, row_mask, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr,
            grad_sum_ptr)
        hard_threshold, hard_t = load_hard(rows, row_mask, hard_threshold_ptr, hard_t_ptr, acc_dtype, HARD)
        cos, winner, _ = class_cosine_tile(x_ptr, w_ptr, rows, first_rows, row_mask, col_mask, inv_x_norm,
                                           D, stride_xn, stride_xd, stride_wc, stride_wd, SUBCENTERS,
                                           BLOCK_M, BLOCK_C, BLOCK_K, INPUT_PRECISION, UPCAST)
        _, dcos, _ = logit_grad_tile(cos, cols, col_mask, labels, scale, lse, grad_lse, grad_target, grad_sum,
                                     hard_threshold, hard_t, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                                     MARGIN, DETACH, HARD)
        if SUBCENTERS > 1:
            dcos = tl.where(winner == subcenter, dcos, 0.0)
        radial += tl.sum(dcos * cos, axis=0)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        # x̂ = x / ‖x‖: the row factor goes on the (small) gradient operand, not on x.
        dcos_rows = (dcos * inv_x_norm[:, None]).to(x.dtype)
        grad_w_hat = mma(tl.trans(dcos_rows), x, grad_w_hat, INPUT_PRECISION, UPCAST)
    inv_w_norm = inverse_norm(w_norm)
    radial = tl.where(w_norm > NORM_EPS, radial, 0.0)
    mask = col_mask[:, None] & d_mask[None, :]
    w = tl.load(w_ptr + own_rows[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask, other=0.0)
    grad_w = inv_w_norm[:, None] * grad_w_hat - (radial * inv_w_norm * inv_w_norm)[:, None] * w.to(acc_dtype)
    tl.store(grad_w_ptr + own_rows[:, None] * stride_gc + ds[None, :] * stride_gd,
             grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_x_kernel(
    x_ptr, w_ptr, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr,
    class_index_ptr, hard_threshold_ptr, hard_t_ptr, part_grad_ptr, part_scale_grad_ptr,
    N, C, D, stride_xn, stride_xd, stride_wc, stride_wd, blocks_per_split,
    m1: tl.float64, m2: tl.float64, m3: tl.float64, lamb: tl.float64,
    cos_m: tl.float64, sin_m: tl.float64, threshold: tl.float64, sphere_m,
    MARGIN: tl.constexpr, DETACH: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr, HARD: tl.constexpr, FEATURE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Class group pid1's share of dx̂ for rows [pid0·BLOCK_M, +BLOCK_M), columns [pid2·BLOCK_D, +BLOCK_D).

    Inputs as :func:`grad_weight_kernel`. Writes part_grad (groups, N, D) ACC at
    [pid1, rows, columns]: Σ_j dcos_ij ŵ_r over the group, r the winning sub-center row of
    class j (one gradient GEMM per sub-center, on the entries it wins); with FEATURE_SCALE
    (pid2 = 0 only) part_scale_grad (groups, N) ACC: Σ_j dlogit_ij u_ij, the gradient of
    the row's loss through s_i = ‖x_i‖ (logit = s_i·u).
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = ds < D
    labels, inv_x_norm, scale, lse, grad_lse, grad_target, grad_sum = load_rows(
        rows, row_mask, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr)
    acc_dtype = inv_x_norm.dtype
    hard_threshold, hard_t = load_hard(rows, row_mask, hard_threshold_ptr, hard_t_ptr, acc_dtype, HARD)
    grad_x_hat = tl.zeros((BLOCK_M, BLOCK_D), acc_dtype)
    scale_grad = tl.zeros((BLOCK_M,), acc_dtype)
    first_block, last_block = split_blocks(split, blocks_per_split, C, BLOCK_C)
    for block in range(first_block, last_block):
        cols = block * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        first_rows = first_weight_rows(class_index_ptr, cols, col_mask, SUBCENTERS, INDEXED)
        cos, winner, inv_w_norm = class_cosine_tile(x_ptr, w_ptr, rows, first_rows, row_mask, col_mask, inv_x_norm,
                                                    D, stride_xn, stride_xd, stride_wc, stride_wd, SUBCENTERS,
                                                    BLOCK_M, BLOCK_C, BLOCK_K, INPUT_PRECISION, UPCAST)
        dlogit, dcos, u = logit_grad_tile(cos, cols, col_mask, labels, scale, lse, grad_lse, grad_target, grad_sum,
                                          hard_threshold, hard_t, m1, m2, m3, lamb, cos_m, sin_m, threshold,
                                          sphere_m, MARGIN, DETACH, HARD)
        if FEATURE_SCALE:
            scale_grad += tl.sum(dlogit * u, axis=1)
        # ŵ = w / ‖w‖: the winner's column factor goes on the gradient operand, not on W.
        dcos = dcos * inv_w_norm
        for k in tl.static_range(SUBCENTERS):
            w = tl.load(w_ptr + (first_rows + k)[:, None] * stride_wc + ds[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            dcos_k = dcos
            if SUBCENTERS > 1:
                dcos_k = tl.where(winner == k, dcos, 0.0)
            grad_x_hat = mma(dcos_k.to(w.dtype), w, grad_x_hat, INPUT_PRECISION, UPCAST)
    part = split.to(tl.int64) * N + rows
    tl.store(part_grad_ptr + part[:, None] * D + ds[None, :], grad_x_hat,
             mask=row_mask[:, None] & d_mask[None, :])
    if FEATURE_SCALE:
        if tl.program_id(2) == 0:
            tl.store(part_scale_grad_ptr + part, scale_grad, mask=row_mask)


def margin_lse_backward(grad_lse, grad_target_logit, grad_nontarget_sum, x, weight, labels, lse, margin, s, m1,
                        m2, m3, lamb, feature_scale, detach_margin_grad, allow_tf32=None, subcenters=1,
                        class_index=None, hard_threshold=None, hard_t=None):
    """margin_lse_backward on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    grad_lse, grad_target_logit, grad_nontarget_sum, lse (N,) floating; the rest as
    :func:`margin_lse.margin_lse`. Returns grad_x (N, D) like x and grad_weight (R, D) like
    weight, zero in the rows no class reads (those left out of class_index).
    """
    p = prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad, allow_tf32,
                subcenters, class_index, hard_threshold, hard_t,
                backward_rows=(grad_lse, grad_target_logit, grad_nontarget_sum, lse))
    n, dim = x.shape
    grad_x = torch.empty_like(x)
    # Every row is some class's sub-center unless class_index leaves classes out.
    grad_weight = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    if n == 0:
        return grad_x, grad_weight.zero_()
    rows = (p.labels, p.inv_x_norm, p.scale,
            *(t.to(p.acc).contiguous() for t in (lse, grad_lse, grad_target_logit, grad_nontarget_sum)), *p.options)
    grad_w_launch = GRAD_W_TILES[x.element_size(), subcenters > 1].launch(n, dim)
    grad_x_launch = GRAD_X_TILES[x.element_size(), subcenters > 1].launch(n, dim)
    row_blocks = triton.cdiv(n, grad_x_launch["BLOCK_M"])
    splits, per_split = class_splits(row_blocks, triton.cdiv(p.num_classes, grad_x_launch["BLOCK_C"]), x.device,
                                     max(1, MAX_PARTIAL_BYTES // (n * dim * p.scale.element_size())))
    part_grad = torch.empty(splits, n, dim, dtype=p.acc, device=x.device)
    part_scale_grad = torch.empty(splits, n, dtype=p.acc, device=x.device)
    with device_guard(x):
        grid = (triton.cdiv(p.num_classes, grad_w_launch["BLOCK_C"]), triton.cdiv(dim, grad_w_launch["BLOCK_D"]),
                subcenters)
        grad_weight_kernel[grid](
            x, weight, *rows, grad_weight, n, p.num_classes, dim, *p.strides(), *grad_weight.stride(),
            *p.margin_args, **p.constexprs, **grad_w_launch,
        )
        grid = (row_blocks, splits, triton.cdiv(dim, grad_x_launch["BLOCK_D"]))
        grad_x_kernel[grid](
            x, weight, *rows, part_grad, part_scale_grad, n, p.num_classes, dim, *p.strides(), per_split,
            *p.margin_args, **p.constexprs, FEATURE_SCALE=bool(feature_scale), **grad_x_launch,
        )

    # Through x̂ = x / max(‖x‖, eps): the tangent projection (I − x̂x̂ᵀ) / ‖x‖ above the floor, I / eps on it.
    x_hat = x.to(p.acc) * p.inv_x_norm.unsqueeze(1)
    grad_x_hat = part_grad.sum(0)
    tangent = grad_x_hat - x_hat * (grad_x_hat * x_hat).sum(1, keepdim=True)
    above_floor = (p.x_norm > spec.NORM_EPS).unsqueeze(1)
    grad = torch.where(above_floor, tangent, grad_x_hat) * p.inv_x_norm.unsqueeze(1)
    if feature_scale:
        # d‖x‖/dx = x / ‖x‖ = x̂ where ‖x‖ > 0, and 0 at x = 0 (as torch.norm's backward).
        direction = torch.where((p.x_norm > 0).unsqueeze(1), x.to(p.acc) / p.x_norm.unsqueeze(1), 0)
        grad += part_scale_grad.sum(0).unsqueeze(1) * direction
    grad_x.copy_(grad)
    return grad_x, grad_weight
