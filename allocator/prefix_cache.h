// PrefixCache: the prefix cache of one BlockManager (DESIGN.md section 4).
// It owns the index (chained hash -> block, exact confirmation, roots of the
// extra keys) and does everything the manager asks of it:
//
//   AddSequence  AcquireRoot, Match       hash the prompt's full blocks, share
//                                         the longest cached run
//   Commit       PrepareRegistration,     hash the blocks a commit filled and
//                RegisterFilled           register them (-> OnBlocksStored)
//   Reserve      Evict                    evict the oldest cached block for
//                                         reuse (-> OnBlocksRemoved)
//   Reset        Clear                    drop every registration
//                                         (-> OnAllBlocksCleared)
//
// With a host tier (Options::host_slots > 0; allocator/host_tier.h) an
// evicted block's registration moves to the tier (Offload), Match finds the
// longest chain across both tiers, AddSequence brings the host hits back into
// fresh device blocks (Onboard), and a commit of content the tier holds moves
// it back to the device (Promote). Each asks the manager for a byte copy
// (TierCopy), in the order the copies must run.
//
// Each of the three transitions of a registration (registered, evicted, all
// cleared) lives in exactly one function (RegisterFilled, Evict, Clear), the
// pool's part of it in BlockPool (MarkHashed, EvictOldest, ClearHashes). The
// observer's calls are gathered per manager call and made by Flush, at most one
// per call (block_observer.h); without an observer all this costs a pointer
// test per block and per call, and nothing allocates after construction.
// Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_PREFIX_CACHE_H_
#define KVCACHE_ALLOCATOR_PREFIX_CACHE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "allocator/block_hash.h"
#include "allocator/block_math.h"
#include "allocator/block_observer.h"
#include "allocator/block_pool.h"
#include "allocator/host_tier.h"
#include "allocator/prefix_cache_index.h"
#include "allocator/sequence.h"
#include "allocator/sequence_table.h"
#include "core/extra_key.h"

namespace kvcache {

struct PrefixCacheStats {
  int64_t queries = 0;       // AddSequence calls with prefix caching on.
  int64_t query_tokens = 0;  // Prompt tokens looked up.
  int64_t hit_tokens = 0;    // Prompt tokens found computed (all tiers).
  int64_t evictions = 0;     // Cached blocks evicted for reuse.
  // Host tier (zero without one).
  int64_t host_hit_tokens = 0;  // Of hit_tokens, those onboarded from it.
  int64_t offloads = 0;         // Blocks copied from the device to the tier.
  int64_t onboards = 0;         // Blocks copied back (hits and promotions).
  int64_t host_evictions = 0;   // Tier blocks dropped for room (LRU).
  int64_t host_drops = 0;       // Tier blocks dropped after a failed copy.
  // Evicted blocks not offloaded because the manager's copy queue was busy
  // (its offload budget spent: Options::offload_min_hits, set_offload_budget).
  int64_t offloads_skipped = 0;
  // Evicted blocks not offloaded because they had fewer prefix hits than
  // Options::offload_min_hits (no evidence of reuse).
  int64_t offloads_unselected = 0;
  // Offloads whose block was reused at once (the call had no block to spare
  // to hold it): the next write of it waits for the copy.
  int64_t offloads_waited = 0;
  // Offload ahead (Options::offload_ahead_blocks): copies of cached blocks
  // made before their eviction, and the evictions that found theirs (done
  // or still running) and so needed no copy of their own.
  int64_t ahead_copies = 0;
  int64_t offloads_ahead = 0;
  // Offloads of blocks onboarded or promoted from the tier whose slot was
  // kept as their copy (PrefixCache::KeepAsCopyAhead): no copy at all.
  int64_t offloads_kept = 0;
  // Evictions that passed over the oldest cached block because its copy
  // ahead was still running (it became the newest instead): reusing it
  // would have made the next step wait for that copy on the device.
  int64_t evictions_deferred = 0;
};

// A byte copy of one whole block between the device pool and a host-tier
// slot, which the manager runs (FIFO, on its copy queue) after the call that
// asked for it.
struct TierCopy {
  int32_t device_block = -1;
  int32_t host_slot = -1;
  bool onboard = false;  // false: device -> host (offload).
  // Later writes (and reads) of device_block must be ordered after this
  // copy: an onboard, or an offload whose block was not held (its block is
  // reused at once).
  bool wait = false;
  // An offload ahead (PrefixCache::OffloadAhead): the block stays cached and
  // registered; the slot is reserved for it until its eviction.
  bool ahead = false;
};

namespace internal {

class PrefixCache {
 public:
  struct Options {
    int32_t num_blocks = 0;
    int32_t block_size = 16;
    bool enabled = true;
    BlockHashFunction hash_function = nullptr;  // nullptr: HashBlock.
    BlockObserver* observer = nullptr;          // Not owned; may be nullptr.
    int32_t host_slots = 0;  // Host-tier blocks; 0 = no tier.
    // The offload policy's selection: an evicted block is offloaded only if
    // it was a prefix hit at least this many times while registered on the
    // device (AddSequence sharing it: NoteHits; a block onboarded from the
    // tier or promoted from it counts one). 0 = every evicted block.
    // 0..kMaxHitCount.
    int32_t offload_min_hits = 0;
    // Whether offloaded blocks are held until their copy is done
    // (set_hold_allowance); false: handed out at once.
    bool hold_offloaded = false;
    // Offload ahead: how many cached blocks at most have a copy in the tier
    // made before their eviction (OffloadAhead); 0 = off. At most half the
    // tier's slots are used so.
    int64_t offload_ahead_blocks = 0;
  };
  // Hit counts saturate here.
  static constexpr int32_t kMaxHitCount = 255;
  // May throw std::bad_alloc.
  explicit PrefixCache(const Options& options);

  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  bool enabled() const { return enabled_; }

