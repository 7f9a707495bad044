"""Forward pass of the fused primitive: ``margin_lse`` with Triton kernels.

One program per (block of BLOCK_M rows, group of consecutive class blocks): it streams
the group's W tiles, forms each cosine tile with one tl.dot per sub-center (W rows read
in place, through class_index when given), puts the margin on the target entries and the
hard-example modulation on the others, and folds the tile into running (max, sum-exp,
best cosine, argmax, non-target sum) per row, written once per group to (groups, N)
partial buffers that a few torch ops combine in a fixed order.
Nothing N x C is ever allocated. Programs of the same group are adjacent in launch order,
so they read each W tile from HBM about once and share it through L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .margin import EXTERNAL
from .launch import choose
from .problem import class_splits, device_guard, prepare
from .tiles import class_cosine_tile, first_weight_rows, load_hard, logits, lse_logits, margin_tile, split_blocks

#: Most class groups: the partials are 5 x groups x N numbers.
MAX_SPLITS = 1024


@triton.jit
def margin_lse_kernel(
    x_ptr, w_ptr, labels_ptr, inv_x_norm_ptr, scale_ptr, class_index_ptr, hard_threshold_ptr, hard_t_ptr,
    target_ptr, part_max_ptr, part_sum_ptr, part_cos_ptr, part_pred_ptr, part_nontarget_ptr,
    N, C, D, stride_xn, stride_xd, stride_wc, stride_wd, blocks_per_split,
    m1: tl.float64, m2: tl.float64, m3: tl.float64, lamb: tl.float64,
    cos_m: tl.float64, sin_m: tl.float64, threshold: tl.float64, sphere_m,
    MARGIN: tl.constexpr, DETACH: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr, HARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partials of rows [pid0·BLOCK_M, +BLOCK_M) over class group pid1.

    x (N, D), w (R, D): input dtype, strided. labels (N,) int64; inv_x_norm, scale (N,)
    ACC; class_index (C,) int64 (read when INDEXED); hard_threshold, hard_t (N,) ACC (read
    when HARD). Writes target (N,) ACC where the row's label falls in the group, and
    part_max, part_sum (running max and sum of exp(logit − max) over lse's logits),
    part_cos (largest cosine), part_nontarget (sum of the non-target logits) ACC and
    part_pred (the class of part_cos) int64, each (groups, N), at [pid1, rows].
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    inv_x_norm = tl.load(inv_x_norm_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    acc_dtype = inv_x_norm.dtype
    hard_threshold, hard_t = load_hard(rows, row_mask, hard_threshold_ptr, hard_t_ptr, acc_dtype, HARD)

    run_max = tl.full((BLOCK_M,), float("-inf"), acc_dtype)
    run_sum = tl.zeros((BLOCK_M,), acc_dtype)
    nontarget = tl.zeros((BLOCK_M,), acc_dtype)
    best_cos = tl.full((BLOCK_M,), float("-inf"), acc_dtype)
    best_class = tl.zeros((BLOCK_M,), tl.int64)
    first_block, last_block = split_blocks(split, blocks_per_split, C, BLOCK_C)
    for block in range(first_block, last_block):
        cols = block * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        cos, _, _ = class_cosine_tile(x_ptr, w_ptr, rows, first_weight_rows(class_index_ptr, cols, col_mask,
                                                                            SUBCENTERS, INDEXED),
                                      row_mask, col_mask, inv_x_norm, D, stride_xn, stride_xd, stride_wc, stride_wd,
                                      SUBCENTERS, BLOCK_M, BLOCK_C, BLOCK_K, INPUT_PRECISION, UPCAST)
        u, is_target, _ = margin_tile(cos, cols, col_mask, labels, hard_threshold, hard_t, m1, m2, m3, lamb,
                                      cos_m, sin_m, threshold, sphere_m, MARGIN, DETACH, HARD)
        logit = logits(u, scale, col_mask)
        # Each row's target lies in one tile of one group: exactly one program writes it.
        has_target = row_mask & (labels >= block * BLOCK_C) & (labels < tl.minimum(C, (block + 1) * BLOCK_C))
        tl.store(target_ptr + rows, tl.sum(tl.where(is_target, logit, 0.0), axis=1), mask=has_target)
        nontarget += tl.sum(tl.where(col_mask[None, :] & (is_target == 0), logit, 0.0), axis=1)

        in_lse = lse_logits(logit, is_target, MARGIN)
        new_max = tl.maximum(run_max, tl.max(in_lse, axis=1))
        shift = new_max
        if MARGIN == EXTERNAL:
            # All of a row's logits so far may be left out (−inf): exp(−inf − (−inf)) would be NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(in_lse - shift[:, None]), axis=1)
        run_max = new_max
        # As torch.max: NaN beats every number, and on ties (NaN or not) the earlier, lower
        # class wins (strictly greater; a NaN already held is never replaced). tl.max and
        # tl.argmax do not order NaN, so a row's NaNs are looked for separately.
        is_nan = (cos != cos).to(tl.int32)
        masked_cos = tl.where(col_mask[None, :] & (is_nan == 0), cos, float("-inf"))
        tile_nan = tl.max(is_nan, axis=1) > 0
        tile_best = tl.where(tile_nan, float("nan"), tl.max(masked_cos, axis=1))
        tile_class = tl.where(tile_nan, tl.argmax(is_nan, axis=1), tl.argmax(masked_cos, axis=1))
        better = (tile_best > best_cos) | (tile_nan & (best_cos == best_cos))
        best_cos = tl.where(better, tile_best, best_cos)
        best_class = tl.where(better, block * BLOCK_C + tile_class.to(tl.int64), best_class)

    part = split.to(tl.int64) * N + rows
    tl.store(part_max_ptr + part, run_max, mask=row_mask)
    tl.store(part_sum_ptr + part, run_sum, mask=row_mask)
    tl.store(part_cos_ptr + part, best_cos, mask=row_mask)
    tl.store(part_pred_ptr + part, best_class, mask=row_mask)
    tl.store(part_nontarget_ptr + part, nontarget, mask=row_mask)


def margin_lse(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad,
               allow_tf32=None, subcenters=1, class_index=None, hard_threshold=None, hard_t=None):
    """margin_lse on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    x (N, D), weight (R, D) = (C·K, D): float32/bfloat16/float16/float64, any strides;
    labels (N,) int64, outside [0, C) for rows without a target; subcenters K; class_index
    (C,) int64 or None; hard_threshold, hard_t (N,) floating or None. Returns lse,
    target_logit, max_cos, nontarget_sum (N,) ACC and pred (N,) int64, in the order
    (lse, target_logit, max_cos, pred, nontarget_sum): see
    :func:`margin_ops.reference.margin_lse`.
    """
    p = prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad, allow_tf32,
                subcenters, class_index, hard_threshold, hard_t)
    n, dim = x.shape
    target = torch.zeros(n, dtype=p.acc, device=x.device)
    if n == 0:
        return (target, target.clone(), target.clone(), torch.zeros(0, dtype=torch.int64, device=x.device),
                target.clone())

    def run(launch):
        sizes = launch.constexprs("forward", (n, p.num_classes, dim))
        row_blocks = triton.cdiv(n, sizes["BLOCK_M"])
        splits, per_split = class_splits(row_blocks, triton.cdiv(p.num_classes, sizes["BLOCK_C"]), x.device,
                                         MAX_SPLITS)
        parts = torch.empty(4, splits, n, dtype=p.acc, device=x.device)
        part_pred = torch.empty(splits, n, dtype=torch.int64, device=x.device)
        with device_guard(x):
            margin_lse_kernel[(row_blocks, splits)](
                x, weight, p.labels, p.inv_x_norm, p.scale, *p.options, target, *parts[:3], part_pred, parts[3],
                n, p.num_classes, dim, *p.strides(), per_split, *p.margin_args, **p.constexprs, **sizes,
            )
        return parts, part_pred

    launch = choose("forward", x.dtype, n, dim, x.device, subcenters, run, outputs=(target,))
    (part_max, part_sum, part_cos, part_nontarget), part_pred = run(launch)
    global_max = part_max.amax(0)
    # −inf when lse has no logits at all (margin "external" with one class): then lse = −inf, not NaN.
    shift = torch.where(global_max == -torch.inf, 0, global_max)
    lse = shift + (part_sum * (part_max - shift).exp()).sum(0).log()
    max_cos, best_split = part_cos.max(0)  # the first group on ties: the lowest class
    pred = part_pred.gather(0, best_split.unsqueeze(0)).squeeze(0)
    return lse, target, max_cos, pred, part_nontarget.sum(0)
