#include "allocator/prefix_cache.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {

PrefixCache::PrefixCache(const Options& options)
    : math_(options.block_size),
      enabled_(options.enabled),
      hash_function_(options.hash_function),
      observer_(options.observer),
      index_(options.enabled ? options.num_blocks : 0, options.block_size) {
  if (observer_ != nullptr && enabled_) {
    // A call stores or evicts each block at most once.
    stored_.reserve(options.num_blocks);
    removed_.reserve(options.num_blocks);
  }
  if (options.host_slots > 0 && enabled_) {
    tier_ = std::make_unique<HostTier>(options.host_slots, options.block_size);
    offload_min_hits_ = options.offload_min_hits;
    hold_offloaded_ = options.hold_offloaded;
    meta_.resize(options.num_blocks);
    tier_bits_.assign(options.num_blocks, TierBits(EventMeta{}));
    held_.resize(options.num_blocks);
    max_held_ = std::max<int64_t>(16, options.num_blocks / 64);
    ahead_window_ = std::clamp<int64_t>(options.offload_ahead_blocks, 0,
                                        options.host_slots / 2);
    kept_window_ = std::min<int64_t>(ahead_window_, options.host_slots / 4);
    ahead_new_.reserve(ahead_window_);
    retired_.reserve(ahead_window_);
    // A call offloads each device block at most once and onboards at most one
    // block per device block.
    copies_.reserve(2 * static_cast<size_t>(options.num_blocks));
    slot_recorded_.assign(options.host_slots, 0);
    if (observer_ != nullptr) {
      // Per block of a call: evicted, offloaded, a tier block dropped for it,
      // and onboarded (removed from the tier, stored on the device).
      records_.reserve(5 * static_cast<size_t>(options.num_blocks));
      stored_.reserve(2 * static_cast<size_t>(options.num_blocks));
      removed_.reserve(3 * static_cast<size_t>(options.num_blocks));
    }
  }
}

void PrefixCache::HashChain(const BlockHash& parent, const TokenId* tokens,
                            size_t count, std::vector<BlockHash>& out) const {
  const size_t bs = static_cast<size_t>(math_.size());
  if (hash_function_ == nullptr)
    return HashBlocks(parent, tokens, bs, count, out);
  BlockHash h = parent;
  for (size_t i = 0; i < count; ++i) {
    h = hash_function_(h, absl::Span<const TokenId>(tokens + i * bs, bs));
    out.push_back(h);
  }
}

void PrefixCache::AcquireRoot(const ExtraKey& extra, Sequence& s) {
  s.root_id = index_.AcquireRoot(extra.adapter_id, extra.salt);
  s.root_hash = HashExtraKey(extra.adapter_id, extra.salt);
  s.adapter_id = extra.adapter_id;
  s.last_chain_id = s.root_id;
}

int64_t PrefixCache::Match(Sequence& s, absl::Span<const TokenId> prompt,
                           const BlockPool& pool) const {
  const int64_t bs = math_.size();
  const size_t max_blocks = (prompt.size() - 1) / bs;
  s.hashes.reserve(prompt.size() / bs);
  s.blocks.resize(max_blocks);  // Shrunk to the match below.
  const int64_t full = static_cast<int64_t>(prompt.size()) / bs;
  int64_t matched;
  if (bs == 16 && hash_function_ == nullptr) {
    matched = index_.HashAndMatch16(s.root_hash, prompt.data(), full,
                                    max_blocks, s.root_id, s.hashes,
                                    s.blocks.data(), s.last_chain_id);
  } else {
    HashChain(s.root_hash, prompt.data(), full, s.hashes);
    matched = index_.LongestMatch(s.hashes.data(), prompt.data(), max_blocks,
                                  s.root_id, s.blocks.data(), s.last_chain_id);
  }
  if (tier_ != nullptr && matched < static_cast<int64_t>(max_blocks)) {
    matched = MatchAcrossTiers(s, prompt.data(), matched,
                               static_cast<int64_t>(max_blocks), pool);
  }
  s.blocks.resize(matched);
  s.chained_blocks = matched;
  s.prefix_blocks = static_cast<int32_t>(matched);
  s.tail_block = matched == 0 ? -1 : s.blocks.back();
  s.computed = matched * bs;
  return matched;
}

