// margin_lse backward on CUDA: prep -> per class chunk {bwd_tile, bwd_dw, bwd_dx} ->
// finalize (see margin_lse_kernels.cuh for the design).
#include <algorithm>
#include <type_traits>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_bwd_fused_sm80.cuh"
#include "margin_lse_bwd_fused_sm90.cuh"
#include "margin_lse_bwd_tile_sm90.cuh"
#include "margin_lse_dtype.cuh"
#include "margin_lse_gemm_sm90.cuh"
#include "margin_lse_layout.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_reduce.cuh"
#include "margin_lse_tile_gemm.cuh"
#include "margin_lse_tma.cuh"

namespace margin_ops {
namespace cuda {

using namespace dev;

namespace {

// Budgets of the two large workspaces (bytes); see backward_layout. Overridable at compile
// time: the emulated build (tools/margin_emulated) shrinks them so that small problems take several class chunks
// and dX splits.
#ifndef MARGIN_OPS_BWD_SCRATCH_BUDGET
#define MARGIN_OPS_BWD_SCRATCH_BUDGET (int64_t(16) << 20)
#endif
#ifndef MARGIN_OPS_BWD_PARTIAL_BUDGET
#define MARGIN_OPS_BWD_PARTIAL_BUDGET (int64_t(16) << 20)
#endif
constexpr int64_t kScratchBudget = MARGIN_OPS_BWD_SCRATCH_BUDGET;  // dS' chunk, N_pad x cc of T
constexpr int64_t kPartialBudget = MARGIN_OPS_BWD_PARTIAL_BUDGET;  // dX̂ split partials, fp32/fp64

// ---------------------------------------------------------------------------------------
// bwd_tile: grid (row tile, class tile of the chunk). Recomputes the cosine tile and writes
//   scratch[i, k·cc + c − c0] = dS'_ic = dc_ic / max(‖w_ck‖, eps) where sub-center k is the
//                        one of c_ic (the largest), else 0                (dtype T, all N_pad rows)
//   r_part[rt, k·cc + c − c0] = Σ_{i in row tile} dc_ic c_ic [k wins]   (Acc)
//   w_norm[k·cc + c − c0]     = ‖w_ck‖                                   (row tile 0 only)
//   corr_part[ct, i]   = Σ_{c in the tile} dlogit_ic (F_ic − F'_ic ĉ_ic)   (feature_scale
//                        only: finalize's feature-scale term, see there)
// (w_ck: class c's sub-center k, W's row r_c·K + k; K = 1: k = 0, the scratch is N_pad x cc)
// with logit_ic = s_i F_ic: F = φ(c) at y_i, hard_example(c) elsewhere (c itself without
// hard examples); dlogit_ic = g_lse_i P_ic + g_target_i [c = y_i] + g_sum_i [c ≠ y_i],
// P_ic = exp(logit_ic - lse_i) (0 at y_i for margin "external": left out of the lse, which
// may be -inf); dc_ic = s_i dlogit_ic F'_ic.
// ---------------------------------------------------------------------------------------
// (TileArgs, RowGrad and the K = 1 per-element epilogue: margin_lse_bwd_epilogue.cuh.)
// Instantiated per option (kHard: hard examples; kSub: K > 1 sub-centers per class), so
// that a kernel carries only what its problem needs. kSub: K cosine passes keep each entry's largest raw cosine and its sub-center
// (8 bits) in registers and each pass's 1 / ‖w‖ in dynamic shared memory after the GEMM
// stages (K x BN); then dc of every entry (in the accumulator's registers) and per
// sub-center its scratch block and column sums.
template <class T, bool kSub, bool kHard>
__global__ void __launch_bounds__(kThreads, kSub ? 1 : Cfg<T>::kMinBlocks) bwd_tile_kernel(
    const TileArgs<T> args) {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  constexpr Acc kLog2e = Consts<Acc>::kLog2e;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ CosineTile<T> tile;
  __shared__ Acc s_norm[C::BN];
  __shared__ Acc s_lse2[C::BM];
  __shared__ Acc s_gl[C::BM];
  __shared__ Acc s_gt[C::BM];
  __shared__ Acc s_gs[C::BM];
  __shared__ Acc s_r[C::kWarpsM][C::BN];
  __shared__ Acc s_corr[C::kWarpsN][C::BM];
  __shared__ MarginParams s_margin;

  const int tid = threadIdx.x;
  const WarpPlace place = warp_place<C>();  // named fields: the lambdas below capture them
  const int lane = place.lane, warp_m = place.warp_m, warp_n = place.warp_n;
  const int wm0 = place.wm0, wn0 = place.wn0;
  const int rt = blockIdx.x;
  const int64_t row0 = int64_t(rt) * C::BM;
  const int64_t ct_local0 = int64_t(blockIdx.y) * C::BN;  // first column, chunk-local
  const int64_t col0 = args.c0 + ct_local0;                // first column, global

  if (tid == 0) s_margin = args.margin;
  tile.load_rows(args.in, row0, args.x_norm, args.scale);
  for (int r = tid; r < C::BM; r += kThreads) {
    const int64_t gr = row0 + r;
    const bool row_ok = gr < args.in.n;
    s_lse2[r] = row_ok ? args.lse[gr] * kLog2e : Acc(0);
    s_gl[r] = row_ok ? args.g_lse[gr] : Acc(0);
    s_gt[r] = row_ok ? args.g_t[gr] : Acc(0);
    s_gs[r] = row_ok ? args.g_sum[gr] : Acc(0);
  }
  const bool external = args.margin.kind == MarginKind::External;
  const bool fs = args.margin.feature_scale;
  // (visible after the GEMM's barriers)

  auto row_grad = [&](int r) {
    const Acc sc = tile.scale[r];
    return RowGrad<Acc, kHard>{sc, sc * kLog2e, s_lse2[r], s_gl[r], s_gs[r],
                               kHard ? tile.hard_thr[r] : Acc(0), kHard ? tile.hard_t[r] : Acc(0)};
  };
  // The row's feature-scale sum over the 4 lanes sharing it, one slot per warp column.
  auto store_corr = [&](int r, Acc corr) {
    if (fs) {  // uniform
      corr = lanes_sum<0, 2>(corr);
      if ((lane & 3) == 0) s_corr[warp_n][r] = corr;
    }
  };
  // dS' values dv of columns ci .. ci + kStep − 1 of a scratch row from `out` (+ wn0): one
  // 4-byte (16-bit T) or 8-byte (TF32) store of a pair of adjacent columns (mma layout).
  constexpr int kStep = C::kPairCols ? 2 : 1;
  auto store_scratch = [&](T* out, int ci, const Acc (&dv)[kStep]) {
    if constexpr (C::kPairCols) {
      using Pair = std::conditional_t<sizeof(T) == 2, uint32_t, uint2>;
      const T pair[2] = {Type<T>::store(dv[0]), Type<T>::store(dv[1])};
      static_assert(sizeof(pair) == sizeof(Pair), "two elements per store");
      Pair bits;
      memcpy(&bits, pair, sizeof(Pair));
      *reinterpret_cast<Pair*>(out + C::col(ci, lane)) = bits;
    } else {
      out[C::col(ci, lane)] = Type<T>::store(dv[0]);
    }
  };
  // r_out[t] = Σ over the tile's rows of column t's rsum: over the lanes sharing the column
  // (lane bits 2-4), then over the warps.
  auto store_column_sums = [&](Acc (&rsum)[C::TC], Acc* r_out) {
#pragma unroll
    for (int ci = 0; ci < C::TC; ++ci) rsum[ci] = lanes_sum<2, 5>(rsum[ci]);
    if ((lane >> 2) == 0) {
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) s_r[warp_m][wn0 + C::col(ci, lane)] = rsum[ci];
    }
    __syncthreads();
    for (int t = tid; t < C::BN; t += kThreads) {
      Acc r = s_r[0][t];
#pragma unroll
      for (int w = 1; w < C::kWarpsM; ++w) r += s_r[w][t];
      r_out[t] = r;
    }
  };

