// Where the synthetic K/V row of (layer, K or V, token, position, head) starts
// in SyntheticKv's table of Gaussian values. Shared by the host generator
// (synthetic_kv.cc) and the device one (synthetic_kv_cuda.cu), so both produce
// the same bits.

#ifndef KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_ROW_H_
#define KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_ROW_H_

#include <cstdint>

#include "core/host_device.h"

namespace kvcache::replay {

inline constexpr int kSyntheticTableBits = 16;
inline constexpr int64_t kSyntheticTableRows = int64_t{1}
                                               << kSyntheticTableBits;
inline constexpr int kSyntheticMaxHeadSize = 1024;
// Table entries: every window start plus room for the longest row.
inline constexpr int64_t kSyntheticTableSize =
    kSyntheticTableRows + kSyntheticMaxHeadSize;

KVCACHE_HOST_DEVICE uint64_t SyntheticMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

KVCACHE_HOST_DEVICE int64_t SyntheticRowOffset(int layer, bool is_value,
                                               int32_t token, int64_t position,
                                               int head) {
  uint64_t h = SyntheticMix(static_cast<uint64_t>(token) << 1 |
                            static_cast<uint64_t>(is_value));
  h = SyntheticMix(h ^ static_cast<uint64_t>(position));
  h = SyntheticMix(
      h ^ (static_cast<uint64_t>(layer) << 16 | static_cast<uint64_t>(head)));
  return static_cast<int64_t>(h & (kSyntheticTableRows - 1));
}

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_ROW_H_
