// BlockManager: taking tokens back - rejected draft tokens (Commit with
// accepted counts), a sequence leaving a plan (RemoveFromPlan), committed
// tokens rewound (Truncate) - and the side-effect-free prefix lookup
// (PeekPrefix). See block_manager.h for the contracts.
//
// What a rollback may touch, and why nothing it drops was ever visible:
//
//   rejected drafts   the plan's blocks past the accepted tokens were fresh
//                     (allocated or copied by Reserve, ref 1, unhashed): they
//                     go back to the free list. Hashing happens afterwards,
//                     in Commit, and only for blocks full of accepted tokens.
//   RemoveFromPlan    as Abort, for one sequence.
//   Truncate          committed blocks: released by reference (a shared or
//                     registered block stays with its other holders or in
//                     the cache); a new partial tail that is shared or
//                     registered is copied before the next write.

#include <algorithm>
#include <vector>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_manager.h"

namespace kvcache {

using internal::PlanRecord;
using internal::Sequence;

void BlockManager::RollBack(Sequence& s, int64_t accepted) {
  ABSL_ASSERT(accepted >= 0 && accepted <= s.reserved);
  const int64_t end = s.computed + accepted;
  // The blocks past `keep` were allocated by this plan (keep is at least
  // the blocks before it; a copy-on-write copy is the last of those).
  const size_t keep = static_cast<size_t>(math_.CeilDiv(end));
  for (size_t j = s.blocks.size(); j > keep; --j)
    pool_.Release(s.blocks[j - 1]);
  if (s.blocks.size() > keep) ++s.table_version;
  s.blocks.resize(keep);
  s.tail_block = s.blocks.empty() ? -1 : s.blocks.back();
  s.tokens.resize(
      static_cast<size_t>(end - int64_t{s.prefix_blocks} * math_.size()));
  const size_t full = static_cast<size_t>(math_.Div(end));
  if (s.hashes.size() > full) s.hashes.resize(full);
  s.reserved = accepted;
}

absl::Status BlockManager::Commit(uint64_t plan_id,
                                  absl::Span<const int64_t> accepted) {
  const internal::PlanRecords::InFlight plan = plans_.Find(plan_id);
  if (plan.record == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("plan ", plan_id,
                     " not found (unknown, or already committed or aborted)"));
  }
  const std::vector<Sequence*>& seqs = plan.record->sequences;
  if (accepted.size() != seqs.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "commit of plan ", plan_id, " with ", accepted.size(),
        " accepted counts, expected one per sequence: ", seqs.size()));
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence* s = seqs[i];
    if (s == nullptr) continue;  // Freed or removed: ignored.
    if (accepted[i] < 0 || accepted[i] > s->reserved) {
      return absl::InvalidArgumentError(absl::StrCat(
          "commit of plan ", plan_id, ": accepted[", i, "] = ", accepted[i],
          " for sequence ", s->id, ", expected 0 to its ", s->reserved,
          " reserved tokens"));
    }
  }
  PrepareCommit(*plan.record);  // May throw, changing nothing.
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i] != nullptr && accepted[i] < seqs[i]->reserved)
      RollBack(*seqs[i], accepted[i]);
  }
  FinishCommit(plan);
  return absl::OkStatus();
}

absl::Status BlockManager::RemoveFromPlan(uint64_t plan_id, SequenceId id) {
  PlanRecord* record = plans_.FindRecord(plan_id);
  if (record == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("plan ", plan_id,
                     " not found (unknown, or already committed or aborted)"));
  }
  Sequence* s = sequences_.Find(id);
  if (s == nullptr) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  if (s->plan_id != plan_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, " is not in plan ", plan_id,
        s->plan_id == 0 ? std::string(" (it is in none)")
                        : absl::StrCat(" (it is in plan ", s->plan_id, ")")));
  }
  auto pos = std::find(record->sequences.begin(), record->sequences.end(), s);
  ABSL_ASSERT(pos != record->sequences.end());
  const size_t i = static_cast<size_t>(pos - record->sequences.begin());
  Unreserve(*s, record->tokens_before[i]);
  *pos = nullptr;
  return absl::OkStatus();
}

absl::Status BlockManager::Truncate(SequenceId id, int64_t new_length) {
  Sequence* s = sequences_.Find(id);
  if (s == nullptr) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  if (s->plan_id != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("truncate of sequence ", id, " while plan ", s->plan_id,
                     " is in flight: commit or abort it first"));
  }
  if (new_length < 0 || new_length > s->computed) {
    return absl::InvalidArgumentError(absl::StrCat(
        "truncate of sequence ", id, " to ", new_length,
        " tokens, expected 0 to its ", s->computed, " computed tokens"));
  }
  const int64_t bs = math_.size();
  const int64_t full = math_.Div(new_length);
  const int64_t rest = math_.Mod(new_length);
  const int64_t prefix_tokens = int64_t{s->prefix_blocks} * bs;
  // Allocate first (may throw std::bad_alloc, changing nothing): a new tail
  // inside the prefix-hit blocks needs its token ids, which only the prefix
  // cache holds (StoredTokens: a prefix-hit block held by a live sequence
  // keeps them).
  std::vector<TokenId> tail_tokens;
  if (new_length < prefix_tokens && rest != 0) {
    const TokenId* stored = prefix_.StoredTokens(s->blocks[full]);
    tail_tokens.assign(stored, stored + rest);
  }
  // From here on nothing allocates.
  if (new_length >= prefix_tokens) {
    s->tokens.resize(static_cast<size_t>(new_length - prefix_tokens));
  } else {
    s->prefix_blocks = static_cast<int32_t>(full);
    s->tokens.swap(tail_tokens);
  }
  const size_t keep = static_cast<size_t>(math_.CeilDiv(new_length));
  // The tail first, so that once cached the chain's last blocks go first.
  for (size_t j = s->blocks.size(); j > keep; --j)
    pool_.Release(s->blocks[j - 1]);
  if (s->blocks.size() > keep) ++s->table_version;
  s->blocks.resize(keep);
  s->tail_block = s->blocks.empty() ? -1 : s->blocks.back();
  if (prefix_.enabled()) prefix_.Rewind(*s, full);
  s->computed = new_length;
  // A partial tail may be shared (fork, prefix hit) or registered: Reserve
  // then copies it (BatchReserver::NeedsCopy).
  if (rest != 0) s->tail_maybe_shared = true;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> BlockManager::PeekPrefix(
    absl::Span<const TokenId> prompt, const ExtraKey& extra) const {
  if (prompt.empty()) {
    return absl::InvalidArgumentError(
        "peek of an empty prompt, expected at least 1 token");
  }
  return prefix_.Peek(prompt, extra, pool_);
}

}  // namespace kvcache
