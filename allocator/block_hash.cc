#include "allocator/block_hash.h"

#include <cstring>
// Inlined: the chained hash is a serial dependency, and a call into the shared
// library costs a third of it. Same algorithm and output as libxxhash.
#define XXH_INLINE_ALL
#include "xxhash.h"

namespace kvcache {
namespace {

// Seeds separating the two uses of XXH3 so a block can never hash like an extra
// key.
constexpr uint64_t kExtraKeySeed = 0x6b76636163686531ULL;  // "kvcache1"
constexpr uint64_t kBlockSeed = 0x6b76636163686532ULL;     // "kvcache2"
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

// XXH3_128bits_withSeed of (parent, tokens) for inputs of 17..128 bytes: the
// very function it dispatches to, called directly and inlined, so that a
// compile-time `kTokens` folds its length branches (same output).
template <size_t kTokens>
BlockHash HashSmall(const BlockHash& parent, const TokenId* tokens) {
  constexpr size_t kBytes = sizeof(BlockHash) + kTokens * sizeof(TokenId);
  static_assert(kBytes > 16 && kBytes <= 128, "XXH3 17..128-byte path");
  unsigned char buffer[kBytes];
  std::memcpy(buffer, &parent.low, sizeof(uint64_t));
  std::memcpy(buffer + sizeof(uint64_t), &parent.high, sizeof(uint64_t));
  std::memcpy(buffer + sizeof(BlockHash), tokens, kTokens * sizeof(TokenId));
  return FromXxh(XXH3_len_17to128_128b(buffer, kBytes, XXH3_kSecret,
                                       sizeof(XXH3_kSecret), kBlockSeed));
}

}  // namespace

BlockHash HashBlock(const BlockHash& parent, absl::Span<const TokenId> tokens) {
  // The common block sizes take a fixed-length path.
  if (tokens.size() == 16) return HashSmall<16>(parent, tokens.data());
  if (tokens.size() == 8) return HashSmall<8>(parent, tokens.data());
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

}  // namespace kvcache
