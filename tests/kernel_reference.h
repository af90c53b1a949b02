// An independent scalar reference of the cache kernels (DESIGN.md section 3 and
// the non-finite rules of kernels/quantize.h), written without the kernels'
// shared helpers: fp16 through GCC's _Float16, fp8 by a nearest-value search
// over the decoded code table, bf16 by the bias trick.

#ifndef KVCACHE_TESTS_KERNEL_REFERENCE_H_
#define KVCACHE_TESTS_KERNEL_REFERENCE_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tests/kernel_test_util.h"

namespace kvcache::testing::ref {

inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float Nan() { return FromBits(0x7FFFFFFFu); }

inline float Load(DType dtype, const uint8_t* p) {
  if (dtype == DType::kFloat32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  if (dtype == DType::kBFloat16)
    return FromBits(static_cast<uint32_t>(h) << 16);
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}

inline void Store(DType dtype, float f, uint8_t* p) {
  if (dtype == DType::kFloat32) {
    std::memcpy(p, &f, 4);
    return;
  }
  uint16_t h;
  if (std::isnan(f)) {
    h = 0x7FFF;
  } else if (dtype == DType::kBFloat16) {
    const uint32_t u = Bits(f);
    h = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  } else {
    const _Float16 x = static_cast<_Float16>(f);
    std::memcpy(&h, &x, 2);
  }
  std::memcpy(p, &h, 2);
}

// Value of e4m3fn code c (c & 0x7F != 0x7F).
inline double Fp8Value(uint8_t c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);
  return (c & 0x80) ? -mag : mag;
}

inline uint8_t Fp8Encode(float v) {
  if (std::isnan(v)) return 0x7F;
  static const std::array<double, 127> table = [] {
    std::array<double, 127> t{};
    for (int c = 0; c < 127; ++c) t[c] = Fp8Value(static_cast<uint8_t>(c));
    return t;
  }();
  const double a = std::fabs(static_cast<double>(v));
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  if (a >= table[126]) return sign | 126;  // Saturate.
  const int hi = static_cast<int>(
      std::upper_bound(table.begin(), table.end(), a) - table.begin());
  const int lo = hi - 1;  // table[lo] <= a < table[hi]
  const double dlo = a - table[lo], dhi = table[hi] - a;
  int code = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
  return static_cast<uint8_t>(sign | code);
}

inline float Fp8Decode(uint8_t c) {
  if ((c & 0x7F) == 0x7F) return Nan();
  return static_cast<float>(Fp8Value(c));
}

struct Quantized {
  std::vector<uint8_t> codes;  // Raw cache bytes of the row.
  float scale = 0;
};

// Quantizes one row (raw input bytes) into cache_dtype.
inline Quantized QuantizeRow(DType in, DType cache, const uint8_t* src,
                             int64_t n) {
  Quantized q;
  const size_t ie = DTypeSize(in);
  if (!IsQuantized(cache)) {
    q.codes.assign(src, src + n * ie);
    return q;
  }
  std::vector<float> x(n);
  bool has_nan = false;
  float absmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = Load(in, src + i * ie);
    if (std::isnan(x[i])) has_nan = true;
    absmax = std::max(absmax, std::fabs(x[i]));
  }
  const float qmax = cache == DType::kInt8 ? 127.0f : 448.0f;
  q.scale = has_nan ? Nan() : std::max(absmax / qmax, 1e-6f);
  const float inv = 1.0f / q.scale;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * inv;
    if (cache == DType::kInt8) {
      int8_t c = 0;
      if (!std::isnan(v)) {
        const double r = std::nearbyint(static_cast<double>(v));
        c = static_cast<int8_t>(std::min(127.0, std::max(-128.0, r)));
      }
      q.codes.push_back(static_cast<uint8_t>(c));
    } else {
      q.codes.push_back(Fp8Encode(v));
    }
  }
  return q;
}

