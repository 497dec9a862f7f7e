// The CPU optimal-transport kernels against what can be derived by hand or recomputed here in
// double: IPOT's and Sinkhorn's plans meet their marginals, IPOT finds the permutation plan of a
// cost that is 0 on a permutation and 1 elsewhere, Sinkhorn matches a plain double-precision
// Sinkhorn loop written here, WRA's distance is sum C_ij T_ij of the cosine cost recomputed
// here, and WRA's backward matches central differences of that sum (plan held fixed).
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/optimal_transport.h"

namespace cpu = vlkernels::cpu;
using Vec = std::vector<float>;
using Mask = std::vector<uint8_t>;

struct Problem {
  int64_t batch, rows, cols;
  Mask x_mask, y_mask;  // ragged: problem b has rows_b valid rows, cols_b valid columns
  int64_t x_len(int64_t b) const { return count(x_mask, b, rows); }
  int64_t y_len(int64_t b) const { return count(y_mask, b, cols); }
  static int64_t count(const Mask& m, int64_t b, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) c += m[b * n + i] != 0;
    return c;
  }
};

static Problem ragged(int64_t batch, int64_t rows, int64_t cols, std::mt19937& rng) {
  Problem p{batch, rows, cols, Mask(batch * rows), Mask(batch * cols)};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t m = b == 0 ? rows : 1 + rng() % rows, n = b == 0 ? cols : 1 + rng() % cols;
    for (int64_t i = 0; i < rows; ++i) p.x_mask[b * rows + i] = i < m;
    for (int64_t j = 0; j < cols; ++j) p.y_mask[b * cols + j] = j < n;
  }
  return p;
}

// Row and column sums of the plan on the valid block, and a check that padding holds 0.
static void check_marginals(const Problem& p, const Vec& plan, double row_tol, double col_tol, const char* what) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const double m = p.x_len(b), n = p.y_len(b);
    for (int64_t i = 0; i < p.rows; ++i) {
      double row = 0.0;
      for (int64_t j = 0; j < p.cols; ++j) {
        const float t = plan[(b * p.rows + i) * p.cols + j];
        if (!p.x_mask[b * p.rows + i] || !p.y_mask[b * p.cols + j]) CHECK(t == 0.0f, "%s: padding entry %g", what, t);
        CHECK(t >= 0.0f, "%s: negative entry %g", what, t);
        row += t;
      }
      if (p.x_mask[b * p.rows + i])
        CHECK(close(row, 1.0 / m, row_tol, 0.0), "%s: problem %lld row %lld sums to %g, expected 1/%g", what,
              (long long)b, (long long)i, row, m);
    }
    for (int64_t j = 0; j < p.cols; ++j) {
      if (!p.y_mask[b * p.cols + j]) continue;
      double col = 0.0;
      for (int64_t i = 0; i < p.rows; ++i) col += plan[(b * p.rows + i) * p.cols + j];
      CHECK(close(col, 1.0 / n, col_tol, 0.0), "%s: problem %lld column %lld sums to %g, expected 1/%g", what,
            (long long)b, (long long)j, col, n);
    }
  }
}

static void test_ipot_marginals() {
  std::mt19937 rng(10);
  std::uniform_real_distribution<float> uniform(0.0f, 2.0f);  // the range of a cosine cost
  Problem p = ragged(5, 13, 21, rng);
  Vec cost(p.batch * p.rows * p.cols), plan(cost.size(), -1.0f);
  for (auto& c : cost) c = uniform(rng);
  cpu::ipot(cost.data(), p.x_mask.data(), p.y_mask.data(), p.batch, p.rows, p.cols, 0.5f, 400, 1, plan.data());
  // Each iteration ends with the row scaling, so rows hold exactly; columns once converged.
  check_marginals(p, plan, 1e-5, 1e-3, "ipot");
}

static void test_ipot_finds_the_permutation() {
  const int64_t n = 9;
  std::mt19937 rng(11);
  std::vector<int64_t> perm(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  Vec cost(n * n, 1.0f), plan(n * n);
  for (int64_t i = 0; i < n; ++i) cost[i * n + perm[i]] = 0.0f;
  Mask all(n, 1);
  // IPOT is a proximal point method: it converges to the exact (unregularised) OT plan, here
  // 1/n on the permutation and 0 elsewhere.
  cpu::ipot(cost.data(), all.data(), all.data(), 1, n, n, 0.5f, 200, 1, plan.data());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double expected = j == perm[i] ? 1.0 / n : 0.0;
      CHECK(close(plan[i * n + j], expected, 0.0, 1e-5), "plan[%lld, %lld] = %g, expected %g", (long long)i,
            (long long)j, plan[i * n + j], expected);
    }
}

