// The graph step of a manager with layer groups on the CPU backend (a replay
// is just the calls): random steps (joins with prefix hits, leaves, forks,
// rewinds, sliding-window releases, prefill chunks through Reserve, decode
// graph steps padded to powers of two, RemoveFromPlan inside a graph step)
// on a Gemma-like config (sliding + full) and a K-only one. After every
// ReserveGraphStep each table's fixed-address slot mapping and block table,
// and the shared positions and lengths, are checked against a recomputation
// from the per-table GroupBlockTable lookups (released entries -1, padding
// -1 / 0, rows past the batch zeros); the Appends go through the graph-step
// plan and every layer's gathered K/V is checked against the reference
// (tests/group_runner.h). Both upload methods (per run of changed bytes, and
// the GPU's one copy). KVCACHE_TEST_SEED=<n> reruns one seed.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "tests/group_runner.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int kBlock = 4;
constexpr int kGraphTokens = 8;  // graph_max_tokens
constexpr int kCols = 40;        // max_blocks_per_sequence
constexpr int kMaxLength = 120;  // Longer sequences are freed.

std::vector<uint64_t> Seeds() {
  if (const char* s = std::getenv("KVCACHE_TEST_SEED")) {
    return {std::strtoull(s, nullptr, 10)};
  }
  std::random_device rd;
  return {1, 2, rd(), rd()};
}

// 12 layers: 5 and 11 full, the others sliding (window 10): 5 sliding
// tables and 1 full table.
KVCacheConfig GemmaLike() {
  testing::HybridSpec spec;
  spec.num_layers = 12;
  spec.sliding_layers = {0, 1, 2, 3, 4, 6, 7, 8, 9, 10};
  spec.full_layers = {5, 11};
  spec.window = 10;
  spec.num_kv_heads = 2;
  spec.head_size = 16;
  spec.head_size_v = 16;
  spec.num_blocks = 900;
  spec.block_size = kBlock;
  KVCacheConfig c = testing::HybridConfig(spec);
  c.max_blocks_per_sequence = kCols;
  c.graph_max_tokens = kGraphTokens;
  return c;
}

// K-only latent caches (MLA-like, one head of 64): two full layers and two
// sliding ones (window 7), fp8.
KVCacheConfig KOnly() {
  testing::HybridSpec spec;
  spec.num_layers = 4;
  spec.sliding_layers = {1, 3};
  spec.full_layers = {0, 2};
  spec.window = 7;
  spec.num_kv_heads = 1;
  spec.head_size = 64;
  spec.head_size_v = 0;
  spec.cache_dtype = DType::kFp8E4M3;
  spec.num_blocks = 500;
  spec.block_size = kBlock;
  spec.full_first = true;
  KVCacheConfig c = testing::HybridConfig(spec);
  c.max_blocks_per_sequence = kCols;
  c.graph_max_tokens = kGraphTokens;
  return c;
}

