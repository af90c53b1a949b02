// HashBlock is XXH3-128 (seeded) of the bytes (parent.low, parent.high, token
// ids): its fixed-length paths must give exactly what libxxhash gives for that
// buffer, for every block size.

#include "allocator/block_hash.h"

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "xxhash.h"

namespace kvcache {
namespace {

constexpr uint64_t kBlockSeed = 0x6b76636163686532ULL;  // "kvcache2"

BlockHash Reference(const BlockHash& parent, const std::vector<TokenId>& t) {
  std::vector<unsigned char> buffer(sizeof(BlockHash) + t.size() * 4);
  std::memcpy(buffer.data(), &parent.low, 8);
  std::memcpy(buffer.data() + 8, &parent.high, 8);
  if (!t.empty()) std::memcpy(buffer.data() + 16, t.data(), t.size() * 4);
  const XXH128_hash_t h =
      XXH3_128bits_withSeed(buffer.data(), buffer.size(), kBlockSeed);
  return BlockHash{h.low64, h.high64};
}

TEST(BlockHashTest, EqualsLibxxhashForEveryBlockSize) {
  std::mt19937_64 rng(7);
  for (size_t n = 0; n <= 300; ++n) {
    for (int trial = 0; trial < 4; ++trial) {
      std::vector<TokenId> tokens(n);
      for (TokenId& t : tokens) t = static_cast<TokenId>(rng());
      const BlockHash parent{rng(), rng()};
      EXPECT_EQ(HashBlock(parent, tokens), Reference(parent, tokens))
          << n << " tokens";
    }
  }
}

TEST(BlockHashTest, ChainedSixteenTokenBlocks) {
  std::mt19937_64 rng(8);
  std::vector<TokenId> tokens(16);
  BlockHash fast, reference;
  for (int i = 0; i < 1000; ++i) {
    for (TokenId& t : tokens) t = static_cast<TokenId>(rng());
    fast = HashBlock(fast, tokens);
    reference = Reference(reference, tokens);
    ASSERT_EQ(fast, reference) << "block " << i;
  }
}

TEST(BlockHashTest, HashBlocksChainsHashBlock) {
  std::mt19937_64 rng(9);
  for (size_t block_size : {1, 5, 8, 16, 32}) {
    std::vector<TokenId> tokens(block_size * 40);
    for (TokenId& t : tokens) t = static_cast<TokenId>(rng());
    const BlockHash root{rng(), rng()};
    std::vector<BlockHash> chained;
    HashBlocks(root, tokens.data(), block_size, 40, chained);
    ASSERT_EQ(chained.size(), 40u);
    BlockHash h = root;
    for (size_t i = 0; i < chained.size(); ++i) {
      h = HashBlock(
          h, absl::Span<const TokenId>(&tokens[i * block_size], block_size));
      ASSERT_EQ(chained[i], h) << block_size << " tokens, block " << i;
    }
  }
}

}  // namespace
}  // namespace kvcache
