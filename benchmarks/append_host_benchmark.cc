// Append's own host work on the CPU backend (issue #14): checks, bookkeeping
// and dispatch, with the kernel turned into a no-op through the test seam
// (KVCacheManagerTestPeer::DisableCacheWrites), so nothing but the library's
// host code is timed. bazel run -c opt //benchmarks:append_host_benchmark
//
// Each round reserves one decode step (num_seqs sequences, one token each),
// times 32 Appends (one per layer) and commits; the figure is the median over
// rounds of the per-Append time. Baselines, measured in the same run:
//   noop_call   the seam's no-op reached through a function pointer (the floor
//               of any dispatch)
//   bare_write  the CPU quantize-write kernel itself on the same tokens, no
//               manager (what one Append launches when writes are on)
// Bar: Append (no-op writes) at most 1 us. Then a 32-layer decode step of 256
// sequences: plain Reserve + 32 Appends + Commit vs the graph step's
// ReserveGraphStep + Commit (host work only).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "api/tensor_view.h"

namespace kvcache {
namespace {

constexpr int kLayers = 32;
constexpr int kRounds = 2000;
constexpr int kHeads = 8;
constexpr int kHeadSize = 128;

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

std::unique_ptr<KVCacheManager> MakeManager(int num_seqs, bool writes) {
  KVCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_size = kHeadSize;
  c.num_blocks = 4 * num_seqs + 64;
  c.cpu_threads = 1;
  c.max_sequences_per_step = num_seqs;
  c.max_tokens_per_step = num_seqs;
  c.enable_prefix_caching = false;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  Check(m.status(), "Create");
  if (!writes) KVCacheManagerTestPeer::DisableCacheWrites(**m);
  for (int i = 0; i < num_seqs; ++i) {
    Check((*m)->AddSequence(i, {1}).status(), "AddSequence");
  }
  return *std::move(m);
}

// Median ns per Append over rounds of kLayers Appends of one decode step.
double TimeAppend(KVCacheManager& m, int num_seqs, const TensorView& k,
                  const TensorView& v) {
  std::vector<ReserveRequest> batch(num_seqs);
  std::vector<double> per_append;
  for (int round = 0; round < kRounds; ++round) {
    for (int i = 0; i < num_seqs; ++i) {
      // Every 64 rounds the sequences start over, so the pool never fills.
      batch[i] = ReserveRequest{i, {7}, 1};
    }
    if (round % 64 == 0 && round > 0) {
      for (int i = 0; i < num_seqs; ++i) Check(m.Truncate(i, 0), "Truncate");
    }
    absl::StatusOr<StepPlanInfo> plan = m.Reserve(batch);
    Check(plan.status(), "Reserve");
    const auto start = Clock::now();
    for (int layer = 0; layer < kLayers; ++layer) {
      Check(m.Append(plan->id, layer, k, v), "Append");
    }
    const auto end = Clock::now();
    Check(m.Commit(plan->id), "Commit");
    per_append.push_back(
        std::chrono::duration<double, std::nano>(end - start).count() /
        kLayers);
  }
  return Median(per_append);
}

absl::Status NoOp(int) { return absl::OkStatus(); }

double TimeNoOpCall() {
  absl::Status (*volatile fn)(int) = &NoOp;
  std::vector<double> per_call;
  for (int round = 0; round < kRounds; ++round) {
    const auto start = Clock::now();
    for (int layer = 0; layer < kLayers; ++layer) {
      if (!fn(layer).ok()) std::abort();
    }
    const auto end = Clock::now();
    per_call.push_back(
        std::chrono::duration<double, std::nano>(end - start).count() /
        kLayers);
  }
  return Median(per_call);
}

void Run(int num_seqs) {
  std::vector<uint16_t> kv(static_cast<size_t>(num_seqs) * kHeads * kHeadSize,
                           0x3f80);  // bf16 1.0
  const TensorView k = TensorView::Contiguous(kv.data(), DType::kBFloat16,
                                              {num_seqs, kHeads, kHeadSize});
  std::unique_ptr<KVCacheManager> noop = MakeManager(num_seqs, false);
  std::unique_ptr<KVCacheManager> real = MakeManager(num_seqs, true);
  const double append_ns = TimeAppend(*noop, num_seqs, k, k);
  const double write_ns = TimeAppend(*real, num_seqs, k, k);
  const double call_ns = TimeNoOpCall();
  std::printf(
      "decode %4d seqs: Append host work (no-op writes) %7.1f ns | no-op call "
      "%5.1f ns | Append with the CPU write %9.1f ns (host work = %5.1f %% of "
      "it) | bar 1000 ns: %s\n",
      num_seqs, append_ns, call_ns, write_ns, 100.0 * append_ns / write_ns,
      append_ns <= 1000.0 ? "PASS" : "FAIL");
}

// A 32-layer decode step of num_seqs sequences on the CPU backend (writes a
// no-op, so the figures are host work): plain Reserve + 32 Appends + Commit,
// and the graph step's ReserveGraphStep + Commit (its Appends run in a
// replayed graph, not on the host), medians over rounds. On the CPU the
// graph inputs' upload is a memcpy, which a GPU host does asynchronously.
void TimeSteps(int num_seqs) {
  KVCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_size = kHeadSize;
  c.num_blocks = 64 * num_seqs + 64;
  c.cpu_threads = 1;
  c.max_sequences_per_step = num_seqs;
  c.max_tokens_per_step = num_seqs;
  c.max_blocks_per_sequence = 128;
  c.graph_max_tokens = num_seqs;
  c.enable_prefix_caching = false;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> made =
      KVCacheManager::Create(c);
  Check(made.status(), "Create");
  KVCacheManager& m = **made;
  KVCacheManagerTestPeer::DisableCacheWrites(m);
  for (int i = 0; i < num_seqs; ++i) {
    Check(m.AddSequence(i, {1}).status(), "AddSequence");
  }
  std::vector<uint16_t> kv(static_cast<size_t>(num_seqs) * kHeads * kHeadSize,
                           0x3f80);
  const TensorView k = TensorView::Contiguous(kv.data(), DType::kBFloat16,
                                              {num_seqs, kHeads, kHeadSize});
  std::vector<ReserveRequest> batch(num_seqs);
  for (int i = 0; i < num_seqs; ++i) batch[i] = ReserveRequest{i, {7}, 1};
  // The capture's step: every layer appended on the host.
  absl::StatusOr<StepPlanInfo> first = m.ReserveGraphStep(batch, num_seqs);
  Check(first.status(), "ReserveGraphStep");
  for (int layer = 0; layer < kLayers; ++layer) {
    Check(m.Append(first->id, layer, k, k), "Append");
  }
  Check(m.Commit(first->id), "Commit");
  std::vector<double> plain_us, graph_us;
  for (int round = 0; round < 1000; ++round) {
    if (round % 200 == 199) {
      for (int i = 0; i < num_seqs; ++i) Check(m.Truncate(i, 1), "Truncate");
    }
    auto t0 = Clock::now();
    absl::StatusOr<StepPlanInfo> plan = m.Reserve(batch);
    Check(plan.status(), "Reserve");
    for (int layer = 0; layer < kLayers; ++layer) {
      Check(m.Append(plan->id, layer, k, k), "Append");
    }
    Check(m.Commit(plan->id), "Commit");
    auto t1 = Clock::now();
    plain_us.push_back(
        std::chrono::duration<double, std::micro>(t1 - t0).count());
    t0 = Clock::now();
    plan = m.ReserveGraphStep(batch, num_seqs);
    Check(plan.status(), "ReserveGraphStep");
    Check(m.Commit(plan->id), "Commit");
    t1 = Clock::now();
    graph_us.push_back(
        std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  const double plain = Median(plain_us), graph = Median(graph_us);
  std::printf(
      "decode step, 32 layers x %d seqs (CPU backend, writes off): Reserve + "
      "32 Appends + Commit %.1f us | ReserveGraphStep + Commit %.1f us "
      "(ratio %.2f)\n",
      num_seqs, plain, graph, graph / plain);
}

}  // namespace
}  // namespace kvcache

int main() {
  for (int n : {1, 16, 256}) kvcache::Run(n);
  kvcache::TimeSteps(256);
  return 0;
}
