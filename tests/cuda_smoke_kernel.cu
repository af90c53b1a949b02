#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "tests/cuda_smoke_kernel.h"

namespace kvcache::testing {
namespace {

__global__ void AddOneKernel(int* __restrict__ data, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) data[i] += 1;
}

absl::Status Check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

}  // namespace

absl::Status AddOneOnDevice(std::vector<int>& values) {
  const int n = static_cast<int>(values.size());
  const size_t bytes = values.size() * sizeof(int);
  int* device = nullptr;
  absl::Status status = Check(cudaMalloc(&device, bytes), "cudaMalloc");
  if (!status.ok()) return status;
  status =
      Check(cudaMemcpy(device, values.data(), bytes, cudaMemcpyHostToDevice),
            "cudaMemcpy H2D");
  if (status.ok()) {
    AddOneKernel<<<(n + 255) / 256, 256>>>(device, n);
    status = Check(cudaGetLastError(), "AddOneKernel launch");
  }
  if (status.ok()) {
    status =
        Check(cudaMemcpy(values.data(), device, bytes, cudaMemcpyDeviceToHost),
              "cudaMemcpy D2H");
  }
  cudaFree(device);
  return status;
}

}  // namespace kvcache::testing
