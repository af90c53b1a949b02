// PlanTable (api/plan_table.h) on the CPU device: Begin hands out distinct
// free step slots until max_plans are in flight, then FailedPrecondition
// naming the count, and plans committed one at a time still use every slot
// in turn; Add/Find/Remove keep a plan's slot, token count and a
// zeroed per-layer appended vector; Find of an unknown id is NotFound naming
// it; Validate holds through a random life cycle and is Internal once a test
// corrupts the table (appended out of range, a busy slot without a plan, a
// plan whose slot is not busy, a wrongly sized appended vector).
// KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/plan_table.h"

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "allocator/step_plan.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/test_seed.h"

namespace kvcache::internal {
namespace {

// An allocator plan of one sequence holding `num_tokens` slots.
StepPlan OneSequencePlan(int64_t num_tokens) {
  StepPlan plan;
  plan.sequences = {1};
  plan.num_tokens = {num_tokens};
  plan.first_positions = {0};
  plan.slot_mapping.assign(num_tokens, 0);
  return plan;
}

constexpr int64_t kMaxTokens = 64;

bool Contains(absl::string_view haystack, absl::string_view needle) {
  return haystack.find(needle) != absl::string_view::npos;
}

class PlanTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = kvcache::testing::TestSeed();
    rng_.seed(seed);
    seed_trace_ = std::make_unique<::testing::ScopedTrace>(
        __FILE__, __LINE__,
        absl::StrCat("seed ", seed, " (rerun with KVCACHE_TEST_SEED=", seed,
                     ")"));
    num_layers_ = static_cast<int>(Rand(1, 6));
    Make(static_cast<int>(Rand(1, 8)));
  }

  void Make(int max_plans) {
    max_plans_ = max_plans;
    absl::StatusOr<std::unique_ptr<PlanTable>> t = PlanTable::Create(
        device_.get(), num_layers_, max_plans_, kMaxTokens, /*max_copies=*/4);
    ASSERT_TRUE(t.ok()) << t.status();
    table_ = *std::move(t);
  }

  int64_t Rand(int64_t lo, int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }

  // Begins and adds a plan under a fresh random id; returns the id.
  uint64_t AddPlan(int64_t num_tokens) {
    uint64_t id;
    do {
      id = rng_();
    } while (ids_.count(id) != 0);
    absl::StatusOr<PlanTable::Pending> pending = table_->Begin(1);
    EXPECT_TRUE(pending.ok()) << pending.status();
    if (!pending.ok()) return 0;
    table_->Add(*std::move(pending), id, OneSequencePlan(num_tokens));
    ids_.insert(id);
    return id;
  }

  PlanTable::Plan* Find(uint64_t id) {
    absl::StatusOr<PlanTable::Plan*> plan = table_->Find(id);
    EXPECT_TRUE(plan.ok()) << plan.status();
    return plan.ok() ? *plan : nullptr;
  }

  std::mt19937_64 rng_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  std::unique_ptr<Device> device_ = CreateCpuDevice();
  int num_layers_ = 0;
  int max_plans_ = 0;
  std::unique_ptr<PlanTable> table_;
  std::set<uint64_t> ids_;
};

TEST_F(PlanTableTest, BeginHandsOutDistinctFreeSlotsUntilMaxPlans) {
  EXPECT_EQ(table_->buffers().num_slots(), max_plans_);
  std::set<int> slots;
  for (int i = 0; i < max_plans_; ++i) {
    absl::StatusOr<PlanTable::Pending> pending = table_->Begin(1);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const int slot = pending->slot;
    ASSERT_GE(slot, 0);
    ASSERT_LT(slot, max_plans_);
    EXPECT_FALSE(table_->buffers().slot(slot).busy);
    EXPECT_TRUE(slots.insert(slot).second) << "slot " << slot << " twice";
    // Begin alone takes nothing: the slot is busy only once the plan is added.
    EXPECT_EQ(table_->size(), i);
    table_->Add(*std::move(pending), /*id=*/1000 + i,
                OneSequencePlan(Rand(1, kMaxTokens)));
    EXPECT_TRUE(table_->buffers().slot(slot).busy);
    EXPECT_EQ(table_->size(), i + 1);
    EXPECT_EQ(table_->buffers().num_busy(), i + 1);
    ASSERT_TRUE(table_->Validate(kMaxTokens).ok());
  }
  const absl::StatusOr<PlanTable::Pending> full = table_->Begin(1);
  ASSERT_EQ(full.status().code(), absl::StatusCode::kFailedPrecondition)
      << full.status();
  EXPECT_TRUE(Contains(full.status().message(),
                       absl::StrCat(max_plans_, " plans are in flight")))
      << full.status();
  EXPECT_TRUE(Contains(full.status().message(), "max_inflight_plans"))
      << full.status();
  EXPECT_EQ(table_->size(), max_plans_);
  ASSERT_TRUE(table_->Validate(kMaxTokens).ok());

  // Removing any one plan frees exactly its slot for the next Begin.
  const int victim = static_cast<int>(Rand(0, max_plans_ - 1));
  PlanTable::Plan* plan = Find(1000 + victim);
  ASSERT_NE(plan, nullptr);
  const int freed = plan->slot;
  table_->Remove(1000 + victim);
  EXPECT_FALSE(table_->buffers().slot(freed).busy);
  absl::StatusOr<PlanTable::Pending> again = table_->Begin(1);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->slot, freed);
}

