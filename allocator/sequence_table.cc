#include "allocator/sequence_table.h"

#include <algorithm>
#include <utility>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {

Sequence& SequenceTable::Insert(std::unique_ptr<Sequence> seq) {
  Sequence& s = *seq;
  const SequenceId id = s.id;
  ABSL_ASSERT(by_id_.Find(id) == nullptr);
  by_id_.Reserve(sequences_.size() + 1);  // May throw, changing nothing.
  sequences_.emplace(id, std::move(seq));
  // From here on nothing allocates.
  by_id_.Insert(id, &s);
  ++generation_;
  s.serial = generation_;  // Unique: generation_ only grows.
  return s;
}

void SequenceTable::Erase(SequenceId id) {
  ABSL_ASSERT(by_id_.Find(id) != nullptr);
  by_id_.Erase(id);
  sequences_.erase(id);
  ++generation_;
}

Sequence* SequenceTable::LookupMiss(size_t i, SequenceId id) const {
  Sequence* s = by_id_.Find(id);
  cache_ids_[i] = id;
  batch_[i] = s;
  cache_valid_ = std::max(cache_valid_, i + 1);
  return s;
}

void SequenceTable::PrepareLookups(size_t n) const {
  if (cache_gen_ != generation_) {  // A sequence came or went: forget all.
    cache_gen_ = generation_;
    cache_valid_ = 0;
  }
  if (cache_ids_.size() < n || batch_.size() < n) {
    // Both capacities first (may throw), then the sizes (cannot).
    cache_ids_.reserve(n);
    batch_.reserve(n);
    cache_ids_.resize(n);
    batch_.resize(n);
  }
}

namespace {

absl::Status ValidateShape(const Sequence& s, int64_t bs) {
  const int64_t end = s.computed + s.reserved;
  const int64_t known = s.known(bs);
  if (s.computed < 0 || s.reserved < 0 || end > known) {
    return absl::InternalError(
        absl::StrCat("sequence ", s.id, ": ", s.computed, " computed + ",
                     s.reserved, " reserved of ", known, " known tokens"));
  }
  if (static_cast<int64_t>(s.blocks.size()) != (end + bs - 1) / bs) {
    return absl::InternalError(absl::StrCat("sequence ", s.id, ": ",
                                            s.blocks.size(), " blocks for ",
                                            end, " tokens"));
  }
  if ((s.plan_id == 0) != (s.reserved == 0) ||
      (s.cow_src >= 0 && s.plan_id == 0)) {
    return absl::InternalError(
        absl::StrCat("sequence ", s.id, ": plan ", s.plan_id, " with ",
                     s.reserved, " reserved tokens, copy source ", s.cow_src));
  }
  if (s.tail_block != (s.blocks.empty() ? -1 : s.blocks.back())) {
    return absl::InternalError(absl::StrCat("sequence ", s.id, ": tail block ",
                                            s.tail_block,
                                            " is not its last block"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SequenceTable::Validate(int64_t block_size) const {
  for (const auto& [id, seq] : sequences_) {
    if (seq->id != id) {
      return absl::InternalError(
          absl::StrCat("sequence ", id, " has id ", seq->id));
    }
    if (by_id_.Find(id) != seq.get()) {
      return absl::InternalError(
          absl::StrCat("sequence ", id, " is missing from the id index"));
    }
    if (absl::Status status = ValidateShape(*seq, block_size); !status.ok())
      return status;
  }
  if (by_id_.size() != sequences_.size()) {
    return absl::InternalError(absl::StrCat("the id index holds ",
                                            by_id_.size(), " sequences, not ",
                                            sequences_.size()));
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvcache
