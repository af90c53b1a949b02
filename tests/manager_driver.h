// Test-only driver of a KVCacheManager: random sequences with shared prefixes,
// chunked prefill, decode steps, forks and frees, every layer appended with
// synthetic K/V that is a function of the token prefix (so prefix-cache hits
// must read back the same data), and a reference model to check Gather against,
// token by token, in every layer.

#ifndef KVCACHE_TESTS_MANAGER_DRIVER_H_
#define KVCACHE_TESTS_MANAGER_DRIVER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "api/kv_cache_manager.h"
#include "storage/device.h"

namespace kvcache::testing {

class ManagerDriver {
 public:
  struct Counts {
    int64_t adds = 0, steps = 0, forks = 0, frees = 0, preemptions = 0;
    int64_t prefix_hit_tokens = 0, block_copies = 0;
  };

  // `data_seed` seeds the synthetic K/V; `op_seed` the sequence of operations.
  // REQUIRES: the config's input dtype is bfloat16.
  static absl::StatusOr<std::unique_ptr<ManagerDriver>> Create(
      const KVCacheConfig& config, uint64_t data_seed, uint64_t op_seed);

  // One random operation (add, step, fork or free). Any unexpected status is
  // returned.
  absl::Status RandomOp();
  // Gathers every committed token of every sequence in every layer and compares
  // it with the reference. Returns a description of the first mismatch.
  absl::Status VerifyAll();

  KVCacheManager& manager() { return *manager_; }
  Device& device() { return *device_; }
  const Counts& counts() const { return counts_; }

 private:
  struct Sequence {
    std::vector<int32_t> tokens;        // Known tokens.
    std::vector<uint64_t> prefix_hash;  // Per known token.
    int64_t computed = 0;
  };

  ManagerDriver(const KVCacheConfig& config, uint64_t data_seed,
                uint64_t op_seed)
      : config_(config), data_seed_(data_seed), rng_(op_seed) {}

  absl::Status Add();
  absl::Status Step();
  absl::Status Fork();
  absl::Status Free(int64_t id);
  void PushToken(Sequence& seq, int32_t token);
  // Expected dequantized row of token `pos` of `seq` in `layer`.
  std::vector<float> Expected(const Sequence& seq, int64_t pos, int layer,
                              bool is_value) const;
  absl::Status AppendLayer(uint64_t plan,
                           const std::vector<std::pair<int64_t, int64_t>>& rows,
                           const std::vector<int64_t>& ids, int layer);

  KVCacheConfig config_;
  int head_size_v_ = 0;
  uint64_t data_seed_;
  std::mt19937_64 rng_;
  std::unique_ptr<KVCacheManager> manager_;
  std::unique_ptr<Device> device_;
  std::vector<std::vector<int32_t>> prefixes_;
  std::map<int64_t, Sequence> sequences_;
  int64_t next_id_ = 1;
  Counts counts_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_MANAGER_DRIVER_H_
