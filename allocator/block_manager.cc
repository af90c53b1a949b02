// BlockManager: the coordinator of its parts (see block_manager.h). Sequences
// come and go (AddSequence, Fork, Free), steps end (Commit, Abort), and the
// invariants that span several parts are checked here (Validate); Reserve is
// BatchReserver's.

#include "allocator/block_manager.h"

#include <algorithm>
#include <utility>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"

namespace kvcache {

using internal::PlanRecord;
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

absl::Status SequenceNotFound(SequenceId id) {
  return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
}

absl::Status PlanNotFound(uint64_t plan_id) {
  return absl::NotFoundError(
      absl::StrCat("plan ", plan_id,
                   " not found (unknown, or already committed or aborted)"));
}

internal::PrefixCache::Options PrefixOptions(const BlockManagerOptions& o) {
  internal::PrefixCache::Options p;
  p.num_blocks = o.num_blocks;
  p.block_size = o.block_size;
  p.enabled = o.enable_prefix_caching;
  p.hash_function = o.hash_function_for_testing;
  p.observer = o.observer;
  p.host_slots = o.host_tier_blocks;
  p.offload_min_hits = o.tier_offload_min_hits;
  p.hold_offloaded = o.tier_hold_offloaded;
  p.offload_ahead_blocks = o.tier_offload_ahead_blocks;
  return p;
}

}  // namespace

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
  if (options.host_tier_blocks < 0 ||
      (options.host_tier_blocks > 0 && !options.enable_prefix_caching)) {
    return absl::InvalidArgumentError(
        absl::StrCat("host_tier_blocks ", options.host_tier_blocks,
                     " must be >= 0, and 0 without prefix caching"));
  }
  if (options.tier_offload_min_hits < 0 ||
      options.tier_offload_min_hits > internal::PrefixCache::kMaxHitCount) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tier_offload_min_hits ", options.tier_offload_min_hits,
        " must be in [0, ", internal::PrefixCache::kMaxHitCount, "]"));
  }
  return std::unique_ptr<BlockManager>(new BlockManager(options));
}

BlockManager::BlockManager(const BlockManagerOptions& options)
    : options_(options),
      math_(options.block_size),
      pool_(options.num_blocks),
      prefix_(PrefixOptions(options)),
      reserver_(options.block_size, options.max_blocks_per_sequence, sequences_,
                pool_, prefix_, plans_) {}

BlockManager::~BlockManager() = default;

// ---- Sequences -------------------------------------------------------------

absl::StatusOr<int64_t> BlockManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra,
    PrefixHitSplit* split) {
  prefix_.ClearCopies();
  if (split != nullptr) *split = PrefixHitSplit{};
  if (prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": prompt is empty, expected at least 1 token"));
  }
  if (sequences_.Find(id) != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("sequence ", id, " already exists"));
  }
  if (const int64_t blocks = math_.CeilDiv(static_cast<int64_t>(prompt.size()));
      blocks > pool_.num_blocks()) {
    return reserver_.CheckNeverFits(
        blocks, absl::StrCat("sequence ", id, " (a prompt of ", prompt.size(),
                             " tokens)"));
  }
  // Everything that allocates (and so may throw std::bad_alloc) happens first,
  // on a sequence of our own, up to its registration; the pool changes only
  // after.
  auto seq = std::make_unique<Sequence>();
  Sequence* s = seq.get();
  s->id = id;
  const bool caching = prefix_.enabled();
  if (caching) prefix_.AcquireRoot(extra, *s);
  const uint64_t root_id = s->root_id;  // `s` is gone if Insert throws.
  try {
    if (caching) prefix_.Match(*s, prompt, pool_);
    AppendTokens(s->tokens, prompt.subspan(s->computed));
    sequences_.Insert(std::move(seq));
  } catch (...) {  // std::bad_alloc: give the root reference back.
    if (caching) prefix_.ReleaseRoot(root_id);
    throw;
  }
  // From here on nothing allocates.
  if (!caching) return 0;
  int64_t onboarded = 0;
  if (!prefix_.has_tier()) {
    pool_.AcquireAll(s->blocks.data(), s->blocks.size());
  } else {
    for (BlockId b : s->blocks) {
      if (b >= 0) pool_.Acquire(b);
    }
    prefix_.NoteHits(*s);  // Before Onboard: its blocks count one hit each.
    onboarded = prefix_.Onboard(*s, pool_);
    prefix_.Flush();
  }
  prefix_.CountQuery(static_cast<int64_t>(prompt.size()), s->computed);
  if (split != nullptr) {
    split->host_tokens = onboarded * options_.block_size;
    split->device_tokens = s->computed - split->host_tokens;
  }
  return s->computed;
}

