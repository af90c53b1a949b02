// The row walks of the CPU kernels, shared by the scalar and the AVX2 paths.
// A row is one (token, head) of K and of V; row r = t * num_heads + h. Each
// walk runs rows [begin, end) of validated params through a row policy:
//
//   struct Row {
//     template <class In, class Cache>   // Quantizes or copies one row.
//     static void Write(const In::T* src, int64_t n, Cache::T* dst,
//                       float* scale);
//     template <class Cache, class Out>  // Dequantizes one row; zeros
//     static void Read(const Cache::T* src, const float* scale, int64_t n,
//                      Out::T* dst);     // when src is null (padding).
//   };
//
// ScalarRow below is the reference the AVX2 rows (cpu_kernels_avx2.cc) are
// tested against, bit for bit. Host only; compiled with -ffp-contract=off.

#ifndef KVCACHE_KERNELS_CPU_ROWS_H_
#define KVCACHE_KERNELS_CPU_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/cache_layout.h"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"

namespace kvcache::internal {

struct ScalarRow {
  template <class In, class Cache>
  static void Write(const typename In::T* src, int64_t n,
                    typename Cache::T* dst, float* scale) {
    if constexpr (!Cache::kQuantized) {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename In::T));
    } else {
      uint32_t absmax = 0;
      for (int64_t i = 0; i < n; ++i) {
        absmax = MaxBits(absmax, AbsBits(In::ToFloat(src[i])));
      }
      const float s = ScaleFromAbsMaxBits(absmax, Cache::kQMax);
      const float inv = InverseScale(s);
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = Cache::Encode(MulRn(In::ToFloat(src[i]), inv));
      }
      *scale = s;
    }
  }

  template <class Cache, class Out>
  static void Read(const typename Cache::T* src, const float* scale, int64_t n,
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
        dst[i] = Out::FromFloat(Dequantize(Cache::Decode(src[i]), s));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = Out::FromFloat(CanonicalizeNan(Cache::ToFloat(src[i])));
      }
    }
  }
};

// Calls row(t, h) for rows [begin, end) in order, token by token.
template <class F>
void ForEachRow(int64_t begin, int64_t end, int64_t heads, F&& row) {
  for (int64_t t = begin / heads; t * heads < end; ++t) {
    const int64_t h_end = std::min(heads, end - t * heads);
    for (int64_t h = std::max<int64_t>(begin - t * heads, 0); h < h_end; ++h) {
      row(t, h);
    }
  }
}

template <class In, class Cache, class Row>
void WriteRows(const QuantizeWriteParams& p, int64_t begin, int64_t end) {
  using InT = typename In::T;
  using CacheT = typename Cache::T;
  const CacheLayout& layout = p.cache.layout;
  const auto* key = static_cast<const InT*>(p.input.key);
  const auto* value = static_cast<const InT*>(p.input.value);
  auto* key_cache = static_cast<CacheT*>(p.cache.key_cache);
  auto* value_cache = static_cast<CacheT*>(p.cache.value_cache);
  ForEachRow(begin, end, layout.num_heads, [&](int64_t t, int64_t h) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) return;
    const int64_t s = layout.scale_offset(slot, h);
    Row::template Write<In, Cache>(
        key + t * p.input.key_token_stride + h * p.input.key_head_stride,
        layout.head_size, key_cache + layout.key_offset(slot, h),
        Cache::kQuantized ? p.cache.key_scale + s : nullptr);
    Row::template Write<In, Cache>(
        value + t * p.input.value_token_stride + h * p.input.value_head_stride,
        layout.head_size_v, value_cache + layout.value_offset(slot, h),
        Cache::kQuantized ? p.cache.value_scale + s : nullptr);
  });
}

// Slot of gathered token t, or -1 for padding.
inline int64_t GatherSlot(const GatherParams& p, int64_t t) {
  if (p.slots != nullptr) return p.slots[t];
  const int64_t bs = p.cache.layout.block_size;
  const int64_t pos = p.token_begin + t;
  const int64_t block = p.block_table[pos / bs];
  return block < 0 ? -1 : block * bs + pos % bs;
}

template <class Cache, class Out, class Row>
void GatherRows(const GatherParams& p, int64_t begin, int64_t end) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
  const CacheLayout& layout = p.cache.layout;
  const auto* key_cache = static_cast<const CacheT*>(p.cache.key_cache);
  const auto* value_cache = static_cast<const CacheT*>(p.cache.value_cache);
  auto* key = static_cast<OutT*>(p.output.key);
  auto* value = static_cast<OutT*>(p.output.value);
  int64_t slot_t = -1, slot = -1;
  ForEachRow(begin, end, layout.num_heads, [&](int64_t t, int64_t h) {
    if (t != slot_t) {
      slot_t = t;
      slot = GatherSlot(p, t);
    }
    const bool pad = slot < 0;
    const int64_t s = pad ? 0 : layout.scale_offset(slot, h);
    Row::template Read<Cache, Out>(
        pad ? nullptr : key_cache + layout.key_offset(slot, h),
        Cache::kQuantized ? p.cache.key_scale + s : nullptr, layout.head_size,
        key + t * p.output.key_token_stride + h * p.output.key_head_stride);
    Row::template Read<Cache, Out>(
        pad ? nullptr : value_cache + layout.value_offset(slot, h),
        Cache::kQuantized ? p.cache.value_scale + s : nullptr,
        layout.head_size_v,
        value + t * p.output.value_token_stride +
            h * p.output.value_head_stride);
  });
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_CPU_ROWS_H_
