// BlockObserver: the one seam through which every block-state transition of
// the prefix cache is published (DESIGN.md section 1): a block became cached
// (its hash registered), a cached block was evicted, the whole cache was
// cleared. KV events (DESIGN.md section 11) and a host tier plug in here.
//
// Calls are batched: at most one call per BlockManager call, listing every
// block of that call, made before the BlockManager call returns:
//
//   BlockManager call    callback               blocks
//   -----------------    ---------------------  ---------------------------
//   Commit               OnBlocksStored         the full blocks it registered
//   Reserve              OnBlocksRemoved        the cached blocks it evicted
//   ResetPrefixCache     OnAllBlocksCleared     all (no list: it subsumes them)
//
// AddSequence, Fork, Free, Abort, RemoveFromPlan, Truncate and PeekPrefix
// change no registration (a released hashed block stays registered, cached),
// so they call nothing. Commit(plan, accepted) stores only blocks full of
// accepted tokens: rolled-back tokens never produce OnBlocksStored. A block whose
// content is already registered under another block, or whose chain was cut
// (a collision, or a sequence alive across ResetPrefixCache), is never
// stored. So replaying the calls in order rebuilds exactly the set of hashes
// the prefix cache holds (tests/block_observer_test.cc checks it).
//
// The manager calls the observer on the caller's thread while the caller's
// serialization (KVCacheManager's lock) is held: an observer must not call
// back into the manager, should be quick (copy what it needs), and must
// outlive the manager. Views (StoredBlock::tokens) are valid only during the
// call.
//
// Tiers: every StoredBlock and every removal names the medium that holds (or
// held) the block. A block copied from the device cache to a host tier is
// OnBlocksStored(medium kHost) in that tier; its eviction from the device is
// OnBlocksRemoved(kDevice), and from the host tier OnBlocksRemoved(kHost); a
// block brought back to the device is OnBlocksStored(kDevice) again. So the
// calls rebuild the set of hashes per medium. With a host tier one
// BlockManager call may move blocks both ways (AddSequence evicts, offloads,
// drops from the tier and onboards), so the one-call-per-kind rule above
// becomes: one call per run of records of one kind and medium, in the order
// they happened (allocator/prefix_cache_tier.cc).

#ifndef KVCACHE_ALLOCATOR_BLOCK_OBSERVER_H_
#define KVCACHE_ALLOCATOR_BLOCK_OBSERVER_H_

#include <cstdint>

#include "absl/types/span.h"
#include "allocator/block_hash.h"
#include "core/ids.h"

namespace kvcache {

// Where a block's K/V lives.
enum class BlockMedium : uint8_t {
  kDevice = 0,  // The cache's own pool (CPU or CUDA backend).
  kHost = 1,    // The host-memory tier behind it (DESIGN.md section 11).
};

// A full committed block that became reusable through the prefix cache.
struct StoredBlock {
  BlockId block = -1;
  // Its chained hash (the key it is registered under).
  BlockHash hash;
  // The hash of the block before it in the chain; zero when first_in_chain
  // (the parent is then the extra key, whose hash derives from the salt and
  // is not published).
  BlockHash parent_hash;
  bool first_in_chain = false;
  BlockMedium medium = BlockMedium::kDevice;
  // The extra key's adapter id. The salt is never published, not even hashed.
  int64_t adapter_id = 0;
  // The block's block_size token ids; valid only during the call.
  absl::Span<const TokenId> tokens;
};

class BlockObserver {
 public:
  virtual ~BlockObserver() = default;

  // Blocks registered in the prefix cache (became cached/hashed), in the
  // order they were registered.
  virtual void OnBlocksStored(absl::Span<const StoredBlock> blocks) = 0;
  // Blocks dropped from `medium` (evicted for reuse), oldest first.
  virtual void OnBlocksRemoved(absl::Span<const BlockHash> hashes,
                               BlockMedium medium) = 0;
  // Every registration dropped (ResetPrefixCache).
  virtual void OnAllBlocksCleared() = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_OBSERVER_H_