int64_t PrefixCache::Peek(absl::Span<const TokenId> prompt,
                          const ExtraKey& extra, const BlockPool& pool) const {
  if (!enabled_ || prompt.empty()) return 0;
  const uint64_t root = index_.FindRoot(extra.adapter_id, extra.salt);
  if (root == 0) return 0;  // No live sequence or cached block has this key.
  Sequence s;
  s.root_id = root;
  s.root_hash = HashExtraKey(extra.adapter_id, extra.salt);
  s.last_chain_id = root;
  return Match(s, prompt, pool) * math_.size();
}

void PrefixCache::Rewind(Sequence& s, int64_t full) const {
  ABSL_ASSERT(full <= s.chained_blocks);
  if (static_cast<int64_t>(s.hashes.size()) > full) s.hashes.resize(full);
  if (s.chained_blocks == full) return;
  s.chained_blocks = full;
  if (s.last_chain_id == kCutChain) return;
  if (full == 0) {
    s.last_chain_id = s.root_id;
    return;
  }
  const BlockId b = s.blocks[full - 1];
  s.last_chain_id = index_.registered(b) && index_.hash(b) == s.hashes[full - 1]
                        ? index_.content_id(b)
                        : kCutChain;
}

void PrefixCache::PrepareRegistration(Sequence& s,
                                      const BlockPool& pool) const {
  const int64_t bs = math_.size();
  const size_t full = static_cast<size_t>(math_.Div(s.computed + s.reserved));
  for (size_t i = s.hashes.size(); i < full; ++i) {
    s.hashes.push_back(
        Hash(i == 0 ? s.root_hash : s.hashes[i - 1],
             absl::Span<const TokenId>(s.token(i * bs, bs), bs)));
  }
  for (size_t i = s.chained_blocks; i < full; ++i) {
    index_.Prefetch(s.hashes[i]);
    index_.PrefetchBlock(s.blocks[i]);
    pool.Prefetch(s.blocks[i]);
  }
}

void PrefixCache::TouchRegistration(const Sequence& s) const {
  const size_t full =
      std::min(s.hashes.size(), static_cast<size_t>(math_.Div(s.computed)));
  for (size_t i = s.chained_blocks; i < full; ++i) index_.Touch(s.hashes[i]);
}

void PrefixCache::RegisterFilled(Sequence& s, BlockPool& pool) {
  const int64_t bs = math_.size();
  const size_t full = static_cast<size_t>(math_.Div(s.computed));
  // Whether the previous block was registered anew by this loop: its content
  // id is brand new, so no tier entry names it as parent, and the tier can
  // hold the next block's hash only under a parent no chain reaches any more
  // (a stale entry, which MoveToTier replaces if the block is offloaded).
  // Only the first block of a run is looked up in the tier, not every one.
  bool parent_is_new = false;
  for (size_t i = s.chained_blocks; i < full; ++i) {
    const uint64_t parent_id = s.last_chain_id;
    const TokenId* tokens = s.token(i * bs, bs);
    if (s.hashes.size() == i) {
      s.hashes.push_back(Hash(i == 0 ? s.root_hash : s.hashes[i - 1],
                              absl::Span<const TokenId>(tokens, bs)));
    }
    s.chained_blocks = i + 1;
    if (parent_id == kCutChain) continue;
    const BlockHash& h = s.hashes[i];
    const BlockId b = s.blocks[i];
    ABSL_ASSERT(!pool.hashed(b) && pool.ref_count(b) == 1);
    uint64_t chain_id;
    if (tier_ != nullptr && !parent_is_new && tier_->num_stored() > 0) {
      bool collision = false;
      chain_id = Promote(h, b, parent_id, tokens, pool, collision);
      if (collision) chain_id = index_.NewId();
      if (chain_id != 0) {
        s.last_chain_id = chain_id;
        continue;
      }
    }
    const BlockId existing =
        index_.FindOrInsert(h, b, parent_id, tokens, chain_id);
    parent_is_new = existing < 0;
    if (existing < 0) {
      pool.MarkHashed(b);  // Registered: chain_id is its content id.
      const BlockHash parent_hash = i == 0 ? BlockHash{} : s.hashes[i - 1];
      if (tier_ != nullptr) SetMeta(b, EventMeta{parent_hash, s.adapter_id});
      if (observer_ != nullptr) {
        RecordStored(StoredBlock{
            b, h, parent_hash, i == 0, BlockMedium::kDevice, s.adapter_id,
            absl::Span<const TokenId>(index_.stored_tokens(b), bs)});
      }
    } else if (index_.Matches(existing, parent_id, tokens)) {
      // Same content: children may chain to it.
      chain_id = index_.content_id(existing);
    } else {
      // A collision: this chain can never be matched.
      chain_id = index_.NewId();
    }
    s.last_chain_id = chain_id;
  }
}

