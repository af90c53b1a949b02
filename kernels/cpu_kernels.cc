// CPU cache kernels. The arithmetic lives in kernels/quantize.h, kernels/fp8.h
// and kernels/float_convert.h, shared with the CUDA kernels, so the results are
// bit-identical; this file only walks the rows. Compiled with -ffp-contract=off
// (kernels/BUILD).

#include "kernels/cpu_kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "core/cache_layout.h"
#include "kernels/dtype_dispatch.h"
#include "kernels/kernel_params.h"
#include "kernels/kernel_validation.h"
#include "kernels/quantize.h"

namespace kvcache {
namespace {

using internal::DispatchCacheType;
using internal::DispatchFloatType;

// Work (elements touched) below which a call stays on the calling thread.
constexpr int64_t kParallelThreshold = int64_t{1} << 20;
constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;

// Runs fn(begin, end) over [0, n) items of `work_per_item` elements each, split
// across threads when the total work is large.
template <class F>
void ParallelFor(int64_t n, int64_t work_per_item, F&& fn) {
  const int64_t work = n * std::max<int64_t>(work_per_item, 1);
  const int64_t hw = std::max<int64_t>(std::thread::hardware_concurrency(), 1);
  const int64_t threads = work < kParallelThreshold
                              ? 1
                              : std::min({hw, work / kMinWorkPerThread, n});
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = std::min(n, t * chunk);
    const int64_t end = std::min(n, begin + chunk);
    pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(int64_t{0}, std::min(n, chunk));
  for (std::thread& thread : pool) thread.join();
}

// Quantizes (or copies) one row of n elements; writes *scale for quantized
// caches.
template <class In, class Cache>
void WriteRow(const typename In::T* src, int64_t n, typename Cache::T* dst,
              float* scale) {
  if constexpr (!Cache::kQuantized) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename In::T));
  } else {
    uint32_t absmax = 0;
    for (int64_t i = 0; i < n; ++i) {
      absmax =
          internal::MaxBits(absmax, internal::AbsBits(In::ToFloat(src[i])));
    }
    const float s = internal::ScaleFromAbsMaxBits(absmax, Cache::kQMax);
    const float inv = internal::InverseScale(s);
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = Cache::Encode(internal::MulRn(In::ToFloat(src[i]), inv));
    }
    *scale = s;
  }
}

// Dequantizes (or converts) one row of n elements; zeros when src is null.
template <class Cache, class Out>
void ReadRow(const typename Cache::T* src, const float* scale, int64_t n,
             typename Out::T* dst) {
  if (src == nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Out::FromFloat(0.0f);
    return;
  }
  if constexpr (std::is_same_v<Cache, Out>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename Out::T));
  } else if constexpr (Cache::kQuantized) {
    const float s = *scale;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = Out::FromFloat(internal::Dequantize(Cache::Decode(src[i]), s));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] =
          Out::FromFloat(internal::CanonicalizeNan(Cache::ToFloat(src[i])));
    }
  }
}

template <class In, class Cache>
absl::Status QuantizeWriteImpl(const QuantizeWriteParams& p) {
  using InT = typename In::T;
  using CacheT = typename Cache::T;
  const CacheLayout& layout = p.cache.layout;
  const auto* key = static_cast<const InT*>(p.input.key);
  const auto* value = static_cast<const InT*>(p.input.value);
  auto* key_cache = static_cast<CacheT*>(p.cache.key_cache);
  auto* value_cache = static_cast<CacheT*>(p.cache.value_cache);
  const int64_t heads = layout.num_heads;
  ParallelFor(
      p.num_tokens * heads, layout.head_size + layout.head_size_v,
      [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t t = row / heads;
          const int64_t h = row % heads;
          const int64_t slot = p.slot_mapping[t];
          if (slot < 0) continue;
          const int64_t s = layout.scale_offset(slot, h);
          WriteRow<In, Cache>(
              key + t * p.input.key_token_stride + h * p.input.key_head_stride,
              layout.head_size, key_cache + layout.key_offset(slot, h),
              Cache::kQuantized ? p.cache.key_scale + s : nullptr);
          WriteRow<In, Cache>(
              value + t * p.input.value_token_stride +
                  h * p.input.value_head_stride,
              layout.head_size_v, value_cache + layout.value_offset(slot, h),
              Cache::kQuantized ? p.cache.value_scale + s : nullptr);
        }
      });
  return absl::OkStatus();
}

// Slot of gathered token t, or -1 for padding.
int64_t GatherSlot(const GatherParams& p, int64_t t) {
  if (p.slots != nullptr) return p.slots[t];
  const int64_t bs = p.cache.layout.block_size;
  const int64_t pos = p.token_begin + t;
  const int64_t block = p.block_table[pos / bs];
  return block < 0 ? -1 : block * bs + pos % bs;
}

