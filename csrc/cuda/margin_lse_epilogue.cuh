// What the forward's two main kernels share, fwd_main_kernel (mma.sync / SIMT accumulators,
// margin_lse_forward.cu) and fwd_main_sm90_kernel (wgmma accumulators,
// margin_lse_forward_sm90.cu): their arguments (FwdArgs) and the per-tile epilogue: for one
// accumulator row of one thread, the
// cosines, the margin on the target entry, the hard-example factor of the others, this
// thread's share of the row's log2-domain (max, sum-exp), Σ F and (max cosine, class). The
// callers differ only in how they combine those shares (margin_lse_kernels.cuh, Design).
//
// A fragment mapping `F` describes a thread's accumulators as TR x TC values:
//   F::TR, F::TC; F::row(ri, lane), F::col(ci, lane): coordinates in the warp's tile, col
//   increasing with ci; F::col_quad(col): lane & 3 of the lanes holding column col (lanes
//   sharing a row differ in lane bits 0-1, for mma.sync, the SIMT layouts and wgmma alike);
//   F::at(acc, ri, ci): the accumulator of (ri, ci) in the thread's storage.
//
// Per element the fast variant (a row without its target among this thread's columns, an
// interior tile) costs two multiplies (x and w norms), the clamp, a max and an add (Σ F),
// then one FFMA + ex2 + add for the sum: the row's scale·log2 e is folded into the FFMA, the
// tile's max logit is scale·log2 e · max F (scale ≥ 0), the argmax runs over the row's
// columns only when this thread's largest cosine beats the running one (or is NaN), and the
// target entry is handled per row by the rare variant that compares columns with it.
#pragma once

#include <cstdint>

#include "margin_lse_dtype.cuh"
#include "margin_lse_reduce.cuh"
#include "margin_lse_tile_gemm.cuh"  // nontarget_factor

namespace margin_ops {
namespace cuda {
namespace dev {

// The main kernels' arguments (grid: row tile x class split; see margin_lse_kernels.cuh).
template <class T>
struct FwdArgs {
  using Acc = AccOf<T>;
  ProblemInputs<T> in;  // x as given: normalized in the epilogue, never rounded as x̂
  int64_t n_pad;
  const Acc* x_norm;  // (n_pad,)
  const Acc* scale;   // (n_pad,)
  MarginParams margin;
  Acc* target_logit;  // (n,)
  // Split partials, [split][n_pad]: max and sum-exp of the logits in the log2 domain
  // (logit * log2 e), the largest raw cosine and its class, the sum of the non-target
  // logits divided by s_i.
  Acc* part_max;
  Acc* part_sum;
  Acc* part_cos;
  int32_t* part_idx;
  Acc* part_nts;
  int64_t n_class_tiles;
  int64_t tiles_per_split;
  int row_tiles;

  // The CTA's work in a grid of row_tiles x splits (row tiles fastest, so that CTAs of one
  // split are adjacent in launch order and share each W tile through L2): the row tile of
  // `bm` rows starting at row0, its split, and its class tiles [ct_begin, ct_end).
  struct Work {
    int64_t split, row0, ct_begin, ct_end;
  };
  __device__ __forceinline__ Work work(unsigned block, int bm) const {
    Work w;
    w.split = block / unsigned(row_tiles);
    w.row0 = int64_t(block % unsigned(row_tiles)) * bm;
    w.ct_begin = w.split * tiles_per_split;
    w.ct_end = w.ct_begin + tiles_per_split < n_class_tiles ? w.ct_begin + tiles_per_split
                                                            : n_class_tiles;
    return w;
  }
};

// What the epilogue needs of one row: s_i, s_i·log2 e, 1 / max(‖x_i‖, eps) and the
// hard-example threshold and t (2 and 0 without: no modulation).
template <class Acc>
struct RowFactors {
  Acc scale, scale2, xinv, thr, ht;
};

// One thread's share of one row of a tile (its TC columns).
template <class Acc>
struct RowShare {
  Acc fmax;      // max F over its non-target columns (-inf if none; NaN ignored)
  Acc nts;       // Σ F over them (NaN iff some F is)
  Acc cmax;      // max clamped cosine over all its columns (NaN ignored)
  Acc t_cos;     // the target's clamped cosine (when has_t)
  Acc l2max;     // max logit·log2 e of its columns in the lse, target included (-inf if none)
  Acc t_l2;      // the target's logit·log2 e, -inf when not in the lse
  bool has_t;    // the row's target is one of its columns
  bool checked;  // its columns need bounds checks (a partial tile)
};

template <class F, bool kHard>
struct Epilogue {
  // Pass 1 over the row's columns: the clamped cosine replaces each accumulator (kRaw: acc
  // holds x·w products, scaled here by xinv and inv[col]; else clamped cosines already),
  // and the share's fmax, nts, cmax, t_cos. kChecked: columns >= c_lim are skipped; kTarget:
  // column yl is the target. `inv` is indexed by the warp tile's column.
  template <bool kRaw, bool kChecked, bool kTarget, class Acc, class Storage>
  static __device__ __forceinline__ void pass1(Storage& acc, int ri, int lane,
                                               const RowFactors<Acc>& rf, const Acc* inv,
                                               int c_lim, int yl, RowShare<Acc>& sh) {
    const Acc kNegInf = neg_inf(Acc(0));
    Acc fmax = kNegInf, nts = Acc(0), cmax = kNegInf, t_cos = Acc(0);
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) {
      const int cl = F::col(ci, lane);
      if (kChecked && cl >= c_lim) continue;
      Acc& v = F::at(acc, ri, ci);
      const Acc cs = kRaw ? clamp_unit(v * rf.xinv * inv[cl]) : v;
      v = cs;
      if (kTarget && cl == yl) {
        t_cos = cs;
        cmax = vmax(cmax, cs);
        continue;
      }
      const Acc f = nontarget_factor<kHard>(cs, rf.thr, rf.ht).phi;
      fmax = vmax(fmax, f);
      nts += f;
      if constexpr (kHard) cmax = vmax(cmax, cs);
    }
    if constexpr (!kHard) cmax = vmax(cmax, fmax);  // F(c) = c off the target
    sh.fmax = fmax;
    sh.nts = nts;
    sh.cmax = cmax;
    sh.t_cos = t_cos;
  }