TEST_F(PlanTableTest, PlansOneAtATimeUseEverySlotInTurn) {
  // Each plan removed (committed) before the next Begin, as a pipelined
  // engine does: the slots still rotate, so that a slot's staging is
  // rewritten only max_plans plans after its last upload.
  std::vector<int> used;
  for (int i = 0; i < 3 * max_plans_; ++i) {
    absl::StatusOr<PlanTable::Pending> pending = table_->Begin(1);
    ASSERT_TRUE(pending.ok()) << pending.status();
    used.push_back(pending->slot);
    table_->Add(*std::move(pending), /*id=*/2000 + i,
                OneSequencePlan(Rand(1, kMaxTokens)));
    ASSERT_TRUE(table_->Validate(kMaxTokens).ok());
    table_->Remove(2000 + i);
    EXPECT_EQ(table_->buffers().num_busy(), 0);
  }
  for (size_t i = 0; i < used.size(); ++i) {
    EXPECT_EQ(used[i], (used[0] + static_cast<int>(i)) % max_plans_)
        << "plan " << i;
  }
}

TEST_F(PlanTableTest, AddFindRemoveLifeCycle) {
  // A model: id -> (slot, num_tokens, appended). Random adds, appends and
  // removes, checking Find and Validate after each.
  struct Model {
    int slot;
    int64_t num_tokens;
    std::vector<int64_t> appended;
  };
  std::map<uint64_t, Model> model;
  for (int step = 0; step < 300; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    const int op = static_cast<int>(Rand(0, 2));
    if (op == 0 && static_cast<int>(model.size()) < max_plans_) {
      const int64_t tokens = Rand(1, kMaxTokens);
      const uint64_t id = AddPlan(tokens);
      ASSERT_FALSE(HasFailure());
      PlanTable::Plan* plan = Find(id);
      ASSERT_NE(plan, nullptr);
      EXPECT_EQ(plan->num_tokens, tokens);
      EXPECT_EQ(plan->appended, std::vector<int64_t>(num_layers_, 0))
          << "appended is sized num_layers and zeroed";
      for (const auto& [other, m] : model) {
        EXPECT_NE(m.slot, plan->slot) << "slot shared with plan " << other;
      }
      model[id] = {plan->slot, tokens, plan->appended};
    } else if (op == 1 && !model.empty()) {
      auto it = std::next(model.begin(), Rand(0, model.size() - 1));
      PlanTable::Plan* plan = Find(it->first);
      ASSERT_NE(plan, nullptr);
      const int layer = static_cast<int>(Rand(0, num_layers_ - 1));
      const int64_t n = Rand(0, plan->num_tokens);
      plan->appended[layer] = n;
      it->second.appended[layer] = n;
    } else if (!model.empty()) {
      auto it = std::next(model.begin(), Rand(0, model.size() - 1));
      table_->Remove(it->first);
      EXPECT_FALSE(table_->buffers().slot(it->second.slot).busy);
      const absl::StatusOr<PlanTable::Plan*> gone = table_->Find(it->first);
      EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
      model.erase(it);
    }
    ASSERT_EQ(table_->size(), static_cast<int64_t>(model.size()));
    ASSERT_EQ(table_->buffers().num_busy(), static_cast<int>(model.size()));
    for (const auto& [id, m] : model) {
      PlanTable::Plan* plan = Find(id);
      ASSERT_NE(plan, nullptr) << "plan " << id;
      EXPECT_EQ(plan->slot, m.slot);
      EXPECT_EQ(plan->num_tokens, m.num_tokens);
      EXPECT_EQ(plan->appended, m.appended);
      EXPECT_TRUE(table_->buffers().slot(m.slot).busy);
      EXPECT_EQ(table_->device_slots(*plan),
                table_->buffers().device_slots(m.slot));
      EXPECT_EQ(table_->device_pairs(m.slot),
                table_->buffers().device_pairs(m.slot));
    }
    const absl::Status valid = table_->Validate(kMaxTokens);
    ASSERT_TRUE(valid.ok()) << valid;
  }
}

TEST_F(PlanTableTest, FindOfUnknownIdIsNotFoundNamingIt) {
  uint64_t unknown = rng_();
  absl::StatusOr<PlanTable::Plan*> plan = table_->Find(unknown);
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(
      Contains(plan.status().message(), absl::StrCat("plan ", unknown, " ")))
      << plan.status();
  // Also among plans in flight, and for a removed one.
  const uint64_t id = AddPlan(1);
  ASSERT_FALSE(HasFailure());
  while (unknown == id) unknown = rng_();
  plan = table_->Find(unknown);
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(
      Contains(plan.status().message(), absl::StrCat("plan ", unknown, " ")))
      << plan.status();
  table_->Remove(id);
  plan = table_->Find(id);
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(plan.status().message(), absl::StrCat("plan ", id, " ")))
      << plan.status();
}

