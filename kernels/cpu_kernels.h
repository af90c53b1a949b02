// CPU implementations of the cache kernels: bit-identical to the CUDA ones
// (DESIGN.md section 3). Each validates its parameters first and returns
// InvalidArgument naming the bad value; on error nothing is written.
//
// Rows run on the AVX2 path where the CPU has AVX2 and F16C (checked at run
// time; kernels/cpu_kernels_avx2.h), else on the scalar path; both write the
// same bytes. A call whose work is large is split over `pool`'s threads (a
// null pool, or a small call such as a decode step, runs on the caller's
// thread alone and wakes no worker). No call starts a thread or allocates.
//
// Thread-safe for calls on disjoint outputs. All pointers are host pointers.

#ifndef KVCACHE_KERNELS_CPU_KERNELS_H_
#define KVCACHE_KERNELS_CPU_KERNELS_H_

#include "absl/status/status.h"
#include "kernels/kernel_params.h"

namespace kvcache {
namespace internal {
class ThreadPool;
}  // namespace internal

absl::Status QuantizeWriteCpu(const QuantizeWriteParams& params,
                              internal::ThreadPool* pool = nullptr);
absl::Status GatherCpu(const GatherParams& params,
                       internal::ThreadPool* pool = nullptr);
absl::Status BlockCopyCpu(const BlockCopyParams& params,
                          internal::ThreadPool* pool = nullptr);

namespace internal {

enum class CpuRowPath { kScalar, kAvx2 };

// The row code the CPU kernels run now.
CpuRowPath ActiveCpuRowPath();

// Tests and benchmarks: true makes every later call run the scalar rows;
// false restores the default (AVX2 where available). Not for concurrent use
// with running kernels.
void ForceScalarCpuRowsForTesting(bool force);

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_KERNELS_CPU_KERNELS_H_
