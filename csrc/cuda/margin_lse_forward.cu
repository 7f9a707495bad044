// margin_lse forward on CUDA: prep -> fwd_main -> combine (see margin_lse_kernels.cuh).
#include <algorithm>
#include <limits>

#include "margin_lse_dtype.cuh"
#include "margin_lse_epilogue.cuh"
#include "margin_lse_forward_sm90.cuh"
#include "margin_lse_layout.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_reduce.cuh"
#include "margin_lse_tile_gemm.cuh"

namespace margin_ops {
namespace cuda {

using namespace dev;

namespace {

// The running statistics of a row tile, one slot per (warp column, row): the log2-domain
// (max, sum-exp), the best (cosine, class) and Σ F of the classes seen so far. One shared
// object rather than five arrays: on sm_90 every __shared__ variable has its own uniform
// base, and a thread kept the address of its (warp_n, rows) in one register per array
// across the class-tile loop; the fields of one object are immediate offsets from a single
// such address (sm_80 addresses shared variables by immediates either way).
template <class Acc, int kCols, int kRows>
struct RunningRows {
  Acc max[kCols][kRows];
  Acc sum[kCols][kRows];
  Acc cos[kCols][kRows];
  int32_t idx[kCols][kRows];
  Acc nts[kCols][kRows];
};

// Instantiated per option, so that a kernel carries only what its problem needs: kSub, K > 1
// sub-centers per class (K cosine passes per tile, their maximum kept in registers); kHard,
// hard examples (the per-row threshold and t).
template <class T, bool kSub, bool kHard>
__global__ void __launch_bounds__(kThreads, kSub ? 1 : Cfg<T>::kMinBlocks)
    fwd_main_kernel(const FwdArgs<T> args) {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  using Epi = Epilogue<C, kHard>;
  constexpr Acc kLog2e = Consts<Acc>::kLog2e;
  const Acc kNegInf = neg_inf(Acc(0));

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ CosineTile<T> tile;
  __shared__ RunningRows<Acc, C::kWarpsN, C::BM> s_run;
  __shared__ MarginParams s_margin;

  const int tid = threadIdx.x;
  const auto [lane, warp_m, warp_n, wm0, wn0] = warp_place<C>();
  const auto wk = args.work(blockIdx.x, C::BM);

  if (tid == 0) s_margin = args.margin;
  tile.load_rows(args.in, wk.row0, args.x_norm, args.scale);
  for (int k = tid; k < C::kWarpsN * C::BM; k += kThreads) {
    s_run.max[k / C::BM][k % C::BM] = kNegInf;
    s_run.sum[k / C::BM][k % C::BM] = Acc(0);
    s_run.cos[k / C::BM][k % C::BM] = kNegInf;
    s_run.idx[k / C::BM][k % C::BM] = 0;
    s_run.nts[k / C::BM][k % C::BM] = Acc(0);
  }
  __syncthreads();

  for (int64_t ct = wk.ct_begin; ct < wk.ct_end; ++ct) {
    const int64_t col0 = ct * C::BN;
    Acc acc[C::TR][C::TC];  // K > 1: the clamped cosines
    if constexpr (kSub) {
      tile.max_cosines(acc, args.in, wk.row0, col0, smem);
    } else {
      tile.products(acc, args.in, wk.row0, col0, smem, nullptr);
    }

    // This warp's columns: the tile's [wn0, wn0 + WN), those below c_lim valid.
    const bool interior = col0 + C::BN <= args.in.c;
    const int c_lim = int(args.in.c - col0 - wn0 < C::WN ? args.in.c - col0 - wn0 : C::WN);
#pragma unroll
    for (int ri = 0; ri < C::TR; ++ri) {
      const int r = wm0 + C::row(ri, lane);
      const Acc sc = tile.scale[r];
      const RowFactors<Acc> rf{sc, sc * kLog2e, tile.xinv[r], kHard ? tile.hard_thr[r] : Acc(2),
                               kHard ? tile.hard_t[r] : Acc(0)};
      const int yt = tile.target_column(r, col0) - wn0;
      const int yl = yt >= 0 && yt < C::WN ? yt : -1;
      const int64_t gr = wk.row0 + r;
      const RowShare<Acc> sh = Epi::template share<!kSub>(
          acc, ri, lane, rf, tile.inv + wn0, interior, c_lim, yl, &s_margin, [&](Acc phi) {
            if (gr < args.in.n) args.target_logit[gr] = sc * phi;
          });
      // The row's statistics over this tile: the 4 lanes sharing it differ in lane bits 0-1.
      const Acc tile_max = lanes_max<0, 2>(sh.l2max);
      const Acc sum = lanes_sum<0, 2>(Epi::sum_exp(acc, ri, lane, rf, sh, c_lim, yl, tile_max));
      const Acc nts = lanes_sum<0, 2>(sh.nts);
      // The running best of (warp_n, r), visible since the GEMM's closing barrier, merged
      // with the lane's columns where they can change it, then over the 4 lanes.
      Acc best = s_run.cos[warp_n][r];
      int32_t best_idx = s_run.idx[warp_n][r];
      Epi::argmax(acc, ri, lane, sh, c_lim, col0 + wn0, best, best_idx);
      lanes_best<0, 2>(best, best_idx);
      // Lane 0 of the group owns (warp_n, r) in shared memory: no other thread writes it.
      if ((lane & 3) == 0) {
        Acc m = s_run.max[warp_n][r], s = s_run.sum[warp_n][r];
        merge_lse(m, s, tile_max, sum);
        s_run.max[warp_n][r] = m;
        s_run.sum[warp_n][r] = s;
        s_run.cos[warp_n][r] = best;
        s_run.idx[warp_n][r] = best_idx;
        s_run.nts[warp_n][r] += nts;
      }
    }
  }

  // Merge the kWarpsN warps' statistics of each row, in warp order.
  __syncthreads();
  for (int r = tid; r < C::BM; r += kThreads) {
    const int64_t gr = wk.row0 + r;
    if (gr >= args.in.n) continue;
    Acc m = s_run.max[0][r], s = s_run.sum[0][r], b = s_run.cos[0][r], nts = s_run.nts[0][r];
    int32_t idx = s_run.idx[0][r];
#pragma unroll
    for (int w = 1; w < C::kWarpsN; ++w) {
      merge_lse(m, s, s_run.max[w][r], s_run.sum[w][r]);
      merge_best(b, idx, s_run.cos[w][r], s_run.idx[w][r]);
      nts += s_run.nts[w][r];
    }
    const int64_t o = wk.split * args.n_pad + gr;
    args.part_max[o] = m;
    args.part_sum[o] = s;
    args.part_cos[o] = b;
    args.part_idx[o] = idx;
    args.part_nts[o] = nts;
  }
}

template <class A>
struct CombineArgs {
  const A* part_max;
  const A* part_sum;
  const A* part_cos;
  const int32_t* part_idx;
  const A* part_nts;
  const A* scale;  // (n_pad,) s_i
  int64_t n, n_pad;
  int splits;
  A* lse;
  A* max_cos;
  int64_t* pred;
  A* nontarget_sum;
};

template <class A>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineArgs<A> args) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= args.n) return;
  A m = neg_inf(A(0)), s = A(0), b = neg_inf(A(0)), nts = A(0);
  int32_t idx = 0;
  bool nan = false;
  for (int k = 0; k < args.splits; ++k) {
    const int64_t o = int64_t(k) * args.n_pad + i;
    const A pm = args.part_max[o], ps = args.part_sum[o];
    nan |= ps != ps;
    const A mx = vmax(m, pm);
    if (mx != neg_inf(A(0))) {
      s = s * exp2(m - mx) + ps * exp2(pm - mx);  // accurate exp2 here: N x splits calls
      m = mx;
    }
    merge_best(b, idx, args.part_cos[o], args.part_idx[o]);
    nts += args.part_nts[o];
  }
  const A lse2 = m + log2(s);
  args.lse[i] = nan ? std::numeric_limits<A>::quiet_NaN() : lse2 * Consts<A>::kLn2;
  args.max_cos[i] = b;  // clamped already (or NaN)
  args.pred[i] = idx;
  args.nontarget_sum[i] = args.scale[i] * nts;
}