// Dequantizes one cache row into out dtype (raw bytes).
inline void DequantizeRow(DType cache, DType out, const uint8_t* codes,
                          float scale, int64_t n, uint8_t* dst) {
  const size_t oe = DTypeSize(out);
  for (int64_t i = 0; i < n; ++i) {
    float v;
    if (cache == out) {
      std::memcpy(dst + i * oe, codes + i * oe, oe);
      continue;
    }
    if (cache == DType::kInt8) {
      v = static_cast<float>(static_cast<int8_t>(codes[i])) * scale;
    } else if (cache == DType::kFp8E4M3) {
      v = Fp8Decode(codes[i]) * scale;
    } else {
      v = Load(cache, codes + i * DTypeSize(cache));
    }
    if (std::isnan(v)) v = Nan();
    Store(out, v, dst + i * oe);
  }
}

// Applies quantize-and-write of case hc to copies of its caches. A K-only case
// (head_size_v 0) has no V rows and no V scales.
struct Caches {
  std::vector<uint8_t> key_cache, value_cache;
  std::vector<float> key_scale, value_scale;  // Side scales only.
};

// Where the reference puts the rows of case hc: its own statement of the two
// placements of DESIGN.md section 2 (not CacheLayout's). Side: rows of
// D (Dv) elements, scales in [slot, head] arrays. Inline: rows of `pitch`
// bytes, codes at 0, the float32 scale at max(D, Dv), padding to a multiple
// of 16 (a write stores the zeros after the scale).
struct Placement {
  bool inline_scales = false;
  int64_t key_row_bytes = 0, value_row_bytes = 0;
  int64_t scale_at = 0;  // Inline: byte of the scale in the row.

  explicit Placement(const HostCase& hc) {
    const int64_t D = hc.config.head_size, Dv = hc.config.head_size_v;
    const int64_t ce = static_cast<int64_t>(DTypeSize(hc.config.cache_dtype));
    inline_scales = hc.config.placement == ScalePlacement::kInline;
    if (inline_scales) {
      scale_at = std::max(D, Dv);
      key_row_bytes = value_row_bytes = (scale_at + 4 + 15) / 16 * 16;
    } else {
      key_row_bytes = D * ce;
      value_row_bytes = Dv * ce;
    }
  }
  // Byte offset of row (slot, h) in the K or V cache.
  int64_t Row(bool key, int64_t slot, int64_t h, int64_t heads) const {
    return (slot * heads + h) * (key ? key_row_bytes : value_row_bytes);
  }
  float GetScale(const Caches& c, bool key, int64_t slot, int64_t h,
                 int64_t heads) const {
    if (!inline_scales) {
      return (key ? c.key_scale : c.value_scale)[slot * heads + h];
    }
    float s;
    std::memcpy(&s,
                (key ? c.key_cache : c.value_cache).data() +
                    Row(key, slot, h, heads) + scale_at,
                4);
    return s;
  }
  void SetScale(Caches& c, bool key, int64_t slot, int64_t h, int64_t heads,
                float s) const {
    if (!inline_scales) {
      (key ? c.key_scale : c.value_scale)[slot * heads + h] = s;
      return;
    }
    uint8_t* at = (key ? c.key_cache : c.value_cache).data() +
                  Row(key, slot, h, heads) + scale_at;
    std::memcpy(at, &s, 4);
    // Zeros from the scale to the row's end.
    std::memset(at + 4, 0, key_row_bytes - scale_at - 4);
  }
};

