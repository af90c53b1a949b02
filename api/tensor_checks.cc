#include "api/tensor_checks.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::internal {
namespace {

absl::string_view MemoryName(MemoryKind kind) {
  return kind == MemoryKind::kHost ? "host" : "CUDA device";
}

// One strided output in bytes: outer x inner rows of row_len bytes, with
// inner_stride <= outer_stride. ValidateGather guarantees its rows do not
// overlap, so in (outer, inner) order they are sorted and disjoint. Unsigned
// arithmetic: a hostile extent wraps (and is refused), never overflows.
struct Rows {
  uintptr_t base = 0;
  uint64_t outer_n = 1, outer_stride = 0, inner_n = 1, inner_stride = 0;
  uint64_t row_len = 0;

  // [base, end) holds every row.
  uintptr_t end() const {
    return base + (outer_n - 1) * outer_stride + (inner_n - 1) * inner_stride +
           row_len;
  }
  // The end offset of the last row that starts at or before offset x.
  uint64_t LastRowEnd(uint64_t x) const {
    const uint64_t o =
        outer_n > 1 ? std::min(x / outer_stride, outer_n - 1) : 0;
    const uint64_t y = x - o * outer_stride;
    const uint64_t i =
        inner_n > 1 ? std::min(y / inner_stride, inner_n - 1) : 0;
    return o * outer_stride + i * inner_stride + row_len;
  }
  // Whether any row shares a byte with [begin, stop).
  bool Touches(uintptr_t begin, uintptr_t stop) const {
    if (stop <= base || begin >= end()) return false;
    return base + LastRowEnd(stop - 1 - base) > begin;
  }
};

// REQUIRES: the operand passed ValidateGather (sizes >= 1, strides >= 0, and
// a stride of at least the row below it wherever the size exceeds 1).
Rows OutputRows(void* data, int64_t elem, int64_t num_tokens,
                int64_t token_stride, int64_t num_heads, int64_t head_stride,
                int64_t head_size) {
  uint64_t outer_n = num_tokens, outer_s = token_stride * elem;
  uint64_t inner_n = num_heads, inner_s = head_stride * elem;
  if (inner_n > 1 && outer_n > 1 && inner_s > outer_s) {
    std::swap(inner_n, outer_n);
    std::swap(inner_s, outer_s);
  }
  Rows r;
  r.base = reinterpret_cast<uintptr_t>(data);
  r.row_len = static_cast<uint64_t>(head_size * elem);
  r.outer_n = outer_n;
  r.outer_stride = outer_n > 1 ? outer_s : 0;
  r.inner_n = inner_n;
  r.inner_stride = inner_n > 1 ? inner_s : 0;
  return r;
}

// Whether two outputs share a byte: their extents first (O(1)), then, only
// when those meet (interleaved outputs, or the same tensor twice), row by row.
bool Overlap(const Rows& a, const Rows& b) {
  if (b.end() <= a.base || a.end() <= b.base) return false;
  for (uint64_t o = 0; o < b.outer_n; ++o) {
    for (uint64_t i = 0; i < b.inner_n; ++i) {
      const uintptr_t start = b.base + o * b.outer_stride + i * b.inner_stride;
      if (a.Touches(start, start + b.row_len)) return true;
    }
  }
  return false;
}

}  // namespace

