#include <cuda_runtime.h>

#include "benchmarks/empty_kernel.h"

namespace kvcache::bench {
namespace {

__global__ void EmptyKernel(int* unused) {
  if (unused != nullptr) *unused = 0;
}

}  // namespace

int LaunchEmptyKernel(void* stream) {
  EmptyKernel<<<1, 128, 0, static_cast<cudaStream_t>(stream)>>>(nullptr);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kvcache::bench
