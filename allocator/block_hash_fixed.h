// HashFixed: HashBlock for a block size known at compile time, inline, for
// the loops that hash every block of a prompt (block_hash.cc, and the prefix
// match, which interleaves the hash chain with the lookups). Internal to
// //allocator. Includes xxhash.h with XXH_INLINE_ALL.

#ifndef KVCACHE_ALLOCATOR_BLOCK_HASH_FIXED_H_
#define KVCACHE_ALLOCATOR_BLOCK_HASH_FIXED_H_

#include <cstddef>
#include <cstdint>

#include "absl/base/attributes.h"
#include "allocator/block_hash.h"

// Inlined: the chained hash is a serial dependency, and a call into the shared
// library costs a third of it. Same algorithm and output as libxxhash.
#define XXH_INLINE_ALL
#include "xxhash.h"

namespace kvcache {
namespace internal {

constexpr uint64_t kBlockSeed = 0x6b76636163686532ULL;  // "kvcache2"

// XXH3_128bits_withSeed of the bytes (parent.low, parent.high, tokens) for
// inputs of 32..128 bytes that are a multiple of 16: XXH3_len_17to128_128b
// written out over that virtual buffer. Every 16-byte piece it reads is either
// the parent (read from registers: no copy, and the chained parent enters only
// the last round, so the rounds over the tokens overlap the previous block's
// hash) or 16 bytes of tokens. Same output as libxxhash (tested).
template <size_t kTokens>
ABSL_ATTRIBUTE_ALWAYS_INLINE inline BlockHash HashFixed(const BlockHash& parent,
                                                        const TokenId* tokens) {
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
  return BlockHash{h.low64, h.high64};
}

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_HASH_FIXED_H_