  // ---- Roots: a sequence's extra key ----
  //
  // Gives `s` its chain's root (hash and id) for `extra`, a reference on it.
  // May throw std::bad_alloc, changing nothing.
  void AcquireRoot(const ExtraKey& extra, Sequence& s);
  // Another reference on a held root (Fork), and drops one (Free).
  void AcquireRoot(uint64_t root_id) { index_.AcquireRoot(root_id); }
  void ReleaseRoot(uint64_t root_id) { index_.ReleaseRoot(root_id); }
  size_t num_roots() const { return index_.num_roots(); }

  // ---- AddSequence ----
  //
  // Hashes every full block of the prompt (Commit reuses them) and finds the
  // longest run of cached ones, leaving at least one token to compute: puts
  // them in `s` (their token ids stay out of s.tokens) and returns how many.
  // With a host tier the run goes on through host-tier blocks (in s.blocks as
  // HostHit(slot)) as long as `pool` has a block to onboard each into besides
  // the cached device blocks the run shares. Changes nothing but `s`; the
  // caller takes the references and onboards (Onboard). May throw
  // std::bad_alloc. REQUIRES: `s` has its root, no blocks; prompt not empty.
  int64_t Match(Sequence& s, absl::Span<const TokenId> prompt,
                const BlockPool& pool) const;
  // How Match marks a host-tier block in s.blocks, and back.
  static int32_t HostHit(int32_t slot) { return -2 - slot; }
  static int32_t HostSlot(int32_t hit) { return -2 - hit; }
  // Brings the host hits Match put in `s` into fresh device blocks (each
  // registered with its tier ids: OnBlocksRemoved(kHost), then
  // OnBlocksStored(kDevice)), which `s` holds once (ref 1), and returns how
  // many. REQUIRES: s's device hits acquired; pool has the room Match
  // checked.
  int64_t Onboard(Sequence& s, BlockPool& pool);
  // Undoes the registrations of the onboard copies in `copies` (which
  // failed): each fresh block is unregistered and unhashed
  // (OnBlocksRemoved(kDevice)), so it is freed, not cached, when its holder
  // lets go; the tier gave the entry up already, so the content is dropped.
  void DropOnboarded(absl::Span<const TierCopy> copies, BlockPool& pool);
  // Drops the tier blocks that the failed offloads of `copies` filled
  // (OnBlocksRemoved(kHost)); with reused_only, only those with wait set.
  void DropOffloaded(absl::Span<const TierCopy> copies, bool reused_only);
  // The copies asked for since the last ClearCopies, in the order they must
  // run.
  absl::Span<const TierCopy> copies() const { return copies_; }
  void ClearCopies() { copies_.clear(); }
  bool has_tier() const { return tier_ != nullptr; }
  // How many more blocks Evict may offload until the next call of this
  // (the manager's in-flight budget; a selected block evicted past it is
  // dropped as without a tier: offloads_skipped). Unlimited by default.
  void set_offload_budget(int64_t blocks) { offload_budget_ = blocks; }
  void set_offload(bool on) { offload_budget_ = on ? INT64_MAX : 0; }
  // Holding offloaded blocks (the offload policy's "never wait on a copy"):
  // an offloaded block is not handed out for reuse at once but held by the
  // cache, in use and unregistered, until the manager's copy queue has
  // finished the batch that reads it (ReleaseOffloaded); Evict then evicts
  // the next oldest block too. It holds at most `allowance` blocks per call
  // (the blocks the call can spare: free and cached, less those it needs),
  // kMaxHoldsPerEviction per eviction and 1/64 of the pool (at least 16) in
  // all; a block offloaded past these is reused at once, its copy marked
  // `wait` (offloads_waited). Off
  // (allowance 0, and nothing held) by default: the caller must then order
  // writes of an offloaded block after its copy.
  void set_hold_allowance(int64_t blocks) {
    hold_allowance_ = hold_offloaded_ ? blocks : 0;
  }
  bool hold_offloaded() const { return hold_offloaded_; }
  // The held blocks offloaded by this call's copies, and its offloads ahead:
  // they are in the copy queue's batch number `batch`
  // (TierCopier::enqueued()).
  void OffloadsQueued(int64_t batch);
  // Held blocks whose batch is <= `completed` become free, and so do the
  // tier slots of unused offloads ahead of such batches; with `all`, every
  // held block of this call's copies too (they failed: nothing reads them).
  void ReleaseOffloaded(int64_t completed, BlockPool& pool, bool all = false);
  int64_t num_held() const { return held_count_; }
  // Calls f(block) for every held block (Validate: the cache's references).
  template <typename F>
  void ForEachHeld(F f) const {
    for (int64_t k = 0; k < held_count_; ++k)
      f(held_[(held_head_ + k) % held_.size()].block);
  }
  // Offload ahead: copies the cached blocks next in line for eviction (the
  // LRU's oldest that offload_min_hits selects) into reserved tier slots
  // while they stay cached and registered, at most `max_new` this call and
  // Options::offload_ahead_blocks at a time; asks for each copy (TierCopy
  // with `ahead`; the manager queues them as one background batch and tells
  // the batch by OffloadsQueued). A tier entry is dropped (LRU) for a slot
  // when none is free. Evict then registers such a block in its slot without
  // a copy of its own; a block that leaves the index otherwise (reset) gives
  // its slot back once its copy is done. Returns the copies asked for.
  int64_t OffloadAhead(BlockPool& pool, int64_t max_new);
  // The newest offload batch a block evicted since the last call of this
  // reuses while its copy ahead may still be running (0: none): the block's
  // next write must wait for that batch. Resets it.
  int64_t TakeAheadWait() {
    const int64_t b = ahead_wait_;
    ahead_wait_ = 0;
    return b;
  }
  // Counts a prefix hit on each device block of s.blocks (AddSequence, after
  // Match): the reuse evidence of offload_min_hits.
  void NoteHits(const Sequence& s) {
    if (tier_ == nullptr) return;
    for (BlockId b : s.blocks) {
      if (b >= 0 && meta_[b].hits < kMaxHitCount) {
        ++meta_[b].hits;
        SyncTierBits(b);
      }
    }
  }
  // A device block's hit count (0 without a tier).
  int32_t hits(BlockId b) const { return tier_ == nullptr ? 0 : meta_[b].hits; }
  const HostTier* tier() const { return tier_.get(); }
  // Counts a query of `prompt_tokens` of which `hit_tokens` were found.
  void CountQuery(int64_t prompt_tokens, int64_t hit_tokens) {
    ++stats_.queries;
    stats_.query_tokens += prompt_tokens;
    stats_.hit_tokens += hit_tokens;
  }