  Acc acc[C::TR][C::TC];
  Acc rsum[C::TC];
  if constexpr (!kSub) {
    tile.products(acc, args.in, row0, col0, smem, s_norm);
#pragma unroll
    for (int ci = 0; ci < C::TC; ++ci) rsum[ci] = Acc(0);

    // This warp's columns: the tile's [wn0, wn0 + WN), those below c_lim valid.
    const int64_t c_left = args.in.c - col0 - wn0;
    const int c_lim = int(c_left < 0 ? 0 : c_left < C::WN ? c_left : C::WN);
#pragma unroll
    for (int ri = 0; ri < C::TR; ++ri) {
      const int r = wm0 + C::row(ri, lane);
      const int64_t gr = row0 + r;
      const bool row_ok = gr < args.in.n;
      Acc corr = Acc(0);  // Σ dlogit (F − F' ĉ) over this thread's columns of row r
      const int yt = tile.target_column(r, col0) - wn0;
      const int yl = yt >= 0 && yt < C::WN ? yt : -1;
      GradEpilogue<C, kHard>::row(acc, ri, lane, row_grad(r), tile.xinv[r], tile.inv + wn0,
                                  row_ok && c_lim == C::WN, row_ok ? c_lim : 0, yl, s_gt[r],
                                  &s_margin, external, fs, rsum, corr);
      T* out = args.scratch + gr * args.ld + ct_local0 + wn0;
#pragma unroll
      for (int ci = 0; ci < C::TC; ci += kStep) {
        Acc dv[kStep];
#pragma unroll
        for (int e = 0; e < kStep; ++e) dv[e] = acc[ri][ci + e];
        store_scratch(out, ci, dv);
      }
      store_corr(r, corr);
    }
    store_column_sums(rsum, args.r_part + int64_t(rt) * args.ld + ct_local0);
    if (rt == 0) {
      for (int t = tid; t < C::BN; t += kThreads) args.w_norm[ct_local0 + t] = s_norm[t];
    }
  } else {
    const int64_t subs = args.in.subcenters;
    Acc* s_inv_sub = reinterpret_cast<Acc*>(smem_raw + CosineTile<T>::kSmemBytes);  // [K][BN]
    // best: the raw cosine of the winning sub-center (the largest clamped one, the first on
    // ties: sub_center_wins), win: its index, 8 bits per entry (K <= kMaxSubcenters).
    Acc best[C::TR][C::TC];
    uint32_t win[C::TR][C::TC / 4] = {};
    static_assert(C::TC % 4 == 0 && kMaxSubcenters <= 256, "8-bit sub-center indices");
    auto winner = [&](int ri, int ci) { return int((win[ri][ci / 4] >> (8 * (ci % 4))) & 0xffu); };
    for (int64_t sub = 0; sub < subs; ++sub) {
      tile.products(acc, args.in, row0, col0, smem, s_norm, sub);
      for (int t = tid; t < C::BN; t += kThreads) {  // read after the barrier below the loop
        s_inv_sub[sub * C::BN + t] = tile.inv[t];
        if (rt == 0) args.w_norm[sub * args.cc + ct_local0 + t] = s_norm[t];
      }
#pragma unroll
      for (int ri = 0; ri < C::TR; ++ri) {
#pragma unroll
        for (int ci = 0; ci < C::TC; ++ci) {
          const Acc raw = tile.raw_cosine(acc, ri, ci, lane, wm0, wn0);
          if (sub == 0) {
            best[ri][ci] = raw;
          } else if (sub_center_wins(clamp_unit(raw), clamp_unit(best[ri][ci]))) {
            best[ri][ci] = raw;
            const int sh = 8 * (ci % 4);
            win[ri][ci / 4] = (win[ri][ci / 4] & ~(0xffu << sh)) | (uint32_t(sub) << sh);
          }
        }
      }
    }
    __syncthreads();  // s_inv_sub

    // acc = dc of every entry (0 outside the problem, whose best is set to 0).
#pragma unroll
    for (int ri = 0; ri < C::TR; ++ri) {
      const int r = wm0 + C::row(ri, lane);
      const bool row_ok = row0 + r < args.in.n;
      const auto g = row_grad(r);
      Acc corr = Acc(0);
      const int yl = tile.target_column(r, col0);
      bool has_t = false;
      Acc t_raw = Acc(0);
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) {
        const int cl = wn0 + C::col(ci, lane);
        acc[ri][ci] = Acc(0);
        if (row_ok && col0 + cl < args.in.c) {
          const Acc raw = best[ri][ci];
          if (cl == yl) {
            has_t = true;
            t_raw = raw;
          } else {
            acc[ri][ci] = g.nontarget(clamp_unit(raw), raw, fs, corr);
          }
        } else {
          best[ri][ci] = Acc(0);
        }
      }
      if (has_t) {
        const Acc dc = g.target(clamp_unit(t_raw), t_raw, s_gt[r], &s_margin, external, corr);
#pragma unroll
        for (int ci = 0; ci < C::TC; ++ci) {
          if (wn0 + C::col(ci, lane) == yl) acc[ri][ci] = dc;
        }
      }
      store_corr(r, corr);
    }

