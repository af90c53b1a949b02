// Host launcher of dequantize-gather: validate, dispatch, size the grid, check
// the launch.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/cuda_check.h"
#include "kernels/cuda_kernels.h"
#include "kernels/cuda_util.cuh"
#include "kernels/dtype_dispatch.h"
#include "kernels/gather.cuh"
#include "kernels/kernel_validation.h"

namespace kvcache {
namespace {

template <class Out>
bool CanVectorize(const GatherParams& p) {
  const int64_t elem = sizeof(typename Out::T);
  const CacheLayout& layout = p.cache.layout;
  return internal::RowsAligned16(p.output.key, elem, p.num_tokens,
                                 layout.num_heads, p.output.key_token_stride,
                                 p.output.key_head_stride) &&
         internal::RowsAligned16(p.output.value, elem, p.num_tokens,
                                 layout.num_heads, p.output.value_token_stride,
                                 p.output.value_head_stride) &&
         internal::IsAligned16(p.cache.key_cache) &&
         internal::IsAligned16(p.cache.value_cache);
}

bool IsPowerOfTwo(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

uint32_t Log2(int64_t n) {
  uint32_t l = 0;
  while ((int64_t{1} << l) < n) ++l;
  return l;
}

// Whether GatherDenseBlockKernel covers this gather (its conditions are at the
// kernel), given 16-byte vectors.
template <class Out>
bool CanUseDenseBlockKernel(const GatherParams& p) {
  const CacheLayout& layout = p.cache.layout;
  const int64_t H = layout.num_heads, D = layout.head_size;
  const int64_t vectors =
      D * static_cast<int64_t>(sizeof(typename Out::T)) / 16;
  constexpr int64_t kLimit = int64_t{1} << 31;
  return p.block_table != nullptr && IsPowerOfTwo(H) &&
         IsPowerOfTwo(layout.block_size) && layout.head_size_v == D &&
         (vectors == 8 || vectors == 16 || vectors == 32) &&
         p.output.key_token_stride == H * D && p.output.key_head_stride == D &&
         p.output.value_token_stride == H * D &&
         p.output.value_head_stride == D &&
         p.token_begin + p.num_tokens < kLimit &&
         p.num_tokens * H * D < kLimit &&
         layout.num_blocks * layout.block_size * H * D < kLimit &&
         layout.num_blocks < kLimit;
}

template <class Cache, class Out>
absl::Status LaunchDenseBlock(const GatherParams& p, cudaStream_t stream) {
  absl::StatusOr<internal::DeviceLaunchInfo> info =
      internal::CurrentDeviceLaunchInfo();
  if (!info.ok()) return info.status();
  const CacheLayout& layout = p.cache.layout;
  internal::DenseBlockShifts shifts;
  shifts.log2_heads = Log2(layout.num_heads);
  shifts.log2_block_size = Log2(layout.block_size);
  const int64_t vectors =
      layout.head_size * static_cast<int64_t>(sizeof(typename Out::T)) / 16;
  const int64_t rows = p.num_tokens * layout.num_heads;
  auto launch = [&](auto* kernel, int64_t group) {
    const int64_t per_block = internal::kThreadsPerBlock / group;
    return internal::LaunchKernel(kernel, (rows + per_block - 1) / per_block,
                                  internal::kThreadsPerBlock,
                                  info->programmatic_launch, stream, p, shifts);
  };
  constexpr int kThreads = internal::kThreadsPerBlock;
  if (vectors == 8) {
    return launch(&internal::GatherDenseBlockKernel<Cache, Out, 8, kThreads>,
                  8);
  }
  if (vectors == 16) {
    return launch(&internal::GatherDenseBlockKernel<Cache, Out, 16, kThreads>,
                  16);
  }
  return launch(&internal::GatherDenseBlockKernel<Cache, Out, 32, kThreads>,
                32);
}

template <class Cache, class Out>
absl::Status Launch(const GatherParams& p, cudaStream_t stream) {
  if (CanVectorize<Out>(p) && CanUseDenseBlockKernel<Out>(p)) {
    return LaunchDenseBlock<Cache, Out>(p, stream);
  }
  const CacheLayout& layout = p.cache.layout;
  const int64_t rows = p.num_tokens * layout.num_heads;
  constexpr int64_t kElems = 16 / sizeof(typename Out::T);
  return internal::LaunchRowKernel(
      p, rows, CanVectorize<Out>(p),
      std::max(layout.head_size, layout.head_size_v) / kElems,
      [](auto group, auto vecs) {
        return &internal::GatherVecKernel<Cache, Out, decltype(group)::value,
                                          decltype(vecs)::value,
                                          internal::kThreadsPerBlock>;
      },
      &internal::GatherScalarKernel<Cache, Out>, internal::RowGrid::kResident,
      stream);
}

#ifndef NDEBUG
absl::Status DebugCheckIndices(const GatherParams& p, cudaStream_t s) {
  const CacheLayout& layout = p.cache.layout;
  if (p.slots != nullptr) {
    std::vector<int64_t> slots;
    KVCACHE_RETURN_IF_ERROR(
        internal::CopyForDebugCheck(p.slots, p.num_tokens, s, &slots));
    return internal::CheckSlotIndices(slots.data(),
                                      static_cast<int64_t>(slots.size()),
                                      layout.num_slots(), "slots");
  }
  const int64_t first = p.token_begin / layout.block_size;
  const int64_t last = (p.token_begin + p.num_tokens - 1) / layout.block_size;
  std::vector<int32_t> table;
  KVCACHE_RETURN_IF_ERROR(internal::CopyForDebugCheck(
      p.block_table + first, last - first + 1, s, &table));
  return internal::CheckBlockTableIndices(
      table.data(), static_cast<int64_t>(table.size()), layout.num_blocks);
}
#endif

}  // namespace

absl::Status GatherCuda(const GatherParams& params, void* stream) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateGather(params));
  if (params.num_tokens == 0) return absl::OkStatus();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#ifndef NDEBUG
  KVCACHE_RETURN_IF_ERROR(DebugCheckIndices(params, s));
#endif
  return internal::DispatchCacheType(
      params.cache.layout.cache_dtype, [&](auto cache) {
        return internal::DispatchFloatType(
            params.output.dtype, "output", [&](auto out) {
              return Launch<decltype(cache), decltype(out)>(params, s);
            });
      });
}

}  // namespace kvcache
