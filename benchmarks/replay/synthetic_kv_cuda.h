// Device twin of SyntheticKv::Fill: writes a step's synthetic K and V rows for
// one layer on the GPU from a device copy of SyntheticKv's table, bit-identical
// to the host generator, so the replay's inputs cost no host time and no
// host-to-device traffic beyond the token list.

#ifndef KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_KV_CUDA_H_
#define KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_KV_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"

namespace kvcache::replay {

struct SyntheticFillParams {
  const uint16_t* table = nullptr;     // kSyntheticTableSize entries (device).
  const int32_t* tokens = nullptr;     // [num_tokens] token ids (device).
  const int64_t* positions = nullptr;  // [num_tokens] positions (device).
  int64_t num_tokens = 0;
  int layer = 0;
  int num_heads = 0;
  int head_size = 0;
  int head_size_v = 0;
  uint16_t* out = nullptr;   // Token i: K heads at out + i * token_stride,
  int64_t token_stride = 0;  // then V heads at + value_offset.
  int64_t value_offset = 0;
};

// Enqueues the fill on `stream` (a cudaStream_t). FailedPrecondition without
// CUDA.
absl::Status FillSyntheticCuda(const SyntheticFillParams& params, void* stream);

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_KV_CUDA_H_
