// Test-only reference for the manager tests: deterministic synthetic K/V per
// (layer, token prefix), bf16 conversion, and an independent scalar
// quantize/dequantize of DESIGN.md section 3 written without the library's
// kernels (fp8 by nearest search over the 256 decoded codes).

#ifndef KVCACHE_TESTING_KV_REFERENCE_H_
#define KVCACHE_TESTING_KV_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace kvcache::testing {

// bf16 bits <-> float (round to nearest even; NaN kept quiet).
uint16_t FloatToBf16(float x);
float Bf16ToFloat(uint16_t bits);

// The value of fp8 e4m3fn code `code` (NaN for 0x7f / 0xff).
float Fp8E4M3Value(uint8_t code);

// Quantizes one head's values and returns the dequantized values (q * scale) as
// the cache holds them. For bf16/fp16 caches returns the input unchanged.
std::vector<float> QuantizeDequantizeHead(const std::vector<float>& x,
                                          DType cache_dtype);

// splitmix64 step.
uint64_t Mix(uint64_t x);

// Synthetic K (or V) of one token: `heads * head_size` bf16-representable
// floats drawn from a Gaussian-ish distribution seeded by (seed, layer,
// is_value, prefix_hash).
std::vector<float> SyntheticRow(uint64_t seed, int layer, bool is_value,
                                uint64_t prefix_hash, int heads, int head_size);

// Chained hash of a token prefix: h(p) = Mix(h(p-1) ^ token).
inline uint64_t ExtendPrefixHash(uint64_t hash, int32_t token) {
  return Mix(hash ^ (static_cast<uint64_t>(static_cast<uint32_t>(token)) +
                     0x9e3779b97f4a7c15ull));
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTING_KV_REFERENCE_H_