int64_t PowerOfTwoAtLeast(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

class Scenario {
 public:
  Scenario(const KVCacheConfig& config, uint64_t seed, bool coalesce)
      : rng_(seed) {
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config);
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) return;
    m_ = *std::move(m);
    if (coalesce) KVCacheManagerTestPeer::CoalesceGraphStepUploads(*m_);
    runner_ =
        std::make_unique<testing::GroupRunner>(m_.get(), device_.get(), seed);
    tables_ = m_->NumBlockTables();
    for (int32_t t = 0; t < tables_; ++t) {
      absl::StatusOr<GraphStepInputs> in = m_->GroupGraphStep(t);
      EXPECT_TRUE(in.ok()) << in.status();
      if (in.ok()) inputs_.push_back(*in);
    }
  }

  bool ok() const {
    return m_ != nullptr && static_cast<int32_t>(inputs_.size()) == tables_;
  }
  int64_t null_entries_seen() const { return null_entries_seen_; }
  int64_t graph_steps() const { return graph_steps_; }

  // Each table's inputs against a recomputation from GroupBlockTable (a
  // sequence in `removed` only has its slots checked: -1).
  absl::Status CheckInputs(const StepPlanInfo& plan,
                           std::optional<SequenceId> removed) {
    for (int32_t t = 0; t < tables_; ++t) {
      absl::StatusOr<GraphStepInputs> now = m_->GroupGraphStep(t);
      if (!now.ok()) return now.status();
      const GraphStepInputs& in = inputs_[t];
      // Fixed addresses, limits as configured, shared positions / lengths.
      if (now->slot_mapping != in.slot_mapping ||
          now->block_table != in.block_table ||
          now->positions != inputs_[0].positions ||
          now->seq_lens != inputs_[0].seq_lens ||
          in.max_tokens != kGraphTokens || in.max_sequences != 8 ||
          in.row_stride != tables_ * kCols) {
        return absl::InternalError(absl::StrCat("table ", t, ": inputs moved"));
      }
      const int32_t cols = in.row_stride / tables_;
      int64_t token = 0;
      int32_t row = 0;
      for (const PlanSequence& ps : plan.sequences) {
        const bool gone = removed == ps.sequence;
        absl::StatusOr<std::vector<BlockId>> table =
            m_->GroupBlockTable(ps.sequence, t);
        if (!table.ok()) return table.status();
        for (int64_t j = 0; j < ps.num_tokens; ++j, ++token) {
          const int64_t p = ps.first_position + j;
          const int64_t want_slot =
              gone ? -1 : int64_t{(*table)[p / kBlock]} * kBlock + p % kBlock;
          if (in.slot_mapping[token] != want_slot) {
            return absl::InternalError(absl::StrCat(
                "table ", t, " slot_mapping[", token, "] (sequence ",
                ps.sequence, " position ", p, ") = ", in.slot_mapping[token],
                ", want ", want_slot));
          }
          if (in.positions[token] != p) {
            return absl::InternalError(absl::StrCat("positions[", token,
                                                    "] = ", in.positions[token],
                                                    ", want ", p));
          }
        }
        if (in.seq_lens[row] != ps.first_position + ps.num_tokens) {
          return absl::InternalError(
              absl::StrCat("seq_lens[", row, "] = ", in.seq_lens[row],
                           ", want ", ps.first_position + ps.num_tokens));
        }
        if (!gone) {
          const int32_t* r = in.block_table + int64_t{row} * in.row_stride;
          for (int32_t c = 0; c < cols; ++c) {
            const int32_t want =
                c < static_cast<int32_t>(table->size()) ? (*table)[c] : 0;
            if (r[c] != want) {
              return absl::InternalError(absl::StrCat(
                  "table ", t, " block_table[", row, ", ", c, "] (sequence ",
                  ps.sequence, ") = ", r[c], ", want ", want));
            }
            if (want == -1) ++null_entries_seen_;  // kNullBlock
          }
        }
        ++row;
      }
      for (int64_t j = token; j < in.max_tokens; ++j) {
        if (in.slot_mapping[j] != -1 || in.positions[j] != 0) {
          return absl::InternalError(
              absl::StrCat("table ", t, " padding token ", j, ": slot ",
                           in.slot_mapping[j], ", position ", in.positions[j]));
        }
      }
      for (int32_t r = row; r < in.max_sequences; ++r) {
        if (in.seq_lens[r] != 0) {
          return absl::InternalError(
              absl::StrCat("seq_lens[", r, "] = ", in.seq_lens[r]));
        }
        for (int32_t c = 0; c < cols; ++c) {
          if (in.block_table[int64_t{r} * in.row_stride + c] != 0) {
            return absl::InternalError(
                absl::StrCat("table ", t, " empty row ", r, " col ", c, " = ",
                             in.block_table[int64_t{r} * in.row_stride + c]));
          }
        }
      }
    }
    return absl::OkStatus();
  }

  // One random event; false on a test failure (already reported).
  bool Event() {
    testing::GroupRunner& r = *runner_;
    std::vector<SequenceId> live;
    for (const auto& [id, s] : r.sequences()) live.push_back(id);
    const int dice = static_cast<int>(rng_() % 100);
    if (live.size() < 2 || (dice < 12 && live.size() < 10)) {
      return Join();
    }
    if (dice < 18) {
      const SequenceId id = live[rng_() % live.size()];
      EXPECT_TRUE(r.Free(id).ok());
      return true;
    }
    if (dice < 22 && live.size() < 10) {
      const SequenceId child = next_id_++;
      EXPECT_TRUE(r.Fork(live[rng_() % live.size()], child).ok());
      return true;
    }
    if (dice < 26) {
      // A short rewind (a rejected path); refused when a window already
      // released what the shorter length would read.
      const SequenceId id = live[rng_() % live.size()];
      const int64_t len = *m_->SequenceLength(id);
      const int64_t to = std::max<int64_t>(1, len - 1 - rng_() % 3);
      absl::Status st = r.Truncate(id, to);
      EXPECT_TRUE(st.ok() || absl::IsFailedPrecondition(st)) << st;
      return true;
    }
    // A decode graph step over a random subset (random order) of at most 8
    // sequences, one token each (some two: still within the padded size).
    std::shuffle(live.begin(), live.end(), rng_);
    live.resize(std::min<size_t>(live.size(), 1 + rng_() % 8));
    std::vector<int64_t> n(live.size(), 1);
    int64_t tokens = static_cast<int64_t>(live.size());
    for (size_t i = 0; i < n.size() && tokens < kGraphTokens; ++i) {
      if (rng_() % 8 == 0) {
        ++n[i];
        ++tokens;
      }
    }
    for (size_t i = 0; i < live.size(); ++i) {
      if (*m_->SequenceLength(live[i]) + n[i] > kMaxLength) {
        EXPECT_TRUE(r.Free(live[i]).ok());
        return true;
      }
    }
    int64_t padded = PowerOfTwoAtLeast(tokens);
    if (padded > kGraphTokens) padded = kGraphTokens;
    std::optional<SequenceId> remove;
    if (live.size() > 1 && rng_() % 10 == 0)
      remove = live[rng_() % live.size()];
    absl::Status st = r.GraphStep(
        live, n, padded,
        [this](const StepPlanInfo& plan, std::optional<SequenceId> removed) {
          if (plan.graph_tokens != 0 &&
              plan.slot_mapping != inputs_[0].slot_mapping) {
            return absl::InternalError("plan's slot_mapping is not table 0's");
          }
          return CheckInputs(plan, removed);
        },
        remove);
    if (absl::IsResourceExhausted(st)) {
      EXPECT_TRUE(r.Free(live[0]).ok());
      return true;
    }
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return false;
    ++graph_steps_;
    return true;
  }

  bool CheckAll() {
    absl::Status st = runner_->CheckAll();
    EXPECT_TRUE(st.ok()) << st;
    absl::Status valid = m_->Validate();
    EXPECT_TRUE(valid.ok()) << valid;
    return st.ok() && valid.ok();
  }

 private:
  // A new sequence (small vocabulary: prefix hits), prefilled through
  // Reserve in chunks.
  bool Join() {
    testing::GroupRunner& r = *runner_;
    const SequenceId id = next_id_++;
    absl::StatusOr<int64_t> hit = r.Add(id, r.RandomTokens(1 + rng_() % 40, 2));
    EXPECT_TRUE(hit.ok()) << hit.status();
    if (!hit.ok()) return false;
    int64_t left =
        static_cast<int64_t>(r.sequences().at(id).tokens.size()) - *hit;
    while (left > 0) {
      const int64_t chunk = std::min<int64_t>(left, 1 + rng_() % 24);
      absl::Status st = r.Step({id}, {chunk});
      if (absl::IsResourceExhausted(st)) {
        EXPECT_TRUE(r.Free(id).ok());
        return true;
      }
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return false;
      left -= chunk;
    }
    return true;
  }

  std::unique_ptr<Device> device_ = CreateCpuDevice();
  std::mt19937_64 rng_;
  std::unique_ptr<KVCacheManager> m_;
  std::unique_ptr<testing::GroupRunner> runner_;
  int32_t tables_ = 0;
  std::vector<GraphStepInputs> inputs_;  // Per table, at Create.
  SequenceId next_id_ = 1;
  int64_t null_entries_seen_ = 0;
  int64_t graph_steps_ = 0;
};

