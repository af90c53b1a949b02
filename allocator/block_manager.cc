// BlockManager: sequences (AddSequence, Free, Fork) and the prefix cache
// (matching a prompt, registering filled blocks). Reserve, Commit and Abort
// are in block_manager_step.cc.

#include "allocator/block_manager.h"

#include <algorithm>
#include <utility>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_manager_impl.h"

namespace kvcache {

using internal::ReserveGeometric;
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

}  // namespace

// ---- Blocks ----------------------------------------------------------------

BlockId BlockManager::Impl::AllocateBlock() {
  if (pool_.num_free() > 0) return pool_.AllocateFree();
  const BlockId b = pool_.EvictOldest();
  index_.Erase(b);
  ++stats_.evictions;
  return b;
}

// Releases the tail first so that, once cached, a chain's last blocks are
// evicted before its first.
void BlockManager::Impl::ReleaseAll(Sequence& s) {
  if (s.cow_src >= 0) pool_.Release(s.cow_src);
  s.cow_src = -1;
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it)
    pool_.Release(*it);
  s.blocks.clear();
  s.tail_block = -1;
}

// ---- Prefix cache ----------------------------------------------------------

// Hashes every full block of the prompt (Commit reuses them) and finds the
// longest run of cached ones, leaving at least one token to compute: puts
// them in `s` (their token ids stay out of s.tokens) and returns how many.
// Changes nothing but `s`. May throw std::bad_alloc.
int64_t BlockManager::Impl::MatchPrefix(
    Sequence& s, absl::Span<const TokenId> prompt) const {
  const int64_t bs = options_.block_size;
  const size_t max_blocks = (prompt.size() - 1) / bs;
  s.hashes.reserve(prompt.size() / bs);
  s.blocks.resize(max_blocks);  // Shrunk to the match below.
  const int64_t full = static_cast<int64_t>(prompt.size()) / bs;
  int64_t matched;
  if (bs == 16 && options_.hash_function_for_testing == nullptr) {
    matched = index_.HashAndMatch16(s.root_hash, prompt.data(), full,
                                    max_blocks, s.root_id, s.hashes,
                                    s.blocks.data(), s.last_chain_id);
  } else {
    HashChain(s.root_hash, prompt.data(), full, s.hashes);
    matched = index_.LongestMatch(s.hashes.data(), prompt.data(), max_blocks,
                                  s.root_id, s.blocks.data(), s.last_chain_id);
  }
  s.blocks.resize(matched);
  s.chained_blocks = matched;
  s.prefix_blocks = static_cast<int32_t>(matched);
  s.tail_block = matched == 0 ? -1 : s.blocks.back();
  s.computed = matched * bs;
  return matched;
}

// Hashes the blocks that the commit of `s`'s reservation fills and prefetches
// the index and pool entries that HashNewFullBlocks then reads and writes.
// REQUIRES: s.hashes has the capacity for them.
void BlockManager::Impl::PrepareRegistration(Sequence& s) const {
  const int64_t bs = options_.block_size;
  const size_t full = static_cast<size_t>(math_.Div(s.computed + s.reserved));
  for (size_t i = s.hashes.size(); i < full; ++i) {
    s.hashes.push_back(
        Hash(i == 0 ? s.root_hash : s.hashes[i - 1],
             absl::Span<const TokenId>(s.token(i * bs, bs), bs)));
  }
  for (size_t i = s.chained_blocks; i < full; ++i) {
    index_.Prefetch(s.hashes[i]);
    index_.PrefetchBlock(s.blocks[i]);
    pool_.Prefetch(s.blocks[i]);
  }
}

