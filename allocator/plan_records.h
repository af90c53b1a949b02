// PlanRecords: the uncommitted plans of one BlockManager, by plan id. Plan
// ids start at 1 and are never reused. A record keeps what Commit, Abort and
// Free need of a plan; records are recycled (their vectors keep their
// capacity), so a decode step allocates nothing for its bookkeeping.
//
// Life of a record:
//
//   spare --Admit--> in flight (under its plan id) --Retire--> spare
//
// Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_PLAN_RECORDS_H_
#define KVCACHE_ALLOCATOR_PLAN_RECORDS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "allocator/sequence.h"

namespace kvcache {
namespace internal {

// An uncommitted plan.
struct PlanRecord {
  std::vector<Sequence*> sequences;   // In batch order; nullptr once freed.
  std::vector<size_t> tokens_before;  // Per sequence: Abort's token count.
  // Batch positions whose commit fills a block (only with prefix caching).
  std::vector<int32_t> fillers;
};

class PlanRecords {
 public:
  PlanRecords() = default;
  PlanRecords(const PlanRecords&) = delete;
  PlanRecords& operator=(const PlanRecords&) = delete;

  // A spare record sized for a batch of n (sequences and tokens_before of
  // size n, fillers empty with capacity n). May throw std::bad_alloc,
  // changing nothing observable.
  PlanRecord& Spare(size_t n);
  // The id the next admitted plan gets.
  uint64_t next_id() const { return next_id_; }
  // Puts the record Spare returned in flight under next_id() and returns that
  // id. May throw std::bad_alloc, changing nothing.
  uint64_t Admit(PlanRecord& spare);
  using Map = std::unordered_map<uint64_t, PlanRecord*>;
  // A plan in flight, as Find found it (record nullptr: none). Valid until
  // the next Admit or Retire.
  struct InFlight {
    PlanRecord* record = nullptr;
    Map::iterator it;
  };
  // The plan in flight under `id`.
  InFlight Find(uint64_t id) {
    auto it = in_flight_.find(id);
    return InFlight{it == in_flight_.end() ? nullptr : it->second, it};
  }
  PlanRecord* FindRecord(uint64_t id) const {
    auto it = in_flight_.find(id);
    return it == in_flight_.end() ? nullptr : it->second;
  }
  // Ends a plan found by Find (committed or aborted): its id is never used
  // again, its record becomes spare. Never allocates.
  void Retire(InFlight plan);

  size_t num_in_flight() const { return in_flight_.size(); }
  // Calls f(plan_id, const PlanRecord&) for every plan in flight.
  template <typename F>
  void ForEach(F f) const {
    for (const auto& [id, record] : in_flight_) f(id, *record);
  }

  // Every record is spare or in flight, never both. Internal otherwise.
  absl::Status Validate() const;

 private:
  Map in_flight_;
  // Every record, and those not in use (capacity for all, so that recycling
  // a record never allocates).
  std::vector<std::unique_ptr<PlanRecord>> records_;
  std::vector<PlanRecord*> spare_;
  uint64_t next_id_ = 1;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_PLAN_RECORDS_H_