  // ---- Commit ----
  //
  // Hashes the blocks that the commit of `s`'s reservation fills and
  // prefetches the index and pool entries that RegisterFilled then reads and
  // writes. REQUIRES: s.hashes has the capacity for them.
  void PrepareRegistration(Sequence& s, const BlockPool& pool) const;
  // Loads the index table slots RegisterFilled probes first, for the blocks
  // PrepareRegistration hashed: a prefetch of them is not always honoured (on
  // a CPU replay of the whole trace, most of them still missed), and these
  // loads, independent of each other, overlap. Call after PrepareRegistration
  // of every sequence of the commit and after `computed` moved.
  void TouchRegistration(const Sequence& s) const;
  // Transition "became cached": registers the full computed blocks of `s`
  // not yet chained. A block whose content is already registered under
  // another block (or whose hash collides with different content, or whose
  // chain was cut by Clear) stays unhashed. REQUIRES: s.hashes has the
  // capacity for every full block.
  void RegisterFilled(Sequence& s, BlockPool& pool);

  // ---- PeekPrefix, Truncate, rejected drafts ----
  //
  // The tokens of `prompt` that AddSequence(prompt, extra) would find
  // computed now (full blocks, at least one token left), changing nothing:
  // no reference, no root, no statistic, no LRU position.
  int64_t Peek(absl::Span<const TokenId> prompt, const ExtraKey& extra,
               const BlockPool& pool) const;
  // Rewinds the chain of `s` to its first `full` blocks: hashes past them are
  // dropped, and the chain goes on from block full - 1 where that block is
  // registered as itself; elsewhere (its content registered under another
  // block, a collision, a cut chain) it is cut, so the sequence registers none
  // of its later blocks (they stay private). REQUIRES: full <= the full
  // computed blocks of `s`.
  void Rewind(Sequence& s, int64_t full) const;
  // The token ids a block was last registered with. They stay after the
  // block is evicted or cleared, until it is registered again, which takes a
  // block its registering sequence filled itself: never a prefix-hit block
  // that a live sequence holds (Truncate reads them for those).
  const TokenId* StoredTokens(BlockId block) const {
    return index_.stored_tokens(block);
  }

