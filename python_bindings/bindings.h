// Glue between the torch-free kernels in csrc/ and Python: each group of ops adds its functions
// to the vlkernels._C module through one register_* function called from module.cpp.
#pragma once
#include <torch/extension.h>

namespace vlkernels {
namespace bindings {

// python_bindings/visual_dictionary.cpp: SOHO's dictionary update on CPU (csrc/cpu/visual_dictionary.*).
void register_visual_dictionary(pybind11::module_& module);


#ifdef VLKERNELS_WITH_CUDA
// python_bindings/cuda/*.cpp: compiled only in the GPU build (they include ATen's CUDA headers).
void register_cuda(pybind11::module_& module);
#endif

}  // namespace bindings
}  // namespace vlkernels
