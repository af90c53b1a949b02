#include "allocator/block_manager.h"

#include <algorithm>
#include <utility>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_manager_impl.h"

namespace kvcache {

using internal::Sequence;

namespace {

// Copies in pieces under glibc's rep-movsb threshold: on AMD Zen, `rep movsb`
// between buffers at equal offsets within a page (two large allocations) runs
// at about 3 GB/s, six times slower than the vector loop used for pieces.
void AppendTokens(std::vector<TokenId>& dst, absl::Span<const TokenId> src) {
  constexpr size_t kPiece = 512;  // 2 KiB.
  dst.reserve(dst.size() + src.size());
  for (size_t i = 0; i < src.size(); i += kPiece) {
    const absl::Span<const TokenId> piece = src.subspan(i, kPiece);
    dst.insert(dst.end(), piece.begin(), piece.end());
  }
}

// Grows `v`'s capacity to at least `n` geometrically, so that per-step
// reservations stay amortized O(1).
template <class T>
void ReserveGeometric(std::vector<T>& v, size_t n) {
  if (v.capacity() < n) v.reserve(std::max(n, 2 * v.capacity()));
}

}  // namespace

// ---- Blocks
// ----------------------------------------------------------------------------------

BlockId BlockManager::Impl::AllocateBlock() {
  if (pool_.num_free() > 0) return pool_.AllocateFree();
  const BlockId b = pool_.EvictOldest();
  index_.Erase(b);
  ++stats_.evictions;
  return b;
}

int64_t BlockManager::Impl::BlocksNeeded(const Sequence& s,
                                         int64_t num_tokens) const {
  return math_.CeilDiv(s.computed + num_tokens) -
         static_cast<int64_t>(s.blocks.size()) + (s.copy_needed ? 1 : 0);
}

// Releases the tail first so that, once cached, a chain's last blocks are
// evicted before its first.
void BlockManager::Impl::ReleaseAll(Sequence& s) {
  if (s.cow_src >= 0) pool_.Release(s.cow_src);
  s.cow_src = -1;
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it)
    pool_.Release(*it);
  s.blocks.clear();
}

// ---- Prefix cache
// ----------------------------------------------------------------------------

// Hashes every full block of the prompt (Commit reuses them) and finds the
// longest run of cached ones, leaving at least one token to compute; puts them
// in `s`. The caller acquires them once `s` is registered: this may throw
// std::bad_alloc and then must change nothing.
int64_t BlockManager::Impl::MatchPrefix(Sequence& s,
                                        absl::Span<const TokenId> prompt) {
  const int64_t bs = options_.block_size;
  const int64_t full = static_cast<int64_t>(prompt.size()) / bs;
  const int64_t max_blocks = (static_cast<int64_t>(prompt.size()) - 1) / bs;
  s.hashes.resize(full);
  BlockHash parent_hash = s.root_hash;
  for (int64_t i = 0; i < full; ++i) {
    parent_hash = s.hashes[i] = Hash(parent_hash, prompt.subspan(i * bs, bs));
  }
  s.blocks.reserve(max_blocks);
  s.chain_ids.reserve(max_blocks);
  // The lookups are independent until the first miss, so they overlap. Two
  // stages ahead of the compare: the table slot kAhead blocks on, and the
  // found block's tokens and ids kFound blocks on (their Find hits the slot
  // prefetched earlier), so that the dependent misses overlap too.
  uint64_t parent_id = s.root_id;
  constexpr int64_t kAhead = 16;
  constexpr int64_t kFound = kAhead / 2;
  BlockId found[kFound];  // Ring: block j's candidate at j % kFound.
  for (int64_t i = 0; i < std::min(kAhead, max_blocks); ++i) {
    index_.Prefetch(s.hashes[i]);
  }
  for (int64_t i = 0; i < std::min(kFound, max_blocks); ++i) {
    found[i] = index_.Find(s.hashes[i]);
    if (found[i] >= 0) index_.PrefetchBlock(found[i]);
  }
  for (int64_t i = 0; i < max_blocks; ++i) {
    if (i + kAhead < max_blocks) index_.Prefetch(s.hashes[i + kAhead]);
    const BlockId b = found[i % kFound];
    if (i + kFound < max_blocks) {
      const BlockId next = index_.Find(s.hashes[i + kFound]);
      if (next >= 0) index_.PrefetchBlock(next);
      found[i % kFound] = next;
    }
    if (b < 0 || !index_.Matches(b, parent_id, prompt.subspan(i * bs, bs))) {
      break;
    }
    s.blocks.push_back(b);
    parent_id = index_.content_id(b);
    s.chain_ids.push_back(parent_id);
  }
  return static_cast<int64_t>(s.blocks.size()) * bs;
}

