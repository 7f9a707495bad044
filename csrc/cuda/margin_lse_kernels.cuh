// CUDA kernels of the fused primitive margin_lse / margin_lse_backward: the plain
// parameter structs and the launchers. No torch headers: the kernels compile with bare
// nvcc (CI does so for sm_80 and sm_90a); csrc/cuda/margin_lse_cuda.cpp is the torch glue
// that checks arguments, allocates outputs and the workspace, fills these structs and
// launches on the current stream.
//
// Shapes (all tensors contiguous, row-major): x (N, D) and weight (R, D) of one dtype T
// (float16, bfloat16, float32, float64); labels (N,) int64, a label outside [0, C) meaning
// "no target"; K sub-centers per class: class j has W's rows r_j·K + k, k < K, its cosine
// the largest of theirs (the first on ties); class_index (C,) int64 or none: r_j =
// class_index[j] (else j, C = R / K), read in place (the tile loads gather the rows, the dW
// stores scatter them; no copy of W). Per-row statistics, upstream gradients and hard_threshold / hard_t are (N,) of the
// accumulation type Acc: float, or double for float64 inputs. The math is
// margin_ops/reference.py (margin_lse) and docs/design.md §1; the margin φ, its slope and the
// hard-example modulation of the non-target logits come from csrc/margin_math.h.
//
// ---------------------------------------------------------------------------------------
// Design (the algorithm: docs/design.md §2)
// ---------------------------------------------------------------------------------------
// Files: this header (parameters, launchers), margin_lse_forward.cu, margin_lse_forward_sm90.cu
// (+ .cuh: its host entry), margin_lse_backward.cu, margin_lse_bwd_tile_sm90.cu,
// margin_lse_bwd_fused_sm90.cu and margin_lse_bwd_fused_sm80.cu (+ .cuh: their host entries),
// and the device headers they share:
// margin_lse_epilogue.cuh (the forward main kernels' arguments and per-tile epilogue),
// margin_lse_bwd_epilogue.cuh (bwd_tile's arguments and per-element gradient epilogue),
// margin_lse_sm90_mainloop.cuh (the sm_90a engine of both passes' cosine tiles),
// margin_lse_gemm_sm90.cuh (the sm_90a mainloop of the backward's dW / dX GEMMs),
// margin_lse_wgmma_desc.cuh (wgmma shared-memory descriptors), margin_lse_tma.cuh (tensor maps),
// margin_lse_dtype.cuh (element types, scalar helpers),
// margin_lse_tile_gemm.cuh (tile loads, the CTA GEMM, the cosine tile), margin_lse_reduce.cuh
// (warp and block reductions, the log-sum-exp and argmax merges), margin_lse_norms.cuh
// (inverse norms, the prep kernel), margin_lse_layout.cuh (host sizes, workspace carving),
// margin_lse_ptx.cuh (the PTX). launch_params.h fills the parameters from tensors.
//
// One generic CTA tile engine (margin_lse_tile_gemm.cuh): a BM x BN output tile of
// A (M x K) * B (K x N) with either operand stored K-contiguous or M/N-contiguous in
// global memory, streamed through a 3-stage cp.async pipeline into padded (bank-conflict
// free) shared-memory tiles, bounds- and alignment-guarded (zero fill; a scalar path when
// a row is not 16-byte aligned, e.g. D % 8 != 0 in 16-bit).
//   * bf16/fp16: mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix(.trans);
//     CTA tile 128 x 128 x 32, 8 warps as 2 x 4, warp tile 64 x 32.
//   * fp32 under float32_matmul_precision "highest": SIMT FFMA (fp32-exact), 128 x 128 x 16.
//   * fp32 under "high"/"medium" (kFloat32Tf32): mma.sync.m16n8k8 on TF32 operands rounded
//     from fp32 as each lane reads its fragment elements from shared memory (ldmatrix moves
//     16-bit elements only), 128 x 128 x 16, the bf16 warp layout. W norms, the epilogue and
//     the dS' scratch stay fp32.
//   * fp64: SIMT DFMA, 64 x 64 x 16. Simple and correct, not tuned.
// Every kernel uses 256 threads. Epilogues see each thread's accumulator as TR x TC values
// with (row(ri), col(ci)) coordinates; lanes sharing a row differ in lane bits 0-1, lanes
// sharing a column in bits 2-4, for both the mma and the SIMT layouts.
//
// Normalization happens in the epilogue, on neither operand: the cos GEMM multiplies x and
// W as given, and the cosine is acc * (1 / max(‖x_i‖, eps)) * (1 / max(‖w_c‖, eps)) in
// fp32. Rounding x̂ = x / ‖x‖ to T before a 16-bit MMA would shift every cosine by up to
// 2^-9 (bf16), i.e. the logits by up to s * 2^-9 ≈ 0.1 at s = 64: far above the fp32-level loss
// the CPU kernel and the reference give for the same rounded inputs. ‖x_i‖ comes from a
// prep kernel, ‖w_c‖² is accumulated by the CTA from the W tile already in shared memory,
// stage by stage, during the cos GEMM: W is never normalized in memory. Only the
// backward's dW GEMM needs x̂ as an operand; prep writes it there into a zero-padded
// (N_pad x D_pad) workspace of dtype T (N_pad = roundup(N, 128), D_pad = roundup(D, 128);
// 0.5 MB at N = D = 512 in 16-bit, 1 MB in float32).
//
// Forward (3 launches):
//   prep      ‖x‖, s_i (s, or ‖x_i‖ with feature_scale); target_logit = 0 for rows with
//             no target.
//   fwd_main  grid (row tile, class split): a CTA keeps one row tile of BM rows and walks a
//             contiguous range of BN-class tiles (CTAs with the same split are adjacent in
//             launch order, so a W tile comes from HBM once and from L2 for the other row
//             tiles). Per tile: cos GEMM (+ W norms), margin on the target entry only, the
//             hard-example factor F(c) on the others, the row's (max, sum-exp) in the log2
//             domain (without the target for margin "external"), (max cos, argmax) and Σ F
//             of the non-targets reduced over the 4 lanes sharing it (shuffles), then folded
//             by one owner lane into running statistics in shared memory, one slot per (warp
//             column, row): no barrier per tile. The thread owning (i, y_i) writes
//             target_logit_i. At the end the warps' slots are merged in warp order and
//             written as one partial per (split, row). The per-row epilogue math is
//             margin_lse_epilogue.cuh's (shared with fwd_main_sm90): interior tiles without
//             per-element bounds checks, s_i·log2 e folded into one FFMA per element, the
//             target handled per row (a rare variant compares columns with it), the argmax
//             searched only when a lane's largest cosine beats the running one.
//   fwd_main_sm90  replaces fwd_main on compute capability 9.0 (ProblemParams::arch, from
//             the device; sm90_forward_eligible): bf16/fp16, subcenters == 1, no
//             class_index, d·2 a multiple of 16, 16-byte aligned x and W, and x's 128-row tile
//             resident in shared memory beside a 4-stage W ring (<= 227 KiB: d <= 640).
//             Everything else (fp32, fp64, TF32, sub-centers, class_index, other devices)
//             keeps fwd_main (mma.sync / SIMT). Same grid, same partials, prep and combine
//             reused. The engine (margin_lse_sm90_mainloop.cuh, shared with bwd_tile_sm90):
//             TMA (cp.async.bulk.tensor.2d, 128B swizzle, tensor maps encoded by the launcher:
//             cuTensorMapEncodeTiled through cudaGetDriverEntryPointByVersion, no -lcuda,
//             margin_lse_tma.cuh) loads x once and W tiles into full/empty mbarrier ring stages; one
//             producer warpgroup (setmaxnreg.dec 40) issues them, two consumer warpgroups
//             (setmaxnreg.inc 232) each run wgmma.m64n128k16 (fp32 accumulate, both operands
//             K-major in shared memory through descriptors) for 64 rows, read the W norms
//             from the stage while the wgmmas run, and keep their rows' statistics in
//             registers, merged over the 4 lanes of a row once at the end. The epilogue
//             overlaps the MMA: each consumer warpgroup has two accumulator sets (128
//             registers) used by alternate class tiles; once tile t's wgmmas are done and
//             its norms shared, it issues tile t + 1's first 2 k-blocks into the other set
//             and runs tile t's epilogue while they execute, then issues the rest (same
//             k-block and epilogue order as a serial walk: the same bits; the SASS estimate,
//             about 1024 of ≈ 1300 epilogue clocks per tile hidden, is in
//             margin_lse_forward_sm90.cu; design details: margin_lse_sm90_mainloop.cuh).
//   combine   per row: merges the split partials in split order -> lse, max_cos, pred
//             (argmax of the clamped cosines, first class on ties, as the CPU kernel),
//             nontarget_sum = s_i Σ F.
//
// Backward: the classes are processed in chunks of `cc` classes (cc = the largest multiple
// of 128 with N_pad * cc * sizeof(T) <= 16 MiB, at least 128; e.g. 16384 at N = 512 in bf16,
// so 62 chunks at C = 1M). Per chunk, 3 launches (all stream-ordered, no host sync; 2 where
// bwd_fused_sm90 applies, below):
//   bwd_tile  grid (row tile, class tile): recompute the cos tile (+ W norms), form
//             dc = s_i * (g_lse * P + g_target * [c = y] + g_sum * [c != y]) * F'(c) (P = 0
//             at the target for "external"), store dS' = dc / ‖w_c‖ (dtype T) into an
//             N_pad x cc scratch, and per (row tile, class) the partial r_c = Σ_i dc_ic c_ic;
//             the row tile 0 CTA writes ‖w_c‖; with feature_scale, per (class tile, row) the
//             partial of finalize's correction (below).
//   bwd_tile_sm90  replaces bwd_tile where the forward's sm_90a kernel applies
//             (sm90_bwd_tile_eligible: sm90_forward_eligible's conditions), with exactly its
//             outputs (bwd_corr, bwd_dw, bwd_dx, finalize unchanged) and its per-element math
//             (GradEpilogue of margin_lse_bwd_epilogue.cuh, shared with bwd_tile's K = 1 path).
//             Its cosine tiles come from fwd_main_sm90's engine (TMA, mbarriers, wgmma, W norms
//             from the ring), so a CTA keeps x's row tile resident and walks a contiguous range
//             of the chunk's class tiles: grid (row tile, class range), about one CTA per SM.
//             dS' is stored from the accumulators as column pairs; corr_part per (class tile,
//             row) from the 4 lanes of a row; r_c per (row tile, class) reduce-scattered over a
//             warp's row groups (shuffles), then over the 8 consumer warps in shared memory in
//             row order after an mbarrier (design details: margin_lse_bwd_tile_sm90.cu). The
//             ring keeps 4 stages (3 at 577 <= d <= 640, where the kernel's 4 KiB of column
//             sums would exceed 227 KiB).
//   bwd_fused_sm90  replaces bwd_tile + bwd_dw (2 launches per chunk instead of 3: fused,
//             bwd_dx; + bwd_corr with feature_scale) where sm90_bwd_fused_eligible holds
//             (sm_90a, bf16/fp16, K = 1, no class_index, d % 64 == 0, d <= 512, 16-byte
//             aligned x / W / dW) and a chunk's 64-class tiles give at least 7/8 of the
//             SMs a CTA (Backward::sm90_fused: N <= 1024 on 132 SMs in bf16). A CTA owns 64 classes of the chunk, keeps their W rows
//             resident (TMA) and walks every 64-row tile of x (TMA, two buffers, full / empty
//             mbarriers; a producer warpgroup, two consumer warpgroups): S on wgmma m64n32 (32
//             classes per warpgroup), GradEpilogue as bwd_tile (dS' into the scratch for bwd_dx,
//             corr_part per (64-class tile, row)), dS' / ‖x_i‖ staged in shared memory as the
//             A operand of dW[64 classes, D] += (dS' / ‖x‖)ᵀ x_tile (wgmma, the same x k-blocks
//             read MN-major; each consumer warpgroup owns half of D in registers, up to
//             m64n256). r_c = Σ dc ĉ stays in registers over the walk; dW = acc − w_c r_c /
//             ‖w_c‖² is written once, as 16-byte stores of the CTA's 64 consecutive dW rows. So
//             dS' is written once and read once (by bwd_dx) per chunk, x̂, r_part and w_norm
//             are not needed. Where the chunk's class-tile count is even, pairs of tiles run
//             as 2-CTA clusters (kCtas = 2) that share each x tile by TMA multicast, each CTA
//             loading half its rows; both CTAs' consumers release a buffer (remote mbarrier
//             arrivals) before either refills it (design details: margin_lse_bwd_fused_sm90.cu).
//   bwd_fused replaces bwd_tile + bwd_dw on mma.sync where bwd_fused_sm90 does not run and
//             bwd_fused_eligible holds (bf16/fp16, K = 1, no class_index, d % 64 == 0,
//             d <= 512, 16-byte aligned x / W / dW, its shared memory within the device's
//             opt-in limit: every such d on sm_80, d <= 192 on sm_86/89), with the same 7/8-of-
//             the-SMs rule (Backward::fused_fills_sms). A CTA owns 64 classes, keeps their W
//             rows in padded shared memory (cp.async), double-buffers x row tiles of 64 rows
//             (32 at d > 384), computes S on mma.sync (ldmatrix), forms dS' with GradEpilogue,
//             stages dS' / ‖x‖ and accumulates dW[64, d] in registers with a second mma.sync on
//             the same x tile (ldmatrix.trans); dW is written once with 16-byte stores (design
//             details: margin_lse_bwd_fused_sm80.cu).
//   bwd_corr  feature_scale only: adds the chunk's class-tile partials to the per-row
//             correction, in tile order.
//   bwd_dw    dW (chunk) = dS'ᵀ x̂ − w_c r_c / ‖w_c‖²: GEMM with K = N over the scratch;
//             each dW element is written once (r_c is summed over row tiles in order), into
//             the class's W row.
//   bwd_dx    split-K GEMM dX̂ += dS' W(chunk) with S fixed splits of the chunk (W rows
//             gathered by class_index); CTA (D tile, row tile, split) owns partial[split] for
//             its tile and adds to it with a plain read-modify-write (the first chunk
//             stores). No atomics anywhere.
// then
//   finalize  per row: dX̂ = Σ_split partial (in split order), the normalization backward
//             (dX̂ − x̂ (x̂·dX̂)) / ‖x‖ (dX̂ / eps on the floor), and with feature_scale the
//             gradient through s_i = ‖x_i‖. Its row sum Σ_c dlogit_ic logit_ic / s_i is
//             x̂·dX̂ / s_i = Σ_c dc_ic ĉ_ic / s_i up to the correction Σ_c dlogit_ic (F − F'ĉ)
//             (nonzero at the target, on hard examples and where the clamp acts), which
//             bwd_tile and bwd_corr sum per row from the very cosines they used.
//
// sm_90a backward GEMMs (margin_lse_gemm_sm90.cuh; Backward::sm90_dw / sm90_dx in
// margin_lse_backward.cu): on compute capability 9.0 in bf16/fp16, bwd_dw and bwd_dx run
// bwd_gemm_sm90_kernel on the same grids, epilogues and partials: one TMA + wgmma mainloop
// (128 x 128 tiles, BK = 64, a 4-stage 128B-swizzled ring with full/empty mbarriers, a
// producer warpgroup and two consumer warpgroups of m64n128k16; ≈ 129 KiB of shared memory,
// Sm90GemmCfg; dX where D_pad >= 256: 128 x 256 tiles of m64n256k16, ≈ 193 KiB, so that
// its grid has D_pad / 256 D tiles). dW reads dS'ᵀ (the scratch) and x̂ MN-major (wgmma tnsp-a / tnsp-b); dX reads
// dS' K-major and the chunk's sub-center rows of W MN-major through a tensor map of row
// pitch K·D, its k_split a multiple of 64; tensor maps (margin_lse_tma.cuh) end at n rows
// and kc classes, so TMA's zero fill masks the partial tiles. bwd_dx keeps mma.sync with
// class_index (TMA cannot gather rows) or D % 8 != 0 (sub-center rows not 16-byte aligned).
//
// Determinism: every reduction has a fixed order (warp butterflies, shared memory in warp
// order, split partials in split order) and no kernel uses atomics, so results are bitwise
// identical run to run on one device in both modes; `deterministic` costs nothing and is
// only recorded. (Split counts depend on the SM count, so two GPU models may differ in
// the last bits.)
//
// Extra memory (beyond inputs and outputs): forward 8 + 20 x splits bytes per padded row
// (fp32 statistics); backward x̂ + the dS' chunk scratch (<= 16 MiB unless N is so large that
// even 128 classes exceed it) + the split partials (<= 16 MiB, or one N_pad x D_pad
// accumulator when that alone is larger) + O(N_pad + cc * N_pad / 64) (r_c partials, the
// feature-scale row partials per 128-class tile, or 64 in 16-bit for the fused kernels). At N = 512, D = 512,
// C = 1M, bf16: 0.5 + 16 + 16 + 0.3 ≈ 33 MiB. (kScratchBudget / kPartialBudget in
// margin_lse_backward.cu.)
//
// Precision: cosines, statistics, dc and every reduction in fp32 (fp64 for float64), from
// the inputs as given; only the backward GEMMs' operands x̂ and dS' are rounded to T
// (bwd_fused_sm90: dS' for dX, dS' / ‖x‖ with x itself for dW: one rounding either way) (a
// gradient-only error of the size of the 16-bit output rounding; these kernels run under
// the host emulator (tools/cuda_emulator) at N = 64-128, D = 128-256, C = 1000-2000, ArcFace s = 64, gave bf16
// gradients within 3.1e-3 to 5.2e-3 of their largest entry, against 2.3e-3 to 2.8e-3 for
// the output rounding alone; fp16 within 5.6e-4). fp16 caveats: dS' = dc / ‖w_c‖ overflows if |dc| / ‖w_c‖ >
// 65504 (e.g. exact ArcFace slope ~1e4 at cos = 1 together with ‖w_c‖ << 1), and the
// softmax tail underflows below 6e-8 (e.g. a mean over 512 rows at s = 64 with P < 1e-6),
// as in any fp16 GEMM on unscaled gradients: train fp16 with a GradScaler.
//
// PTX: the only inline assembly is in margin_lse_ptx.cuh (cp.async, ldmatrix, mma.sync, ex2,
// cvt.rna.tf32; sm_90a: mbarrier, cp.async.bulk.tensor, wgmma, fences, setmaxnreg, used only
// under MARGIN_OPS_SM90A: other targets compile a body that traps). The emulated build
// (tools/margin_emulated, on tools/cuda_emulator) swaps that
// one header for host versions of the same instructions and runs the rest of this source
// unchanged on the CPU, for the tests.
//
// Tuning knobs for a GPU session: Cfg<T> (tile shapes, BK; 2 CTAs/SM for the tensor-core
// kernels = 128 registers), kStages, the two budgets above, the 2 x #SMs grid targets in
// Forward::layout / Backward::layout; Sm90Cfg (W ring stages, setmaxnreg counts).
//
// Options: fwd_main and bwd_tile are instantiated per option (template flags), so that a
// kernel carries only what its problem needs. Hard examples: the per-row threshold and t.
// Sub-centers (K > 1, at most kMaxSubcenters; kernels with 1 CTA per SM, 255 registers):
// the cos GEMM runs once per sub-center k over the strided rows r_j·K + k (an operand of
// row stride K·D, gathered by class_index like K = 1); fwd_main keeps the running maximum of
// the clamped cosines in registers and feeds it to the K = 1 epilogue. bwd_tile keeps the
// winner's raw cosine and index (8 bits) per entry and each pass's 1 / ‖w‖ in dynamic shared
// memory, forms dc once, and writes per sub-center k a block of the scratch (columns
// k·cc + j: dS' where k wins, else 0), of r_part and of w_norm; the chunk's scratch is
// N_pad x K·cc (cc sized for it), bwd_dw runs a grid z over k writing rows r_j·K + k, and
// bwd_dx runs once per k, in order, adding into the same split partials.
//
// 64-bit offsets for every global index that can exceed 2^31 (N*C, C*D, N*D); C < 2^31.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../margin_math.h"

