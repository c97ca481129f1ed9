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
// 2 cores, over these headers it takes seconds.
#include "mira_fused.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 512;             // threads per CTA
constexpr int kWarps = kThreads / 32;     // warps per CTA
constexpr int kTile = 8;                  // rows reduced together (register arrays of this size)
constexpr float kNegInf = -__builtin_huge_valf();
constexpr double kLog2e = 1.4426950408889634;

// Kernel arguments (one struct: a single pointer in the cooperative launch's argument array).
struct Params {
  const void* logits;   // V x B x K, fp32 / bf16 / fp16
  float* out;           // V x B x K float32 targets (also the log P workspace in global mode)
  float2* partial;      // V x K x cpv column partials (max, sum of ex2(x - max)), log2 units
  float* alu;           // V x K: a * log2 u_j, the log prior of Eq. 5-7
  int B, K, cpv, num_iters;
  float c2;             // log2(e) / (tau (1 - beta)): logits -> log2 of P's unnormalised exponent
  float a;              // beta / (1 - beta)
  float one_minus_beta;
  float log2_b;         // log2(B): the column MEAN of Eq. 6-7
};

// 2^x on the special-function unit; ftz: anything below 2^-126 of the max is 0 (it cannot move
// a float32 sum that contains the max term, which is exactly 1).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// log(P u^-a) with the reference's mask (`_add_log_prior`): P_ij = 0 stays 0 whatever u_j is.
__device__ __forceinline__ float add_log_prior(float lp, float al) {
  return lp == kNegInf ? kNegInf : lp - al;
}

// Merge two (max, sum-exp) pairs; two -inf maxima (all-zero columns) leave (-inf, 0).
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  const float nm = fmaxf(m, m2);
  if (nm == kNegInf) return;
  s = s * ex2(m - nm) + s2 * ex2(m2 - nm);
  m = nm;
}

struct MaxOp {
  __device__ static float apply(float x, float y) { return fmaxf(x, y); }
};
struct SumOp {
  __device__ static float apply(float x, float y) { return x + y; }
};

// All-reduce kTile values over the CTA; every thread gets the results. Two __syncthreads.
template <class Op>
__device__ __forceinline__ void block_allreduce(float (&v)[kTile], float* s_red, float* s_bc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kTile; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] = Op::apply(v[i], __shfl_xor_sync(0xffffffffu, v[i], o));
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kTile; ++i) s_red[warp * kTile + i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    float x = s_red[threadIdx.x];
    for (int w = 1; w < kWarps; ++w) x = Op::apply(x, s_red[w * kTile + threadIdx.x]);
    s_bc[threadIdx.x] = x;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kTile; ++i) v[i] = s_bc[i];
}

// log2 P = log2_softmax(z c) for the CTA's rows, reading the logits once (Sec. 3.1, P of Eq. 5-7).
// z - max(z) is taken before scaling, which is exact for equal-magnitude logits (+-1e4 ties).
template <typename scalar_t>
__device__ void init_log_p(const Params& p, const scalar_t* z, float* lp, int nrows, float* s_red,
                           float* s_bc) {
  const int K = p.K;
  for (int t0 = 0; t0 < nrows; t0 += kTile) {
    const int n = min(kTile, nrows - t0);
    float m[kTile], s[kTile];
#pragma unroll
    for (int i = 0; i < kTile; ++i) m[i] = kNegInf, s[i] = 0.f;
    for (int j = threadIdx.x; j < K; j += kThreads) {
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (i < n) {
          const float x = to_float(z[(int64_t)(t0 + i) * K + j]);
          lp[(t0 + i) * K + j] = x;
          m[i] = fmaxf(m[i], x);
        }
      }
    }
    block_allreduce<MaxOp>(m, s_red, s_bc);
    for (int j = threadIdx.x; j < K; j += kThreads) {
#pragma unroll
      for (int i = 0; i < kTile; ++i)
        if (i < n) s[i] += ex2((lp[(t0 + i) * K + j] - m[i]) * p.c2);
    }
    block_allreduce<SumOp>(s, s_red, s_bc);
#pragma unroll
    for (int i = 0; i < kTile; ++i) s[i] = log2f(s[i]);
    for (int j = threadIdx.x; j < K; j += kThreads) {
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (i < n) {
          float* q = lp + (t0 + i) * K + j;
          *q = (*q - m[i]) * p.c2 - s[i];
        }
      }
    }
  }
}

