// ReserveRequest is one sequence's part of a Reserve call: the token ids that
// became known since the last step and how many tokens to make room for.
// Plain value type; thread-compatible.

#ifndef KVCACHE_CORE_RESERVE_REQUEST_H_
#define KVCACHE_CORE_RESERVE_REQUEST_H_

#include <cstdint>
#include <vector>

#include "core/ids.h"

namespace kvcache {

struct ReserveRequest {
  SequenceId sequence = 0;
  // Token ids appended to the sequence's known tokens before reserving (e.g.
  // the token sampled in the last step). May be empty when the tokens to
  // compute are already known (prompt chunks).
  std::vector<TokenId> new_token_ids;
  // Tokens to reserve room for, starting at the sequence's computed length.
  // >= 1, and computed + num_tokens <= known tokens (after appending
  // new_token_ids).
  int64_t num_tokens = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_CORE_RESERVE_REQUEST_H_
