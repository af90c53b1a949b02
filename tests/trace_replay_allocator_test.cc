// Replays the Mooncake conversation trace through BlockManager alone (no K/V),
// one request at a time in trace order: create with the prompt, reserve and
// commit the uncomputed part, free.
//
// With a pool that never evicts, every request's prefix hit must equal the
// reuse implied by the trace's hash_ids, computed here without any token or
// hash: a trie over leading hash ids records the longest prompt that passed
// through each node, so the longest token prefix a request shares with any
// earlier one is the best min(depth * 512, its length, that node's longest
// length) along its path; the cache can reuse that prefix's full 16-token
// blocks, leaving at least one token. Then it prints the hit rate for pools of
// 1/2, 1/8 and 1/32 of the unlimited run's peak.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"
#include "testing/trace.h"

namespace kvcache {
namespace {

constexpr int64_t kBs = 16;

std::string TracePath() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  return std::string(srcdir != nullptr ? srcdir : ".") +
         "/kvcache/data/mooncake_conversation_trace.jsonl";
}

// Per request, the longest token prefix it shares with any earlier request,
// from hash ids and lengths only.
std::vector<int64_t> LongestSharedPrefixes(
    const std::vector<TraceRequest>& trace) {
  // Trie: (node, hash id) -> node; node 0 is the root.
  absl::flat_hash_map<std::pair<int64_t, int64_t>, int64_t> child;
  // Per node: the longest input_length that passed through it.
  std::vector<int64_t> longest = {0};
  std::vector<int64_t> shared;
  for (const TraceRequest& r : trace) {
    int64_t node = 0, best = 0;
    for (size_t k = 0; k < r.hash_ids.size(); ++k) {
      auto [it, inserted] =
          child.try_emplace({node, r.hash_ids[k]}, longest.size());
      if (inserted) longest.push_back(0);
      node = it->second;
      const int64_t depth_tokens =
          static_cast<int64_t>(k + 1) * kTraceBlockTokens;
      best = std::max(best,
                      std::min({depth_tokens, r.input_length, longest[node]}));
      longest[node] = std::max(longest[node], r.input_length);
    }
    shared.push_back(best);
  }
  return shared;
}

struct ReplayResult {
  std::vector<int64_t> hits;
  int64_t peak_blocks = 0;  // Most blocks not free at once.
  PrefixCacheStats stats;
  int64_t failed = 0;  // Requests that did not fit the pool at all.
};

ReplayResult Replay(const std::vector<TraceRequest>& trace,
                    int32_t num_blocks) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = kBs;
  auto m = std::move(*BlockManager::Create(o));
  ReplayResult out;
  for (size_t i = 0; i < trace.size(); ++i) {
    const SequenceId id = static_cast<SequenceId>(i);
    const std::vector<TokenId> prompt = TracePrompt(trace[i]);
    const int64_t hit = *m->AddSequence(id, prompt);
    out.hits.push_back(hit);
    auto plan = m->Reserve(
        {ReserveRequest{id, {}, static_cast<int64_t>(prompt.size()) - hit}});
    if (plan.ok()) {
      EXPECT_TRUE(m->Commit(plan->id).ok());
      const PoolUsage u = m->Usage();
      out.peak_blocks =
          std::max<int64_t>(out.peak_blocks, u.used_blocks + u.cached_blocks);
    } else {
      EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
      ++out.failed;
    }
    EXPECT_TRUE(m->Free(id).ok());
  }
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
  out.stats = m->PrefixStats();
  return out;
}

double Rate(const PrefixCacheStats& s) {
  return static_cast<double>(s.hit_tokens) /
         static_cast<double>(s.query_tokens);
}

// The prefix hit: the shared prefix's full blocks, leaving at least one token.
int64_t ExpectedHit(const TraceRequest& r, int64_t shared) {
  return std::min(shared / kBs, (r.input_length - 1) / kBs) * kBs;
}

// Blocks not free after request i is committed, with nothing evicted: every
// distinct full block computed so far, cached once, plus request i's blocks
// that are not: its partial last block and a full last block recomputed for
// the one-token rule. Its maximum is the peak.
int64_t ExpectedPeak(const std::vector<TraceRequest>& trace,
                     const std::vector<int64_t>& shared) {
  int64_t distinct = 0, peak = 0;
  for (size_t i = 0; i < trace.size(); ++i) {
    const int64_t full = trace[i].input_length / kBs;
    distinct += full - shared[i] / kBs;
    const int64_t recomputed =
        shared[i] / kBs - ExpectedHit(trace[i], shared[i]) / kBs;
    const int64_t partial = trace[i].input_length % kBs != 0 ? 1 : 0;
    peak = std::max(peak, distinct + partial + recomputed);
  }
  return peak;
}

// The parameter divides the unlimited run's peak (1 = unlimited); shards run
// them in parallel.
class TraceReplayAllocatorTest : public ::testing::TestWithParam<int> {};

TEST_P(TraceReplayAllocatorTest, HitRate) {
  static const auto* trace =
      new absl::StatusOr<std::vector<TraceRequest>>(LoadTrace(TracePath()));
  ASSERT_TRUE(trace->ok()) << trace->status();
  ASSERT_EQ((*trace)->size(), 12031u);
  const std::vector<TraceRequest>& requests = **trace;
  const std::vector<int64_t> shared = LongestSharedPrefixes(requests);
  std::vector<int64_t> expected;
  int64_t prompt_tokens = 0, expected_hit = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    expected.push_back(ExpectedHit(requests[i], shared[i]));
    prompt_tokens += requests[i].input_length;
    expected_hit += expected[i];
  }
  const int64_t peak = ExpectedPeak(requests, shared);
  const int divisor = GetParam();
  const ReplayResult r = Replay(requests, static_cast<int32_t>(peak / divisor));
  EXPECT_EQ(r.failed, 0);
  EXPECT_EQ(r.stats.query_tokens, prompt_tokens);
  std::printf(
      "%s%d of peak (%lld blocks): hit rate %.4f (%lld of %lld prompt tokens), "
      "%lld "
      "evictions\n",
      divisor == 1 ? "unlimited = " : "", divisor == 1 ? 1 : divisor,
      static_cast<long long>(peak / divisor), Rate(r.stats),
      static_cast<long long>(r.stats.hit_tokens),
      static_cast<long long>(prompt_tokens),
      static_cast<long long>(r.stats.evictions));
  if (divisor == 1) {
    ASSERT_EQ(r.stats.evictions, 0);
    EXPECT_EQ(r.peak_blocks, peak);
    for (size_t i = 0; i < requests.size(); ++i) {
      ASSERT_EQ(r.hits[i], expected[i])
          << "request " << i << " (line " << i + 1 << ")";
    }
    EXPECT_EQ(r.stats.hit_tokens, expected_hit);
  } else {
    EXPECT_GT(r.stats.evictions, 0);
    EXPECT_LT(r.stats.hit_tokens, expected_hit);
  }
}

INSTANTIATE_TEST_SUITE_P(PoolSizes, TraceReplayAllocatorTest,
                         ::testing::Values(1, 2, 8, 32),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return info.param == 1
                                      ? std::string("Unlimited")
                                      : "OneOver" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace kvcache
