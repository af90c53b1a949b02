// Device kernel of block copy (kernels/kernel_params.h: BlockCopyParams): the
// copy-on-write step.
//
// Grid: x over pairs, y over chunks of a block, z over the four regions of a
// layer (K, V, K scales, V scales; a layer in records has one region, its
// records). Each region is copied in the widest access (16, 8 or 4 bytes)
// that its block size and base alignment allow.

#ifndef KVCACHE_KERNELS_BLOCK_COPY_CUH_
#define KVCACHE_KERNELS_BLOCK_COPY_CUH_

#include <cstdint>

#include "kernels/cuda_util.cuh"

namespace kvcache::internal {

struct BlockCopyRegion {
  // Null: nothing to copy (scales of bf16/fp16 caches, inline scales).
  char* base = nullptr;
  int64_t block_bytes = 0;  // Bytes of one block in this region.
  int32_t access_bytes =
      4;  // 16, 8 or 4: divides block_bytes and the base alignment.
};

struct BlockCopyLaunch {
  BlockCopyRegion regions[4];
  const int64_t* pairs = nullptr;
  int64_t num_pairs = 0;
  int64_t num_blocks =
      0;  // Pairs naming a block outside [0, num_blocks) are skipped.
};

template <class T>
__device__ __forceinline__ void CopyChunks(const char* __restrict__ src,
                                           char* __restrict__ dst,
                                           int64_t bytes) {
  const int64_t step = static_cast<int64_t>(gridDim.y) * kThreadsPerBlock;
  const int64_t n = bytes / static_cast<int64_t>(sizeof(T));
  const T* s = reinterpret_cast<const T*>(src);
  T* d = reinterpret_cast<T*>(dst);
  for (int64_t i =
           static_cast<int64_t>(blockIdx.y) * kThreadsPerBlock + threadIdx.x;
       i < n; i += step) {
    d[i] = s[i];
  }
}

__global__ void __launch_bounds__(kThreadsPerBlock)
    BlockCopyKernel(const BlockCopyLaunch p) {
  const BlockCopyRegion& region = p.regions[blockIdx.z];
  if (region.base == nullptr) return;
  for (int64_t pair = blockIdx.x; pair < p.num_pairs; pair += gridDim.x) {
    const int64_t src = p.pairs[2 * pair];
    const int64_t dst = p.pairs[2 * pair + 1];
    if (src < 0 || src >= p.num_blocks || dst < 0 || dst >= p.num_blocks)
      continue;
    const char* from = region.base + src * region.block_bytes;
    char* to = region.base + dst * region.block_bytes;
    if (region.access_bytes == 16) {
      CopyChunks<uint4>(from, to, region.block_bytes);
    } else if (region.access_bytes == 8) {
      CopyChunks<uint2>(from, to, region.block_bytes);
    } else {
      CopyChunks<uint32_t>(from, to, region.block_bytes);
    }
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_BLOCK_COPY_CUH_
