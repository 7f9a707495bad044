// The fused primitive margin_lse / margin_lse_backward on the CPU.
//
// Classes are processed in blocks of `class_block(D)` rows of W, in parallel
// (at::parallel_for, one block per task). For a block, the cosine tile (N x B) comes from
// one GEMM of the normalized features with the block's normalized weights, the margin
// is applied to the few target entries in place, and the tile is folded into per-block
// (max, sum-exp) partials; nothing N x C is ever allocated. Memory beyond inputs and
// outputs: a few N x B and B x D tiles per thread, N x C/B partials in the forward pass,
// one N x D accumulator per thread in the backward pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// Calls visit(row, column_in_block) for every row whose label lies in [c0, c1).
template <typename Visit>
void for_each_target(const int64_t* labels, int64_t n, int64_t c0, int64_t c1, Visit visit) {
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] >= c0 && labels[i] < c1) visit(i, labels[i] - c0);
  }
}

// The cosine tile of classes [c0, c1). The block's weights are never normalized in
// memory: their inverse norms scale the N x B tile's columns instead, which is cheaper
// than a pass over the B x D block whenever N < D, and is what the GPU kernels do.
struct CosineTile {
  at::Tensor weight;    // (B, D) the block's raw rows, accumulation dtype
  at::Tensor norm;      // (B,)   ‖w_c‖
  at::Tensor inv_norm;  // (B,)   1 / max(‖w_c‖, eps)
  at::Tensor cos;       // (N, B) x̂ · ŵ clamped to [−1, 1]
};

CosineTile cosine_tile(const at::Tensor& x_hat, const at::Tensor& weight, int64_t c0, int64_t c1,
                       at::ScalarType acc) {
  CosineTile t;
  t.weight = weight.slice(0, c0, c1).to(acc);
  t.norm = t.weight.norm(2, {1});
  t.inv_norm = t.norm.clamp_min(kNormEps).reciprocal_();
  t.cos = at::mm(x_hat, t.weight.t()).mul_(t.inv_norm.unsqueeze(0)).clamp_(-1, 1);
  return t;
}

// What both passes derive from their inputs before looping over class blocks.
struct Problem {
  MarginParams params;
  at::ScalarType acc;  // accumulation dtype: double for double inputs, else float
  int64_t n, num_classes, block, num_blocks;
  at::Tensor x_acc;    // (N, D) x in the accumulation dtype
  NormalizedRows xn;   // x̂ (N, D) and ‖x‖ (N,)
  at::Tensor scale;    // (N,) s_i: s, or ‖x_i‖ with feature_scale
  at::Tensor labels;   // (N,) int64, contiguous

  std::pair<int64_t, int64_t> classes_of(int64_t b) const {
    return {b * block, std::min(num_classes, (b + 1) * block)};
  }
  at::TensorOptions options() const { return x_acc.options(); }
};

