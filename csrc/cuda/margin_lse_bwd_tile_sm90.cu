// The backward's recompute kernel for sm_90a (H100 / H200), bf16 and fp16:
// bwd_tile_sm90_kernel, the replacement of bwd_tile_kernel (margin_lse_backward.cu) where
// sm90_bwd_tile_eligible holds, and its host side (declared in margin_lse_bwd_tile_sm90.cuh).
// Same outputs as bwd_tile_kernel for a class chunk (dS' into the scratch, r_part per (row
// tile, class), w_norm from row tile 0, corr_part per (class tile, row)), so that bwd_corr,
// bwd_dw, bwd_dx and finalize are unchanged; same per-element math
// (GradEpilogue<WgmmaFrag> of margin_lse_bwd_epilogue.cuh); the cosine tiles come from the
// forward's sm_90a engine (margin_lse_sm90_mainloop.cuh), so x's row tile is loaded once
// per CTA and stays resident while the CTA walks its range of the chunk's class tiles.
//
//   * Grid: (row tile, class-tile range) flattened as split·row_tiles + rt, so that the
//     CTAs reading the same W tiles are adjacent in launch order (W from L2 after the first
//     row tile); about one CTA per SM (one fits: 384 threads x 168 registers fill the
//     register file).
//   * Per tile, after the engine's products and 1 / ‖w_c‖: row tile 0's norm threads write
//     w_norm; each consumer thread turns its 2 rows x 32 columns into dS' in place and
//     stores them as 4-byte column pairs (rows past n and classes past C as zeros, as
//     bwd_tile_kernel); the row's feature-scale term is summed over its quad and written by
//     lane q = 0 to corr_part[tile, row] (no shared memory); the column sums of dc·ĉ are
//     reduce-scattered over each warp's 8 row groups (28 shuffles: lane 4g + q keeps 4
//     columns), staged per warp in shared memory, and after an mbarrier of the 256 consumers
//     summed over the 8 warps in row order by 128 threads into r_part[rt, class]. The
//     staging buffer is single: its next writes follow the next tile's norms barrier, which
//     every consumer passes only after this tile's reads.
//   * Shared memory: the engine's (x tile, ring, barriers, 1 / ‖w‖) + this kernel's tail
//     (4 KiB of column sums, an mbarrier, the margin); the ring has 4 stages, 3 at
//     577 <= D <= 640 where 4 would exceed 227 KiB.
//   * Deterministic: fixed shuffle and warp orders, each output element written by one
//     thread of one CTA, no atomics.
#include <cuda.h>  // CUtensorMap (types only: no -lcuda)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "margin_lse_bwd_epilogue.cuh"
#include "margin_lse_bwd_tile_sm90.cuh"
#include "margin_lse_dtype.cuh"
#include "margin_lse_forward_sm90.cuh"
#include "margin_lse_layout.cuh"
#include "margin_lse_norms.cuh"
#include "margin_lse_ptx.cuh"
#include "margin_lse_reduce.cuh"
#include "margin_lse_sm90_mainloop.cuh"
#include "margin_lse_tma.cuh"

