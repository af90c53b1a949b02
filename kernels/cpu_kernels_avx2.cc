// AVX2 rows of the CPU kernels (see cpu_kernels_avx2.h). Every function that
// uses a vector instruction is marked KVCACHE_AVX2; the row walks of
// cpu_rows.h call them once per row. Compiled with -ffp-contract=off; the only
// float arithmetic is _mm256_mul_ps (IEEE, round to nearest even), as the
// scalar MulRn; the per-row scale and its inverse come from quantize.h's
// scalar helpers. Integer conversions use the default MXCSR rounding (nearest
// even), as std::nearbyint does in the scalar path.
//
// Element conversions, per 8 lanes of float bits x:
//   int8   NaN -> 0, else cvtps_epi32(clamp(x, -128, 127))
//   fp8    cuda_fp8.h's __NV_SATFINITE e4m3 (fp8.h): NaN -> 0x7F, else the
//          sign with: for |x| >= 2^-6 the bits 20..30 rounded to nearest even
//          by integer adds, rebiased and capped at 0x7E (448; |x| > 464 and
//          infinities saturate), for smaller |x| the nearest-even multiple of
//          2^-9 from the float add |x| + 2^14
//   bf16   NaN -> 0x7FFF, else (x + 0x7FFF + ((x >> 16) & 1)) >> 16
//   fp16   F16C vcvtps2ph with explicit nearest-even rounding; NaN -> 0x7FFF
// Decoding fp8: the code's magnitude bits placed at float bit 20, times 2^120
// (exact, subnormals included), with the sign; NaN codes give a NaN, which
// the dequantization canonicalizes as the scalar path does.

#include "kernels/cpu_kernels_avx2.h"

#include <cpuid.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "absl/status/status.h"
#include "kernels/cpu_rows.h"
#include "kernels/dtype_dispatch.h"
#include "kernels/quantize.h"

#define KVCACHE_AVX2 __attribute__((target("avx2,f16c")))

namespace kvcache::internal {
namespace {

// ---- 8 lanes of input to float (exact). ----

KVCACHE_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }

template <class In>
KVCACHE_AVX2 inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<In, BFloat16Type>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

template <class In>
KVCACHE_AVX2 inline __m256 LoadIn(const typename In::T* p) {
  if constexpr (std::is_same_v<In, Float32Type>) {
    return Load8(p);
  } else {
    return Load8<In>(p);
  }
}

KVCACHE_AVX2 inline __m256 CanonicalizeNan8(__m256 v) {
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(
      v, _mm256_castsi256_ps(_mm256_set1_epi32(kCanonicalNanBits)), nan);
}

// ---- Encoders: 8 floats to 8 codes in the low byte of each 32-bit lane. ----

KVCACHE_AVX2 inline __m256i EncodeInt8(__m256 v) {
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256 lo = _mm256_set1_ps(static_cast<float>(kInt8Min));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(kInt8Max));
  const __m256 c = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
  return _mm256_andnot_si256(_mm256_castps_si256(nan), _mm256_cvtps_epi32(c));
}

KVCACHE_AVX2 inline __m256i EncodeFp8(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i a = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF));
  // Normal (|x| >= 2^-6): exponent and 3 mantissa bits are bits 20..30 of a,
  // rounded to nearest even at bit 20, rebiased (127 -> 7), capped at 0x7E:
  // everything above 464 (infinity too) saturates.
  const __m256i lsb =
      _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7FFFF)), lsb),
      20);
  const __m256i normal =
      _mm256_min_epu32(_mm256_sub_epi32(rounded, _mm256_set1_epi32(120 << 3)),
                       _mm256_set1_epi32(kFp8E4M3MaxNorm));
  // Subnormal and zero (|x| < 2^-6): codes count multiples of 2^-9, which
  // |x| + 2^14 rounds to nearest even in the float add (default MXCSR mode,
  // as the int8 conversion); 8 is the smallest normal, 2^-6.
  const __m256 magic = _mm256_set1_ps(0x1p14f);
  const __m256i sub = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), magic)),
      _mm256_castps_si256(magic));
  // Signed compares are exact here: a < 2^31.
  const __m256i is_normal =
      _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x3C800000 - 1));
  const __m256i sign =
      _mm256_srli_epi32(_mm256_xor_si256(x, a), 24);  // 0x80 or 0.
  const __m256i r =
      _mm256_or_si256(_mm256_blendv_epi8(sub, normal, is_normal), sign);
  const __m256i is_nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(kFp8E4M3Nan), is_nan);
}

template <class Cache>
KVCACHE_AVX2 inline __m256i Encode(__m256 v) {
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    return EncodeInt8(v);
  } else {
    return EncodeFp8(v);
  }
}

