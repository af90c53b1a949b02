// The bytes of one block of one layer, as runs of contiguous memory: its K
// rows, its V rows and, for quantized caches with side scales, its K and V
// scale tensors' rows (K alone for a K-only cache). With inline scales a row already holds its scale
// (row_pitch bytes: codes, scale, zeros), so the K and V runs are the whole
// block and there are no scale runs. A layer in records (layer groups of
// several shapes) has one run: the block's block_size records. A block is
// moved between tiers as these bytes, whatever they hold, so this is the one
// place that knows where a block's bytes lie in a layer (core/cache_layout.h
// says how big each part is). Plain functions; thread-compatible.

#ifndef KVCACHE_STORAGE_BLOCK_RUNS_H_
#define KVCACHE_STORAGE_BLOCK_RUNS_H_

#include <cstdint>

#include "core/cache_layout.h"
#include "core/dtype.h"

namespace kvcache {

struct ByteRun {
  char* data = nullptr;
  int64_t bytes = 0;
};

inline constexpr int kMaxBlockRuns = 4;

// Writes the runs of `block` in `cache` to out[0..n) and returns n (2, or 4
// with side scales; 1 or 2 for a K-only cache, which has no V runs; 1 for
// records).
inline int BlockRuns(const LayerCache& cache, int64_t block,
                     ByteRun out[kMaxBlockRuns]) {
  const CacheLayout& l = cache.layout;
  const int64_t elem = static_cast<int64_t>(DTypeSize(l.cache_dtype));
  if (l.records()) {
    const int64_t bytes = l.block_size * l.record_pitch * elem;
    out[0] =
        ByteRun{static_cast<char*>(cache.key_cache) + block * bytes, bytes};
    return 1;
  }
  const int64_t k = l.key_block_elems() * elem;
  const int64_t v = l.value_block_elems() * elem;
  const bool has_value = l.has_value();  // False: a K-only cache.
  int n = 0;
  out[n++] = ByteRun{static_cast<char*>(cache.key_cache) + block * k, k};
  if (has_value) {
    out[n++] = ByteRun{static_cast<char*>(cache.value_cache) + block * v, v};
  }
  if (l.side_scales() && cache.key_scale != nullptr) {
    const int64_t s =
        l.side_scale_block_elems() * static_cast<int64_t>(sizeof(float));
    out[n++] = ByteRun{reinterpret_cast<char*>(cache.key_scale) + block * s, s};
    if (has_value) {
      out[n++] =
          ByteRun{reinterpret_cast<char*>(cache.value_scale) + block * s, s};
    }
  }
  return n;
}

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_BLOCK_RUNS_H_