namespace margin_ops {
namespace cuda {
namespace dev {

// The kernel's part of the engine's shared memory (Sm90Smem::tail).
struct BwdTileSm90Tail {
  float r[Sm90Cfg::kConsumers / 32][Sm90Cfg::BN];  // per consumer warp: its 16 rows' column sums
  uint64_t r_full;  // every consumer warp's column sums staged (256 arrivals per tile)
  MarginParams margin;
};
static_assert(sizeof(BwdTileSm90Tail) + Sm90Cfg::kEngineTail <= Sm90Cfg::kBlockBytes,
              "the tail costs at most one ring stage: 3 stages wherever the forward has 4");

// The CTA's walk: row tile rt = blockIdx.x % row_tiles and the class tiles [split·per_split,
// min((split + 1)·per_split, tiles)) of the chunk, split = blockIdx.x / row_tiles.
struct BwdTileSm90Walk {
  int row_tiles;
  int stages;  // W ring depth
  int64_t tiles, per_split;
};

// One step of a reduce-scatter of per-lane column sums over lane bit kHalf (16, 8 or 4):
// the lanes with the bit set keep v[kHalf .. 2·kHalf), the others v[0 .. kHalf), each adding
// its partner's copy of the kept half, into v[0 .. kHalf).
template <int kHalf>
__device__ __forceinline__ void reduce_scatter_half(float (&v)[32], int lane) {
  const bool upper = (lane & kHalf) != 0;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float keep = upper ? v[kHalf + j] : v[j];
    const float give = upper ? v[j] : v[kHalf + j];
    v[j] = keep + __shfl_xor_sync(0xffffffffu, give, kHalf);
  }
}

template <class T, bool kHard>
__global__ void __launch_bounds__(Sm90Cfg::kThreads, 1)
    bwd_tile_sm90_kernel(const __grid_constant__ CUtensorMap tmap_x,
                         const __grid_constant__ CUtensorMap tmap_w, const TileArgs<T> args,
                         const BwdTileSm90Walk walk) {
#if MARGIN_OPS_SM90A
  using G = Sm90Cfg;
  using F = WgmmaFrag;
  using Epi = GradEpilogue<F, kHard>;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int kb_count = int(G::k_blocks(args.in.d));
  const Sm90Mainloop<T> ml{Sm90Smem::carve(smem_raw, kb_count, walk.stages), kb_count,
                           walk.stages};
  BwdTileSm90Tail* tail = reinterpret_cast<BwdTileSm90Tail*>(ml.sm.tail);

  const int tid = threadIdx.x;
  const int rt = int(blockIdx.x % unsigned(walk.row_tiles));
  const int64_t split = blockIdx.x / unsigned(walk.row_tiles);
  const int64_t row0 = int64_t(rt) * G::BM;
  const int64_t ct_begin = split * walk.per_split;
  const int64_t ct_end =
      ct_begin + walk.per_split < walk.tiles ? ct_begin + walk.per_split : walk.tiles;

  if (tid == 0) {
    mbarrier_init(&tail->r_full, G::kConsumers);
    tail->margin = args.margin;
    ml.init();
  }
  __syncthreads();

  if (tid < 128) {  // producer warpgroup
    setmaxnreg_dec<G::kProducerRegs>();
    if (tid == 0) {
      ml.produce(tmap_x, tmap_w, int(row0), args.c0 + ct_begin * G::BN, ct_end - ct_begin);
    }
    return;
  }

  setmaxnreg_inc<G::kConsumerRegs>();
  const int ctid = tid - 128;  // consumer thread 0..255
  const int lane = tid & 31, cwarp = ctid >> 5;
  const int wm0 = cwarp * 16;  // the warp's 16 rows of the CTA tile
  const bool external = args.margin.kind == MarginKind::External;
  const bool fs = args.margin.feature_scale;

  // The factors of the thread's 2 rows.
  RowInputs<kHard> row[F::TR];
#pragma unroll
  for (int ri = 0; ri < F::TR; ++ri)
    row[ri] = load_row_inputs<kHard>(args, row0 + wm0 + F::row(ri, lane));

  ml.wait_x();
  RingPos pos;
  int t = 0;  // tile count (the norms buffers' and r_full's use)
  for (int64_t ct = ct_begin; ct < ct_end; ++ct, ++t) {
    const int64_t ct_local0 = ct * G::BN;         // first column, chunk-local
    const int64_t col0 = args.c0 + ct_local0;     // first column, global
    float acc[64];
    float nrm;
    const float* inv = ml.share_norms(t, ml.products(acc, pos, ctid), ctid, nrm);
    if (rt == 0 && (ctid & 1) == 0) args.w_norm[ct_local0 + (ctid >> 1)] = nrm;

    const bool interior = col0 + G::BN <= args.in.c;
    const int c_lim = int(args.in.c - col0 < G::BN ? args.in.c - col0 : G::BN);
    float rsum[F::TC];
#pragma unroll
    for (int ci = 0; ci < F::TC; ++ci) rsum[ci] = 0.f;
#pragma unroll
    for (int ri = 0; ri < F::TR; ++ri) {
      const int64_t gr = row0 + wm0 + F::row(ri, lane);
      const bool row_ok = gr < args.in.n;
      const int64_t yt = int64_t(row[ri].label) - col0;
      const int yl = row[ri].label >= 0 && yt >= 0 && yt < G::BN ? int(yt) : -1;
      float corr = 0.f;
      Epi::row(acc, ri, lane, row[ri].g, row[ri].xinv, inv, interior && row_ok,
               row_ok ? c_lim : 0, yl, row[ri].gt, &tail->margin, external, fs, rsum, corr);
      // dS' of the row: columns 8j + 2q, 8j + 2q + 1 as one 4-byte store per j.
      T* out = args.scratch + gr * args.ld + ct_local0 + 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < F::TC / 2; ++j) {
        const T pair[2] = {Type<T>::store(F::at(acc, ri, 2 * j)),
                           Type<T>::store(F::at(acc, ri, 2 * j + 1))};
        uint32_t bits;
        memcpy(&bits, pair, sizeof(bits));
        *reinterpret_cast<uint32_t*>(out + 8 * j) = bits;
      }
      if (fs) {  // uniform
        corr = lanes_sum<0, 2>(corr);
        if ((lane & 3) == 0) args.corr_part[ct * args.n_pad + gr] = corr;
      }
    }

    // Column sums over the warp's 16 rows, reduce-scattered over the row groups g (lane bits
    // 4, 3, 2): lane 4g + q ends with ci = 4g .. 4g + 3 in rsum[0..3], i.e. columns 16g + 2q
    // (+1) and 16g + 8 + 2q (+1).
    reduce_scatter_half<16>(rsum, lane);
    reduce_scatter_half<8>(rsum, lane);
    reduce_scatter_half<4>(rsum, lane);
    float* r_row = tail->r[cwarp] + 16 * (lane >> 2) + 2 * (lane & 3);
    *reinterpret_cast<float2*>(r_row) = make_float2(rsum[0], rsum[1]);
    *reinterpret_cast<float2*>(r_row + 8) = make_float2(rsum[2], rsum[3]);
    mbarrier_arrive(&tail->r_full);
    mbarrier_wait_parity(&tail->r_full, unsigned(t) & 1u);
    if (ctid < G::BN) {  // column ctid, summed over the warps in row order
      float r = tail->r[0][ctid];
#pragma unroll
      for (int w = 1; w < G::kConsumers / 32; ++w) r += tail->r[w][ctid];
      args.r_part[int64_t(rt) * args.ld + ct_local0 + ctid] = r;
    }
  }
#else
  __trap();  // sm_90a only: sm90_bwd_tile_eligible never picks this kernel elsewhere
#endif
}

}  // namespace dev