// The codes and scales of caches c of case hc, unpacked to the side layout
// ([slot, head, D] codes, [slot, head] scales), whatever its placement.
inline Caches Unpack(const HostCase& hc, const Caches& c) {
  const Placement place(hc);
  const int64_t H = hc.config.num_heads, D = hc.config.head_size,
                Dv = hc.config.head_size_v;
  const int64_t ce = static_cast<int64_t>(DTypeSize(hc.config.cache_dtype));
  const int64_t slots = hc.layout.num_slots();
  const bool quantized = IsQuantized(hc.config.cache_dtype);
  Caches out;
  for (int64_t slot = 0; slot < slots; ++slot) {
    for (int64_t h = 0; h < H; ++h) {
      const uint8_t* k = c.key_cache.data() + place.Row(true, slot, h, H);
      out.key_cache.insert(out.key_cache.end(), k, k + D * ce);
      if (quantized) {
        out.key_scale.push_back(place.GetScale(c, true, slot, h, H));
      }
      if (Dv == 0) continue;  // K only.
      const uint8_t* v = c.value_cache.data() + place.Row(false, slot, h, H);
      out.value_cache.insert(out.value_cache.end(), v, v + Dv * ce);
      if (quantized) {
        out.value_scale.push_back(place.GetScale(c, false, slot, h, H));
      }
    }
  }
  return out;
}

inline Caches QuantizeWrite(const HostCase& hc) {
  Caches out{hc.key_cache, hc.value_cache, hc.key_scale, hc.value_scale};
  const Placement place(hc);
  const CacheLayout& L = hc.layout;
  const int64_t H = L.num_heads;
  const DType in = hc.config.input_dtype, cache = hc.config.cache_dtype;
  for (int64_t t = 0; t < hc.config.num_tokens; ++t) {
    const int64_t slot = hc.slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < H; ++h) {
      const Quantized k =
          QuantizeRow(in, cache, hc.Row(true, t, h), L.head_size);
      std::memcpy(out.key_cache.data() + place.Row(true, slot, h, H),
                  k.codes.data(), k.codes.size());
      if (IsQuantized(cache)) place.SetScale(out, true, slot, h, H, k.scale);
      if (L.head_size_v == 0) continue;  // K only: no V, no V scale.
      const Quantized v =
          QuantizeRow(in, cache, hc.Row(false, t, h), L.head_size_v);
      std::memcpy(out.value_cache.data() + place.Row(false, slot, h, H),
                  v.codes.data(), v.codes.size());
      if (IsQuantized(cache)) place.SetScale(out, false, slot, h, H, v.scale);
    }
  }
  return out;
}

// Applies gather g over caches c (of case hc) to a copy of g's output buffer.
inline std::vector<uint8_t> Gather(const HostCase& hc, const Caches& c,
                                   const GatherCase& g) {
  std::vector<uint8_t> out = g.output;
  const Placement place(hc);
  const CacheLayout& L = hc.layout;
  const int64_t H = L.num_heads;
  const DType cache = hc.config.cache_dtype;
  const size_t oe = DTypeSize(g.out_dtype);
  for (int64_t t = 0; t < g.num_tokens; ++t) {
    const int64_t slot = g.SlotOf(t, L.block_size);
    for (int64_t h = 0; h < H; ++h) {
      for (int kv = 0; kv < (L.head_size_v == 0 ? 1 : 2); ++kv) {
        const bool key = kv == 0;
        const Operand& op = key ? g.key : g.value;
        const int64_t d = key ? L.head_size : L.head_size_v;
        uint8_t* dst =
            out.data() +
            (op.offset + t * op.token_stride + h * op.head_stride) * oe;
        if (slot < 0) {
          for (int64_t i = 0; i < d; ++i)
            Store(g.out_dtype, 0.0f, dst + i * oe);
          continue;
        }
        const std::vector<uint8_t>& data = key ? c.key_cache : c.value_cache;
        const float scale =
            IsQuantized(cache) ? place.GetScale(c, key, slot, h, H) : 1.0f;
        DequantizeRow(cache, g.out_dtype,
                      data.data() + place.Row(key, slot, h, H), scale, d, dst);
      }
    }
  }
  return out;
}

}  // namespace kvcache::testing::ref

#endif  // KVCACHE_TESTS_KERNEL_REFERENCE_H_