// The prior a log2 u_j of kGroup columns j0, j0 + 512, ... (0 past K), loaded together so that
// their L2 round trips overlap; ld.global.cg because other CTAs wrote them since the last sync.
constexpr int kGroup = 4;
__device__ __forceinline__ void load_prior(const float* alu, int j0, int K, float (&al)[kGroup]) {
#pragma unroll
  for (int u = 0; u < kGroup; ++u) {
    const int j = j0 + u * kThreads;
    al[u] = j < K ? __ldcg(alu + j) : 0.f;
  }
}

// Row pass: r_i = lse2_j [log2 P_ij - a log2 u_j] (the denominator of Eq. 7 and of Eq. 5).
// kWriteOut = false: store r_i in s_r. kWriteOut = true: write the Eq. 5 targets instead.
template <bool kWriteOut>
__device__ void row_pass(const Params& p, const float* lp, int nrows, const float* alu, float* s_r,
                         float* s_red, float* s_bc, float* out) {
  const int K = p.K;
  for (int t0 = 0; t0 < nrows; t0 += kTile) {
    const int n = min(kTile, nrows - t0);
    float m[kTile], s[kTile], al[kGroup];
#pragma unroll
    for (int i = 0; i < kTile; ++i) m[i] = kNegInf, s[i] = 0.f;
    for (int j0 = threadIdx.x; j0 < K; j0 += kGroup * kThreads) {  // sweep 1: row maxima, no exp
      load_prior(alu, j0, K, al);
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int j = j0 + u * kThreads;
#pragma unroll
        for (int i = 0; i < kTile; ++i)
          if (i < n && j < K) m[i] = fmaxf(m[i], add_log_prior(lp[(t0 + i) * K + j], al[u]));
      }
    }
    block_allreduce<MaxOp>(m, s_red, s_bc);
    for (int j0 = threadIdx.x; j0 < K; j0 += kGroup * kThreads) {  // sweep 2: one ex2 per element
      load_prior(alu, j0, K, al);
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int j = j0 + u * kThreads;
#pragma unroll
        for (int i = 0; i < kTile; ++i)
          if (i < n && j < K) s[i] += ex2(add_log_prior(lp[(t0 + i) * K + j], al[u]) - m[i]);
      }
    }
    block_allreduce<SumOp>(s, s_red, s_bc);
    if constexpr (!kWriteOut) {
#pragma unroll
      for (int i = 0; i < kTile; ++i)
        if (i < n && threadIdx.x == i) s_r[t0 + i] = m[i] + log2f(s[i]);
    } else {  // Eq. 5: W_ij = exp(log P_ij - a log u_j - max) / sum; overwrites lp in global mode
#pragma unroll
      for (int i = 0; i < kTile; ++i) s[i] = 1.f / s[i];
      for (int j0 = threadIdx.x; j0 < K; j0 += kGroup * kThreads) {
        load_prior(alu, j0, K, al);
#pragma unroll
        for (int u = 0; u < kGroup; ++u) {
          const int j = j0 + u * kThreads;
#pragma unroll
          for (int i = 0; i < kTile; ++i) {
            if (i < n && j < K) {
              const float v = add_log_prior(lp[(t0 + i) * K + j], al[u]);
              out[(int64_t)(t0 + i) * K + j] = ex2(v - m[i]) * s[i];
            }
          }
        }
      }
    }
  }
}

