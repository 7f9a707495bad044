// The forward's main kernel for sm_90a (H100 / H200), bf16 and fp16: fwd_main_sm90_kernel,
// the replacement of fwd_main_kernel (margin_lse_forward.cu) where sm90_forward_eligible
// holds, and its host side (tensor maps, launch; declared in margin_lse_forward_sm90.cuh).
// Same grid, same split partials, same epilogue math (margin_lse_epilogue.cuh) as
// fwd_main_kernel; the cosine tiles come from the sm_90a engine of
// margin_lse_sm90_mainloop.cuh (TMA into a resident x tile and a W ring, mbarriers, two
// consumer warpgroups of wgmma.m64n128k16, W norms from the ring stages):
//
//   * Epilogue per tile and row: Epilogue<WgmmaFrag> of margin_lse_epilogue.cuh; a row
//     belongs to the 4 lanes of one quad in one consumer warp, so its running (max, sum-exp),
//     Σ F and (max cosine, class) stay in registers per lane (online: the lane's running max
//     is the reference of its sum) and are merged over the quad once, at the end, then
//     written by lane 0 as the (split, row) partial: no shuffles or shared memory per tile.
//   * Schedule (issue 11): the epilogue overlaps the next tile's MMA inside each consumer
//     warpgroup (FlashAttention-3's intra-warpgroup overlap rather than its ping-pong: the
//     two warpgroups keep sharing each class tile, so a row's statistics stay in one lane
//     quad and their order, hence every bit of the partials, is that of a serial walk).
//     Each consumer thread holds two accumulator sets (acc0 / acc1, 2 x 64 fp32) used by
//     alternate tiles; per tile t: finish() its remaining k-blocks (wait_group 1 after each,
//     the stage released), share_norms(t), begin<2>() tile t + 1 into the other set (its
//     first 2 k-blocks: wait full, 4 wgmma, commit, no wait), then tile t's epilogue while
//     the tensor cores run those 8 wgmmas. begin() follows share_norms(t), whose barrier
//     every consumer passes only after releasing tile t's stages, so the stages it waits
//     for can always be loaded. Two k-blocks: with 4 ring stages, 2 stay free for the
//     producer's TMA during the epilogue.
//     SASS (sm_90a, bf16, plain; nvcc -cubin, cuobjdump): 168 registers reported (the
//     consumers use up to R229 of setmaxnreg's 232), 0 spills, HGMMA chained (no
//     serialization, no C7515 / C7517); per warp and 128 x 128 x 512 tile, the k-block loop
//     body 182 -> 179 instructions (≈ 1440 per tile for the 8 k-blocks, 2 of them now
//     straight-line in begin()), the epilogue ≈ 600 + 64 MOVs (the copy below: ptxas keeps
//     the epilogue's in-place cosines out of the in-flight set's pipeline stage).
//     Estimate per SM sub-partition (one warp of each consumer warpgroup; H100/H200 dense
//     16-bit wgmma ≈ 2048 FMA / clock / SM, so one m64n128k16 ≈ 64 clocks of the SM's
//     tensor cores): a tile's 2 x 32 wgmmas ≈ 4096 clocks, under which the ≈ 2 x 1440
//     mainloop instructions issue; the epilogue ≈ 2 x 660 issue slots (its 2 x 64 MUFU.EX2
//     ≈ 1024 clocks at 4 lanes / clock fit inside them) ≈ 1300 clocks. Before: ≈ 4096 +
//     1300 ≈ 5400 clocks per tile (tensor cores idle ≈ 24%). Now the look-ahead keeps
//     2 warpgroups x 2 k-blocks x 4 wgmma ≈ 1024 clocks of MMA queued during the epilogue:
//     ≈ 300 clocks stay exposed, and the sub-partition's issue (≈ 2 x 1440 + 1300 ≈ 4200
//     slots per tile) becomes the bound: ≈ 4200-4400 clocks per tile, ≈ 1.2x on fwd_main.
//     A PREDICTION from instruction counts, not a measurement (no GPU session yet).
#include <cuda.h>  // CUtensorMap (types only: no -lcuda)
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "margin_lse_dtype.cuh"
#include "margin_lse_epilogue.cuh"
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
struct FwdSm90Tail {
  MarginParams margin;
};

// The consumer's running statistics of one row (one lane's columns, merged over the quad
// at the end).
struct RowRun {
  float m, s, nts, best;
  int32_t idx;
};