// Registers the blocks that the last commit filled. A block whose content is
// already registered under another block (or whose hash collides with different
// content) stays unhashed.
void BlockManager::Impl::HashNewFullBlocks(Sequence& s) {
  const int64_t bs = options_.block_size;
  const size_t full = static_cast<size_t>(math_.Div(s.computed));
  for (size_t i = s.chain_ids.size(); i < full; ++i) {
    const uint64_t parent_id = i == 0 ? s.root_id : s.chain_ids[i - 1];
    const absl::Span<const TokenId> tokens(&s.tokens[i * bs], bs);
    if (s.hashes.size() == i) {
      s.hashes.push_back(Hash(i == 0 ? s.root_hash : s.hashes[i - 1], tokens));
    }
    const BlockHash& h = s.hashes[i];
    const BlockId b = s.blocks[i];
    ABSL_ASSERT(!pool_.hashed(b) && pool_.ref_count(b) == 1);
    const BlockId existing = index_.Find(h);
    uint64_t chain_id;
    if (existing < 0) {
      chain_id = index_.Insert(h, b, parent_id, tokens);
      pool_.MarkHashed(b);
    } else if (index_.Matches(existing, parent_id, tokens)) {
      chain_id = index_.content_id(
          existing);  // Same content: children may chain to it.
    } else {
      chain_id =
          index_.NewId();  // A collision: this chain can never be matched.
    }
    s.chain_ids.push_back(chain_id);
  }
}

// ---- Operations
// ------------------------------------------------------------------------------

absl::StatusOr<int64_t> BlockManager::Impl::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  if (prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": prompt is empty, expected at least 1 token"));
  }
  if (sequences_.count(id) != 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("sequence ", id, " already exists"));
  }
  // Everything that allocates (and so may throw std::bad_alloc) happens on a
  // sequence of our own before it is registered; the pool changes only after.
  auto seq = std::make_unique<Sequence>();
  Sequence& s = *seq;
  s.id = id;
  AppendTokens(s.tokens, prompt);
  if (options_.enable_prefix_caching) {
    s.root_hash = HashExtraKey(extra.adapter_id, extra.salt);
    s.root_id = index_.RootId(extra.adapter_id, extra.salt);
    s.computed = MatchPrefix(s, prompt);
  }
  by_id_.Reserve(sequences_.size() + 1);
  sequences_.emplace(id, std::move(seq));
  by_id_.Insert(id, &s);
  // From here on nothing allocates.
  for (BlockId b : s.blocks) pool_.Acquire(b);
  if (!options_.enable_prefix_caching) return 0;
  ++stats_.queries;
  stats_.query_tokens += static_cast<int64_t>(prompt.size());
  stats_.hit_tokens += s.computed;
  return s.computed;
}

