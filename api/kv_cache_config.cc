#include "api/kv_cache_config.h"

#include "absl/strings/str_cat.h"

namespace kvcache {
namespace {

absl::Status Bad(absl::string_view field, int64_t value,
                 absl::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, " ", value, " ", expected));
}

absl::Status CheckHeadSize(absl::string_view field, int32_t value) {
  if (value < 8 || value > 1024)
    return Bad(field, value, "is not in [8, 1024]");
  if (value % 8 != 0) return Bad(field, value, "is not a multiple of 8");
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateConfig(const KVCacheConfig& c) {
  if (c.num_layers < 1) return Bad("num_layers", c.num_layers, "must be >= 1");
  if (c.num_kv_heads < 1) {
    return Bad("num_kv_heads", c.num_kv_heads, "must be >= 1");
  }
  if (absl::Status s = CheckHeadSize("head_size", c.head_size); !s.ok())
    return s;
  if (c.head_size_v != 0) {
    if (absl::Status s = CheckHeadSize("head_size_v", c.head_size_v); !s.ok()) {
      return s;
    }
  }
  if (c.block_size < 1) return Bad("block_size", c.block_size, "must be >= 1");
  if (!IsValidDType(c.cache_dtype) || c.cache_dtype == DType::kFloat32) {
    return Bad("cache_dtype", static_cast<int32_t>(c.cache_dtype),
               "is not int8, fp8_e4m3, bfloat16 or float16");
  }
  if (!IsValidDType(c.input_dtype) || !IsFloatingInput(c.input_dtype)) {
    return Bad("input_dtype", static_cast<int32_t>(c.input_dtype),
               "is not float32, float16 or bfloat16");
  }
  if (!IsQuantized(c.cache_dtype) && c.input_dtype != c.cache_dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input_dtype ", DTypeName(c.input_dtype), " must equal cache_dtype ",
        DTypeName(c.cache_dtype), " for an unquantized cache"));
  }
  if (c.backend != Backend::kCpu && c.backend != Backend::kCuda) {
    return Bad("backend", static_cast<int32_t>(c.backend),
               "is not CPU or CUDA");
  }
  if (c.device < 0) return Bad("device", c.device, "must be >= 0");
  if (c.cpu_threads < 0 || c.cpu_threads > kMaxCpuThreads) {
    return Bad("cpu_threads", c.cpu_threads,
               absl::StrCat("is not in [0, ", kMaxCpuThreads,
                            "] (0 = hardware concurrency)"));
  }
  const int capacity_fields = (c.num_blocks != 0) +
                              (c.memory_budget_bytes != 0) +
                              (c.memory_fraction != 0.0);
  if (capacity_fields != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exactly one of num_blocks, memory_budget_bytes and memory_fraction "
        "must be set; ",
        capacity_fields, " are"));
  }
  if (c.num_blocks < 0) return Bad("num_blocks", c.num_blocks, "must be >= 1");
  if (c.num_blocks > INT32_MAX) {
    return Bad("num_blocks", c.num_blocks, "exceeds 2^31 - 1");
  }
  if (c.memory_budget_bytes < 0) {
    return Bad("memory_budget_bytes", c.memory_budget_bytes, "must be > 0");
  }
  if (!(c.memory_fraction >= 0.0 && c.memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory_fraction ", c.memory_fraction, " is not in (0, 1]"));
  }
  if (c.max_tokens_per_step < 1) {
    return Bad("max_tokens_per_step", c.max_tokens_per_step, "must be >= 1");
  }
  if (c.max_sequences_per_step < 1) {
    return Bad("max_sequences_per_step", c.max_sequences_per_step,
               "must be >= 1");
  }
  if (c.max_blocks_per_sequence < 0) {
    return Bad("max_blocks_per_sequence", c.max_blocks_per_sequence,
               "must be >= 0");
  }
  if (c.max_inflight_plans < 1) {
    return Bad("max_inflight_plans", c.max_inflight_plans, "must be >= 1");
  }
  return absl::OkStatus();
}

}  // namespace kvcache