    // Per sub-center: its scratch block (dS' where it wins, else 0) and column sums.
    for (int64_t sub = 0; sub < subs; ++sub) {
      const Acc* inv = s_inv_sub + sub * C::BN;
#pragma unroll
      for (int ci = 0; ci < C::TC; ++ci) rsum[ci] = Acc(0);
#pragma unroll
      for (int ri = 0; ri < C::TR; ++ri) {
        const int64_t gr = row0 + wm0 + C::row(ri, lane);
        T* out = args.scratch + gr * args.ld + sub * args.cc + ct_local0 + wn0;
#pragma unroll
        for (int ci = 0; ci < C::TC; ci += kStep) {
          Acc dv[kStep];
#pragma unroll
          for (int e = 0; e < kStep; ++e) {
            dv[e] = Acc(0);
            if (winner(ri, ci + e) == sub) {
              dv[e] = acc[ri][ci + e] * inv[wn0 + C::col(ci + e, lane)];
              rsum[ci + e] += acc[ri][ci + e] * clamp_unit(best[ri][ci + e]);
            }
          }
          store_scratch(out, ci, dv);
        }
      }
      store_column_sums(rsum, args.r_part + int64_t(rt) * args.ld + sub * args.cc + ct_local0);
      __syncthreads();  // s_r is the next sub-center's
    }
  }
  if (fs) {  // s_corr: written before store_column_sums' barrier
    for (int r = tid; r < C::BM; r += kThreads) {
      Acc v = s_corr[0][r];
#pragma unroll
      for (int w = 1; w < C::kWarpsN; ++w) v += s_corr[w][r];
      args.corr_part[int64_t(blockIdx.y) * args.n_pad + row0 + r] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------
// bwd_corr (feature_scale only): grid over rows i < n, after bwd_tile of each chunk.
//   t_corr[i] (+)= Σ_ct corr_part[ct, i]       (class tiles in order; the first chunk stores)
// ---------------------------------------------------------------------------------------
template <class A>
struct CorrArgs {
  const A* corr_part;
  int64_t n, n_pad;
  int tiles;        // class tiles of this chunk
  bool accumulate;  // false for the first chunk
  A* t_corr;        // (n_pad,)
};

template <class A>
__global__ void __launch_bounds__(kThreads) bwd_corr_kernel(const CorrArgs<A> args) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= args.n) return;
  A v = args.accumulate ? args.t_corr[i] : A(0);
  for (int t = 0; t < args.tiles; ++t) v += args.corr_part[int64_t(t) * args.n_pad + i];
  args.t_corr[i] = v;
}

// ---------------------------------------------------------------------------------------
// bwd_dw: grid (D tile, class tile of the chunk, sub-center k).
//   dW[r_c·K + k, :] = Σ_i dS'_{i,k·cc+c} x̂_i − w_ck r_ck / ‖w_ck‖²
//                       (r_ck = Σ_rt r_part[rt, k·cc + c]; 0 if ‖w_ck‖ <= eps)
// into W's row r_c·K + k of class c's sub-center k (r_c = class_index[c], or c): each
// written once. A = the scratch's block k stored [rows = K][classes = M], B = x̂ stored
// [rows = K][D = N].
// ---------------------------------------------------------------------------------------
template <class T>
struct DwArgs {
  using Acc = AccOf<T>;
  const T* scratch;
  int64_t cc, ld, kc;  // sub-center block and row length of the scratch; valid classes in this chunk
  int64_t n, n_pad;
  const T* x_hat;
  int64_t d_pad;
  const T* weight;
  const int64_t* class_index;  // (c,) or nullptr
  int64_t c0, d, subcenters;
  const Acc* r_part;
  const Acc* w_norm;
  int row_tiles;  // of bwd_tile
  T* grad_weight;
};

// −r_ck / ‖w_ck‖² of chunk-local class m's sub-center whose scratch block starts at s0
// (r_ck summed over the row tiles in order; 0 if ‖w_ck‖ <= eps).
template <class T>
__device__ __forceinline__ AccOf<T> dw_coef(const DwArgs<T>& args, int64_t s0, int64_t m) {
  using Acc = AccOf<T>;
  Acc r = Acc(0);
  for (int q = 0; q < args.row_tiles; ++q) r += args.r_part[int64_t(q) * args.ld + s0 + m];
  const Acc nrm = args.w_norm[s0 + m];
  return nrm > Consts<Acc>::kNormEps ? -r / (nrm * nrm) : Acc(0);
}

// The first element of W's (and dW's) row r_c·K + sub of chunk-local class m.
template <class T>
__device__ __forceinline__ int64_t dw_row(const DwArgs<T>& args, int64_t m, int64_t sub) {
  const int64_t cls = args.c0 + m;
  return ((args.class_index != nullptr ? args.class_index[cls] : cls) * args.subcenters + sub) *
         args.d;
}

template <class T>
__global__ void __launch_bounds__(kThreads, Cfg<T>::kMinBlocks) bwd_dw_kernel(
    const DwArgs<T> args) {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  using Gemm = TileGemm<T, true, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ Acc s_coef[C::BM];

  const int tid = threadIdx.x;
  const auto [lane, warp_m, warp_n, wm0, wn0] = warp_place<C>();
  const int64_t d0 = int64_t(blockIdx.x) * C::BN;
  const int64_t m0 = int64_t(blockIdx.y) * C::BM;  // chunk-local class
  const int64_t sub = blockIdx.z;
  const int64_t s0 = sub * args.cc;  // the sub-center's first scratch column

  for (int t = tid; t < C::BM; t += kThreads) {
    s_coef[t] = m0 + t < args.kc ? dw_coef(args, s0, m0 + t) : Acc(0);
  }

  const Operand<T> a{args.scratch + s0, args.ld, m0, args.kc, args.n_pad, true};
  const Operand<T> b{args.x_hat, args.d_pad, d0, args.d_pad, args.n_pad, true};
  Acc acc[C::TR][C::TC];
  NoExtra none;
  Gemm::run(acc, a, b, 0, (args.n + C::BK - 1) / C::BK * C::BK, smem, none);

#pragma unroll
  for (int ri = 0; ri < C::TR; ++ri) {
    const int ml = wm0 + C::row(ri, lane);
    if (m0 + ml >= args.kc) continue;
    const Acc coef = s_coef[ml];
    const int64_t row = dw_row(args, m0 + ml, sub);
#pragma unroll
    for (int ci = 0; ci < C::TC; ++ci) {
      const int64_t dd = d0 + wn0 + C::col(ci, lane);
      if (dd >= args.d) continue;
      const Acc w = Type<T>::load(args.weight[row + dd]);
      args.grad_weight[row + dd] = Type<T>::store(acc[ri][ci] + coef * w);
    }
  }
}

// ---------------------------------------------------------------------------------------
// bwd_dx: grid (D tile, row tile, split), one launch per sub-center k. Split s of the
// chunk's classes [k0, k1):
//   part[s, i, d] (+)= Σ_{c in [k0, k1)} dS'_{i,k·cc+c} w_{c0 + c, k, d}
// A = the scratch's block k stored [rows = M][classes = K], B = sub-center k's rows of the
// W chunk stored [classes = K][D = N] (K·d apart), gathered by class_index when given.
// Each (split, tile) belongs to one CTA per launch and launches are stream-ordered, so the
// read-modify-write is race-free and its order is fixed.
// ---------------------------------------------------------------------------------------
template <class T>
struct DxArgs {
  using Acc = AccOf<T>;
  const T* scratch;  // the sub-center's block
  int64_t ld, kc, n_pad;  // scratch row length
  const T* weight_chunk;  // sub-center k's row of class c0 (weight + (c0·K + k)·d), or of
                          // class 0 (weight + k·d) with class_index
  const int64_t* chunk_index;  // class_index + c0, or nullptr
  int64_t w_ld;           // K·d
  int64_t d, d_pad;
  bool w_vec;
  int64_t k_split;  // classes per split, a multiple of BK
  bool accumulate;  // false for the first chunk's first sub-center: store
  Acc* part;        // (splits, n_pad, d_pad)
};

template <class T>
__global__ void __launch_bounds__(kThreads, Cfg<T>::kMinBlocks) bwd_dx_kernel(
    const DxArgs<T> args) {
  using C = Cfg<T>;
  using Acc = AccOf<T>;
  using Gemm = TileGemm<T, false, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const auto [lane, warp_m, warp_n, wm0, wn0] = warp_place<C>();
  const int64_t d0 = int64_t(blockIdx.x) * C::BN;
  const int64_t row0 = int64_t(blockIdx.y) * C::BM;
  const int64_t split = blockIdx.z;
  const int64_t k0 = split * args.k_split;
  const int64_t k1 = k0 + args.k_split < args.kc ? k0 + args.k_split : args.kc;

  // k_lim = k1 on both operands: the last k tile must not reach into the next split.
  const Operand<T> a{args.scratch, args.ld, row0, args.n_pad, k1, true};
  const Operand<T> b{args.weight_chunk, args.w_ld, d0, args.d, k1, args.w_vec, args.chunk_index};
  Acc acc[C::TR][C::TC];
  NoExtra none;
  Gemm::run(acc, a, b, k0, k1, smem, none);

  Acc* out = args.part + (split * args.n_pad + row0 + wm0) * args.d_pad + d0 + wn0;
#pragma unroll
  for (int ri = 0; ri < C::TR; ++ri) {
    Acc* o = out + int64_t(C::row(ri, lane)) * args.d_pad;
#pragma unroll
    for (int ci = 0; ci < C::TC; ++ci) {
      Acc* e = o + C::col(ci, lane);
      *e = args.accumulate ? *e + acc[ri][ci] : acc[ri][ci];
    }
  }
}

// ---------------------------------------------------------------------------------------
// bwd_dw and bwd_dx on sm_90a: bwd_gemm_sm90_kernel, the GEMM of margin_lse_gemm_sm90.cuh
// with these epilogue policies, on the grids of bwd_dw_kernel / bwd_dx_kernel and with their
// results (same dW rows written once, same fixed-order partial read-modify-writes). Tensor
// maps (Backward::run), 16-bit, zero beyond their extents:
//   dW: A = the whole scratch, ld classes (M index k·cc + c) x n rows (K), MN-major;
//       B = x̂, d_pad (N) x n rows (K), MN-major.
//   dX: A = sub-center k's scratch block, kc classes (K) x n rows (M), K-major;
//       B = the chunk's sub-center k rows of W, d (N) x kc classes (K), pitch K·d, MN-major
//       (TMA cannot gather: class_index keeps bwd_dx_kernel).
// ---------------------------------------------------------------------------------------
template <class T>
struct DwSm90 {
  using G = Sm90GemmCfg;
  static constexpr bool kAMnMajor = true;  // dS'ᵀ: the scratch [rows = K][classes = M]
  DwArgs<T> args;

