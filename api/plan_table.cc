#include "api/plan_table.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<PlanTable>> PlanTable::Create(
    Device* device, int num_layers, int max_plans, int64_t max_tokens,
    int64_t max_copies) {
  absl::StatusOr<std::unique_ptr<StepBuffers>> buffers =
      StepBuffers::Create(device, max_plans, max_tokens, max_copies);
  if (!buffers.ok()) return buffers.status();
  return std::unique_ptr<PlanTable>(
      new PlanTable(num_layers, *std::move(buffers)));
}

absl::StatusOr<PlanTable::Pending> PlanTable::Begin(size_t batch_size) {
  Pending pending;
  pending.slot = buffers_->FindFree();
  if (pending.slot < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(buffers_->num_slots(),
                     " plans are in flight (max_inflight_plans): commit or "
                     "abort one first"));
  }
  Map staged;
  staged[0].appended.assign(num_layers_, 0);
  staged[0].sequences.reserve(batch_size);
  pending.node = staged.extract(staged.begin());
  plans_.reserve(plans_.size() + 1);  // Add's insert cannot rehash.
  return pending;
}

void PlanTable::Add(Pending pending, uint64_t id, const StepPlan& step) {
  pending.node.key() = id;
  Plan& plan = pending.node.mapped();
  plan.slot = pending.slot;
  plan.num_tokens = static_cast<int64_t>(step.slot_mapping.size());
  int64_t offset = 0;
  for (size_t i = 0; i < step.sequences.size(); ++i) {  // Has the capacity.
    plan.sequences.push_back(PlanSequence{step.sequences[i], offset,
                                          step.num_tokens[i],
                                          step.first_positions[i]});
    offset += step.num_tokens[i];
  }
  buffers_->Take(pending.slot);
  plans_.insert(std::move(pending.node));
}

absl::StatusOr<PlanTable::Plan*> PlanTable::Find(uint64_t id) {
  auto it = plans_.find(id);
  if (it == plans_.end()) {
    return absl::NotFoundError(
        absl::StrCat("plan ", id,
                     " not found (never reserved, or already committed or "
                     "aborted)"));
  }
  return &it->second;
}

void PlanTable::Remove(uint64_t id) {
  auto it = plans_.find(id);
  buffers_->slot(it->second.slot).busy = false;
  plans_.erase(it);
}

absl::Status PlanTable::Validate(int64_t max_tokens) const {
  std::vector<char> slot_taken(buffers_->num_slots(), 0);
  for (const auto& [id, plan] : plans_) {
    const std::string name = absl::StrCat("plan ", id, ": ");
    if (plan.slot < 0 || plan.slot >= buffers_->num_slots() ||
        slot_taken[plan.slot] || !buffers_->slot(plan.slot).busy) {
      return absl::InternalError(absl::StrCat(name, "step slot ", plan.slot,
                                              " is not its own busy slot"));
    }
    slot_taken[plan.slot] = 1;
    const int64_t written = std::max(plan.num_tokens, plan.graph_tokens);
    if (plan.num_tokens < 1 || plan.num_tokens > max_tokens ||
        plan.graph_tokens < 0 || plan.graph_tokens > max_tokens ||
        static_cast<int>(plan.appended.size()) != num_layers_) {
      return absl::InternalError(absl::StrCat(
          name, plan.num_tokens, " tokens, ", plan.appended.size(), " layers"));
    }
    for (int layer = 0; layer < num_layers_; ++layer) {
      if (plan.appended[layer] < 0 || plan.appended[layer] > written) {
        return absl::InternalError(
            absl::StrCat(name, "layer ", layer, " holds ", plan.appended[layer],
                         " of its ", plan.num_tokens, " tokens"));
      }
    }
  }
  if (buffers_->num_busy() != static_cast<int>(plans_.size())) {
    return absl::InternalError(absl::StrCat(buffers_->num_busy(),
                                            " busy step slots for ",
                                            plans_.size(), " plans"));
  }
  return absl::OkStatus();
}

}  // namespace kvcache::internal
