// The graph step's host work in steady decode (issue #14), on the CPU backend
// with Append's kernel a no-op (KVCacheManagerTestPeer::DisableCacheWrites),
// so that only the library's host code is timed.
// bazel run -c opt //benchmarks:graph_step_host_benchmark
//
// 256 sequences (block size 16) with contexts drawn from 1k-8k tokens (tables
// of 64-512 blocks, 640 columns) decode one token each per step: every step
// times ReserveGraphStep and Commit (medians over steps). About one sequence
// in 16 starts a new block per step, the rest only grow in their last block.
// Baselines, measured in the same run on the same batch:
//   allocator   the allocator alone (BlockManager Reserve + Commit of the
//               same batch on a pool of the same shape): what any step pays
//   table copy  a memcpy of every byte of the step's inputs (slots,
//               positions, lengths and the whole block table): what writing
//               and uploading all of them each step would cost at least
// A second case churns the batch: every 8th step drops 8 sequences and adds
// 8 others (slots change, rows move), as an engine's decode batch does.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "allocator/block_manager.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "api/tensor_view.h"

namespace kvcache {
namespace {

constexpr int kLayers = 32;
constexpr int kHeads = 1;
constexpr int kHeadSize = 16;
constexpr int kBlockSize = 16;
constexpr int kSeqs = 256;
constexpr int kSpare = 16;  // Sequences outside the batch (churn case).
constexpr int kCols = 640;
constexpr int kSteps = 1000;
constexpr int kMinContext = 1024;
constexpr int kMaxContext = 8192;

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

std::vector<int> Contexts() {
  std::mt19937 rng(14);
  std::uniform_int_distribution<int> len(kMinContext, kMaxContext);
  std::vector<int> c(kSeqs + kSpare);
  for (int& x : c) x = len(rng);
  return c;
}

int32_t NumBlocks(const std::vector<int>& contexts) {
  int64_t blocks = 0;
  for (int c : contexts) blocks += (c + kSteps) / kBlockSize + 2;
  return static_cast<int32_t>(blocks + 64);
}

struct Timings {
  double reserve = 0, commit = 0, step = 0;
};

// Steady decode through the manager's graph step.
Timings TimeGraphStep(const std::vector<int>& contexts, bool churn) {
  KVCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_size = kHeadSize;
  c.block_size = kBlockSize;
  c.num_blocks = NumBlocks(contexts);
  c.cpu_threads = 1;
  c.max_sequences_per_step = kSeqs;
  c.max_tokens_per_step = kMaxContext;
  c.max_blocks_per_sequence = kCols;
  c.graph_max_tokens = kSeqs;
  c.enable_prefix_caching = false;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> made =
      KVCacheManager::Create(c);
  Check(made.status(), "Create");
  KVCacheManager& m = **made;
  KVCacheManagerTestPeer::DisableCacheWrites(m);
  std::vector<uint16_t> kv(
      static_cast<size_t>(kMaxContext) * kHeads * kHeadSize, 0x3f80);
  auto view = [&](int64_t n) {
    return TensorView::Contiguous(kv.data(), DType::kBFloat16,
                                  {n, kHeads, kHeadSize});
  };
  for (int s = 0; s < kSeqs + kSpare; ++s) {
    std::vector<TokenId> prompt(contexts[s], 5);
    Check(m.AddSequence(s, prompt).status(), "AddSequence");
    absl::StatusOr<StepPlanInfo> plan =
        m.Reserve({ReserveRequest{s, {}, contexts[s]}});
    Check(plan.status(), "Reserve prefill");
    for (int l = 0; l < kLayers; ++l) {
      Check(m.Append(plan->id, l, view(contexts[s]), view(contexts[s])),
            "Append prefill");
    }
    Check(m.Commit(plan->id), "Commit prefill");
  }
  std::vector<SequenceId> ids(kSeqs);
  for (int i = 0; i < kSeqs; ++i) ids[i] = i;
  std::vector<SequenceId> spare(kSpare);
  for (int i = 0; i < kSpare; ++i) spare[i] = kSeqs + i;
  std::vector<ReserveRequest> batch(kSeqs);
  auto make_batch = [&] {
    for (int i = 0; i < kSeqs; ++i) batch[i] = ReserveRequest{ids[i], {7}, 1};
  };
  make_batch();
  // The capture's step: every layer appended on the host.
  absl::StatusOr<StepPlanInfo> first = m.ReserveGraphStep(batch, kSeqs);
  Check(first.status(), "ReserveGraphStep");
  for (int l = 0; l < kLayers; ++l) {
    Check(m.Append(first->id, l, view(kSeqs), view(kSeqs)), "Append");
  }
  Check(m.Commit(first->id), "Commit");
  std::mt19937 rng(7);
  std::vector<double> reserve_us, commit_us, step_us;
  for (int step = 0; step < kSteps; ++step) {
    if (churn && step % 8 == 7) {
      // 8 sequences leave the batch (to the spare pool), 8 join in their
      // rows; then the batch is shuffled a little (two rows swap).
      for (int k = 0; k < 8; ++k) {
        const int row = static_cast<int>(rng() % kSeqs);
        const int s = static_cast<int>(rng() % kSpare);
        std::swap(ids[row], spare[s]);
      }
      std::swap(ids[rng() % kSeqs], ids[rng() % kSeqs]);
    }
    // Spare sequences do not decode: only the batch's grow.
    for (int i = 0; i < kSeqs; ++i) batch[i].sequence = ids[i];
    const auto t0 = Clock::now();
    absl::StatusOr<StepPlanInfo> plan = m.ReserveGraphStep(batch, kSeqs);
    const auto t1 = Clock::now();
    Check(plan.status(), "ReserveGraphStep");
    const uint64_t id = plan->id;
    plan = absl::StatusOr<StepPlanInfo>();  // Its vectors freed untimed.
    const auto t2 = Clock::now();
    Check(m.Commit(id), "Commit");
    const auto t3 = Clock::now();
    reserve_us.push_back(Us(t0, t1));
    commit_us.push_back(Us(t2, t3));
    step_us.push_back(Us(t0, t1) + Us(t2, t3));
  }
  return Timings{Median(reserve_us), Median(commit_us), Median(step_us)};
}

// The allocator alone, same batch and contexts.
Timings TimeAllocator(const std::vector<int>& contexts) {
  BlockManagerOptions o;
  o.num_blocks = NumBlocks(contexts);
  o.block_size = kBlockSize;
  o.enable_prefix_caching = false;
  o.max_blocks_per_sequence = kCols;
  absl::StatusOr<std::unique_ptr<BlockManager>> made = BlockManager::Create(o);
  Check(made.status(), "BlockManager::Create");
  BlockManager& bm = **made;
  for (int s = 0; s < kSeqs; ++s) {
    std::vector<TokenId> prompt(contexts[s], 5);
    Check(bm.AddSequence(s, prompt).status(), "AddSequence");
    absl::StatusOr<StepPlan> plan =
        bm.Reserve({ReserveRequest{s, {}, contexts[s]}});
    Check(plan.status(), "Reserve prefill");
    Check(bm.Commit(plan->id), "Commit prefill");
  }
  std::vector<ReserveRequest> batch(kSeqs);
  for (int i = 0; i < kSeqs; ++i) batch[i] = ReserveRequest{i, {7}, 1};
  std::vector<double> reserve_us, commit_us, step_us;
  for (int step = 0; step < kSteps; ++step) {
    const auto t0 = Clock::now();
    absl::StatusOr<StepPlan> plan = bm.Reserve(batch);
    const auto t1 = Clock::now();
    Check(plan.status(), "Reserve");
    const uint64_t id = plan->id;
    plan = absl::StatusOr<StepPlan>();
    const auto t2 = Clock::now();
    Check(bm.Commit(id), "Commit");
    const auto t3 = Clock::now();
    reserve_us.push_back(Us(t0, t1));
    commit_us.push_back(Us(t2, t3));
    step_us.push_back(Us(t0, t1) + Us(t2, t3));
  }
  return Timings{Median(reserve_us), Median(commit_us), Median(step_us)};
}

// A memcpy of every byte of the step's inputs.
double TimeTableCopy() {
  const size_t bytes = kSeqs * (2 * sizeof(int64_t) + sizeof(int32_t)) +
                       size_t{kSeqs} * kCols * sizeof(int32_t);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  std::vector<double> us;
  for (int step = 0; step < kSteps; ++step) {
    src[step % bytes] = static_cast<char>(step);
    const auto t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), bytes);
    const auto t1 = Clock::now();
    if (dst[step % bytes] != src[step % bytes]) std::abort();
    us.push_back(Us(t0, t1));
  }
  return Median(us);
}

}  // namespace
}  // namespace kvcache

