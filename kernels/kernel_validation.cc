#include "kernels/kernel_validation.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace kvcache::internal {
namespace {

using absl::InvalidArgumentError;
using absl::StrCat;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

bool IsAligned(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

absl::Status CheckHeadSize(const char* what, int64_t head_size) {
  if (head_size <= 0 || head_size > kMaxHeadSize) {
    return InvalidArgumentError(
        StrCat(what, " ", head_size, " is not in [8, ", kMaxHeadSize, "]"));
  }
  if (head_size % kHeadSizeMultiple != 0) {
    return InvalidArgumentError(StrCat(
        what, " ", head_size, " is not a multiple of ", kHeadSizeMultiple));
  }
  return absl::OkStatus();
}

absl::Status CheckPointer(const void* p, size_t alignment, const char* what) {
  if (p == nullptr) return InvalidArgumentError(StrCat(what, " is null"));
  if (!IsAligned(p, alignment)) {
    return InvalidArgumentError(
        StrCat(what, " ", absl::Hex(reinterpret_cast<uintptr_t>(p)),
               " is not aligned to ", alignment, " bytes (its element size)"));
  }
  return absl::OkStatus();
}

// a * b <= limit for non-negative a, b.
bool ProductFits(int64_t a, int64_t b, int64_t limit = kInt64Max) {
  return a == 0 || b <= limit / a;
}

// Checks one strided [num_tokens, num_heads, head_size] operand: non-negative
// strides, element offsets that fit in int64 and, for outputs, rows that never
// overlap.
absl::Status CheckDenseOperand(const char* what, const void* data, DType dtype,
                               int64_t num_tokens, int64_t num_heads,
                               int64_t head_size, int64_t token_stride,
                               int64_t head_stride, bool is_output) {
  KVCACHE_RETURN_IF_ERROR(CheckPointer(data, DTypeSize(dtype), what));
  if (token_stride < 0) {
    return InvalidArgumentError(
        StrCat(what, " token stride ", token_stride, " is negative"));
  }
  if (head_stride < 0) {
    return InvalidArgumentError(
        StrCat(what, " head stride ", head_stride, " is negative"));
  }
  const int64_t limit =
      (int64_t{1} << 62) / 4;  // Offsets stay far from overflow in bytes.
  if (!ProductFits(num_tokens - 1, token_stride, limit) ||
      !ProductFits(num_heads - 1, head_stride, limit)) {
    return InvalidArgumentError(
        StrCat(what, " extent (", num_tokens, " tokens x stride ", token_stride,
               ", ", num_heads, " heads x stride ", head_stride,
               ") overflows 64-bit offsets"));
  }
  if (!is_output) return absl::OkStatus();
  // Rows must not overlap: order the two outer dimensions by stride, then each
  // must step over everything inside it.
  struct Dim {
    int64_t size, stride;
    const char* name;
  };
  Dim inner{num_heads, head_stride, "head"};
  Dim outer{num_tokens, token_stride, "token"};
  if (inner.size > 1 && outer.size > 1 && inner.stride > outer.stride)
    std::swap(inner, outer);
  if (inner.size > 1 && inner.stride < head_size) {
    return InvalidArgumentError(StrCat(
        what, " ", inner.name, " stride ", inner.stride,
        " is less than head size ", head_size, ": output rows would overlap"));
  }
  const int64_t inner_extent =
      inner.size > 1 ? inner.size * inner.stride : head_size;
  if (outer.size > 1 && outer.stride < inner_extent) {
    return InvalidArgumentError(
        StrCat(what, " ", outer.name, " stride ", outer.stride,
               " is less than ", inner_extent, ": output rows would overlap"));
  }
  return absl::OkStatus();
}

absl::Status CheckDenseKV(const DenseKV& kv, const CacheLayout& layout,
                          int64_t num_tokens, bool is_output) {
  const char* key_name = is_output ? "output key" : "input key";
  const char* value_name = is_output ? "output value" : "input value";
  if (!IsFloatingInput(kv.dtype)) {
    return InvalidArgumentError(StrCat(is_output ? "output" : "input",
                                       " dtype ", DTypeName(kv.dtype),
                                       " is not float32, float16 or bfloat16"));
  }
  KVCACHE_RETURN_IF_ERROR(CheckDenseOperand(
      key_name, kv.key, kv.dtype, num_tokens, layout.num_heads,
      layout.head_size, kv.key_token_stride, kv.key_head_stride, is_output));
  if (!layout.has_value()) {
    if (kv.value != nullptr) {
      return InvalidArgumentError(StrCat(
          value_name, " must be null for a K-only cache (head_size_v 0)"));
    }
    return absl::OkStatus();
  }
  return CheckDenseOperand(value_name, kv.value, kv.dtype, num_tokens,
                           layout.num_heads, layout.head_size_v,
                           kv.value_token_stride, kv.value_head_stride,
                           is_output);
}

// A layer in records: V and the scales at their record offsets from
// key_cache (block copy moves a block as one run from there).
absl::Status CheckRecordParts(const LayerCache& cache) {
  const CacheLayout& l = cache.layout;
  if (!l.records()) return absl::OkStatus();
  const char* base = static_cast<const char*>(cache.key_cache);
  const RecordOffsets r = RecordOffsetsOf(l);
  const int64_t sbo = l.scale_byte_offset();
  struct Part {
    const void* p;
    const char* want;
    const char* name;
  };
  const char* v = base + r.value;
  const Part parts[] = {
      {cache.value_cache, l.has_value() ? v : nullptr, "value_cache"},
      {cache.key_scale,
       l.inline_scales() ? base + sbo
       : l.side_scales() ? base + r.key_scale
                         : nullptr,
       "key_scale"},
      {cache.value_scale,
       !l.has_value()      ? nullptr
       : l.inline_scales() ? v + sbo
       : l.side_scales()   ? base + r.value_scale
                           : nullptr,
       "value_scale"},
  };
  for (const Part& part : parts) {
    if (part.p == part.want) continue;
    if (part.want == nullptr) {
      return InvalidArgumentError(
          StrCat(part.name, " must be null for this layout"));
    }
    return InvalidArgumentError(StrCat(part.name, " must point ",
                                       part.want - base,
                                       " bytes into key_cache's records"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateLayout(const CacheLayout& layout) {
  if (!IsValidDType(layout.cache_dtype) ||
      layout.cache_dtype == DType::kFloat32) {
    return InvalidArgumentError(
        StrCat("cache dtype ", DTypeName(layout.cache_dtype),
               " is not int8, fp8_e4m3, float16 or bfloat16"));
  }
  if (layout.num_blocks < 1) {
    return InvalidArgumentError(
        StrCat("num_blocks ", layout.num_blocks, " is less than 1"));
  }
  if (layout.block_size < 1) {
    return InvalidArgumentError(
        StrCat("block_size ", layout.block_size, " is less than 1"));
  }
  if (layout.num_heads < 1) {
    return InvalidArgumentError(
        StrCat("num_heads ", layout.num_heads, " is less than 1"));
  }
  KVCACHE_RETURN_IF_ERROR(CheckHeadSize("head_size", layout.head_size));
  if (layout.head_size_v != 0) {  // 0 = a K-only (latent) cache.
    KVCACHE_RETURN_IF_ERROR(CheckHeadSize("head_size_v", layout.head_size_v));
  }
  if (!IsValidScalePlacement(layout.scale_placement)) {
    return InvalidArgumentError(
        StrCat("scale_placement ", static_cast<int32_t>(layout.scale_placement),
               " is not side (0) or inline (1)"));
  }
  if (layout.inline_scales() && !IsQuantized(layout.cache_dtype)) {
    return InvalidArgumentError(
        StrCat("scale_placement inline needs an int8 or fp8_e4m3 cache; cache "
               "dtype is ",
               DTypeName(layout.cache_dtype)));
  }
  // Records: a pitch that holds the slot's parts, in 16-byte steps.
  if (layout.record_pitch < 0) {
    return InvalidArgumentError(
        StrCat("record_pitch ", layout.record_pitch, " is negative"));
  }
  if (layout.records()) {
    const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
    const int64_t need = RecordOffsetsOf(layout).bytes;
    if (layout.record_pitch > (int64_t{1} << 40) ||
        layout.record_pitch * elem < need ||
        layout.record_pitch * elem % kRecordAlignment != 0) {
      return InvalidArgumentError(StrCat(
          "record_pitch ", layout.record_pitch, " x ", elem,
          " bytes is not a multiple of ", kRecordAlignment, " of at least ",
          need, " bytes (the slot's K rows, V rows and scales)"));
    }
  }
  // Every element offset (and byte offset, up to 4-byte elements) must fit in
  // int64.
  const int64_t limit = (int64_t{1} << 62) / 4;
  const int64_t row =
      std::max(layout.key_row_pitch(), layout.value_row_pitch());
  if (!ProductFits(layout.num_blocks, layout.block_size, limit) ||
      !ProductFits(layout.num_blocks * layout.block_size, layout.num_heads,
                   limit) ||
      !ProductFits(layout.num_blocks * layout.block_size * layout.num_heads,
                   row, limit)) {
    return InvalidArgumentError(
        StrCat("cache of ", layout.num_blocks, " blocks x ", layout.block_size,
               " slots x ", layout.num_heads, " heads x ", row,
               " elements overflows 64-bit offsets"));
  }
  if (!ProductFits(layout.num_blocks * layout.block_size, layout.record_pitch,
                   limit)) {
    return InvalidArgumentError(StrCat("cache of ", layout.num_blocks,
                                       " blocks x ", layout.block_size,
                                       " records of ", layout.record_pitch,
                                       " elements overflows 64-bit offsets"));
  }
  return absl::OkStatus();
}

absl::Status ValidateLayerCache(const LayerCache& cache) {
  KVCACHE_RETURN_IF_ERROR(ValidateLayout(cache.layout));
  const size_t elem = DTypeSize(cache.layout.cache_dtype);
  const bool has_value = cache.layout.has_value();
  KVCACHE_RETURN_IF_ERROR(CheckPointer(cache.key_cache, elem, "key_cache"));
  if (has_value) {
    KVCACHE_RETURN_IF_ERROR(
        CheckPointer(cache.value_cache, elem, "value_cache"));
  } else if (cache.value_cache != nullptr || cache.value_scale != nullptr) {
    return InvalidArgumentError(
        "value_cache and value_scale must be null for a K-only cache "
        "(head_size_v 0)");
  }
  if (IsQuantized(cache.layout.cache_dtype)) {
    KVCACHE_RETURN_IF_ERROR(
        CheckPointer(cache.key_scale, sizeof(float), "key_scale"));
    if (has_value) {
      KVCACHE_RETURN_IF_ERROR(
          CheckPointer(cache.value_scale, sizeof(float), "value_scale"));
    }
    // Inline scales sit in the rows; the kernels may address them either way.
    // (Records check their parts below.)
    if (cache.layout.inline_scales() && !cache.layout.records() &&
        (cache.key_scale != InlineScale(cache.layout, cache.key_cache) ||
         (has_value &&
          cache.value_scale != InlineScale(cache.layout, cache.value_cache)))) {
      return InvalidArgumentError(
          StrCat("inline scales must point ", cache.layout.scale_byte_offset(),
                 " bytes into the key and value caches"));
    }
  } else if (cache.key_scale != nullptr || cache.value_scale != nullptr) {
    return InvalidArgumentError(StrCat("scale pointers must be null for a ",
                                       DTypeName(cache.layout.cache_dtype),
                                       " cache"));
  }
  return CheckRecordParts(cache);
}

absl::Status ValidateQuantizeWrite(const QuantizeWriteParams& params) {
  KVCACHE_RETURN_IF_ERROR(ValidateLayerCache(params.cache));
  const CacheLayout& layout = params.cache.layout;
  if (params.num_tokens < 0) {
    return InvalidArgumentError(
        StrCat("num_tokens ", params.num_tokens, " is negative"));
  }
  if (!IsQuantized(layout.cache_dtype) &&
      params.input.dtype != layout.cache_dtype) {
    return InvalidArgumentError(
        StrCat("input dtype ", DTypeName(params.input.dtype),
               " does not match the unquantized cache dtype ",
               DTypeName(layout.cache_dtype)));
  }
  if (params.num_tokens == 0) return absl::OkStatus();
  KVCACHE_RETURN_IF_ERROR(
      CheckPointer(params.slot_mapping, sizeof(int64_t), "slot_mapping"));
  return CheckDenseKV(params.input, layout, params.num_tokens,
                      /*is_output=*/false);
}

absl::Status ValidateGather(const GatherParams& params) {
  KVCACHE_RETURN_IF_ERROR(ValidateLayerCache(params.cache));
  const CacheLayout& layout = params.cache.layout;
  if (params.num_tokens < 0) {
    return InvalidArgumentError(
        StrCat("num_tokens ", params.num_tokens, " is negative"));
  }
  if (params.slots != nullptr && params.block_table != nullptr) {
    return InvalidArgumentError(
        "slots and block_table are both set; pass exactly one");
  }
  if (params.num_tokens == 0) {
    return IsFloatingInput(params.output.dtype)
               ? absl::OkStatus()
               : InvalidArgumentError(
                     StrCat("output dtype ", DTypeName(params.output.dtype),
                            " is not float32, float16 or bfloat16"));
  }
  if (params.slots != nullptr) {
    KVCACHE_RETURN_IF_ERROR(
        CheckPointer(params.slots, sizeof(int64_t), "slots"));
  } else if (params.block_table != nullptr) {
    KVCACHE_RETURN_IF_ERROR(
        CheckPointer(params.block_table, sizeof(int32_t), "block_table"));
    if (params.token_begin < 0) {
      return InvalidArgumentError(
          StrCat("token_begin ", params.token_begin, " is negative"));
    }
    if (params.block_table_len < 0) {
      return InvalidArgumentError(
          StrCat("block_table_len ", params.block_table_len, " is negative"));
    }
    const int64_t capacity =
        ProductFits(params.block_table_len, layout.block_size)
            ? params.block_table_len * layout.block_size
            : kInt64Max;
    if (params.token_begin > capacity - params.num_tokens) {
      return InvalidArgumentError(
          StrCat("token range [", params.token_begin, ", ", params.token_begin,
                 " + ", params.num_tokens, ") exceeds the block table's ",
                 params.block_table_len, " blocks x ", layout.block_size, " = ",
                 capacity, " tokens"));
    }
  } else {
    return InvalidArgumentError(
        "slots and block_table are both null; pass exactly one");
  }
  return CheckDenseKV(params.output, layout, params.num_tokens,
                      /*is_output=*/true);
}

absl::Status ValidateBlockCopy(const BlockCopyParams& params) {
  KVCACHE_RETURN_IF_ERROR(ValidateLayerCache(params.cache));
  if (params.num_pairs < 0) {
    return InvalidArgumentError(
        StrCat("num_pairs ", params.num_pairs, " is negative"));
  }
  if (params.num_pairs > (int64_t{1} << 31) - 1) {
    return InvalidArgumentError(StrCat("num_pairs ", params.num_pairs,
                                       " exceeds ", (int64_t{1} << 31) - 1));
  }
  if (params.num_pairs == 0) return absl::OkStatus();
  return CheckPointer(params.pairs, sizeof(int64_t), "pairs");
}

absl::Status CheckSlotIndices(const int64_t* slots, int64_t n,
                              int64_t num_slots, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] >= num_slots) {
      return InvalidArgumentError(StrCat(what, "[", i, "] = ", slots[i],
                                         " is out of range: the cache has ",
                                         num_slots, " slots"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBlockTableIndices(const int32_t* block_table, int64_t len,
                                    int64_t num_blocks) {
  for (int64_t i = 0; i < len; ++i) {
    if (block_table[i] >= num_blocks) {
      return InvalidArgumentError(
          StrCat("block_table[", i, "] = ", block_table[i],
                 " is out of range: the cache has ", num_blocks, " blocks"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBlockPairIndices(const int64_t* pairs, int64_t num_pairs,
                                   int64_t num_blocks) {
  std::vector<int64_t> dsts;
  dsts.reserve(static_cast<size_t>(num_pairs));
  for (int64_t i = 0; i < 2 * num_pairs; ++i) {
    if (pairs[i] < 0 || pairs[i] >= num_blocks) {
      return InvalidArgumentError(
          StrCat("pairs[", i / 2, "].", i % 2 == 0 ? "src" : "dst", " = ",
                 pairs[i], " is not a block id in [0, ", num_blocks, ")"));
    }
    if (i % 2 == 1) dsts.push_back(pairs[i]);
  }
  std::sort(dsts.begin(), dsts.end());
  const auto dup = std::adjacent_find(dsts.begin(), dsts.end());
  if (dup != dsts.end()) {
    return InvalidArgumentError(
        StrCat("block ", *dup, " is the destination of more than one pair"));
  }
  for (int64_t i = 0; i < num_pairs; ++i) {
    if (std::binary_search(dsts.begin(), dsts.end(), pairs[2 * i])) {
      return InvalidArgumentError(
          StrCat("pairs[", i, "].src = ", pairs[2 * i],
                 " is also a destination; copies must not chain"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::internal
