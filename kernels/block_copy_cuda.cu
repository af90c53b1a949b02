// Host launcher of block copy: validate, size the grid, check the launch.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/cuda_check.h"
#include "kernels/block_copy.cuh"
#include "kernels/cuda_kernels.h"
#include "kernels/cuda_util.cuh"
#include "kernels/kernel_validation.h"

namespace kvcache {
namespace {

internal::BlockCopyRegion Region(void* base, int64_t block_bytes) {
  internal::BlockCopyRegion r;
  if (base == nullptr) return r;
  r.base = static_cast<char*>(base);
  r.block_bytes = block_bytes;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  for (int32_t width : {16, 8, 4}) {
    if (block_bytes % width == 0 && addr % width == 0) {
      r.access_bytes = width;
      break;
    }
  }
  return r;
}

}  // namespace

absl::Status BlockCopyCuda(const BlockCopyParams& params, void* stream) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateBlockCopy(params));
  if (params.num_pairs == 0) return absl::OkStatus();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const CacheLayout& layout = params.cache.layout;
#ifndef NDEBUG
  std::vector<int64_t> pairs;
  KVCACHE_RETURN_IF_ERROR(internal::CopyForDebugCheck(
      params.pairs, 2 * params.num_pairs, s, &pairs));
  if (!pairs.empty()) {
    KVCACHE_RETURN_IF_ERROR(internal::CheckBlockPairIndices(
        pairs.data(), params.num_pairs, layout.num_blocks));
  }
#endif
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  // Inline scales travel with the K and V rows: no scale regions.
  const int64_t scale_bytes =
      layout.side_scale_block_elems() * static_cast<int64_t>(sizeof(float));
  internal::BlockCopyLaunch launch;
  if (layout.records()) {  // A block is one run of block_size records.
    launch.regions[0] = Region(params.cache.key_cache,
                               layout.block_size * layout.record_pitch * elem);
  } else {
    launch.regions[0] =
        Region(params.cache.key_cache, layout.key_block_elems() * elem);
    launch.regions[1] =
        Region(params.cache.value_cache, layout.value_block_elems() * elem);
  }
  if (layout.side_scales() && !layout.records()) {
    launch.regions[2] = Region(params.cache.key_scale, scale_bytes);
    launch.regions[3] = Region(params.cache.value_scale, scale_bytes);
  }
  launch.pairs = params.pairs;
  launch.num_pairs = params.num_pairs;
  launch.num_blocks = layout.num_blocks;

  // Enough chunks in y that each thread moves a few 16-byte words of the
  // largest region.
  const int64_t largest =
      std::max(launch.regions[0].block_bytes, launch.regions[1].block_bytes);
  const int64_t per_chunk = int64_t{internal::kThreadsPerBlock} * 16 * 4;
  const unsigned chunks = static_cast<unsigned>(
      std::clamp<int64_t>((largest + per_chunk - 1) / per_chunk, 1, 65535));
  const unsigned pairs_x =
      static_cast<unsigned>(std::min<int64_t>(params.num_pairs, 65535 * 64));
  internal::BlockCopyKernel<<<dim3(pairs_x, chunks, 4),
                              internal::kThreadsPerBlock, 0, s>>>(launch);
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvcache
