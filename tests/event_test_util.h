// Test helpers for KV events: a small CPU manager config, a step that appends
// all of a reservation's K/V and commits it, a driver of random manager
// operations (adds with shared prefixes and several extra keys, chunked
// steps, speculative commits, aborts, forks, truncations, frees, with the pool
// small enough that blocks are evicted), and EventSetRebuilder, a consumer
// that rebuilds the set of cached block hashes per medium from events alone.

#ifndef KVCACHE_TESTS_EVENT_TEST_UTIL_H_
#define KVCACHE_TESTS_EVENT_TEST_UTIL_H_

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "api/kv_cache_manager.h"
#include "core/kv_event.h"

namespace kvcache::testing {

// One layer, one KV head of size 8, int8 cache, float32 input, CPU, one
// thread, events on; a host tier of `host_tier_blocks` blocks behind the
// cache (0: none) that offloads every evicted block (tier_offload_min_hits 0).
KVCacheConfig SmallEventConfig(int64_t num_blocks, int32_t block_size,
                               int64_t host_tier_blocks = 0);

// Reserves `num_tokens` for `id` (after appending `new_tokens`), appends zero
// K/V to every layer and commits. The manager's status on failure (the plan
// aborted).
absl::Status RunStep(KVCacheManager& m, SequenceId id, int64_t num_tokens,
                     const std::vector<TokenId>& new_tokens = {});

// Applies events in sequence order. Any inconsistency (a gap or repeat in the
// sequence numbers, a stored hash already held, a removed hash not held, a
// malformed event) is an error naming it.
class EventSetRebuilder {
 public:
  absl::Status Apply(const KVEventBatch& batch);
  const std::set<uint64_t>& hashes(KVEventMedium medium) {
    return sets_[medium];
  }
  uint64_t batches() const { return next_; }

 private:
  std::map<KVEventMedium, std::set<uint64_t>> sets_;
  uint64_t next_ = 0;
};

// The test peer's hashes of `medium`, as a set.
std::set<uint64_t> ManagerHashes(const KVCacheManager& m, KVEventMedium medium);

class RandomCacheOps {
 public:
  // `salt` is one of the extra keys' salts (tests look for its bytes in what
  // is published). REQUIRES: m's config is SmallEventConfig's shape.
  RandomCacheOps(KVCacheManager& m, uint64_t seed, std::string salt);

  // One random operation; leaves no plan in flight. Any unexpected status is
  // returned.
  absl::Status Op();

 private:
  struct Seq {
    std::vector<TokenId> known;
    int64_t computed = 0;
  };
  absl::Status Add();
  absl::Status Step();
  absl::Status Fork();
  absl::Status Truncate();
  absl::Status Free();
  // Frees random sequences until `ok_or_exhausted` is not ResourceExhausted.
  absl::Status Preempt(SequenceId keep);
  SequenceId PickLive();

  KVCacheManager& m_;
  std::mt19937_64 rng_;
  std::vector<std::string> salts_;
  std::vector<std::vector<TokenId>> prefixes_;
  std::map<SequenceId, Seq> live_;
  SequenceId next_id_ = 1;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_EVENT_TEST_UTIL_H_
