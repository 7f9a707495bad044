"""Backward pass of the fused primitive: ``margin_lse_backward`` with Triton kernels.

The cosines are recomputed once (nothing N x C outlives a chunk), as in the CUDA backend
(csrc/cuda/margin_lse_kernels.cuh). The classes are processed in chunks of up to
SCRATCH_BYTES of dS' (N x chunk·K numbers of the input dtype, 16 MiB: e.g. 16,384 classes
at N = 512 in bfloat16); per chunk, three launches in stream order:

* :func:`grad_tile_kernel` (row block x class tile): recomputes the cosine tile (K GEMMs
  with sub-centers, as the forward), forms dlogit / dcos in registers
  (:func:`tiles.logit_grad_tile`) and stores dS' = dcos / ‖w‖ to the scratch (one column
  per sub-center, 0 where the sub-center does not win), the radial sums Σ_i dcos·c per
  (row block, column), ‖w‖ and the feature-scale sums.
* :func:`grad_weight_kernel`: dW (chunk) = dS'ᵀ x̂ − w R / ‖w‖², a GEMM over N. Each dW
  row has one owner that writes it once, at the W row the class reads (through
  class_index): no atomics.
* :func:`grad_x_kernel`: dx̂ += dS' W (chunk), split over the chunk's columns into a fixed
  number of splits; each (split, rows, columns) partial has one owner, stored by the first
  chunk and added to by the next ones (stream order): no atomics.

Executed work: 2NCDK (the recompute) + 4NCDK (two gradient GEMMs) for 6NCDK useful plus
2NCDK. torch then sums the dx̂ partials in split order (deterministic), pulls dx̂ back
through x̂ = x / max(‖x‖, eps) and adds the feature-scale term, as
csrc/cpu/margin_lse_cpu.cpp does.

Precision: the gradient GEMMs take dS' and x̂ rounded to the input dtype (as the CUDA
backend's), where the CPU kernel keeps dcos in float32: bfloat16 gradients are off by up
to ~1e-2 of their largest entry against float64, not ~3e-3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import spec
from .margin import NORM_EPS
from .launch import choose
from .problem import class_splits, device_guard, prepare
from .tiles import class_cosine_tile, first_weight_rows, inverse_norm, load_hard, logit_grad_tile, mma, weight_norms

#: Bound on the dS' scratch of one class chunk: N x (classes x K) input-dtype numbers (CUDA's bound).
SCRATCH_BYTES = 16 << 20
#: Classes of a chunk are a multiple of this (the widest class tile of any launch candidate).
CHUNK_ALIGN = 256
#: Bound on the dx̂ partials: splits x N x D accumulation-dtype numbers.
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
def grad_tile_kernel(
    x_ptr, w_ptr, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr,
    class_index_ptr, hard_threshold_ptr, hard_t_ptr, scratch_ptr, part_radial_ptr, w_norm_ptr, part_scale_grad_ptr,
    N, C, D, stride_xn, stride_xd, stride_wc, stride_wd, stride_s, chunk_first, accumulate,
    m1: tl.float64, m2: tl.float64, m3: tl.float64, lamb: tl.float64,
    cos_m: tl.float64, sin_m: tl.float64, threshold: tl.float64, sphere_m,
    MARGIN: tl.constexpr, DETACH: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr, HARD: tl.constexpr, FEATURE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The one recompute: rows [pid0·BLOCK_M, +BLOCK_M) x chunk classes [pid1·BLOCK_C, +BLOCK_C).

    Chunk class j (0 ≤ j < min(C − chunk_first, stride_s / K)) is class chunk_first + j; its
    sub-center k is scratch column q = j·K + k. Inputs as :func:`margin_lse.margin_lse_kernel`'s,
    plus lse, grad_lse, grad_target, grad_sum (N,) ACC. Writes, for the tile's entries:

    * scratch (N, stride_s) input dtype: dS'_iq = dcos_ij / max(‖w_r‖, eps) where k wins
      c_ij, else 0 (r = r_j·K + k, the W row of column q);
    * part_radial (row blocks, stride_s) ACC at [pid0, q]: Σ_i dcos_ij c_ij over the rows
      where k wins;
    * w_norm (stride_s,) ACC at q: ‖w_r‖ (programs pid0 = 0 only);
    * with FEATURE_SCALE, part_scale_grad (class tiles of a chunk, N) ACC at [pid1, rows]:
      Σ_j dlogit_ij u_ij (stored for the first chunk, added to after: ``accumulate``).
    """
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    local = tile * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cols = chunk_first + local
    col_mask = (cols < C) & (local * SUBCENTERS < stride_s)
    labels, inv_x_norm, scale, lse, grad_lse, grad_target, grad_sum = load_rows(
        rows, row_mask, labels_ptr, inv_x_norm_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr)
    acc_dtype = inv_x_norm.dtype
    hard_threshold, hard_t = load_hard(rows, row_mask, hard_threshold_ptr, hard_t_ptr, acc_dtype, HARD)
    first_rows = first_weight_rows(class_index_ptr, cols, col_mask, SUBCENTERS, INDEXED)
    cos, winner, inv_w_norm = class_cosine_tile(x_ptr, w_ptr, rows, first_rows, row_mask, col_mask, inv_x_norm,
                                                D, stride_xn, stride_xd, stride_wc, stride_wd, SUBCENTERS,
                                                BLOCK_M, BLOCK_C, BLOCK_K, INPUT_PRECISION, UPCAST)
    dlogit, dcos, u = logit_grad_tile(cos, cols, col_mask, labels, scale, lse, grad_lse, grad_target, grad_sum,
                                      hard_threshold, hard_t, m1, m2, m3, lamb, cos_m, sin_m, threshold, sphere_m,
                                      MARGIN, DETACH, HARD)
    # ŵ = w / ‖w‖: the winner's column factor goes on the gradient operand, not on W.
    scaled = dcos * inv_w_norm
    tile_mask = row_mask[:, None] & col_mask[None, :]
    for k in tl.static_range(SUBCENTERS):
        q = local * SUBCENTERS + k
        dcos_k = dcos
        scaled_k = scaled
        if SUBCENTERS > 1:
            dcos_k = tl.where(winner == k, dcos, 0.0)
            scaled_k = tl.where(winner == k, scaled, 0.0)
        tl.store(scratch_ptr + rows[:, None] * stride_s + q[None, :], scaled_k.to(scratch_ptr.dtype.element_ty),
                 mask=tile_mask)
        tl.store(part_radial_ptr + pid_m.to(tl.int64) * stride_s + q, tl.sum(dcos_k * cos, axis=0), mask=col_mask)
        if pid_m == 0:
            tl.store(w_norm_ptr + q, weight_norms(w_ptr, first_rows + k, col_mask, D, stride_wc, stride_wd, acc_dtype,
                                                  BLOCK_C, BLOCK_K), mask=col_mask)
    if FEATURE_SCALE:
        scale_grad = tl.sum(dlogit * u, axis=1)
        part = part_scale_grad_ptr + tile.to(tl.int64) * N + rows
        if accumulate:
            scale_grad += tl.load(part, mask=row_mask, other=0.0)
        tl.store(part, scale_grad, mask=row_mask)