template <class Cache, class Out>
absl::Status GatherImpl(const GatherParams& p) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
  const CacheLayout& layout = p.cache.layout;
  const auto* key_cache = static_cast<const CacheT*>(p.cache.key_cache);
  const auto* value_cache = static_cast<const CacheT*>(p.cache.value_cache);
  auto* key = static_cast<OutT*>(p.output.key);
  auto* value = static_cast<OutT*>(p.output.value);
  const int64_t heads = layout.num_heads;
  ParallelFor(
      p.num_tokens * heads, layout.head_size + layout.head_size_v,
      [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t t = row / heads;
          const int64_t h = row % heads;
          const int64_t slot = GatherSlot(p, t);
          const bool pad = slot < 0;
          const int64_t s = pad ? 0 : layout.scale_offset(slot, h);
          ReadRow<Cache, Out>(
              pad ? nullptr : key_cache + layout.key_offset(slot, h),
              Cache::kQuantized ? p.cache.key_scale + s : nullptr,
              layout.head_size,
              key + t * p.output.key_token_stride +
                  h * p.output.key_head_stride);
          ReadRow<Cache, Out>(
              pad ? nullptr : value_cache + layout.value_offset(slot, h),
              Cache::kQuantized ? p.cache.value_scale + s : nullptr,
              layout.head_size_v,
              value + t * p.output.value_token_stride +
                  h * p.output.value_head_stride);
        }
      });
  return absl::OkStatus();
}

}  // namespace

absl::Status QuantizeWriteCpu(const QuantizeWriteParams& params) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateQuantizeWrite(params));
  if (params.num_tokens == 0) return absl::OkStatus();
  KVCACHE_RETURN_IF_ERROR(internal::CheckSlotIndices(
      params.slot_mapping, params.num_tokens, params.cache.layout.num_slots(),
      "slot_mapping"));
  return DispatchFloatType(params.input.dtype, "input", [&](auto in) {
    return DispatchCacheType(params.cache.layout.cache_dtype, [&](auto cache) {
      using In = decltype(in);
      using Cache = decltype(cache);
      if constexpr (internal::kIsSupportedWrite<In, Cache>) {
        return QuantizeWriteImpl<In, Cache>(params);
      } else {
        return absl::InternalError(
            "unsupported input/cache dtype pair passed validation");
      }
    });
  });
}

absl::Status GatherCpu(const GatherParams& params) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateGather(params));
  if (params.num_tokens == 0) return absl::OkStatus();
  const CacheLayout& layout = params.cache.layout;
  if (params.slots != nullptr) {
    KVCACHE_RETURN_IF_ERROR(internal::CheckSlotIndices(
        params.slots, params.num_tokens, layout.num_slots(), "slots"));
  } else {
    const int64_t first = params.token_begin / layout.block_size;
    const int64_t last =
        (params.token_begin + params.num_tokens - 1) / layout.block_size;
    KVCACHE_RETURN_IF_ERROR(internal::CheckBlockTableIndices(
        params.block_table + first, last - first + 1, layout.num_blocks));
  }
  return DispatchCacheType(layout.cache_dtype, [&](auto cache) {
    return DispatchFloatType(params.output.dtype, "output", [&](auto out) {
      return GatherImpl<decltype(cache), decltype(out)>(params);
    });
  });
}

absl::Status BlockCopyCpu(const BlockCopyParams& params) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateBlockCopy(params));
  if (params.num_pairs == 0) return absl::OkStatus();
  const CacheLayout& layout = params.cache.layout;
  KVCACHE_RETURN_IF_ERROR(internal::CheckBlockPairIndices(
      params.pairs, params.num_pairs, layout.num_blocks));
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  const int64_t key_bytes = layout.key_block_elems() * elem;
  const int64_t value_bytes = layout.value_block_elems() * elem;
  const int64_t scale_bytes =
      layout.scale_block_elems() * static_cast<int64_t>(sizeof(float));
  const bool quantized = IsQuantized(layout.cache_dtype);
  auto copy = [](void* base, int64_t bytes, int64_t src, int64_t dst) {
    char* b = static_cast<char*>(base);
    std::memcpy(b + dst * bytes, b + src * bytes, static_cast<size_t>(bytes));
  };
  ParallelFor(params.num_pairs, key_bytes + value_bytes,
              [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; ++i) {
                  const int64_t src = params.pairs[2 * i];
                  const int64_t dst = params.pairs[2 * i + 1];
                  copy(params.cache.key_cache, key_bytes, src, dst);
                  copy(params.cache.value_cache, value_bytes, src, dst);
                  if (quantized) {
                    copy(params.cache.key_scale, scale_bytes, src, dst);
                    copy(params.cache.value_scale, scale_bytes, src, dst);
                  }
                }
              });
  return absl::OkStatus();
}

}  // namespace kvcache
