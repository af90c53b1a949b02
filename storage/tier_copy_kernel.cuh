// Device kernel of the host tier's copies (storage/tier_copier.h): one batch
// of whole blocks between a cache's device memory and the tier's pinned
// pool, which the device reaches through unified addressing.
//
// Grid: x grid-strides over the batch's (pair, run) items, pair-major, one
// thread block per item; the run table is in device memory, the pairs in
// pinned host memory (a thread block reads each pair once, as long as its
// next item is of the same pair). Each run is copied with 16-byte accesses
// where both ends and its length allow them, kTierCopyUnroll loads issued
// before their stores so that each thread keeps several reads in flight;
// bytes one at a time otherwise.

#ifndef KVCACHE_STORAGE_TIER_COPY_KERNEL_CUH_
#define KVCACHE_STORAGE_TIER_COPY_KERNEL_CUH_

#include <cstdint>

#include "storage/tier_copier.h"

namespace kvcache::internal {

inline constexpr int kTierCopyThreads = 256;
inline constexpr int kTierCopyUnroll = 4;

struct TierCopyParams {
  const TierRun* runs = nullptr;  // Device memory: num_runs.
  int32_t num_runs = 0;
  const TierPair* copies = nullptr;  // Pinned host memory: num_copies.
  int64_t num_copies = 0;
  char* pool = nullptr;  // Slots of slot_bytes.
  int64_t slot_bytes = 0;
  bool onboard = false;  // Pool -> cache; false: cache -> pool.
  // The slot of copies[c] is c itself, not its host_slot: the "pool" is a
  // staging buffer of num_copies slots (the copy engines' path).
  bool slot_is_index = false;
};

// The thread block copies `bytes` from src to dst.
__device__ __forceinline__ void CopyTierRun(char* __restrict__ dst,
                                            const char* __restrict__ src,
                                            int64_t bytes) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) |
                         reinterpret_cast<uintptr_t>(src) |
                         static_cast<uintptr_t>(bytes);
  if ((bits & 15) != 0) {
    for (int64_t i = threadIdx.x; i < bytes; i += kTierCopyThreads) {
      dst[i] = src[i];
    }
    return;
  }
  const int64_t n = bytes / 16;
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(src);
  constexpr int64_t kStep = int64_t{kTierCopyThreads} * kTierCopyUnroll;
  int64_t i = threadIdx.x;
  for (; i + (kTierCopyUnroll - 1) * kTierCopyThreads < n; i += kStep) {
    uint4 v[kTierCopyUnroll];
#pragma unroll
    for (int u = 0; u < kTierCopyUnroll; ++u)
      v[u] = s[i + u * kTierCopyThreads];
#pragma unroll
    for (int u = 0; u < kTierCopyUnroll; ++u)
      d[i + u * kTierCopyThreads] = v[u];
  }
  for (; i < n; i += kTierCopyThreads) d[i] = s[i];
}

__global__ void __launch_bounds__(kTierCopyThreads)
    TierCopyKernel(const TierCopyParams p) {
  const int64_t items = p.num_copies * p.num_runs;
  int64_t pair = -1;
  TierPair copy;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t c = item / p.num_runs;
    if (c != pair) {
      copy = p.copies[c];
      pair = c;
    }
    const TierRun run = p.runs[item - c * p.num_runs];
    char* cache = DeviceRunAddress(run, copy.device_block);
    const int32_t s =
        p.slot_is_index ? static_cast<int32_t>(c) : copy.host_slot;
    char* slot = SlotRunAddress(p.pool, p.slot_bytes, run, s);
    if (p.onboard) {
      CopyTierRun(cache, slot, run.bytes);
    } else {
      CopyTierRun(slot, cache, run.bytes);
    }
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_STORAGE_TIER_COPY_KERNEL_CUH_
