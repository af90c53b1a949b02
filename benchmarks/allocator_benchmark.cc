// CPU benchmarks of the allocator (bazel run -c opt
// //benchmarks:allocator_benchmark).
//
//   BM_DecodeStep/256           one decode step of 256 running sequences:
//                               Reserve 1 token each (1 in 16 needing a new
//                               block) + Commit (hashing filled blocks).
//   BM_DecodeStepEvicting/256   the same with a pool full of cached blocks,
//                               so that every new block evicts one.
//   BM_DecodeStepEvictingTier/256
//                               the same with a host tier of half the pool's
//                               blocks that takes every evicted block
//                               (tier_offload_min_hits 0; the copies it asks
//                               for are dropped, as by a copier that costs
//                               nothing): the tier's host work a step, read
//                               as a ratio to BM_DecodeStepEvicting/256.
//   BM_CreateFullHit32k         AddSequence of a 32k-token prompt whose 2048
//                               full blocks are all cached (hash chain,
//                               lookups, exact compares, taking them off LRU).
//   BM_CreateFullHit32kAndFree  the same plus Free (the blocks go back to the
//                               LRU list).
//   BM_AllocateFree             BlockPool: allocate one block and free it.
//   BM_HashBlock                XXH3-128 of one 16-token block with its
//                               parent hash.

#include <memory>
#include <random>
#include <vector>

#include "allocator/block_hash.h"
#include "allocator/block_manager.h"
#include "allocator/block_pool.h"
#include "benchmark/benchmark.h"

