// fp8 e4m3fn conversions shared by the CPU and CUDA kernels (DESIGN.md section
// 3).
//
// Encoding is CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3): round
// to nearest even, finite values beyond 448 (and infinities) saturate to +-448,
// every NaN becomes 0x7F. Decoding is CUDA's __nv_cvt_fp8_to_halfraw widened to
// float (exact; 0x7F/0xFF decode to the half NaN 0x7FFF).
//
// Under nvcc, or in a host build that has CUDA's headers
// (KVCACHE_HAVE_CUDA_HEADERS, set by
// @local_cuda//:cuda_headers_lib), the conversions come from cuda_fp8.h itself.
// Otherwise the portable functions below are used; tests/fp8_test.cc checks
// them against cuda_fp8.h.

#ifndef KVCACHE_KERNELS_FP8_H_
#define KVCACHE_KERNELS_FP8_H_

#include <cstdint>

#include "core/host_device.h"
#include "kernels/float_convert.h"

#if defined(__CUDACC__) || defined(KVCACHE_HAVE_CUDA_HEADERS)
#include <cuda_fp8.h>
#define KVCACHE_FP8_FROM_CUDA_HEADERS 1
#endif

namespace kvcache::internal {

inline constexpr uint8_t kFp8E4M3Nan = 0x7F;
inline constexpr uint8_t kFp8E4M3MaxNorm = 0x7E;  // 448

// Portable twin of __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3), on
// float32 bits.
KVCACHE_HOST_DEVICE uint8_t PortableFloatToFp8E4M3(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t a = bits & 0x7FFFFFFFu;
  const uint32_t sign = (bits >> 24) & 0x80u;
  if (a > 0x7F800000u) return kFp8E4M3Nan;  // NaN, sign dropped.
  if (a > 0x43E80000u)
    return static_cast<uint8_t>(sign | kFp8E4M3MaxNorm);    // > 464
  if (a <= 0x3A800000u) return static_cast<uint8_t>(sign);  // <= 2^-10: zero.
  constexpr uint32_t kHalfUlp =
      1u << 19;  // Half an fp8 ulp in float32 mantissa bits.
  uint32_t mantissa = (a >> 20) & 0x7u;
  const int32_t exponent = static_cast<int32_t>(a >> 23) - 127 + 7;
  uint32_t res;
  if (a >= 0x3C800000u) {  // >= 2^-6: normal.
    res = (static_cast<uint32_t>(exponent) << 3) | mantissa;
    const uint32_t round = a & ((kHalfUlp << 1) - 1);
    if (round > kHalfUlp || (round == kHalfUlp && (mantissa & 1u))) ++res;
  } else {                                                       // Subnormal.
    const uint32_t shift = static_cast<uint32_t>(1 - exponent);  // 1..4
    mantissa |= 0x8u;
    res = mantissa >> shift;
    const uint32_t round = (a | 0x800000u) & ((kHalfUlp << (shift + 1)) - 1);
    if (round > (kHalfUlp << shift) ||
        (round == (kHalfUlp << shift) && (res & 1u))) {
      ++res;
    }
  }
  return static_cast<uint8_t>(res | sign);
}

// Portable twin of __nv_cvt_fp8_to_halfraw(q, __NV_E4M3) widened to float.
KVCACHE_HOST_DEVICE float PortableFp8E4M3ToFloat(uint8_t q) {
  if ((q & 0x7Fu) == 0x7Fu)
    return BitsToFloat(0x7FFFE000u);  // half 0x7FFF widened.
  const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
  const uint32_t exponent = (q >> 3) & 0xFu;
  uint32_t mantissa = q & 0x7u;
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    int32_t e = -6;  // value = mantissa * 2^-9 = 0.mantissa * 2^-6
    while ((mantissa & 0x8u) == 0) {
      mantissa <<= 1;
      --e;
    }
    mantissa &= 0x7u;
    return BitsToFloat(sign | (static_cast<uint32_t>(e + 127) << 23) |
                       (mantissa << 20));
  }
  return BitsToFloat(sign | ((exponent - 7u + 127u) << 23) | (mantissa << 20));
}

KVCACHE_HOST_DEVICE uint8_t FloatToFp8E4M3(float x) {
#if defined(KVCACHE_FP8_FROM_CUDA_HEADERS)
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
#else
  return PortableFloatToFp8E4M3(x);
#endif
}

KVCACHE_HOST_DEVICE float Fp8E4M3ToFloat(uint8_t q) {
#if defined(KVCACHE_FP8_FROM_CUDA_HEADERS)
  const __half_raw h = __nv_cvt_fp8_to_halfraw(q, __NV_E4M3);
  return Float16ToFloat(h.x);
#else
  return PortableFp8E4M3ToFloat(q);
#endif
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_FP8_H_
