#include "allocator/plan_records.h"

#include <algorithm>
#include <unordered_set>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_math.h"

namespace kvcache {
namespace internal {

PlanRecord& PlanRecords::Spare(size_t n) {
  if (spare_.empty()) {
    ReserveGeometric(records_, records_.size() + 1);
    ReserveGeometric(spare_, records_.size() + 1);
    records_.push_back(std::make_unique<PlanRecord>());
    spare_.push_back(records_.back().get());
  }
  PlanRecord& record = *spare_.back();
  record.sequences.resize(n);
  record.tokens_before.resize(n);
  record.fillers.clear();
  record.fillers.reserve(n);
  return record;
}

uint64_t PlanRecords::Admit(PlanRecord& spare) {
  ABSL_ASSERT(!spare_.empty() && spare_.back() == &spare);
  in_flight_.emplace(next_id_, &spare);  // May throw, changing nothing.
  spare_.pop_back();
  return next_id_++;
}

void PlanRecords::Retire(InFlight plan) {
  ABSL_ASSERT(plan.record != nullptr && plan.it->second == plan.record);
  ABSL_ASSERT(spare_.size() < records_.size());
  in_flight_.erase(plan.it);
  spare_.push_back(plan.record);  // Has the capacity: cannot throw.
}

absl::Status PlanRecords::Validate() const {
  if (in_flight_.size() + spare_.size() != records_.size()) {
    return absl::InternalError(
        absl::StrCat(in_flight_.size(), " plans and ", spare_.size(),
                     " spare records, but ", records_.size(), " records"));
  }
  std::unordered_set<const PlanRecord*> seen;
  for (const auto& [id, record] : in_flight_) {
    if (id == 0 || id >= next_id_ || !seen.insert(record).second) {
      return absl::InternalError(
          absl::StrCat("plan ", id, " is not a fresh id or shares a record"));
    }
  }
  for (const PlanRecord* record : spare_) {
    if (!seen.insert(record).second) {
      return absl::InternalError("a record is both spare and in flight");
    }
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvcache
