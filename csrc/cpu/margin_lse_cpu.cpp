// The fused primitive margin_lse / margin_lse_backward on the CPU (the math: docs/design.md
// §1 and the schema's comments in csrc/margin.cpp; the oracle: margin_ops/reference.py).
//
// Classes are processed in blocks of about `class_block(D)` rows of W, in parallel
// (at::parallel_for, one block per task). A block of classes [j0, j1) reads the K
// sub-center rows of each: rows [j0·K, j1·K) of W, or with class_index the rows
// r_j·K + k gathered straight into the block's tile (every block is converted to the
// accumulation dtype anyway, so the index costs no copy of W). For a block, the cosine tile
// (N x B·K) comes from one GEMM of the normalized features with the block's weights, the
// class cosines are its maxima over each class's K rows, the hard-example modulation and
// the margin are applied in the N x B tile (the margin to the few target entries, in
// place), and the tile is folded into per-block (max, sum-exp, non-target sum) partials,
// reduced in block order afterwards; nothing N x C is ever allocated. Memory beyond inputs
// and outputs: a few N x B·K and B·K x D tiles per thread, N x C/B partials in the forward
// pass, one N x D accumulator per thread in the backward pass. Options that are off
// (K = 1, no class_index, no hard examples) add no pass over a tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "../margin_checks.h"
#include "../margin_params.h"

namespace margin_ops {
namespace {

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows of W per block: about 256K accumulation elements, so each thread's B x D tiles stay
// near 1 MB (cache-sized) while the GEMMs keep a useful size.
int64_t class_block(int64_t dim) {
  return std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(dim, 1), 64, 4096);
}

struct NormalizedRows {
  at::Tensor hat;   // (R, D) rows / max(‖row‖, eps)
  at::Tensor norm;  // (R,)   ‖row‖
};

NormalizedRows normalize_rows(const at::Tensor& t) {
  auto norm = t.norm(2, {1});
  return {t / norm.clamp_min(kNormEps).unsqueeze(1), norm};
}

// Pulls a gradient back through t̂ = t / max(‖t‖, eps): the tangent projection
// (I − t̂ t̂ᵀ) / ‖t‖ where ‖t‖ > eps, and I / eps on the floor.
at::Tensor normalize_rows_backward(const at::Tensor& grad_hat, const NormalizedRows& n) {
  auto radial = (grad_hat * n.hat).sum(1, /*keepdim=*/true);
  auto above_floor = (n.norm > kNormEps).unsqueeze(1);
  auto tangent = at::where(above_floor, grad_hat - n.hat * radial, grad_hat);
  return tangent / n.norm.clamp_min(kNormEps).unsqueeze(1);
}

// A row-wise maximum as logsumexp's shift: 0 where it is −inf, i.e. where every term is
// −inf (with margin "external", a row whose only class in reach is its excluded target),
// so that the shifted terms are exp(−inf − 0) = 0 rather than NaN and such a lse is −inf.
at::Tensor lse_shift(const at::Tensor& row_max) {
  return row_max.masked_fill(row_max == -std::numeric_limits<double>::infinity(), 0);
}

// Calls visit(row, column_in_block) for every row whose label lies in [c0, c1).
template <typename Visit>
void for_each_target(const int64_t* labels, int64_t n, int64_t c0, int64_t c1, Visit visit) {
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] >= c0 && labels[i] < c1) visit(i, labels[i] - c0);
  }
}

// What both passes derive from their inputs before looping over class blocks.
struct Problem {
  MarginParams params;
  at::ScalarType acc;  // accumulation dtype: double for double inputs, else float
  int64_t n;
  int64_t subcenters;   // K: weight rows per class
  int64_t num_classes;  // C: weight rows / K, or class_index's length
  int64_t block, num_blocks;  // classes per block (about class_block(D) rows), blocks
  at::Tensor x_acc;    // (N, D) x in the accumulation dtype
  NormalizedRows xn;   // x̂ (N, D) and ‖x‖ (N,)
  at::Tensor scale;    // (N,) s_i: s, or ‖x_i‖ with feature_scale
  at::Tensor labels;   // (N,) int64, contiguous
  at::Tensor class_index;     // (C,) int64 contiguous, or undefined: class j is row block j
  at::Tensor hard_threshold;  // (N,) accumulation dtype, contiguous, or undefined: no hard
  at::Tensor hard_t;          //   examples; hard_t likewise, defined together

