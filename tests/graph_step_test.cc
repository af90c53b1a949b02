// The graph-capturable step on the CPU backend (issue #14): the padded step
// inputs ReserveGraphStep writes (slot mapping padded with -1, positions,
// sequence lengths including the step's tokens, block tables) checked against
// the plan and the allocator's own tables at every step of a random scenario
// with forks and prefix hits; caches and scales byte-identical to the same
// steps through plain Reserve/Append/Commit; how Commit knows a graph step is
// complete; the graph step's errors; KnownLength; Gather's asynchronous,
// batched, empty and in-flight forms. KVCACHE_TEST_SEED=<n> reruns one seed.

#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/kv_reference.h"
#include "testing/test_seed.h"
#include "tests/graph_step_scenario.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;
using testing::ScenarioOptions;
using testing::StepKV;

TensorView KView(const ScenarioOptions& o, const StepKV& kv, int layer,
                 int64_t rows) {
  return TensorView::Contiguous(const_cast<uint16_t*>(kv.k[layer].data()),
                                DType::kBFloat16,
                                {rows, o.num_kv_heads, o.head_size});
}
TensorView VView(const ScenarioOptions& o, const StepKV& kv, int layer,
                 int64_t rows) {
  return TensorView::Contiguous(const_cast<uint16_t*>(kv.v[layer].data()),
                                DType::kBFloat16,
                                {rows, o.num_kv_heads, o.head_size_v});
}

