// AttentionOptions: what KVCacheManager::Attention computes besides the cache
// and the queries (README "Attention"). Plain value type.

#ifndef KVCACHE_API_ATTENTION_OPTIONS_H_
#define KVCACHE_API_ATTENTION_OPTIONS_H_

#include <cstdint>

namespace kvcache {

struct AttentionOptions {
  float softmax_scale = 0.0f;  // Required: usually 1 / sqrt(head_size).
  float soft_cap = 0.0f;       // Logit soft-cap cap * tanh(x / cap); 0 = off.
  int32_t window = 0;  // Sliding window: keys in (p - window, p]; 0 = off.
  // Query tokens per sequence, 1 to 8 (8 for speculative verification): the
  // last n committed tokens of each sequence, causal among themselves.
  int32_t num_query_tokens_per_sequence = 1;
};

}  // namespace kvcache

#endif  // KVCACHE_API_ATTENTION_OPTIONS_H_