  std::pair<int64_t, int64_t> classes_of(int64_t b) const {
    return {b * block, std::min(num_classes, (b + 1) * block)};
  }
  bool external() const { return params.kind == MarginKind::External; }
  at::TensorOptions options() const { return x_acc.options(); }
};

Problem prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
                bool feature_scale, bool detach_margin_grad, int64_t subcenters,
                const std::optional<at::Tensor>& class_index,
                const std::optional<at::Tensor>& hard_threshold,
                const std::optional<at::Tensor>& hard_t) {
  // In margin_ops.checks.check_primitive's order: tensors, margin, options.
  check_inputs(x, weight, labels);
  Problem p;
  p.params = make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
  check_options(x, weight, subcenters, class_index, hard_threshold, hard_t);
  p.acc = accumulation_type(x.scalar_type());
  p.n = x.size(0);
  p.subcenters = subcenters;
  p.num_classes = class_index ? class_index->size(0) : weight.size(0) / subcenters;
  p.block = std::max<int64_t>(class_block(x.size(1)) / subcenters, 1);
  p.num_blocks = (p.num_classes + p.block - 1) / p.block;
  p.x_acc = x.to(p.acc).contiguous();
  p.xn = normalize_rows(p.x_acc);
  p.scale = feature_scale ? p.xn.norm.contiguous() : at::full({p.n}, s, p.options());
  p.labels = labels.contiguous();
  if (class_index) p.class_index = class_index->contiguous();
  if (hard_threshold) {
    p.hard_threshold = hard_threshold->to(p.acc).contiguous();
    p.hard_t = hard_t->to(p.acc).contiguous();
  }
  return p;
}

// The cosine tile of classes [j0, j1). The block's weights are never normalized in
// memory: their inverse norms scale the N x B·K tile's columns instead, which is cheaper
// than a pass over the B·K x D block whenever N < D, and is what the GPU kernels do.
struct CosineTile {
  at::Tensor rows;      // (B·K,) int64 the weight rows read, with class_index only
  at::Tensor weight;    // (B·K, D) the block's raw rows, accumulation dtype
  at::Tensor norm;      // (B·K,)   ‖w_r‖
  at::Tensor inv_norm;  // (B·K,)   1 / max(‖w_r‖, eps)
  at::Tensor row_cos;   // (N, B·K) x̂ · ŵ clamped to [−1, 1]
  at::Tensor cos;       // (N, B)   class cosines c: row_cos itself when K = 1, else the
                        //          largest of each class's K
  at::Tensor winner;    // (N, B)   int64 the k of that largest (first on ties), K > 1 only
};

CosineTile cosine_tile(const Problem& p, const at::Tensor& weight, int64_t j0, int64_t j1) {
  const int64_t k = p.subcenters;
  CosineTile t;
  if (p.class_index.defined()) {
    t.rows = p.class_index.slice(0, j0, j1);
    if (k > 1) {
      t.rows = (t.rows * k).unsqueeze(1).add(at::arange(k, t.rows.options())).flatten();
    }
    t.weight = weight.index_select(0, t.rows).to(p.acc);
  } else {
    t.weight = weight.slice(0, j0 * k, j1 * k).to(p.acc);
  }
  t.norm = t.weight.norm(2, {1});
  t.inv_norm = t.norm.clamp_min(kNormEps).reciprocal_();
  t.row_cos = at::mm(p.xn.hat, t.weight.t()).mul_(t.inv_norm.unsqueeze(0)).clamp_(-1, 1);
  if (k == 1) {
    t.cos = t.row_cos;
  } else {
    std::tie(t.cos, t.winner) = t.row_cos.view({p.n, j1 - j0, k}).max(2);
  }
  return t;
}