// Column partials over the CTA's rows: (max_i, sum_i ex2(.-max)) of log2 P_ij - r_i (Eq. 7's
// numerator T_ij = P_ij / rowsum), thread-local; merged online over 8-row chunks.
__device__ void column_partials(const Params& p, const float* lp, int nrows, const float* s_r,
                                float2* partial, int part) {
  const int K = p.K;
  for (int j = threadIdx.x; j < K; j += kThreads) {
    float cm = kNegInf, cs = 0.f;
    for (int i0 = 0; i0 < nrows; i0 += kTile) {
      float w[kTile];
      float tm = kNegInf;
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        w[i] = (i0 + i < nrows) ? lp[(i0 + i) * K + j] - s_r[i0 + i] : kNegInf;
        tm = fmaxf(tm, w[i]);
      }
      const float nm = fmaxf(cm, tm);
      if (nm == kNegInf) continue;  // every P_ij so far is exactly 0
      float acc = 0.f;
      if (cm != kNegInf) acc = cs * ex2(cm - nm);
#pragma unroll
      for (int i = 0; i < kTile; ++i) acc += ex2(w[i] - nm);
      cm = nm;
      cs = acc;
    }
    partial[(int64_t)j * p.cpv + part] = make_float2(cm, cs);
  }
}

// Merge the cpv partials of the columns [c K / cpv, (c+1) K / cpv) of one view into
// a log2 u_j = a (1 - beta) (lse2_i - log2 B) (Eq. 7; for the initial guess r = 0). A warp per
// column, lanes over the partials.
__device__ void merge_columns(const Params& p, const float2* partial, float* alu, int part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c0 = (int)((int64_t)part * p.K / p.cpv), c1 = (int)((int64_t)(part + 1) * p.K / p.cpv);
  for (int j = c0 + warp; j < c1; j += kWarps) {
    float m = kNegInf, s = 0.f;
    float2 x[kGroup];  // partials q = lane, lane + 32, ...: loads issued together, then merged
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int q = lane + 32 * u;
      x[u] = q < p.cpv ? __ldcg(partial + (int64_t)j * p.cpv + q) : make_float2(kNegInf, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) merge_lse(m, s, x[u].x, x[u].y);
    for (int q = lane + 32 * kGroup; q < p.cpv; q += 32) {  // > 128 CTAs per view: rare
      const float2 y = __ldcg(partial + (int64_t)j * p.cpv + q);
      merge_lse(m, s, y.x, y.y);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge_lse(m, s, m2, s2);
    }
    if (lane == 0) {
      // A column that is -inf in every row has u_j = 0; it is masked wherever it is used, and
      // a = 0 (beta = 0) must not turn 0 * -inf into NaN.
      const float lu = m == kNegInf ? kNegInf : p.one_minus_beta * (m + log2f(s) - p.log2_b);
      alu[j] = p.a == 0.f ? 0.f : p.a * lu;
    }
  }
}

template <typename scalar_t, bool kInSmem>
__global__ void __launch_bounds__(kThreads, 1) mira_views_kernel(Params p) {
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  cg::grid_group grid = cg::this_grid();

  const int view = blockIdx.x / p.cpv, part = blockIdx.x % p.cpv;
  const int row0 = (int)((int64_t)part * p.B / p.cpv);
  const int nrows = (int)((int64_t)(part + 1) * p.B / p.cpv) - row0;
  const int rows_pad = (nrows + kTile - 1) / kTile * kTile + kTile;  // same formula as the host

  float* s_r = smem;                  // row log-sum-exps r_i of this CTA's rows
  float* s_red = s_r + rows_pad;      // kWarps x kTile block-reduce scratch
  float* s_bc = s_red + kWarps * kTile;
  const int64_t view_off = ((int64_t)view * p.B + row0) * p.K;
  float* out = p.out + view_off;
  float* lp = kInSmem ? s_bc + kTile : out;  // log2 P: shared memory, or the output buffer
  float2* partial = p.partial + (int64_t)view * p.K * p.cpv;
  float* alu = p.alu + (int64_t)view * p.K;

  init_log_p(p, static_cast<const scalar_t*>(p.logits) + view_off, lp, nrows, s_red, s_bc);
  for (int i = threadIdx.x; i < rows_pad; i += kThreads) s_r[i] = 0.f;  // u(0): column lse of log P
  __syncthreads();
  column_partials(p, lp, nrows, s_r, partial, part);
  grid.sync();
  merge_columns(p, partial, alu, part);
  grid.sync();
  for (int it = 0; it < p.num_iters; ++it) {  // Eq. 7
    row_pass<false>(p, lp, nrows, alu, s_r, s_red, s_bc, out);
    __syncthreads();
    column_partials(p, lp, nrows, s_r, partial, part);
    grid.sync();
    merge_columns(p, partial, alu, part);
    grid.sync();
  }
  row_pass<true>(p, lp, nrows, alu, s_r, s_red, s_bc, out);  // Eq. 5
}