namespace {

using G = dev::Sm90Cfg;
constexpr size_t kTail = sizeof(dev::BwdTileSm90Tail);

}  // namespace

bool sm90_bwd_tile_eligible(const ProblemParams& p) {
  return sm90_forward_eligible(p) && G::stages_for(p.d, kTail) >= 2;
}

template <class T>
cudaError_t prepare_bwd_tile_sm90(const ProblemParams& p, XwTensorMaps& maps) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  cudaError_t err = encode_tma_2d_b16(&maps.x, bf16, p.x, p.d, p.n, p.d * 2, G::BM);
  if (err == cudaSuccess) err = encode_tma_2d_b16(&maps.w, bf16, p.weight, p.d, p.c, p.d * 2, G::BN);
  if (err != cudaSuccess) return err;
  const size_t smem = G::smem_bytes(p.d, G::stages_for(p.d, kTail), kTail);
  const auto kernel = p.hard_threshold != nullptr ? dev::bwd_tile_sm90_kernel<T, true>
                                                  : dev::bwd_tile_sm90_kernel<T, false>;
  return dev::allow_smem(kernel, smem);
}

template <class T>
cudaError_t launch_bwd_tile_sm90(const ProblemParams& p, const XwTensorMaps& maps,
                                 const dev::TileArgs<T>& args, int row_tiles, int64_t kc,
                                 cudaStream_t stream) {
  // About one CTA per SM: split the chunk's class tiles over ceil(#SMs / row tiles) CTAs
  // per row tile (at most one per tile).
  dev::BwdTileSm90Walk walk;
  walk.row_tiles = row_tiles;
  walk.stages = G::stages_for(p.d, kTail);
  walk.tiles = dev::ceil_div(kc, G::BN);
  const int64_t sms = p.num_sms > 0 ? p.num_sms : 1;
  const int64_t splits = std::min(walk.tiles, dev::ceil_div(sms, row_tiles));
  walk.per_split = dev::ceil_div(walk.tiles, splits);
  const unsigned grid = unsigned(row_tiles * dev::ceil_div(walk.tiles, walk.per_split));
  const size_t smem = G::smem_bytes(p.d, walk.stages, kTail);
  const auto kernel = p.hard_threshold != nullptr ? dev::bwd_tile_sm90_kernel<T, true>
                                                  : dev::bwd_tile_sm90_kernel<T, false>;
  kernel<<<grid, G::kThreads, smem, stream>>>(maps.x, maps.w, args, walk);
  return cudaGetLastError();
}

template cudaError_t prepare_bwd_tile_sm90<__nv_bfloat16>(const ProblemParams&, XwTensorMaps&);
template cudaError_t prepare_bwd_tile_sm90<__half>(const ProblemParams&, XwTensorMaps&);
template cudaError_t launch_bwd_tile_sm90<__nv_bfloat16>(const ProblemParams&, const XwTensorMaps&,
                                                         const dev::TileArgs<__nv_bfloat16>&, int,
                                                         int64_t, cudaStream_t);
template cudaError_t launch_bwd_tile_sm90<__half>(const ProblemParams&, const XwTensorMaps&,
                                                  const dev::TileArgs<__half>&, int, int64_t,
                                                  cudaStream_t);

}  // namespace cuda
}  // namespace margin_ops