// The tile's non-target logit factors u = z / s_i with CurricularFace's hard examples:
// c·(t_i + c) where c > threshold_i, else c; with `slope`, also du/dc there. A row's target
// column keeps u = c and slope 1: its margin is applied per target afterwards.
template <typename scalar_t>
at::Tensor hard_example_factors(const Problem& p, const at::Tensor& cos, int64_t j0,
                                at::Tensor* slope) {
  const int64_t width = cos.size(1);
  auto factor = at::empty({p.n, width}, cos.options());
  auto factor_a = factor.accessor<scalar_t, 2>();
  scalar_t* slope_ptr = nullptr;  // row-major like factor
  if (slope) {
    *slope = at::empty_like(factor);
    slope_ptr = slope->data_ptr<scalar_t>();
  }
  const auto cos_a = cos.accessor<scalar_t, 2>();
  const scalar_t* threshold = p.hard_threshold.data_ptr<scalar_t>();
  const scalar_t* t = p.hard_t.data_ptr<scalar_t>();
  const int64_t* y = p.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t target = y[i] - j0;  // outside [0, width) when the target is elsewhere
    for (int64_t j = 0; j < width; ++j) {
      const scalar_t c = cos_a[i][j];
      const auto h = j == target ? TargetMargin<scalar_t>{c, 1}
                                 : hard_example<scalar_t>(c, threshold[i], t[i]);
      factor_a[i][j] = h.phi;
      if (slope_ptr) slope_ptr[i * width + j] = h.slope;
    }
  }
  return factor;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_lse_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad,
    std::optional<bool> /*allow_tf32: GPU only; the CPU products are exact*/, int64_t subcenters,
    const std::optional<at::Tensor>& class_index, const std::optional<at::Tensor>& hard_threshold,
    const std::optional<at::Tensor>& hard_t) {
  const Problem p = prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale,
                            detach_margin_grad, subcenters, class_index, hard_threshold, hard_t);
  const int64_t n = p.n;
  const auto opts = p.options();
  const int64_t* y = p.labels.data_ptr<int64_t>();
  auto target_logit = at::zeros({n}, opts);
  const int64_t num_blocks = p.num_blocks;
  auto part_max = at::empty({num_blocks, n}, opts);
  auto part_sum = at::empty({num_blocks, n}, opts);
  auto part_nontarget = at::empty({num_blocks, n}, opts);
  auto part_cos = at::empty({num_blocks, n}, opts);
  auto part_pred = at::empty({num_blocks, n}, opts.dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_lse_cpu", [&] {
    const scalar_t* scale_ptr = p.scale.data_ptr<scalar_t>();
    scalar_t* target_ptr = target_logit.data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch state: keep autograd out.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t b = b0; b < b1; ++b) {
        const auto [j0, j1] = p.classes_of(b);
        auto tile = cosine_tile(p, weight, j0, j1);
        auto [block_max_cos, block_pred] = tile.cos.max(1);
        part_cos[b].copy_(block_max_cos);
        part_pred[b].copy_(block_pred.add_(j0));
        auto logits = p.hard_threshold.defined()
                          ? hard_example_factors<scalar_t>(p, tile.cos, j0, nullptr)
                                .mul_(p.scale.unsqueeze(1))
                          : tile.cos.mul(p.scale.unsqueeze(1));
        part_nontarget[b].copy_(logits.sum(1));
        const auto cos_a = tile.cos.accessor<scalar_t, 2>();
        auto logits_a = logits.accessor<scalar_t, 2>();
        scalar_t* nontarget_ptr = part_nontarget[b].data_ptr<scalar_t>();
        for_each_target(y, n, j0, j1, [&](int64_t i, int64_t col) {
          nontarget_ptr[i] -= logits_a[i][col];  // the sum above took the target for a non-target
          // Each row's target lies in one block only.
          target_ptr[i] = scale_ptr[i] * target_margin<scalar_t>(cos_a[i][col], p.params).phi;
          logits_a[i][col] =  // "external" leaves the target out of lse
              p.external() ? -std::numeric_limits<scalar_t>::infinity() : target_ptr[i];
        });
        auto row_max = logits.amax(1);
        part_max[b].copy_(row_max);
        part_sum[b].copy_(logits.sub_(lse_shift(row_max).unsqueeze(1)).exp_().sum(1));
      }
    });
  });

  auto shift = lse_shift(part_max.amax(0));
  auto lse = shift + (part_sum * (part_max - shift).exp()).sum(0).log();
  auto [max_cos, best_block] = part_cos.max(0);  // first block on ties: the lowest class
  auto pred = part_pred.gather(0, best_block.unsqueeze(0)).squeeze(0);
  return {lse, target_logit, max_cos, pred, part_nontarget.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> margin_lse_backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_target_logit,
    const at::Tensor& grad_nontarget_sum, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad, std::optional<bool> /*allow_tf32*/,
    int64_t subcenters, const std::optional<at::Tensor>& class_index,
    const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_t) {
  const Problem p = prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale,
                            detach_margin_grad, subcenters, class_index, hard_threshold, hard_t);
  const int64_t n = p.n, dim = x.size(1), k = p.subcenters;
  check_per_row(grad_lse, "grad_lse", x);
  check_per_row(grad_target_logit, "grad_target_logit", x);
  check_per_row(grad_nontarget_sum, "grad_nontarget_sum", x);
  check_per_row(lse, "lse", x);
  const auto opts = p.options();
  // Rows that no class reads get no gradient: zero them when class_index may leave some.
  auto grad_weight = p.class_index.defined() ? at::zeros_like(weight) : at::empty_like(weight);
  const auto g_lse = grad_lse.to(p.acc).contiguous();
  const auto g_lse_col = g_lse.unsqueeze(1);
  const auto g_target = grad_target_logit.to(p.acc).contiguous();
  const auto g_sum_col = grad_nontarget_sum.to(p.acc).contiguous().unsqueeze(1);
  const auto lse_acc = lse.to(p.acc).contiguous();
  const auto lse_col = lse_acc.unsqueeze(1);
  const int64_t* y = p.labels.data_ptr<int64_t>();
  // dx̂ is a sum over all classes: one accumulator per thread, added in a fixed order
  // afterwards, so the result does not depend on scheduling.
  const int num_threads = at::get_num_threads();
  auto grad_x_hat_part = at::zeros({num_threads, n, dim}, opts);
  // Σ_j dz_ij · z_ij / s_i per row: the gradient through s_i = ‖x_i‖.
  auto scale_grad_part = at::zeros({num_threads, n}, opts);

  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_lse_backward_cpu", [&] {
    const scalar_t* scale_ptr = p.scale.data_ptr<scalar_t>();
    const scalar_t* g_lse_ptr = g_lse.data_ptr<scalar_t>();
    const scalar_t* g_target_ptr = g_target.data_ptr<scalar_t>();
    const scalar_t* lse_ptr = lse_acc.data_ptr<scalar_t>();
    at::parallel_for(0, p.num_blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const int tid = at::get_thread_num();
      auto grad_x_hat = grad_x_hat_part[tid];
      auto scale_grad = scale_grad_part[tid];
      auto scale_grad_a = scale_grad.accessor<scalar_t, 1>();
      for (int64_t b = b0; b < b1; ++b) {
        const auto [j0, j1] = p.classes_of(b);
        auto tile = cosine_tile(p, weight, j0, j1);
        const auto cos_a = tile.cos.accessor<scalar_t, 2>();
        // z / s_i for every class taken as a non-target (the targets are fixed below).
        at::Tensor hard_slope;
        const auto factor = p.hard_threshold.defined()
                                ? hard_example_factors<scalar_t>(p, tile.cos, j0, &hard_slope)
                                : tile.cos;
        // dz = g_lse · P + g_sum, built in place in one N x B tile.
        auto dz = factor.mul(p.scale.unsqueeze(1)).sub_(lse_col).exp_();
        at::addcmul_out(dz, g_sum_col, dz, g_lse_col);
        auto dz_a = dz.accessor<scalar_t, 2>();
        for_each_target(y, n, j0, j1, [&](int64_t i, int64_t col) {
          const scalar_t c = cos_a[i][col];
          const auto tm = target_margin<scalar_t>(c, p.params);
          // "external" leaves the target out of lse (which may then be −inf): P_iy = 0.
          const scalar_t softmax_term =
              p.external() ? 0 : g_lse_ptr[i] * std::exp(scale_ptr[i] * tm.phi - lse_ptr[i]);
          const scalar_t dz_target = softmax_term + g_target_ptr[i];
          // Stored times dφ/dc, so that the scaling below turns the whole tile into dc.
          dz_a[i][col] = dz_target * tm.slope;
          if (p.params.feature_scale) {
            // The tile sum below weighs this entry by u = c; the target's z / s is φ.
            scale_grad_a[i] += dz_target * tm.phi - dz_a[i][col] * c;
          }
        });
        if (p.params.feature_scale) scale_grad.add_((dz * factor).sum(1));
        // dc = s · dz, times du/dc on the hard examples (1 on the targets, whose dφ/dc is in).
        auto& grad_cos = dz.mul_(p.scale.unsqueeze(1));
        if (hard_slope.defined()) grad_cos.mul_(hard_slope);
        // Through the max over sub-centers: each class's dc goes to its winning row only.
        at::Tensor grad_rows = grad_cos;
        if (k > 1) {
          grad_rows = at::zeros_like(tile.row_cos);
          grad_rows.view({n, j1 - j0, k}).scatter_(2, tile.winner.unsqueeze(2),
                                                   grad_cos.unsqueeze(2));
        }
        // Through ŵ = w / max(‖w‖, eps): dw = (dŵ − ŵ (ŵ·dŵ)) / ‖w‖ above the floor, dŵ / eps
        // on it, with dŵ = dcᵀ x̂ and ŵ·dŵ = Σ_i dc_ir c_ir taken from the tile.
        auto radial = (grad_rows * tile.row_cos).sum(0).masked_fill_(tile.norm <= kNormEps, 0);
        grad_rows.mul_(tile.inv_norm.unsqueeze(0));  // dc · diag(1/‖w‖): now ŵ-free
        auto radial_coef = radial.mul_(tile.inv_norm).mul_(tile.inv_norm).neg_().unsqueeze(1);
        if (tile.rows.defined()) {  // distinct rows (check_options): no two blocks write one
          grad_weight.index_copy_(0, tile.rows,
                                  at::mm(grad_rows.t(), p.xn.hat)
                                      .addcmul_(tile.weight, radial_coef)
                                      .to(grad_weight.scalar_type()));
        } else {
          auto grad_w = grad_weight.slice(0, j0 * k, j1 * k);
          if (grad_w.scalar_type() == p.acc) {
            at::mm_out(grad_w, grad_rows.t(), p.xn.hat).addcmul_(tile.weight, radial_coef);
          } else {
            grad_w.copy_(at::mm(grad_rows.t(), p.xn.hat).addcmul_(tile.weight, radial_coef));
          }
        }
        grad_x_hat.addmm_(grad_rows, tile.weight);
      }
    });
  });

  auto grad_x = normalize_rows_backward(grad_x_hat_part.sum(0), p.xn);
  if (feature_scale) {
    // d‖x‖/dx = x / ‖x‖, and 0 at x = 0 (as torch.norm's backward).
    auto direction = p.x_acc / p.xn.norm.unsqueeze(1);
    direction.masked_fill_((p.xn.norm == 0).unsqueeze(1), 0);
    grad_x.add_(scale_grad_part.sum(0).unsqueeze(1) * direction);
  }
  return {grad_x.to(x.scalar_type()), grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(margin, CPU, m) {
  m.impl("margin_lse", &margin_lse_cpu);
  m.impl("margin_lse_backward", &margin_lse_backward_cpu);
}

}  // namespace margin_ops