absl::Status BlockManager::Impl::CheckBatch(
    absl::Span<const ReserveRequest> batch) const {
  batch_.clear();
  if (batch.empty())
    return absl::InvalidArgumentError("reserve of an empty batch");
  // Pass 1 looks every sequence up and prefetches its hot line, so that the
  // misses of a large batch overlap; pass 2 checks in batch order.
  for (const ReserveRequest& r : batch) {
    Sequence* s = by_id_.Find(r.sequence);
    if (s != nullptr) __builtin_prefetch(s, /*rw=*/1);
    batch_.push_back(s);
  }
  const uint64_t epoch = ++batch_epoch_;
  int64_t needed = 0;
  batch_tokens_ = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const ReserveRequest& r = batch[i];
    Sequence* s = batch_[i];
    if (s == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("sequence ", r.sequence, " not found"));
    }
    if (i + 4 < batch.size() && batch_[i + 4] != nullptr) {
      const Sequence* ahead = batch_[i + 4];
      if (!ahead->tokens.empty()) __builtin_prefetch(&ahead->tokens.back());
      if (!ahead->blocks.empty()) __builtin_prefetch(&ahead->blocks.back());
      __builtin_prefetch(batch[i + 4].new_token_ids.data());
    }
    if (s->batch_mark == epoch) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", r.sequence, " is named twice in one reserve"));
    }
    s->batch_mark = epoch;
    if (s->plan_id != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", r.sequence,
          " already has an uncommitted reservation (plan ", s->plan_id, ")"));
    }
    if (r.num_tokens < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("reserve of ", r.num_tokens, " tokens for sequence ",
                       r.sequence, ": num_tokens must be >= 1"));
    }
    const int64_t known =
        static_cast<int64_t>(s->tokens.size() + r.new_token_ids.size());
    if (r.num_tokens > known - s->computed) {
      return absl::InvalidArgumentError(
          absl::StrCat("reserve of ", r.num_tokens, " tokens for sequence ",
                       r.sequence, ": ", s->computed, " computed + ",
                       r.num_tokens, " exceeds the ", known, " known tokens"));
    }
    s->copy_needed = NeedsCopy(*s);
    needed += BlocksNeeded(*s, r.num_tokens);
    batch_tokens_ += r.num_tokens;
  }
  const int64_t available = pool_.num_free() + pool_.num_cached();
  if (needed > available) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "reserve for ", batch.size(), " sequences needs ", needed,
        " new blocks, only ", available, " are free or evictable"));
  }
  return absl::OkStatus();
}

absl::StatusOr<StepPlan> BlockManager::Impl::Reserve(
    absl::Span<const ReserveRequest> batch) {
  if (absl::Status s = CheckBatch(batch); !s.ok()) return s;
  // First allocate everything the plan needs (this may throw std::bad_alloc,
  // and then nothing observable changed), then change the pool.
  const int64_t bs = options_.block_size;
  StepPlan plan;
  plan.sequences.resize(batch.size());
  plan.num_tokens.resize(batch.size());
  plan.slot_mapping.resize(batch_tokens_);
  plan.copies.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const ReserveRequest& r = batch[i];
    Sequence& s = *batch_[i];
    ReserveGeometric(s.tokens, s.tokens.size() + r.new_token_ids.size());
    ReserveGeometric(s.blocks, static_cast<size_t>(
                                   math_.CeilDiv(s.computed + r.num_tokens)));
  }
  PlanRecord new_record;
  new_record.sequences = batch_;
  plan.id = next_plan_id_;
  plans_.emplace(plan.id, std::move(new_record));
  ++next_plan_id_;
  // From here on nothing can fail or allocate.
  int64_t* slot = plan.slot_mapping.data();
  for (size_t i = 0; i < batch.size(); ++i) {
    const ReserveRequest& r = batch[i];
    Sequence& s = *batch_[i];
    s.tokens_before = s.tokens.size();
    s.blocks_before = s.blocks.size();
    for (TokenId t : r.new_token_ids) s.tokens.push_back(t);
    if (s.copy_needed) {
      const BlockId fresh = AllocateBlock();
      plan.copies.push_back(BlockCopy{s.blocks.back(), fresh});
      s.cow_src = s.blocks.back();  // Keeps its reference: the copy reads it.
      s.blocks.back() = fresh;
    }
    const int64_t end = s.computed + r.num_tokens;
    const size_t num_blocks = static_cast<size_t>(math_.CeilDiv(end));
    while (s.blocks.size() < num_blocks) s.blocks.push_back(AllocateBlock());
    // The tail is now fresh or was never shared (else it was copied).
    s.tail_maybe_shared = false;
    const int64_t first_offset = math_.Mod(s.computed);
    if (first_offset + r.num_tokens <= bs) {  // One block (a decode step).
      const int64_t base =
          static_cast<int64_t>(s.blocks[math_.Div(s.computed)]) * bs +
          first_offset;
      for (int64_t k = 0; k < r.num_tokens; ++k) *slot++ = base + k;
    } else {
      for (int64_t p = s.computed; p < end;) {
        const int64_t offset = math_.Mod(p);
        const int64_t run = std::min(end - p, bs - offset);
        const int64_t base =
            static_cast<int64_t>(s.blocks[math_.Div(p)]) * bs;
        for (int64_t k = 0; k < run; ++k) *slot++ = base + offset + k;
        p += run;
      }
    }
    s.plan_id = plan.id;
    s.plan_index = static_cast<int32_t>(i);
    s.reserved = r.num_tokens;
    plan.sequences[i] = r.sequence;
    plan.num_tokens[i] = r.num_tokens;
  }
  return plan;
}

