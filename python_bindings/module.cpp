// vlkernels._C: the compiled half of vlkernels. The kernels live torch-free in csrc/ (cpu/:
// C++ with OpenMP, cuda/: .cu over raw pointers and a cudaStream_t); this module binds them.
// setup.py passes the build facts in as -D defines; build_info() reports them so that
// vlkernels._extension can refuse a module built against another torch.
#include <string>
#include <vector>

#include "bindings.h"

#ifndef VLKERNELS_TORCH_VERSION
#error "setup.py defines VLKERNELS_TORCH_VERSION (the torch.__version__ this module is built against)"
#endif

namespace vlkernels {
namespace bindings {
namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__) + "." +
         std::to_string(__clang_patchlevel__);
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

#ifdef VLKERNELS_WITH_CUDA
// "sm_80,sm_90a" -> ["sm_80", "sm_90a"]
std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    if (end > begin) parts.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return parts;
}
#endif

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(VLKERNELS_TORCH_VERSION);
#ifdef VLKERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = split_commas(VLKERNELS_CUDA_ARCHS);
  info["cuda_version"] = std::string(VLKERNELS_CUDA_VERSION);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::vector<std::string>{};
  info["cuda_version"] = pybind11::none();
#endif
  info["compiler"] = compiler();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  // The libstdc++ string/list ABI: a module and a torch that disagree on it cannot share
  // std:: types across the boundary (the loader compares it with torch's).
#if defined(_GLIBCXX_USE_CXX11_ABI)
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#else
  info["cxx11_abi"] = pybind11::none();
#endif
  return info;
}

}  // namespace
}  // namespace bindings
}  // namespace vlkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "vlkernels' compiled kernels (C++/OpenMP on CPU, CUDA in the GPU build)";
  module.def("build_info", &vlkernels::bindings::build_info,
             "How this module was built: torch_version, cuda, cuda_archs, cuda_version, compiler, openmp, cxx11_abi.");
  vlkernels::bindings::register_visual_dictionary(module);
#ifdef VLKERNELS_WITH_CUDA
  vlkernels::bindings::register_cuda(module);
#endif
}