struct FwdLayout {
  int64_t n_pad, n_class_tiles, tiles_per_split;
  int row_tiles, splits;
};

template <class T>
struct FwdBuffers {
  using Acc = AccOf<T>;
  Acc* x_norm;
  Acc* scale;
  Acc* part_max;
  Acc* part_sum;
  Acc* part_cos;
  int32_t* part_idx;
  Acc* part_nts;
};

// The host side of the forward: the layout of its grid, its workspace buffers and its
// launches (the entry points below join them: launch_pass in margin_lse_layout.cuh).
struct Forward {
  template <class T>
  static FwdLayout layout(const ForwardParams& p) {
    using C = Cfg<T>;
    FwdLayout l;
    l.n_pad = rows_padded(p.n);
    l.row_tiles = int(l.n_pad / C::BM);
    l.n_class_tiles = ceil_div(p.c, C::BN);
    // About two CTAs per SM in total, each with a contiguous range of class tiles.
    const int64_t target = 2 * int64_t(p.num_sms > 0 ? p.num_sms : 1);
    const int64_t splits0 = std::max<int64_t>(1, ceil_div(target, l.row_tiles));
    l.tiles_per_split = ceil_div(l.n_class_tiles, splits0);
    l.splits = int(ceil_div(l.n_class_tiles, l.tiles_per_split));  // every split non-empty
    return l;
  }