// ----------------------------------------------------------------------------------- host side

int64_t rows_pad_for(int64_t rows) { return (rows + kTile - 1) / kTile * kTile + kTile; }

size_t smem_bytes_for(int64_t rows, int64_t K, bool in_smem) {
  const int64_t floats = rows_pad_for(rows) + kWarps * kTile + kTile + (in_smem ? rows * K : 0);
  return (size_t)floats * sizeof(float);
}

const void* kernel_for(MiraInput dtype, bool in_smem) {
  switch (dtype) {
    case MiraInput::kFloat32:
      return in_smem ? (const void*)mira_views_kernel<float, true> : (const void*)mira_views_kernel<float, false>;
    case MiraInput::kBFloat16:
      return in_smem ? (const void*)mira_views_kernel<__nv_bfloat16, true>
                     : (const void*)mira_views_kernel<__nv_bfloat16, false>;
    default:
      return in_smem ? (const void*)mira_views_kernel<__half, true> : (const void*)mira_views_kernel<__half, false>;
  }
}

#define MIRA_RETURN_IF_ERROR(expr)        \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

// Resident CTAs per SM for (kernel, dynamic smem) on `device`; cached (the query is not free).
// The kernel's dynamic-smem limit is raised to the device maximum once, so that any later
// launch of it, with any smem size the plan picks, is allowed.
cudaError_t blocks_per_sm(const void* kernel, size_t smem, int device, int smem_max, int* blocks) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, smem, device);
  auto it = cache.find(key);
  if (it != cache.end()) {
    *blocks = it->second;
    return cudaSuccess;
  }
  const auto raised = std::make_tuple(kernel, (size_t)0, device);  // smem 0: "limit raised" marker
  if (cache.find(raised) == cache.end()) {
    MIRA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_max));
    cache.emplace(raised, -1);
  }
  MIRA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem));
  cache.emplace(key, *blocks);
  return cudaSuccess;
}

}  // namespace

// Shared-memory log P when the CTA's rows fit at one CTA per SM; else stream from global.
// Either way the grid never exceeds what the occupancy calculator says is co-resident.
cudaError_t mira_plan(MiraInput dtype, int64_t V, int64_t B, int64_t K, int device, MiraPlan* plan) {
  int coop = 0, sms = 0, smem_max = 0, blocks = 0;
  MIRA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  MIRA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MIRA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
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
  const size_t smem_s = smem_bytes_for(rows0, K, true);
  if (smem_s <= (size_t)smem_max) {
    MIRA_RETURN_IF_ERROR(blocks_per_sm(kernel_for(dtype, true), smem_s, device, smem_max, &blocks));
    const int64_t cap = (int64_t)blocks * sms;
    if (cap >= cpv0) {
      *plan = MiraPlan{true, cpv0, std::min(V, cap / cpv0), smem_s, ""};
      return cudaSuccess;
    }
  }
  const size_t smem_g = smem_bytes_for(rows0, K, false);
  if (smem_g > (size_t)smem_max) {
    plan->error = "B = " + std::to_string(B) + " rows per view is too many: " + std::to_string(rows0) +
                  " rows per CTA need " + std::to_string(smem_g) + " bytes of shared memory";
    return cudaSuccess;
  }
  MIRA_RETURN_IF_ERROR(blocks_per_sm(kernel_for(dtype, false), smem_g, device, smem_max, &blocks));
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