  // The share of row ri (tile columns of this warp: yl the target's, -1 if not in the warp
  // tile; c_lim the number of valid ones). The target's margin is applied here; the thread
  // holding the target calls `on_target(phi)` (target_logit = s_i·phi). `margin` points to
  // a shared-memory copy.
  template <bool kRaw, class Acc, class Storage, class OnTarget>
  static __device__ __forceinline__ RowShare<Acc> share(Storage& acc, int ri, int lane,
                                                        const RowFactors<Acc>& rf,
                                                        const Acc* inv, bool interior, int c_lim,
                                                        int yl, const MarginParams* margin,
                                                        OnTarget&& on_target) {
    const Acc kNegInf = neg_inf(Acc(0));
    RowShare<Acc> sh;
    sh.has_t = yl >= 0 && F::col_quad(yl) == (lane & 3);
    sh.checked = sh.has_t || !interior;
    if (sh.has_t) {
      pass1<kRaw, true, true>(acc, ri, lane, rf, inv, c_lim, yl, sh);
    } else if (interior) {
      pass1<kRaw, false, false>(acc, ri, lane, rf, inv, c_lim, yl, sh);
    } else {
      pass1<kRaw, true, false>(acc, ri, lane, rf, inv, c_lim, yl, sh);
    }
    // scale2 >= 0, so max(scale2·F) = scale2·max F (-inf kept: 0·-inf would be NaN)
    sh.l2max = sh.fmax == kNegInf ? kNegInf : rf.scale2 * sh.fmax;
    sh.t_l2 = kNegInf;
    if (sh.has_t) {
      const TargetMargin<Acc> tm = eval_margin<Acc>(sh.t_cos, margin);
      // margin "external": the target's logit is s·c, left out of the log-sum-exp.
      if (margin->kind != MarginKind::External) {
        sh.t_l2 = rf.scale2 * tm.phi;
        sh.l2max = vmax(sh.l2max, sh.t_l2);
      }
      on_target(tm.phi);
    }
    return sh;
  }

  // Σ 2^(logit·log2 e - m) over the share's columns in the lse (pass 2 over the cosines
  // pass 1 left in acc). m = -inf (no finite logit in the lse below the caller's maximum):
  // 0, or NaN when some logit in the lse is NaN.
  template <class Acc, class Storage>
  static __device__ __forceinline__ Acc sum_exp(const Storage& acc, int ri, int lane,
                                                const RowFactors<Acc>& rf, const RowShare<Acc>& sh,
                                                int c_lim, int yl, Acc m) {
    if (m == neg_inf(Acc(0))) {
      const bool nan = sh.nts != sh.nts || sh.t_l2 != sh.t_l2;
      return nan ? Acc(__int_as_float(0x7fffffff)) : Acc(0);
    }
    if (!sh.checked) return sum_columns<false>(acc, ri, lane, rf, c_lim, -1, -m);
    Acc sum = sum_columns<true>(acc, ri, lane, rf, c_lim, sh.has_t ? yl : -1, -m);
    if (sh.has_t) sum += fast_exp2(sh.t_l2 - m);  // 0 when out of the lse (-inf)
    return sum;
  }

  template <bool kChecked, class Acc, class Storage>
  static __device__ __forceinline__ Acc sum_columns(const Storage& acc, int ri, int lane,
                                                    const RowFactors<Acc>& rf, int c_lim, int yl,
                                                    Acc neg_m) {
    Acc sum = Acc(0);
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) {
      const int cl = F::col(ci, lane);
      if (kChecked && (cl >= c_lim || cl == yl)) continue;
      const Acc f = nontarget_factor<kHard>(F::at(acc, ri, ci), rf.thr, rf.ht).phi;
      sum += fast_exp2(fma(rf.scale2, f, neg_m));  // NaN stays
    }
    return sum;
  }

  // (best, idx) <- the running (max cosine, class) merged with the share's columns, in
  // column order; only when one of them can change it (a larger or a NaN cosine).
  // col_base: the class of warp-tile column 0.
  template <class Acc, class Storage>
  static __device__ __forceinline__ void argmax(const Storage& acc, int ri, int lane,
                                                const RowShare<Acc>& sh, int c_lim,
                                                int64_t col_base, Acc& best, int32_t& idx) {
    if (!(sh.cmax > best || sh.nts != sh.nts || sh.t_cos != sh.t_cos)) return;
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) {
      const int cl = F::col(ci, lane);
      if (cl < c_lim) merge_best(best, idx, F::at(acc, ri, ci), int32_t(col_base + cl));
    }
  }
};

}  // namespace dev
}  // namespace cuda
}  // namespace margin_ops