  // ---- Reserve ----
  //
  // Transition "evicted": the oldest cached block, now in use (ref 1) and
  // unregistered. REQUIRES: pool.num_cached() > 0.
  BlockId Evict(BlockPool& pool);

  // ---- ResetPrefixCache ----
  //
  // Transition "all cleared": drops every registration. Cached blocks become
  // free; hashed blocks in use stay with their holders, unhashed; the chains
  // of the live sequences are cut, so they register no more blocks (their
  // parents are gone: no query could reach them). Calls OnAllBlocksCleared at
  // once. REQUIRES: no plan in flight (no copy-on-write source held).
  void Clear(BlockPool& pool, SequenceTable& sequences);

  // Makes the observer calls gathered since the last Flush (one per kind).
  void Flush() {
    if (observer_ != nullptr) FlushToObserver();
  }

  const PrefixCacheStats& stats() const { return stats_; }
  // Every registered hash, in no particular order (tests, debugging); with
  // `medium` kHost, those of the host tier.
  std::vector<BlockHash> RegisteredHashes(
      BlockMedium medium = BlockMedium::kDevice) const;

  // ---- Validation (BlockManager::Validate) ----
  //
  // The chain of `s`: hashes for at least every full computed block and at
  // most every full known one, every full computed block chained, and each
  // registered one registered under the sequence's hash, tokens and parent.
  absl::Status ValidateChain(const Sequence& s, const std::string& name) const;
  // The index holds exactly the pool's hashed blocks, none free.
  absl::Status ValidateIndex(const BlockPool& pool) const;
  // Every root is held exactly by the sequences and the registered first
  // blocks that name it, and by at least one.
  absl::Status ValidateRoots(const SequenceTable& sequences) const;
  // The host tier's own invariants; no registration in both tiers; no slot
  // pinned and no observer call pending between manager calls.
  absl::Status ValidateTier() const;