template <class T, bool kHard>
__global__ void __launch_bounds__(Sm90Cfg::kThreads, 1)
    fwd_main_sm90_kernel(const __grid_constant__ CUtensorMap tmap_x,
                         const __grid_constant__ CUtensorMap tmap_w, const FwdArgs<T> args) {
#if MARGIN_OPS_SM90A
  using G = Sm90Cfg;
  using Epi = Epilogue<WgmmaFrag, kHard>;
  constexpr float kLog2e = Consts<float>::kLog2e;
  const float kNegInf = neg_inf(0.f);

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int kb_count = int(G::k_blocks(args.in.d));
  const Sm90Mainloop<T> ml{Sm90Smem::carve(smem_raw, kb_count, G::kMaxStages), kb_count,
                           G::kMaxStages};
  MarginParams* s_margin = &reinterpret_cast<FwdSm90Tail*>(ml.sm.tail)->margin;

  const int tid = threadIdx.x;
  const auto wk = args.work(blockIdx.x, G::BM);

  if (tid == 0) {
    ml.init();
    *s_margin = args.margin;
  }
  __syncthreads();

  if (tid < 128) {  // producer warpgroup
    setmaxnreg_dec<G::kProducerRegs>();
    if (tid == 0) ml.produce(tmap_x, tmap_w, int(wk.row0), wk.ct_begin * G::BN, wk.ct_end - wk.ct_begin);
    return;
  }

  setmaxnreg_inc<G::kConsumerRegs>();
  const int ctid = tid - 128;  // consumer thread 0..255
  const int lane = tid & 31;
  const int wm0 = (ctid >> 5) * 16;  // the warp's 16 rows of the CTA tile

  RowFactors<float> rf[WgmmaFrag::TR];
  int32_t label[WgmmaFrag::TR];
  RowRun run[WgmmaFrag::TR];
#pragma unroll
  for (int ri = 0; ri < WgmmaFrag::TR; ++ri) {
    const int64_t gr = wk.row0 + wm0 + WgmmaFrag::row(ri, lane);
    float sc = 0.f, xi = 0.f, thr = 2.f, ht = 0.f;
    int32_t y = -1;
    if (gr < args.in.n) {
      sc = args.scale[gr];
      xi = inverse_norm(args.x_norm[gr]);
      const int64_t lab = args.in.labels[gr];
      if (lab >= 0 && lab < args.in.c) y = int32_t(lab);
      if constexpr (kHard) {
        thr = args.in.hard_threshold[gr];
        ht = args.in.hard_t[gr];
      }
    }
    rf[ri] = RowFactors<float>{sc, sc * kLog2e, xi, thr, ht};
    label[ri] = y;
    run[ri] = RowRun{kNegInf, 0.f, 0.f, kNegInf, 0};
  }

  // The epilogue of class tile ct from its accumulators and 1 / ‖w_c‖ (inv). It works on a
  // copy: the epilogue rewrites its values in place (the cosines), and ptxas serializes
  // every wgmma of the kernel (C7515: "non wgmma instructions defining accumulator registers
  // ... between start and end of the pipeline stage") when that happens to wgmma
  // accumulator registers while the other set's wgmmas are in flight. The copy costs 64
  // MOVs per tile (ptxas places it outside the sets) and no spills; the set itself is dead
  // until the next tile's first wgmma, which only writes it (wgmma_m64n128k16_ss_zero).
  const auto epilogue = [&](const float (&acc_in)[64], int64_t ct, const float* inv) {
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc_in[i];
    const int64_t col0 = ct * G::BN;
    const bool interior = col0 + G::BN <= args.in.c;
    const int c_lim = int(args.in.c - col0 < G::BN ? args.in.c - col0 : G::BN);
#pragma unroll
    for (int ri = 0; ri < WgmmaFrag::TR; ++ri) {
      const int64_t gr = wk.row0 + wm0 + WgmmaFrag::row(ri, lane);
      const int64_t yt = int64_t(label[ri]) - col0;
      const int yl = label[ri] >= 0 && yt >= 0 && yt < G::BN ? int(yt) : -1;
      const RowShare<float> sh = Epi::template share<true>(
          acc, ri, lane, rf[ri], inv, interior, c_lim, yl, s_margin, [&](float phi) {
            if (gr < args.in.n) args.target_logit[gr] = rf[ri].scale * phi;
          });
      RowRun& r = run[ri];
      const float m = vmax(r.m, sh.l2max);
      const float sum = Epi::sum_exp(acc, ri, lane, rf[ri], sh, c_lim, yl, m);
      r.s = m == kNegInf ? r.s + sum : fma(r.s, fast_exp2(r.m - m), sum);
      r.m = m;
      r.nts += sh.nts;
      Epi::argmax(acc, ri, lane, sh, c_lim, col0, r.best, r.idx);
    }
  };

  // The overlap (header comment): per tile t, finish its k-blocks (begun during tile
  // t - 1's epilogue), share its norms, begin tile t + 1's first kFwdAhead k-blocks into the
  // other accumulator set and run tile t's epilogue while the tensor cores work on them.
  // The two sets alternate by tile, so the walk is unrolled by two (registers cannot be
  // indexed at run time). Same k-block order per tile, same epilogue order: the partials
  // are bitwise those of the unoverlapped schedule.
  constexpr int kFwdAhead = 2;  // the next tile's k-blocks issued before an epilogue
  using Ml = Sm90Mainloop<T>;
  typename Ml::TileIssue ti;
  RingPos pos;
  const auto step = [&](float (&cur)[64], float (&nxt)[64], int64_t ct, int t) {
    float nrm;
    const float* inv = ml.share_norms(t, ml.finish(cur, pos, ti, ctid), ctid, nrm);
    if (ct + 1 < wk.ct_end) ti = ml.template begin<kFwdAhead>(nxt, pos, ctid);
    epilogue(cur, ct, inv);
  };

  ml.wait_x();
  float acc0[64], acc1[64];
  if (wk.ct_begin < wk.ct_end) ti = ml.template begin<kFwdAhead>(acc0, pos, ctid);
  int t = 0;  // tile count (the norms buffers' use)
  for (int64_t ct = wk.ct_begin; ct < wk.ct_end; ct += 2, t += 2) {
    step(acc0, acc1, ct, t);
    if (ct + 1 >= wk.ct_end) break;
    step(acc1, acc0, ct + 1, t + 1);
  }
  // Nothing is in flight here (the last step begins nothing), but ptxas cannot pair the
  // steps' conditions and would inject this wait itself (C7517) at the first reuse of the
  // registers of a set it believes in flight.
  wgmma_wait_group<0>();

  // Merge each row's 4 lanes (lane bits 0-1, in increasing order) and write its partial.
#pragma unroll
  for (int ri = 0; ri < WgmmaFrag::TR; ++ri) {
    RowRun& r = run[ri];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      merge_lse(r.m, r.s, __shfl_xor_sync(0xffffffffu, r.m, off),
                __shfl_xor_sync(0xffffffffu, r.s, off));
    }
    r.nts = lanes_sum<0, 2>(r.nts);
    lanes_best<0, 2>(r.best, r.idx);
    const int64_t gr = wk.row0 + wm0 + WgmmaFrag::row(ri, lane);
    if ((lane & 3) == 0 && gr < args.in.n) {
      const int64_t o = wk.split * args.n_pad + gr;
      args.part_max[o] = r.m;
      args.part_sum[o] = r.s;
      args.part_cos[o] = r.best;
      args.part_idx[o] = r.idx;
      args.part_nts[o] = r.nts;
    }
  }
