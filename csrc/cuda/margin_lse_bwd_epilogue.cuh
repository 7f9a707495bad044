// What the backward's two recompute kernels share, bwd_tile_kernel (mma.sync / SIMT
// accumulators, margin_lse_backward.cu) and bwd_tile_sm90_kernel (wgmma accumulators,
// margin_lse_bwd_tile_sm90.cu): their arguments (TileArgs), the gradient factors of a row
// (RowGrad) and, for one sub-center (K = 1), the per-element epilogue of one accumulator
// row of one thread (GradEpilogue): from the products x_i · w_c to dS' = dc / ‖w_c‖, the
// column sums of dc·ĉ and the row's feature-scale term. The callers differ only in how they
// store dS' and combine those sums (margin_lse_kernels.cuh, Design).
//
// Fragment mappings `F` are margin_lse_epilogue.cuh's: F::TC, F::col(ci, lane),
// F::col_quad(col), F::at(acc, ri, ci).
#pragma once

#include <cstdint>

#include "margin_lse_dtype.cuh"
#include "margin_lse_tile_gemm.cuh"  // ProblemInputs, nontarget_factor

namespace margin_ops {
namespace cuda {
namespace dev {

// bwd_tile's arguments: for the chunk of classes [c0, c0 + cc) (see margin_lse_backward.cu,
// bwd_tile, for what each output holds). Acc = AccOf<T>.
template <class T>
struct TileArgs {
  using Acc = AccOf<T>;
  ProblemInputs<T> in;  // x as given: normalized in the epilogue, as in the forward
  const Acc* x_norm;  // (n_pad,)
  const Acc* scale;   // (n_pad,)
  const Acc* lse;     // (n,)
  const Acc* g_lse;   // (n,)
  const Acc* g_t;     // (n,)
  const Acc* g_sum;   // (n,)
  MarginParams margin;
  int64_t c0;  // first class of the chunk
  int64_t cc;  // chunk capacity: classes per sub-center block of a scratch row
  int64_t ld;  // scratch row length: K·cc
  T* scratch;
  Acc* r_part;  // (row tiles, ld)
  Acc* w_norm;  // (ld,)
  int64_t n_pad;
  Acc* corr_part;  // (cc / 128, n_pad), written when margin.feature_scale
};

// The factors of one row of the gradient epilogue (for the row's upstream gradients, lse
// and hard-example parameters, see TileArgs) and dc of its entries; `corr` gathers the
// row's Σ dlogit (F − F' ĉ) (raw = ĉ, the unclamped cosine).
template <class Acc, bool kHard>
struct RowGrad {
  Acc sc, sc2, lse2, gl, gs, thr, ht;  // thr, ht: kHard only

  __device__ __forceinline__ Acc nontarget(Acc cs, Acc raw, bool fs, Acc& corr) const {
    const TargetMargin<Acc> h = nontarget_factor<kHard>(cs, thr, ht);
    const Acc dlogit = gl * fast_exp2(sc2 * h.phi - lse2) + gs;
    if (fs) corr += dlogit * (h.phi - h.slope * raw);
    return sc * dlogit * h.slope;
  }