Problem prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
                bool feature_scale, bool detach_margin_grad) {
  check_inputs(x, weight, labels);
  Problem p;
  p.params = make_params(margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
  p.acc = accumulation_type(x.scalar_type());
  p.n = x.size(0);
  p.num_classes = weight.size(0);
  p.block = class_block(x.size(1));
  p.num_blocks = (p.num_classes + p.block - 1) / p.block;
  p.x_acc = x.to(p.acc).contiguous();
  p.xn = normalize_rows(p.x_acc);
  p.scale = feature_scale ? p.xn.norm.contiguous() : at::full({p.n}, s, p.options());
  p.labels = labels.contiguous();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_lse_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad,
    std::optional<bool> /*allow_tf32: GPU only; the CPU products are exact*/, int64_t subcenters,
    const std::optional<at::Tensor>& class_index, const std::optional<at::Tensor>& hard_threshold,
    const std::optional<at::Tensor>& hard_t) {
  check_options(x, weight, subcenters, class_index, hard_threshold, hard_t);
  TORCH_CHECK(subcenters == 1 && !class_index && !hard_threshold && margin != "external",
              "TODO(v2): not yet in the CPU kernel");
  const Problem p =
      prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
  const int64_t n = p.n;
  const auto opts = p.options();
  const int64_t* y = p.labels.data_ptr<int64_t>();
  auto target_logit = at::zeros({n}, opts);
  const int64_t num_blocks = p.num_blocks;
  auto part_max = at::empty({num_blocks, n}, opts);
  auto part_sum = at::empty({num_blocks, n}, opts);
  auto part_cos = at::empty({num_blocks, n}, opts);
  auto part_pred = at::empty({num_blocks, n}, opts.dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_lse_cpu", [&] {
    const scalar_t* scale_ptr = p.scale.data_ptr<scalar_t>();
    scalar_t* target_ptr = target_logit.data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch state: keep autograd out.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t b = b0; b < b1; ++b) {
        const auto [c0, c1] = p.classes_of(b);
        auto tile = cosine_tile(p.xn.hat, weight, c0, c1, p.acc);
        auto [block_max_cos, block_pred] = tile.cos.max(1);
        part_cos[b].copy_(block_max_cos);
        part_pred[b].copy_(block_pred.add_(c0));
        auto logits = tile.cos.mul(p.scale.unsqueeze(1));
        const auto cos_a = tile.cos.accessor<scalar_t, 2>();
        auto logits_a = logits.accessor<scalar_t, 2>();
        for_each_target(y, n, c0, c1, [&](int64_t i, int64_t col) {
          const auto tm = target_margin<scalar_t>(cos_a[i][col], p.params);
          logits_a[i][col] = scale_ptr[i] * tm.phi;
          target_ptr[i] = logits_a[i][col];  // each row's target lies in one block only
        });
        auto row_max = logits.amax(1);
        part_max[b].copy_(row_max);
        part_sum[b].copy_(logits.sub_(row_max.unsqueeze(1)).exp_().sum(1));
      }
    });
  });

  auto global_max = part_max.amax(0);
  auto lse = global_max + (part_sum * (part_max - global_max).exp()).sum(0).log();
  auto [max_cos, best_block] = part_cos.max(0);  // first block on ties: the lowest class
  auto pred = part_pred.gather(0, best_block.unsqueeze(0)).squeeze(0);
  return {lse, target_logit, max_cos, pred, at::zeros_like(lse)};
}