@triton.jit
def scratch_weight_rows(class_index_ptr, q, q_mask, chunk_first, SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr):
    """The W rows r_j·K + k of scratch columns q = j·K + k (int64, with their mask)."""
    classes = chunk_first + q // SUBCENTERS
    return first_weight_rows(class_index_ptr, classes, q_mask, SUBCENTERS, INDEXED) + q % SUBCENTERS


@triton.jit
def grad_weight_kernel(
    x_hat_ptr, w_ptr, class_index_ptr, scratch_ptr, part_radial_ptr, w_norm_ptr, grad_w_ptr,
    N, D, stride_wc, stride_wd, stride_gc, stride_gd, stride_s, chunk_first, chunk_columns, row_blocks,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dW of scratch columns [pid0·BLOCK_C, +BLOCK_C), W columns [pid1·BLOCK_D, +BLOCK_D).

    x_hat (N, D) input dtype, contiguous: x̂ = x / max(‖x‖, eps). scratch, part_radial
    (``row_blocks`` rows), w_norm as :func:`grad_tile_kernel` wrote them; columns past
    ``chunk_columns`` are not the chunk's. Writes grad_w (R, D) (w's dtype, strided) at the
    columns' W rows r: dw_r = Σ_i dS'_ir x̂_i − w_r R_r / ‖w_r‖² (R_r the radial sums, left
    out on the norm floor, where dS' already carries 1/eps): each row written once, by
    one program, summing over N in a fixed order.
    """
    q = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    q_mask = q < chunk_columns
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = ds < D
    acc_dtype = part_radial_ptr.dtype.element_ty
    grad = tl.zeros((BLOCK_C, BLOCK_D), acc_dtype)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        scratch_t = tl.load(scratch_ptr + q[:, None] + rows[None, :] * stride_s,
                            mask=q_mask[:, None] & row_mask[None, :], other=0.0)
        x_hat = tl.load(x_hat_ptr + rows[:, None] * D + ds[None, :], mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0)
        grad = mma(scratch_t, x_hat, grad, INPUT_PRECISION, UPCAST)
    radial = tl.zeros((BLOCK_C,), acc_dtype)
    for block in range(row_blocks):
        radial += tl.load(part_radial_ptr + block * stride_s + q, mask=q_mask, other=0.0)
    w_norm = tl.load(w_norm_ptr + q, mask=q_mask, other=1.0)
    inv_w_norm = inverse_norm(w_norm)
    radial = tl.where(w_norm > NORM_EPS, radial, 0.0)
    w_rows = scratch_weight_rows(class_index_ptr, q, q_mask, chunk_first, SUBCENTERS, INDEXED)
    mask = q_mask[:, None] & d_mask[None, :]
    w = tl.load(w_ptr + w_rows[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask, other=0.0)
    grad -= (radial * inv_w_norm * inv_w_norm)[:, None] * w.to(acc_dtype)
    tl.store(grad_w_ptr + w_rows[:, None] * stride_gc + ds[None, :] * stride_gd,
             grad.to(grad_w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_x_kernel(
    w_ptr, class_index_ptr, scratch_ptr, part_grad_ptr,
    N, D, stride_wc, stride_wd, stride_s, chunk_first, chunk_columns, columns_per_split, accumulate,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SUBCENTERS: tl.constexpr, INDEXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split pid2's share of dx̂ = dS' W for rows [pid0·BLOCK_M, +BLOCK_M), columns [pid1·BLOCK_D, +BLOCK_D).

    The split owns scratch columns [pid2·columns_per_split, +columns_per_split) of the
    chunk (a multiple of BLOCK_C). part_grad (splits, N, D) ACC at [pid2, rows, columns]:
    stored for the first chunk, added to after (``accumulate``): one owner, chunks in order.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = ds < D
    split = tl.program_id(2)
    acc_dtype = part_grad_ptr.dtype.element_ty
    grad = tl.zeros((BLOCK_M, BLOCK_D), acc_dtype)
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, chunk_columns)
    for q0 in range(first, last, BLOCK_C):
        q = q0 + tl.arange(0, BLOCK_C).to(tl.int64)
        q_mask = q < last
        scratch = tl.load(scratch_ptr + rows[:, None] * stride_s + q[None, :],
                          mask=row_mask[:, None] & q_mask[None, :], other=0.0)
        w_rows = scratch_weight_rows(class_index_ptr, q, q_mask, chunk_first, SUBCENTERS, INDEXED)
        w = tl.load(w_ptr + w_rows[:, None] * stride_wc + ds[None, :] * stride_wd,
                    mask=q_mask[:, None] & d_mask[None, :], other=0.0)
        grad = mma(scratch, w, grad, INPUT_PRECISION, UPCAST)
    part = part_grad_ptr + (split.to(tl.int64) * N + rows)[:, None] * D + ds[None, :]
    mask = row_mask[:, None] & d_mask[None, :]
    if accumulate:
        grad += tl.load(part, mask=mask, other=0.0)
    tl.store(part, grad, mask=mask)


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
    num_classes, dtype, device = p.num_classes, x.dtype, x.device
    rows = (p.labels, p.inv_x_norm, p.scale,
            *(t.to(p.acc).contiguous() for t in (lse, grad_lse, grad_target_logit, grad_nontarget_sum)), *p.options)
    # The chunk: as many classes as the scratch bound allows, a multiple of CHUNK_ALIGN.
    fit = SCRATCH_BYTES // (n * subcenters * x.element_size()) // CHUNK_ALIGN * CHUNK_ALIGN
    chunk = min(num_classes, max(CHUNK_ALIGN, fit))
    columns = chunk * subcenters
    scratch = torch.empty(n, columns, dtype=dtype, device=device)
    part_radial = torch.empty(triton.cdiv(n, 16), columns, dtype=p.acc, device=device)
    w_norm = torch.empty(columns, dtype=p.acc, device=device)
    part_scale_grad = torch.empty(triton.cdiv(chunk, 16), n, dtype=p.acc, device=device)
    x_hat_operand = (x.to(p.acc) * p.inv_x_norm.unsqueeze(1)).to(dtype).contiguous()
    part_grads = {}

    def run_tile(launch, first):
        sizes = launch.constexprs("grad_tile", (n, chunk, dim))
        grid = (triton.cdiv(n, sizes["BLOCK_M"]), triton.cdiv(chunk, sizes["BLOCK_C"]))
        with device_guard(x):
            grad_tile_kernel[grid](
                x, weight, *rows, scratch, part_radial, w_norm, part_scale_grad, n, num_classes, dim, *p.strides(),
                columns, first, first > 0, *p.margin_args, **p.constexprs, FEATURE_SCALE=bool(feature_scale),
                **sizes)

    def run_weight(launch, first, tile_rows):
        sizes = launch.constexprs("grad_weight", (columns, dim, n))
        grid = (triton.cdiv(columns, sizes["BLOCK_C"]), triton.cdiv(dim, sizes["BLOCK_D"]))
        with device_guard(x):
            grad_weight_kernel[grid](
                x_hat_operand, weight, p.options[0], scratch, part_radial, w_norm, grad_weight, n, dim, *weight.stride(),
                *grad_weight.stride(), columns, first, min(chunk, num_classes - first) * subcenters, tile_rows,
                **gemm_constexprs, **sizes)

    def run_x(launch, first):
        sizes = launch.constexprs("grad_x", (n, dim, columns))
        row_blocks, d_blocks = triton.cdiv(n, sizes["BLOCK_M"]), triton.cdiv(dim, sizes["BLOCK_D"])
        splits, per_split = class_splits(row_blocks * d_blocks, triton.cdiv(columns, sizes["BLOCK_C"]), device,
                                         max(1, MAX_PARTIAL_BYTES // (n * dim * p.scale.element_size())))
        if splits not in part_grads:
            part_grads[splits] = torch.empty(splits, n, dim, dtype=p.acc, device=device)
        with device_guard(x):
            grad_x_kernel[(row_blocks, d_blocks, splits)](
                weight, p.options[0], scratch, part_grads[splits], n, dim, *weight.stride(), columns, first,
                min(chunk, num_classes - first) * subcenters, per_split * sizes["BLOCK_C"], first > 0,
                **gemm_constexprs, **sizes)
        return part_grads[splits]

    gemm_constexprs = {key: p.constexprs[key] for key in ("INPUT_PRECISION", "UPCAST", "SUBCENTERS", "INDEXED")}
    tile_launch = choose("grad_tile", dtype, n, dim, device, subcenters, lambda launch: run_tile(launch, 0),
                         outputs=(part_scale_grad,))
    tile_sizes = tile_launch.constexprs("grad_tile", (n, chunk, dim))
    tile_rows, tiles = triton.cdiv(n, tile_sizes["BLOCK_M"]), triton.cdiv(chunk, tile_sizes["BLOCK_C"])
    for first in range(0, num_classes, chunk):
        run_tile(tile_launch, first)
        if first == 0:
            weight_launch = choose("grad_weight", dtype, n, dim, device, subcenters,
                                   lambda launch: run_weight(launch, 0, tile_rows), outputs=(grad_weight,))
            x_launch = choose("grad_x", dtype, n, dim, device, subcenters, lambda launch: run_x(launch, 0))
        run_weight(weight_launch, first, tile_rows)
        part_grad = run_x(x_launch, first)

    # Through x̂ = x / max(‖x‖, eps): the tangent projection (I − x̂x̂ᵀ) / ‖x‖ above the floor, I / eps on it.
    x_hat = x.to(p.acc) * p.inv_x_norm.unsqueeze(1)
    grad_x_hat = part_grad.sum(0)
    tangent = grad_x_hat - x_hat * (grad_x_hat * x_hat).sum(1, keepdim=True)
    above_floor = (p.x_norm > spec.NORM_EPS).unsqueeze(1)
    grad = torch.where(above_floor, tangent, grad_x_hat) * p.inv_x_norm.unsqueeze(1)
    if feature_scale:
        # d‖x‖/dx = x / ‖x‖ = x̂ where ‖x‖ > 0, and 0 at x = 0 (as torch.norm's backward).
        direction = torch.where((p.x_norm > 0).unsqueeze(1), x.to(p.acc) / p.x_norm.unsqueeze(1), 0)
        grad += part_scale_grad[:tiles].sum(0).unsqueeze(1) * direction
    grad_x.copy_(grad)
    return grad_x, grad_weight
