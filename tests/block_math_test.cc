#include "allocator/block_math.h"

#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

TEST(BlockMathTest, MatchesDivisionForEverySize) {
  for (int64_t bs : {1, 2, 3, 7, 16, 48, 64, 1000}) {
    const BlockMath m(bs);
    EXPECT_EQ(m.size(), bs);
    EXPECT_EQ(m.pow2(), (bs & (bs - 1)) == 0) << bs;
    for (int64_t x = 0; x < 3000; x += 7) {
      EXPECT_EQ(m.Div(x), x / bs) << bs << " " << x;
      EXPECT_EQ(m.Mod(x), x % bs) << bs << " " << x;
      EXPECT_EQ(m.CeilDiv(x), (x + bs - 1) / bs) << bs << " " << x;
    }
  }
}

TEST(BlockMathTest, ReserveGeometricGrowsAtLeastDouble) {
  std::vector<int> v;
  ReserveGeometric(v, 10);
  EXPECT_GE(v.capacity(), 10u);
  const size_t c = v.capacity();
  ReserveGeometric(v, c + 1);
  EXPECT_GE(v.capacity(), 2 * c);
  const size_t c2 = v.capacity();
  ReserveGeometric(v, 3);  // Never shrinks.
  EXPECT_EQ(v.capacity(), c2);
}

}  // namespace
}  // namespace kvcache::internal
