// Host launcher of quantize-and-write: validate, dispatch, size the grid, check
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
#include "kernels/kernel_validation.h"
#include "kernels/quantize_write.cuh"

namespace kvcache {
namespace {

template <class In, class Cache>
absl::Status Launch(const QuantizeWriteParams& p, cudaStream_t stream) {
  const CacheLayout& layout = p.cache.layout;
  const int64_t rows = p.num_tokens * layout.num_heads;
  constexpr int64_t kElems = 16 / sizeof(typename In::T);
  return internal::LaunchRowKernel(
      p, rows,
      internal::CanVectorizeRows<typename In::T>(p.input, p.num_tokens,
                                                 p.cache),
      std::max(layout.head_size, layout.head_size_v) / kElems,
      [&layout](auto group, auto vecs) {
        constexpr int kGroup = decltype(group)::value;
        constexpr int kVecs = decltype(vecs)::value;
        constexpr int kThreads = internal::kThreadsPerBlock;
        const bool records = layout.records();
        if constexpr (Cache::kQuantized) {
          if (layout.inline_scales()) {
            return records ? &internal::QuantizeWriteInlineVecKernel<
                                 In, Cache, kGroup, kVecs, kThreads, true>
                           : &internal::QuantizeWriteInlineVecKernel<
                                 In, Cache, kGroup, kVecs, kThreads, false>;
          }
        }
        return records
                   ? &internal::QuantizeWriteVecKernel<In, Cache, kGroup, kVecs,
                                                       kThreads, true>
                   : &internal::QuantizeWriteVecKernel<In, Cache, kGroup, kVecs,
                                                       kThreads, false>;
      },
      &internal::QuantizeWriteScalarKernel<In, Cache>,
      internal::RowGrid::kTwoRowsPerGroup, stream);
}

}  // namespace

absl::Status QuantizeWriteCuda(const QuantizeWriteParams& params,
                               void* stream) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateQuantizeWrite(params));
  if (params.num_tokens == 0) return absl::OkStatus();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#ifndef NDEBUG
  std::vector<int64_t> slots;
  KVCACHE_RETURN_IF_ERROR(internal::CopyForDebugCheck(
      params.slot_mapping, params.num_tokens, s, &slots));
  KVCACHE_RETURN_IF_ERROR(internal::CheckSlotIndices(
      slots.data(), static_cast<int64_t>(slots.size()),
      params.cache.layout.num_slots(), "slot_mapping"));
#endif
  // A K-only cache (head_size_v 0): no V is read or written; V's input
  // strides follow K's so that only K decides the vector path.
  QuantizeWriteParams p = params;
  if (!p.cache.layout.has_value()) {
    p.input.value = p.input.key;
    p.input.value_token_stride = p.input.key_token_stride;
    p.input.value_head_stride = p.input.key_head_stride;
  }
  return internal::DispatchFloatType(p.input.dtype, "input", [&](auto in) {
    return internal::DispatchCacheType(
        p.cache.layout.cache_dtype, [&](auto cache) {
          using In = decltype(in);
          using Cache = decltype(cache);
          if constexpr (internal::kIsSupportedWrite<In, Cache>) {
            return Launch<In, Cache>(p, s);
          } else {
            return absl::InternalError(
                "unsupported input/cache dtype pair passed validation");
          }
        });
  });
}

}  // namespace kvcache
