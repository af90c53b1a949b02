// The graph step's inputs kept in step incrementally (issue #14): on the CPU
// backend, random steps in which sequences join and leave the batch, move
// between rows, fork (copy-on-write of shared tails), hit the prefix cache,
// grow across block boundaries, are truncated, lose rejected draft tokens,
// are freed and come back under the same id, and plans are aborted or lose a
// sequence (RemoveFromPlan). After every ReserveGraphStep the device-side
// inputs, read back through GraphStep(), must equal a from-scratch
// recomputation from the plan and the allocator's tables: slots padded with
// -1, positions then 0, lengths then 0, each row its sequence's blocks then
// zeros, rows past the batch all zeros. KVCACHE_TEST_SEED=<n> reruns one seed.

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

constexpr int kLayers = 2;
constexpr int kHeads = 1;
constexpr int kHeadSize = 8;
constexpr int kBlockSize = 4;
constexpr int kMaxTokens = 24;  // graph_max_tokens
constexpr int kMaxSeqs = 16;    // max_sequences_per_step
constexpr int kCols = 64;
constexpr int kMaxLength = 160;  // Longer sequences are truncated.
constexpr SequenceId kIds = 24;  // Ids in use: 0..kIds-1, reused.

std::vector<uint64_t> Seeds() {
  if (const char* s = std::getenv("KVCACHE_TEST_SEED")) {
    return {std::strtoull(s, nullptr, 10)};
  }
  std::random_device rd;
  return {1, 2, 3, rd(), rd()};
}

class Checker {
 public:
  Checker(uint64_t seed, bool coalesce) : rng_(seed) {
    KVCacheConfig c;
    c.num_layers = kLayers;
    c.num_kv_heads = kHeads;
    c.head_size = kHeadSize;
    c.block_size = kBlockSize;
    c.num_blocks = 420;
    c.cpu_threads = 1;
    c.max_sequences_per_step = kMaxSeqs;
    c.max_tokens_per_step = 256;
    c.max_blocks_per_sequence = kCols;
    c.graph_max_tokens = kMaxTokens;
    c.enable_prefix_caching = true;
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    EXPECT_TRUE(m.ok()) << m.status();
    m_ = *std::move(m);
    if (coalesce) KVCacheManagerTestPeer::CoalesceGraphStepUploads(*m_);
    kv_.assign(static_cast<size_t>(256) * kHeads * kHeadSize, 0x3f80);
  }

  TensorView KV(int64_t rows) {
    return TensorView::Contiguous(kv_.data(), DType::kBFloat16,
                                  {rows, kHeads, kHeadSize});
  }

  int Rand(int n) { return static_cast<int>(rng_() % n); }

  // Adds `id` with a prompt that often shares a prefix with others, and
  // prefills it (plain steps).
  void Add(SequenceId id) {
    const int len = 1 + Rand(60);
    std::vector<TokenId> prompt(len);
    const int family = Rand(3);
    for (int i = 0; i < len; ++i) {
      prompt[i] = i < 24 ? family * 100 + i : 1000 + Rand(50);
    }
    absl::StatusOr<int64_t> computed = m_->AddSequence(id, prompt);
    if (!computed.ok()) return;  // The pool is full: skip.
    alive_.push_back(id);
    if (*computed < len) Prefill(id, len - *computed);
  }

