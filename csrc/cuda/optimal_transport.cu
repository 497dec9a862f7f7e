#include "optimal_transport.h"

#include "ot_step.h"

namespace vlkernels {
namespace cuda {
namespace {

namespace ot = vlkernels::ot;

constexpr int kThreads = 256;  // 8 warps per problem: rows spread over warps, columns over threads
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fminf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Warp-wide online log-sum-exp (base 2): merge the lanes' (max, sum) pairs.
__device__ __forceinline__ float warp_lse2(float m, float s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_m = __shfl_xor_sync(kFullMask, m, offset);
    const float other_s = __shfl_xor_sync(kFullMask, s, offset);
    ot::lse2_merge(m, s, other_m, other_s);
  }
  return ot::lse2_value(m, s);
}

// Sum over the block of one value per thread, returned to every thread. scratch: kWarps floats.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  __syncthreads();  // the previous use of scratch is over
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Max over the block of one value per thread, returned to every thread. scratch: kWarps floats.
__device__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  __syncthreads();  // the previous use of scratch is over
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float largest = scratch[0];
  for (int w = 1; w < kWarps; ++w) largest = fmaxf(largest, scratch[w]);
  return largest;
}

// The indices i < n with keep(i), in increasing order, into index[] (shared); returns their
// count to every thread. All threads take part: each chunk of kThreads indices is ranked by
// warp ballots and the warps' counts (warp_counts: kWarps shared ints), not by one thread.
template <typename Keep>
__device__ int compact_indices(int n, Keep keep, int* index, int* warp_counts) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int base = 0;
  for (int start = 0; start < n; start += kThreads) {
    const int i = start + static_cast<int>(threadIdx.x);
    const bool on = i < n && keep(i);
    const unsigned ballot = __ballot_sync(kFullMask, on);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = base, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (on) index[offset + __popc(ballot & ((1u << lane) - 1u))] = i;
    __syncthreads();  // warp_counts is read before the next chunk writes it; index is complete
    base += total;
  }
  return base;
}

// Zeros the plan rows i with !kept(i) ([rows, cols], each element once): with the rows the
// kernels write themselves, every plan element is written exactly once.
template <typename Kept>
__device__ void zero_other_rows(float* plan, int rows, int cols, Kept kept) {
  for (int i = threadIdx.x >> 5; i < rows; i += kWarps) {
    if (kept(i)) continue;
    for (int j = threadIdx.x & 31; j < cols; j += 32) plan[static_cast<int64_t>(i) * cols + j] = 0.0f;
  }
}

struct IpotArgs {
  const float* cost;  // [batch, rows, cols], or nullptr for WRA
  const float* sim;   // WRA: [batch, rows, cols] similarities
  const float* x_norm;
  const float* y_norm;
  const uint8_t* x_mask;
  const uint8_t* y_mask;
  int rows, cols, ld;  // ld: cols rounded up to 32, the shared-memory row stride
  float inv_beta;  // 1 / beta; the kernels scale by log2(e) / beta (base-2 units, ot_step.h)
  int iters, k;
  float* plan;
  float* distance;  // WRA: [batch], else nullptr
};

__device__ __forceinline__ float cost_at(const IpotArgs& args, int64_t problem, int i, int j) {
  const int64_t offset = (problem * args.rows + i) * args.cols + j;
  if (args.cost) return args.cost[offset];
  return ot::cosine_cost(args.sim[offset], args.x_norm[problem * args.rows + i], args.y_norm[problem * args.cols + j]);
}

// Shared memory of one IPOT problem, in floats: A and Q [rows][ld], per-warp column partial sums
// [kWarps][ld], delta and the column penalties [ld], sigma [rows], a reduction scratch, then the
// valid rows' indices [rows] (ints).
int64_t ipot_shared_floats(int64_t rows, int64_t ld) { return 2 * rows * ld + (kWarps + 2) * ld + 2 * rows + kWarps; }