  template <class T>
  static FwdBuffers<T> carve(Carve& cv, const FwdLayout& l) {
    using Acc = AccOf<T>;
    FwdBuffers<T> b;
    b.x_norm = cv.take<Acc>(l.n_pad);
    b.scale = cv.take<Acc>(l.n_pad);
    const int64_t np = int64_t(l.splits) * l.n_pad;
    b.part_max = cv.take<Acc>(np);
    b.part_sum = cv.take<Acc>(np);
    b.part_cos = cv.take<Acc>(np);
    b.part_idx = cv.take<int32_t>(np);
    b.part_nts = cv.take<Acc>(np);
    return b;
  }

  template <class T>
  static cudaError_t run(const ForwardParams& p, const FwdLayout& l, const FwdBuffers<T>& buf,
                         cudaStream_t stream) {
    using Acc = AccOf<T>;
    // No x̂: the forward GEMM reads x itself.
    const PrepArgs<T> pa = make_prep_args<T>(p, l.n_pad, 0, nullptr, buf.x_norm, buf.scale,
                                             static_cast<Acc*>(p.target_logit));
    prep_kernel<T><<<unsigned(l.n_pad), kThreads, 0, stream>>>(pa);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;

    FwdArgs<T> fa;
    fa.in = problem_inputs<T>(p);
    fa.n_pad = l.n_pad;
    fa.x_norm = buf.x_norm;
    fa.scale = buf.scale;
    fa.margin = p.margin;
    fa.target_logit = static_cast<Acc*>(p.target_logit);
    fa.part_max = buf.part_max;
    fa.part_sum = buf.part_sum;
    fa.part_cos = buf.part_cos;
    fa.part_idx = buf.part_idx;
    fa.part_nts = buf.part_nts;
    fa.n_class_tiles = l.n_class_tiles;
    fa.tiles_per_split = l.tiles_per_split;
    fa.row_tiles = l.row_tiles;
    constexpr size_t smem = CosineTile<T>::kSmemBytes;
    const unsigned grid = unsigned(int64_t(l.row_tiles) * l.splits);
    if constexpr (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) {
      static_assert(Cfg<T>::BM == kSm90TileRows && Cfg<T>::BN == kSm90TileClasses,
                    "the sm_90a kernel runs on this layout");
      if (sm90_forward_eligible(p)) {
        err = launch_fwd_main_sm90<T>(p, fa, grid, stream);
        return err != cudaSuccess ? err : combine(p, l, buf, stream);
      }
    }
    const bool sub = p.subcenters > 1, hard = p.hard_threshold != nullptr;
    const auto kernel = sub ? (hard ? fwd_main_kernel<T, true, true> : fwd_main_kernel<T, true, false>)
                            : (hard ? fwd_main_kernel<T, false, true> : fwd_main_kernel<T, false, false>);
    if ((err = allow_smem(kernel, smem)) != cudaSuccess) return err;
    kernel<<<grid, kThreads, smem, stream>>>(fa);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;

    return combine(p, l, buf, stream);
  }

  template <class T>
  static cudaError_t combine(const ForwardParams& p, const FwdLayout& l, const FwdBuffers<T>& buf,
                             cudaStream_t stream) {
    using Acc = AccOf<T>;
    CombineArgs<Acc> ca;
    ca.part_max = buf.part_max;
    ca.part_sum = buf.part_sum;
    ca.part_cos = buf.part_cos;
    ca.part_idx = buf.part_idx;
    ca.part_nts = buf.part_nts;
    ca.scale = buf.scale;
    ca.n = p.n;
    ca.n_pad = l.n_pad;
    ca.splits = l.splits;
    ca.lse = static_cast<Acc*>(p.lse);
    ca.max_cos = static_cast<Acc*>(p.max_cos);
    ca.pred = p.pred;
    ca.nontarget_sum = static_cast<Acc*>(p.nontarget_sum);
    combine_kernel<Acc><<<unsigned(ceil_div(p.n, kThreads)), kThreads, 0, stream>>>(ca);
    return cudaGetLastError();
  }
};

}  // namespace

size_t forward_workspace_bytes(const ForwardParams& p) { return pass_workspace_bytes<Forward>(p); }

cudaError_t launch_margin_lse_forward(const ForwardParams& p, cudaStream_t stream) {
  return launch_pass<Forward>(p, stream);
}

}  // namespace cuda
}  // namespace margin_ops
