#include "api/kv_cache_config.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvcache {
namespace {

absl::Status Bad(absl::string_view field, int64_t value,
                 absl::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, " ", value, " ", expected));
}

absl::Status CheckHeadSize(absl::string_view field, int32_t value) {
  if (value < 8 || value > kMaxHeadSize) {
    return Bad(field, value, absl::StrCat("is not in [8, ", kMaxHeadSize, "]"));
  }
  if (value % 8 != 0) return Bad(field, value, "is not a multiple of 8");
  return absl::OkStatus();
}

// `value` in [min, max], else InvalidArgument naming the field and the limit.
absl::Status CheckRange(absl::string_view field, int64_t value, int64_t min,
                        int64_t max) {
  if (value < min) return Bad(field, value, absl::StrCat("must be >= ", min));
  if (value > max) return Bad(field, value, absl::StrCat("exceeds ", max));
  return absl::OkStatus();
}

// One group's spec; `name` is "layer_groups[i]".
absl::Status CheckGroupSpec(const std::string& name, const LayerGroup& g,
                            DType input_dtype) {
  if (g.kind == AttentionKind::kFull) {
    if (g.sliding_window != 0) {
      return Bad(name + ".sliding_window", g.sliding_window,
                 "must be 0 for a full-attention group");
    }
  } else if (g.kind == AttentionKind::kSlidingWindow) {
    if (absl::Status s = CheckRange(name + ".sliding_window", g.sliding_window,
                                    1, kMaxSlidingWindow);
        !s.ok()) {
      return s;
    }
  } else {
    return Bad(name + ".kind", static_cast<int32_t>(g.kind),
               "is not 0 (full) or 1 (sliding window)");
  }
  if (absl::Status s =
          CheckRange(name + ".num_kv_heads", g.num_kv_heads, 1, kMaxNumKvHeads);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckHeadSize(name + ".head_size", g.head_size);
      !s.ok()) {
    return s;
  }
  if (g.head_size_v != 0) {  // 0 = a K-only (latent) cache.
    if (absl::Status s = CheckHeadSize(name + ".head_size_v", g.head_size_v);
        !s.ok()) {
      return s;
    }
  }
  if (!IsValidDType(g.cache_dtype) || g.cache_dtype == DType::kFloat32) {
    return Bad(name + ".cache_dtype", static_cast<int32_t>(g.cache_dtype),
               "is not int8, fp8_e4m3, bfloat16 or float16");
  }
  if (!IsQuantized(g.cache_dtype) && IsValidDType(input_dtype) &&
      input_dtype != g.cache_dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("input_dtype ", DTypeName(input_dtype), " must equal ",
                     name, ".cache_dtype ", DTypeName(g.cache_dtype),
                     " for an unquantized cache"));
  }
  return absl::OkStatus();
}

// Layer groups: each spec valid, every layer in exactly one group, the
// per-layer shape fields unset.
absl::Status CheckGroups(const KVCacheConfig& c) {
  for (auto [field, value] :
       {std::pair<const char*, int32_t>{"num_kv_heads", c.num_kv_heads},
        {"head_size", c.head_size},
        {"head_size_v", c.head_size_v},
        {"num_q_heads", c.num_q_heads}}) {
    if (value != 0) {
      return Bad(field, value,
                 "must be 0 with layer_groups (each group has its own shape; "
                 "Attention is not offered with groups)");
    }
  }
  if (c.layer_groups.size() > static_cast<size_t>(c.num_layers)) {
    return Bad("layer_groups.size()",
               static_cast<int64_t>(c.layer_groups.size()),
               absl::StrCat("exceeds num_layers ", c.num_layers));
  }
  std::vector<int32_t> owner(c.num_layers, -1);
  for (size_t i = 0; i < c.layer_groups.size(); ++i) {
    const LayerGroup& g = c.layer_groups[i];
    const std::string name = absl::StrCat("layer_groups[", i, "]");
    if (absl::Status s = CheckGroupSpec(name, g, c.input_dtype); !s.ok()) {
      return s;
    }
    if (g.layers.empty()) {
      return absl::InvalidArgumentError(name + ".layers is empty");
    }
    for (int32_t layer : g.layers) {
      if (layer < 0 || layer >= c.num_layers) {
        return Bad(
            name + ".layers entry", layer,
            absl::StrCat("is not in [0, num_layers ", c.num_layers, ")"));
      }
      if (owner[layer] != -1) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", layer, " is in layer_groups[", owner[layer],
                         "] and ", name));
      }
      owner[layer] = static_cast<int32_t>(i);
    }
  }
  for (int32_t layer = 0; layer < c.num_layers; ++layer) {
    if (owner[layer] == -1) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " is in no layer group"));
    }
  }
  // Inline scales apply to the quantized groups (bf16/fp16 ones have none).
  if (c.scale_placement == ScalePlacement::kInline &&
      std::none_of(
          c.layer_groups.begin(), c.layer_groups.end(),
          [](const LayerGroup& g) { return IsQuantized(g.cache_dtype); })) {
    return absl::InvalidArgumentError(
        "scale_placement inline needs an int8 or fp8_e4m3 layer group; every "
        "group is bfloat16 or float16");
  }
  return CheckRange("block_size", c.block_size, 1, kMaxBlockSize);
}

