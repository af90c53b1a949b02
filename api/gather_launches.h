// The part of a batched Gather that the uniform manager and the layer-group
// manager share: checking the caller's dense outputs, and turning the
// requests and their uploaded block ranges into one validated kernel launch
// each. Internal to api/.
//
// Free functions, no state: thread-safe as long as their arguments are not
// written concurrently.

#ifndef KVCACHE_API_GATHER_LAUNCHES_H_
#define KVCACHE_API_GATHER_LAUNCHES_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "api/cache_backend.h"
#include "api/kv_cache_manager.h"
#include "api/tensor_view.h"
#include "core/ids.h"
#include "kernels/kernel_params.h"

namespace kvcache::internal {

// InvalidArgument unless request `r` lies within the `length` tokens its
// sequence has (readable ones when `include_in_flight`, else computed ones).
absl::Status CheckGatherRange(const GatherRequest& r, int64_t length,
                              bool include_in_flight);

// Appends to `ranges` the entries of `table` (the sequence's block table)
// that hold request `r`'s tokens, from the block of its first token to the
// block of its last. InvalidArgument, naming request `index`, when `ranges`
// would exceed `capacity` entries (the lookup buffers' gather range).
// REQUIRES: r.num_tokens > 0 and r lies within `table`.
absl::Status AppendGatherBlocks(const GatherRequest& r, size_t index,
                                absl::Span<const BlockId> table,
                                int64_t block_size, int64_t capacity,
                                std::vector<BlockId>* ranges);

// Checks `key_out` / `value_out` as the dense output of `total` tokens of
// `layer`'s shape (any float dtype; `value_out` empty for a K-only cache)
// that overlap neither each other nor the cache. Returns them as a DenseKV.
// REQUIRES: 0 <= layer < backend.num_layers().
absl::StatusOr<DenseKV> CheckGatherBatchOutputs(const CacheBackend& backend,
                                                int64_t total,
                                                const TensorView& key_out,
                                                const TensorView& value_out,
                                                int layer = 0);

// One launch per request with tokens: request i reads `cache` through the
// blocks at device_ranges + range_begin[i] (its blocks from the one holding
// its first token to the one holding its last) into the rows of `output`
// after those of the requests before it. Every launch is validated before
// any is returned; an error names `layer`.
absl::StatusOr<std::vector<GatherParams>> BuildGatherLaunches(
    absl::Span<const GatherRequest> requests,
    absl::Span<const int64_t> range_begin, const int32_t* device_ranges,
    const LayerCache& cache, int64_t block_size, const DenseKV& output,
    int layer);

}  // namespace kvcache::internal

#endif  // KVCACHE_API_GATHER_LAUNCHES_H_