absl::Status AppendAll(KVCacheManager& m, const ScenarioOptions& o,
                       uint64_t plan, const StepKV& kv, int64_t rows) {
  for (int layer = 0; layer < o.num_layers; ++layer) {
    absl::Status s = m.Append(plan, layer, KView(o, kv, layer, rows),
                              VView(o, kv, layer, rows));
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// Plain steps: Reserve, Append of the step's own tokens, Commit.
class PlainRunner : public testing::StepRunner {
 public:
  explicit PlainRunner(const ScenarioOptions& o) : o_(o) {}
  absl::Status Prefill(KVCacheManager& m,
                       absl::Span<const ReserveRequest> batch,
                       const StepKV& kv) override {
    absl::StatusOr<StepPlanInfo> plan = m.Reserve(batch);
    if (!plan.ok()) return plan.status();
    if (absl::Status s = AppendAll(m, o_, plan->id, kv, plan->num_tokens);
        !s.ok()) {
      return s;
    }
    return m.Commit(plan->id);
  }
  absl::Status Decode(KVCacheManager& m, absl::Span<const ReserveRequest> batch,
                      int64_t, const StepKV& kv) override {
    return Prefill(m, batch, kv);
  }

 private:
  const ScenarioOptions o_;
};

// Graph steps run eagerly (no graph on the CPU): ReserveGraphStep, a check of
// every step input, Appends of the whole padded batch, Commit.
class GraphRunner : public PlainRunner {
 public:
  explicit GraphRunner(const ScenarioOptions& o) : PlainRunner(o), o_(o) {}
  absl::Status Decode(KVCacheManager& m, absl::Span<const ReserveRequest> batch,
                      int64_t padded, const StepKV& kv) override {
    // Lengths and tables before the step, from the public lookups.
    std::vector<int64_t> before;
    for (const ReserveRequest& r : batch) {
      before.push_back(*m.SequenceLength(r.sequence));
    }
    absl::StatusOr<StepPlanInfo> plan = m.ReserveGraphStep(batch, padded);
    if (!plan.ok()) return plan.status();
    if (plan->graph_tokens != padded) {
      return absl::InternalError("graph_tokens not reported");
    }
    if (m.NumBlockTables() > 1) {
      // Layer groups: each table's inputs are checked by
      // graph_step_groups_test; here the caches.
      if (absl::Status s = AppendAll(m, o_, plan->id, kv, padded); !s.ok()) {
        return s;
      }
      ++checked_steps;
      return m.Commit(plan->id);
    }
    const GraphStepInputs in = *m.GraphStep();
    if (plan->slot_mapping != in.slot_mapping) {
      return absl::InternalError("plan slot mapping is not the graph step's");
    }
    const int64_t t = plan->num_tokens;
    for (int64_t i = 0; i < in.max_tokens; ++i) {
      const int64_t want = i < t ? plan->host_slot_mapping[i] : -1;
      if (in.slot_mapping[i] != want) {
        return absl::InternalError(absl::StrCat(
            "slot_mapping[", i, "] = ", in.slot_mapping[i], ", want ", want));
      }
    }
    std::vector<int64_t> positions(in.max_tokens, 0);
    for (size_t s = 0; s < batch.size(); ++s) {
      const PlanSequence& row = plan->sequences[s];
      if (row.sequence != batch[s].sequence ||
          row.first_position != before[s]) {
        return absl::InternalError(absl::StrCat("plan row ", s));
      }
      for (int64_t j = 0; j < row.num_tokens; ++j) {
        positions[row.slot_offset + j] = before[s] + j;
      }
      if (in.seq_lens[s] != before[s] + batch[s].num_tokens) {
        return absl::InternalError(
            absl::StrCat("seq_lens[", s, "] = ", in.seq_lens[s], ", want ",
                         before[s] + batch[s].num_tokens));
      }
      const std::vector<BlockId> table = *m.BlockTable(batch[s].sequence);
      for (int32_t c = 0; c < in.row_stride; ++c) {
        const int32_t want =
            c < static_cast<int32_t>(table.size()) ? table[c] : 0;
        if (in.block_table[s * in.row_stride + c] != want) {
          return absl::InternalError(absl::StrCat(
              "block_table[", s, ", ", c,
              "] = ", in.block_table[s * in.row_stride + c], ", want ", want));
        }
      }
      // The table covers every slot the step writes.
      for (int64_t j = 0; j < row.num_tokens; ++j) {
        const int64_t slot = plan->host_slot_mapping[row.slot_offset + j];
        const int64_t pos = before[s] + j;
        if (slot !=
            table[pos / o_.block_size] * o_.block_size + pos % o_.block_size) {
          return absl::InternalError(absl::StrCat("slot of row ", s));
        }
      }
    }
    for (int64_t i = 0; i < in.max_tokens; ++i) {
      if (in.positions[i] != positions[i]) {
        return absl::InternalError(absl::StrCat(
            "positions[", i, "] = ", in.positions[i], ", want ", positions[i]));
      }
    }
    for (int32_t s = static_cast<int32_t>(batch.size()); s < in.max_sequences;
         ++s) {
      if (in.seq_lens[s] != 0) return absl::InternalError("padding seq_lens");
      for (int32_t c = 0; c < in.row_stride; ++c) {
        if (in.block_table[s * in.row_stride + c] != 0) {
          return absl::InternalError(
              absl::StrCat("padding block_table row ", s, " column ", c));
        }
      }
    }
    ++checked_steps;
    if (absl::Status s = AppendAll(m, o_, plan->id, kv, padded); !s.ok()) {
      return s;
    }
    return m.Commit(plan->id);
  }
  int64_t checked_steps = 0;

 private:
  const ScenarioOptions o_;
};

absl::Status HostCopy(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

TEST(GraphStepTest, PaddedStepInputsAndCachesMatchPlainSteps) {
  // The uniform config per cache dtype, then layer groups (sliding window 6
  // and full; the scenario's sequences outgrow the window).
  for (auto [cache, window] : {std::pair{DType::kInt8, 0},
                               {DType::kFp8E4M3, 0},
                               {DType::kBFloat16, 0},
                               {DType::kInt8, 6}}) {
    const uint64_t seed = kvcache::testing::TestSeed();
    SCOPED_TRACE(absl::StrCat("seed ", seed, " cache ", DTypeName(cache),
                              " window ", window));
    ScenarioOptions o;
    o.seed = seed;
    o.cache_dtype = cache;
    o.sliding_window = window;
    auto plain = KVCacheManager::Create(
        testing::ScenarioConfig(o, Backend::kCpu, /*graph=*/false));
    auto graph = KVCacheManager::Create(
        testing::ScenarioConfig(o, Backend::kCpu, /*graph=*/true));
    ASSERT_TRUE(plain.ok()) << plain.status();
    ASSERT_TRUE(graph.ok()) << graph.status();
    PlainRunner plain_runner(o);
    GraphRunner graph_runner(o);
    testing::ScenarioCounts plain_counts, graph_counts;
    ASSERT_TRUE(
        testing::RunScenario(o, **plain, plain_runner, &plain_counts).ok());
    const absl::Status s =
        testing::RunScenario(o, **graph, graph_runner, &graph_counts);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(graph_runner.checked_steps, o.steps);
    // The scenario did what it is for.
    EXPECT_GT(graph_counts.padded_steps, 0);
    EXPECT_GT(graph_counts.forks, 0);
    EXPECT_GT(graph_counts.prefix_hit_tokens, 0);
    EXPECT_GT(graph_counts.block_copies, 0);
    EXPECT_EQ(graph_counts.block_copies, plain_counts.block_copies);
    auto a = testing::CacheBytes(**plain, HostCopy);
    auto b = testing::CacheBytes(**graph, HostCopy);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_TRUE(*a == *b) << "caches or scales differ";
    EXPECT_TRUE((*graph)->Validate().ok());
  }
}

class GraphStepRulesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    o_.num_layers = 3;
    auto m = KVCacheManager::Create(
        testing::ScenarioConfig(o_, Backend::kCpu, /*graph=*/true));
    ASSERT_TRUE(m.ok()) << m.status();
    m_ = *std::move(m);
    for (SequenceId id = 1; id <= 3; ++id) {
      ASSERT_TRUE(
          m_->AddSequence(id, {1, 2, 3, static_cast<TokenId>(id)}).ok());
      PlainRunner runner(o_);
      std::mt19937_64 rng(id);
      StepKV kv = Kv(4);
      ASSERT_TRUE(runner.Prefill(*m_, {ReserveRequest{id, {}, 4}}, kv).ok());
    }
  }
  StepKV Kv(int64_t rows) {
    StepKV kv;
    kv.rows = rows;
    for (int l = 0; l < o_.num_layers; ++l) {
      kv.k.emplace_back(rows * o_.num_kv_heads * o_.head_size, 0x3f80);
      kv.v.emplace_back(rows * o_.num_kv_heads * o_.head_size_v, 0xbf80);
    }
    return kv;
  }
  std::vector<ReserveRequest> Batch(int n) {
    std::vector<ReserveRequest> b;
    for (int i = 1; i <= n; ++i) b.push_back(ReserveRequest{i, {9}, 1});
    return b;
  }
  ScenarioOptions o_;
  std::unique_ptr<KVCacheManager> m_;
};

TEST_F(GraphStepRulesTest, CommitKnowsTheStepFromItsCapture) {
  const int64_t padded = o_.capture_tokens;
  StepKV kv = Kv(padded);
  // A step of a size never captured, with no Append seen: refused.
  auto plan = m_->ReserveGraphStep(Batch(2), padded);
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::Status s = m_->Commit(plan->id);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("no Append ran on the host"));
  // A capture missing a layer: refused, naming it.
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(m_->Append(plan->id, layer, KView(o_, kv, layer, padded),
                           VView(o_, kv, layer, padded))
                    .ok());
  }
  s = m_->Commit(plan->id);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("layer 2 holds 0 of its 8 tokens"));
  // Warm-up then capture: every layer twice is still one complete step.
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE(AppendAll(*m_, o_, plan->id, kv, padded).ok());
  }
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  // Replays: no Append on the host, committed as complete.
  for (int n = 1; n <= 3; ++n) {
    auto replay = m_->ReserveGraphStep(Batch(n), padded);
    ASSERT_TRUE(replay.ok()) << replay.status();
    ASSERT_TRUE(m_->Commit(replay->id).ok());
  }
  // Another padded size is its own capture.
  auto other = m_->ReserveGraphStep(Batch(1), padded - 1);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(m_->Commit(other->id).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(m_->Abort(other->id).ok());
  EXPECT_TRUE(m_->Validate().ok());
}