// IPOT in the log domain (ot_step.h, base 2) for a block whose shifted cost spans more than
// kIpotLogDomainAbove * beta: A holds log2 A, Q log2 T, sigma / delta their log2s. Columns: a
// thread per column, its log-sum-exp in two passes (max, then sum); rows: a warp per row.
// Writes the plan and (WRA) the distance.
__device__ void ipot_log_sweeps(const IpotArgs& args, int64_t problem, const float* A, float* Q, float* delta,
                                float* sigma, float* scratch, const int* row_index, int count, float x_len,
                                float y_len, float* plan) {
  const int cols = args.cols, ld = args.ld;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint8_t* y_mask = args.y_mask + problem * cols;
  const float log_x_len = log2f(x_len), log_y_len = log2f(y_len);
  for (int t = 0; t < args.iters; ++t) {
    for (int e = tid; e < count * ld; e += kThreads) Q[e] += A[e];  // log Q = log A + log T
    __syncthreads();
    for (int round = 0; round < args.k; ++round) {
      for (int j = tid; j < ld; j += kThreads) {
        float m = -INFINITY;
        for (int r = 0; r < count; ++r) m = fmaxf(m, Q[r * ld + j] + sigma[r]);
        m = m > -INFINITY ? m : 0.0f;
        float sum = 0.0f;
        for (int r = 0; r < count; ++r) sum += exp2f(Q[r * ld + j] + sigma[r] - m);
        delta[j] = j < cols && y_mask[j] ? ot::ipot_log_scaling(log_y_len, m + log2f(sum)) : -INFINITY;
      }
      __syncthreads();
      for (int r = warp; r < count; r += kWarps) {
        const float* q_row = Q + r * ld;
        float m = -INFINITY;
        for (int j = lane; j < ld; j += 32) m = fmaxf(m, q_row[j] + delta[j]);
        m = warp_max(m);  // finite: the row has a valid column
        float sum = 0.0f;
        for (int j = lane; j < ld; j += 32) sum += exp2f(q_row[j] + delta[j] - m);
        sum = warp_sum(sum);
        if (lane == 0) sigma[r] = ot::ipot_log_scaling(log_x_len, m + log2f(sum));
      }
      __syncthreads();
    }
    for (int e = tid; e < count * ld; e += kThreads) Q[e] = delta[e % ld] + Q[e] + sigma[e / ld];
    __syncthreads();
  }
  double distance = 0.0;
  for (int r = warp; r < count; r += kWarps) {
    const int i = row_index[r];
    for (int j = lane; j < cols; j += 32) {
      const float entry = y_mask[j] ? exp2f(Q[r * ld + j]) : 0.0f;  // UNITER re-masks T at the end
      plan[static_cast<int64_t>(i) * cols + j] = entry;
      if (args.distance && y_mask[j]) distance += static_cast<double>(cost_at(args, problem, i, j)) * entry;
    }
  }
  if (args.distance) {
    const float total = block_sum(static_cast<float>(distance), scratch);
    if (tid == 0) args.distance[problem] = total;
  }
}