absl::Status CheckShape(const KVCacheConfig& c) {
  if (absl::Status s = CheckRange("num_layers", c.num_layers, 1, kMaxNumLayers);
      !s.ok()) {
    return s;
  }
  if (!c.layer_groups.empty()) return CheckGroups(c);
  if (absl::Status s =
          CheckRange("num_kv_heads", c.num_kv_heads, 1, kMaxNumKvHeads);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckHeadSize("head_size", c.head_size); !s.ok()) {
    return s;
  }
  if (c.head_size_v != 0) {
    if (absl::Status s = CheckHeadSize("head_size_v", c.head_size_v); !s.ok()) {
      return s;
    }
  }
  // Attention (issue #20): 0 = off, else a multiple of num_kv_heads with at
  // most 16 query heads per KV head.
  if (c.num_q_heads != 0 &&
      (c.num_q_heads < 0 || c.num_q_heads % c.num_kv_heads != 0 ||
       c.num_q_heads / c.num_kv_heads > 16)) {
    return Bad("num_q_heads", c.num_q_heads,
               absl::StrCat("is not 0 or a multiple of num_kv_heads ",
                            c.num_kv_heads, " with at most 16 per KV head"));
  }
  return CheckRange("block_size", c.block_size, 1, kMaxBlockSize);
}

absl::Status CheckStepLimits(const KVCacheConfig& c) {
  for (absl::Status s :
       {CheckRange("max_tokens_per_step", c.max_tokens_per_step, 1,
                   kMaxTokensPerStep),
        CheckRange("max_sequences_per_step", c.max_sequences_per_step, 1,
                   kMaxSequencesPerStep),
        CheckRange("max_blocks_per_sequence", c.max_blocks_per_sequence, 0,
                   kMaxBlocksPerSequence),
        CheckRange("max_inflight_plans", c.max_inflight_plans, 1,
                   kMaxInflightPlans)}) {
    if (!s.ok()) return s;
  }
  if (absl::Status s = CheckRange("graph_max_tokens", c.graph_max_tokens, 0,
                                  c.max_tokens_per_step);
      !s.ok()) {
    return s;
  }
  // Sequence lengths reach the engine as int32 (BatchBlockTable's seq_lens).
  if (int64_t{c.max_blocks_per_sequence} * c.block_size > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_blocks_per_sequence ", c.max_blocks_per_sequence, " x block_size ",
        c.block_size, " exceeds ", INT32_MAX, " tokens"));
  }
  return absl::OkStatus();
}

