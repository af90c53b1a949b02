// GroupBlockManager (allocator/group_block_manager.h): window release with
// kNullBlock entries, all-or-nothing Reserve across tables, hybrid prefix
// hits in a hand-made eviction order, the steady state of a Gemma-3-like
// model with 32k-token sequences, and Fork / Truncate / speculative Commit
// per table (copy-on-write, released entries, refusals below a window).

#include "allocator/group_block_manager.h"

#include <cstdint>
#include <numeric>
#include <vector>

#include "api/kv_cache_config.h"
#include "core/layer_group.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

std::unique_ptr<GroupBlockManager> Make(int32_t blocks, int32_t bs,
                                        std::vector<int32_t> windows,
                                        bool prefix = true) {
  GroupBlockManagerOptions o;
  o.num_blocks = blocks;
  o.block_size = bs;
  o.enable_prefix_caching = prefix;
  o.windows = std::move(windows);
  auto m = GroupBlockManager::Create(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(*m);
}

std::vector<TokenId> Iota(int n, TokenId first) {
  std::vector<TokenId> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

// Reserves and commits `n` more tokens of a sequence whose tokens are known.
void Step(GroupBlockManager& m, SequenceId id, int64_t n) {
  auto plan = m.Reserve({{id, {}, n}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(m.Commit(plan->id).ok());
  ASSERT_TRUE(m.Validate().ok()) << m.Validate();
}

TEST(GroupBlockManagerTest, CreateRejectsBadOptions) {
  GroupBlockManagerOptions o;
  o.num_blocks = 4;
  EXPECT_EQ(GroupBlockManager::Create(o).status().code(),
            absl::StatusCode::kInvalidArgument);  // No table.
  o.windows = {0, -3};
  auto bad = GroupBlockManager::Create(o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("windows[1] -3"), std::string::npos);
}

TEST(GroupBlockManagerTest, SlidingTableReleasesBlocksLeavingTheWindow) {
  // Block size 4, window 8: after C tokens the next token reads positions
  // >= C - 7, so blocks below floor((C - 7) / 4) are null.
  auto m = Make(64, 4, {0, 8}, /*prefix=*/false);
  ASSERT_TRUE(m->AddSequence(1, Iota(40, 1)).ok());
  for (int64_t c = 1; c <= 40; ++c) {
    Step(*m, 1, 1);
    const auto full = *m->BlockTable(1, 0);
    const auto window = *m->BlockTable(1, 1);
    const int64_t blocks = (c + 3) / 4;
    const int64_t first = std::max<int64_t>(0, c - 7) / 4;
    ASSERT_EQ(static_cast<int64_t>(full.size()), blocks);
    ASSERT_EQ(static_cast<int64_t>(window.size()), blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      EXPECT_NE(full[b], kNullBlock);
      EXPECT_EQ(window[b] == kNullBlock, b < first) << "c " << c << " b " << b;
    }
    EXPECT_EQ(m->Usage().used_blocks, blocks + (blocks - first));
  }
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Usage().free_blocks, 64);
  // The batch table pads with 0 and keeps the null entries.
  ASSERT_TRUE(m->AddSequence(2, Iota(20, 1)).ok());
  Step(*m, 2, 20);
  auto batch = m->BatchTable({2}, 1);
  ASSERT_TRUE(batch.ok());
  EXPECT_EQ(batch->max_blocks, 5);
  EXPECT_EQ(batch->table[0], kNullBlock);
  EXPECT_EQ(batch->table[2], kNullBlock);
  EXPECT_NE(batch->table[3], kNullBlock);
  EXPECT_EQ(batch->seq_lens[0], 20);
  EXPECT_EQ(m->BatchTable({2}, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GroupBlockManagerTest, ReserveIsAllOrNothingAcrossTables) {
  // Three tables: one block of tokens costs three pages.
  auto m = Make(10, 4, {0, 4, 0});
  ASSERT_TRUE(m->AddSequence(1, Iota(8, 1)).ok());
  ASSERT_TRUE(m->AddSequence(2, Iota(8, 100)).ok());
  // 2 blocks x 3 tables x 2 sequences = 12 pages > 10.
  auto refused = m->Reserve({{1, {}, 8}, {2, {}, 8}});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("needs 12 new blocks"),
            std::string::npos)
      << refused.status();
  EXPECT_EQ(m->Usage().free_blocks, 10);
  EXPECT_TRUE(m->Validate().ok());
  // 6 + 3 pages fit.
  auto plan = m->Reserve({{1, {}, 8}, {2, {}, 4}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->slot_mappings.size(), 3u);
  for (const auto& slots : plan->slot_mappings) EXPECT_EQ(slots.size(), 12u);
  EXPECT_EQ(m->Usage().used_blocks, 9);
  ASSERT_TRUE(m->Abort(plan->id).ok());
  EXPECT_EQ(m->Usage().free_blocks, 10);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(GroupBlockManagerTest, HybridHitIsTheLongestPrefixEveryTableServes) {
  // Full table 0 and sliding table 1 (window 8 = 2 blocks of 4). A commits
  // 40 tokens: its sliding blocks 0..7 leave the window (cached), then Free
  // caches the rest: LRU order S0..S7, F9..F0, S9, S8. The pool is exactly
  // the 20 pages A needed.
  auto m = Make(20, 4, {0, 8});
  std::vector<TokenId> a = Iota(40, 1);
  ASSERT_TRUE(m->AddSequence(1, a).ok());
  Step(*m, 1, 40);
  EXPECT_EQ(m->HeldBlocks(0), 10);
  EXPECT_EQ(m->HeldBlocks(1), 2);
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Usage().cached_blocks, 20);
  std::vector<TokenId> again = a;
  again.push_back(999);
  EXPECT_EQ(*m->PeekPrefix(again), 40);

  // B's 16 tokens take 8 pages: S0..S7 are evicted. The sliding table only
  // needs S8, S9 for a 40-token hit: still 40.
  ASSERT_TRUE(m->AddSequence(2, Iota(64, 5000)).ok());
  Step(*m, 2, 16);
  EXPECT_EQ(m->PrefixStats().evictions, 8);
  EXPECT_EQ(*m->PeekPrefix(again), 40);
  // 4 more tokens evict F9 and F8: the full table serves 8 blocks, but a
  // prefix of 8 blocks needs S6, S7 (gone), and so on down: no hit at all.
  Step(*m, 2, 4);
  EXPECT_EQ(m->PrefixStats().evictions, 10);
  EXPECT_EQ(*m->PeekPrefix(again), 0);
  auto hit = m->AddSequence(3, again);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ(*hit, 0);
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
}

TEST(GroupBlockManagerTest, SlidingHitHoldsOnlyTheWindowsBlocks) {
  auto m = Make(64, 4, {0, 8});
  std::vector<TokenId> a = Iota(41, 1);
  ASSERT_TRUE(m->AddSequence(1, a).ok());
  Step(*m, 1, 41);
  ASSERT_TRUE(m->Free(1).ok());
  auto hit = m->AddSequence(2, a);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ(*hit, 40);
  const auto window = *m->BlockTable(2, 1);
  ASSERT_EQ(window.size(), 10u);
  // A prefix of 40 tokens: the next token reads positions >= 33, block 8 on.
  for (int b = 0; b < 10; ++b) EXPECT_EQ(window[b] == kNullBlock, b < 8);
  EXPECT_EQ(m->HeldBlocks(0), 10);
  EXPECT_EQ(m->HeldBlocks(1), 2);
  EXPECT_TRUE(m->Validate().ok());
}

// Gemma 3 27B's shape: 62 layers, every sixth full, the rest sliding with a
// 1024-token window; 4 sequences of 32k tokens.
TEST(GroupBlockManagerTest, GemmaLikeSteadyStateHoldsOnlyTheWindows) {
  KVCacheConfig c;
  c.num_layers = 62;
  c.block_size = 16;
  c.num_blocks = 1;
  LayerGroup sliding, full;
  sliding.kind = AttentionKind::kSlidingWindow;
  sliding.sliding_window = 1024;
  for (LayerGroup* g : {&sliding, &full}) {
    g->num_kv_heads = 16;
    g->head_size = 128;
    g->head_size_v = 128;
  }
  for (int32_t l = 0; l < 62; ++l) {
    (l % 6 == 5 ? full : sliding).layers.push_back(l);
  }
  c.layer_groups = {sliding, full};
  ASSERT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
  const GroupPaging paging = ConfigPaging(c);
  EXPECT_EQ(paging.layers_per_page, 2);
  std::vector<int32_t> windows;
  int32_t num_full = 0, num_sliding = 0;
  for (const GroupTable& t : paging.tables) {
    windows.push_back(t.sliding_window);
    (t.sliding_window == 0 ? num_full : num_sliding)++;
  }
  EXPECT_EQ(num_full, 5);
  EXPECT_EQ(num_sliding, 26);

  constexpr int64_t kLen = 32768, kSeqs = 4, kBs = 16, kWindowBlocks = 64;
  // A chunk of 2048 tokens is written whole (128 blocks per table) before
  // its Commit releases what left the window.
  auto m = Make(70000, kBs, windows);
  for (SequenceId id = 0; id < kSeqs; ++id) {
    ASSERT_TRUE(m->AddSequence(id, Iota(kLen, id * kLen + 1)).ok());
  }
  auto check = [&](int64_t computed) {
    const int64_t blocks = (computed + kBs - 1) / kBs;
    const int64_t kept =
        blocks - std::max<int64_t>(0, computed - 1024 + 1) / kBs;
    ASSERT_LE(kept, kWindowBlocks + 1);
    // Exactly what the windows need, and never more than full tables plus
    // one window (+1 partial block) per sliding table.
    EXPECT_EQ(m->Usage().used_blocks,
              kSeqs * (num_full * blocks + num_sliding * kept));
    EXPECT_LE(m->Usage().used_blocks,
              kSeqs * (num_full * blocks + num_sliding * (kWindowBlocks + 1)));
  };
  int64_t computed = 0;
  for (; computed < kLen - 64; computed += 2048) {
    const int64_t n = std::min<int64_t>(2048, kLen - 64 - computed);
    std::vector<ReserveRequest> batch;
    for (SequenceId id = 0; id < kSeqs; ++id) batch.push_back({id, {}, n});
    auto plan = m->Reserve(batch);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_TRUE(m->Commit(plan->id).ok());
    if (computed + n > kLen - 64) computed = kLen - 64 - n;
    check(computed + n);
  }
  computed = kLen - 64;
  for (; computed < kLen; ++computed) {  // Decode steps.
    std::vector<ReserveRequest> batch;
    for (SequenceId id = 0; id < kSeqs; ++id) batch.push_back({id, {}, 1});
    auto plan = m->Reserve(batch);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_TRUE(m->Commit(plan->id).ok());
    check(computed + 1);
  }
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
  // Against every layer full: 31 tables x 2048 blocks per sequence.
  const int64_t all_full = kSeqs * 31 * (kLen / kBs);
  EXPECT_LT(m->Usage().used_blocks * 4, all_full);
}

TEST(GroupBlockManagerTest, ForkSharesEveryTableAndCopiesThePartialTail) {
  // Block size 4, window 8, full table 0: 14 computed tokens -> the sliding
  // table released block 0 ((14 - 7) / 4 = 1).
  auto m = Make(64, 4, {0, 8}, /*prefix=*/false);
  ASSERT_TRUE(m->AddSequence(1, Iota(14, 100)).ok());
  Step(*m, 1, 14);
  ASSERT_EQ((*m->BlockTable(1, 1))[0], kNullBlock);
  const int64_t used = m->Usage().used_blocks;
  ASSERT_TRUE(m->Fork(1, 2).ok());
  EXPECT_EQ(m->Usage().used_blocks, used);  // Shared, not copied.
  for (int32_t t = 0; t < 2; ++t) {
    const auto parent = *m->BlockTable(1, t);
    const auto child = *m->BlockTable(2, t);
    EXPECT_EQ(std::vector<BlockId>(parent.begin(), parent.end()),
              std::vector<BlockId>(child.begin(), child.end()));
  }
  EXPECT_EQ(m->HeldBlocks(0), 8);
  EXPECT_EQ(m->HeldBlocks(1), 6);
  EXPECT_EQ(m->Fork(1, 2).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m->Fork(9, 3).code(), absl::StatusCode::kNotFound);
  // The child's next step writes into copies of both tables' last block
  // (block 3, tokens 12..15); the parent's stay.
  const BlockId tail0 = (*m->BlockTable(1, 0))[3];
  const BlockId tail1 = (*m->BlockTable(1, 1))[3];
  auto plan = m->Reserve({{2, {7}, 1}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->copies.size(), 2u);
  EXPECT_EQ(plan->copies[0].src, tail0);
  EXPECT_EQ(plan->copies[1].src, tail1);
  EXPECT_EQ((*m->BlockTable(2, 0))[3], plan->copies[0].dst);
  EXPECT_EQ(plan->slot_mappings[0][0], plan->copies[0].dst * 4 + 2);
  EXPECT_EQ(m->Fork(2, 3).code(), absl::StatusCode::kFailedPrecondition);
  // Abort puts the shared blocks back; a second Reserve copies again.
  ASSERT_TRUE(m->Abort(plan->id).ok());
  EXPECT_EQ((*m->BlockTable(2, 0))[3], tail0);
  EXPECT_EQ(m->Usage().used_blocks, used);
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
  plan = m->Reserve({{2, {7}, 1}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
  EXPECT_EQ(m->Usage().used_blocks, used + 2);
  // The parent is the last holder now: it writes in place.
  plan = m->Reserve({{1, {8}, 1}});
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->copies.empty());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  ASSERT_TRUE(m->Free(1).ok());
  ASSERT_TRUE(m->Free(2).ok());
  EXPECT_EQ(m->Usage().used_blocks, 0);
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
}

TEST(GroupBlockManagerTest, TruncateBelowTheWindowIsRefused) {
  auto m = Make(64, 4, {0, 8}, /*prefix=*/false);
  ASSERT_TRUE(m->AddSequence(1, Iota(21, 100)).ok());
  Step(*m, 1, 21);
  // (21 - 7) / 4 = 3: blocks 0..2 of the sliding table are released. At
  // length L the window reads from L - 7: L >= 19 keeps block 3 the first.
  ASSERT_EQ(m->HeldBlocks(1), 3);
  const absl::Status refused = m->Truncate(1, 18);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.message().find("to 18 tokens"), std::string::npos)
      << refused;
  EXPECT_NE(refused.message().find("sliding window of 8"), std::string::npos);
  EXPECT_NE(refused.message().find("at least 19"), std::string::npos);
  EXPECT_EQ(*m->ComputedLength(1), 21);
  EXPECT_EQ(m->HeldBlocks(0), 6);
  EXPECT_EQ(m->Truncate(1, 22).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(m->Truncate(1, 19).ok());
  EXPECT_EQ(*m->ComputedLength(1), 19);
  EXPECT_EQ(*m->KnownLength(1), 19);
  EXPECT_EQ(m->HeldBlocks(0), 5);
  EXPECT_EQ(m->HeldBlocks(1), 2);
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
  // Not shared, not registered: the partial tail is written in place.
  auto plan = m->Reserve({{1, {5, 6}, 2}});
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->copies.empty());
  // A full-attention-only sequence truncates to any length.
  auto full = Make(16, 4, {0});
  ASSERT_TRUE(full->AddSequence(1, Iota(9, 0)).ok());
  Step(*full, 1, 9);
  ASSERT_TRUE(full->Truncate(1, 0).ok());
  EXPECT_EQ(full->Usage().used_blocks, 0);
  // Truncated into a registered block: the next Reserve copies it and the
  // cached block keeps its tokens (a new prompt still hits it).
  ASSERT_TRUE(full->Free(1).ok());
  ASSERT_EQ(*full->AddSequence(2, Iota(9, 0)), 8);  // The cached blocks.
  Step(*full, 2, 1);
  ASSERT_TRUE(full->Truncate(2, 6).ok());
  plan = full->Reserve({{2, {50}, 1}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->copies.size(), 1u);
  ASSERT_TRUE(full->Commit(plan->id).ok());
  EXPECT_EQ(*full->PeekPrefix(Iota(9, 0)), 8);
  ASSERT_TRUE(full->Validate().ok()) << full->Validate();
}

TEST(GroupBlockManagerTest, SpeculativeCommitRollsBackEveryTable) {
  auto m = Make(64, 4, {0, 6, 0});
  ASSERT_TRUE(m->AddSequence(1, Iota(6, 0)).ok());
  ASSERT_TRUE(m->AddSequence(2, Iota(3, 40)).ok());
  auto plan = m->Reserve({{1, {}, 6}, {2, {}, 3}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  // Sampled token + 5 drafts for 1 (tokens 6..11: blocks 1, 2), 3 for 2.
  plan = m->Reserve({{1, {1, 2, 3, 4, 5, 6}, 6}, {2, {7, 8, 9}, 3}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ((*m->BlockTable(1, 0)).size(), 3u);
  const std::vector<int64_t> wrong_size = {1};
  EXPECT_EQ(m->Commit(plan->id, wrong_size).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int64_t> too_many = {7, 0};
  EXPECT_EQ(m->Commit(plan->id, too_many).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int64_t> accepted = {1, 0};
  ASSERT_TRUE(m->Commit(plan->id, accepted).ok());
  EXPECT_EQ(*m->ComputedLength(1), 7);
  EXPECT_EQ(*m->KnownLength(1), 7);
  EXPECT_EQ(*m->ComputedLength(2), 3);
  EXPECT_EQ(*m->KnownLength(2), 3);
  for (int32_t t = 0; t < 3; ++t) {
    EXPECT_EQ((*m->BlockTable(1, t)).size(), 2u) << t;
    EXPECT_EQ((*m->BlockTable(2, t)).size(), 1u) << t;
  }
  // Window 6 at 7 tokens: (7 - 5) / 4 = 0 released.
  EXPECT_NE((*m->BlockTable(1, 1))[0], kNullBlock);
  // 2 + 2 + 2 blocks of sequence 1 and 1 + 1 + 1 of sequence 2.
  EXPECT_EQ(m->Usage().used_blocks, 9);
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
  // Only full blocks of accepted tokens were registered: block 1 of
  // sequence 1 (tokens 4..7) is not full.
  EXPECT_EQ(*m->PeekPrefix(Iota(9, 0)), 4);
}

TEST(GroupBlockManagerTest, RemoveFromPlanLeavesTheOthers) {
  auto m = Make(64, 4, {0, 8});
  ASSERT_TRUE(m->AddSequence(1, Iota(5, 0)).ok());
  ASSERT_TRUE(m->AddSequence(2, Iota(5, 10)).ok());
  auto plan = m->Reserve({{1, {}, 5}, {2, {}, 5}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(m->RemoveFromPlan(plan->id, 3).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->RemoveFromPlan(plan->id + 1, 1).code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(m->RemoveFromPlan(plan->id, 1).ok());
  EXPECT_EQ(m->RemoveFromPlan(plan->id, 1).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*m->BlockTable(1, 0)).size(), 0u);
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_EQ(*m->ComputedLength(1), 0);
  EXPECT_EQ(*m->ComputedLength(2), 5);
  ASSERT_TRUE(m->Validate().ok()) << m->Validate();
}

}  // namespace
}  // namespace kvcache