#else
  __trap();  // sm_90a only: sm90_forward_eligible never picks this kernel elsewhere
#endif
}

}  // namespace dev

namespace {

using G = dev::Sm90Cfg;
constexpr size_t kTail = sizeof(dev::FwdSm90Tail);
static_assert(G::BM == kSm90TileRows && G::BN == kSm90TileClasses, "fwd_main_kernel's tile");

}  // namespace

bool sm90_forward_eligible(const ProblemParams& p) {
  return p.arch == 90 && (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) &&
         p.subcenters == 1 && p.class_index == nullptr && (p.d * 2) % 16 == 0 &&
         dev::aligned16(p.x) && dev::aligned16(p.weight) && G::stages_for(p.d, kTail) == G::kMaxStages;
}

template <class T>
cudaError_t launch_fwd_main_sm90(const ProblemParams& p, const dev::FwdArgs<T>& args,
                                 unsigned grid, cudaStream_t stream) {
  CUtensorMap tmap_x, tmap_w;
  const bool bf16 = p.dtype == DType::kBFloat16;
  cudaError_t err = encode_tma_2d_b16(&tmap_x, bf16, p.x, p.d, p.n, p.d * 2, G::BM);
  if (err == cudaSuccess) err = encode_tma_2d_b16(&tmap_w, bf16, p.weight, p.d, p.c, p.d * 2, G::BN);
  if (err != cudaSuccess) return err;
  const size_t smem = G::smem_bytes(p.d, G::kMaxStages, kTail);
  const auto kernel = p.hard_threshold != nullptr ? dev::fwd_main_sm90_kernel<T, true>
                                                  : dev::fwd_main_sm90_kernel<T, false>;
  if ((err = dev::allow_smem(kernel, smem)) != cudaSuccess) return err;
  kernel<<<grid, G::kThreads, smem, stream>>>(tmap_x, tmap_w, args);
  return cudaGetLastError();
}

template cudaError_t launch_fwd_main_sm90<__nv_bfloat16>(const ProblemParams&,
                                                         const dev::FwdArgs<__nv_bfloat16>&,
                                                         unsigned, cudaStream_t);
template cudaError_t launch_fwd_main_sm90<__half>(const ProblemParams&, const dev::FwdArgs<__half>&,
                                                  unsigned, cudaStream_t);

}  // namespace cuda
}  // namespace margin_ops