  // gt: the row's g_target; external: P = 0, never exp(logit - lse) (lse is -inf when y is
  // the only class).
  __device__ __forceinline__ Acc target(Acc cs, Acc raw, Acc gt, const MarginParams* margin,
                                        bool external, Acc& corr) const {
    const TargetMargin<Acc> tm = eval_margin<Acc>(cs, margin);
    const Acc p = external ? Acc(0) : fast_exp2(sc2 * tm.phi - lse2);
    const Acc dlogit = gl * p + gt;
    corr += dlogit * (tm.phi - tm.slope * raw);
    return sc * dlogit * tm.slope;
  }
};

// What the sm_90a gradient epilogues keep in registers of one row (16-bit inputs: float):
// its RowGrad, 1 / max(‖x‖, eps), g_target and label (-1: none in [0, C)). A row past n gets
// zeros, no target and no hard examples, so that its entries contribute nothing.
template <bool kHard>
struct RowInputs {
  RowGrad<float, kHard> g;
  float xinv, gt;
  int32_t label;
};

template <bool kHard, class T>
__device__ __forceinline__ RowInputs<kHard> load_row_inputs(const TileArgs<T>& args, int64_t gr) {
  constexpr float kLog2e = Consts<float>::kLog2e;
  RowInputs<kHard> r{{0.f, 0.f, 0.f, 0.f, 0.f, 2.f, 0.f}, 0.f, 0.f, -1};
  if (gr < args.in.n) {
    const float sc = args.scale[gr];
    r.g = {sc, sc * kLog2e, args.lse[gr] * kLog2e, args.g_lse[gr], args.g_sum[gr], 2.f, 0.f};
    if constexpr (kHard) {
      r.g.thr = args.in.hard_threshold[gr];
      r.g.ht = args.in.hard_t[gr];
    }
    r.xinv = inverse_norm(args.x_norm[gr]);
    r.gt = args.g_t[gr];
    const int64_t lab = args.in.labels[gr];
    if (lab >= 0 && lab < args.in.c) r.label = int32_t(lab);
  }
  return r;
}

template <class F, bool kHard>
struct GradEpilogue {
  // Row ri of the thread's accumulators (its F::TC columns of one row of the warp's tile).
  // In: the products x_i · w_c. Out: dS' = dc / max(‖w_c‖, eps), 0 for columns >= c_lim
  // (c_lim = 0 for a row past n). Also rsum[ci] += dc·ĉ (ĉ clamped) and, with fs, corr +=
  // Σ dlogit (F − F' ĉ) (ĉ unclamped). xinv: the row's 1 / max(‖x_i‖, eps); inv: the
  // 1 / max(‖w‖, eps) by warp-tile column; yl: the warp-tile column of the row's target, or
  // -1; gt: its g_target; interior: every column valid (no bounds checks); `margin` points
  // to a shared-memory copy. The cosine is formed as in the forward (acc · xinv · inv).
  template <class Acc, class Storage>
  static __device__ __forceinline__ void row(Storage& acc, int ri, int lane,
                                             const RowGrad<Acc, kHard>& g, Acc xinv,
                                             const Acc* inv, bool interior, int c_lim, int yl,
                                             Acc gt, const MarginParams* margin, bool external,
                                             bool fs, Acc (&rsum)[F::TC], Acc& corr) {
    if (yl >= 0 && F::col_quad(yl) == (lane & 3)) {
      pass<true, true>(acc, ri, lane, g, xinv, inv, c_lim, yl, gt, margin, external, fs, rsum, corr);
    } else if (interior) {
      pass<false, false>(acc, ri, lane, g, xinv, inv, c_lim, yl, gt, margin, external, fs, rsum,
                         corr);
    } else {
      pass<true, false>(acc, ri, lane, g, xinv, inv, c_lim, yl, gt, margin, external, fs, rsum,
                        corr);
    }
  }

  // kChecked: columns >= c_lim are zeroed; kTarget: column yl is the target, skipped in the
  // loop and formed once after it (the rare variant that compares columns).
  template <bool kChecked, bool kTarget, class Acc, class Storage>
  static __device__ __forceinline__ void pass(Storage& acc, int ri, int lane,
                                              const RowGrad<Acc, kHard>& g, Acc xinv,
                                              const Acc* inv, int c_lim, int yl, Acc gt,
                                              const MarginParams* margin, bool external, bool fs,
                                              Acc (&rsum)[F::TC], Acc& corr) {
    Acc t_cos = Acc(0), t_raw = Acc(0);
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) {
      const int cl = F::col(ci, lane);
      auto& v = F::at(acc, ri, ci);
      if (kChecked && cl >= c_lim) {
        v = Acc(0);
        continue;
      }
      const Acc raw = v * xinv * inv[cl];
      const Acc cs = clamp_unit(raw);
      if (kTarget && cl == yl) {
        t_cos = cs;
        t_raw = raw;
        continue;
      }
      const Acc dc = g.nontarget(cs, raw, fs, corr);
      rsum[ci] += dc * cs;
      v = dc * inv[cl];
    }
    if constexpr (kTarget) {
      const Acc dc = g.target(t_cos, t_raw, gt, margin, external, corr);
      const Acc dv = dc * inv[yl];
#pragma unroll
      for (int ci = 0; ci < F::TC; ++ci) {
        if (F::col(ci, lane) == yl) {
          rsum[ci] += dc * t_cos;
          F::at(acc, ri, ci) = dv;
        }
      }
    }
  }
};

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