  __device__ Sm90GemmTile tile() const {
    return {int(blockIdx.z * args.cc + blockIdx.y * G::BM), int(blockIdx.x * G::BN), 0,
            int((args.n + G::BK - 1) / G::BK)};
  }

  // Runs of 8 columns (for_each_row_run): where every row is 16-byte aligned (d % 8 == 0,
  // W and dW aligned), a 16-byte load of W and store of dW per run: a quad's four runs are
  // 64 contiguous bytes of a row. Otherwise element by element, up to d.
  __device__ void store(const float (&acc)[64], int row0, int lane) const {
    const int64_t d0 = int64_t(blockIdx.x) * G::BN;
    const int64_t m0 = int64_t(blockIdx.y) * G::BM + row0 + (lane >> 2);
    const int64_t sub = blockIdx.z;
    const bool vec = args.d % 8 == 0 && ((reinterpret_cast<uintptr_t>(args.weight) |
                                          reinterpret_cast<uintptr_t>(args.grad_weight)) &
                                         15u) == 0;
    float coef[2];
    int64_t row[2];  // of dW's row of rows g and g + 8 (-1 past the chunk's classes)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t m = m0 + 8 * r;
      coef[r] = m < args.kc ? dw_coef(args, sub * args.cc, m) : 0.f;
      row[r] = m < args.kc ? dw_row(args, m, sub) : -1;
    }
    for_each_row_run<8>(acc, lane, [&](int r, int col, const float (&v)[8]) {
      const int64_t dd = d0 + col;
      if (row[r] < 0 || dd >= args.d) return;
      if (vec) {
        // (as an index into uint4 arrays: through a cast T pointer, nvcc splits some of
        // the stores into four 4-byte ones)
        const int64_t i = (row[r] + dd) / 8;
        const uint4 wbits = reinterpret_cast<const uint4*>(args.weight)[i];
        T w[8];
        static_assert(sizeof(w) == sizeof(uint4), "8 elements per 16-byte access");
        memcpy(w, &wbits, sizeof(w));
        uint32_t pairs[4];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          pairs[e / 2] = bits16(Type<T>::store(v[e] + coef[r] * Type<T>::load(w[e]))) |
                         bits16(Type<T>::store(v[e + 1] + coef[r] * Type<T>::load(w[e + 1])))
                             << 16;
        }
        reinterpret_cast<uint4*>(args.grad_weight)[i] =
            make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
      } else {
        const T* w = args.weight + row[r] + dd;
        T* out = args.grad_weight + row[r] + dd;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (dd + e < args.d) out[e] = Type<T>::store(v[e] + coef[r] * Type<T>::load(w[e]));
        }
      }
    });
  }

  static __device__ uint32_t bits16(T v) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __bfloat16_as_ushort(v);
    } else {
      return __half_as_ushort(v);
    }
  }
};