namespace margin_ops {
namespace cuda {

// The inputs' dtype and, for float32, how products are formed: kFloat32 exactly (SIMT FFMA,
// for float32_matmul_precision "highest"), kFloat32Tf32 on the tensor cores as TF32 (the
// glue picks it when torch lets cuBLAS use TF32: precision "high" or "medium").
enum class DType : int32_t {
  kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3, kFloat32Tf32 = 4
};

// The largest sub-center count K the kernels take: the backward keeps each cosine's winning
// sub-center in 8 bits, and the 1 / ‖w‖ of a tile's K sub-centers in shared memory
// (K x 128 x 4 bytes beside the GEMM's stages, which sm_80's 163 KiB per block must hold).
constexpr int64_t kMaxSubcenters = 128;

// What both passes are given: the problem (inputs, margin), the device and the workspace.
// Pointers are device pointers; "Acc" = float, or double when dtype is kFloat64.
// csrc/cuda/launch_params.h fills these fields from tensors (fill_problem).
struct ProblemParams {
  DType dtype;
  int64_t n;                // rows of x, >= 1
  int64_t c;                // classes, 1 <= c < 2^31
  int64_t d;                // feature dimension, >= 1
  const void* x;            // (n, d) T
  const void* weight;       // (R, d) T: class j is row r_j (r_j = class_index[j], or j)
  const int64_t* labels;    // (n,)
  const int64_t* class_index;  // (c,) distinct physical classes r_j, or nullptr (r_j = j)
  int64_t subcenters;       // K in [1, kMaxSubcenters]: class j has W's rows r_j·K + k, k < K
  // (n,) Acc, together or both nullptr: CurricularFace's hard examples, the non-target
  // logit s_i·c·(hard_t_i + c) where c > hard_threshold_i (hard_example in margin_math.h)
  const void* hard_threshold;
  const void* hard_t;
  MarginParams margin;      // finalize()d
  void* workspace;          // {forward,backward}_workspace_bytes(*this) bytes, 256-byte aligned
  int num_sms;              // multiprocessors of the device (sizes the grid)
  int arch;                 // compute capability major·10 + minor (90: the sm_90a kernels)
  bool deterministic;       // recorded only: the kernels are always deterministic
};

// margin_lse.
struct ForwardParams : ProblemParams {
  void* lse;                // (n,) Acc out
  void* target_logit;       // (n,) Acc out
  void* max_cos;            // (n,) Acc out
  int64_t* pred;            // (n,) out
  void* nontarget_sum;      // (n,) Acc out
};

// margin_lse_backward.
struct BackwardParams : ProblemParams {
  const void* lse;                // (n,) Acc, from the forward
  const void* grad_lse;           // (n,) Acc
  const void* grad_target_logit;  // (n,) Acc
  const void* grad_nontarget_sum; // (n,) Acc
  void* grad_x;                   // (n, d) T out
  void* grad_weight;              // (R, d) T out; rows no class reads are left untouched
                                  // (the caller zeroes them)
};

// Workspace sizes; they read only dtype, n, c, d and num_sms.
size_t forward_workspace_bytes(const ForwardParams& p);
size_t backward_workspace_bytes(const BackwardParams& p);

// Enqueue the kernels on `stream`; no host synchronisation (CUDA-graph capturable).
// Return the first CUDA error met while configuring or launching.
cudaError_t launch_margin_lse_forward(const ForwardParams& p, cudaStream_t stream);
cudaError_t launch_margin_lse_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace margin_ops
