// PlanTable holds the plans in flight as the api sees them: each plan's
// step-buffer slot (its slot mapping and copy-on-write pairs, uploaded to the
// backend's memory) and how many of its tokens every layer holds. Which
// sequences a plan covers is the allocator's to know (its plan records); this
// keeps only what the kernels and Commit need, in one place.
//
// Thread-compatible: the manager's mutex guards it. Owns the step buffers.
// Internal to api/.

#ifndef KVCACHE_API_PLAN_TABLE_H_
#define KVCACHE_API_PLAN_TABLE_H_

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "api/step_buffers.h"
#include "core/plan_sequence.h"
#include "storage/device.h"

namespace kvcache::internal {

class PlanTable {
 public:
  struct Plan {
    int slot = 0;            // Its step-buffer slot.
    int64_t num_tokens = 0;  // Reserved over the whole batch.
    // A graph step (ReserveGraphStep): the padded token count every Append
    // writes (its slot mapping is the graph step's); 0 for other plans.
    int64_t graph_tokens = 0;
    // Per layer: tokens written so far. A graph step's Appends set it to
    // graph_tokens, when they run on the host (capture, or no graph at all);
    // replays leave it 0.
    std::vector<int64_t> appended;
    // Per sequence, batch order (num_tokens 0 once removed from the plan).
    std::vector<PlanSequence> sequences;
    // The host tier's onboard batch its Appends wait for (the last of its
    // sequences' prefixes still in flight at Reserve), 0 = none.
    int64_t tier_onboard = 0;
  };

 private:
  // Node-based, so that a plan's record is made before the allocator changes
  // and inserted later without allocating.
  using Map = std::unordered_map<uint64_t, Plan>;

 public:
  // A plan being reserved: its slot and its record, not yet in the table.
  struct Pending {
    int slot = -1;
    Map::node_type node;
  };

  // REQUIRES: `device` outlives the table.
  static absl::StatusOr<std::unique_ptr<PlanTable>> Create(Device* device,
                                                           int num_layers,
                                                           int max_plans,
                                                           int64_t max_tokens,
                                                           int64_t max_copies);

  // Takes a free step slot and makes the plan's record (room for a batch of
  // `batch_size`), so that nothing allocates once the allocator has changed.
  // FailedPrecondition when every slot is taken. May throw std::bad_alloc,
  // changing nothing.
  absl::StatusOr<Pending> Begin(size_t batch_size);
  // Uploads a pending plan's slot mapping and copy pairs on `stream`.
  absl::Status Upload(const Pending& pending, absl::Span<const int64_t> slots,
                      absl::Span<const BlockCopy> copies, void* stream) {
    return buffers_->Upload(pending.slot, slots, copies, stream);
  }
  // Adds a pending plan under `id`, its slot now busy, with its sequences'
  // layout (`plan`'s sequences, token counts and first positions). Never
  // allocates.
  void Add(Pending pending, uint64_t id, const StepPlan& plan);
  // Rewrites slots [offset, offset + count) of a plan's device slot mapping
  // to -1 (padding) on `stream`.
  absl::Status Pad(const Plan& plan, int64_t offset, int64_t count,
                   void* stream) {
    return buffers_->Pad(plan.slot, offset, count, stream);
  }
  // NotFound naming the plan when it is not in flight.
  absl::StatusOr<Plan*> Find(uint64_t id);
  // REQUIRES: `id` is in flight. Frees its slot.
  void Remove(uint64_t id);
  int64_t size() const { return static_cast<int64_t>(plans_.size()); }

  StepBuffers& buffers() { return *buffers_; }
  const int64_t* device_slots(const Plan& plan) const {
    return buffers_->device_slots(plan.slot);
  }
  const int64_t* device_pairs(int slot) const {
    return buffers_->device_pairs(slot);
  }

  // Every plan owns one busy slot and holds at most its tokens in every
  // layer; busy slots are exactly the plans'. Internal naming the first
  // violation.
  absl::Status Validate(int64_t max_tokens) const;

 private:
  PlanTable(int num_layers, std::unique_ptr<StepBuffers> buffers)
      : num_layers_(num_layers), buffers_(std::move(buffers)) {}

  const int num_layers_;
  std::unique_ptr<StepBuffers> buffers_;
  Map plans_;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_PLAN_TABLE_H_
