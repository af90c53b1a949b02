// SyntheticKv makes deterministic stand-in K/V for the trace replay: the
// element (layer, K or V, head, dim) of the token `token` at `position` is a
// function of those values only, so a prefix shared by two requests gets the
// same K/V and a gathered block can be checked against its exact input,
// regenerated on the host.
//
// Each (layer, K/V, token, position, head) row is a window of a fixed table of
// Gaussian values (mean 0, variance 1, rounded to bfloat16 and exactly
// representable in float16 too) at an offset hashed from those keys, so a row
// costs one copy. Immutable after construction: thread-safe.

#ifndef KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_KV_H_
#define KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_KV_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "core/dtype.h"

namespace kvcache::replay {

// One token to generate K/V for.
struct TokenAt {
  int32_t token = 0;
  int64_t position = 0;
};

class SyntheticKv {
 public:
  // REQUIRES: input_dtype is kBFloat16 or kFloat16; head sizes <= 1024.
  SyntheticKv(DType input_dtype, int num_kv_heads, int head_size,
              int head_size_v);

  // Writes the K (or V) rows of `tokens` for `layer`: row i at
  // out + i * token_stride, heads contiguous ([heads, head_size] per token),
  // in input_dtype (2-byte elements).
  void Fill(int layer, bool is_value, absl::Span<const TokenAt> tokens,
            uint16_t* out, int64_t token_stride) const;

  // The exact input of one head as float (the reference for Gather).
  void Exact(int layer, bool is_value, TokenAt token, int head,
             float* out) const;

  DType input_dtype() const { return input_dtype_; }
  // The table in input_dtype (kSyntheticTableSize entries), for a device copy.
  const std::vector<uint16_t>& table() const { return table_; }

 private:
  const uint16_t* Row(int layer, bool is_value, TokenAt token, int head) const;

  DType input_dtype_;
  int num_kv_heads_;
  int head_size_;
  int head_size_v_;
  std::vector<float> values_;    // The table as float.
  std::vector<uint16_t> table_;  // The table in input_dtype.
};

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_SYNTHETIC_KV_H_