std::tuple<at::Tensor, at::Tensor> margin_lse_backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_target_logit,
    const at::Tensor& grad_nontarget_sum, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    c10::string_view margin, double s, double m1, double m2, double m3, double lamb,
    bool feature_scale, bool detach_margin_grad, std::optional<bool> /*allow_tf32*/,
    int64_t subcenters, const std::optional<at::Tensor>& class_index,
    const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_t) {
  check_options(x, weight, subcenters, class_index, hard_threshold, hard_t);
  TORCH_CHECK(subcenters == 1 && !class_index && !hard_threshold && margin != "external",
              "TODO(v2): not yet in the CPU kernel");
  const Problem p =
      prepare(x, weight, labels, margin, s, m1, m2, m3, lamb, feature_scale, detach_margin_grad);
  const int64_t n = p.n, dim = x.size(1);
  check_per_row(grad_lse, "grad_lse", x);
  check_per_row(grad_target_logit, "grad_target_logit", x);
  check_per_row(lse, "lse", x);
  const auto opts = p.options();
  auto grad_weight = at::empty_like(weight);
  const auto g_lse = grad_lse.to(p.acc).contiguous().unsqueeze(1);
  const auto g_target = grad_target_logit.to(p.acc).contiguous();
  const auto lse_col = lse.to(p.acc).contiguous().unsqueeze(1);
  const int64_t* y = p.labels.data_ptr<int64_t>();
  // dx̂ is a sum over all classes: one accumulator per thread, added in a fixed order
  // afterwards, so the result does not depend on scheduling.
  const int num_threads = at::get_num_threads();
  auto grad_x_hat_part = at::zeros({num_threads, n, dim}, opts);
  // Σ_c dlogit_ic · logit_ic / s_i per row: the gradient through s_i = ‖x_i‖.
  auto scale_grad_part = at::zeros({num_threads, n}, opts);

  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_lse_backward_cpu", [&] {
    const scalar_t* scale_ptr = p.scale.data_ptr<scalar_t>();
    const scalar_t* g_target_ptr = g_target.data_ptr<scalar_t>();
    at::parallel_for(0, p.num_blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const int tid = at::get_thread_num();
      auto grad_x_hat = grad_x_hat_part[tid];
      auto scale_grad = scale_grad_part[tid];
      auto scale_grad_a = scale_grad.accessor<scalar_t, 1>();
      for (int64_t b = b0; b < b1; ++b) {
        const auto [c0, c1] = p.classes_of(b);
        auto tile = cosine_tile(p.xn.hat, weight, c0, c1, p.acc);
        const auto cos_a = tile.cos.accessor<scalar_t, 2>();
        // dlogit = g_lse · P + g_target · [c = y], built in place in one N x B tile.
        auto dlogit = tile.cos.mul(p.scale.unsqueeze(1));
        auto dlogit_a = dlogit.accessor<scalar_t, 2>();
        for_each_target(y, n, c0, c1, [&](int64_t i, int64_t col) {
          dlogit_a[i][col] = scale_ptr[i] * target_margin<scalar_t>(cos_a[i][col], p.params).phi;
        });
        dlogit.sub_(lse_col).exp_().mul_(g_lse);
        if (p.params.feature_scale) scale_grad.add_((dlogit * tile.cos).sum(1));
        for_each_target(y, n, c0, c1, [&](int64_t i, int64_t col) {
          const scalar_t softmax_term = dlogit_a[i][col];
          dlogit_a[i][col] += g_target_ptr[i];
          if (p.params.feature_scale) {
            // The tile sum above weighted this entry by c without g_target; its logit is s·φ.
            const scalar_t phi = target_margin<scalar_t>(cos_a[i][col], p.params).phi;
            scale_grad_a[i] += dlogit_a[i][col] * phi - softmax_term * cos_a[i][col];
          }
        });
        // dc = s · dlogit, times dφ/dc on the target.
        auto& grad_cos = dlogit.mul_(p.scale.unsqueeze(1));
        for_each_target(y, n, c0, c1, [&](int64_t i, int64_t col) {
          dlogit_a[i][col] *= target_margin<scalar_t>(cos_a[i][col], p.params).slope;
        });
        // Through ŵ = w / max(‖w‖, eps): dw = (dŵ − ŵ (ŵ·dŵ)) / ‖w‖ above the floor, dŵ / eps
        // on it, with dŵ = dcᵀ x̂ and ŵ·dŵ = Σ_i dc_ic c_ic taken from the tile.
        auto radial = (grad_cos * tile.cos).sum(0).masked_fill_(tile.norm <= kNormEps, 0);
        grad_cos.mul_(tile.inv_norm.unsqueeze(0));  // dc · diag(1/‖w‖): now ŵ-free
        auto radial_coef = radial.mul_(tile.inv_norm).mul_(tile.inv_norm).neg_().unsqueeze(1);
        auto grad_w = grad_weight.slice(0, c0, c1);
        if (grad_w.scalar_type() == p.acc) {
          at::mm_out(grad_w, grad_cos.t(), p.xn.hat).addcmul_(tile.weight, radial_coef);
        } else {
          grad_w.copy_(at::mm(grad_cos.t(), p.xn.hat).addcmul_(tile.weight, radial_coef));
        }
        grad_x_hat.addmm_(grad_cos, tile.weight);
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
