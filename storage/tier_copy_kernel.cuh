// Device kernel of the host tier's copies (storage/tier_copier.h): one batch
// of whole blocks between a cache's device memory and the tier's pinned
// pool, which the device reaches through unified addressing, or (the copy
// engines' path) a device staging buffer that the copy engines then move.
//
// Two ways to split a batch, chosen by where the slots are:
//
//   pool (kWarpPerRun false)   x grid-strides over the batch's (pair, run)
//                              items, pair-major, one thread block per item;
//                              a thread block reads each pair (pinned host
//                              memory) once, as long as its next item is of
//                              the same pair. The link's latency, not the
//                              multiprocessor, bounds each item.
//   staging (kWarpPerRun true) x grid-strides over the pairs, one thread
//                              block per pair (read once, the next one's
//                              read issued before the copy), its warps over
//                              the pair's runs, one warp per run. A block of
//                              side scales has as many 512-byte scale runs
//                              as K/V runs; a warp each lets them overlap
//                              with the K/V runs instead of holding a whole
//                              thread block for one memory latency, so the
//                              copy takes the multiprocessors it shares with
//                              the caller's kernels for less time.
//
// Each run is copied with 16-byte accesses where both ends and its length
// allow them, kTierCopyUnroll (kTierWarpUnroll) loads issued before their
// stores so that each thread keeps several reads in flight; bytes one at a
// time otherwise.

#ifndef KVCACHE_STORAGE_TIER_COPY_KERNEL_CUH_
#define KVCACHE_STORAGE_TIER_COPY_KERNEL_CUH_

#include <cstdint>

#include "storage/tier_copier.h"

namespace kvcache::internal {

inline constexpr int kTierCopyThreads = 256;
inline constexpr int kTierCopyUnroll = 4;
inline constexpr int kTierWarpUnroll = 16;

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

// A group of kThreads threads (a thread block, or a warp) copies `bytes` from
// src to dst; `rank` is the calling thread's index in its group.
template <int kThreads, int kUnroll>
__device__ __forceinline__ void CopyTierRun(char* __restrict__ dst,
                                            const char* __restrict__ src,
                                            int64_t bytes, int rank) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) |
                         reinterpret_cast<uintptr_t>(src) |
                         static_cast<uintptr_t>(bytes);
  if ((bits & 15) != 0) {
    for (int64_t i = rank; i < bytes; i += kThreads) dst[i] = src[i];
    return;
  }
  const int64_t n = bytes / 16;
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(src);
  constexpr int64_t kStep = int64_t{kThreads} * kUnroll;
  int64_t i = rank;
  for (; i + (kUnroll - 1) * kThreads < n; i += kStep) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = s[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + u * kThreads] = v[u];
  }
  for (; i < n; i += kThreads) d[i] = s[i];
}

// Copies run `run` of pair `copy` (the c-th of the batch) in the batch's
// direction, by the calling group.
template <int kThreads, int kUnroll>
__device__ __forceinline__ void CopyPairRun(const TierCopyParams& p,
                                            const TierRun& run,
                                            const TierPair& copy, int64_t c,
                                            int rank) {
  char* cache = DeviceRunAddress(run, copy.device_block);
  const int32_t s = p.slot_is_index ? static_cast<int32_t>(c) : copy.host_slot;
  char* slot = SlotRunAddress(p.pool, p.slot_bytes, run, s);
  if (p.onboard) {
    CopyTierRun<kThreads, kUnroll>(cache, slot, run.bytes, rank);
  } else {
    CopyTierRun<kThreads, kUnroll>(slot, cache, run.bytes, rank);
  }
}

template <bool kWarpPerRun>
__global__ void __launch_bounds__(kTierCopyThreads)
    TierCopyKernel(const TierCopyParams p) {
  if constexpr (kWarpPerRun) {
    constexpr int kWarps = kTierCopyThreads / 32;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    int64_t c = blockIdx.x;
    TierPair next;
    if (c < p.num_copies) next = p.copies[c];
    for (; c < p.num_copies; c += gridDim.x) {
      const TierPair copy = next;
      if (c + gridDim.x < p.num_copies) next = p.copies[c + gridDim.x];
      for (int r = warp; r < p.num_runs; r += kWarps) {
        CopyPairRun<32, kTierWarpUnroll>(p, p.runs[r], copy, c, lane);
      }
    }
  } else {
    const int64_t items = p.num_copies * p.num_runs;
    int64_t pair = -1;
    TierPair copy;
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const int64_t c = item / p.num_runs;
      if (c != pair) {
        copy = p.copies[c];
        pair = c;
      }
      CopyPairRun<kTierCopyThreads, kTierCopyUnroll>(
          p, p.runs[item - c * p.num_runs], copy, c, threadIdx.x);
    }
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_STORAGE_TIER_COPY_KERNEL_CUH_
