// Glue of the optimal-transport kernels: torch ops vlkernels::ot_ipot, ot_sinkhorn, ot_wra and
// ot_wra_backward (CPU only; on CUDA the backward is torch's), registered when vlkernels._C
// loads (TORCH_LIBRARY_FRAGMENT: no entry in module.cpp needed), with a CPU implementation
// (csrc/cpu, OpenMP) and, in the GPU build, a CUDA one (csrc/cuda) on torch's current stream.
// torch allocates, the kernels only see raw pointers. Inputs arrive prepared by
// vlkernels/ops/optimal_transport.py (contiguous float32, bool masks); the checks here guard
// direct calls.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/optimal_transport.h"

#ifdef VLKERNELS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/optimal_transport.h"
#endif

namespace vlkernels {
namespace bindings {
namespace {

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "vlkernels ot: ", name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "vlkernels ot: ", name,
              " must be a contiguous float32 tensor");
}

void check_mask(const at::Tensor& mask, const char* name, int64_t batch, int64_t length) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2 &&
                  mask.size(0) == batch && mask.size(1) == length,
              "vlkernels ot: ", name, " must be a contiguous bool tensor [", batch, ", ", length, "], got ",
              mask.sizes());
}

void check_vector(const at::Tensor& t, const char* name, int64_t batch, int64_t length) {
  check_float(t, name, 2);
  TORCH_CHECK(t.size(0) == batch && t.size(1) == length, "vlkernels ot: ", name, " must be [", batch, ", ",
              length, "], got ", t.sizes());
}

void check_iterations(double scale, int64_t iters, int64_t k) {
  TORCH_CHECK(scale > 0 && iters >= 1 && k >= 1, "vlkernels ot: need beta/reg > 0, iters >= 1 and k >= 1");
}

const uint8_t* bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

at::Tensor ipot_cpu(const at::Tensor& cost, const at::Tensor& x_mask, const at::Tensor& y_mask, double beta,
                    int64_t iters, int64_t k) {
  check_float(cost, "cost", 3);
  const int64_t batch = cost.size(0), rows = cost.size(1), cols = cost.size(2);
  check_mask(x_mask, "x_mask", batch, rows);
  check_mask(y_mask, "y_mask", batch, cols);
  check_iterations(beta, iters, k);
  at::Tensor plan = at::empty_like(cost);
  cpu::ipot(cost.data_ptr<float>(), bytes(x_mask), bytes(y_mask), batch, rows, cols, static_cast<float>(beta), iters,
            k, plan.data_ptr<float>());
  return plan;
}

void check_embeddings(const at::Tensor& txt, const at::Tensor& img, const at::Tensor& x_mask,
                      const at::Tensor& y_mask) {
  check_float(txt, "txt", 3);
  check_float(img, "img", 3);
  TORCH_CHECK(txt.size(0) == img.size(0) && txt.size(2) == img.size(2), "vlkernels ot: txt ", txt.sizes(),
              " and img ", img.sizes(), " must share B and D");
  check_mask(x_mask, "x_mask", txt.size(0), txt.size(1));
  check_mask(y_mask, "y_mask", img.size(0), img.size(1));
}

std::tuple<at::Tensor, at::Tensor> wra_cpu(const at::Tensor& txt, const at::Tensor& img, const at::Tensor& x_mask,
                                           const at::Tensor& y_mask, double beta, int64_t iters, int64_t k) {
  check_embeddings(txt, img, x_mask, y_mask);
  check_iterations(beta, iters, k);
  const int64_t batch = txt.size(0), rows = txt.size(1), cols = img.size(1), dim = txt.size(2);
  at::Tensor plan = at::empty({batch, rows, cols}, txt.options());
  at::Tensor distance = at::empty({batch}, txt.options());
  cpu::wra(txt.data_ptr<float>(), img.data_ptr<float>(), bytes(x_mask), bytes(y_mask), batch, rows, cols, dim,
           static_cast<float>(beta), iters, k, plan.data_ptr<float>(), distance.data_ptr<float>());
  return {distance, plan};
}

std::tuple<at::Tensor, at::Tensor> wra_backward_cpu(const at::Tensor& txt, const at::Tensor& img,
                                                    const at::Tensor& x_mask, const at::Tensor& y_mask,
                                                    const at::Tensor& plan, const at::Tensor& grad_distance) {
  check_embeddings(txt, img, x_mask, y_mask);
  const int64_t batch = txt.size(0), rows = txt.size(1), cols = img.size(1), dim = txt.size(2);
  check_float(plan, "plan", 3);
  TORCH_CHECK(plan.size(0) == batch && plan.size(1) == rows && plan.size(2) == cols, "vlkernels ot: plan must be [",
              batch, ", ", rows, ", ", cols, "], got ", plan.sizes());
  check_float(grad_distance, "grad_distance", 1);
  TORCH_CHECK(grad_distance.size(0) == batch, "vlkernels ot: grad_distance must be [", batch, "]");
  at::Tensor grad_txt = at::empty_like(txt);
  at::Tensor grad_img = at::empty_like(img);
  cpu::wra_backward(txt.data_ptr<float>(), img.data_ptr<float>(), bytes(x_mask), bytes(y_mask), plan.data_ptr<float>(),
                    grad_distance.data_ptr<float>(), batch, rows, cols, dim, grad_txt.data_ptr<float>(),
                    grad_img.data_ptr<float>());
  return {grad_txt, grad_img};
}