absl::Status BlockManager::Impl::Commit(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(
        absl::StrCat("plan ", plan_id,
                     " not found (unknown, or already committed or aborted)"));
  }
  // Allocate first (may throw std::bad_alloc with nothing changed): room for
  // the hashes of every block this commit fills. (The prefix-cache index has a
  // fixed capacity and never allocates.)
  const std::vector<Sequence*>& seqs = it->second.sequences;
  if (options_.enable_prefix_caching) {
    for (Sequence* s : seqs) {
      if (s == nullptr) continue;
      const size_t full =
          static_cast<size_t>(math_.Div(s->computed + s->reserved));
      ReserveGeometric(s->hashes, full);
      ReserveGeometric(s->chain_ids, full);
    }
  }
  // From here on nothing allocates.
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (i + 8 < seqs.size() && seqs[i + 8] != nullptr) {
      __builtin_prefetch(seqs[i + 8], /*rw=*/1);
    }
    Sequence* s = seqs[i];
    if (s == nullptr) continue;  // Freed since Reserve.
    if (s->cow_src >= 0) pool_.Release(s->cow_src);
    s->cow_src = -1;
    const int64_t before = s->computed;
    s->computed += s->reserved;
    s->reserved = 0;
    s->plan_id = 0;
    // Only a step that filled a block has anything to hash (chain_ids covers
    // every full block computed before it).
    if (options_.enable_prefix_caching &&
        math_.Div(s->computed) != math_.Div(before)) {
      HashNewFullBlocks(*s);
    }
  }
  plans_.erase(it);
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::Abort(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(
        absl::StrCat("plan ", plan_id,
                     " not found (unknown, or already committed or aborted)"));
  }
  std::vector<Sequence*>& seqs = it->second.sequences;
  for (auto s_it = seqs.rbegin(); s_it != seqs.rend(); ++s_it) {
    Sequence* s = *s_it;
    if (s == nullptr) continue;
    for (size_t i = s->blocks.size(); i > s->blocks_before; --i)
      pool_.Release(s->blocks[i - 1]);
    s->blocks.resize(s->blocks_before);
    if (s->cow_src >= 0) {
      pool_.Release(s->blocks.back());
      s->blocks.back() = s->cow_src;
      s->cow_src = -1;
      s->tail_maybe_shared = true;
    }
    s->tokens.resize(s->tokens_before);
    s->reserved = 0;
    s->plan_id = 0;
  }
  plans_.erase(it);
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::Free(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end())
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  Sequence& s = *it->second;
  if (s.plan_id != 0) plans_.at(s.plan_id).sequences[s.plan_index] = nullptr;
  ReleaseAll(s);
  by_id_.Erase(id);
  sequences_.erase(it);
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::Fork(SequenceId parent, SequenceId child) {
  auto it = sequences_.find(parent);
  if (it == sequences_.end()) {
    return absl::NotFoundError(
        absl::StrCat("fork: parent sequence ", parent, " not found"));
  }
  const Sequence& p = *it->second;
  if (p.plan_id != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("fork: parent sequence ", parent,
                     " has an uncommitted reservation (plan ", p.plan_id, ")"));
  }
  if (sequences_.count(child) != 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("fork: child sequence ", child, " already exists"));
  }
  // Copy and register the child first (may throw std::bad_alloc with nothing
  // changed), then take the references.
  auto c = std::make_unique<Sequence>(p);
  c->id = child;
  c->batch_mark = 0;
  c->tail_maybe_shared = true;  // Both now hold the partial last block.
  Sequence& registered = *c;
  by_id_.Reserve(sequences_.size() + 1);
  sequences_.emplace(child, std::move(c));
  by_id_.Insert(child, &registered);
  it->second->tail_maybe_shared = true;
  for (BlockId b : registered.blocks) pool_.Acquire(b);
  return absl::OkStatus();
}

}  // namespace kvcache
