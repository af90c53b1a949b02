#include "allocator/block_manager.h"

#include <algorithm>
#include <utility>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_manager_impl.h"

namespace kvcache {

using internal::Sequence;

// ---- Blocks
// ----------------------------------------------------------------------------------

BlockId BlockManager::Impl::AllocateBlock() {
  if (pool_.num_free() > 0) return pool_.AllocateFree();
  const BlockId b = pool_.EvictOldest();
  index_.Erase(b);
  ++stats_.evictions;
  return b;
}

// A partial last block shared with another holder must be copied before this
// sequence writes it.
bool BlockManager::Impl::NeedsCopy(const Sequence& s) const {
  return s.computed % options_.block_size != 0 &&
         pool_.ref_count(s.blocks.back()) > 1;
}

int64_t BlockManager::Impl::BlocksNeeded(const Sequence& s,
                                         int64_t num_tokens) const {
  const int64_t bs = options_.block_size;
  const int64_t end = s.computed + num_tokens;
  return (end + bs - 1) / bs - static_cast<int64_t>(s.blocks.size()) +
         (NeedsCopy(s) ? 1 : 0);
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

// Finds the longest run of cached full blocks of the prompt, leaving at least
// one token, and puts them in `s` (the caller acquires them once `s` is
// registered: this may throw std::bad_alloc and then must change nothing).
int64_t BlockManager::Impl::MatchPrefix(Sequence& s,
                                        absl::Span<const TokenId> prompt) {
  const int64_t bs = options_.block_size;
  const int64_t max_blocks = (static_cast<int64_t>(prompt.size()) - 1) / bs;
  BlockHash parent_hash = s.root_hash;
  uint64_t parent_id = s.root_id;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const absl::Span<const TokenId> tokens = prompt.subspan(i * bs, bs);
    const BlockHash h = Hash(parent_hash, tokens);
    const BlockId b = index_.Find(h);
    if (b < 0 || !index_.Matches(b, parent_id, tokens)) break;
    s.blocks.push_back(b);
    s.hashes.push_back(h);
    parent_hash = h;
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
  const size_t full = static_cast<size_t>(s.computed / bs);
  for (size_t i = s.hashes.size(); i < full; ++i) {
    const BlockHash& parent_hash = i == 0 ? s.root_hash : s.hashes[i - 1];
    const uint64_t parent_id = i == 0 ? s.root_id : s.chain_ids[i - 1];
    const absl::Span<const TokenId> tokens(&s.tokens[i * bs], bs);
    const BlockHash h = Hash(parent_hash, tokens);
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
    s.hashes.push_back(h);
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
  s.tokens.assign(prompt.begin(), prompt.end());
  if (options_.enable_prefix_caching) {
    s.root_hash = HashExtraKey(extra.adapter_id, extra.salt);
    s.root_id = index_.RootId(extra.adapter_id, extra.salt);
    s.computed = MatchPrefix(s, prompt);
  }
  sequences_.emplace(id, std::move(seq));
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
  const uint64_t epoch = ++batch_epoch_;
  int64_t needed = 0;
  for (const ReserveRequest& r : batch) {
    auto it = sequences_.find(r.sequence);
    if (it == sequences_.end()) {
      return absl::NotFoundError(
          absl::StrCat("sequence ", r.sequence, " not found"));
    }
    Sequence* s = it->second.get();
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
    needed += BlocksNeeded(*s, r.num_tokens);
    batch_.push_back(s);
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
  plan.sequences.reserve(batch.size());
  plan.num_tokens.reserve(batch.size());
  plan.copies.reserve(batch.size());
  int64_t total = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const ReserveRequest& r = batch[i];
    Sequence& s = *batch_[i];
    total += r.num_tokens;
    s.tokens.reserve(s.tokens.size() + r.new_token_ids.size());
    s.blocks.reserve(
        static_cast<size_t>((s.computed + r.num_tokens + bs - 1) / bs));
  }
  plan.slot_mapping.reserve(total);
  PlanRecord new_record;
  new_record.sequences = batch_;
  plan.id = next_plan_id_;
  plans_.emplace(plan.id, std::move(new_record));
  ++next_plan_id_;
  // From here on nothing can fail or allocate.
  for (size_t i = 0; i < batch.size(); ++i) {
    const ReserveRequest& r = batch[i];
    Sequence& s = *batch_[i];
    s.tokens_before = s.tokens.size();
    s.blocks_before = s.blocks.size();
    s.tokens.insert(s.tokens.end(), r.new_token_ids.begin(),
                    r.new_token_ids.end());
    if (NeedsCopy(s)) {
      const BlockId fresh = AllocateBlock();
      plan.copies.push_back(BlockCopy{s.blocks.back(), fresh});
      s.cow_src = s.blocks.back();  // Keeps its reference: the copy reads it.
      s.blocks.back() = fresh;
    }
    const int64_t end = s.computed + r.num_tokens;
    while (static_cast<int64_t>(s.blocks.size()) * bs < end)
      s.blocks.push_back(AllocateBlock());
    for (int64_t p = s.computed; p < end; ++p) {
      plan.slot_mapping.push_back(static_cast<int64_t>(s.blocks[p / bs]) * bs +
                                  p % bs);
    }
    s.plan_id = plan.id;
    s.plan_index = static_cast<int32_t>(i);
    s.reserved = r.num_tokens;
    plan.sequences.push_back(r.sequence);
    plan.num_tokens.push_back(r.num_tokens);
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
  // the hashes of every block this commit fills, in the sequences and in the
  // prefix-cache index.
  if (options_.enable_prefix_caching) {
    size_t new_full = 0;
    for (Sequence* s : it->second.sequences) {
      if (s == nullptr) continue;
      const size_t full = static_cast<size_t>((s->computed + s->reserved) /
                                              options_.block_size);
      s->hashes.reserve(full);
      s->chain_ids.reserve(full);
      new_full += full - std::min(full, s->hashes.size());
    }
    index_.Reserve(new_full);
  }
  // From here on nothing allocates.
  for (Sequence* s : it->second.sequences) {
    if (s == nullptr) continue;  // Freed since Reserve.
    if (s->cow_src >= 0) pool_.Release(s->cow_src);
    s->cow_src = -1;
    s->computed += s->reserved;
    s->reserved = 0;
    s->plan_id = 0;
    if (options_.enable_prefix_caching) HashNewFullBlocks(*s);
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
  const Sequence& registered = *c;
  sequences_.emplace(child, std::move(c));
  for (BlockId b : registered.blocks) pool_.Acquire(b);
  return absl::OkStatus();
}

absl::StatusOr<const Sequence*> BlockManager::Impl::Find(SequenceId id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end())
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  return it->second.get();
}

absl::StatusOr<BatchBlockTable> BlockManager::Impl::BatchTable(
    absl::Span<const SequenceId> ids) const {
  BatchBlockTable out;
  std::vector<const Sequence*> seqs;
  seqs.reserve(ids.size());
  for (SequenceId id : ids) {
    absl::StatusOr<const Sequence*> s = Find(id);
    if (!s.ok()) return s.status();
    seqs.push_back(*s);
    out.max_blocks =
        std::max(out.max_blocks, static_cast<int32_t>((*s)->blocks.size()));
  }
  out.num_sequences = static_cast<int32_t>(ids.size());
  out.table.assign(static_cast<size_t>(out.num_sequences) * out.max_blocks, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(),
              out.table.data() + i * out.max_blocks);
    out.num_blocks.push_back(static_cast<int32_t>(seqs[i]->blocks.size()));
    out.seq_lens.push_back(static_cast<int32_t>(seqs[i]->computed));
  }
  return out;
}

absl::StatusOr<int64_t> BlockManager::Impl::TokensThatFit(SequenceId id) const {
  absl::StatusOr<const Sequence*> found = Find(id);
  if (!found.ok()) return found.status();
  const Sequence& s = **found;
  if (s.plan_id != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, " already has an uncommitted reservation (plan ",
        s.plan_id, ")"));
  }
  const int64_t bs = options_.block_size;
  int64_t available = pool_.num_free() + pool_.num_cached();
  if (NeedsCopy(s) && --available < 0) return 0;
  const int64_t room_in_last =
      static_cast<int64_t>(s.blocks.size()) * bs - s.computed;
  return room_in_last + available * bs;
}

// ---- BlockManager: forwards to Impl
// ----------------------------------------------------------

absl::StatusOr<std::unique_ptr<BlockManager>> BlockManager::Create(
    const BlockManagerOptions& options) {
  if (options.num_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks ", options.num_blocks, " must be >= 1"));
  }
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size ", options.block_size, " must be >= 1"));
  }
  return std::unique_ptr<BlockManager>(
      new BlockManager(std::make_unique<Impl>(options)));
}

