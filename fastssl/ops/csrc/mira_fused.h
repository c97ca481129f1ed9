// Interface between the fused MIRA kernel (mira_fused.cu, nvcc) and its torch binding
// (mira_binding.cpp, g++): plain C++ and CUDA types only, so neither side needs the other's headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

enum class MiraInput { kFloat32, kBFloat16, kFloat16 };

// How one call is launched: see the design notes at the top of mira_fused.cu.
struct MiraPlan {
  bool in_smem;              // log P of a CTA's rows lives in shared memory (else in `out`)
  int64_t cpv;               // CTAs per view (each owns a block of rows)
  int64_t views_per_launch;  // V, unless V x cpv exceeds the co-resident CTAs
  size_t smem;               // dynamic shared memory per CTA, bytes
  std::string error;         // non-empty: this shape cannot be launched, and why
};

// Grid size from the occupancy calculator, so that the cooperative launch is legal. CUDA errors
// are returned (the binding raises them with C10_CUDA_CHECK); an unlaunchable shape sets error.
cudaError_t mira_plan(MiraInput dtype, int64_t V, int64_t B, int64_t K, int device, MiraPlan* plan);

// Workspaces: partial = views_per_launch x K x cpv x 2 floats, alu = views_per_launch x K floats.
cudaError_t mira_launch(const MiraPlan& plan, MiraInput dtype, const void* logits, float* out, float* partial,
                        float* alu, int64_t V, int64_t B, int64_t K, double tau, double beta, int64_t num_iters,
                        cudaStream_t stream);