// host_tier_bytes: 0, or room for at least one block with prefix caching on.
absl::Status CheckHostTier(const KVCacheConfig& c) {
  for (absl::Status s :
       {CheckRange("tier_offload_min_hits", c.tier_offload_min_hits, 0, 255),
        CheckRange("tier_offload_max_in_flight_bytes",
                   c.tier_offload_max_in_flight_bytes, 0, kMaxCacheBytes),
        CheckRange("tier_offload_ahead_blocks", c.tier_offload_ahead_blocks, -1,
                   INT32_MAX),
        CheckRange("tier_copy_thread_blocks", c.tier_copy_thread_blocks, 0,
                   1024)}) {
    if (!s.ok()) return s;
  }
  if (c.host_tier_bytes == 0) return absl::OkStatus();
  if (absl::Status s =
          CheckRange("host_tier_bytes", c.host_tier_bytes, 0, kMaxCacheBytes);
      !s.ok()) {
    return s;
  }
  if (!c.enable_prefix_caching) {
    return Bad("host_tier_bytes", c.host_tier_bytes,
               "needs enable_prefix_caching (the tier holds cached blocks)");
  }
  const absl::StatusOr<int64_t> block = BlockBytesAllLayers(c);
  if (block.ok() && c.host_tier_bytes < *block) {
    return Bad("host_tier_bytes", c.host_tier_bytes,
               absl::StrCat("holds no block: one block of all layers takes ",
                            *block, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status CheckKvEvents(const KVCacheConfig& c) {
  for (absl::Status s :
       {CheckRange("kv_events_queue_capacity", c.kv_events_queue_capacity, 1,
                   kMaxKvEventBatches),
        CheckRange("kv_events_replay_batches", c.kv_events_replay_batches, 0,
                   kMaxKvEventBatches),
        CheckRange("kv_events_data_parallel_rank",
                   c.kv_events_data_parallel_rank, 0, INT32_MAX)}) {
    if (!s.ok()) return s;
  }
  if (!c.kv_events_endpoint.empty() && !c.enable_kv_events) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_events_endpoint \"", c.kv_events_endpoint,
                     "\" is set but enable_kv_events is false"));
  }
  if (!c.kv_events_replay_endpoint.empty() && c.kv_events_endpoint.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_events_replay_endpoint \"", c.kv_events_replay_endpoint,
        "\" is set without kv_events_endpoint"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateConfig(const KVCacheConfig& c) {
  if (absl::Status s = CheckShape(c); !s.ok()) return s;
  if (c.layer_groups.empty() &&
      (!IsValidDType(c.cache_dtype) || c.cache_dtype == DType::kFloat32)) {
    return Bad("cache_dtype", static_cast<int32_t>(c.cache_dtype),
               "is not int8, fp8_e4m3, bfloat16 or float16");
  }
  if (!IsValidScalePlacement(c.scale_placement)) {
    return Bad("scale_placement", static_cast<int32_t>(c.scale_placement),
               "is not side (0) or inline (1)");
  }
  if (c.scale_placement == ScalePlacement::kInline && c.layer_groups.empty() &&
      !IsQuantized(c.cache_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale_placement inline needs an int8 or fp8_e4m3 "
                     "cache; cache_dtype is ",
                     DTypeName(c.cache_dtype)));
  }
  if (!IsValidDType(c.input_dtype) || !IsFloatingInput(c.input_dtype)) {
    return Bad("input_dtype", static_cast<int32_t>(c.input_dtype),
               "is not float32, float16 or bfloat16");
  }
  if (c.layer_groups.empty() && !IsQuantized(c.cache_dtype) &&
      c.input_dtype != c.cache_dtype) {
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
  if (absl::Status s = CheckStepLimits(c); !s.ok()) return s;
  if (c.log_level < LogLevel::kTrace || c.log_level > LogLevel::kOff) {
    return Bad("log_level", static_cast<int32_t>(c.log_level),
               "is not in [1 (trace), 6 (off)]");
  }
  if (c.log_sink && !c.logger_name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("log_sink and logger_name \"", c.logger_name,
                     "\" are both set; set at most one"));
  }
  if (absl::Status s = CheckKvEvents(c); !s.ok()) return s;
  if (absl::StatusOr<int64_t> block = BlockBytesAllLayers(c); !block.ok()) {
    return block.status();
  } else if (c.num_blocks > 0 && *block > kMaxCacheBytes / c.num_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks ", c.num_blocks, " x ", *block,
                     " bytes per block (all layers) exceeds kMaxCacheBytes ",
                     kMaxCacheBytes));
  }
  return CheckHostTier(c);
}

GroupPaging ConfigPaging(const KVCacheConfig& c) {
  return PlanGroupPaging(c.layer_groups, c.num_layers, c.block_size,
                         c.scale_placement);
}

absl::StatusOr<int64_t> BlockBytesAllLayers(const KVCacheConfig& c) {
  if (!c.layer_groups.empty()) {
    // Each group's one-layer block is below 2^33 bytes (block_size, heads and
    // head sizes are bounded), and at most kMaxNumLayers slots: no overflow.
    const GroupPaging paging = ConfigPaging(c);
    if (paging.page_bytes() > kMaxCacheBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "one page of ", paging.layers_per_page, " slots x ",
          paging.slot_bytes, " bytes exceeds kMaxCacheBytes ", kMaxCacheBytes));
    }
    return paging.page_bytes();
  }
  // Checked products: the limits above keep them far from overflow, but a
  // wrapped size must never reach the allocator (issue #12).
  const int64_t head_size_v = c.head_size_v != 0 ? c.head_size_v : c.head_size;
  // K and V elements per head, and their side scales' bytes (inline rows
  // hold their scales: core/cache_layout.h).
  CacheLayout shape;
  shape.head_size = c.head_size;
  shape.head_size_v = head_size_v;
  shape.cache_dtype = c.cache_dtype;
  shape.scale_placement = c.scale_placement;
  int64_t row = shape.key_row_pitch() + shape.value_row_pitch();
  int64_t scale = shape.side_scales() ? 2 * int64_t{sizeof(float)} : 0;
  int64_t per_head = 0, per_block = 0, total = 0;
  if (__builtin_mul_overflow(
          row, static_cast<int64_t>(DTypeSize(c.cache_dtype)), &per_head) ||
      __builtin_add_overflow(per_head, scale, &per_head) ||
      __builtin_mul_overflow(per_head, int64_t{c.num_kv_heads}, &per_block) ||
      __builtin_mul_overflow(per_block, int64_t{c.block_size}, &per_block) ||
      __builtin_mul_overflow(per_block, int64_t{c.num_layers}, &total) ||
      total > kMaxCacheBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "one block of ", c.block_size, " tokens x ", c.num_kv_heads,
        " heads x (", c.head_size, " + ", head_size_v, ") elements x ",
        c.num_layers, " layers exceeds kMaxCacheBytes ", kMaxCacheBytes));
  }
  return total;
}

}  // namespace kvcache