at::Tensor sinkhorn_cpu(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double reg, int64_t iters,
                        double tol, bool log_domain) {
  check_float(cost, "cost", 3);
  const int64_t batch = cost.size(0), rows = cost.size(1), cols = cost.size(2);
  check_vector(a, "a", batch, rows);
  check_vector(b, "b", batch, cols);
  check_iterations(reg, iters, 1);
  at::Tensor plan = at::empty_like(cost);
  cpu::sinkhorn(cost.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), batch, rows, cols,
                static_cast<float>(reg), iters, static_cast<float>(tol), log_domain, plan.data_ptr<float>());
  return plan;
}

#ifdef VLKERNELS_WITH_CUDA
at::Tensor ipot_cuda(const at::Tensor& cost, const at::Tensor& x_mask, const at::Tensor& y_mask, double beta,
                     int64_t iters, int64_t k) {
  check_float(cost, "cost", 3);
  const int64_t batch = cost.size(0), rows = cost.size(1), cols = cost.size(2);
  check_mask(x_mask, "x_mask", batch, rows);
  check_mask(y_mask, "y_mask", batch, cols);
  check_iterations(beta, iters, k);
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor plan = at::empty_like(cost);
  C10_CUDA_CHECK(cuda::launch_ipot(cost.data_ptr<float>(), nullptr, nullptr, nullptr, bytes(x_mask), bytes(y_mask),
                                   batch, rows, cols, static_cast<float>(beta), iters, k, plan.data_ptr<float>(),
                                   nullptr, c10::cuda::getCurrentCUDAStream()));
  return plan;
}

// The CUDA path takes the similarities from cuBLAS (at::bmm); the kernel forms the cost from
// them and the norms entry by entry, runs IPOT and sums C * T.
std::tuple<at::Tensor, at::Tensor> wra_cuda(const at::Tensor& txt, const at::Tensor& img, const at::Tensor& x_mask,
                                            const at::Tensor& y_mask, double beta, int64_t iters, int64_t k) {
  check_embeddings(txt, img, x_mask, y_mask);
  check_iterations(beta, iters, k);
  const c10::cuda::CUDAGuard guard(txt.device());
  const int64_t batch = txt.size(0), rows = txt.size(1), cols = img.size(1);
  const at::Tensor sim = at::bmm(txt, img.transpose(1, 2)).contiguous();
  const at::Tensor x_norm = at::linalg_vector_norm(txt, 2, {-1}).contiguous();
  const at::Tensor y_norm = at::linalg_vector_norm(img, 2, {-1}).contiguous();
  at::Tensor plan = at::empty({batch, rows, cols}, txt.options());
  at::Tensor distance = at::empty({batch}, txt.options());
  C10_CUDA_CHECK(cuda::launch_ipot(nullptr, sim.data_ptr<float>(), x_norm.data_ptr<float>(), y_norm.data_ptr<float>(),
                                   bytes(x_mask), bytes(y_mask), batch, rows, cols, static_cast<float>(beta), iters, k,
                                   plan.data_ptr<float>(), distance.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream()));
  return {distance, plan};
}

at::Tensor sinkhorn_cuda(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double reg,
                         int64_t iters, double tol, bool log_domain) {
  check_float(cost, "cost", 3);
  const int64_t batch = cost.size(0), rows = cost.size(1), cols = cost.size(2);
  check_vector(a, "a", batch, rows);
  check_vector(b, "b", batch, cols);
  check_iterations(reg, iters, 1);
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor plan = at::empty_like(cost);
  C10_CUDA_CHECK(cuda::launch_sinkhorn(cost.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), batch, rows,
                                       cols, static_cast<float>(reg), iters, static_cast<float>(tol), log_domain,
                                       plan.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return plan;
}
#endif

}  // namespace
}  // namespace bindings
}  // namespace vlkernels

TORCH_LIBRARY_FRAGMENT(vlkernels, m) {
  m.def("ot_ipot(Tensor cost, Tensor x_mask, Tensor y_mask, float beta, int iters, int k) -> Tensor");
  m.def("ot_wra(Tensor txt, Tensor img, Tensor x_mask, Tensor y_mask, float beta, int iters, int k) "
        "-> (Tensor, Tensor)");
  m.def("ot_wra_backward(Tensor txt, Tensor img, Tensor x_mask, Tensor y_mask, Tensor plan, Tensor grad_distance) "
        "-> (Tensor, Tensor)");
  m.def("ot_sinkhorn(Tensor cost, Tensor a, Tensor b, float reg, int iters, float tol, bool log_domain) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlkernels, CPU, m) {
  m.impl("ot_ipot", &vlkernels::bindings::ipot_cpu);
  m.impl("ot_wra", &vlkernels::bindings::wra_cpu);
  m.impl("ot_wra_backward", &vlkernels::bindings::wra_backward_cpu);
  m.impl("ot_sinkhorn", &vlkernels::bindings::sinkhorn_cpu);
}

#ifdef VLKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(vlkernels, CUDA, m) {
  m.impl("ot_ipot", &vlkernels::bindings::ipot_cuda);
  m.impl("ot_wra", &vlkernels::bindings::wra_cuda);
  m.impl("ot_sinkhorn", &vlkernels::bindings::sinkhorn_cuda);
}
#endif
