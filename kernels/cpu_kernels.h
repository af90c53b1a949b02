// CPU implementations of the cache kernels: bit-identical to the CUDA ones
// (DESIGN.md section 3), multi-threaded when the work is large. Each validates
// its parameters first and returns InvalidArgument naming the bad value; on
// error nothing is written.
//
// Thread-safe for calls on disjoint outputs. All pointers are host pointers.

#ifndef KVCACHE_KERNELS_CPU_KERNELS_H_
#define KVCACHE_KERNELS_CPU_KERNELS_H_

#include "absl/status/status.h"
#include "kernels/kernel_params.h"

namespace kvcache {

absl::Status QuantizeWriteCpu(const QuantizeWriteParams& params);
absl::Status GatherCpu(const GatherParams& params);
absl::Status BlockCopyCpu(const BlockCopyParams& params);

}  // namespace kvcache

#endif  // KVCACHE_KERNELS_CPU_KERNELS_H_
