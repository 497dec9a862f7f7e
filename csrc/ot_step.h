// The per-step math of the optimal-transport kernels, shared by the CPU kernels
// (csrc/cpu/optimal_transport.cpp, built and tested on every CI run) and the CUDA kernels
// (csrc/cuda/optimal_transport.cu): both sweep their tiles differently (SIMD lanes over a row
// vs. warps over rows and lanes over columns) but every scalar update they make is one of
// these functions, so the two agree step for step.
//
// IPOT (UNITER model/ot.py), on a plan P [M, N] with rows x (text) and columns y (regions):
//   init   sigma_i = 1/x_len on valid rows (0 on pads); Q = A = exp(-C/beta) on joint-valid
//          entries, 0 elsewhere (T starts at 1 there)
//   step   delta_j = 1 / (y_len * sum_i Q_ij sigma_i + pen_j)        (column scaling)
//          sigma_i = 1 / (x_len * sum_j delta_j Q_ij + pen_i)        (row scaling; k rounds)
//          T_ij = delta_j * Q_ij * sigma_i;  next Q_ij = A_ij * T_ij
//   pen = 1e4 on padding, 0 on valid entries (UNITER's x_mask / y_mask).
//   The cost is shifted first (vlkernels/reference ipot_shifts): each column's minimum over its
//   valid rows is subtracted (absorbed by delta_j), then each row's minimum r_i (absorbed by
//   sigma_i once the initial sigma_i is exp(-r_i/beta)/x_len): the same plan, with an A of 1 in
//   every valid row and column. If the shifted cost still exceeds kIpotLogDomainAbove * beta,
//   the loop runs in the log domain (log delta_j = -log y_len - LSE_i(log Q_ij + log sigma_i),
//   log sigma_i likewise, log T = log delta + log Q + log sigma), where fp32 cannot underflow.
// Sinkhorn (POT's sinkhorn_log / sinkhorn_knopp order: columns, then rows), on the support
// (entries with positive mass):
//   log domain: g_j = log b_j - LSE_i(f_i + K_ij);  f_i = log a_i - LSE_j(g_j + K_ij);  K = -C/reg
//   scaling:    v_j = b_j / sum_i K_ij u_i;         u_i = a_i / sum_j K_ij v_j;        K = exp(-C/reg)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VLK_OT_HD __host__ __device__ __forceinline__
#else
#define VLK_OT_HD inline
#endif

