// GroupBlockManager: sharing a sequence (Fork) and taking tokens back -
// rejected draft tokens (Commit with accepted counts), a sequence leaving a
// plan (RemoveFromPlan), committed tokens rewound (Truncate). See
// group_block_manager.h for the contracts.
//
// Per table, as BlockManager (allocator/block_manager_rewind.cc):
//
//   Fork              every non-null entry gains a reference; the child's
//                     released entries stay kNullBlock. A shared partial
//                     last block is copied at the next Reserve.
//   rejected drafts   the plan's pages past the accepted tokens were fresh
//                     (ref 1, unhashed): they go back to the free list.
//                     Hashing happens afterwards, in Commit, and only for
//                     blocks full of accepted tokens.
//   RemoveFromPlan    as Abort, for one sequence.
//   Truncate          committed blocks: released by reference (a shared or
//                     registered block stays with its other holders or in
//                     the cache); a now-partial last block that is shared or
//                     registered is copied at the next Reserve. A sliding
//                     table cannot take back a block it released, so a
//                     length whose window reaches one is refused.

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "allocator/group_block_manager.h"

namespace kvcache {

absl::Status GroupBlockManager::Fork(SequenceId parent, SequenceId child) {
  auto p = sequences_.find(parent);
  if (p == sequences_.end()) {
    return absl::NotFoundError(
        absl::StrCat("fork: parent sequence ", parent, " not found"));
  }
  if (p->second.plan_id != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fork: parent sequence ", parent, " has an uncommitted reservation ",
        "(plan ", p->second.plan_id, ")"));
  }
  if (sequences_.contains(child)) {
    return absl::AlreadyExistsError(
        absl::StrCat("fork: child sequence ", child, " already exists"));
  }
  // Copy first (may throw std::bad_alloc with nothing changed), then insert
  // and take the references. `p` may dangle after the insert.
  Sequence copy = p->second;
  copy.serial = next_serial_++;
  copy.version = 0;
  auto [c, inserted] = sequences_.emplace(child, std::move(copy));
  const Sequence& s = c->second;
  for (int32_t t = 0; t < num_tables(); ++t) {
    for (BlockId b : s.tables[t]) {
      if (b == kNullBlock) continue;
      pool_.Acquire(b);
      ++held_[t];
    }
  }
  if (s.has_tip) index_.AcquireNode(s.hashes[s.registered - 1]);
  return absl::OkStatus();
}

void GroupBlockManager::RollBack(Sequence& s, int64_t accepted) {
  const int64_t bs = options_.block_size;
  const int64_t end = s.computed + accepted;
  // The entries past `keep` were taken by this plan (a copy-on-write copy
  // is at most the last of those kept).
  const size_t keep = static_cast<size_t>((end + bs - 1) / bs);
  ++s.version;
  for (int32_t t = 0; t < num_tables(); ++t) {
    std::vector<BlockId>& table = s.tables[t];
    while (table.size() > keep) {
      pool_.Release(table.back());  // Unhashed: straight to the free list.
      table.pop_back();
      --held_[t];
    }
  }
  s.tokens.resize(static_cast<size_t>(end));
  s.hashes.resize(std::min(s.hashes.size(), static_cast<size_t>(end / bs)));
  s.reserved = accepted;
}

absl::Status GroupBlockManager::Commit(uint64_t plan_id,
                                       absl::Span<const int64_t> accepted) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(absl::StrCat("plan ", plan_id, " not found"));
  }
  const std::vector<SequenceId>& ids = it->second.sequences;
  if (accepted.size() != ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "commit of plan ", plan_id, " with ", accepted.size(),
        " accepted counts, expected one per sequence: ", ids.size()));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    auto s = sequences_.find(ids[i]);
    if (s == sequences_.end() || s->second.plan_id != plan_id) continue;
    if (accepted[i] < 0 || accepted[i] > s->second.reserved) {
      return absl::InvalidArgumentError(absl::StrCat(
          "commit of plan ", plan_id, ": accepted[", i, "] = ", accepted[i],
          " for sequence ", ids[i], ", expected 0 to its ", s->second.reserved,
          " reserved tokens"));
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    auto s = sequences_.find(ids[i]);
    if (s == sequences_.end() || s->second.plan_id != plan_id) continue;
    RollBack(s->second, accepted[i]);
    CommitSequence(s->second);
  }
  plans_.erase(it);
  FlushEvents();
  return absl::OkStatus();
}

absl::Status GroupBlockManager::RemoveFromPlan(uint64_t plan_id,
                                               SequenceId id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(absl::StrCat("plan ", plan_id, " not found"));
  }
  auto s = sequences_.find(id);
  if (s == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  if (s->second.plan_id != plan_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, " is not in plan ", plan_id,
        s->second.plan_id == 0
            ? std::string(" (it is in none)")
            : absl::StrCat(" (it is in plan ", s->second.plan_id, ")")));
  }
  const Plan& plan = it->second;
  for (size_t i = 0; i < plan.sequences.size(); ++i) {
    if (plan.sequences[i] == id) {
      Unreserve(s->second, plan.tokens_before[i], plan.sizes_before[i]);
      break;
    }
  }
  return absl::OkStatus();
}

absl::Status GroupBlockManager::Truncate(SequenceId id, int64_t new_length) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  Sequence& s = it->second;
  if (s.plan_id != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("truncate of sequence ", id, " while plan ", s.plan_id,
                     " is in flight: commit or abort it first"));
  }
  if (new_length < 0 || new_length > s.computed) {
    return absl::InvalidArgumentError(absl::StrCat(
        "truncate of sequence ", id, " to ", new_length,
        " tokens, expected 0 to its ", s.computed, " computed tokens"));
  }
  const int64_t bs = options_.block_size;
  for (int32_t t = 0; t < num_tables(); ++t) {
    if (s.released[t] > FirstNeeded(t, new_length)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "truncate of sequence ", id, " to ", new_length, " tokens: table ", t,
          " (sliding window of ", options_.windows[t],
          " tokens) released its blocks before token ", s.released[t] * bs,
          ", and the window at length ", new_length, " reads from token ",
          std::max<int64_t>(0, new_length - options_.windows[t] + 1),
          "; truncate to at least ",
          s.released[t] * bs + options_.windows[t] - 1, " tokens"));
    }
  }
  // From here on nothing fails. The tail first, so that once cached the
  // chain's last blocks go first.
  const size_t keep = static_cast<size_t>((new_length + bs - 1) / bs);
  ++s.version;
  for (int32_t t = 0; t < num_tables(); ++t) {
    std::vector<BlockId>& table = s.tables[t];
    while (table.size() > keep) {
      pool_.Release(table.back());
      table.pop_back();
      --held_[t];
    }
  }
  // The chain tip follows the full blocks that remain; a later block of a
  // different content may register again.
  const int64_t full = new_length / bs;
  if (s.registered > full) {
    if (full > 0) index_.AcquireNode(s.hashes[full - 1]);
    if (s.has_tip) index_.ReleaseNode(s.hashes[s.registered - 1]);
    s.has_tip = full > 0;
    s.registered = full;
  }
  if (s.registered >= full) s.chain_broken = false;
  s.tokens.resize(static_cast<size_t>(new_length));
  s.hashes.resize(std::min(s.hashes.size(), static_cast<size_t>(full)));
  s.computed = new_length;
  return absl::OkStatus();
}

}  // namespace kvcache
