// KVCacheManager with layer groups on the CPU backend: Fork (every table
// shared, copy-on-write of a shared partial last block in every page slot,
// K-only groups included), Truncate (refused below a sliding window's
// released blocks, with nothing changed), speculative Commit (accepted
// counts) and RemoveFromPlan. Every readable token of every layer is
// gathered and compared with the reference (tests/group_runner.h) after
// each random operation; which truncations must be refused is computed
// independently from the windows.

#include <algorithm>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "tests/group_runner.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int kBlock = 4;

// 6 layers: 5 sliding (window 10), 1 full; K and V.
KVCacheConfig SlidingAndFull() {
  testing::HybridSpec spec;
  spec.num_layers = 6;
  spec.sliding_layers = {0, 1, 2, 3, 4};
  spec.full_layers = {5};
  spec.window = 10;
  spec.num_kv_heads = 2;
  spec.head_size = 16;
  spec.head_size_v = 8;
  spec.num_blocks = 600;
  spec.block_size = kBlock;
  spec.max_tokens_per_step = 256;
  return testing::HybridConfig(spec);
}

// K-only (latent) layers, two sliding (window 7) and two full, fp8.
KVCacheConfig KOnlyHybrid() {
  testing::HybridSpec spec;
  spec.num_layers = 4;
  spec.sliding_layers = {0, 2};
  spec.full_layers = {1, 3};
  spec.window = 7;
  spec.num_kv_heads = 1;
  spec.head_size = 64;
  spec.head_size_v = 0;
  spec.cache_dtype = DType::kFp8E4M3;
  spec.num_blocks = 600;
  spec.block_size = kBlock;
  spec.max_tokens_per_step = 256;
  return testing::HybridConfig(spec);
}

using Fixture = testing::GroupFixture;

// The independent rule: a truncation from `length` to `to` is refused when
// some sliding group's window at `to` reads a block released at `length`.
bool TruncateRefused(const KVCacheConfig& c, int64_t length, int64_t to) {
  for (const LayerGroup& g : c.layer_groups) {
    if (g.kind != AttentionKind::kSlidingWindow) continue;
    auto first = [&](int64_t n) {
      return std::max<int64_t>(0, n - g.sliding_window + 1) / c.block_size;
    };
    if (first(length) > first(to)) return true;
  }
  return false;
}

TEST(GroupForkTest, ChildSharesEveryTableAndCopiesTheSharedTail) {
  Fixture f(SlidingAndFull(), 3);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  ASSERT_TRUE(r.Add(1, r.RandomTokens(22, 50)).ok());
  ASSERT_TRUE(r.Step({1}, {22}).ok());
  const int64_t used = m.Metrics().blocks_in_use;
  ASSERT_TRUE(r.Fork(1, 2).ok());
  EXPECT_EQ(m.Metrics().blocks_in_use, used);
  const int32_t tables = m.NumBlockTables();
  for (int32_t t = 0; t < tables; ++t) {
    EXPECT_EQ(*m.GroupBlockTable(1, t), *m.GroupBlockTable(2, t));
  }
  // Released entries stay null in the child: (22 - 9) / 4 = 3.
  EXPECT_EQ((*m.GroupBlockTable(2, 0))[2], -1);
  EXPECT_EQ(*m.KnownLength(2), 22);
  // Tokens 20..21 sit in a shared partial block: the child's step copies
  // it in every table, the parent's data stays.
  int64_t copies = 0;
  testing::GroupRunner::StepOptions o;
  o.copies = &copies;
  ASSERT_TRUE(r.Step({2}, {3}, o).ok());
  EXPECT_EQ(copies, tables);
  EXPECT_EQ(m.Metrics().block_copies, tables);
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  ASSERT_TRUE(r.Step({1}, {1}, o).ok());
  EXPECT_EQ(copies, 0);  // The parent is the last holder of its tail.
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  ASSERT_TRUE(m.Validate().ok()) << m.Validate();
  ASSERT_TRUE(r.Free(1).ok());
  ASSERT_TRUE(r.Free(2).ok());
  EXPECT_EQ(m.Metrics().blocks_in_use, 0);
}

TEST(GroupForkTest, TruncateBelowTheWindowNamesLengthAndWindow) {
  Fixture f(SlidingAndFull(), 4);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  ASSERT_TRUE(r.Add(1, r.RandomTokens(30, 50)).ok());
  ASSERT_TRUE(r.Step({1}, {30}).ok());
  // (30 - 9) / 4 = 5 blocks released; the window at L reads from L - 9.
  const absl::Status st = m.Truncate(1, 28);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("to 28 tokens"));
  EXPECT_THAT(st.message(), HasSubstr("sliding window of 10"));
  EXPECT_THAT(st.message(), HasSubstr("at least 29"));
  EXPECT_EQ(*m.SequenceLength(1), 30);
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  ASSERT_TRUE(r.Truncate(1, 29).ok());
  ASSERT_TRUE(r.Step({1}, {4}).ok());
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  ASSERT_TRUE(m.Validate().ok()) << m.Validate();
}

