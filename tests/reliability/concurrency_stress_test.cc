// Concurrency stress: 8 threads run random sequence life cycles (add with
// prompts from shared prefixes, so the prefix cache is shared across threads;
// reserve; append every layer; commit; gather-verify; fork; free) on one
// KVCacheManager (CPU backend) for a bounded time, preempting their own
// sequences on ResourceExhausted. Run under --config=tsan for data races; at
// the end Validate() holds, every remaining sequence reads back correctly and
// every thread did work. A second run puts a host tier behind the cache
// (README "Host tier"): evictions are offloaded on the tier's copy thread
// and hits onboarded while other threads append and gather.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

using testing::ExtendPrefixHash;
using testing::FloatToBf16;
using testing::QuantizeDequantizeHead;
using testing::SyntheticRow;

constexpr int kThreads = 8;
constexpr uint64_t kSeed = 11;
constexpr auto kDuration = std::chrono::seconds(3);
constexpr int kMaxOpsPerThread = 4000;

KVCacheConfig StressConfig() {
  KVCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_size = 16;
  c.block_size = 4;
  c.cache_dtype = DType::kInt8;
  c.input_dtype = DType::kBFloat16;
  c.num_blocks = 96;
  c.max_inflight_plans = kThreads;
  c.max_tokens_per_step = 64;
  c.max_sequences_per_step = 4;
  return c;
}

struct Seq {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> hash;
  int64_t computed = 0;
  void Push(int32_t t) {
    tokens.push_back(t);
    hash.push_back(ExtendPrefixHash(hash.empty() ? 0 : hash.back(), t));
  }
};

struct ThreadStats {
  int64_t adds = 0, steps = 0, forks = 0, frees = 0, preemptions = 0,
          verifies = 0;
};

class Worker {
 public:
  Worker(KVCacheManager& m, int index,
         const std::vector<std::vector<int32_t>>& prefixes)
      : m_(m),
        c_(m.config()),
        index_(index),
        prefixes_(prefixes),
        rng_(1000 + index) {}

