// Sequence: one sequence's bookkeeping inside BlockManager (a plain struct; the
// manager keeps its invariants, which BlockManager::Validate checks).

#ifndef KVCACHE_ALLOCATOR_SEQUENCE_H_
#define KVCACHE_ALLOCATOR_SEQUENCE_H_

#include <cstdint>
#include <vector>

#include "allocator/block_hash.h"

namespace kvcache {
namespace internal {

struct Sequence {
  int64_t id = 0;
  std::vector<TokenId> tokens;  // Every known token id (prompt + appended).
  std::vector<int32_t>
      blocks;  // Block table: ceil((computed + reserved) / block_size) blocks.
  int64_t computed = 0;  // Tokens written in every layer and committed.

  // Prefix-cache chain (kept only with prefix caching on): one entry per full
  // computed block.
  BlockHash root_hash;  // Hash of the extra key: the first block's parent.
  uint64_t root_id =
      0;  // Content id of the extra key: the first block's parent.
  std::vector<BlockHash> hashes;  // Chained hash of each full computed block.
  std::vector<uint64_t>
      chain_ids;  // Content id that a following block names as its parent.

  // The pending reservation, if plan_id != 0; Abort restores the sizes below.
  uint64_t plan_id = 0;
  int32_t plan_index = 0;  // Position in the plan's sequence list.
  int64_t reserved = 0;    // Tokens reserved beyond `computed`.
  size_t tokens_before =
      0;  // tokens.size() before Reserve appended new token ids.
  size_t blocks_before = 0;  // blocks.size() before Reserve.
  int32_t cow_src =
      -1;  // Shared partial block replaced by a copy; held until Commit/Abort.

  // Reserve's duplicate check: the call that last saw this sequence.
  uint64_t batch_mark = 0;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_SEQUENCE_H_