struct Scenario {
  std::string name;
  KVCacheConfig config;
};

void PrintTo(const Scenario& s, std::ostream* os) { *os << s.name; }

class GroupRewindTest : public ::testing::TestWithParam<Scenario> {};

// Random adds (sharing prefixes), steps (plain, speculative, with a
// sequence removed), forks, truncations and frees; after each, every
// readable token of every layer gathers to the reference.
TEST_P(GroupRewindTest, RandomOperationsReadBackTheReference) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const KVCacheConfig& c = GetParam().config;
  Fixture f(c, seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  std::mt19937_64 rng(seed);
  auto rand = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  const std::vector<TokenId> base = r.RandomTokens(40, 3);
  std::vector<SequenceId> live;
  SequenceId next = 1;
  int64_t copies_seen = 0, truncated = 0, refused = 0, speculative = 0,
          removed = 0;
  for (int op = 0; op < 150; ++op) {
    SCOPED_TRACE(absl::StrCat("operation ", op));
    const int64_t kind = rand(0, 9);
    if (kind == 0 || live.empty()) {  // Add.
      if (live.size() >= 6) continue;
      std::vector<TokenId> prompt(base.begin(), base.begin() + rand(0, 40));
      const std::vector<TokenId> tail = r.RandomTokens(rand(1, 12), 3);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      ASSERT_TRUE(r.Add(next, prompt).ok());
      live.push_back(next++);
    } else if (kind <= 5) {  // A step.
      std::vector<SequenceId> ids;
      std::vector<int64_t> n;
      for (SequenceId id : live) {
        if (rand(0, 2) == 0) continue;
        const int64_t len = *m.SequenceLength(id);
        const int64_t known = *m.KnownLength(id);
        ids.push_back(id);
        n.push_back(known > len ? rand(1, std::min<int64_t>(known - len, 9))
                                : rand(1, 4));
      }
      if (ids.empty()) continue;
      testing::GroupRunner::StepOptions o;
      int64_t copies = 0;
      o.copies = &copies;
      std::vector<int64_t> accepted;
      if (rand(0, 2) == 0) {
        for (int64_t k : n) accepted.push_back(rand(0, k));
        o.accepted = &accepted;
        ++speculative;
      }
      if (ids.size() >= 2 && rand(0, 4) == 0) {
        o.remove = ids[rand(0, static_cast<int64_t>(ids.size()) - 1)];
        ++removed;
      }
      const absl::Status st = r.Step(ids, n, o);
      if (absl::IsResourceExhausted(st)) {
        const SequenceId gone = live[rand(0, live.size() - 1)];
        ASSERT_TRUE(r.Free(gone).ok());
        live.erase(std::find(live.begin(), live.end(), gone));
        continue;
      }
      ASSERT_TRUE(st.ok()) << st;
      copies_seen += copies;
    } else if (kind == 6) {  // Fork.
      if (live.size() >= 6) continue;
      const SequenceId parent = live[rand(0, live.size() - 1)];
      ASSERT_TRUE(r.Fork(parent, next).ok());
      live.push_back(next++);
    } else if (kind <= 8) {  // Truncate, mostly a few tokens back.
      const SequenceId id = live[rand(0, live.size() - 1)];
      const int64_t len = *m.SequenceLength(id);
      const int64_t to = std::max<int64_t>(
          0, len - (rand(0, 3) == 0 ? rand(0, 40) : rand(0, 2 * kBlock)));
      const absl::Status st = r.Truncate(id, to);
      if (TruncateRefused(c, len, to)) {
        ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
        ASSERT_EQ(*m.SequenceLength(id), len);
        ++refused;
      } else {
        ASSERT_TRUE(st.ok()) << st << " truncating " << len << " to " << to;
        ASSERT_EQ(*m.SequenceLength(id), to);
        ++truncated;
      }
    } else {  // Free.
      const SequenceId gone = live[rand(0, live.size() - 1)];
      ASSERT_TRUE(r.Free(gone).ok());
      live.erase(std::find(live.begin(), live.end(), gone));
    }
    ASSERT_TRUE(m.Validate().ok()) << m.Validate();
    ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  }
  EXPECT_GT(copies_seen, 0);
  EXPECT_GT(truncated, 0);
  EXPECT_GT(speculative, 0);
  EXPECT_GT(removed, 0);
  EXPECT_EQ(m.Metrics().block_copies, copies_seen);
  std::printf("%s: %lld copies, %lld truncations (%lld refused)\n",
              GetParam().name.c_str(), static_cast<long long>(copies_seen),
              static_cast<long long>(truncated),
              static_cast<long long>(refused));
  for (SequenceId id : live) ASSERT_TRUE(r.Free(id).ok());
  EXPECT_EQ(m.Metrics().blocks_in_use, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Configs, GroupRewindTest,
    ::testing::Values(Scenario{"SlidingAndFull", SlidingAndFull()},
                      Scenario{"KOnlyHybrid", KOnlyHybrid()}),
    [](const ::testing::TestParamInfo<Scenario>& info) {
      return info.param.name;
    });

}  // namespace
}  // namespace kvcache