// UNITER's IPOT (ot_step.h) on one problem per block. Only the valid rows are stored (padded
// rows have Q = 0 and zero plan rows). Each iteration is one sweep: a warp takes a row, sums
// delta * Q over it with a shuffle reduction to get sigma_i, then updates T = delta Q sigma and
// the next Q = A T in place, adding Q * sigma into its own partial column sums; the block then
// adds the warps' partials into the next delta.
__global__ void __launch_bounds__(kThreads) ipot_kernel(IpotArgs args) {
  extern __shared__ float smem[];
  const int64_t problem = blockIdx.x;
  const int rows = args.rows, cols = args.cols, ld = args.ld;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* A = smem;
  float* Q = A + rows * ld;
  float* partial = Q + rows * ld;
  float* delta = partial + kWarps * ld;
  float* y_pen = delta + ld;
  float* sigma = y_pen + ld;
  float* scratch = sigma + rows;
  int* row_index = reinterpret_cast<int*>(scratch + kWarps);
  __shared__ int warp_counts[kWarps];

  const uint8_t* x_mask = args.x_mask + problem * rows;
  const uint8_t* y_mask = args.y_mask + problem * cols;
  float* plan = args.plan + problem * rows * cols;
  const int count = compact_indices(rows, [&](int i) { return x_mask[i] != 0; }, row_index, warp_counts);
  float y_valid = 0.0f;
  for (int j = tid; j < cols; j += kThreads) y_valid += y_mask[j] != 0 ? 1.0f : 0.0f;
  const float y_len = block_sum(y_valid, scratch);  // exact: a count below 2^24
  if (count == 0 || y_len == 0.0f) {  // an empty problem: zero plan and distance
    zero_other_rows(plan, rows, cols, [](int) { return false; });
    if (args.distance && tid == 0) args.distance[problem] = 0.0f;
    return;
  }
  zero_other_rows(plan, rows, cols, [&](int i) { return x_mask[i] != 0; });  // the padded rows' zeros
  const float x_len = static_cast<float>(count);
  const float log2_scale = args.inv_beta * ot::kLog2e;
  const float x_pen = ot::pad_penalty(true);  // every stored row is valid

  for (int j = tid; j < ld; j += kThreads) y_pen[j] = ot::pad_penalty(j < cols && y_mask[j]);
  // The shifts (ot_step.h): column minima over the valid rows (into partial, free until the
  // sweeps), then the row minima of the column-shifted cost (into sigma, until it is set).
  float* col_min = partial;
  for (int j = tid; j < ld; j += kThreads) {
    float lowest = INFINITY;
    if (j < cols && y_mask[j]) {
      for (int r = 0; r < count; ++r) lowest = fminf(lowest, cost_at(args, problem, row_index[r], j));
    }
    col_min[j] = lowest;
  }
  __syncthreads();
  float largest = 0.0f;  // this thread's share of the shifted cost's max
  for (int r = warp; r < count; r += kWarps) {
    float lowest = INFINITY;
    for (int j = lane; j < cols; j += 32) {
      if (y_mask[j]) lowest = fminf(lowest, cost_at(args, problem, row_index[r], j) - col_min[j]);
    }
    lowest = warp_min(lowest);  // finite: the problem has a valid column
    for (int j = lane; j < cols; j += 32) {
      if (y_mask[j]) largest = fmaxf(largest, cost_at(args, problem, row_index[r], j) - col_min[j] - lowest);
    }
    if (lane == 0) sigma[r] = lowest;
  }
  const bool log_domain = block_max(largest, scratch) * args.inv_beta > ot::kIpotLogDomainAbove;  // syncs
  for (int e = tid; e < count * ld; e += kThreads) {
    const int r = e / ld, j = e % ld;
    const bool valid = j < cols && y_mask[j];
    const float shifted = valid ? cost_at(args, problem, row_index[r], j) - col_min[j] - sigma[r] : 0.0f;
    if (log_domain) {  // A holds log2 A, Q log2 T
      A[e] = valid ? -shifted * log2_scale : -INFINITY;
      Q[e] = valid ? 0.0f : -INFINITY;
    } else {
      const float a = valid ? ot::ipot_affinity2(shifted, log2_scale) : 0.0f;
      A[e] = a;
      Q[e] = a;  // Q = A * T with T = 1 on valid entries
    }
  }
  __syncthreads();
  for (int r = tid; r < count; r += kThreads) {
    sigma[r] = log_domain ? ot::ipot_initial_log2_sigma(sigma[r], log2_scale, x_len)
                          : ot::ipot_initial_sigma2(sigma[r], log2_scale, x_len);
  }
  __syncthreads();
  if (log_domain) {
    ipot_log_sweeps(args, problem, A, Q, delta, sigma, scratch, row_index, count, x_len, y_len, plan);
    return;
  }

  auto column_scaling = [&]() {  // delta_j = 1 / (y_len * sum_i Q_ij sigma_i + pen_j)
    for (int j = tid; j < ld; j += kThreads) {
      float sum = 0.0f;
      for (int r = 0; r < count; ++r) sum += Q[r * ld + j] * sigma[r];
      delta[j] = ot::ipot_scaling(y_len, sum, y_pen[j]);
    }
    __syncthreads();
  };
  column_scaling();

  double distance = 0.0;  // the WRA distance: fp64 sum of the last iteration's C * T
  for (int t = 0; t < args.iters; ++t) {
    for (int round = 1; round < args.k; ++round) {  // inner rounds before the fused last one
      for (int r = warp; r < count; r += kWarps) {
        float sum = 0.0f;
        for (int j = lane; j < ld; j += 32) sum += delta[j] * Q[r * ld + j];
        sum = warp_sum(sum);
        if (lane == 0) sigma[r] = ot::ipot_scaling(x_len, sum, x_pen);
      }
      __syncthreads();
      column_scaling();
    }
    const bool last = t + 1 == args.iters;
    float* own = partial + warp * ld;
    if (!last) {
      for (int j = lane; j < ld; j += 32) own[j] = 0.0f;
    }
    for (int r = warp; r < count; r += kWarps) {
      float* q_row = Q + r * ld;
      float sum = 0.0f;
      for (int j = lane; j < ld; j += 32) sum += delta[j] * q_row[j];
      const float sig = ot::ipot_scaling(x_len, warp_sum(sum), x_pen);
      if (!last) {
        const float* a_row = A + r * ld;
        for (int j = lane; j < ld; j += 32) {
          const float next_q = a_row[j] * ot::ipot_plan_entry(delta[j], q_row[j], sig);
          q_row[j] = next_q;
          own[j] += next_q * sig;
        }
        continue;
      }
      const int i = row_index[r];
      for (int j = lane; j < cols; j += 32) {  // UNITER re-masks T at the end
        const float entry = y_mask[j] ? ot::ipot_plan_entry(delta[j], q_row[j], sig) : 0.0f;
        plan[static_cast<int64_t>(i) * cols + j] = entry;
        if (args.distance && y_mask[j]) distance += static_cast<double>(cost_at(args, problem, i, j)) * entry;
      }
    }
    if (!last) {
      __syncthreads();
      for (int j = tid; j < ld; j += kThreads) {
        float sum = 0.0f;
        for (int w = 0; w < kWarps; ++w) sum += partial[w * ld + j];
        delta[j] = ot::ipot_scaling(y_len, sum, y_pen[j]);
      }
      __syncthreads();
    }
  }
  if (args.distance) {
    const float total = block_sum(static_cast<float>(distance), scratch);
    if (tid == 0) args.distance[problem] = total;
  }
}

