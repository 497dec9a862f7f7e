#include "visual_dictionary.h"

#include <algorithm>
#include <cstring>

namespace vlkernels {
namespace cpu {

void vd_cluster_statistics(const float* x, const int64_t* index, const uint8_t* mask, int64_t rows, int64_t dim,
                           int64_t entries, float* counts, float* sums) {
  std::memset(counts, 0, sizeof(float) * entries);
  std::memset(sums, 0, sizeof(float) * entries * dim);
  for (int64_t r = 0; r < rows; ++r) {
    if (!mask || mask[r]) counts[index[r]] += 1.0f;
  }
  // Column slabs of 64 floats: each thread owns whole slabs, walks every row in order, and
  // adds its slab of the row into its entry's slab (contiguous, vectorisable).
  constexpr int64_t kSlab = 64;
  const int64_t slabs = (dim + kSlab - 1) / kSlab;
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < slabs; ++s) {
    const int64_t begin = s * kSlab, end = std::min(dim, begin + kSlab);
    for (int64_t r = 0; r < rows; ++r) {
      if (mask && !mask[r]) continue;
      const float* source = x + r * dim;
      float* target = sums + index[r] * dim;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) target[j] += source[j];
    }
  }
}

void vd_apply_statistics(float* codebook, float* cluster_size, float* embed_avg, const float* counts,
                         const float* sums, int64_t entries, int64_t dim, float decay, float eps) {
  double total = 0.0;
  for (int64_t k = 0; k < entries; ++k) {
    cluster_size[k] = decay * cluster_size[k] + (1.0f - decay) * counts[k];
    total += cluster_size[k];
  }
  const float total_f = static_cast<float>(total);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < entries; ++k) {
    const float smoothed = (cluster_size[k] + eps) / (total_f + entries * eps) * total_f;
    float* average = embed_avg + k * dim;
    const float* step = sums + k * dim;
    float* entry = codebook + k * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) average[j] = decay * average[j] + (1.0f - decay) * step[j];
    // smoothed is 0 only when total is: no row counted in any entry yet; the entry is kept
    // (0 / 0 would be NaN). A NaN smoothed compares unequal and propagates.
    if (smoothed == 0.0f) continue;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) entry[j] = average[j] / smoothed;
  }
}

}  // namespace cpu
}  // namespace vlkernels
