#include "testing/kv_reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace kvcache::testing {

uint16_t FloatToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

float Fp8E4M3Value(uint8_t code) {
  const int sign = code >> 7;
  const int exponent = (code >> 3) & 0xf;
  const int mantissa = code & 0x7;
  if (exponent == 0xf && mantissa == 0x7) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float magnitude =
      exponent == 0 ? std::ldexp(static_cast<float>(mantissa) / 8.0f, -6)
                    : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f,
                                 exponent - 7);
  return sign ? -magnitude : magnitude;
}

namespace {

// Nearest fp8 value to x with ties to the even code, saturating at +-448; the
// sign is kept (so -0.0 maps to the code 0x80).
float NearestFp8(float x) {
  if (std::isnan(x)) return x;
  const float magnitude = std::min(std::fabs(x), 448.0f);
  float best = 0.0f;
  double best_err = std::numeric_limits<double>::infinity();
  int best_code = 0;
  for (int code = 0; code < 0x7f; ++code) {
    const float v = Fp8E4M3Value(static_cast<uint8_t>(code));
    const double err = std::fabs(static_cast<double>(v) - magnitude);
    if (err < best_err ||
        (err == best_err && (code & 1) == 0 && (best_code & 1) == 1)) {
      best = v;
      best_err = err;
      best_code = code;
    }
  }
  return std::signbit(x) ? -best : best;
}

}  // namespace

std::vector<float> QuantizeDequantizeHead(const std::vector<float>& x,
                                          DType cache_dtype) {
  if (!IsQuantized(cache_dtype)) return x;
  float absmax = 0.0f;
  for (float v : x) absmax = std::max(absmax, std::fabs(v));
  const float scale = std::max(absmax / QuantMax(cache_dtype), kMinScale);
  const float inv = 1.0f / scale;
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float scaled = x[i] * inv;
    float q;
    if (cache_dtype == DType::kInt8) {
      // An int8 code has no negative zero.
      q = static_cast<float>(static_cast<int>(
          std::clamp(std::nearbyint(scaled), -128.0f, 127.0f)));
    } else {
      q = NearestFp8(scaled);
    }
    out[i] = q * scale;
  }
  return out;
}

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<float> SyntheticRow(uint64_t seed, int layer, bool is_value,
                                uint64_t prefix_hash, int heads,
                                int head_size) {
  std::vector<float> row(static_cast<size_t>(heads) * head_size);
  uint64_t state = Mix(
      seed ^ Mix(prefix_hash ^ (static_cast<uint64_t>(layer) << 1 | is_value)));
  for (float& v : row) {
    // Sum of four uniforms: roughly Gaussian, rounded to bf16.
    float sum = 0.0f;
    for (int k = 0; k < 4; ++k) {
      state = Mix(state);
      sum += static_cast<float>(state >> 40) / static_cast<float>(1 << 24);
    }
    v = Bf16ToFloat(FloatToBf16((sum - 2.0f) * 1.7f));
  }
  return row;
}

}  // namespace kvcache::testing
