// Torch glue of the visual-dictionary CPU kernels (csrc/cpu/visual_dictionary.*): checks the
// tensors, then calls the torch-free kernels on their float32 data.
#include "../csrc/cpu/visual_dictionary.h"
#include "bindings.h"

namespace vlkernels {
namespace bindings {
namespace {

void check_cpu_float(const torch::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat32 && tensor.is_contiguous(),
              "vd (cpp): ", name, " must be a contiguous float32 CPU tensor");
}

// (counts [K], sums [K, D]) of the rows x [N, D] by entry index [N] (int64), counting only the
// rows where mask [N] (bool) is true when a mask is given.
std::tuple<torch::Tensor, torch::Tensor> vd_cluster_statistics(const torch::Tensor& x, const torch::Tensor& index,
                                                               int64_t entries,
                                                               const c10::optional<torch::Tensor>& mask) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && index.dim() == 1 && index.size(0) == x.size(0) &&
                  index.scalar_type() == torch::kInt64 && index.is_contiguous(),
              "vd (cpp): x must be [N, D] and index a contiguous int64 [N]");
  const uint8_t* mask_data = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->numel() == x.size(0),
                "vd (cpp): mask must be a contiguous bool [N]");
    mask_data = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  }
  auto counts = torch::empty({entries}, x.options());
  auto sums = torch::empty({entries, x.size(1)}, x.options());
  cpu::vd_cluster_statistics(x.data_ptr<float>(), index.data_ptr<int64_t>(), mask_data, x.size(0), x.size(1), entries,
                             counts.data_ptr<float>(), sums.data_ptr<float>());
  return {counts, sums};
}

void vd_apply_statistics(torch::Tensor& codebook, torch::Tensor& cluster_size, torch::Tensor& embed_avg,
                         const torch::Tensor& counts, const torch::Tensor& sums, double decay, double eps) {
  for (const torch::Tensor* tensor : std::initializer_list<const torch::Tensor*>{&codebook, &cluster_size, &embed_avg,
                                                                                 &counts, &sums}) {
    check_cpu_float(*tensor, "state");
  }
  const int64_t entries = codebook.size(0), dim = codebook.size(1);
  TORCH_CHECK(cluster_size.numel() == entries && counts.numel() == entries && embed_avg.numel() == entries * dim &&
                  sums.numel() == entries * dim,
              "vd (cpp): the state and statistics must match the codebook's [K, D]");
  cpu::vd_apply_statistics(codebook.data_ptr<float>(), cluster_size.data_ptr<float>(), embed_avg.data_ptr<float>(),
                           counts.data_ptr<float>(), sums.data_ptr<float>(), entries, dim, static_cast<float>(decay),
                           static_cast<float>(eps));
}

}  // namespace

void register_visual_dictionary(pybind11::module_& module) {
  module.def("vd_cluster_statistics", &vd_cluster_statistics, "counts [K] and sums [K, D] of rows by entry (CPU)",
             pybind11::arg("x"), pybind11::arg("index"), pybind11::arg("entries"), pybind11::arg("mask"));
  module.def("vd_apply_statistics_", &vd_apply_statistics, "SOHO's moving-average step, in place (CPU)",
             pybind11::arg("codebook"), pybind11::arg("cluster_size"), pybind11::arg("embed_avg"),
             pybind11::arg("counts"), pybind11::arg("sums"), pybind11::arg("decay"), pybind11::arg("eps"));
}

}  // namespace bindings
}  // namespace vlkernels
