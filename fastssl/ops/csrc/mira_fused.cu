// MIRA assignment (Lee et al. 2022, Eq. 5-7) for all V teacher views in ONE cooperative kernel.
//
// Same computation as `fastssl.ops.mira_fused.solve_views`, step for step, in log space, in float32:
//   log P = log_softmax(z / tau / (1 - beta))                         (rows)
//   log u0 = (1 - beta) (lse_i log P_ij - log B)                       (initial guess, authors' code)
//   repeat num_iters (Eq. 7):
//     r_i    = lse_j [log P_ij - a log u_j]   (masked: -inf stays -inf, `_add_log_prior`)
//     log u_j = (1 - beta) (lse_i [log P_ij - r_i] - log B)
//   W_ij = exp([log P_ij - a log u_j] - r_i)                           (Eq. 5)
// with a = beta / (1 - beta). Everything is carried in log2 units (log P * log2(e)), so every
// exponent is one `ex2.approx.ftz` (MUFU.EX2) of a max-subtracted, hence <= 0, argument: no
// overflow, and an empty cluster (log-marginal of -1e4) is just a very negative finite number.
// A probability-space update (P * u^-a) would be inf * 0 = NaN there; we never form it.
//
// DESIGN
//   * Grid: cooperative launch, V x cpv CTAs of 512 threads; CTA (v, c) owns the contiguous row
//     block [c B / cpv, (c+1) B / cpv) of view v, so every row log-sum-exp is CTA-local.
//     cpv comes from cudaOccupancyMaxActiveBlocksPerMultiprocessor, so the launch is legal for
//     every shape (views are split over several launches only if V exceeds the resident CTAs).
//   * Thread t of a CTA owns the columns j = t, t + 512, ... of ALL of the CTA's rows, in every
//     phase. Hence a column partial (max, sum-exp) over the CTA's rows is thread-local (no block
//     reduction), and a thread only ever re-reads log P values it wrote itself (no block sync for
//     them). Row reductions are block all-reduces of a tile of 8 rows at once.
//   * log P: read the logits ONCE (fp32/bf16/fp16), keep log2 P in float32 in
//       - shared memory when the CTA's rows fit (512 x 3000: 7-8 rows x 3000 x 4 B = 94 KB/CTA),
//       - otherwise the output buffer itself (V x B x K float32) as the workspace: large shapes
//         loop over more rows per CTA and stream from L2/HBM; the final pass overwrites each
//         element in place, by the thread that owns it, after its last read.
//   * Cross-CTA step (one per Eq. 7 iteration): each CTA writes K column partials (max, sumexp)
//     to `partial[v][j][c]`; grid.sync(); CTA c merges the columns [c K / cpv, (c+1) K / cpv) of
//     its view (a warp per column, lanes over the cpv partials, shuffle merge) into
//     a log u_j (`alu[v][j]`); grid.sync(). Cross-CTA data is read with ld.global.cg (L2),
//     4 independent loads in flight per thread, so a sweep waits ~2 L2 round trips, not K/512.
//
// SYNCS: 2 grid syncs per iteration (+2 for the initial guess): 62 for num_iters = 30.
// EXPS per element: 2 per iteration (row sum + column sum); + 1/8 per iteration where a CTA has
//   more than 8 rows (rescaling its column partial per 8-row chunk; none at 512 x 3000);
//   + 1 (init row lse) + 1 (init column lse) + 2 (final row lse and output) once.
//   Max-subtraction costs no exp: maxima are taken in a separate sweep over shared memory.
//
// The exponentials (MUFU.EX2) should bound the kernel, then the grid syncs (an estimate, with levers:
// docs/benchmarks.md, "Pseudo-label assignment"). A "separable" trick (reusing the row-pass
// exponentials for the column pass via per-row and per-column factors) would halve the MUFU work
// but underflows for empty clusters, so it is not used.

// Only CUDA and standard headers here: the torch binding (ATen, pybind11, c10's error checks)
// lives in mira_binding.cpp, which g++ compiles in parallel; nvcc over ATen took 1-3 minutes on
// 2 cores, over these headers it takes seconds. The device code is in mira_kernel.cuh, which the
// NVRTC route (fastssl/ops/_nvrtc.py) compiles on its own.
#include "mira_fused.h"
#include "mira_kernel.cuh"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

// ----------------------------------------------------------------------------------- host side
// (mirrored in Python by fastssl/ops/_nvrtc.py for the NVRTC route: keep the two in step)

namespace {

using fastssl_mira::kThreads;
using fastssl_mira::kTile;
using fastssl_mira::kWarps;
using fastssl_mira::Params;
constexpr double kLog2e = 1.4426950408889634;

int64_t rows_pad_for(int64_t rows) { return (rows + kTile - 1) / kTile * kTile + kTile; }

size_t smem_bytes_for(int64_t rows, int64_t K, bool in_smem) {
  const int64_t floats = rows_pad_for(rows) + kWarps * kTile + kTile + (in_smem ? rows * K : 0);
  return (size_t)floats * sizeof(float);
}

const void* kernel_for(MiraInput dtype, bool in_smem) {
  switch (dtype) {
    case MiraInput::kFloat32:
      return in_smem ? (const void*)fastssl_mira_f32_smem : (const void*)fastssl_mira_f32_gmem;
    case MiraInput::kBFloat16:
      return in_smem ? (const void*)fastssl_mira_bf16_smem : (const void*)fastssl_mira_bf16_gmem;
    default:
      return in_smem ? (const void*)fastssl_mira_f16_smem : (const void*)fastssl_mira_f16_gmem;
  }
}

#define MIRA_RETURN_IF_ERROR(expr)        \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

// The most dynamic shared memory `kernel` may be given on `device`: the opt-in maximum less the
// kernel's static shared memory (CUDA: the two together may not exceed the opt-in maximum). The
// kernel's limit is raised to it once, so that any later launch of it, with any smem size the plan
// picks, is allowed. Cached.
cudaError_t dynamic_smem_limit(const void* kernel, int device, int smem_optin, int* limit) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attr;
    MIRA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, kernel));
    const int max_dynamic = smem_optin - (int)attr.sharedSizeBytes;
    MIRA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic));
    it = cache.emplace(key, max_dynamic).first;
  }
  *limit = it->second;
  return cudaSuccess;
}