// kBN: 256 where d_pad >= 256 (Backward::layout's dx_bn), so that each dS' tile is read
// d_pad / 256 times instead of d_pad / 128; a last D tile past d_pad (d_pad = 128 mod 256)
// computes zeros from TMA's fill and stores nothing there.
template <class T, int kBN>
struct DxSm90 {
  using G = Sm90GemmShape<kBN>;
  static constexpr bool kAMnMajor = false;  // dS': the scratch [rows = M][classes = K]
  DxArgs<T> args;  // k_split: a multiple of BK (Backward::layout)

  __device__ Sm90GemmTile tile() const {
    const int64_t k0 = int64_t(blockIdx.z) * args.k_split;
    const int64_t k1 = k0 + args.k_split < args.kc ? k0 + args.k_split : args.kc;
    return {int(blockIdx.y * G::BM), int(blockIdx.x * G::BN), int(k0),
            k1 > k0 ? int((k1 - k0 + G::BK - 1) / G::BK) : 0};
  }

  // Runs of 4 columns (for_each_row_run): one 16-byte read-modify-write of the partial each
  // (the tile's rows lie inside the n_pad x d_pad partial, 16-byte aligned; its columns up
  // to d_pad, a multiple of 128).
  __device__ void store(const float (&acc)[G::kAccRegs], int row0, int lane) const {
    const int64_t split = blockIdx.z;
    const int64_t row = split * args.n_pad + int64_t(blockIdx.y) * G::BM + row0 + (lane >> 2);
    const int64_t d0 = int64_t(blockIdx.x) * G::BN;
    float* out = args.part + row * args.d_pad + d0;
    for_each_row_run<4>(acc, lane, [&](int r, int col, const float (&v)[4]) {
      if (G::BN > 128 && d0 + col >= args.d_pad) return;
      float4* e = reinterpret_cast<float4*>(out + 8 * r * args.d_pad + col);
      float4 n = make_float4(v[0], v[1], v[2], v[3]);
      if (args.accumulate) {
        const float4 old = *e;
        n = make_float4(old.x + n.x, old.y + n.y, old.z + n.z, old.w + n.w);
      }
      *e = n;
    });
  }
};

template <class T, class Epi>
__global__ void __launch_bounds__(Sm90WarpRoles::kThreads, 1)
    bwd_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_a,
                         const __grid_constant__ CUtensorMap tmap_b, const Epi epi) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned to 1024 by gemm_sm90
  gemm_sm90<T, Epi::kAMnMajor>(tmap_a, tmap_b, epi, smem_raw);
}

// ---------------------------------------------------------------------------------------
// finalize: one CTA per row i < n.
//   dX̂ = Σ_s part[s, i, :]                        (split order)
//   dx = (dX̂ − x̂ (x̂·dX̂)) / ‖x‖                   (dX̂ / eps when ‖x‖ <= eps)
//   feature_scale: dx += g_s · x / ‖x‖ (0 at x = 0), the gradient through s_i = ‖x_i‖, with
//   g_s = Σ_c dlogit_ic logit_ic / s_i = (x̂·dX̂) / s_i + t_corr_i
//   because x̂·dX̂ = Σ_c dc_ic ĉ_ic (ĉ: unclamped cosine), dc = s dlogit F', and bwd_tile
//   (+ bwd_corr) left the difference t_corr_i = Σ_c dlogit_ic (F_ic − F'_ic ĉ_ic), from the
//   very cosines it used (a recomputed one could land on the other side of ArcFace's or the
//   hard examples' threshold, or move the steep exact slope near c = 1).
// ---------------------------------------------------------------------------------------
template <class T>
struct FinalizeArgs {
  using Acc = AccOf<T>;
  const T* x;
  int64_t d, n_pad, d_pad;
  const Acc* x_norm;
  const Acc* scale;
  const Acc* part;
  int splits;
  const Acc* t_corr;
  bool feature_scale;
  T* grad_x;
};

