// Host launcher of dequantize-gather: validate, dispatch, size the grid, check
// the launch.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cuda_kernels.h"
#include "kernels/cuda_util.cuh"
#include "kernels/dtype_dispatch.h"
#include "kernels/gather.cuh"
#include "kernels/kernel_validation.h"
#include "kvcache/cuda_check.h"

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

template <class Cache, class Out>
absl::Status Launch(const GatherParams& p, cudaStream_t stream) {
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
