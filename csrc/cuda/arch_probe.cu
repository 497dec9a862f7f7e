#include "arch_probe.h"

namespace vlkernels {
namespace cuda {

__global__ void arch_probe_kernel(int* arch) {
#ifdef __CUDA_ARCH__  // defined only in the device pass; the host pass sees an empty body
  *arch = __CUDA_ARCH__;
#endif
}

cudaError_t launch_arch_probe(int* arch, cudaStream_t stream) {
  arch_probe_kernel<<<1, 1, 0, stream>>>(arch);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vlkernels
