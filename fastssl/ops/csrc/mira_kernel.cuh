// Device code of the fused MIRA kernel: the algorithm and its design notes are in mira_fused.cu.
//
// This file is compiled by BOTH routes that build the kernel (fastssl/ops/_cuda_ext.py):
//   1. NVRTC at run time (fastssl/ops/_nvrtc.py): this file alone is the program, so it includes
//      nothing (a pip install of torch brings NVRTC but not the toolkit's headers, nor CCCL, which
//      cooperative_groups.h needs); __CUDACC_RTC__ is defined;
//   2. nvcc through torch's extension builder: mira_fused.cu includes it and adds the host side.
// The entry points are extern "C" (unmangled names, the same in both routes); the host side of
// each route (mira_fused.cu's mira_plan / mira_launch, _nvrtc.py's plan_launch / launch) sizes the
// grid from the occupancy calculator and launches them cooperatively.
#pragma once

#ifdef __CUDACC_RTC__
typedef long long int64_t;  // no <cstdint> under NVRTC without headers
#else
#include <cooperative_groups.h>
#include <cstdint>
#endif

namespace fastssl_mira {

constexpr int kThreads = 512;             // threads per CTA
constexpr int kWarps = kThreads / 32;     // warps per CTA
constexpr int kTile = 8;                  // rows reduced together (register arrays of this size)
#ifdef __CUDACC_RTC__
constexpr float kNegInf = __builtin_bit_cast(float, 0xff800000u);  // NVRTC has no __builtin_huge_valf
#else
constexpr float kNegInf = -__builtin_huge_valf();
#endif

// Kernel arguments (one struct: a single pointer in the cooperative launch's argument array).
// _nvrtc.py mirrors this layout in ctypes (64 bytes); keep the two in step.
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

#ifdef __CUDACC_RTC__
// Grid-wide barrier of a cooperative launch, as cooperative_groups' grid_group::sync does it on
// sm_70+ (cooperative_groups/details/sync.h, driver_abi.h): the driver gives every cooperative
// launch a zeroed workspace whose address is in %envreg1:%envreg2, its barrier word at offset 4.
// Each CTA adds 1 (CTA 0 adds 0x80000000 - (CTAs - 1)), so the top bit flips when the last CTA
// arrives and the low bits are back where they were: the word serves every barrier of the launch.
__device__ __forceinline__ void grid_sync() {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int hi, lo;
    asm("mov.u32 %0, %%envreg1;" : "=r"(hi));
    asm("mov.u32 %0, %%envreg2;" : "=r"(lo));
    const unsigned long long ws = ((unsigned long long)hi << 32) | lo;
    if (ws == 0) __trap();  // not a cooperative launch: no workspace (cooperative_groups traps too)
    unsigned int* bar = reinterpret_cast<unsigned int*>(ws + 4);
    const unsigned int nb = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    unsigned int old, cur;
    asm volatile("atom.add.release.gpu.u32 %0,[%1],%2;" : "=r"(old) : "l"(bar), "r"(nb) : "memory");
    do {
      asm volatile("ld.acquire.gpu.u32 %0,[%1];" : "=r"(cur) : "l"(bar) : "memory");
    } while (((old ^ cur) & 0x80000000u) == 0);
  }
  __syncthreads();
}
#else
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
#endif

// 2^x on the special-function unit; ftz: anything below 2^-126 of the max is 0 (it cannot move
// a float32 sum that contains the max term, which is exactly 1).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// bf16 / fp16 inputs as their bits (no cuda_bf16.h / cuda_fp16.h: NVRTC without the toolkit's
// headers compiles this file too); both conversions to float32 are exact, as in those headers.
struct Bf16Bits {
  unsigned short bits;
};
struct F16Bits {
  unsigned short bits;
};
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(Bf16Bits x) { return __uint_as_float((unsigned int)x.bits << 16); }
__device__ __forceinline__ float to_float(F16Bits x) {
  float y;
  asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(x.bits));
  return y;
}

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

// The whole solve of one CTA: init, initial guess, num_iters steps of Eq. 7, Eq. 5.
template <typename scalar_t, bool kInSmem>
__device__ __forceinline__ void mira_views_body(const Params& p, float* smem) {
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
  grid_sync();
  merge_columns(p, partial, alu, part);
  grid_sync();
  for (int it = 0; it < p.num_iters; ++it) {  // Eq. 7
    row_pass<false>(p, lp, nrows, alu, s_r, s_red, s_bc, out);
    __syncthreads();
    column_partials(p, lp, nrows, s_r, partial, part);
    grid_sync();
    merge_columns(p, partial, alu, part);
    grid_sync();
  }
  row_pass<true>(p, lp, nrows, alu, s_r, s_red, s_bc, out);  // Eq. 5
}

}  // namespace fastssl_mira

// Entry points: fastssl_mira_<input dtype>_<smem|gmem> (log P in shared memory or in `out`).
#define FASTSSL_MIRA_ENTRY(name, scalar_t, in_smem)                                                    \
  extern "C" __global__ void __launch_bounds__(fastssl_mira::kThreads, 1) name(fastssl_mira::Params p) { \
    extern __shared__ float4 fastssl_mira_smem[];                                                      \
    fastssl_mira::mira_views_body<scalar_t, in_smem>(p, reinterpret_cast<float*>(fastssl_mira_smem));  \
  }
FASTSSL_MIRA_ENTRY(fastssl_mira_f32_smem, float, true)
FASTSSL_MIRA_ENTRY(fastssl_mira_f32_gmem, float, false)
FASTSSL_MIRA_ENTRY(fastssl_mira_bf16_smem, fastssl_mira::Bf16Bits, true)
FASTSSL_MIRA_ENTRY(fastssl_mira_bf16_gmem, fastssl_mira::Bf16Bits, false)
FASTSSL_MIRA_ENTRY(fastssl_mira_f16_smem, fastssl_mira::F16Bits, true)
FASTSSL_MIRA_ENTRY(fastssl_mira_f16_gmem, fastssl_mira::F16Bits, false)
#undef FASTSSL_MIRA_ENTRY
