// Argument validation shared by the CPU and CUDA backends of the cache kernels.
// Every function returns OkStatus or InvalidArgument whose message names the
// bad argument, its value and the limit it broke. Nothing here dereferences a
// pointer except the Check*Indices functions, which read host-readable index
// arrays (the CPU backend always; the CUDA backend in debug builds, after
// copying them to the host).

#ifndef KVCACHE_KERNELS_KERNEL_VALIDATION_H_
#define KVCACHE_KERNELS_KERNEL_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "core/cache_layout.h"
#include "core/status_macros.h"
#include "kernels/kernel_params.h"

namespace kvcache::internal {

inline constexpr int64_t kHeadSizeMultiple = 8;

absl::Status ValidateLayout(const CacheLayout& layout);
absl::Status ValidateLayerCache(const LayerCache& cache);
absl::Status ValidateQuantizeWrite(const QuantizeWriteParams& params);
absl::Status ValidateGather(const GatherParams& params);
absl::Status ValidateBlockCopy(const BlockCopyParams& params);

// Every slot is < num_slots (negative slots are padding).
absl::Status CheckSlotIndices(const int64_t* slots, int64_t n,
                              int64_t num_slots, const char* what);
// Every entry of block_table[0, len) is < num_blocks (negative entries are
// padding).
absl::Status CheckBlockTableIndices(const int32_t* block_table, int64_t len,
                                    int64_t num_blocks);
// Every block id is in [0, num_blocks), and no destination is written twice or
// read as a source.
absl::Status CheckBlockPairIndices(const int64_t* pairs, int64_t num_pairs,
                                   int64_t num_blocks);

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_KERNEL_VALIDATION_H_
