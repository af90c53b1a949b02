#include "allocator/plan_records.h"

#include <set>

#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

TEST(PlanRecordsTest, IdsAreFreshAndNeverReused) {
  PlanRecords plans;
  std::set<uint64_t> ids;
  for (int i = 0; i < 50; ++i) {
    PlanRecord& r = plans.Spare(3);
    const uint64_t id = plans.Admit(r);
    EXPECT_NE(id, 0u);
    EXPECT_TRUE(ids.insert(id).second);
    PlanRecords::InFlight found = plans.Find(id);
    ASSERT_EQ(found.record, &r);
    plans.Retire(found);
    EXPECT_EQ(plans.Find(id).record, nullptr);
  }
  EXPECT_EQ(plans.num_in_flight(), 0u);
  EXPECT_TRUE(plans.Validate().ok());
}

TEST(PlanRecordsTest, RecordsAreRecycledWithTheirCapacity) {
  PlanRecords plans;
  PlanRecord& r = plans.Spare(100);
  EXPECT_EQ(r.sequences.size(), 100u);
  EXPECT_EQ(r.tokens_before.size(), 100u);
  EXPECT_TRUE(r.fillers.empty());
  EXPECT_GE(r.fillers.capacity(), 100u);
  r.fillers.push_back(7);
  const uint64_t id = plans.Admit(r);
  plans.Retire(plans.Find(id));
  PlanRecord& again = plans.Spare(2);
  EXPECT_EQ(&again, &r);  // The same record, recycled.
  EXPECT_TRUE(again.fillers.empty());
  EXPECT_GE(again.fillers.capacity(), 100u);
  EXPECT_EQ(again.sequences.size(), 2u);
}

TEST(PlanRecordsTest, SeveralInFlight) {
  PlanRecords plans;
  const uint64_t a = plans.Admit(plans.Spare(1));
  const uint64_t b = plans.Admit(plans.Spare(1));
  EXPECT_NE(plans.Find(a).record, plans.Find(b).record);
  EXPECT_EQ(plans.num_in_flight(), 2u);
  EXPECT_EQ(plans.FindRecord(a), plans.Find(a).record);
  int seen = 0;
  plans.ForEach([&](uint64_t, const PlanRecord&) { ++seen; });
  EXPECT_EQ(seen, 2);
  EXPECT_TRUE(plans.Validate().ok());
  plans.Retire(plans.Find(a));
  EXPECT_EQ(plans.FindRecord(a), nullptr);
  EXPECT_NE(plans.FindRecord(b), nullptr);
  EXPECT_TRUE(plans.Validate().ok());
}

}  // namespace
}  // namespace kvcache::internal
