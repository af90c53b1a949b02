// ScalePlacement: where a quantized (int8 / fp8_e4m3) cache keeps the float32
// scale of each (token, head) row (DESIGN.md section 2). A plain enum; the
// layout it implies is computed by CacheLayout (core/cache_layout.h).
//
//   kSide    scales in their own [num_blocks, block_size, num_heads] tensors
//            (the default).
//   kInline  each row carries its scale: head_size codes, the float32 scale,
//            zero padding to a multiple of 16 bytes (head_size 128 -> 144).

#ifndef KVCACHE_CORE_SCALE_PLACEMENT_H_
#define KVCACHE_CORE_SCALE_PLACEMENT_H_

#include <cstdint>

namespace kvcache {

enum class ScalePlacement : int32_t {
  kSide = 0,
  kInline = 1,
};

// True when `p` holds one of the enumerators (guards values cast from ints).
inline constexpr bool IsValidScalePlacement(ScalePlacement p) {
  return p == ScalePlacement::kSide || p == ScalePlacement::kInline;
}

// "side" or "inline" ("invalid" for other values).
inline constexpr const char* ScalePlacementName(ScalePlacement p) {
  return p == ScalePlacement::kSide     ? "side"
         : p == ScalePlacement::kInline ? "inline"
                                        : "invalid";
}

}  // namespace kvcache

#endif  // KVCACHE_CORE_SCALE_PLACEMENT_H_
