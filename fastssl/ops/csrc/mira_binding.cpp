// torch binding of the fused MIRA kernel: argument checks, the output and workspaces from torch's
// caching allocator, the current CUDA stream. The kernel itself is in mira_fused.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <climits>
#include <cmath>
#include <optional>

#include "mira_fused.h"

namespace {

MiraInput input_type(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return MiraInput::kFloat32;
    case at::kBFloat16:
      return MiraInput::kBFloat16;
    case at::kHalf:
      return MiraInput::kFloat16;
    default:
      TORCH_CHECK(false, "mira_assign_views_cuda: logits must be float32, bfloat16 or float16, got ",
                  logits.scalar_type(), " (float64 uses the reference solve_views)");
  }
}

void check_inputs(const at::Tensor& logits, double tau, double beta, int64_t num_iters) {
  TORCH_CHECK(logits.is_cuda(), "mira_assign_views_cuda: logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, "mira_assign_views_cuda: logits must be V x B x K, got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "mira_assign_views_cuda: logits must be contiguous");
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "mira_assign_views_cuda: tau must be > 0, got ", tau);
  TORCH_CHECK(beta >= 0 && beta < 1, "mira_assign_views_cuda: beta must be in [0, 1), got ", beta);
  TORCH_CHECK(num_iters >= 0 && num_iters <= INT_MAX, "mira_assign_views_cuda: num_iters must be >= 0, got ",
              num_iters);
  TORCH_CHECK(logits.size(1) <= INT_MAX && logits.size(2) <= INT_MAX, "mira_assign_views_cuda: B or K too large");
}

at::Tensor prepare_out(const at::Tensor& logits, const std::optional<at::Tensor>& out) {
  if (!out.has_value()) return at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  const at::Tensor& o = *out;
  TORCH_CHECK(o.device() == logits.device() && o.scalar_type() == at::kFloat && o.is_contiguous() &&
                  o.sizes() == logits.sizes(),
              "mira_assign_views_cuda: out must be a contiguous float32 tensor of shape ", logits.sizes(), " on ",
              logits.device());
  TORCH_CHECK(o.numel() == 0 || o.data_ptr() != logits.data_ptr(), "mira_assign_views_cuda: out aliases logits");
  return o;
}

}  // namespace

// V x B x K logits (fp32/bf16/fp16, contiguous, CUDA) -> V x B x K float32 MIRA targets (Eq. 5),
// every view solved over its B rows with `num_iters` steps of Eq. 7, in one kernel launch.
// `out`, if given, is written in full (every element) and returned.
at::Tensor mira_assign_views_cuda(const at::Tensor& logits, double tau, double beta, int64_t num_iters,
                                  std::optional<at::Tensor> out) {
  check_inputs(logits, tau, beta, num_iters);
  const MiraInput dtype = input_type(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor result = prepare_out(logits, out);
  const int64_t V = logits.size(0), B = logits.size(1), K = logits.size(2);
  if (V == 0 || B == 0 || K == 0) return result;
  const int device = logits.get_device();
  MiraPlan plan;
  C10_CUDA_CHECK(mira_plan(dtype, V, B, K, device, &plan));
  TORCH_CHECK(plan.error.empty(), "mira_assign_views_cuda: cannot launch V x B x K = ", V, " x ", B, " x ", K, ": ",
              plan.error);
  const auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({plan.views_per_launch, K, plan.cpv, 2}, fopts);  // caching allocator
  at::Tensor alu = at::empty({plan.views_per_launch, K}, fopts);
  C10_CUDA_CHECK(mira_launch(plan, dtype, logits.data_ptr(), result.data_ptr<float>(), partial.data_ptr<float>(),
                             alu.data_ptr<float>(), V, B, K, tau, beta, num_iters,
                             c10::cuda::getCurrentCUDAStream(device).stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastssl fused MIRA assignment (Eq. 5-7): one cooperative CUDA kernel for all views";
  m.def("mira_assign_views_cuda", &mira_assign_views_cuda,
        "V x B x K logits (fp32/bf16/fp16) -> V x B x K float32 MIRA targets; optional `out` is filled",
        pybind11::arg("logits"), pybind11::arg("tau"), pybind11::arg("beta"), pybind11::arg("num_iters"),
        pybind11::arg("out") = pybind11::none());
}