// Plain Sinkhorn in double on one problem's valid block: columns, then rows (POT's order).
static std::vector<double> sinkhorn_here(const float* cost, int64_t cols, int64_t m, int64_t n, double reg,
                                         int64_t iters) {
  std::vector<double> K(m * n), u(m, 1.0), v(n, 1.0), plan(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) K[i * n + j] = std::exp(-cost[i * cols + j] / reg);
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < m; ++i) s += K[i * n + j] * u[i];
      v[j] = (1.0 / n) / s;
    }
    for (int64_t i = 0; i < m; ++i) {
      double s = 0.0;
      for (int64_t j = 0; j < n; ++j) s += K[i * n + j] * v[j];
      u[i] = (1.0 / m) / s;
    }
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) plan[i * n + j] = u[i] * K[i * n + j] * v[j];
  return plan;
}

static void test_sinkhorn(bool log_domain) {
  std::mt19937 rng(log_domain ? 12 : 13);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  Problem p = ragged(4, 11, 17, rng);
  const float reg = 0.1f;
  const int64_t iters = 60;
  Vec cost(p.batch * p.rows * p.cols), a(p.batch * p.rows, 0.0f), b(p.batch * p.cols, 0.0f), plan(cost.size(), -1.0f);
  for (auto& c : cost) c = uniform(rng);
  for (int64_t k = 0; k < p.batch; ++k) {  // uniform marginals on the valid entries, 0 off the support
    for (int64_t i = 0; i < p.rows; ++i) a[k * p.rows + i] = p.x_mask[k * p.rows + i] ? 1.0f / p.x_len(k) : 0.0f;
    for (int64_t j = 0; j < p.cols; ++j) b[k * p.cols + j] = p.y_mask[k * p.cols + j] ? 1.0f / p.y_len(k) : 0.0f;
  }
  cpu::sinkhorn(cost.data(), a.data(), b.data(), p.batch, p.rows, p.cols, reg, iters, -1.0f, log_domain, plan.data());
  check_marginals(p, plan, 1e-4, 5e-2, log_domain ? "sinkhorn (log)" : "sinkhorn (scaling)");
  for (int64_t k = 0; k < p.batch; ++k) {
    const int64_t m = p.x_len(k), n = p.y_len(k);
    const std::vector<double> expected = sinkhorn_here(&cost[k * p.rows * p.cols], p.cols, m, n, reg, iters);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const float got = plan[(k * p.rows + i) * p.cols + j];
        CHECK(close(got, expected[i * n + j], 1e-3, 1e-7), "problem %lld plan[%lld, %lld] = %g, expected %g",
              (long long)k, (long long)i, (long long)j, got, expected[i * n + j]);
      }
  }
}

// The WRA cost 1 - cos(x_i, y_j) (norms clamped at 1e-5, as F.normalize), in double.
static double cosine_cost(const float* x, const float* y, int64_t dim, double shift_x = 0.0, int64_t at = -1) {
  double dot = 0.0, nx = 0.0, ny = 0.0;
  for (int64_t d = 0; d < dim; ++d) {
    const double xd = x[d] + (d == at ? shift_x : 0.0);
    dot += xd * y[d];
    nx += xd * xd;
    ny += static_cast<double>(y[d]) * y[d];
  }
  return 1.0 - dot / (std::fmax(std::sqrt(nx), 1e-5) * std::fmax(std::sqrt(ny), 1e-5));
}