  // Returns the first unexpected status.
  absl::Status Run(std::chrono::steady_clock::time_point deadline) {
    for (int op = 0;
         op < kMaxOpsPerThread && std::chrono::steady_clock::now() < deadline;
         ++op) {
      const int r = Uniform(0, 99);
      absl::Status s;
      if (seqs_.empty() || (r < 20 && seqs_.size() < 4)) {
        s = Add();
      } else if (r < 75) {
        s = StepOne();
      } else if (r < 82) {
        s = Fork();
      } else if (r < 90) {
        s = Verify(Pick());
      } else {
        s = Free(Pick());
      }
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status VerifyAll() {
    for (const auto& [id, seq] : seqs_) {
      if (absl::Status s = Verify(id); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  const ThreadStats& stats() const { return stats_; }

 private:
  int Uniform(int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng_);
  }
  int64_t Pick() {
    auto it = seqs_.begin();
    std::advance(it, Uniform(0, static_cast<int>(seqs_.size()) - 1));
    return it->first;
  }
  int64_t NewId() { return int64_t{index_} * 1000000 + next_++; }

  absl::Status Add() {
    Seq s;
    for (int32_t t : prefixes_[Uniform(0, prefixes_.size() - 1)]) s.Push(t);
    const int tail = Uniform(1, 6);
    for (int i = 0; i < tail; ++i) s.Push(Uniform(0, 9));
    const int64_t id = NewId();
    absl::StatusOr<int64_t> computed = m_.AddSequence(id, s.tokens);
    if (!computed.ok()) return computed.status();
    s.computed = *computed;
    seqs_.emplace(id, std::move(s));
    ++stats_.adds;
    return absl::OkStatus();
  }

  absl::Status Free(int64_t id) {
    if (absl::Status s = m_.Free(id); !s.ok()) return s;
    seqs_.erase(id);
    ++stats_.frees;
    return absl::OkStatus();
  }

  absl::Status Fork() {
    const int64_t parent = Pick(), child = NewId();
    if (absl::Status s = m_.Fork(parent, child); !s.ok()) return s;
    seqs_[child] = seqs_[parent];
    ++stats_.forks;
    return absl::OkStatus();
  }

  // One step of one sequence: reserve, append every layer, commit, verify.
  absl::Status StepOne() {
    const int64_t id = Pick();
    Seq& seq = seqs_[id];
    ReserveRequest r;
    r.sequence = id;
    const int64_t pending =
        static_cast<int64_t>(seq.tokens.size()) - seq.computed;
    if (pending > 0) {
      r.num_tokens = std::min<int64_t>(pending, Uniform(1, 8));
    } else {
      r.new_token_ids = {Uniform(0, 9)};
      r.num_tokens = 1;
    }
    absl::StatusOr<StepPlanInfo> plan = m_.Reserve({r});
    if (absl::IsResourceExhausted(plan.status())) {
      // No room: preempt this sequence, as an engine would.
      ++stats_.preemptions;
      return Free(id);
    }
    if (!plan.ok()) return plan.status();
    for (int32_t t : r.new_token_ids) seq.Push(t);
    const int h = c_.num_kv_heads, d = c_.head_size;
    const int64_t n = r.num_tokens;
    for (int layer = 0; layer < c_.num_layers; ++layer) {
      std::vector<uint16_t> k(n * h * d), v(n * h * d);
      for (int64_t i = 0; i < n; ++i) {
        const uint64_t hash = seq.hash[seq.computed + i];
        std::vector<float> kr = SyntheticRow(kSeed, layer, false, hash, h, d);
        std::vector<float> vr = SyntheticRow(kSeed, layer, true, hash, h, d);
        for (int j = 0; j < h * d; ++j) {
          k[i * h * d + j] = FloatToBf16(kr[j]);
          v[i * h * d + j] = FloatToBf16(vr[j]);
        }
      }
      absl::Status s = m_.Append(
          plan->id, layer,
          TensorView::Contiguous(k.data(), DType::kBFloat16, {n, h, d}),
          TensorView::Contiguous(v.data(), DType::kBFloat16, {n, h, d}));
      if (!s.ok()) return s;
    }
    if (absl::Status s = m_.Commit(plan->id); !s.ok()) return s;
    seq.computed += n;
    ++stats_.steps;
    return Verify(id);
  }

  absl::Status Verify(int64_t id) {
    const Seq& seq = seqs_.at(id);
    absl::StatusOr<int64_t> len = m_.SequenceLength(id);
    if (!len.ok()) return len.status();
    if (*len != seq.computed) {
      return absl::InternalError(absl::StrCat("sequence ", id, " length ", *len,
                                              " != ", seq.computed));
    }
    ++stats_.verifies;
    if (seq.computed == 0) return absl::OkStatus();
    const int h = c_.num_kv_heads, d = c_.head_size;
    const int64_t t = seq.computed;
    std::vector<float> k(t * h * d), v(t * h * d);
    for (int layer = 0; layer < c_.num_layers; ++layer) {
      absl::Status s = m_.Gather(
          id, layer, 0, t,
          TensorView::Contiguous(k.data(), DType::kFloat32, {t, h, d}),
          TensorView::Contiguous(v.data(), DType::kFloat32, {t, h, d}));
      if (!s.ok()) return s;
      for (int64_t pos = 0; pos < t; ++pos) {
        for (bool is_value : {false, true}) {
          std::vector<float> row =
              SyntheticRow(kSeed, layer, is_value, seq.hash[pos], h, d);
          const float* got = (is_value ? v.data() : k.data()) + pos * h * d;
          for (int head = 0; head < h; ++head) {
            std::vector<float> q = QuantizeDequantizeHead(
                std::vector<float>(row.begin() + head * d,
                                   row.begin() + (head + 1) * d),
                c_.cache_dtype);
            if (std::memcmp(got + head * d, q.data(), d * sizeof(float))) {
              return absl::InternalError(
                  absl::StrCat("thread ", index_, " sequence ", id, " layer ",
                               layer, " token ", pos, " differs"));
            }
          }
        }
      }
    }
    return absl::OkStatus();
  }

  KVCacheManager& m_;
  const KVCacheConfig c_;
  const int index_;
  const std::vector<std::vector<int32_t>>& prefixes_;
  std::mt19937_64 rng_;
  std::map<int64_t, Seq> seqs_;
  int64_t next_ = 1;
  ThreadStats stats_;
};

// The host tier's size in blocks (0 = none).
class ConcurrencyStressTest : public ::testing::TestWithParam<int> {};

TEST_P(ConcurrencyStressTest, EightThreadsShareOneManager) {
  KVCacheConfig config = StressConfig();
  config.host_tier_bytes = GetParam() * *BlockBytesAllLayers(config);
  absl::StatusOr<std::unique_ptr<KVCacheManager>> manager =
      KVCacheManager::Create(config);
  ASSERT_TRUE(manager.ok()) << manager.status();
  std::mt19937_64 rng(3);
  std::vector<std::vector<int32_t>> prefixes(3);
  for (auto& p : prefixes) {
    p.resize(std::uniform_int_distribution<int>(4, 13)(rng));
    for (int32_t& t : p) t = std::uniform_int_distribution<int>(0, 9)(rng);
  }
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < kThreads; ++i) {
    workers.push_back(std::make_unique<Worker>(**manager, i, prefixes));
  }
  std::vector<absl::Status> results(kThreads);
  const auto deadline = std::chrono::steady_clock::now() + kDuration;
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] { results[i] = workers[i]->Run(deadline); });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE((*manager)->Validate().ok()) << (*manager)->Validate();
  int64_t total_steps = 0;
  for (int i = 0; i < kThreads; ++i) {
    EXPECT_TRUE(results[i].ok()) << "thread " << i << ": " << results[i];
    const ThreadStats& s = workers[i]->stats();
    EXPECT_GT(s.steps, 0) << "thread " << i << " did no step";
    EXPECT_TRUE(workers[i]->VerifyAll().ok()) << workers[i]->VerifyAll();
    total_steps += s.steps;
    std::printf(
        "thread %d: %lld adds, %lld steps, %lld forks, %lld frees, "
        "%lld preemptions, %lld verifies\n",
        i, static_cast<long long>(s.adds), static_cast<long long>(s.steps),
        static_cast<long long>(s.forks), static_cast<long long>(s.frees),
        static_cast<long long>(s.preemptions),
        static_cast<long long>(s.verifies));
  }
  const MetricsSnapshot m = (*manager)->Metrics();
  std::printf("total %lld steps, prefix hits %lld tokens, %lld copies\n",
              static_cast<long long>(total_steps),
              static_cast<long long>(m.prefix_hit_tokens),
              static_cast<long long>(m.block_copies));
  EXPECT_GT(m.prefix_hit_tokens, 0);
  if (GetParam() > 0) {
    std::printf("host tier: %lld offloads, %lld onboards, %lld hit tokens\n",
                static_cast<long long>(m.tier_offloads),
                static_cast<long long>(m.tier_onboards),
                static_cast<long long>(m.prefix_hit_tokens_host));
    EXPECT_GT(m.tier_offloads, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(HostTier, ConcurrencyStressTest,
                         ::testing::Values(0, 48));

}  // namespace
}  // namespace kvcache
