// Per-(token, head) quantization math of DESIGN.md section 3, shared by the CPU
// and CUDA kernels so that both execute the same float32 operations in the same
// order:
//
//   absmax = max |x_i|                  exact in any order: a max of magnitudes
//   scale  = max(absmax / QMAX, 1e-6)   IEEE division
//   inv    = 1 / scale                  IEEE division
//   q_i    = encode(x_i * inv)          IEEE multiplication, never contracted
//   x_i'   = q_i * scale                the dequantized value
//
// Non-finite input, defined identically on both sides:
//   - a head holding a NaN gets scale = NaN (canonical 0x7FFFFFFF); all its
//     codes are NaN codes;
//   - a head holding an infinity (and no NaN) gets scale = +inf, inv = 0, so
//     its finite elements encode as zero and its infinities (inf * 0 = NaN) as
//     NaN codes;
//   - the NaN code is 0 for int8 and 0x7F for fp8; the dequantized value of a
//     NaN scale or of a NaN code is the canonical NaN.
// Other heads are never affected.
// The magnitude max runs on the float bits (|x| as uint32 orders like the
// float, NaN above +inf), so it is exact, order-independent and lets a NaN win.

#ifndef KVCACHE_KERNELS_QUANTIZE_H_
#define KVCACHE_KERNELS_QUANTIZE_H_

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/host_device.h"
#include "kernels/float_convert.h"
#include "kernels/fp8.h"

namespace kvcache::internal {

// IEEE round-to-nearest float operations; under nvcc these cannot be fused into
// an FMA or approximated. Host files that use them compile with
// -ffp-contract=off.
KVCACHE_HOST_DEVICE float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KVCACHE_HOST_DEVICE float DivRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// |x| as bits: unsigned order of these equals float order of |x|, and a NaN
// exceeds +inf.
KVCACHE_HOST_DEVICE uint32_t AbsBits(float x) {
  return FloatBits(x) & 0x7FFFFFFFu;
}

KVCACHE_HOST_DEVICE uint32_t MaxBits(uint32_t a, uint32_t b) {
  return a > b ? a : b;
}

// scale = max(absmax / qmax, kMinScale); the canonical NaN when absmax is a
// NaN.
KVCACHE_HOST_DEVICE float ScaleFromAbsMaxBits(uint32_t absmax_bits,
                                              float qmax) {
  if (absmax_bits > 0x7F800000u) return CanonicalNan();
  const float min_scale = kMinScale;
  const float scale = DivRn(BitsToFloat(absmax_bits), qmax);
  return scale > min_scale ? scale : min_scale;
}

KVCACHE_HOST_DEVICE float InverseScale(float scale) {
  return DivRn(1.0f, scale);
}

// Dequantized value of a decoded code; NaN results are canonical.
KVCACHE_HOST_DEVICE float Dequantize(float code, float scale) {
  return CanonicalizeNan(MulRn(code, scale));
}

// int8 cache element: clamp(round_to_nearest_even(v), -128, 127); NaN encodes
// as 0.
struct Int8Type {
  using T = int8_t;
  static constexpr DType kDType = DType::kInt8;
  static constexpr bool kQuantized = true;
  static constexpr float kQMax = kInt8QuantMax;
  static KVCACHE_HOST_DEVICE T Encode(float v) {
    if (!(v == v)) return 0;
    const float lo = static_cast<float>(kInt8Min);
    const float hi = static_cast<float>(kInt8Max);
    // Clamping before rounding gives the same result as rounding first (the
    // bounds are integers).
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
#if defined(__CUDA_ARCH__)
    return static_cast<T>(__float2int_rn(v));
#else
    return static_cast<T>(
        static_cast<int>(std::nearbyint(v)));  // Default mode: nearest even.
#endif
  }
  static KVCACHE_HOST_DEVICE float Decode(T q) { return static_cast<float>(q); }
};

// fp8 e4m3fn cache element: saturating round-to-nearest-even (kernels/fp8.h).
struct Fp8E4M3Type {
  using T = uint8_t;
  static constexpr DType kDType = DType::kFp8E4M3;
  static constexpr bool kQuantized = true;
  static constexpr float kQMax = kFp8E4M3QuantMax;
  static KVCACHE_HOST_DEVICE T Encode(float v) { return FloatToFp8E4M3(v); }
  static KVCACHE_HOST_DEVICE float Decode(T q) { return Fp8E4M3ToFloat(q); }
};

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_QUANTIZE_H_
