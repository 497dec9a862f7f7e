// Which device code of the GPU build runs on this GPU: a torch-free launcher over a raw pointer.
#pragma once
#include <cuda_runtime.h>

namespace vlkernels {
namespace cuda {

// Launches one thread on `stream` that writes the __CUDA_ARCH__ of the device code the driver
// picked for the current device into arch[0] (800 for the sm_80 SASS, 900 for sm_90a). The GPU
// build embeds SASS only, no PTX, so on a GPU it has no image for the launch fails instead
// (cudaErrorNoKernelImageForDevice). Returns the launch's error; the write completes with the
// stream. `arch` is device memory holding one int.
cudaError_t launch_arch_probe(int* arch, cudaStream_t stream);

}  // namespace cuda
}  // namespace vlkernels