namespace kvcache {
namespace {

constexpr int32_t kBs = 16;

// tier_blocks > 0: a host tier that takes every evicted block.
std::unique_ptr<BlockManager> MakeManager(int32_t num_blocks,
                                          int32_t tier_blocks = 0) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = kBs;
  o.host_tier_blocks = tier_blocks;
  o.tier_offload_min_hits = 0;
  return std::move(*BlockManager::Create(o));
}

std::vector<TokenId> RandomTokens(std::mt19937& rng, int n) {
  std::vector<TokenId> t(n);
  for (TokenId& x : t) x = static_cast<TokenId>(rng() & 0x7fffffff);
  return t;
}

void Prefill(BlockManager& m, SequenceId id) {
  const int64_t n = *m.KnownLength(id) - *m.ComputedLength(id);
  auto plan = m.Reserve({ReserveRequest{id, {}, n}});
  if (!plan.ok() || !m.Commit(plan->id).ok()) std::abort();
  m.ClearTierCopies();  // A copier's work (none without a tier).
}

// Sequence i has computed 256 + i % 16 tokens, so each step fills 1 in 16
// sequences' last blocks.
void StartDecode(BlockManager& m, int num_seqs, std::mt19937& rng) {
  for (int i = 0; i < num_seqs; ++i) {
    if (!m.AddSequence(i, RandomTokens(rng, 256 + i % kBs)).ok()) std::abort();
    Prefill(m, i);
  }
}

// Decode steps of num_seqs sequences; every kStepsPerRound steps the sequences
// restart (untimed) on a fresh manager, or, when `evicting`, on the same one,
// whose pool is then full of cached blocks so that each new block evicts one
// (into a host tier of half as many blocks, with `tier`).
void DecodeSteps(benchmark::State& state, bool evicting, bool tier = false) {
  const int num_seqs = static_cast<int>(state.range(0));
  constexpr int kStepsPerRound = 1024;
  const int32_t num_blocks = num_seqs * (17 + kStepsPerRound / kBs + 1);
  const int32_t tier_blocks = tier ? num_blocks / 2 : 0;
  std::mt19937 rng(1);
  std::unique_ptr<BlockManager> m;
  std::vector<ReserveRequest> batch(num_seqs);
  for (int i = 0; i < num_seqs; ++i) batch[i] = ReserveRequest{i, {0}, 1};
  auto restart = [&] {
    if (m == nullptr || !evicting) {
      m = MakeManager(num_blocks, tier_blocks);
    } else {
      for (int i = 0; i < num_seqs; ++i) (void)m->Free(i);
    }
    StartDecode(*m, num_seqs, rng);
  };
  restart();
  if (evicting) {  // Fill the pool with cached blocks first.
    for (int step = 0; step < kStepsPerRound; ++step) {
      for (ReserveRequest& r : batch) r.new_token_ids[0] = rng();
      auto plan = m->Reserve(batch);
      if (!plan.ok() || !m->Commit(plan->id).ok()) std::abort();
      m->ClearTierCopies();
    }
    restart();
  }
  int step = 0;
  for (auto _ : state) {
    for (ReserveRequest& r : batch) {
      r.new_token_ids[0] = static_cast<TokenId>(step * 7 + r.sequence);
    }
    auto plan = m->Reserve(batch);
    if (!plan.ok() || !m->Commit(plan->id).ok()) {
      state.SkipWithError("reserve failed");
      break;
    }
    benchmark::DoNotOptimize(plan->slot_mapping.data());
    m->ClearTierCopies();
    if (++step % kStepsPerRound == 0) {
      state.PauseTiming();
      restart();
      state.ResumeTiming();
    }
  }
  state.counters["evictions"] = static_cast<double>(m->PrefixStats().evictions);
  state.counters["offloads"] = static_cast<double>(m->PrefixStats().offloads);
}

void BM_DecodeStep(benchmark::State& state) { DecodeSteps(state, false); }
BENCHMARK(BM_DecodeStep)->Arg(256);

void BM_DecodeStepEvicting(benchmark::State& state) {
  DecodeSteps(state, true);
}
BENCHMARK(BM_DecodeStepEvicting)->Arg(256);

void BM_DecodeStepEvictingTier(benchmark::State& state) {
  DecodeSteps(state, true, /*tier=*/true);
}
BENCHMARK(BM_DecodeStepEvictingTier)->Arg(256);

// A 32k-token prompt (+1 token, so all 2048 full blocks may hit) cached by an
// earlier sequence.
struct FullHitFixture {
  std::unique_ptr<BlockManager> m = MakeManager(4096);
  std::vector<TokenId> prompt;
  FullHitFixture() {
    std::mt19937 rng(2);
    prompt = RandomTokens(rng, 32768 + 1);
    if (!m->AddSequence(0, prompt).ok()) std::abort();
    Prefill(*m, 0);
    if (!m->Free(0).ok())
      std::abort();  // All 2048 full blocks now cached on the LRU list.
  }
};

void BM_CreateFullHit32k(benchmark::State& state) {
  FullHitFixture f;
  SequenceId id = 1;
  for (auto _ : state) {
    auto hit = f.m->AddSequence(id, f.prompt);
    if (!hit.ok() || *hit != 32768) {
      state.SkipWithError("expected a full hit");
      break;
    }
    state.PauseTiming();
    (void)f.m->Free(id++);
    state.ResumeTiming();
  }
}
BENCHMARK(BM_CreateFullHit32k)->Unit(benchmark::kMicrosecond);

void BM_CreateFullHit32kAndFree(benchmark::State& state) {
  FullHitFixture f;
  SequenceId id = 1;
  for (auto _ : state) {
    auto hit = f.m->AddSequence(id, f.prompt);
    if (!hit.ok() || *hit != 32768) {
      state.SkipWithError("expected a full hit");
      break;
    }
    (void)f.m->Free(id++);
  }
}
BENCHMARK(BM_CreateFullHit32kAndFree)->Unit(benchmark::kMicrosecond);

void BM_AllocateFree(benchmark::State& state) {
  internal::BlockPool pool(1024);
  for (auto _ : state) {
    const int32_t b = pool.AllocateFree();
    benchmark::DoNotOptimize(b);
    pool.Release(b);
  }
}
BENCHMARK(BM_AllocateFree);

void BM_HashBlock(benchmark::State& state) {
  std::mt19937 rng(3);
  const std::vector<TokenId> tokens = RandomTokens(rng, kBs);
  BlockHash h;
  for (auto _ : state) {
    h = HashBlock(h, tokens);
    benchmark::DoNotOptimize(h);
  }
}
BENCHMARK(BM_HashBlock);

}  // namespace
}  // namespace kvcache
