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
#include "kernels/attention_params.h"
#include "kernels/kernel_params.h"

namespace kvcache {

absl::Status QuantizeWriteCuda(const QuantizeWriteParams& params, void* stream);
absl::Status GatherCuda(const GatherParams& params, void* stream);
absl::Status BlockCopyCuda(const BlockCopyParams& params, void* stream);
// Paged decode attention (kernels/attention_params.h, kernels/attention.cuh):
// head_size == head_size_v in {64, 128, 256}; split-KV through the params'
// workspace when it has room. Capturable in a CUDA graph (release builds;
// debug builds also check the batch arrays on the host, skipped in capture).
absl::Status AttentionCuda(const AttentionParams& params, void* stream);

}  // namespace kvcache

#endif  // KVCACHE_KERNELS_CUDA_KERNELS_H_
