// Sequence: one sequence's bookkeeping inside BlockManager (a plain struct;
// SequenceTable owns them, the manager keeps their invariants, which
// BlockManager::Validate checks).

#ifndef KVCACHE_ALLOCATOR_SEQUENCE_H_
#define KVCACHE_ALLOCATOR_SEQUENCE_H_

#include <cstdint>
#include <vector>

#include "allocator/block_hash.h"

namespace kvcache {
namespace internal {

// The first cache line holds everything a decode step reads and writes:
// Reserve checks and marks the sequence, appends its token, and maps its slot
// from `tail_block`; Commit moves `reserved` into `computed`. The block list
// and the prefix-cache chain (second line on) are touched only when a step
// needs a new block, copies a shared block or fills one.
struct alignas(64) Sequence {
  // The known token ids (prompt + appended) after the first prefix_blocks
  // blocks.
  std::vector<TokenId> tokens;
  int64_t computed = 0;  // Tokens written in every layer and committed.
  // Tokens of the pending reservation. Reserve's checks also set it as the
  // "named in this batch" mark, and undo it when the batch is refused.
  int64_t reserved = 0;
  uint64_t plan_id = 0;     // The pending reservation, if not 0.
  int32_t tail_block = -1;  // blocks.back(), or -1 without blocks.
  // Shared partial block replaced by a copy; held until Commit/Abort.
  int32_t cow_src = -1;
  // Leading blocks found in the prefix cache by AddSequence, whose token ids
  // `tokens` does not hold (nothing reads them again: they are hashed and
  // registered, and the index holds them).
  int32_t prefix_blocks = 0;
  // False when the partial last block is known to be this sequence's alone.
  // Only Fork shares a partial block: it sets this; Reserve clears it.
  bool tail_maybe_shared = false;

  // Known tokens: prompt + appended.
  int64_t known(int64_t block_size) const {
    return prefix_blocks * block_size + static_cast<int64_t>(tokens.size());
  }
  // The token at `position`. REQUIRES: position >= prefix_blocks * block_size.
  const TokenId* token(int64_t position, int64_t block_size) const {
    return &tokens[position - prefix_blocks * block_size];
  }

  // The rest of the first block's line after the hot one: what Commit reads
  // and writes to register a block this step filled.
  std::vector<int32_t> blocks;  // ceil((computed + reserved) / block_size).
  // Chained hash of full blocks of known tokens: at least every full computed
  // block (AddSequence hashes every full block of the prompt up front).
  std::vector<BlockHash> hashes;
  // The full computed blocks are chained (prefix caching): each has the
  // content id a following block names as its parent; the last one's, or the
  // root's when there is none, is `last_chain_id`.
  int64_t chained_blocks = 0;
  uint64_t last_chain_id = 0;
  // What `blocks` is known by between two looks (BlockManager::
  // BlockTableRef): `serial` is unique among the sequences one SequenceTable
  // ever held (SequenceTable::Insert sets it), and `table_version` changes
  // whenever an entry of `blocks` changes or `blocks` shrinks. While both stay
  // the same, `blocks` only grows at its end.
  uint64_t serial = 0;
  uint64_t table_version = 0;

  int64_t id = 0;
  // Prefix-cache chain (kept only with prefix caching on).
  BlockHash root_hash;  // Hash of the extra key: the first block's parent.
  // Content id of the extra key: the first block's parent.
  uint64_t root_id = 0;
  int64_t adapter_id = 0;  // The extra key's adapter (for BlockObserver).
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_SEQUENCE_H_