struct SinkhornArgs {
  const float* cost;
  const float* a;
  const float* b;
  int rows, cols, ld;
  float inv_reg;  // 1 / reg; the kernel scales by log2(e) / reg (base-2 units, ot_step.h)
  int iters;
  float tol;
  bool log_domain;
  float* plan;
};

// Shared memory of one Sinkhorn problem, in floats: K [rows][ld], g, the column targets and the
// pending column updates [ld], f [rows], a reduction scratch, then the support rows' indices.
int64_t sinkhorn_shared_floats(int64_t rows, int64_t ld) { return rows * ld + 3 * ld + 2 * rows + kWarps; }

// Sinkhorn (ot_step.h) on one problem per block, over its support. Columns: a thread per
// column sums exp(K + f + g) down the rows (the plan's column sums: the log-sum-exp shifted by
// the previous potential, redone exactly with the column's max when it under/overflows);
// rows: a warp per row, shuffle-reduced. The convergence test (tol) is a block reduction.
__global__ void __launch_bounds__(kThreads) sinkhorn_kernel(SinkhornArgs args) {
  extern __shared__ float smem[];
  const int64_t problem = blockIdx.x;
  const int rows = args.rows, cols = args.cols, ld = args.ld;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool log_domain = args.log_domain;
  float* K = smem;
  float* g = K + rows * ld;
  float* target = g + ld;
  float* pending = target + ld;
  float* f = pending + ld;
  float* row_target = f + rows;
  float* scratch = row_target + rows;
  int* row_index = reinterpret_cast<int*>(scratch + kWarps);
  __shared__ int warp_counts[kWarps];

  const float* a = args.a + problem * rows;
  const float* b = args.b + problem * cols;
  const float* cost = args.cost + problem * rows * cols;
  float* plan = args.plan + problem * rows * cols;
  const int count = compact_indices(rows, [&](int i) { return a[i] > 0.0f; }, row_index, warp_counts);
  float last = 0.0f;  // one past the last support column (exact as a float: below 2^24)
  for (int j = tid; j < cols; j += kThreads) last = b[j] > 0.0f ? static_cast<float>(j + 1) : last;
  const int col_end = static_cast<int>(block_max(last, scratch));
  if (count == 0 || col_end == 0) {  // nothing to transport: zero plan
    zero_other_rows(plan, rows, cols, [](int) { return false; });
    return;
  }
  zero_other_rows(plan, rows, cols, [&](int i) { return a[i] > 0.0f; });  // the rows off the support
  const float log2_scale = args.inv_reg * ot::kLog2e;

  for (int j = tid; j < ld; j += kThreads) {
    const bool on = j < cols && b[j] > 0.0f;
    target[j] = on ? (log_domain ? log2f(b[j]) : b[j]) : 0.0f;
    g[j] = on && !log_domain ? 1.0f : 0.0f;
  }
  for (int r = tid; r < count; r += kThreads) {
    const float mass = a[row_index[r]];
    row_target[r] = log_domain ? log2f(mass) : mass;
    f[r] = log_domain ? 0.0f : 1.0f;
  }
  for (int e = tid; e < count * ld; e += kThreads) {
    const int r = e / ld, j = e % ld;
    const bool on = j < cols && b[j] > 0.0f;
    const float scaled = -cost[static_cast<int64_t>(row_index[r]) * cols + (on ? j : 0)] * log2_scale;
    K[e] = log_domain ? (on ? scaled : -INFINITY) : (on ? exp2f(scaled) : 0.0f);
  }
  __syncthreads();

  for (int it = 0; it < args.iters; ++it) {
    float err2 = 0.0f;
    for (int j = tid; j < col_end; j += kThreads) {
      if (!(b[j] > 0.0f)) continue;
      float marginal, update;
      if (log_domain) {
        const float gj = g[j];
        float sum = 0.0f;
        for (int r = 0; r < count; ++r) sum += exp2f(K[r * ld + j] + f[r] + gj);
        if (ot::shifted_sum_usable(sum)) {
          marginal = sum;
          update = ot::log_potential(target[j], ot::shifted_lse2(sum, gj));
        } else {
          float m = -INFINITY, s = 0.0f;
          for (int r = 0; r < count; ++r) ot::lse2_push(m, s, K[r * ld + j] + f[r]);
          const float lse = ot::lse2_value(m, s);
          marginal = ot::line_marginal2(gj, lse);
          update = ot::log_potential(target[j], lse);
        }
      } else {
        float sum = 0.0f;
        for (int r = 0; r < count; ++r) sum += K[r * ld + j] * f[r];
        marginal = g[j] * sum;
        update = ot::scaling_update(target[j], sum);
      }
      const float diff = marginal - b[j];
      err2 += diff * diff;
      pending[j] = update;
    }
    // The marginal error only where a tolerance asks for it (tol < 0: every iteration runs);
    // either way a block barrier orders the pending writes before the reads below.
    if (args.tol >= 0.0f) {
      const float err = sqrtf(block_sum(err2, scratch));
      if (it > 0 && err <= args.tol) break;
    } else {
      __syncthreads();
    }
    for (int j = tid; j < col_end; j += kThreads) {
      if (b[j] > 0.0f) g[j] = pending[j];
    }
    __syncthreads();
    for (int r = warp; r < count; r += kWarps) {
      const float* k_row = K + r * ld;
      const float fr = f[r];
      float lse_or_sum;
      if (log_domain) {
        float sum = 0.0f;
        for (int j = lane; j < ld; j += 32) sum += exp2f(k_row[j] + fr + g[j]);
        sum = warp_sum(sum);
        if (ot::shifted_sum_usable(sum)) {
          lse_or_sum = ot::shifted_lse2(sum, fr);
        } else {
          float m = -INFINITY, s = 0.0f;
          for (int j = lane; j < ld; j += 32) ot::lse2_push(m, s, k_row[j] + g[j]);
          lse_or_sum = warp_lse2(m, s);
        }
      } else {
        float sum = 0.0f;
        for (int j = lane; j < ld; j += 32) sum += k_row[j] * g[j];
        lse_or_sum = warp_sum(sum);
      }
      if (lane == 0) {
        f[r] = log_domain ? ot::log_potential(row_target[r], lse_or_sum)
                          : ot::scaling_update(row_target[r], lse_or_sum);
      }
    }
    __syncthreads();
  }

  for (int e = tid; e < count * cols; e += kThreads) {  // the support rows, each entry once
    const int r = e / cols, j = e % cols;
    float entry = 0.0f;
    if (j < col_end && b[j] > 0.0f) {
      const float k = K[r * ld + j];
      entry = log_domain ? exp2f(k + f[r] + g[j]) : f[r] * k * g[j];
    }
    plan[static_cast<int64_t>(row_index[r]) * cols + j] = entry;
  }
}

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;  // the default limit needs no opt-in
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