// Resident CTAs per SM for (kernel, dynamic smem) on `device` (its limit already raised by
// `dynamic_smem_limit`); cached (the query is not free).
cudaError_t blocks_per_sm(const void* kernel, size_t smem, int device, int* blocks) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, smem, device);
  auto it = cache.find(key);
  if (it != cache.end()) {
    *blocks = it->second;
    return cudaSuccess;
  }
  MIRA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem));
  cache.emplace(key, *blocks);
  return cudaSuccess;
}

}  // namespace

// Shared-memory log P when the CTA's rows fit at one CTA per SM; else stream from global.
// Either way the grid never exceeds what the occupancy calculator says is co-resident.
cudaError_t mira_plan(MiraInput dtype, int64_t V, int64_t B, int64_t K, int device, MiraPlan* plan) {
  int coop = 0, sms = 0, smem_optin = 0, smem_max = 0, blocks = 0;
  MIRA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  MIRA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MIRA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  *plan = MiraPlan{};
  if (coop != 1) {
    plan->error = "the device does not support cooperative launches";
    return cudaSuccess;
  }
  const int64_t cpv0 = std::max<int64_t>(1, std::min<int64_t>(B, sms / V));
  const int64_t rows0 = (B + cpv0 - 1) / cpv0;
  if (rows0 * K > INT_MAX) {
    plan->error = "B x K per CTA is too large (" + std::to_string(rows0) + " x " + std::to_string(K) + ")";
    return cudaSuccess;
  }
  const void* smem_kernel = kernel_for(dtype, true);
  const size_t smem_s = smem_bytes_for(rows0, K, true);
  MIRA_RETURN_IF_ERROR(dynamic_smem_limit(smem_kernel, device, smem_optin, &smem_max));
  if (smem_s <= (size_t)smem_max) {
    MIRA_RETURN_IF_ERROR(blocks_per_sm(smem_kernel, smem_s, device, &blocks));
    const int64_t cap = (int64_t)blocks * sms;
    if (cap >= cpv0) {
      *plan = MiraPlan{true, cpv0, std::min(V, cap / cpv0), smem_s, ""};
      return cudaSuccess;
    }
  }
  const void* gmem_kernel = kernel_for(dtype, false);
  const size_t smem_g = smem_bytes_for(rows0, K, false);
  MIRA_RETURN_IF_ERROR(dynamic_smem_limit(gmem_kernel, device, smem_optin, &smem_max));
  if (smem_g > (size_t)smem_max) {
    plan->error = "B = " + std::to_string(B) + " rows per view is too many: " + std::to_string(rows0) +
                  " rows per CTA need " + std::to_string(smem_g) + " bytes of shared memory";
    return cudaSuccess;
  }
  MIRA_RETURN_IF_ERROR(blocks_per_sm(gmem_kernel, smem_g, device, &blocks));
  const int64_t cap = (int64_t)blocks * sms;
  if (cap < 1) {
    plan->error = "the kernel cannot be resident on this device";
    return cudaSuccess;
  }
  // More CTAs than cpv0 only shrink the per-CTA rows (the smem reserved for rows0 suffices).
  const int64_t cpv = std::max<int64_t>(1, std::min<int64_t>(B, cap / V));
  *plan = MiraPlan{false, cpv, std::max<int64_t>(1, std::min(V, cap / cpv)), smem_g, ""};
  return cudaSuccess;
}

// One cooperative launch per `plan.views_per_launch` views (one launch in total unless V exceeds
// the resident CTAs); `partial` and `alu` are the plan's workspaces, reused launch to launch
// (stream order serialises them). Returns the first launch error.
cudaError_t mira_launch(const MiraPlan& plan, MiraInput dtype, const void* logits, float* out, float* partial,
                        float* alu, int64_t V, int64_t B, int64_t K, double tau, double beta, int64_t num_iters,
                        cudaStream_t stream) {
  const void* kernel = kernel_for(dtype, plan.in_smem);
  const int64_t elt = dtype == MiraInput::kFloat32 ? 4 : 2;
  for (int64_t v0 = 0; v0 < V; v0 += plan.views_per_launch) {
    const int64_t nv = std::min(plan.views_per_launch, V - v0);
    Params p;
    p.logits = static_cast<const char*>(logits) + v0 * B * K * elt;
    p.out = out + v0 * B * K;
    p.partial = reinterpret_cast<float2*>(partial);
    p.alu = alu;
    p.B = (int)B;
    p.K = (int)K;
    p.cpv = (int)plan.cpv;
    p.num_iters = (int)num_iters;
    p.c2 = (float)(kLog2e / (tau * (1.0 - beta)));
    p.a = (float)(beta / (1.0 - beta));
    p.one_minus_beta = (float)(1.0 - beta);
    p.log2_b = (float)std::log2((double)B);
    void* args[] = {&p};
    MIRA_RETURN_IF_ERROR(cudaLaunchCooperativeKernel(kernel, dim3((unsigned)(nv * plan.cpv)), dim3(kThreads), args,
                                                     plan.smem, stream));
  }
  return cudaSuccess;
}