// Packs the low bytes of 8 lanes into 8 bytes (codes fit: int8 values for
// Int8Type, 0..255 for fp8).
template <class Cache>
KVCACHE_AVX2 inline void Store8Codes(__m256i c, void* dst) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c),
                                    _mm256_extracti128_si256(c, 1));
  const __m128i b = std::is_same_v<Cache, Int8Type> ? _mm_packs_epi16(w, w)
                                                    : _mm_packus_epi16(w, w);
  _mm_storel_epi64(static_cast<__m128i*>(dst), b);
}

// Packs 4 x 8 lanes into 32 bytes in order.
template <class Cache>
KVCACHE_AVX2 inline void Store32Codes(__m256i c0, __m256i c1, __m256i c2,
                                      __m256i c3, void* dst) {
  const __m256i w01 = _mm256_packs_epi32(c0, c1);
  const __m256i w23 = _mm256_packs_epi32(c2, c3);
  const __m256i b = std::is_same_v<Cache, Int8Type>
                        ? _mm256_packs_epi16(w01, w23)
                        : _mm256_packus_epi16(w01, w23);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(static_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(b, order));
}

// ---- Decoders and output stores. ----

KVCACHE_AVX2 inline __m256 DecodeFp8(__m128i bytes) {
  const __m256i q = _mm256_cvtepu8_epi32(bytes);
  const __m256i mag = _mm256_and_si256(q, _mm256_set1_epi32(0x7F));
  const __m256i sign = _mm256_slli_epi32(_mm256_xor_si256(q, mag), 24);
  const __m256 f =
      _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, 20)),
                    _mm256_set1_ps(0x1p120f));
  const __m256 v = _mm256_or_ps(f, _mm256_castsi256_ps(sign));
  const __m256i nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F));
  return _mm256_or_ps(v, _mm256_castsi256_ps(nan));  // All ones: a NaN.
}

template <class Cache>
KVCACHE_AVX2 inline __m256 Decode8(const typename Cache::T* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  } else {
    return DecodeFp8(bytes);
  }
}

KVCACHE_AVX2 inline __m128i Pack16(__m256i v) {
  return _mm_packus_epi32(_mm256_castsi256_si128(v),
                          _mm256_extracti128_si256(v, 1));
}

KVCACHE_AVX2 inline __m128i ToBFloat16(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb =
      _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb),
      16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FFF), nan);
  return Pack16(r);
}

KVCACHE_AVX2 inline __m128i ToFloat16(__m256 v) {
  const __m128i h =
      _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan),
                                        _mm256_extracti128_si256(nan, 1));
  return _mm_blendv_epi8(h, _mm_set1_epi16(0x7FFF), nan16);
}

template <class Out>
KVCACHE_AVX2 inline void Store8(__m256 v, typename Out::T* dst) {
  if constexpr (std::is_same_v<Out, Float32Type>) {
    _mm256_storeu_ps(dst, v);
  } else if constexpr (std::is_same_v<Out, BFloat16Type>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), ToBFloat16(v));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), ToFloat16(v));
  }
}

KVCACHE_AVX2 inline uint32_t HorizontalMaxU32(__m256i v) {
  __m128i m =
      _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// ---- Rows (n is a multiple of 8). ----

template <class In, class Cache>
KVCACHE_AVX2 void QuantizeRow(const typename In::T* src, int64_t n,
                              typename Cache::T* dst, float* scale) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i mx = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i bits = _mm256_castps_si256(LoadIn<In>(src + i));
    mx = _mm256_max_epu32(mx, _mm256_and_si256(bits, abs_mask));
  }
  const float s = ScaleFromAbsMaxBits(HorizontalMaxU32(mx), Cache::kQMax);
  const __m256 inv = _mm256_set1_ps(InverseScale(s));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    Store32Codes<Cache>(
        Encode<Cache>(_mm256_mul_ps(LoadIn<In>(src + i), inv)),
        Encode<Cache>(_mm256_mul_ps(LoadIn<In>(src + i + 8), inv)),
        Encode<Cache>(_mm256_mul_ps(LoadIn<In>(src + i + 16), inv)),
        Encode<Cache>(_mm256_mul_ps(LoadIn<In>(src + i + 24), inv)), dst + i);
  }
  for (; i < n; i += 8) {
    Store8Codes<Cache>(Encode<Cache>(_mm256_mul_ps(LoadIn<In>(src + i), inv)),
                       dst + i);
  }
  *scale = s;
}

template <class Cache, class Out>
KVCACHE_AVX2 void DequantizeRow(const typename Cache::T* src, float scale,
                                int64_t n, typename Out::T* dst) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 8) {
    Store8<Out>(CanonicalizeNan8(_mm256_mul_ps(Decode8<Cache>(src + i), s)),
                dst + i);
  }
}

template <class Cache, class Out>
KVCACHE_AVX2 void ConvertRow(const typename Cache::T* src, int64_t n,
                             typename Out::T* dst) {
  for (int64_t i = 0; i < n; i += 8) {
    Store8<Out>(CanonicalizeNan8(LoadIn<Cache>(src + i)), dst + i);
  }
}