// Registers the blocks that the last commit filled. A block whose content is
// already registered under another block (or whose hash collides with different
// content) stays unhashed.
// REQUIRES: s.hashes has the capacity for every full block.
void BlockManager::Impl::HashNewFullBlocks(Sequence& s) {
  const int64_t bs = options_.block_size;
  const size_t full = static_cast<size_t>(math_.Div(s.computed));
  for (size_t i = s.chained_blocks; i < full; ++i) {
    const uint64_t parent_id = s.last_chain_id;
    const TokenId* tokens = s.token(i * bs, bs);
    if (s.hashes.size() == i) {
      s.hashes.push_back(Hash(i == 0 ? s.root_hash : s.hashes[i - 1],
                              absl::Span<const TokenId>(tokens, bs)));
    }
    const BlockHash& h = s.hashes[i];
    const BlockId b = s.blocks[i];
    ABSL_ASSERT(!pool_.hashed(b) && pool_.ref_count(b) == 1);
    uint64_t chain_id;
    const BlockId existing =
        index_.FindOrInsert(h, b, parent_id, tokens, chain_id);
    if (existing < 0) {
      pool_.MarkHashed(b);  // Registered: chain_id is its content id.
    } else if (index_.Matches(existing, parent_id, tokens)) {
      // Same content: children may chain to it.
      chain_id = index_.content_id(existing);
    } else {
      // A collision: this chain can never be matched.
      chain_id = index_.NewId();
    }
    s.last_chain_id = chain_id;
    s.chained_blocks = i + 1;
  }
}

// ---- Sequences -------------------------------------------------------------

absl::StatusOr<int64_t> BlockManager::Impl::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  if (prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": prompt is empty, expected at least 1 token"));
  }
  if (by_id_.Find(id) != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("sequence ", id, " already exists"));
  }
  // Everything that allocates (and so may throw std::bad_alloc) happens first,
  // on a sequence of our own, up to its registration; the pool changes only
  // after.
  auto seq = std::make_unique<Sequence>();
  Sequence& s = *seq;
  s.id = id;
  const bool caching = options_.enable_prefix_caching;
  if (caching) {
    s.root_hash = HashExtraKey(extra.adapter_id, extra.salt);
    s.root_id = index_.AcquireRoot(extra.adapter_id, extra.salt);
  }
  const uint64_t root_id = s.root_id;  // `s` may be gone if emplace throws.
  try {
    if (caching) MatchPrefix(s, prompt);
    AppendTokens(s.tokens, prompt.subspan(s.computed));
    by_id_.Reserve(sequences_.size() + 1);
    sequences_.emplace(id, std::move(seq));
  } catch (...) {  // std::bad_alloc: give the root reference back.
    if (caching) index_.ReleaseRoot(root_id);
    throw;
  }
  by_id_.Insert(id, &s);
  ++generation_;
  // From here on nothing allocates.
  if (!caching) return 0;
  pool_.AcquireAll(s.blocks.data(), s.blocks.size());
  ++stats_.queries;
  stats_.query_tokens += static_cast<int64_t>(prompt.size());
  stats_.hit_tokens += s.computed;
  return s.computed;
}

absl::Status BlockManager::Impl::Free(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end())
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  Sequence& s = *it->second;
  if (s.plan_id != 0) {  // Cancel its part of the plan.
    auto plan = plans_.find(s.plan_id);
    ABSL_ASSERT(plan != plans_.end());
    std::vector<Sequence*>& listed = plan->second->sequences;
    auto pos = std::find(listed.begin(), listed.end(), &s);
    ABSL_ASSERT(pos != listed.end());
    *pos = nullptr;
  }
  ReleaseAll(s);
  if (s.root_id != 0) index_.ReleaseRoot(s.root_id);
  by_id_.Erase(id);
  sequences_.erase(it);
  ++generation_;
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::Fork(SequenceId parent, SequenceId child) {
  Sequence* p = by_id_.Find(parent);
  if (p == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("fork: parent sequence ", parent, " not found"));
  }
  if (p->plan_id != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fork: parent sequence ", parent,
        " has an uncommitted reservation (plan ", p->plan_id, ")"));
  }
  if (by_id_.Find(child) != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("fork: child sequence ", child, " already exists"));
  }
  // Copy and register the child first (may throw std::bad_alloc with nothing
  // changed), then take the references.
  auto c = std::make_unique<Sequence>(*p);
  c->id = child;
  c->tail_maybe_shared = true;  // Both now hold the partial last block.
  Sequence& registered = *c;
  by_id_.Reserve(sequences_.size() + 1);
  sequences_.emplace(child, std::move(c));
  by_id_.Insert(child, &registered);
  ++generation_;
  p->tail_maybe_shared = true;
  for (BlockId b : registered.blocks) pool_.Acquire(b);
  if (registered.root_id != 0) index_.AcquireRoot(registered.root_id);
  return absl::OkStatus();
}

}  // namespace kvcache