namespace vlkernels {
namespace ot {

constexpr float kPadPenalty = 1e4f;     // UNITER: x_mask = x_pad * 1e4, y_mask = y_pad * 1e4
constexpr float kNormalizeEps = 1e-5f;  // UNITER: F.normalize(..., eps=1e-5) in cost_matrix_cosine
// A log-sum-exp taken relative to the previous potential is trusted while its sum stays in
// [kShiftedSumMin, kShiftedSumMax] (far from fp32 under/overflow); outside, the line is redone
// with its exact maximum as the shift.
constexpr float kShiftedSumMin = 1e-30f;
constexpr float kShiftedSumMax = 1e30f;

// ---- IPOT -----------------------------------------------------------------------------------
// Above this max(shifted cost) / beta the iteration runs in the log domain (the same switch as
// the Triton kernels and the reference's LOG_DOMAIN_ABOVE): the scaling form keeps T ~ A^t and
// loses fp32 entries that underflow but matter later once the shifted cost spans ~25 * beta.
constexpr float kIpotLogDomainAbove = 16.0f;

VLK_OT_HD float pad_penalty(bool valid) { return valid ? 0.0f : kPadPenalty; }

// A_ij = exp(-C_ij / beta) on joint-valid entries, 0 on joint padding (UNITER masks A and T).
VLK_OT_HD float ipot_affinity(float cost, float inv_beta) { return expf(-cost * inv_beta); }

// sigma_i = exp(-r_i / beta) / x_len on a valid row with row shift r_i (see the header comment).
VLK_OT_HD float ipot_initial_sigma(float row_shift, float inv_beta, float x_len) {
  return expf(-row_shift * inv_beta) / x_len;
}
VLK_OT_HD float ipot_initial_log_sigma(float row_shift, float inv_beta, float x_len) {
  return -row_shift * inv_beta - logf(x_len);
}

// Log domain: log delta_j = -log y_len - lse (lse of log Q + log sigma down the column), and
// log sigma_i likewise along a row.
VLK_OT_HD float ipot_log_scaling(float log_length, float lse) { return -log_length - lse; }

// delta_j = 1 / (y_len * sum_i Q_ij sigma_i + pen_j), and sigma_i likewise over a row.
VLK_OT_HD float ipot_scaling(float length, float weighted_sum, float penalty) {
  return 1.0f / (length * weighted_sum + penalty);
}

// T_ij = delta_j * Q_ij * sigma_i, in UNITER's order of the products.
VLK_OT_HD float ipot_plan_entry(float delta, float q, float sigma) { return delta * q * sigma; }

// The WRA cost: 1 - <x_i, y_j> / (max(|x_i|, eps) * max(|y_j|, eps)), i.e. 1 - cos of the
// L2-normalised vectors (F.normalize divides by max(norm, eps)).
VLK_OT_HD float cosine_cost(float dot, float norm_x, float norm_y) {
  return 1.0f - dot / (fmaxf(norm_x, kNormalizeEps) * fmaxf(norm_y, kNormalizeEps));
}

// ---- Sinkhorn --------------------------------------------------------------------------------
VLK_OT_HD bool shifted_sum_usable(float sum) { return sum >= kShiftedSumMin && sum <= kShiftedSumMax; }

// New potential from the log-sum-exp of its line, lse = LSE(other potential + K over the line):
// g_j = log b_j - lse.
VLK_OT_HD float log_potential(float log_marginal, float lse) { return log_marginal - lse; }

// lse of a line from sum = sum_k exp(K + other_k + shift) taken with a known shift:
// LSE = log(sum) - shift.
VLK_OT_HD float shifted_lse(float sum, float shift) { return logf(sum) - shift; }

// The current marginal of a line (what the plan sums to along it) from its potential and lse.
VLK_OT_HD float line_marginal(float potential, float lse) { return expf(potential + lse); }

// exp(new - old): what a line's plan entries are multiplied by when its potential moves.
VLK_OT_HD float potential_ratio(float new_potential, float old_potential) {
  return expf(new_potential - old_potential);
}

// Scaling-form update: v_j = b_j / sum_i K_ij u_i.
VLK_OT_HD float scaling_update(float marginal, float sum) { return marginal / sum; }

// Online log-sum-exp pair (running max m, sum s of exp(value - m)): add one value / merge two.
VLK_OT_HD void lse_push(float& m, float& s, float value) {
  if (value > m) {
    s = s * expf(m - value) + 1.0f;
    m = value;
  } else if (value > -INFINITY) {
    s += expf(value - m);
  }
}
VLK_OT_HD void lse_merge(float& m, float& s, float other_m, float other_s) {
  if (other_m > m) {
    s = s * expf(m - other_m) + other_s;
    m = other_m;
  } else if (other_m > -INFINITY) {
    s += other_s * expf(other_m - m);
  }
}
VLK_OT_HD float lse_value(float m, float s) { return s > 0.0f ? m + logf(s) : -INFINITY; }

// ---- Base 2 (the CUDA kernels) ---------------------------------------------------------------
// exp2f / log2f are the GPU's native units (one MUFU instruction each, where expf / logf add a
// multiply and range handling): the CUDA kernels hold their log-domain values times log2(e)
// (costs scaled by log2(e) / beta or log2(e) / reg once) and use these forms of the functions
// above. The plans are the same to fp32 rounding.
constexpr float kLog2e = 1.44269504088896341f;

VLK_OT_HD float ipot_affinity2(float cost, float log2_scale) { return exp2f(-cost * log2_scale); }
VLK_OT_HD float ipot_initial_sigma2(float row_shift, float log2_scale, float x_len) {
  return exp2f(-row_shift * log2_scale) / x_len;
}
VLK_OT_HD float ipot_initial_log2_sigma(float row_shift, float log2_scale, float x_len) {
  return -row_shift * log2_scale - log2f(x_len);
}
VLK_OT_HD float shifted_lse2(float sum, float shift) { return log2f(sum) - shift; }
VLK_OT_HD float line_marginal2(float potential, float lse) { return exp2f(potential + lse); }
VLK_OT_HD void lse2_push(float& m, float& s, float value) {
  if (value > m) {
    s = s * exp2f(m - value) + 1.0f;
    m = value;
  } else if (value > -INFINITY) {
    s += exp2f(value - m);
  }
}
VLK_OT_HD void lse2_merge(float& m, float& s, float other_m, float other_s) {
  if (other_m > m) {
    s = s * exp2f(m - other_m) + other_s;
    m = other_m;
  } else if (other_m > -INFINITY) {
    s += other_s * exp2f(other_m - m);
  }
}
VLK_OT_HD float lse2_value(float m, float s) { return s > 0.0f ? m + log2f(s) : -INFINITY; }

}  // namespace ot
}  // namespace vlkernels
