#include "optimal_transport.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "ot_step.h"

// The hot per-problem loops are compiled for AVX-512, AVX2+FMA and the baseline, and the loader
// picks the best the machine has (GCC function multiversioning on x86-64 Linux); the build's
// flags stay baseline so the wheel runs everywhere.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define VLK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VLK_SIMD_CLONES
#endif

namespace vlkernels {
namespace cpu {
namespace {

namespace ot = vlkernels::ot;

// Rows are padded to a multiple of 16 floats (one AVX-512 register, two AVX2 ones), so every
// inner loop runs whole vectors; entries past the end hold zeros (or -inf logs) that add nothing.
constexpr int64_t kLanes = 16;

int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// exp(x) in fp32 for vector loops: Cephes' expf (range reduction by ln 2, degree-6 polynomial,
// ~1 ulp). Branch-free so that loops over it vectorise; x < -87 gives 0 (fp32's normal range
// ends at exp(-87.3)), so -inf marks entries off the support.
inline float exp_vec(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  // round-to-nearest by the 1.5 * 2^23 trick: no call to nearbyint, vectorises on SSE2
  const float shifted = clamped * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 split in two for exactness
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : e * scale;
}

#if defined(__GNUC__)
// The vector helpers are internal (inlined): the ABI note GCC gives on 64-byte vector returns
// in the baseline clone does not apply.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// 16 floats as one value: a zmm register, two ymm or four xmm ones, by the clone being compiled.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneIndex __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Sum of the 16 lanes by halving (shuffles within registers, no trip through memory).
inline float sum_lanes(Lanes v) {
  v += __builtin_shuffle(v, LaneIndex{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, LaneIndex{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, LaneIndex{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, LaneIndex{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// sum_j a_j * b_j over n (a multiple of kLanes) entries, in 16 lane-wise partial sums.
inline float dot(const float* a, const float* b, int64_t n) {
  Lanes acc = {};
  for (int64_t j = 0; j < n; j += kLanes) acc += load_lanes(a + j) * load_lanes(b + j);
  return sum_lanes(acc);
}


// sum_d a_d * b_d over any length n (vectors, then a scalar tail).
inline float dot_any(const float* a, const float* b, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  float sum = whole ? dot(a, b, whole) : 0.0f;
  for (int64_t d = whole; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// 8 floats: one ymm register (AVX2, AVX-512), two xmm ones.
typedef float Eight __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t EightIndex __attribute__((vector_size(8 * sizeof(int32_t))));

inline Eight load_eight(const float* p) {
  Eight v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum_eight(Eight v) {
  v += __builtin_shuffle(v, EightIndex{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, EightIndex{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, EightIndex{1, 0, 3, 2, 5, 4, 7, 6});
  return v[0];
}

// out[a][b] = <x[a], y[b]> for four rows of x and four of y, each of length n, as two 4 x 2
// blocks: eight 8-float accumulators and six operands fit AVX2's sixteen ymm registers (a
// 4 x 4 block of 16-float accumulators would take 32 and spill), the rows streaming from L1.
inline void dot_4x4(const float* const* x, const float* const* y, int64_t n, float out[4][4]) {
  const int64_t whole = n / 8 * 8;
  for (int b0 = 0; b0 < 4; b0 += 2) {
    Eight acc[4][2] = {};
    for (int64_t d = 0; d < whole; d += 8) {
      const Eight y0 = load_eight(y[b0] + d), y1 = load_eight(y[b0 + 1] + d);
      for (int a = 0; a < 4; ++a) {
        const Eight xv = load_eight(x[a] + d);
        acc[a][0] += xv * y0;
        acc[a][1] += xv * y1;
      }
    }
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 2; ++b) {
        float sum = sum_eight(acc[a][b]);
        for (int64_t d = whole; d < n; ++d) sum += x[a][d] * y[b0 + b][d];
        out[a][b0 + b] = sum;
      }
    }
  }
}
// acc[g][d] = sum_t w4[4 t + g] * rows[t][d] for g < 4, d < n, rows[t] = base + index[t] * n:
// 16 floats of four outputs (eight accumulators) stay in registers while the rows stream by.
inline void weighted_rows_4(const float* base, const int64_t* index, int64_t count, int64_t n, const float* w4,
                            float* acc) {
  const int64_t whole = n / 16 * 16;
  for (int64_t d = 0; d < whole; d += 16) {
    Eight sum[4][2] = {};
    for (int64_t t = 0; t < count; ++t) {
      const float* row = base + index[t] * n + d;
      const Eight r0 = load_eight(row), r1 = load_eight(row + 8);
      for (int g = 0; g < 4; ++g) {
        const float w = w4[4 * t + g];
        sum[g][0] += w * r0;
        sum[g][1] += w * r1;
      }
    }
    for (int g = 0; g < 4; ++g) {
      std::memcpy(acc + g * n + d, &sum[g][0], sizeof(Eight));
      std::memcpy(acc + g * n + d + 8, &sum[g][1], sizeof(Eight));
    }
  }
  for (int64_t d = whole; d < n; ++d) {
    for (int g = 0; g < 4; ++g) {
      float sum = 0.0f;
      for (int64_t t = 0; t < count; ++t) sum += w4[4 * t + g] * base[index[t] * n + d];
      acc[g * n + d] = sum;
    }
  }
}
#else
inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}
inline float dot_any(const float* a, const float* b, int64_t n) { return dot(a, b, n); }
inline void dot_4x4(const float* const* x, const float* const* y, int64_t n, float out[4][4]) {
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) out[a][b] = dot(x[a], y[b], n);
  }
}
inline void weighted_rows_4(const float* base, const int64_t* index, int64_t count, int64_t n, const float* w4,
                            float* acc) {
  std::fill(acc, acc + 4 * n, 0.0f);
  for (int64_t t = 0; t < count; ++t) {
    const float* row = base + index[t] * n;
    for (int g = 0; g < 4; ++g) {
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) acc[g * n + d] += w4[4 * t + g] * row[d];
    }
  }
}
#endif

// Denormals flushed to zero while a kernel runs: IPOT's plans decay geometrically (T ~ A^t),
// and x86 handles subnormal operands in microcode, hundreds of times slower. Restored after.
class FlushDenormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// One problem's working set, reused across the problems a thread solves.
struct Scratch {
  std::vector<float> kernel, work, col_vec, col_acc, col_pen, col_aux, row_vec, row_pen, row_aux;
  std::vector<float> cost, x_len, y_len, accum, w4;  // WRA: the cost of the stored rows, norms, gradient rows
  std::vector<int64_t> row_index, col_index;
  void resize(int64_t rows, int64_t cols, int64_t dim = 0) {
    const int64_t npad = padded(cols);
    row_index.resize(rows);
    col_index.resize(cols);
    col_aux.resize(npad);
    if (dim > 0) {
      cost.resize(std::max(rows * npad, rows * cols));
      x_len.resize(rows);
      y_len.resize(cols);
      accum.resize(4 * dim);
      w4.resize(4 * std::max(rows, cols));
    }
    kernel.resize(rows * npad);
    work.resize(rows * npad);
    col_vec.resize(npad);
    col_acc.resize(npad);
    col_pen.resize(npad);
    row_vec.resize(rows);
    row_pen.resize(rows);
    row_aux.resize(rows);
  }
};

// Where a problem's cost comes from: a cost matrix by original row (ipot), or (WRA) one the
// caller formed for the stored (valid) rows, [valid rows, padded(col_end)].
struct CostSource {
  const float* cost;       // [rows, cols], or nullptr
  const float* row_costs;  // WRA
  float at(int64_t r, int64_t i, int64_t j, int64_t cols, int64_t npad) const {
    return cost ? cost[i * cols + j] : row_costs[r * npad + j];
  }
};

// The valid rows in order (the rows ipot_problem stores) and one past the last valid column.
struct Compaction {
  int64_t rows, cols, col_end;
};

Compaction compact(const uint8_t* x_mask, const uint8_t* y_mask, int64_t rows, int64_t cols, int64_t* row_index,
                   int64_t* col_index) {
  Compaction c{0, 0, 0};
  for (int64_t i = 0; i < rows; ++i) {
    if (x_mask[i]) row_index[c.rows++] = i;
  }
  for (int64_t j = 0; j < cols; ++j) {
    if (y_mask[j]) {
      col_index[c.cols++] = j;
      c.col_end = j + 1;
    }
  }
  return c;
}

// IPOT in the log domain on one problem (ot_step.h), for costs whose shifted range exceeds
// kIpotLogDomainAbove * beta: A holds log A = -shifted / beta on the stored (valid) rows
// (-inf off the valid columns), the row shifts are in s.row_pen; Q then holds log T.
// Every log-sum-exp takes its line's maximum first (two passes), so nothing over- or underflows.
VLK_SIMD_CLONES
float ipot_log_problem(const CostSource& source, const uint8_t* y_mask, int64_t cols, int64_t iters, int64_t k,
                       bool distance, float* plan, const Compaction& valid, float x_len, float y_len, float inv_beta,
                       Scratch& s) {
  const int64_t x_count = valid.rows, col_end = valid.col_end, npad = padded(col_end);
  const int64_t* row_index = s.row_index.data();
  const float* log_a = s.kernel.data();
  float* log_t = s.work.data();
  float* log_delta = s.col_vec.data();
  float* col_max = s.col_acc.data();
  float* col_sum = s.col_aux.data();
  float* log_sigma = s.row_vec.data();
  const float* row_shift = s.row_pen.data();
  const float log_x_len = std::log(x_len), log_y_len = std::log(y_len);
  for (int64_t r = 0; r < x_count; ++r) {
    log_sigma[r] = ot::ipot_initial_log_sigma(row_shift[r], inv_beta, x_len);
    for (int64_t j = 0; j < npad; ++j) log_t[r * npad + j] = log_a[r * npad + j] > -INFINITY ? 0.0f : -INFINITY;
  }
  auto valid_column = [&](int64_t j) { return j < cols && y_mask[j]; };
  for (int64_t t = 0; t < iters; ++t) {
    float* log_q = log_t;  // log Q = log A + log T, in place
    for (int64_t e = 0; e < x_count * npad; ++e) log_q[e] += log_a[e];
    for (int64_t round = 0; round < k; ++round) {
      // log delta_j = -log y_len - LSE_i(log Q_ij + log sigma_i)
      std::fill(col_max, col_max + npad, -INFINITY);
      for (int64_t r = 0; r < x_count; ++r) {
        const float* q_row = log_q + r * npad;
        for (int64_t j = 0; j < npad; ++j) col_max[j] = std::max(col_max[j], q_row[j] + log_sigma[r]);
      }
      for (int64_t j = 0; j < npad; ++j) col_max[j] = col_max[j] > -INFINITY ? col_max[j] : 0.0f;
      std::fill(col_sum, col_sum + npad, 0.0f);
      for (int64_t r = 0; r < x_count; ++r) {
        const float* q_row = log_q + r * npad;
        const float ls = log_sigma[r];
#pragma omp simd
        for (int64_t j = 0; j < npad; ++j) col_sum[j] += exp_vec(q_row[j] + ls - col_max[j]);
      }
      for (int64_t j = 0; j < npad; ++j) {
        log_delta[j] = valid_column(j) ? ot::ipot_log_scaling(log_y_len, col_max[j] + std::log(col_sum[j]))
                                       : -INFINITY;
      }
      // log sigma_i = -log x_len - LSE_j(log Q_ij + log delta_j)
      for (int64_t r = 0; r < x_count; ++r) {
        const float* q_row = log_q + r * npad;
        float m = -INFINITY;
        for (int64_t j = 0; j < npad; ++j) m = std::max(m, q_row[j] + log_delta[j]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < npad; ++j) sum += exp_vec(q_row[j] + log_delta[j] - m);
        log_sigma[r] = ot::ipot_log_scaling(log_x_len, m + std::log(sum));
      }
    }
    for (int64_t r = 0; r < x_count; ++r) {  // log T = log delta + log Q + log sigma
      float* row = log_t + r * npad;
      const float ls = log_sigma[r];
      for (int64_t j = 0; j < npad; ++j) row[j] = log_delta[j] + row[j] + ls;
    }
  }
  double total = 0.0;
  for (int64_t r = 0; r < x_count; ++r) {
    const int64_t i = row_index[r];
    const float* row = log_t + r * npad;
    float* out = plan + i * cols;
    for (int64_t j = 0; j < col_end; ++j) {
      if (!y_mask[j]) continue;
      const float entry = std::exp(row[j]);
      out[j] = entry;
      if (distance) total += static_cast<double>(source.at(r, i, j, cols, npad)) * entry;
    }
  }
  return static_cast<float>(total);
}

// UNITER's IPOT on one problem (see ot_step.h). Padded rows have Q = 0, so they add nothing
// to the column sums, and their plan rows are zero: only the valid rows are stored and swept,
// over the columns up to the last valid one. Each iteration is one sweep over those rows:
// row i's scaling sigma_i needs the row sum of delta * Q, after which the row's plan
// T = delta Q sigma, the next Q = A T and its share of the next column sums follow in place.
// Returns sum_ij C_ij T_ij when `distance` is asked for.
VLK_SIMD_CLONES
float ipot_problem(const CostSource& source, const uint8_t* x_mask, const uint8_t* y_mask, int64_t rows,
                   int64_t cols, float beta, int64_t iters, int64_t k, bool distance, float* plan, Scratch& s) {
  std::fill(plan, plan + rows * cols, 0.0f);
  int64_t* row_index = s.row_index.data();
  const Compaction valid = compact(x_mask, y_mask, rows, cols, row_index, s.col_index.data());
  const int64_t x_count = valid.rows, y_count = valid.cols, col_end = valid.col_end;
  if (x_count == 0 || y_count == 0) return 0.0f;  // an empty problem: zero plan and distance, as UNITER's masking gives
  const int64_t npad = padded(col_end);
  float* A = s.kernel.data();
  float* Q = s.work.data();
  float* delta = s.col_vec.data();
  float* col_sum = s.col_acc.data();
  float* y_pen = s.col_pen.data();
  const float x_len = static_cast<float>(x_count), y_len = static_cast<float>(y_count);
  const float inv_beta = 1.0f / beta;
  const float x_pen = ot::pad_penalty(true);  // every stored row is valid
  float* col_min = s.col_aux.data();
  float* row_shift = s.row_pen.data();
  float* sigmas = s.row_vec.data();

  // The shifts (ot_step.h): the valid entries' costs into A (+inf elsewhere), each column's
  // minimum, then each row's minimum of the column-shifted cost; A then holds -shifted / beta.
  for (int64_t j = 0; j < npad; ++j) y_pen[j] = ot::pad_penalty(j < cols && y_mask[j]);
  std::fill(col_min, col_min + npad, INFINITY);
  for (int64_t r = 0; r < x_count; ++r) {
    const int64_t i = row_index[r];
    float* a_row = A + r * npad;
    for (int64_t j = 0; j < col_end; ++j) a_row[j] = y_mask[j] ? source.at(r, i, j, cols, npad) : INFINITY;
    std::fill(a_row + col_end, a_row + npad, INFINITY);
    for (int64_t j = 0; j < npad; ++j) col_min[j] = std::min(col_min[j], a_row[j]);
  }
  float largest = 0.0f;  // max of the shifted cost
  for (int64_t r = 0; r < x_count; ++r) {
    float* a_row = A + r * npad;
    float row_min = INFINITY;
    for (int64_t j = 0; j < npad; ++j) {
      a_row[j] = a_row[j] < INFINITY ? a_row[j] - col_min[j] : INFINITY;
      row_min = std::min(row_min, a_row[j]);
    }
    row_shift[r] = row_min;  // finite: every stored row has a valid column
    for (int64_t j = 0; j < npad; ++j) {
      const float shifted = a_row[j] < INFINITY ? a_row[j] - row_min : INFINITY;
      if (shifted < INFINITY) largest = std::max(largest, shifted);
      a_row[j] = shifted < INFINITY ? -shifted * inv_beta : -INFINITY;
    }
  }
  if (largest * inv_beta > ot::kIpotLogDomainAbove) {
    return ipot_log_problem(source, y_mask, cols, iters, k, distance, plan, valid, x_len, y_len, inv_beta, s);
  }

  std::fill(col_sum, col_sum + npad, 0.0f);
  for (int64_t r = 0; r < x_count; ++r) {
    float* a_row = A + r * npad;
    const float sigma = ot::ipot_initial_sigma(row_shift[r], inv_beta, x_len);
    sigmas[r] = sigma;
#pragma omp simd
    for (int64_t j = 0; j < npad; ++j) {
      a_row[j] = exp_vec(a_row[j]);  // exp(-inf) = 0 on padding
      col_sum[j] += a_row[j] * sigma;  // Q = A * T with T = 1 on valid entries
    }
    std::memcpy(Q + r * npad, a_row, sizeof(float) * npad);
  }

  double total = 0.0;  // the distance: fp64 sum of up to rows * cols terms, once
  for (int64_t t = 0; t < iters; ++t) {
    // delta_j = 1 / (y_len * sum_i Q_ij sigma_i + pen_j), from the column sums of the last sweep
#pragma omp simd
    for (int64_t j = 0; j < npad; ++j) delta[j] = ot::ipot_scaling(y_len, col_sum[j], y_pen[j]);
    for (int64_t round = 1; round < k; ++round) {  // inner rounds before the fused last one
      std::fill(col_sum, col_sum + npad, 0.0f);
      for (int64_t r = 0; r < x_count; ++r) {
        const float* q_row = Q + r * npad;
        const float sig = ot::ipot_scaling(x_len, dot(delta, q_row, npad), x_pen);
        sigmas[r] = sig;
#pragma omp simd
        for (int64_t j = 0; j < npad; ++j) col_sum[j] += q_row[j] * sig;
      }
#pragma omp simd
      for (int64_t j = 0; j < npad; ++j) delta[j] = ot::ipot_scaling(y_len, col_sum[j], y_pen[j]);
    }
    if (t + 1 < iters) {
      std::fill(col_sum, col_sum + npad, 0.0f);
      for (int64_t r = 0; r < x_count; ++r) {
        float* q_row = Q + r * npad;
        const float* a_row = A + r * npad;
        const float sig = ot::ipot_scaling(x_len, dot(delta, q_row, npad), x_pen);
#pragma omp simd
        for (int64_t j = 0; j < npad; ++j) {
          const float next_q = a_row[j] * ot::ipot_plan_entry(delta[j], q_row[j], sig);
          q_row[j] = next_q;
          col_sum[j] += next_q * sig;
        }
      }
      continue;
    }
    for (int64_t r = 0; r < x_count; ++r) {  // the last iteration writes the plan
      const int64_t i = row_index[r];
      const float* q_row = Q + r * npad;
      const float sig = ot::ipot_scaling(x_len, dot(delta, q_row, npad), x_pen);
      float* out = plan + i * cols;
      for (int64_t j = 0; j < col_end; ++j) {
        // UNITER re-masks T at the end; Q is 0 on padding, so this only matters for NaNs.
        if (!y_mask[j]) continue;
        const float entry = ot::ipot_plan_entry(delta[j], q_row[j], sig);
        out[j] = entry;
        if (distance) total += static_cast<double>(source.at(r, i, j, cols, npad)) * entry;
      }
    }
  }
  return static_cast<float>(total);
}

// UNITER's WRA distance on one problem, from the embeddings x [rows, dim] and y [cols, dim]:
// the norms and the dot products of the valid rows and columns only (4 x 4 register blocks),
// the cosine cost of those entries, then IPOT and sum(C * T).
VLK_SIMD_CLONES
float wra_problem(const float* x, const float* y, const uint8_t* x_mask, const uint8_t* y_mask, int64_t rows,
                  int64_t cols, int64_t dim, float beta, int64_t iters, int64_t k, float* plan, Scratch& s) {
  const int64_t* row_index = s.row_index.data();
  const int64_t* col_index = s.col_index.data();
  const Compaction valid = compact(x_mask, y_mask, rows, cols, s.row_index.data(), s.col_index.data());
  const int64_t npad = padded(valid.col_end);
  float* cost = s.cost.data();
  float* x_len = s.x_len.data();
  float* y_len = s.y_len.data();
  std::fill(cost, cost + valid.rows * npad, 0.0f);
  for (int64_t r = 0; r < valid.rows; ++r) {
    const float* row = x + row_index[r] * dim;
    x_len[r] = std::sqrt(dot_any(row, row, dim));
  }
  for (int64_t c = 0; c < valid.cols; ++c) {
    const float* row = y + col_index[c] * dim;
    y_len[c] = std::sqrt(dot_any(row, row, dim));
  }
  for (int64_t r0 = 0; r0 < valid.rows; r0 += 4) {
    for (int64_t c0 = 0; c0 < valid.cols; c0 += 4) {
      const int64_t nr = std::min<int64_t>(4, valid.rows - r0), nc = std::min<int64_t>(4, valid.cols - c0);
      const float* xs[4];
      const float* ys[4];
      for (int a = 0; a < 4; ++a) xs[a] = x + row_index[r0 + std::min<int64_t>(a, nr - 1)] * dim;  // edge blocks
      for (int b = 0; b < 4; ++b) ys[b] = y + col_index[c0 + std::min<int64_t>(b, nc - 1)] * dim;  // repeat a row
      float dots[4][4];
      dot_4x4(xs, ys, dim, dots);
      for (int64_t a = 0; a < nr; ++a) {
        for (int64_t b = 0; b < nc; ++b) {
          cost[(r0 + a) * npad + col_index[c0 + b]] = ot::cosine_cost(dots[a][b], x_len[r0 + a], y_len[c0 + b]);
        }
      }
    }
  }
  const CostSource source{nullptr, cost};
  return ipot_problem(source, x_mask, y_mask, rows, cols, beta, iters, k, true, plan, s);
}

// The WRA distance's gradients on one problem: with S = grad * T / (max(|x_i|,eps) max(|y_j|,eps))
// over the valid entries, d/dx_i = -(S y)_i + [|x_i| > eps] ((S y)_i . x_i) x_i / max(|x_i|,eps)^2
// (and likewise for y with S^T); padded rows get zeros. Rows are accumulated four at a time,
// each streamed row of the other side feeding the four.
VLK_SIMD_CLONES
void wra_backward_problem(const float* x, const float* y, const uint8_t* x_mask, const uint8_t* y_mask,
                          const float* plan, float grad, int64_t rows, int64_t cols, int64_t dim, float* grad_x,
                          float* grad_y, Scratch& s) {
  std::fill(grad_x, grad_x + rows * dim, 0.0f);
  std::fill(grad_y, grad_y + cols * dim, 0.0f);
  const int64_t* row_index = s.row_index.data();
  const int64_t* col_index = s.col_index.data();
  const Compaction valid = compact(x_mask, y_mask, rows, cols, s.row_index.data(), s.col_index.data());
  if (valid.rows == 0 || valid.cols == 0 || grad == 0.0f) return;
  float* weight = s.cost.data();  // S [valid rows, valid cols]
  float* x_len = s.x_len.data();
  float* y_len = s.y_len.data();
  for (int64_t r = 0; r < valid.rows; ++r) {
    const float* row = x + row_index[r] * dim;
    x_len[r] = std::sqrt(dot_any(row, row, dim));
  }
  for (int64_t c = 0; c < valid.cols; ++c) {
    const float* row = y + col_index[c] * dim;
    y_len[c] = std::sqrt(dot_any(row, row, dim));
  }
  for (int64_t r = 0; r < valid.rows; ++r) {
    const float x_inv = 1.0f / std::max(x_len[r], ot::kNormalizeEps);
    const float* plan_row = plan + row_index[r] * cols;
    for (int64_t c = 0; c < valid.cols; ++c) {
      weight[r * valid.cols + c] = grad * plan_row[col_index[c]] * x_inv / std::max(y_len[c], ot::kNormalizeEps);
    }
  }
  float* accum = s.accum.data();  // four rows of (S y)
  float* w4 = s.w4.data();        // their weights, four per other row
  // side 0: the rows of x against y (S); side 1: the rows of y against x (S^T)
  for (int side = 0; side < 2; ++side) {
    const int64_t own_count = side == 0 ? valid.rows : valid.cols;
    const int64_t other_count = side == 0 ? valid.cols : valid.rows;
    const int64_t* own_index = side == 0 ? row_index : col_index;
    const int64_t* other_index = side == 0 ? col_index : row_index;
    const float* own = side == 0 ? x : y;
    const float* other = side == 0 ? y : x;
    const float* own_len = side == 0 ? x_len : y_len;
    float* out = side == 0 ? grad_x : grad_y;
    for (int64_t o0 = 0; o0 < own_count; o0 += 4) {
      const int64_t group = std::min<int64_t>(4, own_count - o0);
      for (int64_t t = 0; t < other_count; ++t) {  // the group's weights by other row, 0 past the group
        for (int64_t g = 0; g < 4; ++g) {
          const int64_t o = o0 + g;
          w4[4 * t + g] = g >= group ? 0.0f : side == 0 ? weight[o * valid.cols + t] : weight[t * valid.cols + o];
        }
      }
      weighted_rows_4(other, other_index, other_count, dim, w4, accum);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t o = o0 + g;
        const float* own_row = own + own_index[o] * dim;
        const float* acc = accum + g * dim;
        const float inv = 1.0f / std::max(own_len[o], ot::kNormalizeEps);
        const float radial = own_len[o] > ot::kNormalizeEps ? dot_any(acc, own_row, dim) * inv * inv : 0.0f;
        float* target = out + own_index[o] * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) target[d] = radial * own_row[d] - acc[d];
      }
    }
  }
}

// The log-domain Sinkhorn keeps the plan's entries E = exp(K + f + g) and rescales them by
// exp(g_new - g) = b_j / column sum and exp(f_new - f) = a_i / row sum as the potentials move
// (the scaling iteration on E, the potentials tracked in logs), so an iteration costs no
// exponential per entry. E is exponentiated afresh from K, f and g in the first
// kSinkhornWarmup iterations (the potentials move most), every kSinkhornExactEvery-th one (the
// rescalings' rounding stays within ~kSinkhornExactEvery ulp), and after a line's sum left
// [1e-30, 1e30] (its potential then comes from an exact log-sum-exp).
constexpr int64_t kSinkhornWarmup = 4;
constexpr int64_t kSinkhornExactEvery = 8;

// Sinkhorn on one problem (see ot_step.h), over its support only: the rows with a_i > 0 are
// stored compactly, the columns run to the last one with b_j > 0 (-inf / 0 kernel entries off
// it). Each iteration is the column update from the column sums of the last sweep, then one
// sweep over the rows: row i's sum gives its new potential (or scaling), after which its
// entries are rescaled and added into the next column sums. In the log domain each line's
// log-sum-exp is taken relative to its previous potential: the sum of its entries of E, the
// line's current marginal, at most ~1 per term, so no max pass is needed; a sum outside
// [1e-30, 1e30] (first iterations, extreme costs) is redone with the exact maximum.
VLK_SIMD_CLONES
void sinkhorn_problem(const float* cost, const float* a, const float* b, int64_t rows, int64_t cols, float reg,
                      int64_t iters, float tol, bool log_domain, float* plan, Scratch& s) {
  int64_t* row_index = s.row_index.data();
  int64_t count = 0, col_end = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (a[i] > 0.0f) row_index[count++] = i;
  }
  for (int64_t j = 0; j < cols; ++j) {
    if (b[j] > 0.0f) col_end = j + 1;
  }
  if (count == 0 || col_end == 0) {  // nothing to transport: zero plan
    std::fill(plan, plan + rows * cols, 0.0f);
    return;
  }
  const int64_t npad = padded(col_end);
  float* K = s.kernel.data();       // log domain: -C/reg (-inf off the support); else exp(-C/reg) (0 off it)
  float* g = s.col_vec.data();      // column potentials g_j (log) or scalings v_j; 0 off the support
  float* col_sum = s.col_acc.data();
  float* col_target = s.col_pen.data();  // log b_j (log) or b_j
  float* f = s.row_vec.data();      // row potentials f_i (log) or scalings u_i
  float* row_target = s.row_aux.data();  // log a_i (log) or a_i, by stored row
  float* E = s.work.data();         // log domain: the plan entries exp(K_ij + f_i + g_j)
  float* factor = s.col_aux.data(); // log domain: exp(g_new - g) per column (1 off the support)
  float* column = s.row_pen.data(); // one column of K + f, for an exact log-sum-exp
  const float inv_reg = 1.0f / reg;
  const bool check = tol >= 0.0f;   // tol < 0: no residual at all
  auto on_column = [&](int64_t j) { return j < cols && b[j] > 0.0f; };

  for (int64_t j = 0; j < npad; ++j) {
    col_target[j] = on_column(j) ? (log_domain ? std::log(b[j]) : b[j]) : 0.0f;
    g[j] = on_column(j) && !log_domain ? 1.0f : 0.0f;
    factor[j] = 1.0f;
  }
  std::fill(col_sum, col_sum + npad, 0.0f);
  for (int64_t r = 0; r < count; ++r) {
    const float* c_row = cost + row_index[r] * cols;
    float* k_row = K + r * npad;
    for (int64_t j = 0; j < npad; ++j) k_row[j] = on_column(j) ? -c_row[j] * inv_reg : -INFINITY;
    const float mass = a[row_index[r]];
    row_target[r] = log_domain ? std::log(mass) : mass;
    f[r] = log_domain ? 0.0f : 1.0f;
    // The first column sums: of E = exp(K) (f = g = 0), or of K u with u = 1.
    float* e_row = log_domain ? E + r * npad : k_row;
#pragma omp simd
    for (int64_t j = 0; j < npad; ++j) {
      e_row[j] = exp_vec(k_row[j]);
      col_sum[j] += e_row[j];
    }
  }

  bool rescaled = true;  // the last column update was a rescaling of E (no exact log-sum-exp)
  for (int64_t it = 0; it < iters; ++it) {
    // Column update from the last sweep's column sums (the plan's, log domain; else sum_i K_ij u_i).
    float err2 = 0.0f;
    rescaled = true;
    for (int64_t j = 0; j < col_end; ++j) {
      if (!on_column(j)) continue;
      float marginal, update;
      if (!log_domain) {
        marginal = g[j] * col_sum[j];
        update = ot::scaling_update(col_target[j], col_sum[j]);
      } else if (ot::shifted_sum_usable(col_sum[j])) {
        marginal = col_sum[j];
        update = ot::log_potential(col_target[j], ot::shifted_lse(col_sum[j], g[j]));
        factor[j] = ot::scaling_update(b[j], col_sum[j]);  // exp(update - g_j)
      } else {
        rescaled = false;
        for (int64_t r = 0; r < count; ++r) column[r] = K[r * npad + j] + f[r];
        float m = -INFINITY, sum = 0.0f;
        for (int64_t r = 0; r < count; ++r) ot::lse_push(m, sum, column[r]);
        const float lse = ot::lse_value(m, sum);
        marginal = ot::line_marginal(g[j], lse);
        update = ot::log_potential(col_target[j], lse);
      }
      if (check) {
        const float diff = marginal - b[j];
        err2 += diff * diff;
      }
      col_sum[j] = update;  // held back until the convergence test has passed
    }
    if (check && it > 0 && std::sqrt(err2) <= tol) break;
    for (int64_t j = 0; j < col_end; ++j) {
      if (on_column(j)) g[j] = col_sum[j];
    }
    // Row sweep: the row's new potential / scaling, then its entries into the next column sums.
    const bool exact = !rescaled || it < kSinkhornWarmup || it % kSinkhornExactEvery == 0;
    std::fill(col_sum, col_sum + npad, 0.0f);
    for (int64_t r = 0; r < count; ++r) {
      const float* k_row = K + r * npad;
      if (!log_domain) {  // u_i = a_i / sum_j K_ij v_j
        const float u = ot::scaling_update(row_target[r], dot(k_row, g, npad));
        f[r] = u;
#pragma omp simd
        for (int64_t j = 0; j < npad; ++j) col_sum[j] += k_row[j] * u;
        continue;
      }
      float* e_row = E + r * npad;
      const float fi = f[r];
      float sum = 0.0f;
      if (exact) {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < npad; ++j) {
          e_row[j] = exp_vec(k_row[j] + fi + g[j]);
          sum += e_row[j];
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < npad; ++j) {
          e_row[j] *= factor[j];
          sum += e_row[j];
        }
      }
      if (ot::shifted_sum_usable(sum)) {
        f[r] = ot::log_potential(row_target[r], ot::shifted_lse(sum, fi));
        const float ratio = ot::scaling_update(a[row_index[r]], sum);  // exp(f_new - f_i)
#pragma omp simd
        for (int64_t j = 0; j < npad; ++j) {
          e_row[j] *= ratio;
          col_sum[j] += e_row[j];
        }
      } else {
        float m = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < col_end; ++j) ot::lse_push(m, total, k_row[j] + g[j]);
        const float fr = ot::log_potential(row_target[r], ot::lse_value(m, total));
        f[r] = fr;
#pragma omp simd
        for (int64_t j = 0; j < npad; ++j) {
          e_row[j] = exp_vec(k_row[j] + fr + g[j]);
          col_sum[j] += e_row[j];
        }
      }
    }
  }

  // The plan, written once: every row of the problem, zero off the support.
  int64_t r = 0;
  for (int64_t i = 0; i < rows; ++i) {
    float* out = plan + i * cols;
    if (r == count || row_index[r] != i) {
      std::fill(out, out + cols, 0.0f);
      continue;
    }
    const float* k_row = K + r * npad;
    const float fi = f[r++];
    for (int64_t j = 0; j < cols; ++j) {
      out[j] = on_column(j) ? (log_domain ? std::exp(k_row[j] + fi + g[j]) : fi * k_row[j] * g[j]) : 0.0f;
    }
  }
}

// Runs solve(p, scratch) for every problem p of the batch, problems spread over the OpenMP
// threads (dynamic: problems differ in their valid lengths), each thread with its own scratch
// sized for rows x cols (x dim for WRA) and denormals flushed.
template <typename Solve>
void for_each_problem(int64_t batch, int64_t rows, int64_t cols, int64_t dim, Solve solve) {
#pragma omp parallel
  {
    FlushDenormals flush;
    Scratch scratch;
    scratch.resize(rows, cols, dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < batch; ++p) solve(p, scratch);
  }
}

}  // namespace

void ipot(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, int64_t batch, int64_t rows,
          int64_t cols, float beta, int64_t iters, int64_t k, float* plan) {
  for_each_problem(batch, rows, cols, 0, [&](int64_t p, Scratch& scratch) {
    const CostSource source{cost + p * rows * cols, nullptr};
    ipot_problem(source, x_mask + p * rows, y_mask + p * cols, rows, cols, beta, iters, k, false,
                 plan + p * rows * cols, scratch);
  });
}

void wra(const float* txt, const float* img, const uint8_t* x_mask, const uint8_t* y_mask, int64_t batch, int64_t rows,
         int64_t cols, int64_t dim, float beta, int64_t iters, int64_t k, float* plan, float* distance) {
  for_each_problem(batch, rows, cols, dim, [&](int64_t p, Scratch& scratch) {
    distance[p] = wra_problem(txt + p * rows * dim, img + p * cols * dim, x_mask + p * rows, y_mask + p * cols, rows,
                              cols, dim, beta, iters, k, plan + p * rows * cols, scratch);
  });
}

void wra_backward(const float* txt, const float* img, const uint8_t* x_mask, const uint8_t* y_mask, const float* plan,
                  const float* grad_distance, int64_t batch, int64_t rows, int64_t cols, int64_t dim, float* grad_txt,
                  float* grad_img) {
  for_each_problem(batch, rows, cols, dim, [&](int64_t p, Scratch& scratch) {
    wra_backward_problem(txt + p * rows * dim, img + p * cols * dim, x_mask + p * rows, y_mask + p * cols,
                         plan + p * rows * cols, grad_distance[p], rows, cols, dim, grad_txt + p * rows * dim,
                         grad_img + p * cols * dim, scratch);
  });
}

void sinkhorn(const float* cost, const float* a, const float* b, int64_t batch, int64_t rows, int64_t cols,
              float reg, int64_t iters, float tol, bool log_domain, float* plan) {
  for_each_problem(batch, rows, cols, 0, [&](int64_t p, Scratch& scratch) {
    sinkhorn_problem(cost + p * rows * cols, a + p * rows, b + p * cols, rows, cols, reg, iters, tol, log_domain,
                     plan + p * rows * cols, scratch);
  });
}

}  // namespace cpu
}  // namespace vlkernels
