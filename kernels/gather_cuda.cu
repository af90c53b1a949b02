// Host launcher of dequantize-gather: validate, dispatch, size the grid, check
// the launch.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "absl/numeric/bits.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/cuda_check.h"
#include "kernels/cuda_kernels.h"
#include "kernels/cuda_util.cuh"
#include "kernels/dtype_dispatch.h"
#include "kernels/gather.cuh"
#include "kernels/kernel_validation.h"

namespace kvcache {
namespace {

// Lanes per row of GatherDenseBlockKernel for a gather with 16-byte vectors
// (CanVectorizeRows), one per output vector (8, 16 or 32), or 0 when the kernel
// does not cover it (its conditions are at the kernel).
template <class Out>
int DenseBlockGroup(const GatherParams& p) {
  const CacheLayout& layout = p.cache.layout;
  const int64_t H = layout.num_heads, D = layout.head_size;
  const int64_t vectors =
      D * static_cast<int64_t>(sizeof(typename Out::T)) / 16;
  constexpr int64_t kLimit = int64_t{1} << 31;
  auto pow2 = [](int64_t n) {
    return n > 0 && absl::has_single_bit(static_cast<uint64_t>(n));
  };
  const bool covered =
      p.block_table != nullptr && !layout.records() && pow2(H) &&
      pow2(layout.block_size) && layout.head_size_v == D &&
      (vectors == 8 || vectors == 16 || vectors == 32) &&
      p.output.key_token_stride == H * D && p.output.key_head_stride == D &&
      p.output.value_token_stride == H * D && p.output.value_head_stride == D &&
      p.token_begin + p.num_tokens < kLimit && p.num_tokens * H * D < kLimit &&
      layout.num_blocks * layout.block_size * H * layout.key_row_pitch() <
          kLimit &&
      layout.num_blocks < kLimit;
  return covered ? static_cast<int>(vectors) : 0;
}

// REQUIRES: group == DenseBlockGroup<Out>(p) != 0.
template <class Cache, class Out>
absl::Status LaunchDenseBlock(const GatherParams& p, int group,
                              cudaStream_t stream) {
  absl::StatusOr<internal::DeviceLaunchInfo> info =
      internal::CurrentDeviceLaunchInfo();
  if (!info.ok()) return info.status();
  const CacheLayout& layout = p.cache.layout;
  // Powers of two: log2 is the count of trailing zeros.
  internal::RowDividersOf<internal::Pow2Divider> dividers;
  dividers.heads.log2 = static_cast<uint32_t>(
      absl::countr_zero(static_cast<uint64_t>(layout.num_heads)));
  dividers.block_size.log2 = static_cast<uint32_t>(
      absl::countr_zero(static_cast<uint64_t>(layout.block_size)));
  const int64_t rows = p.num_tokens * layout.num_heads;
  // The row pitch in cache vectors of kElems codes (a multiple of 16 bytes
  // for inline rows, so it divides).
  constexpr int64_t kElems = 16 / sizeof(typename Out::T);
  const uint32_t row_vecs =
      static_cast<uint32_t>(layout.key_row_pitch() / kElems);
  const uint32_t scale_stride = static_cast<uint32_t>(layout.scale_stride());
  auto launch = [&](auto lanes) {
    constexpr int kGroup = decltype(lanes)::value;
    constexpr int kThreads = internal::kThreadsPerBlock;
    constexpr int64_t kRowsPerBlock = kThreads / kGroup;
    return internal::LaunchKernel(
        &internal::GatherDenseBlockKernel<Cache, Out, kGroup, kThreads>,
        (rows + kRowsPerBlock - 1) / kRowsPerBlock, kThreads,
        info->programmatic_launch, stream, p, dividers, row_vecs, scale_stride);
  };
  switch (group) {
    case 8:
      return launch(std::integral_constant<int, 8>{});
    case 16:
      return launch(std::integral_constant<int, 16>{});
    case 32:
      return launch(std::integral_constant<int, 32>{});
    default:
      return absl::InternalError(
          absl::StrCat("dense block gather with ", group, " lanes per row"));
  }
}

template <class Cache, class Out>
absl::Status Launch(const GatherParams& p, cudaStream_t stream) {
  const bool vectorize = internal::CanVectorizeRows<typename Out::T>(
      p.output, p.num_tokens, p.cache);
  const int dense_group = vectorize ? DenseBlockGroup<Out>(p) : 0;
  if (dense_group != 0) {
    return LaunchDenseBlock<Cache, Out>(p, dense_group, stream);
  }
  const CacheLayout& layout = p.cache.layout;
  const int64_t rows = p.num_tokens * layout.num_heads;
  constexpr int64_t kElems = 16 / sizeof(typename Out::T);
  return internal::LaunchRowKernel(
      p, rows, vectorize,
      std::max(layout.head_size, layout.head_size_v) / kElems,
      [&layout](auto group, auto vecs) {
        constexpr int kGroup = decltype(group)::value;
        constexpr int kVecs = decltype(vecs)::value;
        constexpr int kThreads = internal::kThreadsPerBlock;
        return layout.records()
                   ? &internal::GatherVecKernel<Cache, Out, kGroup, kVecs,
                                                kThreads, true>
                   : &internal::GatherVecKernel<Cache, Out, kGroup, kVecs,
                                                kThreads, false>;
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
  // A K-only cache (head_size_v 0): the kernels' V loops have no vectors, so
  // V's pointers only need to be loadable; the K ones stand in for them (the
  // V scale load reads K's scale and discards it). The kernels stay as they
  // are for caches with V.
  GatherParams p = params;
  if (!p.cache.layout.has_value()) {
    p.cache.value_cache = p.cache.key_cache;
    p.cache.value_scale = p.cache.key_scale;
    p.output.value = p.output.key;
    p.output.value_token_stride = p.output.key_token_stride;
    p.output.value_head_stride = p.output.key_head_stride;
  }
  return internal::DispatchCacheType(
      p.cache.layout.cache_dtype, [&](auto cache) {
        return internal::DispatchFloatType(
            p.output.dtype, "output", [&](auto out) {
              return Launch<decltype(cache), decltype(out)>(p, s);
            });
      });
}

}  // namespace kvcache