struct Avx2Row {
  template <class In, class Cache>
  static void Write(const typename In::T* src, int64_t n,
                    typename Cache::T* dst, float* scale) {
    if constexpr (!Cache::kQuantized) {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename In::T));
    } else {
      QuantizeRow<In, Cache>(src, n, dst, scale);
    }
  }

  template <class Cache, class Out>
  static void Read(const typename Cache::T* src, const float* scale, int64_t n,
                   typename Out::T* dst) {
    if (src == nullptr) {  // Padding: zeros, all bits clear in every dtype.
      std::memset(dst, 0, static_cast<size_t>(n) * sizeof(typename Out::T));
    } else if constexpr (std::is_same_v<Cache, Out>) {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename Out::T));
    } else if constexpr (Cache::kQuantized) {
      DequantizeRow<Cache, Out>(src, *scale, n, dst);
    } else {
      ConvertRow<Cache, Out>(src, n, dst);
    }
  }
};

// ---- Array conversions for tests. ----

KVCACHE_AVX2 void EncodeInt8Array(const float* x, int64_t n, int8_t* out) {
  for (int64_t i = 0; i < n; i += 8) {
    Store8Codes<Int8Type>(EncodeInt8(_mm256_loadu_ps(x + i)), out + i);
  }
}

KVCACHE_AVX2 void EncodeFp8Array(const float* x, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; i += 8) {
    Store8Codes<Fp8E4M3Type>(EncodeFp8(_mm256_loadu_ps(x + i)), out + i);
  }
}

KVCACHE_AVX2 void DecodeFp8Array(const uint8_t* q, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 8) {
    _mm256_storeu_ps(out + i, Decode8<Fp8E4M3Type>(q + i));
  }
}

KVCACHE_AVX2 void FloatToBFloat16Array(const float* x, int64_t n,
                                       uint16_t* out) {
  for (int64_t i = 0; i < n; i += 8) {
    Store8<BFloat16Type>(_mm256_loadu_ps(x + i), out + i);
  }
}

KVCACHE_AVX2 void FloatToFloat16Array(const float* x, int64_t n,
                                      uint16_t* out) {
  for (int64_t i = 0; i < n; i += 8) {
    Store8<Float16Type>(_mm256_loadu_ps(x + i), out + i);
  }
}

KVCACHE_AVX2 void Float16ToFloatArray(const uint16_t* h, int64_t n,
                                      float* out) {
  for (int64_t i = 0; i < n; i += 8) {
    _mm256_storeu_ps(out + i, Load8<Float16Type>(h + i));
  }
}

}  // namespace

bool CpuHasAvx2() {
  // __builtin_cpu_supports("avx2") also checks that the OS saves the YMM
  // registers; F16C comes from CPUID leaf 1 (clang's builtin does not know
  // "f16c").
  static const bool has = [] {
    __builtin_cpu_init();
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __builtin_cpu_supports("avx2") &&
           __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  }();
  return has;
}

void QuantizeWriteRowsAvx2(const QuantizeWriteParams& p, int64_t begin,
                           int64_t end) {
  DispatchFloatType(p.input.dtype, "input", [&](auto in) {
    return DispatchCacheType(p.cache.layout.cache_dtype, [&](auto cache) {
      using In = decltype(in);
      using Cache = decltype(cache);
      if constexpr (kIsSupportedWrite<In, Cache>) {
        WriteRows<In, Cache, Avx2Row>(p, begin, end);
      }
      return absl::OkStatus();
    });
  }).IgnoreError();
}

void GatherRowsAvx2(const GatherParams& p, int64_t begin, int64_t end) {
  DispatchCacheType(p.cache.layout.cache_dtype, [&](auto cache) {
    return DispatchFloatType(p.output.dtype, "output", [&](auto out) {
      GatherRows<decltype(cache), decltype(out), Avx2Row>(p, begin, end);
      return absl::OkStatus();
    });
  }).IgnoreError();
}

// ---- Array conversions for tests (the declarations carry no target
// attribute, so these plain functions forward to the attributed ones). ----

void EncodeInt8ArrayAvx2(const float* x, int64_t n, int8_t* out) {
  EncodeInt8Array(x, n, out);
}
void EncodeFp8ArrayAvx2(const float* x, int64_t n, uint8_t* out) {
  EncodeFp8Array(x, n, out);
}
void DecodeFp8ArrayAvx2(const uint8_t* q, int64_t n, float* out) {
  DecodeFp8Array(q, n, out);
}
void FloatToBFloat16ArrayAvx2(const float* x, int64_t n, uint16_t* out) {
  FloatToBFloat16Array(x, n, out);
}
void FloatToFloat16ArrayAvx2(const float* x, int64_t n, uint16_t* out) {
  FloatToFloat16Array(x, n, out);
}
void Float16ToFloatArrayAvx2(const uint16_t* h, int64_t n, float* out) {
  Float16ToFloatArray(h, n, out);
}

}  // namespace kvcache::internal