int main() {
  using namespace kvcache;
  const std::vector<int> contexts = Contexts();
  const Timings alloc = TimeAllocator(contexts);
  const double copy = TimeTableCopy();
  const Timings steady = TimeGraphStep(contexts, /*churn=*/false);
  const Timings churn = TimeGraphStep(contexts, /*churn=*/true);
  std::printf(
      "baselines: allocator Reserve + Commit %.2f us (Reserve %.2f, Commit "
      "%.2f) | memcpy of all %zu input bytes %.2f us\n",
      alloc.step, alloc.reserve, alloc.commit,
      kSeqs * (2 * sizeof(int64_t) + sizeof(int32_t)) +
          size_t{kSeqs} * kCols * sizeof(int32_t),
      copy);
  for (const auto& [name, t] :
       {std::pair<const char*, Timings>{"steady", steady}, {"churn", churn}}) {
    std::printf(
        "graph step, %d seqs, contexts %d-%d, %s: ReserveGraphStep + Commit "
        "%.2f us (ReserveGraphStep %.2f, Commit %.2f) = %.2fx the allocator, "
        "%.2fx the memcpy\n",
        kSeqs, kMinContext, kMaxContext, name, t.step, t.reserve, t.commit,
        t.step / alloc.step, t.step / copy);
  }
  return 0;
}
