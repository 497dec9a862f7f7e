// SOHO visual-dictionary update on the CPU: torch-free kernels over raw float32 arrays.
#pragma once
#include <cstdint>

namespace vlkernels {
namespace cpu {

// counts[k] = number of rows r with index[r] == k (and mask[r] != 0 when mask is given);
// sums[k * dim + j] = sum of x[r * dim + j] over those rows, in row order (deterministic).
// Threads split the feature columns, so no two threads write one element.
void vd_cluster_statistics(const float* x, const int64_t* index, const uint8_t* mask, int64_t rows, int64_t dim,
                           int64_t entries, float* counts, float* sums);

// SOHO's moving-average step in place, given one step's counts [entries] and sums [entries * dim]:
//   cluster_size = decay * cluster_size + (1 - decay) * counts
//   embed_avg    = decay * embed_avg    + (1 - decay) * sums
//   codebook     = embed_avg / ((cluster_size + eps) / (total + entries * eps) * total), total = sum(cluster_size)
// except where that divisor is 0 (total 0: no row counted yet), where the codebook row is kept.
void vd_apply_statistics(float* codebook, float* cluster_size, float* embed_avg, const float* counts,
                         const float* sums, int64_t entries, int64_t dim, float decay, float eps);

}  // namespace cpu
}  // namespace vlkernels
