// KVCacheConfig: the shape, dtypes, backend and capacity of one KV cache.
// Validated by KVCacheManager::Create. Plain value type.

#ifndef KVCACHE_API_KV_CACHE_CONFIG_H_
#define KVCACHE_API_KV_CACHE_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kvcache/dtype.h"

namespace kvcache {

enum class Backend : int32_t {
  kCpu = 0,   // Host memory and CPU kernels; always available.
  kCuda = 1,  // One CUDA device (`device`); needs a CUDA build and a GPU.
};

inline constexpr int32_t kMaxCpuThreads = 1024;

struct KVCacheConfig {
  // Model shape.
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;    // Multiple of 8, at most 1024.
  int32_t head_size_v = 0;  // 0 means head_size.
  int32_t block_size = 16;  // Tokens per block.

  // int8 or fp8_e4m3 (quantized, with float32 scales), or bfloat16/float16
  // (stored as is, then input_dtype must equal cache_dtype).
  DType cache_dtype = DType::kInt8;
  // K/V handed to Append: float32, float16 or bfloat16.
  DType input_dtype = DType::kBFloat16;

  Backend backend = Backend::kCpu;
  int32_t device = 0;  // CUDA device ordinal.
  // CPU backend: threads that large kernel calls are split over, counting the
  // calling thread (0 = the machine's hardware concurrency, 1 = no worker
  // threads; at most kMaxCpuThreads). Workers are started once, by Create;
  // those the system refuses to start are done without (never an error).
  // Decode-sized calls always run on the calling thread.
  int32_t cpu_threads = 0;

  // Capacity: exactly one of these is set (> 0).
  int64_t num_blocks = 0;
  int64_t memory_budget_bytes = 0;  // All layers' caches and scales together.
  double memory_fraction =
      0.0;  // Of the device's free memory (host RAM on the CPU).

  bool enable_prefix_caching = true;

  // Fixed-capacity step and lookup buffers (allocated once, so steps allocate
  // nothing and block tables can be captured in a CUDA graph).
  int32_t max_tokens_per_step = 8192;  // Tokens in one Reserve.
  int32_t max_sequences_per_step =
      1024;  // Sequences in one Reserve or BatchBlockTable.
  int32_t max_blocks_per_sequence =
      0;  // Block-table columns; 0 means enough for all blocks.
  int32_t max_inflight_plans =
      4;  // Reserved but not yet committed/aborted plans.

  // Logger name for spdlog ("" = spdlog's default logger). The library installs
  // no sinks.
  std::string logger_name;
};

// InvalidArgument naming the first bad field (e.g. "head_size 100 is not a
// multiple of 8").
absl::Status ValidateConfig(const KVCacheConfig& config);

}  // namespace kvcache

#endif  // KVCACHE_API_KV_CACHE_CONFIG_H_
