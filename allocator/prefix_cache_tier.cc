// PrefixCache's host tier (prefix_cache.h, host_tier.h): where registrations
// move on eviction, how a match continues through the tier, and how hits
// come back. Every tier transition of a registration lives here:
//
//   device -> host    Offload        a cached device block is evicted
//   host -> dropped   DropHost       the tier's LRU needs room, or a copy failed
//   host -> device    Onboard        a prefix hit (AddSequence)
//                     Promote        a commit of content the tier holds
//
// Each tells the observer in call order (Record*) and asks the manager for
// the byte copy (copies_), also in the order the copies must run.

#include <algorithm>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"
#include "allocator/prefix_cache.h"

namespace kvcache {
namespace internal {

void PrefixCache::RecordStored(const StoredBlock& block) {
  if (tier_ == nullptr) {
    stored_.push_back(block);
  } else {
    records_.push_back(Record{true, block});
  }
}

void PrefixCache::RecordRemoved(const BlockHash& hash, BlockMedium medium) {
  if (tier_ == nullptr) {
    removed_.push_back(hash);
    return;
  }
  Record r;
  r.block.hash = hash;
  r.block.medium = medium;
  records_.push_back(r);
}

int64_t PrefixCache::MatchAcrossTiers(Sequence& s, const TokenId* prompt,
                                      int64_t i, int64_t count,
                                      const BlockPool& pool) const {
  const int64_t bs = math_.size();
  // Room to onboard: every free or cached block, less the cached ones the
  // run shares (acquired before the onboarding allocates).
  const int64_t room = pool.num_free() + pool.num_cached();
  int64_t cached_shared = 0;
  for (int64_t k = 0; k < i; ++k)
    cached_shared += pool.state(s.blocks[k]) == BlockState::kCached;
  int64_t host_hits = 0;
  uint64_t parent = s.last_chain_id;
  for (; i < count; ++i) {
    const BlockHash& h = s.hashes[i];
    const TokenId* tokens = prompt + i * bs;
    const BlockId b = index_.Find(h);
    if (b >= 0) {
      if (!index_.Matches(b, parent, tokens)) break;
      const bool cached = pool.state(b) == BlockState::kCached;
      if (host_hits > 0 && cached && host_hits + cached_shared + 1 > room)
        break;
      cached_shared += cached;
      parent = index_.content_id(b);
      s.blocks[i] = b;
      continue;
    }
    const int32_t slot = tier_->Find(h);
    if (slot < 0 || !tier_->Matches(slot, parent, tokens)) break;
    if (host_hits + 1 + cached_shared > room) break;
    ++host_hits;
    parent = tier_->entry(slot).content_id;
    s.blocks[i] = HostHit(slot);
  }
  s.last_chain_id = parent;
  return i;
}

TierEntry PrefixCache::EntryOf(BlockId b) const {
  TierEntry e;
  e.hash = index_.hash(b);
  e.parent_id = index_.parent_id(b);
  e.content_id = index_.content_id(b);
  e.first_in_chain = PrefixCacheIndex::IsRoot(e.parent_id);
  e.parent_hash = meta_[b].parent_hash;
  e.adapter_id = meta_[b].adapter_id;
  return e;
}

bool PrefixCache::MakeRoomInTier() {
  if (tier_->HasFreeSlot()) return true;
  const int32_t oldest = tier_->Oldest();
  if (oldest < 0) return false;  // Every slot is pinned or reserved.
  DropHost(oldest, /*failed=*/false);
  return true;
}

bool PrefixCache::Offload(BlockId b) {
  if (!MakeRoomInTier()) return false;
  const int32_t slot = MoveToTier(b, /*reserved_slot=*/-1);
  copies_.push_back(TierCopy{b, slot, /*onboard=*/false});
  return true;
}

int32_t PrefixCache::MoveToTier(BlockId b, int32_t reserved_slot) {
  const TierEntry e = EntryOf(b);
  // The tier holds its own reference on a root (Erase drops the device's).
  if (e.first_in_chain) index_.AcquireRoot(e.parent_id);
  const TokenId* tokens = index_.stored_tokens(b);
  // The tier may hold the same hash under a parent no chain reaches any
  // more (RegisterFilled does not look up the blocks after one it registers
  // anew): that entry gives way.
  if (const int32_t stale = tier_->Find(e.hash); stale >= 0) {
    DropHost(stale, /*failed=*/false);
  }
  int32_t slot = reserved_slot;
  if (slot < 0) {
    slot = tier_->Insert(e, tokens);
  } else {
    tier_->InsertReserved(slot, e, tokens);
  }
  ++stats_.offloads;
  if (observer_ != nullptr) {
    slot_recorded_[slot] = 1;
    RecordStored(StoredBlock{
        slot, e.hash, e.parent_hash, e.first_in_chain, BlockMedium::kHost,
        e.adapter_id,
        absl::Span<const TokenId>(tier_->tokens(slot), math_.size())});
  }
  return slot;
}

void PrefixCache::OffloadFromAhead(BlockId b) {
  EventMeta& m = meta_[b];
  const int32_t slot = m.ahead_slot;
  const int64_t batch = m.ahead_batch;
  m.ahead_slot = -1;
  SyncTierBits(b);
  --num_ahead_;
  if (batch == kKeptCopy) --num_kept_;
  // Queued by an earlier call (OffloadAhead's copies are queued before the
  // call that made them returns); done, or the block's next write waits.
  ABSL_ASSERT(batch > 0 || batch == kKeptCopy);
  if (batch > offload_completed_) ahead_wait_ = std::max(ahead_wait_, batch);
  MoveToTier(b, slot);
  ++(batch == kKeptCopy ? stats_.offloads_kept : stats_.offloads_ahead);
}

void PrefixCache::RetireAhead(BlockId b) {
  EventMeta& m = meta_[b];
  if (m.ahead_batch == 0 || m.ahead_batch <= offload_completed_) {
    tier_->Unreserve(m.ahead_slot);
  } else {
    retired_.push_back(Retired{m.ahead_slot, m.ahead_batch});
  }
  if (m.ahead_batch == kKeptCopy) --num_kept_;
  m.ahead_slot = -1;
  SyncTierBits(b);
  --num_ahead_;
}

void PrefixCache::KeepAsCopyAhead(BlockId b, int32_t slot) {
  ABSL_ASSERT(CanKeepCopy());
  EventMeta& m = meta_[b];
  m.ahead_slot = slot;
  m.ahead_batch = kKeptCopy;
  SyncTierBits(b);
  ++num_ahead_;
  ++num_kept_;
}

int64_t PrefixCache::OffloadAhead(BlockPool& pool, int64_t max_new) {
  if (tier_ == nullptr || ahead_window_ == 0) return 0;
  // Slots of unused copies still in flight count against the window too;
  // kept copies (KeepAsCopyAhead) have a window of their own.
  const int64_t room =
      std::min(max_new, ahead_window_ - (num_ahead_ - num_kept_) -
                            static_cast<int64_t>(retired_.size()));
  if (room <= 0) return 0;
  // Blocks up to the bookmark were looked at by an earlier call: the
  // unselected stay so while cached (a hit takes a block out of the list;
  // it comes back newest, with a new epoch).
  BlockId b = pool.OldestCached();
  if (ahead_bookmark_ >= 0 &&
      pool.state(ahead_bookmark_) == BlockState::kCached &&
      pool.cached_epoch(ahead_bookmark_) == ahead_bookmark_epoch_) {
    b = pool.NewerCached(ahead_bookmark_);
  }
  // A bounded walk per call: the unselected blocks (most, under the default
  // selection) cost a look each.
  constexpr int kMaxLooks = 4096;
  int64_t made = 0;
  for (int looks = 0; b >= 0 && made < room && looks < kMaxLooks;
       ++looks, b = pool.NewerCached(b)) {
    ahead_bookmark_ = b;
    ahead_bookmark_epoch_ = pool.cached_epoch(b);
    // Selected, and no copy ahead yet.
    if (tier_bits_[b] != kSelected) continue;
    if (!MakeRoomInTier()) break;
    EventMeta& m = meta_[b];
    m.ahead_slot = tier_->ReserveSlot();
    m.ahead_batch = 0;
    SyncTierBits(b);
    ++num_ahead_;
    ahead_new_.push_back(b);
    TierCopy c{b, m.ahead_slot, /*onboard=*/false};
    c.ahead = true;
    copies_.push_back(c);
    ++made;
  }
  stats_.ahead_copies += made;
  return made;
}

void PrefixCache::DropHost(int32_t slot, bool failed) {
  // A record not yet flushed may name this slot's tokens, which a later
  // Insert overwrites: flush first (rare: the oldest slot is older than the
  // call).
  if (observer_ != nullptr && slot_recorded_[slot]) FlushToObserver();
  const TierEntry e = tier_->Drop(slot);
  if (PrefixCacheIndex::IsRoot(e.parent_id)) index_.ReleaseRoot(e.parent_id);
  if (observer_ != nullptr) RecordRemoved(e.hash, BlockMedium::kHost);
  ++(failed ? stats_.host_drops : stats_.host_evictions);
}

uint64_t PrefixCache::Promote(const BlockHash& h, BlockId b, uint64_t parent_id,
                              const TokenId* tokens, BlockPool& pool,
                              bool& collision) {
  const int32_t slot = tier_->Find(h);
  if (slot < 0) return 0;
  if (!tier_->Matches(slot, parent_id, tokens)) {
    if (std::equal(tokens, tokens + math_.size(), tier_->tokens(slot))) {
      // The same content under a parent registered anew since (its old
      // parent was dropped: a chain cut by the offload policy or the tier's
      // LRU): the entry can never be reached again. Drop it, and register
      // the block as new content rather than as a collision, which would
      // cut this sequence's chain too.
      DropHost(slot, /*failed=*/false);
      return 0;
    }
    collision = true;
    return 0;
  }
  if (observer_ != nullptr && slot_recorded_[slot]) FlushToObserver();
  // The slot's bytes are b's content: kept as b's copy ahead if there is
  // room (Keep), else freed.
  const bool keep = CanKeepCopy();
  const TierEntry e = keep ? tier_->Keep(slot) : tier_->Drop(slot);
  if (observer_ != nullptr) RecordRemoved(e.hash, BlockMedium::kHost);
  index_.Restore(e.hash, b, e.parent_id, e.content_id, tokens);
  if (PrefixCacheIndex::IsRoot(e.parent_id)) index_.ReleaseRoot(e.parent_id);
  pool.MarkHashed(b);
  SetMeta(b, EventMeta{e.parent_hash, e.adapter_id, /*hits=*/1});
  if (keep) KeepAsCopyAhead(b, slot);
  if (observer_ != nullptr) {
    RecordStored(StoredBlock{
        b, e.hash, e.parent_hash, e.first_in_chain, BlockMedium::kDevice,
        e.adapter_id,
        absl::Span<const TokenId>(index_.stored_tokens(b), math_.size())});
  }
  return e.content_id;
}

int64_t PrefixCache::Onboard(Sequence& s, BlockPool& pool) {
  // Pin every hit first: the allocations below may offload, and an offload
  // must not drop (or overwrite) a slot this call reads.
  int64_t hits = 0;
  for (BlockId& b : s.blocks) {
    if (b >= 0) continue;
    tier_->Take(HostSlot(b));
    ++hits;
  }
  if (hits == 0) return 0;
  const int64_t bs = math_.size();
  // Match left room for every hit: the rest may hold offloaded blocks.
  set_hold_allowance(pool.num_free() + pool.num_cached() - hits);
  for (BlockId& b : s.blocks) {
    if (b >= 0) continue;
    const int32_t slot = HostSlot(b);
    const TierEntry& e = tier_->entry(slot);
    const BlockId fresh = Allocate(pool);  // In use, ref 1: s holds it.
    if (observer_ != nullptr) RecordRemoved(e.hash, BlockMedium::kHost);
    index_.Restore(e.hash, fresh, e.parent_id, e.content_id,
                   tier_->tokens(slot));
    // The device registration took its own root reference.
    if (PrefixCacheIndex::IsRoot(e.parent_id)) index_.ReleaseRoot(e.parent_id);
    pool.MarkHashed(fresh);
    SetMeta(fresh, EventMeta{e.parent_hash, e.adapter_id, /*hits=*/1});
    copies_.push_back(TierCopy{fresh, slot, /*onboard=*/true, /*wait=*/true});
    if (CanKeepCopy()) {
      KeepAsCopyAhead(fresh, slot);
      tier_->KeepPinned(slot);
    }
    if (observer_ != nullptr) {
      RecordStored(StoredBlock{
          fresh, e.hash, e.parent_hash, e.first_in_chain, BlockMedium::kDevice,
          e.adapter_id,
          absl::Span<const TokenId>(index_.stored_tokens(fresh), bs)});
    }
    b = fresh;
  }
  // The onboard copies run before any later call's offload: the slots may
  // be reused from here on.
  tier_->ReleasePinned();
  hold_allowance_ = 0;
  s.tail_block = s.blocks.back();
  stats_.onboards += hits;
  stats_.host_hit_tokens += hits * bs;
  return hits;
}

void PrefixCache::DropOnboarded(absl::Span<const TierCopy> copies,
                                BlockPool& pool) {
  for (const TierCopy& c : copies) {
    if (!c.onboard) continue;
    const BlockId b = c.device_block;
    if (!index_.registered(b)) continue;
    if (tier_bits_[b] & kHasAhead) RetireAhead(b);
    if (observer_ != nullptr)
      RecordRemoved(index_.hash(b), BlockMedium::kDevice);
    index_.Erase(b);
    pool.Unhash(b);
    ++stats_.host_drops;
  }
}

void PrefixCache::DropOffloaded(absl::Span<const TierCopy> copies,
                                bool reused_only) {
  for (const TierCopy& c : copies) {
    if (c.onboard || (reused_only && !c.wait)) continue;
    if (c.ahead) {  // Never queued: RetireAhead frees the slot at once.
      const EventMeta& m = meta_[c.device_block];
      if (m.ahead_slot == c.host_slot && m.ahead_batch == 0) {
        RetireAhead(c.device_block);
        --stats_.ahead_copies;
      }
      continue;
    }
    if (tier_->stored(c.host_slot)) DropHost(c.host_slot, true);
  }
  // This call's copies ahead were in the failed batch (or none were made).
  if (!reused_only) ahead_new_.clear();
}

absl::Status PrefixCache::ValidateTier() const {
  if (!records_.empty()) {
    return absl::InternalError(
        absl::StrCat(records_.size(), " observer records not flushed"));
  }
  if (tier_ == nullptr) return absl::OkStatus();
  if (absl::Status s = tier_->Validate(); !s.ok()) return s;
  if (tier_->num_pinned() != 0) {
    return absl::InternalError(absl::StrCat(
        tier_->num_pinned(), " host-tier slots pinned between calls"));
  }
  // Offload ahead: each copy ahead belongs to a registered block and a
  // reserved slot; every reserved slot to one such block or to one unused
  // copy still in flight.
  if (!ahead_new_.empty()) {
    return absl::InternalError(
        absl::StrCat(ahead_new_.size(), " offloads ahead not queued"));
  }
  int64_t ahead = 0, kept = 0;
  for (BlockId b = 0; b < static_cast<BlockId>(meta_.size()); ++b) {
    if (tier_bits_[b] != TierBits(meta_[b])) {
      return absl::InternalError(absl::StrCat(
          "block ", b, ": tier bits ", static_cast<int>(tier_bits_[b]),
          ", its meta says ", static_cast<int>(TierBits(meta_[b])),
          " (ahead_slot ", meta_[b].ahead_slot, ", hits ",
          static_cast<int>(meta_[b].hits), ")"));
    }
    const int32_t slot = meta_[b].ahead_slot;
    if (slot < 0) continue;
    ++ahead;
    kept += meta_[b].ahead_batch == kKeptCopy;
    if (!index_.registered(b) || slot >= tier_->num_slots() ||
        !tier_->reserved(slot) ||
        (meta_[b].ahead_batch <= 0 && meta_[b].ahead_batch != kKeptCopy)) {
      return absl::InternalError(absl::StrCat(
          "block ", b, " has a copy ahead in host slot ", slot,
          " but is not registered, or the slot not reserved, or not queued"));
    }
  }
  if (kept != num_kept_ || kept > kept_window_) {
    return absl::InternalError(
        absl::StrCat(kept, " kept copies ahead, counted ", num_kept_,
                     ", window ", kept_window_));
  }
  if (ahead != num_ahead_ ||
      ahead + static_cast<int64_t>(retired_.size()) != tier_->num_reserved()) {
    return absl::InternalError(absl::StrCat(
        ahead, " blocks with copies ahead (counted ", num_ahead_, ") and ",
        retired_.size(), " unused copies in flight, but ",
        tier_->num_reserved(), " reserved host slots"));
  }
  absl::Status status;
  tier_->ForEach([&](int32_t slot, const TierEntry& e) {
    if (!status.ok()) return;
    // The same hash in both tiers only as a stale tier entry: under another
    // parent than the device's (MoveToTier), so no chain reaches both.
    if (const BlockId b = index_.Find(e.hash);
        b >= 0 && index_.parent_id(b) == e.parent_id) {
      status = absl::InternalError(
          absl::StrCat("host slot ", slot, " and device block ", b,
                       " hold the same registration (hash and parent)"));
    } else if (e.content_id == 0 || PrefixCacheIndex::IsRoot(e.content_id) ||
               e.first_in_chain != PrefixCacheIndex::IsRoot(e.parent_id)) {
      status = absl::InternalError(
          absl::StrCat("host slot ", slot, " has bad chain ids"));
    }
  });
  return status;
}

}  // namespace internal
}  // namespace kvcache
