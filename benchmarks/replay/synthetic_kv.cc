#include "benchmarks/replay/synthetic_kv.h"

#include <cmath>
#include <cstring>

#include "absl/base/macros.h"
#include "benchmarks/replay/synthetic_row.h"

namespace kvcache::replay {
namespace {

constexpr int kMaxHeadSize = kSyntheticMaxHeadSize;

// float -> bfloat16 bits, round to nearest even (finite input).
uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float FromBf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// float -> float16 bits for a value that float16 represents exactly: zero or
// a normal float16 with at most 10 mantissa bits (every table value is).
uint16_t ToFp16Exact(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u;
  if ((bits & 0x7fffffffu) == 0) return static_cast<uint16_t>(sign);
  const int exponent = static_cast<int>((bits >> 23) & 0xffu) - 127 + 15;
  const uint32_t mantissa = (bits >> 13) & 0x3ffu;
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exponent) << 10) |
                               mantissa);
}

}  // namespace

SyntheticKv::SyntheticKv(DType input_dtype, int num_kv_heads, int head_size,
                         int head_size_v)
    : input_dtype_(input_dtype),
      num_kv_heads_(num_kv_heads),
      head_size_(head_size),
      head_size_v_(head_size_v) {
  ABSL_ASSERT(input_dtype == DType::kBFloat16 ||
              input_dtype == DType::kFloat16);
  ABSL_ASSERT(head_size <= kMaxHeadSize && head_size_v <= kMaxHeadSize);
  const int64_t n = kSyntheticTableSize;
  values_.resize(n);
  table_.resize(n);
  for (int64_t i = 0; i < n; i += 2) {
    // Box-Muller over two uniforms in (0, 1].
    const uint64_t r = SyntheticMix(0x5eed0000ULL + static_cast<uint64_t>(i));
    const double u1 = (static_cast<double>(r >> 40) + 1.0) / 16777216.0;
    const double u2 = static_cast<double>(r & 0xffffffu) / 16777216.0;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double pair[2] = {radius * std::cos(2.0 * M_PI * u2),
                            radius * std::sin(2.0 * M_PI * u2)};
    for (int k = 0; k < 2 && i + k < n; ++k) {
      float v = FromBf16(ToBf16(static_cast<float>(pair[k])));
      if (std::fabs(v) < 6.2e-5f) v = 0.0f;  // Keep float16 normal or zero.
      values_[i + k] = v;
      table_[i + k] =
          input_dtype == DType::kBFloat16 ? ToBf16(v) : ToFp16Exact(v);
    }
  }
}

const uint16_t* SyntheticKv::Row(int layer, bool is_value, TokenAt token,
                                 int head) const {
  return table_.data() +
         SyntheticRowOffset(layer, is_value, token.token, token.position, head);
}

void SyntheticKv::Fill(int layer, bool is_value,
                       absl::Span<const TokenAt> tokens, uint16_t* out,
                       int64_t token_stride) const {
  const int d = is_value ? head_size_v_ : head_size_;
  for (size_t i = 0; i < tokens.size(); ++i) {
    uint16_t* row = out + static_cast<int64_t>(i) * token_stride;
    for (int head = 0; head < num_kv_heads_; ++head) {
      std::memcpy(row + static_cast<int64_t>(head) * d,
                  Row(layer, is_value, tokens[i], head), d * sizeof(uint16_t));
    }
  }
}

void SyntheticKv::Exact(int layer, bool is_value, TokenAt token, int head,
                        float* out) const {
  const int d = is_value ? head_size_v_ : head_size_;
  const int64_t offset = Row(layer, is_value, token, head) - table_.data();
  std::memcpy(out, values_.data() + offset, d * sizeof(float));
}

}  // namespace kvcache::replay
