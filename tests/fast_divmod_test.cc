#include "kernels/fast_divmod.h"

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

void ExpectMatches(uint32_t d, uint32_t n) {
  const FastDivmod f = FastDivmod::Make(d);
  uint32_t q = 0, r = 0;
  f.Divmod(n, &q, &r);
  ASSERT_EQ(q, n / d) << n << " / " << d;
  ASSERT_EQ(r, n % d) << n << " % " << d;
}

// Divisors of every kind the kernels use (heads, block sizes) and beyond:
// 1, powers of two, their neighbours, primes and large values.
std::vector<uint32_t> Divisors() {
  std::vector<uint32_t> d = {1,     3,     5,       7,          12,  24,
                             40,    48,    96,      100,        127, 641,
                             65535, 65537, 1000003, 0x7FFFFFFFu};
  for (int k = 1; k < 31; ++k) {
    d.push_back(1u << k);
    d.push_back((1u << k) - 1);
    d.push_back((1u << k) + 1);
  }
  return d;
}

TEST(FastDivmodTest, MatchesDivisionAtEdges) {
  for (uint32_t d : Divisors()) {
    for (uint32_t m : {0u, 1u, 2u, 1000u, 65536u, 0x3FFFFFFFu}) {
      // Values around multiples of d, and the top of the range.
      const uint64_t base = static_cast<uint64_t>(m) * d;
      for (int64_t delta = -2; delta <= 2; ++delta) {
        const int64_t n = static_cast<int64_t>(base) + delta;
        if (n >= 0 && n < FastDivmod::kDividendLimit) {
          ExpectMatches(d, static_cast<uint32_t>(n));
        }
      }
    }
    for (uint32_t n = 0x7FFFFFF0u; n < 0x80000000u; ++n) ExpectMatches(d, n);
  }
}

TEST(FastDivmodTest, MatchesDivisionOnRandomValues) {
  std::mt19937 rng(std::random_device{}());
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t d = 1 + rng() % (i % 2 == 0 ? 64 : 0x7FFFFFFEu);
    ExpectMatches(d, rng() & 0x7FFFFFFFu);
  }
}

TEST(FastDivmodTest, SixtyFourBitDividendsMatchDivision) {
  std::mt19937_64 rng(std::random_device{}());
  for (uint32_t d : Divisors()) {
    const FastDivmod f = FastDivmod::Make(d);
    for (int i = 0; i < 2000; ++i) {
      // Both sides of the 2^31 boundary, and far above it.
      const int64_t n =
          i % 3 == 0 ? FastDivmod::kDividendLimit - 1000 + i
                     : static_cast<int64_t>(rng() >> (i % 3 == 1 ? 1 : 30));
      int64_t q = 0, r = 0;
      f.Divmod(n, &q, &r);
      ASSERT_EQ(q, n / d) << n << " / " << d;
      ASSERT_EQ(r, n % d) << n << " % " << d;
    }
  }
}

TEST(FastDivmodTest, EveryDividendForSmallDivisors) {
  // The divisors the kernels see most (head counts and block sizes), over a
  // dense prefix and a strided sweep of the whole 31-bit range.
  for (uint32_t d : {1u, 2u, 3u, 4u, 6u, 8u, 16u, 32u, 64u}) {
    for (uint32_t n = 0; n < (1u << 20); ++n) ExpectMatches(d, n);
    for (uint32_t n = 0; n < 0x7FFFFFFFu - 4099; n += 4099) ExpectMatches(d, n);
  }
}

}  // namespace
}  // namespace kvcache::internal