 private:
  // A chain id no block's parent is: a sequence whose chain was cut.
  static constexpr uint64_t kCutChain = 0;

  BlockHash Hash(const BlockHash& parent,
                 absl::Span<const TokenId> tokens) const {
    return hash_function_ != nullptr ? hash_function_(parent, tokens)
                                     : HashBlock(parent, tokens);
  }
  // HashBlocks, or the test seam's hash.
  void HashChain(const BlockHash& parent, const TokenId* tokens, size_t count,
                 std::vector<BlockHash>& out) const;
  void FlushToObserver();
  // Match's continuation through both tiers from block `i` (prefix_cache_tier.cc).
  int64_t MatchAcrossTiers(Sequence& s, const TokenId* prompt, int64_t i,
                           int64_t count, const BlockPool& pool) const;
  // The tier side of Evict: moves block b's registration to the host tier
  // (dropping the tier's oldest for room) and asks for its copy; false (and
  // nothing done) when every slot is pinned by this call's onboarding.
  bool Offload(BlockId b);
  // Frees a tier slot if none is free by dropping the tier's oldest entry
  // (an LRU eviction); false when every slot is pinned or reserved.
  bool MakeRoomInTier();
  // Evict's case of a block with a copy ahead: registers it in its slot
  // (no copy; if the copy may still be running, ahead_wait_ names it).
  void OffloadFromAhead(BlockId b);
  // The tier registration of device block b, as Offload moves it.
  TierEntry EntryOf(BlockId b) const;
  // Registers device block b's content in the tier (in `reserved_slot`, or
  // a free slot when it is -1; REQUIRES: one is free), with the tier's own
  // root reference and the observer's record, and returns the slot.
  int32_t MoveToTier(BlockId b, int32_t reserved_slot);
  // A block's copy ahead is not needed (its registration goes): its slot is
  // freed once the copy is done (at once if it was never queued).
  void RetireAhead(BlockId b);
  // Device block b's content came from tier slot `slot` (an onboard, or a
  // promotion), whose bytes stay the block's: KeepAsCopyAhead makes the
  // (reserved) slot b's copy ahead (kKeptCopy), so that b's eviction needs
  // no copy. Only while CanKeepCopy(): the kept window (min(offload-ahead
  // window, a quarter of the tier)) has room; else the caller frees the
  // slot.
  bool CanKeepCopy() const { return num_kept_ < kept_window_; }
  void KeepAsCopyAhead(BlockId b, int32_t slot);
  // Tier slot -> dropped (OnBlocksRemoved(kHost)); `failed` counts it as a
  // drop after a failed copy rather than an LRU eviction.
  void DropHost(int32_t slot, bool failed);
  // RegisterFilled's case of content the tier holds: the tier's registration
  // moves to `b` (with its ids) and the tier copy is dropped; returns its
  // content id, or 0 when the tier does not hold `h` (or holds other content
  // under it: then `collision` is set; or the same tokens under a stale
  // parent, an entry no chain reaches any more: then it is dropped).
  // RegisterFilled asks only for the first block of a run it registers anew:
  // the next ones' parent ids are brand new, which no tier entry names.
  uint64_t Promote(const BlockHash& h, BlockId b, uint64_t parent_id,
                   const TokenId* tokens, BlockPool& pool, bool& collision);
  // A free block, or the oldest cached one evicted.
  BlockId Allocate(BlockPool& pool) {
    return pool.num_free() > 0 ? pool.AllocateFree() : Evict(pool);
  }
  // Observer records, in order.
  void RecordStored(const StoredBlock& block);
  void RecordRemoved(const BlockHash& hash, BlockMedium medium);

  BlockMath math_;
  bool enabled_;
  BlockHashFunction hash_function_;
  BlockObserver* observer_;
  PrefixCacheIndex index_;
  PrefixCacheStats stats_;
  // The observer's calls gathered since the last Flush (capacity for every
  // block, reserved only with an observer: gathering never allocates).
  std::vector<StoredBlock> stored_;
  std::vector<BlockHash> removed_;