BlockId PrefixCache::Evict(BlockPool& pool) {
  // Holding evicts further blocks early; bounded per eviction and in all,
  // so that a run of selected blocks at the LRU's end does not empty the
  // cache into the tier (the rest are reused at once and waited for).
  int holds = 0;
  int deferrals = 0;
  // Fewer than the cached blocks: when every one is still being copied,
  // the oldest of them is reused (and waited for) after all.
  const int max_deferrals =
      std::min(kMaxDeferralsPerEviction, pool.num_cached() - 1);
  while (true) {
    // The oldest block's copy ahead may still be running (copies ahead are
    // made in LRU order, so the blocks after it likely too): reusing it now
    // would order the step's writes after that copy, on the device. It
    // becomes the newest cached block instead (its copy completes long
    // before it is the oldest again), up to max_deferrals times.
    while (tier_ != nullptr && deferrals < max_deferrals) {
      const BlockId oldest = pool.OldestCached();
      if (!(tier_bits_[oldest] & kHasAhead) ||
          meta_[oldest].ahead_batch <= offload_completed_) {
        break;
      }
      pool.Acquire(oldest);
      pool.Release(oldest);
      ++deferrals;
      ++stats_.evictions_deferred;
    }
    const BlockId b = pool.EvictOldest();
    // Evictions come in runs (a prefill's new blocks), so the next victims'
    // entries load while this one is handled: the next one's hash table
    // slot (its ids loaded during this eviction in a run) and tier record,
    // the one after it's ids and pool entry.
    if (const BlockId next = pool.OldestCached(); next >= 0) {
      index_.Prefetch(index_.hash(next));
      if (tier_ != nullptr) {
        __builtin_prefetch(&meta_[next]);
        if (tier_bits_[next] & kSelected)
          tier_->PrefetchInserts(index_.hash(next));
      }
      if (const BlockId after = pool.NewerCached(next); after >= 0) {
        index_.PrefetchIds(after);
        pool.Prefetch(after);
      }
    }
    if (observer_ != nullptr)
      RecordRemoved(index_.hash(b), BlockMedium::kDevice);
    bool held = false;
    if (tier_ != nullptr) {  // Before Erase: it reads the ids.
      const uint8_t bits = tier_bits_[b];
      if (bits & kHasAhead) {
        OffloadFromAhead(b);  // Its copy is made (or on its way).
      } else if (!(bits & kSelected)) {
        ++stats_.offloads_unselected;
      } else if (offload_budget_ <= 0) {
        // Over the in-flight budget: dropped rather than waited for.
        ++stats_.offloads_skipped;
      } else {
        --offload_budget_;
        if (!Offload(b)) {
          ++stats_.offloads_skipped;
        } else if (hold_allowance_ <= 0 || holds >= kMaxHoldsPerEviction ||
                   held_count_ >= max_held_) {  // Reused at once: writes wait.
          if (!copies_.empty()) copies_.back().wait = true;
          ++stats_.offloads_waited;
        } else {
          --hold_allowance_;
          ++holds;
          held_[(held_head_ + held_count_) % held_.size()] = Held{b, 0};
          ++held_count_;
          held = true;
        }
      }
    }
    index_.Erase(b);
    ++stats_.evictions;
    if (!held) return b;
    // The allowance left a free or cached block for the caller.
    if (pool.num_free() > 0) return pool.AllocateFree();
  }
}

void PrefixCache::OffloadsQueued(int64_t batch) {
  for (BlockId b : ahead_new_) {
    if (meta_[b].ahead_slot >= 0) meta_[b].ahead_batch = batch;
  }
  ahead_new_.clear();
  for (int64_t k = held_count_ - 1; k >= 0; --k) {
    Held& h = held_[(held_head_ + k) % held_.size()];
    if (h.batch != 0) break;
    h.batch = batch;
  }
}

