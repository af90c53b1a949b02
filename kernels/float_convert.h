// Bit-exact conversions between float32 and the 16-bit input types (bfloat16,
// float16), shared by the CPU and CUDA kernels, and the element-type tags the
// kernels are templated on.
//
// Widening (bf16/fp16 -> float) is exact. Narrowing (float -> bf16/fp16) rounds
// to nearest even; every NaN becomes the canonical 0x7FFF, as CUDA's
// conversions do; fp16 overflows to infinity. Device code uses the hardware
// conversions, host code the portable functions below; tests check them against
// each other on every float32 bit pattern (tests/cuda_kernels_test.cc) and
// against cuda_bf16.h / cuda_fp16.h's host conversions where those headers
// exist (tests/fp8_test.cc).

#ifndef KVCACHE_KERNELS_FLOAT_CONVERT_H_
#define KVCACHE_KERNELS_FLOAT_CONVERT_H_

#include <cstdint>
#include <cstring>

#include "core/dtype.h"
#include "core/host_device.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace kvcache::internal {

// The NaN that every kernel output carries (CUDA's canonical float NaN).
inline constexpr uint32_t kCanonicalNanBits = 0x7FFFFFFFu;

KVCACHE_HOST_DEVICE uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

KVCACHE_HOST_DEVICE float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

KVCACHE_HOST_DEVICE float CanonicalNan() {
  return BitsToFloat(kCanonicalNanBits);
}

// x, or the canonical NaN when x is a NaN (NaN payloads differ between x86 and
// CUDA arithmetic).
KVCACHE_HOST_DEVICE float CanonicalizeNan(float x) {
  return (FloatBits(x) & 0x7FFFFFFFu) > 0x7F800000u ? CanonicalNan() : x;
}

// ---- Portable conversions (host; also compiled for the device by the
// exhaustive tests). ----

KVCACHE_HOST_DEVICE float PortableBFloat16ToFloat(uint16_t h) {
  return BitsToFloat(static_cast<uint32_t>(h) << 16);
}

KVCACHE_HOST_DEVICE uint16_t PortableFloatToBFloat16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  uint32_t r = x >> 16;
  const uint32_t remainder = x << 16;
  if (remainder > 0x80000000u || (remainder == 0x80000000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(r);
}

KVCACHE_HOST_DEVICE float PortableFloat16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu)
    return BitsToFloat(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    // Subnormal: normalize.
    exponent = 113;  // 127 - 15 + 1
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3FFu;
    return BitsToFloat(sign | (exponent << 23) | (mantissa << 13));
  }
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, as cuda_fp16.hpp's __float2half_rn.
KVCACHE_HOST_DEVICE uint16_t PortableFloatToFloat16(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t u = x & 0x7FFFFFFFu;
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t result;
  uint32_t remainder;
  if (u >= 0x7F800000u) {  // Inf or NaN.
    return static_cast<uint16_t>(u == 0x7F800000u ? (sign | 0x7C00u) : 0x7FFFu);
  } else if (u > 0x477FEFFFu) {  // Rounds to infinity.
    return static_cast<uint16_t>(sign | 0x7C00u);
  } else if (u >= 0x38800000u) {  // Normal.
    remainder = u << 19;
    result = sign | ((u - 0x38000000u) >> 13);
  } else if (u < 0x33000001u) {  // Rounds to zero.
    return static_cast<uint16_t>(sign);
  } else {  // Subnormal.
    const uint32_t shift = 0x7Eu - (u >> 23);
    const uint32_t mantissa = (u & 0x7FFFFFu) | 0x800000u;
    remainder = mantissa << (32u - shift);
    result = sign | (mantissa >> shift);
  }
  if (remainder > 0x80000000u || (remainder == 0x80000000u && (result & 1u))) {
    ++result;
  }
  return static_cast<uint16_t>(result);
}

// ---- The conversions the kernels use: hardware on the device, portable on the
// host. ----

KVCACHE_HOST_DEVICE float BFloat16ToFloat(uint16_t h) {
  return PortableBFloat16ToFloat(h);
}

KVCACHE_HOST_DEVICE uint16_t FloatToBFloat16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  return PortableFloatToBFloat16(f);
#endif
}

KVCACHE_HOST_DEVICE float Float16ToFloat(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  return PortableFloat16ToFloat(h);
#endif
}

KVCACHE_HOST_DEVICE uint16_t FloatToFloat16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  return PortableFloatToFloat16(f);
#endif
}

// ---- Element-type tags of the floating input/output types. ----

struct Float32Type {
  using T = float;
  static constexpr DType kDType = DType::kFloat32;
  static constexpr bool kQuantized = false;
  static KVCACHE_HOST_DEVICE float ToFloat(T x) { return x; }
  static KVCACHE_HOST_DEVICE T FromFloat(float f) { return f; }
};

struct Float16Type {
  using T = uint16_t;
  static constexpr DType kDType = DType::kFloat16;
  static constexpr bool kQuantized = false;
  static KVCACHE_HOST_DEVICE float ToFloat(T x) { return Float16ToFloat(x); }
  static KVCACHE_HOST_DEVICE T FromFloat(float f) { return FloatToFloat16(f); }
};

struct BFloat16Type {
  using T = uint16_t;
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr bool kQuantized = false;
  static KVCACHE_HOST_DEVICE float ToFloat(T x) { return BFloat16ToFloat(x); }
  static KVCACHE_HOST_DEVICE T FromFloat(float f) { return FloatToBFloat16(f); }
};

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_FLOAT_CONVERT_H_