static void test_wra_distance_and_backward() {
  std::mt19937 rng(14);
  std::normal_distribution<float> normal;
  const int64_t dim = 19;
  Problem p = ragged(3, 7, 10, rng);
  Vec txt(p.batch * p.rows * dim), img(p.batch * p.cols * dim), plan(p.batch * p.rows * p.cols), distance(p.batch);
  for (auto& v : txt) v = normal(rng);
  for (auto& v : img) v = normal(rng);
  cpu::wra(txt.data(), img.data(), p.x_mask.data(), p.y_mask.data(), p.batch, p.rows, p.cols, dim, 0.5f, 50, 1,
           plan.data(), distance.data());
  check_marginals(p, plan, 1e-5, 5e-2, "wra");

  // The same plan from ipot on the cost formed here, and the distance as sum C * T.
  Vec cost(p.batch * p.rows * p.cols, 0.0f), ipot_plan(cost.size());
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < p.rows; ++i)
      for (int64_t j = 0; j < p.cols; ++j)
        if (p.x_mask[b * p.rows + i] && p.y_mask[b * p.cols + j])
          cost[(b * p.rows + i) * p.cols + j] =
              cosine_cost(&txt[(b * p.rows + i) * dim], &img[(b * p.cols + j) * dim], dim);
  cpu::ipot(cost.data(), p.x_mask.data(), p.y_mask.data(), p.batch, p.rows, p.cols, 0.5f, 50, 1, ipot_plan.data());
  for (int64_t b = 0; b < p.batch; ++b) {
    double sum = 0.0;
    for (int64_t e = b * p.rows * p.cols; e < (b + 1) * p.rows * p.cols; ++e) {
      CHECK(close(plan[e], ipot_plan[e], 1e-3, 1e-7), "wra plan %g vs ipot plan %g", plan[e], ipot_plan[e]);
      sum += static_cast<double>(cost[e]) * plan[e];
    }
    CHECK(close(distance[b], sum, 1e-4, 1e-6), "problem %lld: distance %g, sum C*T %g", (long long)b, distance[b], sum);
  }

  // Backward with the plan fixed: d/dx of g_b * sum_ij C_ij(x, y) T_ij by central differences.
  Vec grad_distance(p.batch), grad_txt(txt.size(), -1.0f), grad_img(img.size(), -1.0f);
  for (auto& g : grad_distance) g = normal(rng);
  cpu::wra_backward(txt.data(), img.data(), p.x_mask.data(), p.y_mask.data(), plan.data(), grad_distance.data(),
                    p.batch, p.rows, p.cols, dim, grad_txt.data(), grad_img.data());
  const double h = 1e-3;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < p.rows; ++i)
      for (int64_t d = 0; d < dim; ++d) {
        double numeric = 0.0;
        if (p.x_mask[b * p.rows + i])
          for (int64_t j = 0; j < p.cols; ++j) {
            if (!p.y_mask[b * p.cols + j]) continue;
            const float* x = &txt[(b * p.rows + i) * dim];
            const float* y = &img[(b * p.cols + j) * dim];
            const double slope = (cosine_cost(x, y, dim, h, d) - cosine_cost(x, y, dim, -h, d)) / (2 * h);
            numeric += grad_distance[b] * slope * plan[(b * p.rows + i) * p.cols + j];
          }
        const float got = grad_txt[(b * p.rows + i) * dim + d];
        CHECK(close(got, numeric, 1e-3, 1e-6), "grad_txt[%lld, %lld, %lld] = %g, central difference %g", (long long)b,
              (long long)i, (long long)d, got, numeric);
      }
  // grad_img: by symmetry of the cost, the same differences taken in y; padding rows get 0.
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t j = 0; j < p.cols; ++j)
      for (int64_t d = 0; d < dim; ++d) {
        double numeric = 0.0;
        if (p.y_mask[b * p.cols + j])
          for (int64_t i = 0; i < p.rows; ++i) {
            if (!p.x_mask[b * p.rows + i]) continue;
            const float* x = &txt[(b * p.rows + i) * dim];
            const float* y = &img[(b * p.cols + j) * dim];
            const double slope = (cosine_cost(y, x, dim, h, d) - cosine_cost(y, x, dim, -h, d)) / (2 * h);
            numeric += grad_distance[b] * slope * plan[(b * p.rows + i) * p.cols + j];
          }
        const float got = grad_img[(b * p.cols + j) * dim + d];
        CHECK(close(got, numeric, 1e-3, 1e-6), "grad_img[%lld, %lld, %lld] = %g, central difference %g", (long long)b,
              (long long)j, (long long)d, got, numeric);
      }
}

int main() {
  test_ipot_marginals();
  test_ipot_finds_the_permutation();
  test_sinkhorn(true);
  test_sinkhorn(false);
  test_wra_distance_and_backward();
  std::printf("optimal transport kernels: ok\n");
  return 0;
}
