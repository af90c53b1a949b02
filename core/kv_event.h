// KV events: what a KVCacheManager tells a router about the blocks its prefix
// cache holds (README "KV events"). Plain value types, no state.
//
// A batch holds the events of one block-state change of the manager (one
// observer call: the blocks one Commit registered, the blocks one Reserve
// evicted, one reset). Batches are numbered 0, 1, 2, ... per manager; a gap
// in the numbers means batches were dropped (the bounded queue overflowed).
//
// Block hashes are the 64-bit external form of the prefix cache's chained
// 128-bit XXH3 hash (its low 64 bits: events/external_hash.h). A chain's first
// block has no parent hash: its parent is the hash of the sequence's extra key,
// which derives from the salt and is never published. The salt itself never
// appears in an event.

#ifndef KVCACHE_CORE_KV_EVENT_H_
#define KVCACHE_CORE_KV_EVENT_H_

#include <cstdint>
#include <vector>

namespace kvcache {

enum class KVEventType : int32_t {
  kBlockStored = 0,       // Blocks became cached (reusable) in `medium`.
  kBlockRemoved = 1,      // Blocks left `medium` (evicted).
  kAllBlocksCleared = 2,  // Every block of every medium (ResetPrefixCache).
};

// Where the blocks of an event live.
enum class KVEventMedium : int32_t {
  kDevice =
      0,      // The cache's own pool (GPU memory, or host on the CPU backend).
  kHost = 1,  // The host-memory tier behind it.
};

struct KVEvent {
  KVEventType type = KVEventType::kBlockStored;
  KVEventMedium medium = KVEventMedium::kDevice;  // Stored and removed only.
  // Stored: a chain of consecutive blocks, each the parent of the next.
  // Removed: the blocks removed, oldest first.
  std::vector<uint64_t> block_hashes;
  // Stored only: the hash of the first block's parent, when it has one.
  bool has_parent = false;
  uint64_t parent_block_hash = 0;
  // Stored only: the blocks' token ids, block_size per block, in chain order.
  std::vector<int32_t> token_ids;
  int32_t block_size = 0;
  // Stored only: the extra key's adapter id (0 = none).
  int64_t adapter_id = 0;
};

struct KVEventBatch {
  uint64_t sequence = 0;   // Per manager, from 0, one per batch.
  double timestamp = 0.0;  // Seconds since the Unix epoch, when it was made.
  std::vector<KVEvent> events;
};

}  // namespace kvcache

#endif  // KVCACHE_CORE_KV_EVENT_H_