BlockManager::BlockManager(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
BlockManager::~BlockManager() = default;

absl::StatusOr<int64_t> BlockManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  return impl_->AddSequence(id, prompt, extra);
}
absl::StatusOr<StepPlan> BlockManager::Reserve(
    absl::Span<const ReserveRequest> batch) {
  return impl_->Reserve(batch);
}
absl::Status BlockManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  return impl_->CheckBatch(batch);
}
absl::Status BlockManager::Commit(uint64_t plan_id) {
  return impl_->Commit(plan_id);
}
absl::Status BlockManager::Abort(uint64_t plan_id) {
  return impl_->Abort(plan_id);
}
absl::Status BlockManager::Free(SequenceId id) { return impl_->Free(id); }
absl::Status BlockManager::Fork(SequenceId parent, SequenceId child) {
  return impl_->Fork(parent, child);
}

absl::StatusOr<absl::Span<const BlockId>> BlockManager::BlockTable(
    SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  if (!s.ok()) return s.status();
  return absl::Span<const BlockId>((*s)->blocks);
}
absl::StatusOr<int64_t> BlockManager::ComputedLength(SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  if (!s.ok()) return s.status();
  return (*s)->computed;
}
absl::StatusOr<int64_t> BlockManager::KnownLength(SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  if (!s.ok()) return s.status();
  return static_cast<int64_t>((*s)->tokens.size());
}
absl::StatusOr<BatchBlockTable> BlockManager::BatchTable(
    absl::Span<const SequenceId> ids) const {
  return impl_->BatchTable(ids);
}
absl::StatusOr<int64_t> BlockManager::TokensThatFit(SequenceId id) const {
  return impl_->TokensThatFit(id);
}
uint64_t BlockManager::PendingPlan(SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  return s.ok() ? (*s)->plan_id : 0;
}
bool BlockManager::Contains(SequenceId id) const {
  return impl_->Find(id).ok();
}
int64_t BlockManager::num_sequences() const { return impl_->num_sequences(); }

PoolUsage BlockManager::Usage() const {
  const internal::BlockPool& pool = impl_->pool();
  return PoolUsage{pool.num_blocks(), pool.num_free(), pool.num_cached(),
                   pool.num_used()};
}
PrefixCacheStats BlockManager::PrefixStats() const { return impl_->stats(); }
const BlockManagerOptions& BlockManager::options() const {
  return impl_->options();
}
absl::Status BlockManager::Validate() const { return impl_->Validate(); }

}  // namespace kvcache