void BlockManager::ReleaseAll(Sequence& s) {
  if (s.cow_src >= 0) pool_.Release(s.cow_src);
  s.cow_src = -1;
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it)
    pool_.Release(*it);
  if (!s.blocks.empty()) ++s.table_version;
  s.blocks.clear();
  s.tail_block = -1;
}

absl::Status BlockManager::Free(SequenceId id) {
  Sequence* s = sequences_.Find(id);
  if (s == nullptr) return SequenceNotFound(id);
  if (s->plan_id != 0) {  // Cancel its part of the plan.
    PlanRecord* plan = plans_.FindRecord(s->plan_id);
    ABSL_ASSERT(plan != nullptr);
    std::vector<Sequence*>& listed = plan->sequences;
    auto pos = std::find(listed.begin(), listed.end(), s);
    ABSL_ASSERT(pos != listed.end());
    *pos = nullptr;
  }
  ReleaseAll(*s);
  if (s->root_id != 0) prefix_.ReleaseRoot(s->root_id);
  sequences_.Erase(id);
  return absl::OkStatus();
}

absl::Status BlockManager::Fork(SequenceId parent, SequenceId child) {
  Sequence* p = sequences_.Find(parent);
  if (p == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("fork: parent sequence ", parent, " not found"));
  }
  if (p->plan_id != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fork: parent sequence ", parent,
        " has an uncommitted reservation (plan ", p->plan_id, ")"));
  }
  if (sequences_.Find(child) != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("fork: child sequence ", child, " already exists"));
  }
  // Copy and register the child first (may throw std::bad_alloc with nothing
  // changed), then take the references.
  auto c = std::make_unique<Sequence>(*p);
  c->id = child;
  c->tail_maybe_shared = true;  // Both now hold the partial last block.
  Sequence& registered = sequences_.Insert(std::move(c));
  p->tail_maybe_shared = true;
  for (BlockId b : registered.blocks) pool_.Acquire(b);
  if (registered.root_id != 0) prefix_.AcquireRoot(registered.root_id);
  return absl::OkStatus();
}

// ---- The end of a step -----------------------------------------------------

absl::StatusOr<StepPlan> BlockManager::Reserve(
    absl::Span<const ReserveRequest> batch) {
  prefix_.ClearCopies();
  absl::StatusOr<StepPlan> plan = reserver_.Reserve(batch);
  prefix_.set_hold_allowance(0);
  prefix_.Flush();  // The blocks it evicted.
  return plan;
}

absl::Status BlockManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  return reserver_.CanReserve(batch);
}

absl::Status BlockManager::Commit(uint64_t plan_id) {
  const internal::PlanRecords::InFlight plan = plans_.Find(plan_id);
  if (plan.record == nullptr) return PlanNotFound(plan_id);
  PrepareCommit(*plan.record);
  FinishCommit(plan);
  return absl::OkStatus();
}

void BlockManager::PrepareCommit(const PlanRecord& record) {
  // Allocate first (may throw std::bad_alloc with nothing changed): room for
  // the hashes of every block this commit fills. (The prefix-cache index has a
  // fixed capacity and never allocates.)
  for (int32_t k : record.fillers) {
    Sequence* s = record.sequences[k];
    if (s == nullptr) continue;  // Freed since Reserve.
    const size_t full =
        static_cast<size_t>(math_.Div(s->computed + s->reserved));
    ReserveGeometric(s->hashes, full);
  }
}