struct Case {
  const char* name;
  KVCacheConfig (*config)();
  bool coalesce;
};

class GraphStepGroupsTest : public ::testing::TestWithParam<Case> {};

TEST_P(GraphStepGroupsTest, InputsEqualARecomputationAndDataRoundTrips) {
  for (uint64_t seed : Seeds()) {
    SCOPED_TRACE(absl::StrCat("KVCACHE_TEST_SEED=", seed));
    Scenario s(GetParam().config(), seed, GetParam().coalesce);
    ASSERT_TRUE(s.ok());
    for (int i = 0; i < 300; ++i) {
      ASSERT_TRUE(s.Event()) << "event " << i;
      if (i % 25 == 24) {
        ASSERT_TRUE(s.CheckAll()) << "event " << i;
      }
    }
    ASSERT_TRUE(s.CheckAll());
    // The run exercised what it is about.
    EXPECT_GT(s.graph_steps(), 100);
    EXPECT_GT(s.null_entries_seen(), 0) << "no released window entry seen";
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, GraphStepGroupsTest,
                         ::testing::Values(Case{"GemmaLike", GemmaLike, false},
                                           Case{"GemmaLikeOneUpload", GemmaLike,
                                                true},
                                           Case{"KOnly", KOnly, false},
                                           Case{"KOnlyOneUpload", KOnly, true}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(info.param.name);
                         });

// What a graph step with groups refuses and how Commit knows it is complete.
TEST(GraphStepGroupsTest, CaptureRuleLimitsAndLayerTables) {
  std::unique_ptr<Device> device = CreateCpuDevice();
  absl::StatusOr<std::unique_ptr<KVCacheManager>> created =
      KVCacheManager::Create(GemmaLike());
  ASSERT_TRUE(created.ok()) << created.status();
  KVCacheManager& m = **created;
  testing::GroupRunner r(&m, device.get(), 7);
  EXPECT_THAT(m.GraphStep().status().message(), HasSubstr("6 block tables"));
  EXPECT_EQ(m.GroupGraphStep(6).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Every layer's Append reads its own table's mapping: tables differ.
  EXPECT_NE(m.GroupGraphStep(0)->slot_mapping,
            m.GroupGraphStep(5)->slot_mapping);
  EXPECT_EQ(m.GroupGraphStep(0)->positions, m.GroupGraphStep(5)->positions);
  ASSERT_TRUE(r.Add(1, r.RandomTokens(9)).ok());
  ASSERT_TRUE(r.Step({1}, {9}).ok());
  ReserveRequest req;
  req.sequence = 1;
  req.num_tokens = 1;
  req.new_token_ids = {2};
  EXPECT_EQ(m.ReserveGraphStep({req}, 9).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<StepPlanInfo> plan = m.ReserveGraphStep({req}, 4);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->graph_tokens, 4);
  EXPECT_EQ(plan->slot_mapping, m.GroupGraphStep(0)->slot_mapping);
  // One graph step at a time.
  EXPECT_EQ(m.ReserveGraphStep({req}, 4).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // No Append on the host and no capture of size 4 yet: refused.
  EXPECT_THAT(m.Commit(plan->id).message(),
              HasSubstr("no Append ran on the host"));
  // Only a padded count of K/V is accepted.
  EXPECT_THAT(r.AppendLayer(*plan, 0, std::nullopt, 3).message(),
              HasSubstr("expected its padded count 4"));
  // A capture that misses a layer is named.
  for (int layer = 0; layer < 11; ++layer) {
    ASSERT_TRUE(r.AppendLayer(*plan, layer, std::nullopt, 4).ok());
  }
  // Gathers including the step's tokens: of a layer appended on the host,
  // yes; of one whose Append the host never saw (a replay), refused.
  {
    std::vector<float> k(10 * 2 * 16), v(10 * 2 * 16);
    const TensorView kt =
        TensorView::Contiguous(k.data(), DType::kFloat32, {10, 2, 16});
    const TensorView vt =
        TensorView::Contiguous(v.data(), DType::kFloat32, {10, 2, 16});
    GatherOptions in_flight;
    in_flight.include_in_flight = true;
    EXPECT_TRUE(m.GatherAsync(1, 5, 0, 10, kt, vt, in_flight).ok());
    EXPECT_THAT(m.GatherAsync(1, 11, 0, 10, kt, vt, in_flight).message(),
                HasSubstr("did not run on the host"));
  }
  EXPECT_THAT(m.Commit(plan->id).message(), HasSubstr("layer 11 holds 0"));
  ASSERT_TRUE(r.AppendLayer(*plan, 11, std::nullopt, 4).ok());
  ASSERT_TRUE(m.Commit(plan->id).ok());
  // Size 4 is captured: a later step of that size commits without host
  // Appends (a replay); a size never captured does not.
  req.new_token_ids = {1};
  plan = m.ReserveGraphStep({req}, 4);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(m.Commit(plan->id).ok());
  plan = m.ReserveGraphStep({req}, 2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(m.Commit(plan->id).ok());
  EXPECT_TRUE(m.Abort(plan->id).ok());
  EXPECT_TRUE(m.Validate().ok());
}

}  // namespace
}  // namespace kvcache