  // Host tier (null without one).
  std::unique_ptr<HostTier> tier_;
  int32_t offload_min_hits_ = 0;
  int64_t offload_budget_ = INT64_MAX;
  bool hold_offloaded_ = false;
  int64_t hold_allowance_ = 0;
  // Holding's bounds: per eviction, and in all (1/64 of the pool, >= 16).
  static constexpr int kMaxHoldsPerEviction = 8;
  // Blocks with a copy ahead still running that one eviction passes over
  // (PrefixCache::Evict) before it reuses one and its writes wait.
  static constexpr int kMaxDeferralsPerEviction = 64;
  int64_t max_held_ = 0;
  // Held offloaded blocks, oldest first (a ring of num_blocks entries):
  // batch 0 = this call's copies, not yet queued.
  struct Held {
    BlockId block = -1;
    int64_t batch = 0;
  };
  std::vector<Held> held_;
  int64_t held_head_ = 0;
  int64_t held_count_ = 0;
  // Per device block, what an event of its registration names besides the
  // index's ids (kept with a tier only).
  // (and the block's prefix hits while registered, for the offload policy).
  struct EventMeta {
    BlockHash parent_hash;
    int64_t adapter_id = 0;
    uint8_t hits = 0;  // Saturates at kMaxHitCount.
    // Its copy ahead: the reserved tier slot (-1: none) and the copy's batch
    // (0: this call's, not yet queued; kKeptCopy: no copy of its own, the
    // slot it was onboarded or promoted from).
    int32_t ahead_slot = -1;
    int64_t ahead_batch = 0;
  };
  static constexpr int64_t kKeptCopy = -1;
  std::vector<EventMeta> meta_;
  // Two bits of each block's EventMeta, a byte a block: whether it has a
  // copy ahead, and whether it is selected for offload (hits >=
  // offload_min_hits_). Every eviction reads them for the oldest cached
  // block and the offload-ahead walk for each block it passes, most of which
  // have neither; here that is a read of 1 byte a block (115 KiB for 117,560
  // blocks) instead of a cache miss into meta_ (40 bytes a block).
  // SyncTierBits(b) after every change to meta_[b]; ValidateTier checks.
  enum : uint8_t { kHasAhead = 1, kSelected = 2 };
  std::vector<uint8_t> tier_bits_;
  uint8_t TierBits(const EventMeta& m) const {
    return (m.ahead_slot >= 0 ? kHasAhead : 0) |
           (m.hits >= offload_min_hits_ ? kSelected : 0);
  }
  void SyncTierBits(BlockId b) { tier_bits_[b] = TierBits(meta_[b]); }
  // Sets meta_[b] (its bits too).
  void SetMeta(BlockId b, const EventMeta& m) {
    meta_[b] = m;
    SyncTierBits(b);
  }
  // Offload ahead: the most blocks with a copy ahead (0 = off), how many
  // have one, the LRU walk's bookmark (the newest cached block it looked
  // at, with its epoch), this call's (not yet queued), the slots of unused
  // copies waiting for their batch, the newest offload batch known done, and
  // TakeAheadWait's batch.
  int64_t ahead_window_ = 0;
  int64_t num_ahead_ = 0;
  // Of num_ahead_, kept copies (KeepAsCopyAhead), and their own window.
  int64_t num_kept_ = 0;
  int64_t kept_window_ = 0;
  BlockId ahead_bookmark_ = -1;
  uint16_t ahead_bookmark_epoch_ = 0;
  std::vector<BlockId> ahead_new_;
  struct Retired {
    int32_t slot = -1;
    int64_t batch = 0;
  };
  std::vector<Retired> retired_;
  int64_t offload_completed_ = 0;
  int64_t ahead_wait_ = 0;
  std::vector<TierCopy> copies_;
  // With a tier, the observer's records in call order (a call may evict,
  // offload, drop from the tier and onboard): one observer call per run of
  // one kind and medium. stored_/removed_ then stage a run.
  struct Record {
    bool stored = false;
    StoredBlock block;  // Of a removal: only hash and medium.
  };
  std::vector<Record> records_;
  // Per tier slot: a record not yet flushed names its tokens (a drop of the
  // slot flushes first, so the span stays valid).
  std::vector<uint8_t> slot_recorded_;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_PREFIX_CACHE_H_
