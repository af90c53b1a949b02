#include "api/tensor_checks.h"

#include "absl/strings/str_cat.h"

namespace kvcache::internal {
namespace {

absl::string_view MemoryName(MemoryKind kind) {
  return kind == MemoryKind::kHost ? "host" : "CUDA device";
}

}  // namespace

absl::Status CheckKVTensor(absl::string_view name, const TensorView& t,
                           const ExpectedKV& e) {
  if (t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, " data is null"));
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

}  // namespace kvcache::internal
