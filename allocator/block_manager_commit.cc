// BlockManager: the end of a step - Commit (the reserved tokens count as
// computed, filled blocks are registered in the prefix cache) and Abort (the
// reservation is undone) - and the recycling of their plan records.

#include <utility>

#include "absl/strings/str_cat.h"
#include "allocator/block_manager.h"
#include "allocator/block_manager_impl.h"

namespace kvcache {

using internal::ReserveGeometric;
using internal::Sequence;

namespace {

absl::Status PlanNotFound(uint64_t plan_id) {
  return absl::NotFoundError(
      absl::StrCat("plan ", plan_id,
                   " not found (unknown, or already committed or aborted)"));
}

}  // namespace

void BlockManager::Impl::RecyclePlan(
    std::unordered_map<uint64_t, PlanRecord*>::iterator it) {
  PlanRecord* record = it->second;
  plans_.erase(it);
  spare_records_.push_back(record);  // Has the capacity: cannot throw.
}

absl::Status BlockManager::Impl::Commit(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) return PlanNotFound(plan_id);
  const PlanRecord& record = *it->second;
  const std::vector<Sequence*>& seqs = record.sequences;
  // Allocate first (may throw std::bad_alloc with nothing changed): room for
  // the hashes of every block this commit fills. (The prefix-cache index has a
  // fixed capacity and never allocates.)
  for (int32_t k : record.fillers) {
    Sequence* s = seqs[k];
    if (s == nullptr) continue;  // Freed since Reserve.
    const size_t full =
        static_cast<size_t>(math_.Div(s->computed + s->reserved));
    ReserveGeometric(s->hashes, full);
  }
  // From here on nothing allocates. Hash the filled blocks first and prefetch
  // what registering them touches, so that those misses overlap.
  for (int32_t k : record.fillers) {
    if (seqs[k] != nullptr) PrepareRegistration(*seqs[k]);
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
  // The blocks that became full get their chained hash, in batch order.
  for (int32_t k : record.fillers) {
    if (seqs[k] != nullptr) HashNewFullBlocks(*seqs[k]);
  }
  RecyclePlan(it);
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::Abort(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) return PlanNotFound(plan_id);
  const PlanRecord& record = *it->second;
  for (size_t i = record.sequences.size(); i-- > 0;) {
    Sequence* s = record.sequences[i];
    if (s == nullptr) continue;
    const size_t blocks_before =
        static_cast<size_t>(math_.CeilDiv(s->computed));
    for (size_t j = s->blocks.size(); j > blocks_before; --j)
      pool_.Release(s->blocks[j - 1]);
    s->blocks.resize(blocks_before);
    if (s->cow_src >= 0) {
      pool_.Release(s->blocks.back());
      s->blocks.back() = s->cow_src;
      s->cow_src = -1;
      s->tail_maybe_shared = true;
    }
    s->tail_block = s->blocks.empty() ? -1 : s->blocks.back();
    s->tokens.resize(record.tokens_before[i]);
    s->reserved = 0;
    s->plan_id = 0;
  }
  RecyclePlan(it);
  return absl::OkStatus();
}

}  // namespace kvcache