cudaError_t launch_ipot(const float* cost, const float* sim, const float* x_norm, const float* y_norm,
                        const uint8_t* x_mask, const uint8_t* y_mask, int64_t batch, int64_t rows, int64_t cols,
                        float beta, int64_t iters, int64_t k, float* plan, float* distance, cudaStream_t stream) {
  const int64_t ld = round32(cols);
  // one block per problem on grid axis x (up to 2^31 - 1 blocks; axes y and z stay 1)
  if (rows * ld > kMaxIpotTile || beta <= 0.0f || iters < 1 || k < 1 || batch > INT32_MAX) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const int64_t bytes = ipot_shared_floats(rows, ld) * sizeof(float) + rows * sizeof(int);
  cudaError_t error = allow_shared(ipot_kernel, bytes);
  if (error != cudaSuccess) return error;
  const IpotArgs args{cost, sim, x_norm, y_norm, x_mask, y_mask, static_cast<int>(rows), static_cast<int>(cols),
                      static_cast<int>(ld), 1.0f / beta, static_cast<int>(iters), static_cast<int>(k), plan, distance};
  ipot_kernel<<<static_cast<unsigned>(batch), kThreads, bytes, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_sinkhorn(const float* cost, const float* a, const float* b, int64_t batch, int64_t rows,
                            int64_t cols, float reg, int64_t iters, float tol, bool log_domain, float* plan,
                            cudaStream_t stream) {
  const int64_t ld = round32(cols);
  if (rows * ld > kMaxSinkhornTile || reg <= 0.0f || iters < 1 || batch > INT32_MAX) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const int64_t bytes = sinkhorn_shared_floats(rows, ld) * sizeof(float) + rows * sizeof(int);
  cudaError_t error = allow_shared(sinkhorn_kernel, bytes);
  if (error != cudaSuccess) return error;
  const SinkhornArgs args{cost, a, b, static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(ld),
                          1.0f / reg, static_cast<int>(iters), tol, log_domain, plan};
  sinkhorn_kernel<<<static_cast<unsigned>(batch), kThreads, bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vlkernels
