// CUDA glue: allocates through torch, launches the torch-free kernel on torch's current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bindings.h"
#include "cuda/arch_probe.h"

namespace vlkernels {
namespace bindings {
namespace {

int64_t cuda_kernel_arch(int64_t device_index) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  torch::Tensor arch = torch::full({1}, -1, torch::dtype(torch::kInt32).device(torch::kCUDA, device_index));
  C10_CUDA_CHECK(cuda::launch_arch_probe(arch.data_ptr<int>(), c10::cuda::getCurrentCUDAStream()));
  return arch.item<int>();  // synchronizes with the stream
}

}  // namespace

void register_cuda(pybind11::module_& module) {
  module.def("cuda_kernel_arch", &cuda_kernel_arch, pybind11::arg("device_index") = 0,
             "__CUDA_ARCH__ of the extension's device code that runs on this GPU (800 or 900); "
             "raises if the GPU build has no code for it.");
}

}  // namespace bindings
}  // namespace vlkernels
