#include "allocator/sequence_table.h"

#include <memory>
#include <set>

#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

std::unique_ptr<Sequence> Seq(SequenceId id) {
  auto s = std::make_unique<Sequence>();
  s->id = id;
  return s;
}

TEST(SequenceTableTest, InsertFindErase) {
  SequenceTable t;
  for (SequenceId id = 0; id < 100; ++id) {
    Sequence& s = t.Insert(Seq(id * 7919));
    EXPECT_EQ(s.id, id * 7919);
  }
  EXPECT_EQ(t.size(), 100u);
  for (SequenceId id = 0; id < 100; ++id) {
    ASSERT_NE(t.Find(id * 7919), nullptr);
    EXPECT_EQ(t.Find(id * 7919)->id, id * 7919);
  }
  EXPECT_EQ(t.Find(1), nullptr);
  for (SequenceId id = 0; id < 100; id += 2) t.Erase(id * 7919);
  EXPECT_EQ(t.size(), 50u);
  for (SequenceId id = 0; id < 100; ++id)
    EXPECT_EQ(t.Find(id * 7919) != nullptr, id % 2 == 1) << id;
  std::set<SequenceId> seen;
  t.ForEach([&](const Sequence& s) { seen.insert(s.id); });
  EXPECT_EQ(seen.size(), 50u);
  EXPECT_TRUE(t.Validate(/*block_size=*/16).ok());
}

TEST(SequenceTableTest, BatchLookupsAreRememberedUntilASequenceComesOrGoes) {
  SequenceTable t;
  Sequence* a = &t.Insert(Seq(10));
  Sequence* b = &t.Insert(Seq(20));
  t.PrepareLookups(2);
  EXPECT_EQ(t.cache_valid(), 0u);
  EXPECT_EQ(t.Lookup(0, 10), a);
  EXPECT_EQ(t.Lookup(1, 20), b);
  EXPECT_EQ(t.cache_valid(), 2u);
  EXPECT_EQ(t.batch()[0], a);
  t.PrepareLookups(2);  // Same generation: remembered.
  EXPECT_EQ(t.cache_valid(), 2u);
  size_t valid = t.cache_valid();
  EXPECT_EQ(t.LookupAt(0, 10, valid), a);
  EXPECT_EQ(t.LookupAt(1, 99, valid), nullptr);  // A miss replaces the entry.
  EXPECT_EQ(t.batch()[1], nullptr);
  t.Erase(10);
  t.PrepareLookups(2);  // A sequence went: forgotten.
  EXPECT_EQ(t.cache_valid(), 0u);
  EXPECT_EQ(t.Lookup(0, 10), nullptr);
  EXPECT_EQ(t.Lookup(1, 20), b);
}

TEST(SequenceTableTest, UnmarkBatchClearsTheMarks) {
  SequenceTable t;
  t.Insert(Seq(1));
  t.Insert(Seq(2));
  t.PrepareLookups(2);
  t.Lookup(0, 1)->reserved = 3;
  t.Lookup(1, 2)->reserved = 4;
  t.UnmarkBatch(2);
  EXPECT_EQ(t.Find(1)->reserved, 0);
  EXPECT_EQ(t.Find(2)->reserved, 0);
}

TEST(SequenceTableTest, ValidateFindsAMalformedSequence) {
  SequenceTable t;
  Sequence& s = t.Insert(Seq(1));
  s.tokens = {1, 2, 3};
  s.computed = 3;
  EXPECT_FALSE(t.Validate(/*block_size=*/2).ok());  // No blocks for 3 tokens.
  s.blocks = {5, 6};
  s.tail_block = 6;
  EXPECT_TRUE(t.Validate(/*block_size=*/2).ok()) << t.Validate(2);
  s.reserved = 1;  // Reserved without a plan.
  EXPECT_FALSE(t.Validate(/*block_size=*/2).ok());
}

}  // namespace
}  // namespace kvcache::internal