template <class T>
__global__ void __launch_bounds__(kThreads) bwd_finalize_kernel(const FinalizeArgs<T> args) {
  using Acc = AccOf<T>;
  __shared__ Acc s_red[kThreads / 32];
  const int64_t i = blockIdx.x;
  const T* xr = args.x + i * args.d;
  const Acc xn = args.x_norm[i];
  const Acc inv = inverse_norm(xn);
  const bool fs = args.feature_scale && xn > Acc(0);
  const int64_t pstride = args.n_pad * args.d_pad;
  const Acc* pr = args.part + i * args.d_pad;

  Acc radial[1] = {Acc(0)};  // x̂·dX̂
  for (int64_t k = threadIdx.x; k < args.d; k += kThreads) {
    Acc g = Acc(0);
    for (int s = 0; s < args.splits; ++s) g += pr[s * pstride + k];
    radial[0] = fma(Type<T>::load(xr[k]) * inv, g, radial[0]);
  }
  block_sum(radial, s_red);
  const Acc gs = fs ? radial[0] / args.scale[i] + args.t_corr[i] : Acc(0);  // gradient w.r.t. s_i

  const bool tangent = xn > Consts<Acc>::kNormEps;
  T* out = args.grad_x + i * args.d;
  for (int64_t k = threadIdx.x; k < args.d; k += kThreads) {
    Acc g = Acc(0);
    for (int s = 0; s < args.splits; ++s) g += pr[s * pstride + k];
    const Acc xv = Type<T>::load(xr[k]);
    const Acc xh = xv * inv;
    Acc dx = tangent ? (g - xh * radial[0]) * inv : g * inv;  // inv = 1/eps on the floor
    if (fs) dx += gs * (xv / xn);
    out[k] = Type<T>::store(dx);
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
struct BwdLayout {
  int64_t n_pad, d_pad;
  int64_t cc;        // classes per chunk (multiple of 128)
  int64_t ld;        // scratch row length: K·cc (sub-center k's block from k·cc)
  int64_t chunks;
  int row_tiles;     // n_pad / BM
  int d_tiles;       // d_pad / BN (bwd_dw, and bwd_dx on mma.sync)
  int dx_bn;         // bwd_dx's tile width: 256 for bwd_gemm_sm90<DxSm90> where d_pad >= 256
  int dx_d_tiles;    // ceil(d_pad / dx_bn)
  int splits;        // bwd_dx splits per chunk
  int64_t k_split;   // classes per split
};

template <class T>
struct BwdBuffers {
  using Acc = AccOf<T>;
  T* x_hat;
  Acc* x_norm;
  Acc* scale;
  T* scratch;
  Acc* r_part;
  Acc* w_norm;
  Acc* part;
  Acc* t_corr;
  Acc* corr_part;
};

// The input types of the sm_90a GEMMs (wgmma bf16 / f16).
template <class T>
constexpr bool kWgmmaType = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// The host side of the backward: the layout of its chunks, splits and grids, its workspace
// buffers and its launches (the entry points below join them: launch_pass in
// margin_lse_layout.cuh).
struct Backward {
  // The sm_90a GEMM for bwd_dw (bwd_gemm_sm90_kernel): compute capability 9.0 and 16-bit
  // inputs; the scratch and x̂ are TMA-friendly by construction (256-byte aligned workspace
  // buffers, pitches multiples of 256 bytes).
  template <class T>
  static bool sm90_dw(const BackwardParams& p) {
    return kWgmmaType<T> && p.arch == 90;
  }
  // bwd_dx also loads W by TMA: no class_index (TMA cannot gather rows), and every chunk's
  // sub-center rows start 16-byte aligned with a 16-byte multiple pitch (K·d·2): d % 8 == 0.
  template <class T>
  static bool sm90_dx(const BackwardParams& p) {
    return sm90_dw<T>(p) && p.class_index == nullptr && p.d % 8 == 0 && aligned16(p.weight);
  }

  // bwd_tile_sm90_kernel for bwd_tile where it applies.
  template <class T>
  static bool sm90_tile(const BackwardParams& p) {
    return kWgmmaType<T> && sm90_bwd_tile_eligible(p);
  }

  // A fused backward kernel (bwd_fused_sm90, bwd_fused) for bwd_tile + bwd_dw (then neither
  // runs, nor does prep write x̂: the fused kernels' dW reads x itself) where a chunk's
  // 64-class tiles give at least 7 / 8 of the SMs a CTA: each CTA walks all N rows, so with
  // fewer tiles (large N, hence small chunks, or few classes) the separate kernels' grids
  // spread the work better (a prediction: not measured). In bf16: N <= 1024 on 132 SMs,
  // N <= 1280 on 108.
  static bool fused_fills_sms(const BackwardParams& p, const BwdLayout& l) {
    const int64_t tiles = ceil_div(std::min(l.cc, p.c), int64_t(kBwdFusedClasses));
    return 8 * tiles >= 7 * int64_t(std::max(p.num_sms, 1));
  }
  // bwd_fused_sm90_kernel where it applies.
  template <class T>
  static bool sm90_fused(const BackwardParams& p, const BwdLayout& l) {
    return kWgmmaType<T> && sm90_bwd_fused_eligible(p) && fused_fills_sms(p, l);
  }
  // bwd_fused_kernel (mma.sync) where it applies and bwd_fused_sm90 does not.
  template <class T>
  static bool mma_fused(const BackwardParams& p, const BwdLayout& l) {
    return kWgmmaType<T> && !sm90_fused<T>(p, l) && bwd_fused_eligible(p) && fused_fills_sms(p, l);
  }

  template <class T>
  static BwdLayout layout(const BackwardParams& p) {
    using C = Cfg<T>;
    using Acc = AccOf<T>;
    BwdLayout l;
    l.n_pad = rows_padded(p.n);
    l.d_pad = dims_padded(p.d);
    l.row_tiles = int(l.n_pad / C::BM);
    l.d_tiles = int(l.d_pad / C::BN);
    const int64_t c_pad = round_up(p.c, 128);
    const int64_t fit =
        kScratchBudget / (l.n_pad * p.subcenters * int64_t(sizeof(T))) / 128 * 128;
    l.cc = std::min(c_pad, std::max<int64_t>(128, fit));
    l.ld = p.subcenters * l.cc;
    l.chunks = ceil_div(p.c, l.cc);
    l.dx_bn = sm90_dx<T>(p) && l.d_pad >= 256 ? 256 : C::BN;
    l.dx_d_tiles = int(ceil_div(l.d_pad, int64_t(l.dx_bn)));
    // Splits: about two CTAs per SM for bwd_dx, each with >= 256 classes, partials in budget
    // (16 MiB: bwd_gemm_sm90<DxSm90>'s 128 x 256 tiles, 1 CTA per SM, then fill one wave of
    // >= 128 CTAs at N = 128 .. 1024, D = 512).
    const int64_t tiles = int64_t(l.row_tiles) * l.dx_d_tiles;
    const int64_t sms = p.num_sms > 0 ? p.num_sms : 1;
    int64_t splits = ceil_div(2 * sms, tiles);
    splits = std::min(splits, std::max<int64_t>(1, l.cc / 256));
    splits = std::min(splits, std::max<int64_t>(
                                  1, kPartialBudget / (l.n_pad * l.d_pad * int64_t(sizeof(Acc)))));
    splits = std::max<int64_t>(1, splits);
    // (sm_90a: whole 64-deep k blocks, so that only the chunk's end, zero-filled by TMA,
    // cuts one)
    l.k_split =
        round_up(ceil_div(l.cc, splits), sm90_dx<T>(p) ? int64_t(Sm90GemmCfg::BK) : C::BK);
    l.splits = int(ceil_div(l.cc, l.k_split));
    return l;
  }

  // bwd_gemm_sm90_kernel with epilogue policy Epi (its tile's shared memory).
  template <class T, class Epi>
  static void launch_gemm_sm90(dim3 grid, const CUtensorMap& tmap_a, const CUtensorMap& tmap_b,
                               const Epi& epi, cudaStream_t stream) {
    const auto kernel = bwd_gemm_sm90_kernel<T, Epi>;
    kernel<<<grid, Sm90WarpRoles::kThreads, Epi::G::kSmemBytes, stream>>>(tmap_a, tmap_b, epi);
  }

  template <class T>
  static BwdBuffers<T> carve(Carve& cv, const BwdLayout& l) {
    using C = Cfg<T>;
    using Acc = AccOf<T>;
    BwdBuffers<T> b;
    b.x_hat = cv.take<T>(l.n_pad * l.d_pad);
    b.x_norm = cv.take<Acc>(l.n_pad);
    b.scale = cv.take<Acc>(l.n_pad);
    b.scratch = cv.take<T>(l.n_pad * l.ld);
    b.r_part = cv.take<Acc>(int64_t(l.row_tiles) * l.ld);
    b.w_norm = cv.take<Acc>(l.ld);
    b.part = cv.take<Acc>(int64_t(l.splits) * l.n_pad * l.d_pad);
    b.t_corr = cv.take<Acc>(l.n_pad);
    // Per class tile: of bwd_tile, or of the fused kernel (16-bit only).
    b.corr_part = cv.take<Acc>(l.cc / (kWgmmaType<T> ? kBwdFusedClasses : C::BN) * l.n_pad);
    return b;
  }

  template <class T>
  static cudaError_t run(const BackwardParams& p, const BwdLayout& l, const BwdBuffers<T>& buf,
                         cudaStream_t stream) {
    using C = Cfg<T>;
    using Acc = AccOf<T>;
    using GemmDw = TileGemm<T, true, true>;
    using GemmDx = TileGemm<T, false, true>;
    const ProblemInputs<T> in = problem_inputs<T>(p);

    cudaError_t err;
    const bool sub = p.subcenters > 1, hard = p.hard_threshold != nullptr;
    // K > 1: the K sub-centers' 1 / ‖w‖ after the GEMM stages (bwd_tile_kernel).
    const size_t tile_smem =
        CosineTile<T>::kSmemBytes + (sub ? size_t(p.subcenters) * C::BN * sizeof(Acc) : 0);
    const auto tile_kernel =
        sub ? (hard ? bwd_tile_kernel<T, true, true> : bwd_tile_kernel<T, true, false>)
            : (hard ? bwd_tile_kernel<T, false, true> : bwd_tile_kernel<T, false, false>);
    if ((err = allow_smem(tile_kernel, tile_smem)) != cudaSuccess) return err;
    const bool fused90 = sm90_fused<T>(p, l);
    const bool fused80 = mma_fused<T>(p, l);
    const bool fused = fused90 || fused80;
    const bool tile90 = !fused && sm90_tile<T>(p);
    XwTensorMaps map_tile;  // x, W
    XwTensorMaps map_fused;  // x, W
    if constexpr (kWgmmaType<T>) {
      if (tile90 && (err = prepare_bwd_tile_sm90<T>(p, map_tile)) != cudaSuccess) return err;
      if (fused90 && (err = prepare_bwd_fused_sm90<T>(p, map_fused)) != cudaSuccess) return err;
      if (fused80 && (err = prepare_bwd_fused<T>(p)) != cudaSuccess) return err;
    }
    if ((err = allow_smem(bwd_dw_kernel<T>, GemmDw::kSmemBytes)) != cudaSuccess) return err;
    if ((err = allow_smem(bwd_dx_kernel<T>, GemmDx::kSmemBytes)) != cudaSuccess) return err;

    using G90 = Sm90GemmCfg;
    const bool dw90 = !fused && sm90_dw<T>(p), dx90 = sm90_dx<T>(p);
    const bool bf16 = p.dtype == DType::kBFloat16;
    CUtensorMap map_dw_a, map_dw_b;  // the scratch (ld x n), x̂ (d_pad x n)
    if constexpr (kWgmmaType<T>) {
      if (dw90) {
        if ((err = allow_smem(bwd_gemm_sm90_kernel<T, DwSm90<T>>, G90::kSmemBytes)) !=
                cudaSuccess ||
            (err = encode_tma_2d_b16(&map_dw_a, bf16, buf.scratch, l.ld, p.n, l.ld * 2,
                                     G90::BK)) != cudaSuccess ||
            (err = encode_tma_2d_b16(&map_dw_b, bf16, buf.x_hat, l.d_pad, p.n, l.d_pad * 2,
                                     G90::BK)) != cudaSuccess) {
          return err;
        }
      }
      if (dx90 && (err = l.dx_bn == 256
                             ? allow_smem(bwd_gemm_sm90_kernel<T, DxSm90<T, 256>>,
                                          Sm90GemmShape<256>::kSmemBytes)
                             : allow_smem(bwd_gemm_sm90_kernel<T, DxSm90<T, 128>>,
                                          G90::kSmemBytes)) != cudaSuccess) {
        return err;
      }
    }

    const PrepArgs<T> pa =
        make_prep_args<T>(p, l.n_pad, l.d_pad, fused ? nullptr : buf.x_hat, buf.x_norm,
                          buf.scale, nullptr);
    prep_kernel<T><<<unsigned(l.n_pad), kThreads, 0, stream>>>(pa);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    TileArgs<T> ta;
    ta.in = in;
    ta.x_norm = buf.x_norm;
    ta.scale = buf.scale;
    ta.lse = static_cast<const Acc*>(p.lse);
    ta.g_lse = static_cast<const Acc*>(p.grad_lse);
    ta.g_t = static_cast<const Acc*>(p.grad_target_logit);
    ta.g_sum = static_cast<const Acc*>(p.grad_nontarget_sum);
    ta.margin = p.margin;
    ta.cc = l.cc;
    ta.ld = l.ld;
    ta.scratch = buf.scratch;
    ta.r_part = buf.r_part;
    ta.w_norm = buf.w_norm;
    ta.n_pad = l.n_pad;
    ta.corr_part = buf.corr_part;

    CorrArgs<Acc> ra;
    ra.corr_part = buf.corr_part;
    ra.n = p.n;
    ra.n_pad = l.n_pad;
    ra.t_corr = buf.t_corr;

    DwArgs<T> da;
    da.scratch = buf.scratch;
    da.cc = l.cc;
    da.ld = l.ld;
    da.n = p.n;
    da.n_pad = l.n_pad;
    da.x_hat = buf.x_hat;
    da.d_pad = l.d_pad;
    da.weight = in.weight;
    da.class_index = p.class_index;
    da.d = p.d;
    da.subcenters = p.subcenters;
    da.r_part = buf.r_part;
    da.w_norm = buf.w_norm;
    da.row_tiles = l.row_tiles;
    da.grad_weight = static_cast<T*>(p.grad_weight);

    DxArgs<T> xa;
    xa.ld = l.ld;
    xa.n_pad = l.n_pad;
    xa.w_ld = p.subcenters * p.d;
    xa.d = p.d;
    xa.d_pad = l.d_pad;
    xa.w_vec = in.w_vec;
    xa.k_split = l.k_split;
    xa.part = buf.part;

    for (int64_t chunk = 0; chunk < l.chunks; ++chunk) {
      const int64_t c0 = chunk * l.cc;
      const int64_t kc = std::min(l.cc, p.c - c0);

      ta.c0 = c0;
      const dim3 grid_tile(unsigned(l.row_tiles), unsigned(ceil_div(kc, C::BN)));
      if constexpr (kWgmmaType<T>) {
        if (tile90 && (err = launch_bwd_tile_sm90<T>(p, map_tile, ta, l.row_tiles, kc, stream)) !=
                          cudaSuccess) {
          return err;
        }
        if (fused90 && (err = launch_bwd_fused_sm90<T>(p, map_fused, ta, kc, stream)) !=
                           cudaSuccess) {
          return err;
        }
        if (fused80 && (err = launch_bwd_fused<T>(p, ta, kc, stream)) != cudaSuccess) return err;
      }
      if (!tile90 && !fused) tile_kernel<<<grid_tile, kThreads, tile_smem, stream>>>(ta);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;

      if (p.margin.feature_scale) {
        ra.tiles = int(fused ? ceil_div(kc, int64_t(kBwdFusedClasses)) : grid_tile.y);
        ra.accumulate = chunk > 0;
        bwd_corr_kernel<Acc><<<unsigned(ceil_div(p.n, kThreads)), kThreads, 0, stream>>>(ra);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }

      da.kc = kc;
      da.c0 = c0;
      const dim3 grid_dw(unsigned(l.d_tiles), unsigned(ceil_div(kc, C::BM)),
                         unsigned(p.subcenters));
      if constexpr (kWgmmaType<T>) {
        if (dw90) {
          const auto kernel = bwd_gemm_sm90_kernel<T, DwSm90<T>>;
          const DwSm90<T> epi{da};
          kernel<<<grid_dw, G90::kThreads, G90::kSmemBytes, stream>>>(map_dw_a, map_dw_b, epi);
        }
      }
      if (!dw90 && !fused) {
        bwd_dw_kernel<T><<<grid_dw, kThreads, GemmDw::kSmemBytes, stream>>>(da);
      }
      if ((err = cudaGetLastError()) != cudaSuccess) return err;

      xa.kc = kc;
      xa.chunk_index = p.class_index != nullptr ? p.class_index + c0 : nullptr;
      const dim3 grid_dx(unsigned(l.dx_d_tiles), unsigned(l.row_tiles), unsigned(l.splits));
      for (int64_t k = 0; k < p.subcenters; ++k) {  // in order: the partials' sums are fixed
        xa.scratch = buf.scratch + k * l.cc;
        xa.weight_chunk = in.weight + (p.class_index != nullptr ? k : c0 * p.subcenters + k) * p.d;
        xa.accumulate = chunk > 0 || k > 0;
        if constexpr (kWgmmaType<T>) {
          if (dx90) {
            // dS' block k: kc classes x n rows (pitch ld); W: the chunk's kc rows of
            // sub-center k, d wide (pitch K·d).
            CUtensorMap map_a, map_b;
            if ((err = encode_tma_2d_b16(&map_a, bf16, xa.scratch, kc, p.n, l.ld * 2,
                                         G90::BM)) != cudaSuccess ||
                (err = encode_tma_2d_b16(&map_b, bf16, xa.weight_chunk, p.d, kc,
                                         p.subcenters * p.d * 2, G90::BK)) != cudaSuccess) {
              return err;
            }
            if (l.dx_bn == 256) {
              launch_gemm_sm90<T>(grid_dx, map_a, map_b, DxSm90<T, 256>{xa}, stream);
            } else {
              launch_gemm_sm90<T>(grid_dx, map_a, map_b, DxSm90<T, 128>{xa}, stream);
            }
          }
        }
        if (!dx90) bwd_dx_kernel<T><<<grid_dx, kThreads, GemmDx::kSmemBytes, stream>>>(xa);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }

    FinalizeArgs<T> fa;
    fa.x = in.x;
    fa.d = p.d;
    fa.n_pad = l.n_pad;
    fa.d_pad = l.d_pad;
    fa.x_norm = buf.x_norm;
    fa.scale = buf.scale;
    fa.part = buf.part;
    fa.splits = l.splits;
    fa.t_corr = buf.t_corr;
    fa.feature_scale = p.margin.feature_scale;
    fa.grad_x = static_cast<T*>(p.grad_x);
    bwd_finalize_kernel<T><<<unsigned(p.n), kThreads, 0, stream>>>(fa);
    return cudaGetLastError();
  }
};

}  // namespace

size_t backward_workspace_bytes(const BackwardParams& p) {
  return pass_workspace_bytes<Backward>(p);
}

cudaError_t launch_margin_lse_backward(const BackwardParams& p, cudaStream_t stream) {
  return launch_pass<Backward>(p, stream);
}

}  // namespace cuda
}  // namespace margin_ops