TEST_F(GraphStepRulesTest, RefusesBadGraphStepsChangingNothing) {
  const int64_t padded = o_.capture_tokens;
  int64_t free_blocks = m_->FreeBlocks();
  auto expect = [&](absl::StatusOr<StepPlanInfo> p, absl::StatusCode code,
                    const std::string& text) {
    EXPECT_EQ(p.status().code(), code) << p.status();
    EXPECT_THAT(std::string(p.status().message()), HasSubstr(text));
    EXPECT_EQ(m_->FreeBlocks(), free_blocks);
    EXPECT_EQ(*m_->SequenceLength(1), 4);
  };
  expect(m_->ReserveGraphStep(Batch(3), 2), absl::StatusCode::kInvalidArgument,
         "graph step of 3 tokens padded to only 2 tokens");
  expect(m_->ReserveGraphStep(Batch(1), 0), absl::StatusCode::kInvalidArgument,
         "graph step padded to 0 tokens: expected 1 to graph_max_tokens 8");
  expect(m_->ReserveGraphStep(Batch(1), padded + 1),
         absl::StatusCode::kInvalidArgument, "graph_max_tokens 8");
  auto plan = m_->ReserveGraphStep({ReserveRequest{3, {9}, 1}}, padded);
  ASSERT_TRUE(plan.ok());
  free_blocks = m_->FreeBlocks();
  expect(m_->ReserveGraphStep(Batch(2), padded),
         absl::StatusCode::kFailedPrecondition, "is in flight");
  // Append must be given the padded count.
  StepKV kv = Kv(padded);
  absl::Status s =
      m_->Append(plan->id, 0, KView(o_, kv, 0, 1), VView(o_, kv, 0, 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("expected its padded count 8"));
  ASSERT_TRUE(m_->Abort(plan->id).ok());
  // A manager without graph buffers.
  auto plain = KVCacheManager::Create(
      testing::ScenarioConfig(o_, Backend::kCpu, /*graph=*/false));
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->GraphStep().status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*plain)->AddSequence(1, {1, 2}).ok());
  EXPECT_EQ(
      (*plain)->ReserveGraphStep({ReserveRequest{1, {}, 2}}, 4).status().code(),
      absl::StatusCode::kFailedPrecondition);
  // The config's limit.
  KVCacheConfig c = testing::ScenarioConfig(o_, Backend::kCpu, true);
  c.graph_max_tokens = c.max_tokens_per_step + 1;
  EXPECT_THAT(std::string(KVCacheManager::Create(c).status().message()),
              HasSubstr("graph_max_tokens 65 exceeds 64"));
}