void BlockManager::FinishCommit(internal::PlanRecords::InFlight plan) {
  const std::vector<Sequence*>& seqs = plan.record->sequences;
  const std::vector<int32_t>& fillers = plan.record->fillers;
  // Nothing allocates. Hash the filled blocks first and prefetch what
  // registering them touches, so that those misses overlap.
  for (int32_t k : fillers) {
    if (seqs[k] != nullptr) prefix_.PrepareRegistration(*seqs[k], pool_);
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (i + 16 < seqs.size()) __builtin_prefetch(seqs[i + 16], /*rw=*/1);
    Sequence* s = seqs[i];
    if (s == nullptr) continue;
    if (s->cow_src >= 0) {
      pool_.Release(s->cow_src);
      s->cow_src = -1;
    }
    s->computed += s->reserved;
    s->reserved = 0;
    s->plan_id = 0;
  }
  for (int32_t k : fillers) {
    if (seqs[k] != nullptr) prefix_.TouchRegistration(*seqs[k]);
  }
  // The blocks that became full get their chained hash, in batch order.
  for (int32_t k : fillers) {
    if (seqs[k] != nullptr) prefix_.RegisterFilled(*seqs[k], pool_);
  }
  plans_.Retire(plan);
  prefix_.Flush();  // The blocks it registered.
}

void BlockManager::Unreserve(Sequence& s, size_t tokens_before) {
  const size_t blocks_before = static_cast<size_t>(math_.CeilDiv(s.computed));
  for (size_t j = s.blocks.size(); j > blocks_before; --j)
    pool_.Release(s.blocks[j - 1]);
  if (s.blocks.size() > blocks_before || s.cow_src >= 0) ++s.table_version;
  s.blocks.resize(blocks_before);
  if (s.cow_src >= 0) {
    pool_.Release(s.blocks.back());
    s.blocks.back() = s.cow_src;
    s.cow_src = -1;
    s.tail_maybe_shared = true;
  }
  s.tail_block = s.blocks.empty() ? -1 : s.blocks.back();
  s.tokens.resize(tokens_before);
  s.reserved = 0;
  s.plan_id = 0;
}

absl::Status BlockManager::Abort(uint64_t plan_id) {
  const internal::PlanRecords::InFlight plan = plans_.Find(plan_id);
  if (plan.record == nullptr) return PlanNotFound(plan_id);
  const PlanRecord* record = plan.record;
  for (size_t i = record->sequences.size(); i-- > 0;) {
    Sequence* s = record->sequences[i];
    if (s != nullptr) Unreserve(*s, record->tokens_before[i]);
  }
  plans_.Retire(plan);
  return absl::OkStatus();
}

absl::Status BlockManager::ResetPrefixCache() {
  if (plans_.num_in_flight() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("reset of the prefix cache while ", plans_.num_in_flight(),
                     " plans are in flight: commit or abort them first"));
  }
  if (prefix_.enabled()) prefix_.Clear(pool_, sequences_);
  return absl::OkStatus();
}

// ---- Host tier -------------------------------------------------------------

void BlockManager::DropFailedOffloads(absl::Span<const TierCopy> copies,
                                      bool reused_only) {
  if (!prefix_.has_tier()) return;
  prefix_.DropOffloaded(copies, reused_only);
  // Nothing reads the held blocks of the failed batch: free them now.
  prefix_.ReleaseOffloaded(0, pool_, /*all=*/true);
  prefix_.Flush();
}

absl::Status BlockManager::DropFailedOnboards(
    SequenceId id, absl::Span<const TierCopy> copies) {
  if (sequences_.Find(id) == nullptr) return SequenceNotFound(id);
  if (prefix_.has_tier()) prefix_.DropOnboarded(copies, pool_);
  absl::Status freed = Free(id);
  prefix_.Flush();
  return freed;
}

TierUsage BlockManager::HostTierUsage() const {
  const internal::HostTier* tier = prefix_.tier();
  if (tier == nullptr) return TierUsage{};
  return TierUsage{tier->num_slots(), tier->num_stored()};
}

// ---- Lookups ---------------------------------------------------------------

absl::StatusOr<absl::Span<const BlockId>> BlockManager::BlockTable(
    SequenceId id) const {
  const Sequence* s = Find(id);
  if (s == nullptr) return SequenceNotFound(id);
  return absl::Span<const BlockId>(s->blocks);
}