absl::Status CheckKVTensor(absl::string_view name, const TensorView& t,
                           const ExpectedKV& e) {
  if (t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, " data is null"));
  }
  if (t.ndim < 1 || t.ndim > TensorView::kMaxDims) {
    // Not even a view: its shape and strides are not worth printing.
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has ", t.ndim,
                     " dimensions; expected 3: [tokens, heads, head_size]"));
  }
  if (t.ndim != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has ", t.ndim, " dimensions (", t.DebugString(),
                     "); expected 3: [tokens, heads, head_size]"));
  }
  if (e.any_float_dtype ? !IsFloatingInput(t.dtype) : t.dtype != e.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " dtype ", DTypeName(t.dtype), " is not ",
                     e.any_float_dtype ? "float32, float16 or bfloat16"
                                       : DTypeName(e.dtype)));
  }
  if (t.memory != e.memory ||
      (e.memory == MemoryKind::kCuda && t.device != e.device)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " lives in ", MemoryName(t.memory),
        t.memory == MemoryKind::kCuda ? absl::StrCat(" ", t.device) : "",
        " memory; this cache needs ", MemoryName(e.memory),
        e.memory == MemoryKind::kCuda ? absl::StrCat(" ", e.device) : "",
        " memory"));
  }
  const int64_t tokens = t.shape[0];
  if (tokens < 1 || (e.num_tokens >= 0 && tokens != e.num_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " has ", tokens, " tokens (", t.DebugString(), "); expected ",
        e.num_tokens >= 0 ? absl::StrCat(e.num_tokens) : "at least 1"));
  }
  if (t.shape[1] != e.num_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has ", t.shape[1], " heads (", t.DebugString(),
                     "); expected ", e.num_heads));
  }
  if (t.shape[2] != e.head_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " head size ", t.shape[2], " (", t.DebugString(),
                     ") does not match the cache's ", e.head_size));
  }
  if (t.strides[2] != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " stride ", t.strides[2], " in the last dimension must be 1 (",
        t.DebugString(), ")"));
  }
  if (t.strides[0] < 0 || t.strides[1] < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has negative strides (", t.DebugString(), ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckKVPair(const TensorView& key, const TensorView& value,
                         const ExpectedKV& expected_key, int64_t head_size_v,
                         DenseKV* out, int64_t* num_tokens) {
  if (absl::Status s = CheckKVTensor("key", key, expected_key); !s.ok()) {
    return s;
  }
  if (head_size_v == 0) {
    // A K-only (latent) cache: no V at all.
    if (value.data != nullptr || value.ndim != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "value ", value.DebugString(),
          " given for a K-only cache (head_size_v 0): pass an empty value "
          "(null data, no dimensions)"));
    }
    out->key = key.data;
    out->value = nullptr;
    out->dtype = key.dtype;
    out->key_token_stride = key.strides[0];
    out->key_head_stride = key.strides[1];
    out->value_token_stride = 0;
    out->value_head_stride = 0;
    *num_tokens = key.shape[0];
    return absl::OkStatus();
  }
  ExpectedKV expected_value = expected_key;
  expected_value.num_tokens = key.shape[0];
  expected_value.head_size = head_size_v;
  if (!expected_key.any_float_dtype) expected_value.dtype = expected_key.dtype;
  if (expected_key.any_float_dtype) {
    expected_value.any_float_dtype = false;
    expected_value.dtype = key.dtype;
  }
  if (absl::Status s = CheckKVTensor("value", value, expected_value); !s.ok()) {
    return s;
  }
  out->key = key.data;
  out->value = value.data;
  out->dtype = key.dtype;
  out->key_token_stride = key.strides[0];
  out->key_head_stride = key.strides[1];
  out->value_token_stride = value.strides[0];
  out->value_head_stride = value.strides[1];
  *num_tokens = key.shape[0];
  return absl::OkStatus();
}

absl::Status CheckGatherOutputs(const DenseKV& out, int64_t num_tokens,
                                const CacheLayout& layout,
                                const CacheStorage& storage) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(out.dtype));
  const Rows key =
      OutputRows(out.key, elem, num_tokens, out.key_token_stride,
                 layout.num_heads, out.key_head_stride, layout.head_size);
  // K only: no value rows (an empty range touches nothing).
  const Rows value =
      out.value == nullptr
          ? Rows{}
          : OutputRows(out.value, elem, num_tokens, out.value_token_stride,
                       layout.num_heads, out.value_head_stride,
                       layout.head_size_v);
  if (out.value != nullptr && Overlap(key, value)) {
    return absl::InvalidArgumentError(
        out.key == out.value
            ? "key_out and value_out are the same tensor"
            : "key_out and value_out overlap: they would overwrite each other");
  }
  // Every layer lies in one of the allocations (one per layer, or per page
  // slot with layer groups).
  for (int i = 0; i < storage.num_allocations(); ++i) {
    const uintptr_t begin =
        reinterpret_cast<uintptr_t>(storage.allocation(i).key_cache);
    const uintptr_t end = begin + storage.allocation_bytes(i);
    for (const Rows* rows : {&key, &value}) {
      if (rows->Touches(begin, end)) {
        return absl::InvalidArgumentError(absl::StrCat(
            rows == &key ? "key_out" : "value_out", " overlaps the cache of ",
            storage.num_allocations() == storage.num_layers() ? "layer "
                                                              : "page slot ",
            i, ": outputs must be the caller's own memory"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::internal