TEST_F(GraphStepRulesTest, RemoveFromPlanPadsTheGraphSlots) {
  auto plan = m_->ReserveGraphStep(Batch(3), o_.capture_tokens);
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m_->RemoveFromPlan(plan->id, 2).ok());
  const GraphStepInputs in = *m_->GraphStep();
  EXPECT_EQ(in.slot_mapping[0], plan->host_slot_mapping[0]);
  EXPECT_EQ(in.slot_mapping[1], -1);
  EXPECT_EQ(in.slot_mapping[2], plan->host_slot_mapping[2]);
  ASSERT_TRUE(m_->Abort(plan->id).ok());
}

TEST_F(GraphStepRulesTest, KnownLengthCountsReservedAndPendingTokens) {
  EXPECT_EQ(*m_->KnownLength(1), 4);
  EXPECT_EQ(*m_->SequenceLength(1), 4);
  auto plan = m_->Reserve({ReserveRequest{1, {7, 8}, 2}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(*m_->SequenceLength(1), 4);
  EXPECT_EQ(*m_->KnownLength(1), 6);
  ASSERT_TRUE(m_->Abort(plan->id).ok());
  EXPECT_EQ(m_->KnownLength(99).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(GraphStepRulesTest, GatherEmptyBatchedAndInFlight) {
  const int layer = 1;
  const int h = o_.num_kv_heads, d = o_.head_size, dv = o_.head_size_v;
  std::vector<float> k(16 * h * d), v(16 * h * dv);
  auto out = [&](float* p, int64_t rows, int dim) {
    return TensorView::Contiguous(p, DType::kFloat32, {rows, h, dim});
  };
  // Count 0 is an empty success, in every form.
  EXPECT_TRUE(
      m_->Gather(1, layer, 4, 0, out(k.data(), 1, d), out(v.data(), 1, dv))
          .ok());
  EXPECT_TRUE(
      m_->GatherBatch({}, layer, out(k.data(), 1, d), out(v.data(), 1, dv))
          .ok());
  // Batched equals one Gather per sequence, concatenated.
  std::vector<GatherRequest> requests = {{1, 1, 3}, {2, 0, 0}, {3, 0, 4}};
  ASSERT_TRUE(m_->GatherBatch(requests, layer, out(k.data(), 7, d),
                              out(v.data(), 7, dv))
                  .ok());
  std::vector<float> k1(7 * h * d), v1(7 * h * dv);
  ASSERT_TRUE(
      m_->Gather(1, layer, 1, 3, out(k1.data(), 3, d), out(v1.data(), 3, dv))
          .ok());
  ASSERT_TRUE(m_->GatherAsync(3, layer, 0, 4, out(k1.data() + 3 * h * d, 4, d),
                              out(v1.data() + 3 * h * dv, 4, dv))
                  .ok());
  EXPECT_EQ(std::vector<float>(k.begin(), k.begin() + 7 * h * d), k1);
  EXPECT_EQ(std::vector<float>(v.begin(), v.begin() + 7 * h * dv), v1);
  // In flight: sequence 2's two new tokens, appended to layers 0 and 1 only.
  auto plan =
      m_->Reserve({ReserveRequest{1, {5}, 1}, ReserveRequest{2, {5, 6}, 2}});
  ASSERT_TRUE(plan.ok());
  StepKV kv = Kv(3);
  for (size_t i = 0; i < kv.k[layer].size(); ++i) {
    kv.k[layer][i] = testing::FloatToBf16(0.25f * (i % 7));
  }
  for (int l = 0; l < 2; ++l) {
    ASSERT_TRUE(
        m_->Append(plan->id, l, KView(o_, kv, l, 3), VView(o_, kv, l, 3)).ok());
  }
  GatherOptions in_flight;
  in_flight.include_in_flight = true;
  absl::Status s = m_->GatherAsync(2, layer, 4, 2, out(k.data(), 2, d),
                                   out(v.data(), 2, dv));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("it has 4 computed tokens"));
  ASSERT_TRUE(m_->GatherAsync(2, layer, 4, 2, out(k.data(), 2, d),
                              out(v.data(), 2, dv), in_flight)
                  .ok());
  // Layer 2 holds none of them yet.
  s = m_->GatherAsync(2, 2, 4, 1, out(k.data() + 2 * h * d, 1, d),
                      out(v.data() + 2 * h * dv, 1, dv), in_flight);
  EXPECT_THAT(s.message(), HasSubstr("it has 4 readable tokens"));
  ASSERT_TRUE(
      m_->Append(plan->id, 2, KView(o_, kv, 2, 3), VView(o_, kv, 2, 3)).ok());
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  ASSERT_TRUE(
      m_->Gather(2, layer, 4, 2, out(k1.data(), 2, d), out(v1.data(), 2, dv))
          .ok());
  EXPECT_EQ(std::vector<float>(k.begin(), k.begin() + 2 * h * d),
            std::vector<float>(k1.begin(), k1.begin() + 2 * h * d));
  // What was read matches what was appended (row 1, 2 of the step), to the
  // int8 rounding.
  for (int i = 0; i < 2 * h * d; ++i) {
    EXPECT_NEAR(k[i], testing::Bf16ToFloat(kv.k[layer][h * d + i]), 0.02f);
  }
}

}  // namespace
}  // namespace kvcache
