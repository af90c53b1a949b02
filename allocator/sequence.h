// Sequence: one sequence's bookkeeping inside BlockManager (a plain struct; the
// manager keeps its invariants, which BlockManager::Validate checks).

#ifndef KVCACHE_ALLOCATOR_SEQUENCE_H_
#define KVCACHE_ALLOCATOR_SEQUENCE_H_

#include <cstdint>
#include <vector>

#include "allocator/block_hash.h"

namespace kvcache {
namespace internal {

// Hot fields (touched by every Reserve and Commit) first, within one cache
// line.
struct alignas(64) Sequence {
  // Reserve's scratch: the call that last saw this sequence, and whether its
  // shared partial last block must be copied first.
  uint64_t batch_mark = 0;
  bool copy_needed = false;
  // False when the partial last block is known to be this sequence's alone.
  // Only Fork shares a partial block: it sets this; Reserve clears it.
  bool tail_maybe_shared = false;
  int32_t cow_src = -1;  // Shared partial block replaced by a copy; held until
                         // Commit/Abort.
  int64_t computed = 0;  // Tokens written in every layer and committed.
  int64_t reserved = 0;  // Tokens of the pending reservation.
  uint64_t plan_id = 0;  // The pending reservation, if not 0.
  int32_t plan_index = 0;       // Position in the plan's sequence list.
  std::vector<int32_t> blocks;  // ceil((computed + reserved) / block_size).
  std::vector<TokenId> tokens;  // Every known token id (prompt + appended).
  size_t tokens_before = 0;     // Abort restores these sizes.
  size_t blocks_before = 0;
  int64_t id = 0;

  // Prefix-cache chain (kept only with prefix caching on).
  BlockHash root_hash;  // Hash of the extra key: the first block's parent.
  uint64_t root_id =
      0;  // Content id of the extra key: the first block's parent.
  // Chained hash of full blocks of known tokens: at least every full computed
  // block (AddSequence hashes every full block of the prompt up front).
  std::vector<BlockHash> hashes;
  // Per full computed block: the content id a following block names as its
  // parent.
  std::vector<uint64_t> chain_ids;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_SEQUENCE_H_
