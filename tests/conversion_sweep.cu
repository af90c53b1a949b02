#include <cuda_runtime.h>

#include "core/cuda_check.h"
#include "kernels/float_convert.h"
#include "kernels/fp8.h"
#include "tests/conversion_sweep.h"

namespace kvcache::testing {
namespace {

using namespace ::kvcache::internal;  // NOLINT: test helper.

__device__ __forceinline__ bool IsNan(float x) { return x != x; }

__global__ void SweepKernel(ConversionMismatches* out) {
  unsigned long long fp8 = 0, bf16 = 0, fp16 = 0;
  const uint64_t step = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t u =
           static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       u <= 0xFFFFFFFFull; u += step) {
    const float x = __uint_as_float(static_cast<uint32_t>(u));
    if (FloatToFp8E4M3(x) != PortableFloatToFp8E4M3(x)) {
      ++fp8;
      atomicMin(&out->first_fp8_encode, static_cast<unsigned int>(u));
    }
    if (FloatToBFloat16(x) != PortableFloatToBFloat16(x)) ++bf16;
    if (FloatToFloat16(x) != PortableFloatToFloat16(x)) ++fp16;
  }
  atomicAdd(&out->fp8_encode, fp8);
  atomicAdd(&out->bf16_encode, bf16);
  atomicAdd(&out->fp16_encode, fp16);
  const uint64_t tid =
      static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid < 256) {
    const float a = Fp8E4M3ToFloat(static_cast<uint8_t>(tid));
    const float b = PortableFp8E4M3ToFloat(static_cast<uint8_t>(tid));
    if (IsNan(a) != IsNan(b) ||
        (!IsNan(a) && __float_as_uint(a) != __float_as_uint(b))) {
      atomicAdd(&out->fp8_decode, 1ull);
    }
  }
  if (tid < 65536) {
    const float a = Float16ToFloat(static_cast<uint16_t>(tid));
    const float b = PortableFloat16ToFloat(static_cast<uint16_t>(tid));
    if (IsNan(a) != IsNan(b) ||
        (!IsNan(a) && __float_as_uint(a) != __float_as_uint(b))) {
      atomicAdd(&out->fp16_widen, 1ull);
    }
  }
}

absl::Status Run(ConversionMismatches* host) {
  ConversionMismatches* device = nullptr;
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaMalloc(&device, sizeof(*device)));
  absl::Status status = [&]() -> absl::Status {
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(device, host, sizeof(*host), cudaMemcpyHostToDevice));
    SweepKernel<<<4096, 256>>>(device);
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(host, device, sizeof(*host), cudaMemcpyDeviceToHost));
    return absl::OkStatus();
  }();
  cudaFree(device);
  return status;
}

}  // namespace

absl::StatusOr<ConversionMismatches> SweepConversionsOnDevice() {
  ConversionMismatches result;
  absl::Status status = Run(&result);
  if (!status.ok()) return status;
  return result;
}

}  // namespace kvcache::testing