absl::StatusOr<BlockTableRef> BlockManager::BlockTableWithVersion(
    SequenceId id) const {
  const Sequence* s = Find(id);
  if (s == nullptr) return SequenceNotFound(id);
  return BlockTableRef{absl::Span<const BlockId>(s->blocks), s->serial,
                       s->table_version};
}

uint64_t BlockManager::FirstPendingPlan(absl::Span<const ReserveRequest> batch,
                                        size_t* index) const {
  sequences_.PrepareLookups(batch.size());
  size_t valid = sequences_.cache_valid();
  for (size_t i = 0; i < batch.size(); ++i) {
    const Sequence* s = sequences_.LookupAt(i, batch[i].sequence, valid);
    if (s != nullptr && s->plan_id != 0) {
      *index = i;
      return s->plan_id;
    }
  }
  return 0;
}

absl::Status BlockManager::BatchTablesWithVersion(
    absl::Span<const SequenceId> ids, absl::Span<BlockTableRef> out) const {
  sequences_.PrepareLookups(ids.size());
  size_t valid = sequences_.cache_valid();
  for (size_t i = 0; i < ids.size(); ++i) {
    const Sequence* s = sequences_.LookupAt(i, ids[i], valid);
    if (s == nullptr) return SequenceNotFound(ids[i]);
    out[i] = BlockTableRef{absl::Span<const BlockId>(s->blocks), s->serial,
                           s->table_version};
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> BlockManager::ComputedLength(SequenceId id) const {
  const Sequence* s = Find(id);
  if (s == nullptr) return SequenceNotFound(id);
  return s->computed;
}

absl::StatusOr<int64_t> BlockManager::KnownLength(SequenceId id) const {
  const Sequence* s = Find(id);
  if (s == nullptr) return SequenceNotFound(id);
  return s->known(options_.block_size);
}

absl::StatusOr<HostBatchTable> BlockManager::BatchTable(
    absl::Span<const SequenceId> ids) const {
  HostBatchTable out;
  std::vector<const Sequence*> seqs;
  seqs.reserve(ids.size());
  for (SequenceId id : ids) {
    const Sequence* s = Find(id);
    if (s == nullptr) return SequenceNotFound(id);
    seqs.push_back(s);
    out.max_blocks =
        std::max(out.max_blocks, static_cast<int32_t>(s->blocks.size()));
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

absl::StatusOr<int64_t> BlockManager::TokensThatFit(SequenceId id) const {
  const Sequence* s = Find(id);
  if (s == nullptr) return SequenceNotFound(id);
  if (s->plan_id != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, " already has an uncommitted reservation (plan ",
        s->plan_id, ")"));
  }
  const int64_t bs = options_.block_size;
  int64_t available = pool_.num_free() + pool_.num_cached();
  if (reserver_.NeedsCopy(*s) && --available < 0) return 0;
  const int64_t room_in_last =
      static_cast<int64_t>(s->blocks.size()) * bs - s->computed;
  return room_in_last + available * bs;
}

bool BlockManager::Contains(SequenceId id) const { return Find(id) != nullptr; }

uint64_t BlockManager::PendingPlan(SequenceId id) const {
  const Sequence* s = Find(id);
  return s != nullptr ? s->plan_id : 0;
}

int64_t BlockManager::num_sequences() const {
  return static_cast<int64_t>(sequences_.size());
}

size_t BlockManager::num_prefix_roots() const { return prefix_.num_roots(); }

PoolUsage BlockManager::Usage() const {
  return PoolUsage{pool_.num_blocks(), pool_.num_free(), pool_.num_cached(),
                   pool_.num_used()};
}

PrefixCacheStats BlockManager::PrefixStats() const { return prefix_.stats(); }

const BlockManagerOptions& BlockManager::options() const { return options_; }

std::vector<BlockHash> BlockManager::RegisteredHashesForTesting(
    BlockMedium medium) const {
  return prefix_.RegisteredHashes(medium);
}

bool BlockManager::BlockHashedForTesting(BlockId block) const {
  return block >= 0 && block < pool_.num_blocks() && pool_.hashed(block);
}

// ---- Validate: what spans several parts ------------------------------------

// The blocks a sequence holds (counted in `refs`), its plan, its tail's
// sharing and its prefix-cache chain.
absl::Status BlockManager::ValidateSequence(const Sequence& s,
                                            std::vector<int32_t>& refs) const {
  const std::string name = absl::StrCat("sequence ", s.id, ": ");
  if (s.plan_id != 0 && plans_.FindRecord(s.plan_id) == nullptr) {
    return absl::InternalError(
        absl::StrCat(name, "plan ", s.plan_id, " does not exist"));
  }
  for (BlockId b : s.blocks) {
    if (b < 0 || b >= pool_.num_blocks())
      return absl::InternalError(absl::StrCat(name, "block ", b));
    ++refs[b];
  }
  if (s.cow_src >= 0) ++refs[s.cow_src];
  // A partial last block that says it is this sequence's alone
  // (tail_maybe_shared false) has no other holder.
  if (!s.tail_maybe_shared && s.tail_block >= 0 &&
      math_.Mod(s.computed + s.reserved) != 0 &&
      (pool_.ref_count(s.tail_block) != 1 || pool_.hashed(s.tail_block))) {
    return absl::InternalError(absl::StrCat(
        name, "partial tail block ", s.tail_block, " has ",
        pool_.ref_count(s.tail_block), " holders (hashed ",
        pool_.hashed(s.tail_block),
        ") but is marked as not shared: a write would reach others"));
  }
  if (prefix_.enabled()) return prefix_.ValidateChain(s, name);
  return absl::OkStatus();
}

// Every plan lists each of its sequences exactly once (and every sequence with
// a plan is listed by it, given ValidateSequence's check that its plan exists).
absl::Status BlockManager::ValidatePlans() const {
  if (absl::Status status = plans_.Validate(); !status.ok()) return status;
  std::vector<const Sequence*> all;
  absl::Status status;
  plans_.ForEach([&](uint64_t plan_id, const PlanRecord& record) {
    for (const Sequence* s : record.sequences) {
      if (s == nullptr) continue;
      if (s->plan_id != plan_id && status.ok()) {
        status = absl::InternalError(
            absl::StrCat("plan ", plan_id, " lists sequence ", s->id,
                         " whose plan is ", s->plan_id));
      }
      all.push_back(s);
    }
  });
  if (!status.ok()) return status;
  std::sort(all.begin(), all.end());
  if (auto twice = std::adjacent_find(all.begin(), all.end());
      twice != all.end()) {
    return absl::InternalError(
        absl::StrCat("sequence ", (*twice)->id, " is listed twice by plans"));
  }
  size_t pending = 0;
  sequences_.ForEach([&](const Sequence& s) { pending += s.plan_id != 0; });
  if (pending != all.size()) {
    return absl::InternalError(absl::StrCat(
        pending, " sequences have a plan but plans list ", all.size()));
  }
  return absl::OkStatus();
}

absl::Status BlockManager::Validate() const {
  if (absl::Status s = pool_.Validate(); !s.ok()) return s;
  if (absl::Status s = sequences_.Validate(options_.block_size); !s.ok())
    return s;
  std::vector<int32_t> refs(pool_.num_blocks(), 0);
  absl::Status status;
  sequences_.ForEach([&](const Sequence& s) {
    if (status.ok()) status = ValidateSequence(s, refs);
  });
  if (!status.ok()) return status;
  prefix_.ForEachHeld([&](BlockId b) { ++refs[b]; });  // Held offloads.
  for (BlockId b = 0; b < pool_.num_blocks(); ++b) {
    if (refs[b] != pool_.ref_count(b)) {
      return absl::InternalError(absl::StrCat("block ", b, " has ref count ",
                                              pool_.ref_count(b), " but ",
                                              refs[b], " holders"));
    }
  }
  if (absl::Status s = ValidatePlans(); !s.ok()) return s;
  if (absl::Status s = prefix_.ValidateIndex(pool_); !s.ok()) return s;
  if (absl::Status s = prefix_.ValidateTier(); !s.ok()) return s;
  return prefix_.enabled() ? prefix_.ValidateRoots(sequences_)
                           : absl::OkStatus();
}

}  // namespace kvcache
