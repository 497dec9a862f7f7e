// Batched optimal transport on CUDA (UNITER's IPOT, the WRA distance, Sinkhorn): torch-free
// launchers over raw device pointers and a stream. One thread block per problem keeps the
// problem's matrices in shared memory for all iterations (one launch per call); warps sweep
// rows with shuffle reductions, threads sweep columns. The per-step math is csrc/ot_step.h,
// shared with the CPU kernels.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace vlkernels {
namespace cuda {

// Largest problem a block holds: rows * (cols rounded up to 32) floats per matrix (IPOT keeps
// two matrices, Sinkhorn one) within Hopper's 227 KiB of shared memory per block.
constexpr int64_t kMaxIpotTile = 24576;
constexpr int64_t kMaxSinkhornTile = 49152;

// IPOT plans, as vlkernels::cpu::ipot / wra_ipot: either cost [batch, rows, cols] is given, or
// (WRA) sim = <x_i, y_j> [batch, rows, cols] with the norms x_norm [batch, rows], y_norm
// [batch, cols], and then distance [batch] = sum_ij C_ij plan_ij is written too. Masks are
// [batch, rows] / [batch, cols] bytes, nonzero = valid. Returns the launch's error
// (cudaErrorInvalidValue for a problem over kMaxIpotTile).
cudaError_t launch_ipot(const float* cost, const float* sim, const float* x_norm, const float* y_norm,
                        const uint8_t* x_mask, const uint8_t* y_mask, int64_t batch, int64_t rows, int64_t cols,
                        float beta, int64_t iters, int64_t k, float* plan, float* distance, cudaStream_t stream);

// Sinkhorn plans, as vlkernels::cpu::sinkhorn (a, b zero off the support; tol < 0 runs all iters).
cudaError_t launch_sinkhorn(const float* cost, const float* a, const float* b, int64_t batch, int64_t rows,
                            int64_t cols, float reg, int64_t iters, float tol, bool log_domain, float* plan,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace vlkernels