  void Prefill(SequenceId id, int64_t tokens) {
    absl::StatusOr<StepPlanInfo> plan =
        m_->Reserve({ReserveRequest{id, {}, tokens}});
    if (!plan.ok()) {
      Free(id);
      return;
    }
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE(m_->Append(plan->id, l, KV(tokens), KV(tokens)).ok());
    }
    ASSERT_TRUE(m_->Commit(plan->id).ok());
  }

  void Free(SequenceId id) {
    ASSERT_TRUE(m_->Free(id).ok());
    alive_.erase(std::find(alive_.begin(), alive_.end(), id));
  }

  SequenceId FreeId() {
    for (SequenceId id = Rand(kIds);; id = (id + 1) % kIds) {
      if (std::find(alive_.begin(), alive_.end(), id) == alive_.end()) {
        return id;
      }
    }
  }

  // Changes between steps.
  void Mutate() {
    const int op = Rand(10);
    if ((op < 3 || alive_.size() < 3) && alive_.size() < kIds) {
      Add(FreeId());  // Often an id that was freed before.
    } else if (op == 3 && !alive_.empty()) {
      Free(alive_[Rand(alive_.size())]);
    } else if (op == 4 && !alive_.empty() && alive_.size() < kIds) {
      const SequenceId parent = alive_[Rand(alive_.size())];
      const SequenceId child = FreeId();
      ASSERT_TRUE(m_->Fork(parent, child).ok());
      alive_.push_back(child);
    } else if (op >= 5 && op <= 6 && !alive_.empty()) {
      // Truncate anywhere, or by a few tokens (a block or so).
      const SequenceId id = alive_[Rand(alive_.size())];
      const int64_t len = *m_->SequenceLength(id);
      const int64_t cut = op == 5 ? Rand(len) : Rand(kBlockSize + 3);
      if (len - cut >= 1 && cut > 0) {
        ASSERT_TRUE(m_->Truncate(id, len - cut).ok());
      }
    }
    for (size_t i = 0; i < alive_.size(); ++i) {
      const int64_t len = *m_->SequenceLength(alive_[i]);
      if (len > kMaxLength) {
        ASSERT_TRUE(m_->Truncate(alive_[i], 1 + Rand(kMaxLength / 2)).ok());
      }
    }
  }

  // The inputs after ReserveGraphStep of `batch` (plan `info`), recomputed.
  void CheckInputs(const StepPlanInfo& info,
                   const std::vector<ReserveRequest>& batch, int step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    absl::StatusOr<GraphStepInputs> in = m_->GraphStep();
    ASSERT_TRUE(in.ok());
    absl::StatusOr<std::vector<PlanSequence>> layout = m_->PlanLayout(info.id);
    ASSERT_TRUE(layout.ok());
    ASSERT_EQ(layout->size(), batch.size());
    const int64_t n = static_cast<int64_t>(info.host_slot_mapping.size());
    for (int64_t t = 0; t < in->max_tokens; ++t) {
      ASSERT_EQ(in->slot_mapping[t], t < n ? info.host_slot_mapping[t] : -1)
          << "slot " << t;
    }
    std::vector<int64_t> positions(in->max_tokens, 0);
    for (const PlanSequence& s : *layout) {
      for (int64_t j = 0; j < s.num_tokens; ++j) {
        positions[s.slot_offset + j] = s.first_position + j;
      }
    }
    for (int64_t t = 0; t < in->max_tokens; ++t) {
      ASSERT_EQ(in->positions[t], positions[t]) << "position " << t;
    }
    for (int r = 0; r < in->max_sequences; ++r) {
      std::vector<BlockId> table;
      int32_t len = 0;
      if (r < static_cast<int>(batch.size())) {
        const PlanSequence& s = (*layout)[r];
        ASSERT_EQ(s.sequence, batch[r].sequence);
        len = static_cast<int32_t>(s.first_position + s.num_tokens);
        table = *m_->BlockTable(s.sequence);
      }
      ASSERT_EQ(in->seq_lens[r], len) << "row " << r;
      table.resize(in->row_stride, 0);
      for (int c = 0; c < in->row_stride; ++c) {
        ASSERT_EQ(in->block_table[r * in->row_stride + c], table[c])
            << "row " << r << " column " << c;
      }
    }
  }

  void Step(int step) {
    Mutate();
    if (alive_.empty()) return;
    // The batch keeps its rows from step to step, as in decode, except that
    // sometimes it is reshuffled or cut short (rows change sequences), and
    // sequences that came or went join or leave it.
    std::vector<SequenceId> order;
    for (SequenceId id : order_) {
      if (std::find(alive_.begin(), alive_.end(), id) != alive_.end()) {
        order.push_back(id);
      }
    }
    for (SequenceId id : alive_) {
      if (std::find(order.begin(), order.end(), id) == order.end()) {
        order.push_back(id);
      }
    }
    if (Rand(4) == 0) std::shuffle(order.begin(), order.end(), rng_);
    order_ = order;
    order.resize(Rand(3) == 0 ? 1 + Rand(std::min<int>(order.size(), kMaxSeqs))
                              : std::min<int>(order.size(), kMaxSeqs));
    std::vector<ReserveRequest> batch;
    int64_t tokens = 0;
    for (SequenceId id : order) {
      // Drafts: up to two blocks' worth, so that a sequence truncated by a
      // block grows past its old length in one step.
      const int64_t k = Rand(4) == 0 ? 1 + Rand(2 * kBlockSize) : 1;
      if (tokens + k > kMaxTokens) break;
      std::vector<TokenId> ids(k);
      for (TokenId& t : ids) t = 2000 + Rand(30);
      batch.push_back(ReserveRequest{id, ids, k});
      tokens += k;
    }
    const int64_t padded = tokens + Rand(kMaxTokens - tokens + 1);
    absl::StatusOr<StepPlanInfo> plan = m_->ReserveGraphStep(batch, padded);
    if (absl::IsResourceExhausted(plan.status())) {
      Free(alive_[Rand(alive_.size())]);
      return;
    }
    ASSERT_TRUE(plan.ok()) << plan.status();
    CheckInputs(*plan, batch, step);
    if (HasFailure()) return;
    const int fate = Rand(12);
    if (fate == 0) {
      ASSERT_TRUE(m_->Abort(plan->id).ok());
      return;
    }
    if (fate == 1) {
      const size_t gone = Rand(batch.size());
      ASSERT_TRUE(m_->RemoveFromPlan(plan->id, batch[gone].sequence).ok());
      std::vector<PlanSequence> layout = *m_->PlanLayout(plan->id);
      const GraphStepInputs in = *m_->GraphStep();
      for (int64_t j = 0; j < batch[gone].num_tokens; ++j) {
        ASSERT_EQ(in.slot_mapping[layout[gone].slot_offset + j], -1);
      }
    }
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE(m_->Append(plan->id, l, KV(padded), KV(padded)).ok());
    }
    if (fate == 2) {
      std::vector<int64_t> accepted(batch.size());
      for (size_t i = 0; i < batch.size(); ++i) {
        accepted[i] = Rand(batch[i].num_tokens + 1);
      }
      ASSERT_TRUE(m_->Commit(plan->id, accepted).ok());
    } else {
      ASSERT_TRUE(m_->Commit(plan->id).ok());
    }
  }

  static bool HasFailure() { return ::testing::Test::HasFatalFailure(); }

 private:
  std::mt19937_64 rng_;
  std::unique_ptr<KVCacheManager> m_;
  std::vector<uint16_t> kv_;
  std::vector<SequenceId> alive_;
  std::vector<SequenceId> order_;  // The last batch's order.
};

// coalesce: the upload as on a GPU, one copy over everything up to the last
// changed row (so the staging copy must be right there too); else one copy
// per run of changed bytes, as on the CPU.
class GraphStepIncrementalTest : public ::testing::TestWithParam<bool> {};

TEST_P(GraphStepIncrementalTest, InputsEqualARecomputationAfterEveryStep) {
  for (uint64_t seed : Seeds()) {
    SCOPED_TRACE(absl::StrCat("KVCACHE_TEST_SEED=", seed));
    Checker checker(seed, /*coalesce=*/GetParam());
    for (int step = 0; step < 600; ++step) {
      checker.Step(step);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Uploads, GraphStepIncrementalTest, ::testing::Bool());

}  // namespace
}  // namespace kvcache
