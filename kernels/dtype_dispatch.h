// The one place that maps runtime dtypes and row sizes to the compile-time
// types and constants the kernels are templated on (FlashInfer's DISPATCH_*
// habit). Host code only; no CUDA.
//
//   DispatchFloatType(dtype, "input", [&](auto type) { ... decltype(type)::T
//   ... }); DispatchCacheType(dtype, [&](auto type) { ... });      // int8,
//   fp8, bf16, fp16 DispatchRowConfig(vectors_per_row, [&](auto group, auto
//   vecs) { ... });
//
// Each returns the functor's absl::Status, or InvalidArgument naming an
// unsupported value.

#ifndef KVCACHE_KERNELS_DTYPE_DISPATCH_H_
#define KVCACHE_KERNELS_DTYPE_DISPATCH_H_

#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/dtype.h"
#include "kernels/float_convert.h"
#include "kernels/quantize.h"

namespace kvcache::internal {

template <class F>
absl::Status DispatchFloatType(DType dtype, absl::string_view what, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(Float32Type{});
    case DType::kFloat16:
      return f(Float16Type{});
    case DType::kBFloat16:
      return f(BFloat16Type{});
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, " dtype ", DTypeName(dtype),
                       " is not float32, float16 or bfloat16"));
  }
}

template <class F>
absl::Status DispatchCacheType(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kInt8:
      return f(Int8Type{});
    case DType::kFp8E4M3:
      return f(Fp8E4M3Type{});
    case DType::kFloat16:
      return f(Float16Type{});
    case DType::kBFloat16:
      return f(BFloat16Type{});
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("cache dtype ", DTypeName(dtype),
                       " is not int8, fp8_e4m3, float16 or bfloat16"));
  }
}

// True when a kernel <In, Cache> exists: quantized caches take any float input,
// a bf16/fp16 cache only its own dtype (plain copy).
template <class In, class Cache>
inline constexpr bool kIsSupportedWrite =
    Cache::kQuantized || std::is_same_v<In, Cache>;

// Row configurations of the vectorized CUDA kernels: `group` lanes share one
// (token, head) row and each lane holds up to `vecs` 16-byte vectors of it.
// Picks the smallest group that covers the row with one vector per lane, else
// 32 lanes with 2, 4 or 8 vectors each. (Four vectors per lane in groups of
// four measured slower on an H100 at every size: benchmarks/results/NOTES.md.)
inline constexpr int kMaxVectorsPerRow = 32 * 8;

template <class F>
absl::Status DispatchRowConfig(int64_t vectors_per_row, F&& f) {
  using std::integral_constant;
  if (vectors_per_row <= 8)
    return f(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  if (vectors_per_row <= 16)
    return f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  if (vectors_per_row <= 32)
    return f(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  if (vectors_per_row <= 64)
    return f(integral_constant<int, 32>{}, integral_constant<int, 2>{});
  if (vectors_per_row <= 128)
    return f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
  if (vectors_per_row <= kMaxVectorsPerRow) {
    return f(integral_constant<int, 32>{}, integral_constant<int, 8>{});
  }
  return absl::InvalidArgumentError(absl::StrCat("a row of ", vectors_per_row,
                                                 " 16-byte vectors exceeds ",
                                                 kMaxVectorsPerRow));
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_DTYPE_DISPATCH_H_
