// margin_lse forward on CUDA: prep -> fwd_main -> combine (see margin_lse_kernels.cuh).
#include <algorithm>
#include <limits>

#include "margin_lse_device.cuh"

namespace margin_ops {
namespace cuda {

using namespace dev;

namespace {

template <class T>
struct FwdArgs {
  using Acc = AccOf<T>;
  const T* x;  // (n, d), as given: normalized in the epilogue, never rounded as x̂
  int64_t n, n_pad;
  const T* weight;  // (c, d)
  int64_t c, d;
  bool x_vec, w_vec;
  const int64_t* labels;
  const Acc* x_norm;  // (n_pad,)
  const Acc* scale;   // (n_pad,)
  MarginParams margin;
  Acc* target_logit;  // (n,)
  // Split partials, [split][n_pad]: max and sum-exp of the logits in the log2 domain
  // (logit * log2 e), the largest raw cosine and its class.
  Acc* part_max;
  Acc* part_sum;
  Acc* part_cos;
  int32_t* part_idx;
  int64_t n_class_tiles;
  int64_t tiles_per_split;
  int row_tiles;
};

// (m, s) <- merge of two (max, sum of 2^(v - max)) pairs; max = -inf means empty.
template <class A>
__device__ __forceinline__ void merge_lse(A& m, A& s, A om, A os) {
  const A mx = vmax(m, om);
  if (mx == neg_inf(A(0))) {  // both empty: sums are 0, or NaN (kept: NaN is sticky)
    s += os;
    return;
  }
  s = s * fast_exp2(m - mx) + os * fast_exp2(om - mx);
  m = mx;
}

// Larger cosine wins, the lower class on ties; NaN beats every number (as torch.max).
template <class A>
__device__ __forceinline__ void merge_best(A& b, int32_t& i, A ob, int32_t oi) {
  const bool o_nan = ob != ob, nan = b != b;
  if (o_nan != nan ? o_nan : (ob > b || ((ob == b || o_nan) && oi < i))) {
    b = ob;
    i = oi;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, Cfg<T>::kMinBlocks) fwd_main_kernel(const FwdArgs<T> args) {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  using Gemm = TileGemm<T, false, false>;
  constexpr Acc kLog2e = Consts<Acc>::kLog2e;
  const Acc kNegInf = neg_inf(Acc(0));

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ Acc s_inv[C::BN];
  __shared__ Acc s_xinv[C::BM];
  __shared__ Acc s_scale[C::BM];
  __shared__ int32_t s_label[C::BM];
  __shared__ Acc s_max[C::kWarpsN][C::BM];
  __shared__ Acc s_sum[C::kWarpsN][C::BM];
  __shared__ Acc s_cos[C::kWarpsN][C::BM];
  __shared__ int32_t s_idx[C::kWarpsN][C::BM];
  __shared__ MarginParams s_margin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / C::kWarpsN, warp_n = warp % C::kWarpsN;
  const int wm0 = warp_m * C::WM, wn0 = warp_n * C::WN;
  const int rt = int(blockIdx.x % unsigned(args.row_tiles));
  const int64_t split = blockIdx.x / unsigned(args.row_tiles);
  const int64_t row0 = int64_t(rt) * C::BM;
  const int64_t ct_begin = split * args.tiles_per_split;
  const int64_t ct_end = ct_begin + args.tiles_per_split < args.n_class_tiles
                             ? ct_begin + args.tiles_per_split
                             : args.n_class_tiles;

  if (tid == 0) s_margin = args.margin;
  for (int r = tid; r < C::BM; r += kThreads) {
    const int64_t gr = row0 + r;
    Acc sc = Acc(0), xinv = Acc(0);
    int32_t y = -1;
    if (gr < args.n) {
      sc = args.scale[gr];
      xinv = inverse_norm(args.x_norm[gr]);
      const int64_t lab = args.labels[gr];
      if (lab >= 0 && lab < args.c) y = int32_t(lab);
    }
    s_scale[r] = sc;
    s_xinv[r] = xinv;
    s_label[r] = y;
  }
  for (int k = tid; k < C::kWarpsN * C::BM; k += kThreads) {
    s_max[k / C::BM][k % C::BM] = kNegInf;
    s_sum[k / C::BM][k % C::BM] = Acc(0);
    s_cos[k / C::BM][k % C::BM] = kNegInf;
    s_idx[k / C::BM][k % C::BM] = 0;
  }
  __syncthreads();

  const Operand<T> a{args.x, args.d, row0, args.n, args.d, args.x_vec};
  const int64_t k_end = (args.d + C::BK - 1) / C::BK * C::BK;
  WeightNorm<T> wnorm;

  for (int64_t ct = ct_begin; ct < ct_end; ++ct) {
    const int64_t col0 = ct * C::BN;
    const Operand<T> b{args.weight, args.d, col0, args.c, args.d, args.w_vec};
    Acc acc[C::TR][C::TC];
    Gemm::run(acc, a, b, 0, k_end, smem, wnorm);
    wnorm.finish(nullptr, s_inv);
    __syncthreads();

    // This thread's columns are valid iff its first one is (columns increase with ci).
    const bool lane_valid = col0 + wn0 + C::col(0, lane) < args.c;
#pragma unroll
    for (int ri = 0; ri < C::TR; ++ri) {
      const int r = wm0 + C::row(ri, lane);
      const Acc sc = s_scale[r], xinv = s_xinv[r];
      const Acc sc2 = sc * kLog2e;
      const int64_t ydiff = int64_t(s_label[r]) - col0;  // target column in this tile, if any
      const int yl = (s_label[r] >= 0 && ydiff >= 0 && ydiff < C::BN) ? int(ydiff) : -1;
      Acc l2[C::TC];
      Acc tile_max = kNegInf, best = kNegInf;
      int32_t best_idx = 0;
      bool has_t = false;
      Acc t_cos = Acc(0);
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) {
        const int cl = wn0 + C::col(ci, lane);
        l2[ci] = kNegInf;
        if (col0 + cl < args.c) {
          const Acc cs = clamp_unit(acc[ri][ci] * xinv * s_inv[cl]);
          merge_best(best, best_idx, cs, int32_t(col0 + cl));
          if (cl == yl) {
            has_t = true;
            t_cos = cs;
          } else {
            l2[ci] = sc2 * cs;
            tile_max = vmax(tile_max, l2[ci]);
          }
        }
      }
      Acc t_l2 = kNegInf;
      if (has_t) {
        const TargetMargin<Acc> tm = eval_margin<Acc>(t_cos, &s_margin);
        t_l2 = sc2 * tm.phi;
        tile_max = vmax(tile_max, t_l2);
        const int64_t gr = row0 + r;
        if (gr < args.n) args.target_logit[gr] = sc * tm.phi;
      }
      // The row's statistics over this tile: the 4 lanes sharing it differ in lane bits 0-1.
      tile_max = vmax(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = vmax(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      Acc sum = Acc(0);
      if (tile_max != kNegInf) {
#pragma unroll
        for (int ci = 0; ci < C::TC; ++ci) sum += fast_exp2(l2[ci] - tile_max);  // NaN stays
        if (has_t) sum += fast_exp2(t_l2 - tile_max);
      } else if (lane_valid) {
        sum = Acc(__int_as_float(0x7fffffff));  // valid columns but only NaN logits
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const Acc ob = __shfl_xor_sync(0xffffffffu, best, off);
        const int32_t oi = __shfl_xor_sync(0xffffffffu, best_idx, off);
        merge_best(best, best_idx, ob, oi);
      }
      // Lane 0 of the group owns (warp_n, r) in shared memory: no other thread touches it.
      if ((lane & 3) == 0) {
        Acc m = s_max[warp_n][r], s = s_sum[warp_n][r], b = s_cos[warp_n][r];
        int32_t idx = s_idx[warp_n][r];
        merge_lse(m, s, tile_max, sum);
        merge_best(b, idx, best, best_idx);
        s_max[warp_n][r] = m;
        s_sum[warp_n][r] = s;
        s_cos[warp_n][r] = b;
        s_idx[warp_n][r] = idx;
      }
    }
  }

  // Merge the kWarpsN warps' statistics of each row, in warp order.
  __syncthreads();
  for (int r = tid; r < C::BM; r += kThreads) {
    const int64_t gr = row0 + r;
    if (gr >= args.n) continue;
    Acc m = s_max[0][r], s = s_sum[0][r], b = s_cos[0][r];
    int32_t idx = s_idx[0][r];
#pragma unroll
    for (int w = 1; w < C::kWarpsN; ++w) {
      merge_lse(m, s, s_max[w][r], s_sum[w][r]);
      merge_best(b, idx, s_cos[w][r], s_idx[w][r]);
    }
    const int64_t o = split * args.n_pad + gr;
    args.part_max[o] = m;
    args.part_sum[o] = s;
    args.part_cos[o] = b;
    args.part_idx[o] = idx;
  }
}

template <class A>
struct CombineArgs {
  const A* part_max;
  const A* part_sum;
  const A* part_cos;
  const int32_t* part_idx;
  int64_t n, n_pad;
  int splits;
  A* lse;
  A* max_cos;
  int64_t* pred;
};

template <class A>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineArgs<A> args) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= args.n) return;
  A m = neg_inf(A(0)), s = A(0), b = neg_inf(A(0));
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
  }
  const A lse2 = m + log2(s);
  args.lse[i] = nan ? std::numeric_limits<A>::quiet_NaN() : lse2 * Consts<A>::kLn2;
  args.max_cos[i] = b;  // clamped already (or NaN)
  args.pred[i] = idx;
}

struct FwdLayout {
  int64_t n_pad, n_class_tiles, tiles_per_split;
  int row_tiles, splits;
};

template <class T>
FwdLayout fwd_layout(const ForwardParams& p) {
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
struct FwdBuffers {
  using Acc = AccOf<T>;
  Acc* x_norm;
  Acc* scale;
  Acc* part_max;
  Acc* part_sum;
  Acc* part_cos;
  int32_t* part_idx;
};

template <class T>
FwdBuffers<T> carve_fwd(Carve& cv, const FwdLayout& l) {
  using Acc = AccOf<T>;
  FwdBuffers<T> b;
  b.x_norm = cv.take<Acc>(l.n_pad);
  b.scale = cv.take<Acc>(l.n_pad);
  const int64_t np = int64_t(l.splits) * l.n_pad;
  b.part_max = cv.take<Acc>(np);
  b.part_sum = cv.take<Acc>(np);
  b.part_cos = cv.take<Acc>(np);
  b.part_idx = cv.take<int32_t>(np);
  return b;
}

template <class T>
size_t fwd_workspace(const ForwardParams& p) {
  Carve cv{nullptr};
  carve_fwd<T>(cv, fwd_layout<T>(p));
  return cv.used;
}

}  // namespace

template <class T>
cudaError_t run_forward(const ForwardParams& p, cudaStream_t stream) {
  using Acc = AccOf<T>;
  const FwdLayout l = fwd_layout<T>(p);
  Carve cv{static_cast<char*>(p.workspace)};
  const FwdBuffers<T> buf = carve_fwd<T>(cv, l);
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);

