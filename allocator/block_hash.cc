#include "allocator/block_hash.h"

#include <cstring>

#include "absl/base/attributes.h"

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

// XXH3_128bits_withSeed of the bytes (parent.low, parent.high, tokens) for
// inputs of 32..128 bytes that are a multiple of 16: XXH3_len_17to128_128b
// written out over that virtual buffer. Every 16-byte piece it reads is either
// the parent (read from registers: no copy, and the chained parent enters only
// the last round, so the rounds over the tokens overlap the previous block's
// hash) or 16 bytes of tokens. Same output as libxxhash (tested).
template <size_t kTokens>
BlockHash HashSmall(const BlockHash& parent, const TokenId* tokens) {
  constexpr size_t kLen = sizeof(BlockHash) + kTokens * sizeof(TokenId);
  static_assert(kLen % 16 == 0 && kLen >= 32 && kLen <= 128,
                "16-byte pieces of the XXH3 17..128-byte path");
  const xxh_u8* t = reinterpret_cast<const xxh_u8*>(tokens);
  const xxh_u8* secret = XXH3_kSecret;
  const xxh_u64 seed = kBlockSeed;
  // The two little-endian words of the 16-byte piece at `off`.
  const auto lo = [&](size_t off) {
    return off == 0
               ? (XXH_CPU_LITTLE_ENDIAN ? parent.low : XXH_swap64(parent.low))
               : XXH_readLE64(t + off - 16);
  };
  const auto hi = [&](size_t off) {
    return off == 0
               ? (XXH_CPU_LITTLE_ENDIAN ? parent.high : XXH_swap64(parent.high))
               : XXH_readLE64(t + off - 8);
  };
  const auto mix16 = [&](size_t off, const xxh_u8* s) {  // XXH3_mix16B
    return XXH3_mul128_fold64(lo(off) ^ (XXH_readLE64(s) + seed),
                              hi(off) ^ (XXH_readLE64(s + 8) - seed));
  };
  const auto mix32 = [&](XXH128_hash_t acc, size_t off1, size_t off2,
                         const xxh_u8* s) {  // XXH128_mix32B
    acc.low64 += mix16(off1, s);
    acc.low64 ^= lo(off2) + hi(off2);
    acc.high64 += mix16(off2, s + 16);
    acc.high64 ^= lo(off1) + hi(off1);
    return acc;
  };
  XXH128_hash_t acc;
  acc.low64 = kLen * XXH_PRIME64_1;
  acc.high64 = 0;
  if constexpr (kLen > 96) acc = mix32(acc, 48, kLen - 64, secret + 96);
  if constexpr (kLen > 64) acc = mix32(acc, 32, kLen - 48, secret + 64);
  if constexpr (kLen > 32) acc = mix32(acc, 16, kLen - 32, secret + 32);
  acc = mix32(acc, 0, kLen - 16, secret);
  XXH128_hash_t h;
  h.low64 = acc.low64 + acc.high64;
  h.high64 = (acc.low64 * XXH_PRIME64_1) + (acc.high64 * XXH_PRIME64_4) +
             ((kLen - seed) * XXH_PRIME64_2);
  h.low64 = XXH3_avalanche(h.low64);
  h.high64 = static_cast<XXH64_hash_t>(0) - XXH3_avalanche(h.high64);
  return FromXxh(h);
}

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

}  // namespace

BlockHash HashBlock(const BlockHash& parent, absl::Span<const TokenId> tokens) {
  // The common block sizes take a fixed-length path.
  if (tokens.size() == 16) return HashSmall<16>(parent, tokens.data());
  if (tokens.size() == 8) return HashSmall<8>(parent, tokens.data());
  if (tokens.size() == 4) return HashSmall<4>(parent, tokens.data());
  if (tokens.size() == 24) return HashSmall<24>(parent, tokens.data());
  return HashAnyLength(parent, tokens);
}

}  // namespace kvcache
