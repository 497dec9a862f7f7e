// The CPU visual-dictionary kernels against sums and the moving-average formula computed here,
// element by element in double, on random data (dim 130: two full 64-column slabs and a partial one).
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/visual_dictionary.h"

using vlkernels::cpu::vd_apply_statistics;
using vlkernels::cpu::vd_cluster_statistics;

static void test_cluster_statistics(bool with_mask) {
  const int64_t rows = 97, dim = 130, entries = 11;
  std::mt19937 rng(with_mask ? 1 : 2);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> entry(0, entries - 1);
  std::vector<float> x(rows * dim);
  std::vector<int64_t> index(rows);
  std::vector<uint8_t> mask(rows);
  for (auto& v : x) v = normal(rng);
  for (int64_t r = 0; r < rows; ++r) {
    index[r] = entry(rng);
    mask[r] = (rng() % 3) != 0;
  }
  std::vector<float> counts(entries, -1.0f), sums(entries * dim, -1.0f);  // every element must be written
  vd_cluster_statistics(x.data(), index.data(), with_mask ? mask.data() : nullptr, rows, dim, entries, counts.data(),
                        sums.data());
  for (int64_t k = 0; k < entries; ++k) {
    double count = 0.0;
    std::vector<double> sum(dim, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      if (index[r] != k || (with_mask && !mask[r])) continue;
      count += 1.0;
      for (int64_t j = 0; j < dim; ++j) sum[j] += x[r * dim + j];
    }
    CHECK(counts[k] == count, "entry %lld: count %g, expected %g", (long long)k, counts[k], count);
    for (int64_t j = 0; j < dim; ++j)
      CHECK(close(sums[k * dim + j], sum[j], 1e-5, 1e-5), "entry %lld col %lld: sum %g, expected %g", (long long)k,
            (long long)j, sums[k * dim + j], sum[j]);
  }
}

static void test_apply_statistics() {
  const int64_t entries = 9, dim = 70;
  const float decay = 0.99f, eps = 1e-5f;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(0.0f, 5.0f);
  std::normal_distribution<float> normal;
  std::vector<float> codebook(entries * dim), size(entries), avg(entries * dim), counts(entries), sums(entries * dim);
  for (auto& v : codebook) v = normal(rng);
  for (auto& v : size) v = uniform(rng);
  for (auto& v : avg) v = normal(rng);
  for (auto& v : counts) v = std::floor(uniform(rng));
  for (auto& v : sums) v = normal(rng);
  std::vector<float> new_codebook = codebook, new_size = size, new_avg = avg;
  vd_apply_statistics(new_codebook.data(), new_size.data(), new_avg.data(), counts.data(), sums.data(), entries, dim,
                      decay, eps);
  double total = 0.0;
  std::vector<double> expected_size(entries);
  for (int64_t k = 0; k < entries; ++k) total += expected_size[k] = decay * size[k] + (1.0 - decay) * counts[k];
  for (int64_t k = 0; k < entries; ++k) {
    CHECK(close(new_size[k], expected_size[k], 1e-6, 1e-6), "cluster_size[%lld]", (long long)k);
    const double smoothed = (expected_size[k] + eps) / (total + entries * eps) * total;
    for (int64_t j = 0; j < dim; ++j) {
      const double average = decay * avg[k * dim + j] + (1.0 - decay) * sums[k * dim + j];
      CHECK(close(new_avg[k * dim + j], average, 1e-5, 1e-6), "embed_avg[%lld, %lld]", (long long)k, (long long)j);
      CHECK(close(new_codebook[k * dim + j], average / smoothed, 1e-4, 1e-6), "codebook[%lld, %lld]: %g vs %g",
            (long long)k, (long long)j, new_codebook[k * dim + j], average / smoothed);
    }
  }

  // Nothing counted yet (every cluster size and count 0): the codebook is kept, not 0 / 0.
  std::vector<float> zeros(entries, 0.0f), kept = codebook;
  vd_apply_statistics(kept.data(), zeros.data(), avg.data(), zeros.data(), sums.data(), entries, dim, decay, eps);
  for (int64_t i = 0; i < entries * dim; ++i) CHECK(kept[i] == codebook[i], "codebook element %lld changed", (long long)i);
}

int main() {
  test_cluster_statistics(false);
  test_cluster_statistics(true);
  test_apply_statistics();
  std::printf("visual dictionary kernels: ok\n");
  return 0;
}