  // No x̂: the forward GEMM reads x itself.
  const PrepArgs<T> pa = make_prep_args<T>(p, l.n_pad, 0, nullptr, buf.x_norm, buf.scale,
                                           static_cast<Acc*>(p.target_logit));
  prep_kernel<T><<<unsigned(l.n_pad), kThreads, 0, stream>>>(pa);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  FwdArgs<T> fa;
  fa.x = x;
  fa.n = p.n;
  fa.n_pad = l.n_pad;
  fa.weight = w;
  fa.c = p.c;
  fa.d = p.d;
  fa.x_vec = rows_vec<T>(x, p.d);
  fa.w_vec = rows_vec<T>(w, p.d);
  fa.labels = p.labels;
  fa.x_norm = buf.x_norm;
  fa.scale = buf.scale;
  fa.margin = p.margin;
  fa.target_logit = static_cast<Acc*>(p.target_logit);
  fa.part_max = buf.part_max;
  fa.part_sum = buf.part_sum;
  fa.part_cos = buf.part_cos;
  fa.part_idx = buf.part_idx;
  fa.n_class_tiles = l.n_class_tiles;
  fa.tiles_per_split = l.tiles_per_split;
  fa.row_tiles = l.row_tiles;
  constexpr size_t smem = TileGemm<T, false, false>::kSmemBytes;
  err = cudaFuncSetAttribute(fwd_main_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem));
  if (err != cudaSuccess) return err;
  const int64_t grid = int64_t(l.row_tiles) * l.splits;
  fwd_main_kernel<T><<<unsigned(grid), kThreads, smem, stream>>>(fa);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  CombineArgs<Acc> ca;
  ca.part_max = buf.part_max;
  ca.part_sum = buf.part_sum;
  ca.part_cos = buf.part_cos;
  ca.part_idx = buf.part_idx;
  ca.n = p.n;
  ca.n_pad = l.n_pad;
  ca.splits = l.splits;
  ca.lse = static_cast<Acc*>(p.lse);
  ca.max_cos = static_cast<Acc*>(p.max_cos);
  ca.pred = p.pred;
  combine_kernel<Acc><<<unsigned(ceil_div(p.n, kThreads)), kThreads, 0, stream>>>(ca);
  return cudaGetLastError();
}

size_t forward_workspace_bytes(const ForwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto t) { return fwd_workspace<decltype(t)>(p); });
}

cudaError_t launch_margin_lse_forward(const ForwardParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto t) { return run_forward<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace margin_ops
