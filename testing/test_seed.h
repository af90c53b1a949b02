// TestSeed: the seed of a randomized test run, drawn fresh each run unless
// KVCACHE_TEST_SEED=<n> names one (to rerun a failure). The caller prints or
// traces it. Thread-compatible (reads the environment); no state.

#ifndef KVCACHE_TESTING_TEST_SEED_H_
#define KVCACHE_TESTING_TEST_SEED_H_

#include <cstdint>
#include <cstdlib>
#include <random>

namespace kvcache::testing {

inline uint64_t TestSeed() {
  const char* env = std::getenv("KVCACHE_TEST_SEED");
  if (env != nullptr) return std::strtoull(env, nullptr, 10);
  return std::random_device{}() * 0x9E3779B97F4A7C15ull ^
         std::random_device{}();
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTING_TEST_SEED_H_
