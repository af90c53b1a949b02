// The cost of KV events on the allocator's step (bazel run -c opt
// //benchmarks:kv_events_benchmark -- --benchmark_repetitions=5):
//
//   BM_EvictingStep/256/events:0   a decode step of 256 sequences (Reserve 1
//                                  token each, Commit) on a pool full of
//                                  cached blocks: 1 in 16 sequences fills a
//                                  block (stored) and takes a new one, which
//                                  evicts a cached block (removed);
//   BM_EvictingStep/256/events:1   the same with the KV event sink as the
//                                  blocks' observer, drained every step (as
//                                  an engine calling TakeEvents would).
//
// The ratio of the two medians is the events' overhead on the step.

#include <memory>
#include <random>
#include <vector>

#include "allocator/block_manager.h"
#include "benchmark/benchmark.h"
#include "events/kv_event_sink.h"

namespace kvcache {
namespace {

constexpr int32_t kBs = 16;

void BM_EvictingStep(benchmark::State& state) {
  const int num_seqs = static_cast<int>(state.range(0));
  const bool events = state.range(1) != 0;
  constexpr int kSteps = 1024;
  std::unique_ptr<internal::KVEventSink> sink;
  BlockManagerOptions o;
  o.num_blocks = num_seqs * (17 + kSteps / kBs + 1);
  o.block_size = kBs;
  if (events) {
    internal::KVEventSink::Options so;
    so.block_size = kBs;
    sink = std::make_unique<internal::KVEventSink>(std::move(so));
    o.observer = sink.get();
  }
  std::unique_ptr<BlockManager> m = std::move(*BlockManager::Create(o));
  std::mt19937 rng(1);
  auto start = [&] {
    for (int i = 0; i < num_seqs; ++i) {
      (void)m->Free(i);
      std::vector<TokenId> prompt(256 + i % kBs);
      for (TokenId& t : prompt) t = static_cast<TokenId>(rng() & 0x7fffffff);
      if (!m->AddSequence(i, prompt).ok()) std::abort();
      auto plan = m->Reserve({ReserveRequest{i, {}, 256 + i % kBs}});
      if (!plan.ok() || !m->Commit(plan->id).ok()) std::abort();
    }
  };
  std::vector<ReserveRequest> batch(num_seqs);
  for (int i = 0; i < num_seqs; ++i) batch[i] = ReserveRequest{i, {0}, 1};
  auto step = [&](int s) {
    for (ReserveRequest& r : batch) {
      r.new_token_ids[0] = static_cast<TokenId>(s * 7 + r.sequence);
    }
    auto plan = m->Reserve(batch);
    if (!plan.ok() || !m->Commit(plan->id).ok()) std::abort();
    if (sink != nullptr) benchmark::DoNotOptimize(sink->Take());
  };
  start();
  for (int s = 0; s < kSteps; ++s) step(s);  // Fill the pool with cache.
  start();
  int s = 0;
  for (auto _ : state) {
    step(s);
    if (++s % kSteps == 0) {
      state.PauseTiming();
      start();
      state.ResumeTiming();
    }
  }
  state.counters["evictions"] = static_cast<double>(m->PrefixStats().evictions);
}
BENCHMARK(BM_EvictingStep)
    ->ArgNames({"", "events"})
    ->Args({256, 0})
    ->Args({256, 1});

}  // namespace
}  // namespace kvcache
