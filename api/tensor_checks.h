// Validation of caller tensors against what a KVCacheManager expects, with
// messages that name the argument, the bad value and the expectation. Internal
// to api/.

#ifndef KVCACHE_API_TENSOR_CHECKS_H_
#define KVCACHE_API_TENSOR_CHECKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "api/tensor_view.h"
#include "kernels/kernel_params.h"
#include "storage/cache_storage.h"

namespace kvcache::internal {

struct ExpectedKV {
  int64_t num_tokens = -1;  // -1: any (>= 1), taken from the tensor.
  int64_t num_heads = 0;
  int64_t head_size = 0;
  bool any_float_dtype = false;  // Otherwise exactly `dtype`.
  DType dtype = DType::kBFloat16;
  MemoryKind memory = MemoryKind::kHost;
  int32_t device = 0;
};

// Checks `tensor` (named `name` in messages) is [T, H, D] as expected,
// non-null, with unit stride in the last dimension and non-negative strides.
absl::Status CheckKVTensor(absl::string_view name, const TensorView& tensor,
                           const ExpectedKV& expected);

// Checks key [T, H, D] and value [T, H, Dv] agree and fills `out` from them.
absl::Status CheckKVPair(const TensorView& key, const TensorView& value,
                         const ExpectedKV& expected_key, int64_t head_size_v,
                         DenseKV* out, int64_t* num_tokens);

// Gather's outputs key [T, H, D] / value [T, H, Dv] (`out`, already checked by
// ValidateGather: aligned, non-negative strides, rows that do not overlap
// within each tensor) must not share a byte with each other or with any
// layer's cache. InvalidArgument naming the overlap otherwise.
absl::Status CheckGatherOutputs(const DenseKV& out, int64_t num_tokens,
                                const CacheLayout& layout,
                                const CacheStorage& storage);

}  // namespace kvcache::internal

#endif  // KVCACHE_API_TENSOR_CHECKS_H_