TEST_F(PlanTableTest, ValidateFailsOnAppendedBeyondTheTokens) {
  const int64_t tokens = Rand(1, kMaxTokens);
  const uint64_t id = AddPlan(tokens);
  ASSERT_FALSE(HasFailure());
  ASSERT_TRUE(table_->Validate(kMaxTokens).ok());
  PlanTable::Plan* plan = Find(id);
  ASSERT_NE(plan, nullptr);
  const int layer = static_cast<int>(Rand(0, num_layers_ - 1));
  plan->appended[layer] = tokens + Rand(1, 100);
  absl::Status s = table_->Validate(kMaxTokens);
  ASSERT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_TRUE(Contains(s.message(), absl::StrCat("plan ", id)));
  EXPECT_TRUE(Contains(s.message(), absl::StrCat("layer ", layer, " holds ",
                                                 plan->appended[layer])))
      << s;

  plan->appended[layer] = -Rand(1, 100);
  s = table_->Validate(kMaxTokens);
  ASSERT_EQ(s.code(), absl::StatusCode::kInternal) << s;

  plan->appended[layer] = tokens;  // All of them: consistent again.
  EXPECT_TRUE(table_->Validate(kMaxTokens).ok());
}

TEST_F(PlanTableTest, ValidateFailsOnABusySlotWithoutAPlan) {
  Make(static_cast<int>(Rand(2, 8)));  // Needs a second slot.
  AddPlan(Rand(1, kMaxTokens));
  ASSERT_FALSE(HasFailure());
  ASSERT_TRUE(table_->Validate(kMaxTokens).ok());
  const int free_slot = table_->buffers().FindFree();
  ASSERT_GE(free_slot, 0);
  table_->buffers().slot(free_slot).busy = true;
  const absl::Status s = table_->Validate(kMaxTokens);
  ASSERT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_TRUE(Contains(s.message(), "2 busy step slots for 1 plans")) << s;
}

TEST_F(PlanTableTest, ValidateFailsOnABusySlotWithNoPlansAtAll) {
  const int slot = static_cast<int>(Rand(0, max_plans_ - 1));
  table_->buffers().slot(slot).busy = true;
  const absl::Status s = table_->Validate(kMaxTokens);
  ASSERT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_TRUE(Contains(s.message(), "1 busy step slots for 0 plans")) << s;
}

TEST_F(PlanTableTest, ValidateFailsOnAPlanWhoseSlotIsNotBusy) {
  const uint64_t id = AddPlan(Rand(1, kMaxTokens));
  ASSERT_FALSE(HasFailure());
  PlanTable::Plan* plan = Find(id);
  ASSERT_NE(plan, nullptr);
  table_->buffers().slot(plan->slot).busy = false;
  const absl::Status s = table_->Validate(kMaxTokens);
  ASSERT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_TRUE(Contains(s.message(), absl::StrCat("step slot ", plan->slot,
                                                 " is not its own busy slot")))
      << s;
}

TEST_F(PlanTableTest, ValidateFailsOnTwoPlansSharingASlot) {
  Make(static_cast<int>(Rand(2, 8)));  // Needs a second slot.
  const uint64_t a = AddPlan(1);
  const uint64_t b = AddPlan(1);
  ASSERT_FALSE(HasFailure());
  PlanTable::Plan* pa = Find(a);
  PlanTable::Plan* pb = Find(b);
  ASSERT_NE(pa, nullptr);
  ASSERT_NE(pb, nullptr);
  table_->buffers().slot(pb->slot).busy = false;
  pb->slot = pa->slot;
  table_->buffers().slot(pa->slot).busy = true;
  const absl::Status s = table_->Validate(kMaxTokens);
  ASSERT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_TRUE(Contains(s.message(), "is not its own busy slot")) << s;
}

TEST_F(PlanTableTest, ValidateFailsOnBadTokenCountsAndLayerCounts) {
  const uint64_t id = AddPlan(Rand(1, kMaxTokens));
  ASSERT_FALSE(HasFailure());
  PlanTable::Plan* plan = Find(id);
  ASSERT_NE(plan, nullptr);
  const int64_t tokens = plan->num_tokens;

  plan->num_tokens = kMaxTokens + Rand(1, 10);
  EXPECT_EQ(table_->Validate(kMaxTokens).code(), absl::StatusCode::kInternal);
  plan->num_tokens = 0;
  EXPECT_EQ(table_->Validate(kMaxTokens).code(), absl::StatusCode::kInternal);
  plan->num_tokens = tokens;
  ASSERT_TRUE(table_->Validate(kMaxTokens).ok());

  plan->appended.push_back(0);
  absl::Status s = table_->Validate(kMaxTokens);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_TRUE(Contains(s.message(), absl::StrCat(num_layers_ + 1, " layers")))
      << s;
  plan->appended.resize(num_layers_ - 1);
  EXPECT_EQ(table_->Validate(kMaxTokens).code(), absl::StatusCode::kInternal);
  plan->appended.assign(num_layers_, 0);
  EXPECT_TRUE(table_->Validate(kMaxTokens).ok());
}

}  // namespace
}  // namespace kvcache::internal
