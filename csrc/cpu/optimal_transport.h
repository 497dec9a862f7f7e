// Batched optimal transport on the CPU (UNITER's IPOT, the WRA distance, Sinkhorn): torch-free
// kernels over raw contiguous float32 arrays. OpenMP spreads the problems of a batch over the
// threads; each problem's iterations run out of a per-thread scratch that stays in L1/L2, with
// SIMD inner loops. The per-step math is csrc/ot_step.h, shared with the CUDA kernels.
#pragma once
#include <cstdint>

namespace vlkernels {
namespace cpu {

// IPOT plans. cost [batch, rows, cols]; x_mask [batch, rows], y_mask [batch, cols] (nonzero =
// valid); plan [batch, rows, cols] is written everywhere (zero on padding, and all zero for a
// problem with no valid row or column). iters >= 1 iterations of k >= 1 inner rounds.
void ipot(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, int64_t batch, int64_t rows,
          int64_t cols, float beta, int64_t iters, int64_t k, float* plan);

// UNITER's WRA distance from the embeddings txt [batch, rows, dim] and img [batch, cols, dim]:
// C = 1 - <x_i, y_j> / (max(|x_i|,eps) max(|y_j|,eps)) on the valid entries (formed in the
// kernel, valid rows and columns only), its IPOT plan [batch, rows, cols] and distance [batch]
// = sum_ij C_ij plan_ij.
void wra(const float* txt, const float* img, const uint8_t* x_mask, const uint8_t* y_mask, int64_t batch, int64_t rows,
         int64_t cols, int64_t dim, float beta, int64_t iters, int64_t k, float* plan, float* distance);

// Gradients of wra's distance with the plan held fixed (UNITER detaches it): grad_txt
// [batch, rows, dim] and grad_img [batch, cols, dim] from grad_distance [batch]; zero on padding.
void wra_backward(const float* txt, const float* img, const uint8_t* x_mask, const uint8_t* y_mask, const float* plan,
                  const float* grad_distance, int64_t batch, int64_t rows, int64_t cols, int64_t dim, float* grad_txt,
                  float* grad_img);

// Entropic OT by Sinkhorn's iterations. a [batch, rows], b [batch, cols]: the marginals, zero
// off the support (padding); plan [batch, rows, cols] (zero off the support). log_domain: the
// potentials' updates in the log domain (POT's sinkhorn_log), else scalings (sinkhorn_knopp).
// tol >= 0: a problem stops once the L2 norm of its column-marginal error is <= tol after a
// full iteration; tol < 0 runs all iters.
void sinkhorn(const float* cost, const float* a, const float* b, int64_t batch, int64_t rows, int64_t cols,
              float reg, int64_t iters, float tol, bool log_domain, float* plan);

}  // namespace cpu
}  // namespace vlkernels
