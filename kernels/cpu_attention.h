// CPU twin of paged decode attention (semantics in kernels/attention_params.h):
// float32 dot products and accumulation with an online softmax per query row,
// the work split by (sequence, KV head) over `pool`'s threads (a null pool runs
// on the caller's thread). It is also the reference the CUDA kernel is
// checked against besides the float64 one of the tests. Validates first
// (InvalidArgument; nothing written on error). Thread-safe for calls on
// disjoint outputs; all pointers are host pointers.

#ifndef KVCACHE_KERNELS_CPU_ATTENTION_H_
#define KVCACHE_KERNELS_CPU_ATTENTION_H_

#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace kvcache {
namespace internal {
class ThreadPool;
}  // namespace internal

absl::Status AttentionCpu(const AttentionParams& params,
                          internal::ThreadPool* pool = nullptr);

}  // namespace kvcache

#endif  // KVCACHE_KERNELS_CPU_ATTENTION_H_
