// Mooncake-style request traces (data/mooncake_conversation_trace.jsonl) and
// the token ids that stand in for their prompts.
//
// A trace gives each request one hash id per 512-token block of its prompt;
// equal ids mean equal content. TraceToken makes a token a deterministic
// function of (hash id, position in the block), so equal leading hash ids give
// equal leading tokens and a token-level prefix cache finds exactly the reuse
// the trace describes. Thread-compatible; no state.

#ifndef KVCACHE_TESTING_TRACE_H_
#define KVCACHE_TESTING_TRACE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvcache {

using TokenId = int32_t;

inline constexpr int kTraceBlockTokens = 512;

struct TraceRequest {
  int64_t timestamp_ms = 0;
  int64_t input_length = 0;
  int64_t output_length = 0;
  std::vector<int64_t> hash_ids;  // One per 512-token block of the prompt (the
                                  // last may be partial).
};

// Parses a JSONL trace. InvalidArgument naming the line for malformed input, or
// for a request whose hash_ids do not cover its input_length; NotFound when the
// file cannot be opened.
absl::StatusOr<std::vector<TraceRequest>> LoadTrace(const std::string& path);

// A non-negative 31-bit token id: splitmix64 of (hash_id << 20 | position), top
// bits dropped. REQUIRES: 0 <= position < 2^20.
TokenId TraceToken(int64_t hash_id, int position);

// The request's input_length prompt tokens.
std::vector<TokenId> TracePrompt(const TraceRequest& request);

}  // namespace kvcache

#endif  // KVCACHE_TESTING_TRACE_H_