void PrefixCache::ReleaseOffloaded(int64_t completed, BlockPool& pool,
                                   bool all) {
  offload_completed_ = std::max(offload_completed_, completed);
  if (!retired_.empty()) {
    size_t kept = 0;
    for (const Retired& r : retired_) {
      if (r.batch <= offload_completed_) {
        tier_->Unreserve(r.slot);
      } else {
        retired_[kept++] = r;
      }
    }
    retired_.resize(kept);
  }
  if (all) {  // This call's (the newest) first.
    while (held_count_ > 0) {
      Held& h = held_[(held_head_ + held_count_ - 1) % held_.size()];
      if (h.batch != 0) break;
      pool.Release(h.block);
      --held_count_;
    }
  }
  while (held_count_ > 0) {
    const Held& h = held_[held_head_];
    if (h.batch == 0 || h.batch > completed) break;
    pool.Release(h.block);
    held_head_ = (held_head_ + 1) % static_cast<int64_t>(held_.size());
    --held_count_;
  }
}

void PrefixCache::Clear(BlockPool& pool, SequenceTable& sequences) {
  for (BlockId b = 0; b < pool.num_blocks(); ++b) {
    if (!index_.registered(b)) continue;
    if (tier_ != nullptr && (tier_bits_[b] & kHasAhead)) RetireAhead(b);
    index_.Erase(b);
  }
  ahead_bookmark_ = -1;
  pool.ClearHashes();
  if (tier_ != nullptr) {
    tier_->Clear([&](const TierEntry& e) {
      if (PrefixCacheIndex::IsRoot(e.parent_id))
        index_.ReleaseRoot(e.parent_id);
    });
  }
  sequences.ForEach([](Sequence& s) { s.last_chain_id = kCutChain; });
  ABSL_ASSERT(stored_.empty() && removed_.empty() && records_.empty());
  if (observer_ != nullptr) observer_->OnAllBlocksCleared();
}

void PrefixCache::FlushToObserver() {
  if (tier_ != nullptr) {
    // Runs of one kind and medium, in order.
    for (size_t i = 0; i < records_.size();) {
      const bool stored = records_[i].stored;
      const BlockMedium medium = records_[i].block.medium;
      size_t j = i;
      for (; j < records_.size() && records_[j].stored == stored &&
             records_[j].block.medium == medium;
           ++j) {
        if (stored) {
          stored_.push_back(records_[j].block);
        } else {
          removed_.push_back(records_[j].block.hash);
        }
      }
      if (stored) {
        observer_->OnBlocksStored(stored_);
        stored_.clear();
      } else {
        observer_->OnBlocksRemoved(removed_, medium);
        removed_.clear();
      }
      i = j;
    }
    records_.clear();
    std::fill(slot_recorded_.begin(), slot_recorded_.end(), 0);
    return;
  }
  // One manager call either stores or evicts, never both: the order of the
  // two calls cannot matter.
  ABSL_ASSERT(stored_.empty() || removed_.empty());
  if (!removed_.empty()) {
    observer_->OnBlocksRemoved(removed_, BlockMedium::kDevice);
    removed_.clear();
  }
  if (!stored_.empty()) {
    observer_->OnBlocksStored(stored_);
    stored_.clear();
  }
}

std::vector<BlockHash> PrefixCache::RegisteredHashes(BlockMedium medium) const {
  std::vector<BlockHash> out;
  if (medium == BlockMedium::kHost) {
    if (tier_ != nullptr) {
      tier_->ForEach(
          [&](int32_t, const TierEntry& e) { out.push_back(e.hash); });
    }
    return out;
  }
  out.reserve(index_.size());
  index_.table().ForEach(
      [&](const BlockHash& hash, BlockId) { out.push_back(hash); });
  return out;
}

// ---- Validation --------------------------------------------------------

