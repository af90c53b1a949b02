// CUDA launchers of the cache kernels. Each validates its parameters
// (InvalidArgument naming the bad value), dispatches on dtype and head size,
// sizes the grid, launches on `stream` (a cudaStream_t; nullptr is the default
// stream) and checks the launch (Internal on a CUDA error). All pointers are
// device pointers; launches are asynchronous. This header includes no CUDA
// header.
//
// In a build without CUDA every launcher returns FailedPrecondition("... built
// without CUDA ...").

#ifndef KVCACHE_KERNELS_CUDA_KERNELS_H_
#define KVCACHE_KERNELS_CUDA_KERNELS_H_

#include "absl/status/status.h"
#include "kernels/kernel_params.h"

namespace kvcache {

absl::Status QuantizeWriteCuda(const QuantizeWriteParams& params, void* stream);
absl::Status GatherCuda(const GatherParams& params, void* stream);
absl::Status BlockCopyCuda(const BlockCopyParams& params, void* stream);

}  // namespace kvcache

#endif  // KVCACHE_KERNELS_CUDA_KERNELS_H_
