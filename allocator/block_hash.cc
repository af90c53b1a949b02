#include "allocator/block_hash.h"

#include <cstring>

#include "absl/base/attributes.h"
#include "allocator/block_hash_fixed.h"  // Also xxhash.h, inlined.

namespace kvcache {
namespace {

// Separates the two uses of XXH3 (with internal::kBlockSeed) so a block can
// never hash like an extra key.
constexpr uint64_t kExtraKeySeed = 0x6b76636163686531ULL;  // "kvcache1"
constexpr uint64_t kBlockSeed = internal::kBlockSeed;
constexpr size_t kStackTokens = 256;

BlockHash FromXxh(XXH128_hash_t h) { return BlockHash{h.low64, h.high64}; }

}  // namespace

BlockHash HashExtraKey(int64_t adapter_id, const std::string& salt) {
  XXH3_state_t state{};  // Zeroed: reset reads fields before setting them.
  XXH3_128bits_reset_withSeed(&state, kExtraKeySeed);
  XXH3_128bits_update(&state, &adapter_id, sizeof(adapter_id));
  const uint64_t salt_size = salt.size();
  XXH3_128bits_update(&state, &salt_size, sizeof(salt_size));
  XXH3_128bits_update(&state, salt.data(), salt.size());
  return FromXxh(XXH3_128bits_digest(&state));
}

namespace {

// Any other length. Out of line: its stack buffer and streaming state would
// otherwise give every call the large, realigned frame they need.
ABSL_ATTRIBUTE_NOINLINE BlockHash
HashAnyLength(const BlockHash& parent, absl::Span<const TokenId> tokens) {
  // One contiguous buffer (parent, tokens) hashes faster than the streaming
  // API.
  if (tokens.size() <= kStackTokens) {
    unsigned char buffer[sizeof(BlockHash) + kStackTokens * sizeof(TokenId)];
    std::memcpy(buffer, &parent.low, sizeof(uint64_t));
    std::memcpy(buffer + sizeof(uint64_t), &parent.high, sizeof(uint64_t));
    const size_t token_bytes = tokens.size() * sizeof(TokenId);
    if (token_bytes > 0)
      std::memcpy(buffer + sizeof(BlockHash), tokens.data(), token_bytes);
    return FromXxh(XXH3_128bits_withSeed(
        buffer, sizeof(BlockHash) + token_bytes, kBlockSeed));
  }
  XXH3_state_t state{};  // Zeroed: reset reads fields before setting them.
  XXH3_128bits_reset_withSeed(&state, kBlockSeed);
  XXH3_128bits_update(&state, &parent.low, sizeof(uint64_t));
  XXH3_128bits_update(&state, &parent.high, sizeof(uint64_t));
  XXH3_128bits_update(&state, tokens.data(), tokens.size() * sizeof(TokenId));
  return FromXxh(XXH3_128bits_digest(&state));
}

template <size_t kTokens>
void Chain(BlockHash h, const TokenId* tokens, size_t count,
           std::vector<BlockHash>& out) {
  for (size_t i = 0; i < count; ++i) {
    h = internal::HashFixed<kTokens>(h, tokens + i * kTokens);
    out.push_back(h);
  }
}

}  // namespace

BlockHash HashBlock(const BlockHash& parent, absl::Span<const TokenId> tokens) {
  // The common block sizes take a fixed-length path.
  if (tokens.size() == 16)
    return internal::HashFixed<16>(parent, tokens.data());
  if (tokens.size() == 8) return internal::HashFixed<8>(parent, tokens.data());
  if (tokens.size() == 4) return internal::HashFixed<4>(parent, tokens.data());
  if (tokens.size() == 24)
    return internal::HashFixed<24>(parent, tokens.data());
  return HashAnyLength(parent, tokens);
}

void HashBlocks(const BlockHash& parent, const TokenId* tokens,
                size_t block_size, size_t count, std::vector<BlockHash>& out) {
  switch (block_size) {
    case 16:
      return Chain<16>(parent, tokens, count, out);
    case 8:
      return Chain<8>(parent, tokens, count, out);
    default: {
      BlockHash h = parent;
      for (size_t i = 0; i < count; ++i) {
        h = HashBlock(
            h, absl::Span<const TokenId>(tokens + i * block_size, block_size));
        out.push_back(h);
      }
    }
  }
}

}  // namespace kvcache
