// The row walks of the CPU kernels, shared by the scalar and the AVX2 paths.
// A row is one (token, head) of K and of V (of K alone in a K-only cache,
// head_size_v == 0); row r = t * num_heads + h, taken
// apart, with its slot and offsets, by kernels/row_ref.h as in the CUDA
// kernels. Each walk runs rows [begin, end) of validated params through a row
// policy:
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
#include "kernels/fast_divmod.h"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"
#include "kernels/row_ref.h"

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

// The dividers of the CPU walks: plain integer division.
inline RowDividersOf<IntDivider> CpuRowDividers(const CacheLayout& layout) {
  RowDividersOf<IntDivider> dividers;
  dividers.heads.divisor = layout.num_heads;
  dividers.block_size.divisor = layout.block_size;
  return dividers;
}

// Calls body(row) for the rows [begin, end) in order. row_at(r) (WriteRowAt or
// GatherRowAt) gives the first row of each token in the range; the token's
// other rows share its slot.
template <class RowAt, class F>
void ForEachRow(int64_t begin, int64_t end, int64_t heads, RowAt&& row_at,
                F&& body) {
  for (int64_t r = begin; r < end;) {
    RowRef row = row_at(r);
    const int64_t token_end = std::min(end, r + heads - row.head);
    for (; r < token_end; ++r, ++row.head) body(row);
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
  const RowDividersOf<IntDivider> dividers = CpuRowDividers(layout);
  const int64_t num_slots = layout.num_slots();
  // Inline scales: the zeros after each scale, as the CUDA kernels store them.
  const size_t pad = static_cast<size_t>(layout.scale_pad_bytes());
  const bool has_value = layout.has_value();  // False: a K-only cache.
  ForEachRow(
      begin, end, layout.num_heads,
      [&](int64_t r) { return WriteRowAt(p, dividers, r); },
      [&](const RowRef& row) {
        if (!row.in_cache(num_slots)) return;
        const int64_t s = row.scale_offset(layout);
        Row::template Write<In, Cache>(
            key + row.key_offset(p.input), layout.head_size,
            key_cache + row.key_offset(layout),
            Cache::kQuantized ? p.cache.key_scale + s : nullptr);
        if (pad != 0) std::memset(p.cache.key_scale + s + 1, 0, pad);
        if (!has_value) return;
        Row::template Write<In, Cache>(
            value + row.value_offset(p.input), layout.head_size_v,
            value_cache + row.value_offset(layout),
            Cache::kQuantized ? p.cache.value_scale + s : nullptr);
        if (pad != 0) std::memset(p.cache.value_scale + s + 1, 0, pad);
      });
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
  const RowDividersOf<IntDivider> dividers = CpuRowDividers(layout);
  const bool has_value = layout.has_value();  // False: a K-only cache.
  ForEachRow(
      begin, end, layout.num_heads,
      [&](int64_t r) { return GatherRowAt(p, dividers, r); },
      [&](const RowRef& row) {
        const bool pad = row.slot < 0;
        const int64_t s = pad ? 0 : row.scale_offset(layout);
        Row::template Read<Cache, Out>(
            pad ? nullptr : key_cache + row.key_offset(layout),
            Cache::kQuantized ? p.cache.key_scale + s : nullptr,
            layout.head_size, key + row.key_offset(p.output));
        if (!has_value) return;
        Row::template Read<Cache, Out>(
            pad ? nullptr : value_cache + row.value_offset(layout),
            Cache::kQuantized ? p.cache.value_scale + s : nullptr,
            layout.head_size_v, value + row.value_offset(p.output));
      });
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_CPU_ROWS_H_