absl::Status PrefixCache::ValidateChain(const Sequence& s,
                                        const std::string& name) const {
  const int64_t bs = math_.size();
  const int64_t known = s.known(bs);
  if (s.prefix_blocks < 0 || s.prefix_blocks > s.computed / bs ||
      s.prefix_blocks > s.chained_blocks) {
    return absl::InternalError(absl::StrCat(
        name, s.prefix_blocks, " prefix blocks without stored tokens for ",
        s.computed, " computed tokens and ", s.chained_blocks,
        " chained blocks"));
  }
  const size_t full = static_cast<size_t>(s.computed / bs);
  if (s.hashes.size() < full ||
      s.chained_blocks != static_cast<int64_t>(full) ||
      s.hashes.size() > static_cast<size_t>(known / bs)) {
    return absl::InternalError(
        absl::StrCat(name, s.hashes.size(), " hashes and ", s.chained_blocks,
                     " chained blocks for ", full, " full computed blocks"));
  }
  for (size_t i = 0; i < full; ++i) {
    const BlockId b = s.blocks[i];
    if (!index_.registered(b)) continue;
    if (index_.hash(b) != s.hashes[i]) {
      return absl::InternalError(
          absl::StrCat(name, "block ", b, " is registered under another hash"));
    }
    // What the index stored for the block is this sequence's own: its tokens
    // (where the sequence still holds them), and its chain (issue #12).
    if (static_cast<int64_t>(i) >= s.prefix_blocks &&
        std::memcmp(index_.stored_tokens(b), s.token(i * bs, bs),
                    bs * sizeof(TokenId)) != 0) {
      return absl::InternalError(absl::StrCat(
          name, "block ", b, " is registered with other tokens than its own"));
    }
    const uint64_t parent = i == 0 ? s.root_id
                                   : (index_.registered(s.blocks[i - 1])
                                          ? index_.content_id(s.blocks[i - 1])
                                          : index_.parent_id(b));
    if (index_.parent_id(b) != parent) {
      return absl::InternalError(
          absl::StrCat(name, "block ", b, " is registered under parent ",
                       index_.parent_id(b), ", not ", parent, " of its chain"));
    }
  }
  return absl::OkStatus();
}

absl::Status PrefixCache::ValidateIndex(const BlockPool& pool) const {
  int32_t hashed = 0;
  for (BlockId b = 0; b < pool.num_blocks(); ++b) {
    if (pool.hashed(b)) ++hashed;
    if (enabled_ && pool.hashed(b) != index_.registered(b)) {
      return absl::InternalError(
          absl::StrCat("block ", b, ": hashed ", pool.hashed(b),
                       " but registered ", index_.registered(b)));
    }
  }
  if (static_cast<size_t>(hashed) != index_.size()) {
    return absl::InternalError(absl::StrCat(hashed, " hashed blocks but ",
                                            index_.size(), " index entries"));
  }
  absl::Status status;
  index_.table().ForEach([&](const BlockHash& hash, BlockId b) {
    if (!status.ok()) return;
    if (b < 0 || b >= pool.num_blocks() || !pool.hashed(b) ||
        index_.hash(b) != hash || index_.Find(hash) != b) {
      status = absl::InternalError(
          absl::StrCat("index entry for block ", b, " is stale"));
    } else if (pool.state(b) == BlockState::kFree) {
      status = absl::InternalError(absl::StrCat("index holds free block ", b));
    }
  });
  return status;
}

absl::Status PrefixCache::ValidateRoots(const SequenceTable& sequences) const {
  std::unordered_map<uint64_t, int64_t> holders;
  absl::Status status;
  sequences.ForEach([&](const Sequence& s) {
    if (!PrefixCacheIndex::IsRoot(s.root_id) && status.ok()) {
      status = absl::InternalError(absl::StrCat(
          "sequence ", s.id, ": root ", s.root_id, " is not a root id"));
    }
    ++holders[s.root_id];
  });
  if (!status.ok()) return status;
  for (BlockId b = 0; b < index_.num_blocks(); ++b) {
    if (index_.registered(b) && PrefixCacheIndex::IsRoot(index_.parent_id(b)))
      ++holders[index_.parent_id(b)];
  }
  if (tier_ != nullptr) {
    tier_->ForEach([&](int32_t, const TierEntry& e) {
      if (PrefixCacheIndex::IsRoot(e.parent_id)) ++holders[e.parent_id];
    });
  }
  if (holders.size() != index_.num_roots()) {
    return absl::InternalError(absl::StrCat(
        index_.num_roots(), " prefix roots but ", holders.size(), " are held"));
  }
  for (const auto& [root, count] : holders) {
    if (index_.root_refs(root) != count) {
      return absl::InternalError(
          absl::StrCat("prefix root ", root, " has ", index_.root_refs(root),
                       " references but ", count, " holders"));
    }
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvcache
