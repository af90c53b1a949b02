// Dividers fixed on the host, by which the row kernels split a row index into
// token and head and a token position into block and offset
// (kernels/row_ref.h). Each has Divmod(n, &q, &r); plain value types built on
// the host and passed by value to kernels; thread-compatible.
//
//   FastDivmod   any divisor: one multiply-high and one shift (CUDA kernels)
//   IntDivider   any divisor: an integer division (CPU kernels)
//   Pow2Divider  2^log2: a shift and a mask (the lean block-table gather)
//
// FastDivmod divides 31-bit unsigned values:
//
//   FastDivmod heads = FastDivmod::Make(8);
//   uint32_t t, h;
//   heads.Divmod(row, &t, &h);   // REQUIRES: row < 2^31
//   int64_t t64, h64;
//   heads.Divmod(row64, &t64, &h64);   // any row64 >= 0
//
// For a divisor d with 2^(l-1) < d <= 2^l, multiplier = ceil(2^(31+l) / d) fits
// 32 bits and floor(n * multiplier / 2^(31+l)) == n / d for every n < 2^31.

#ifndef KVCACHE_KERNELS_FAST_DIVMOD_H_
#define KVCACHE_KERNELS_FAST_DIVMOD_H_

#include <cstdint>

#include "absl/numeric/bits.h"
#include "core/host_device.h"

namespace kvcache::internal {

struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 0;  // 0 when divisor == 1.
  uint32_t shift = 0;       // l - 1.

  // Largest dividend (exclusive) Divmod handles.
  static constexpr int64_t kDividendLimit = int64_t{1} << 31;

  // REQUIRES: 1 <= d < 2^31.
  static FastDivmod Make(uint32_t d) {
    FastDivmod f;
    f.divisor = d;
    if (d == 1) return f;
    // l = ceil(log2(d)).
    const uint32_t l = static_cast<uint32_t>(absl::bit_width(d - 1));
    const uint64_t p = uint64_t{1} << (31 + l);
    f.multiplier = static_cast<uint32_t>((p + d - 1) / d);
    f.shift = l - 1;
    return f;
  }

  KVCACHE_HOST_DEVICE uint32_t Div(uint32_t n) const {
    if (multiplier == 0) return n;
#if defined(__CUDA_ARCH__)
    return __umulhi(n, multiplier) >> shift;
#else
    return static_cast<uint32_t>(
        (static_cast<uint64_t>(n) * multiplier >> 32) >> shift);
#endif
  }

  KVCACHE_HOST_DEVICE void Divmod(uint32_t n, uint32_t* q, uint32_t* r) const {
    *q = Div(n);
    *r = n - *q * divisor;
  }

  // Any non-negative 64-bit dividend: the fast path below kDividendLimit, an
  // integer division above it.
  KVCACHE_HOST_DEVICE void Divmod(int64_t n, int64_t* q, int64_t* r) const {
    if (n < kDividendLimit) {
      uint32_t q32, r32;
      Divmod(static_cast<uint32_t>(n), &q32, &r32);
      *q = q32;
      *r = r32;
    } else {
      *q = n / divisor;
      *r = n - *q * divisor;
    }
  }
};

// Plain integer division.
struct IntDivider {
  int64_t divisor = 1;

  KVCACHE_HOST_DEVICE void Divmod(int64_t n, int64_t* q, int64_t* r) const {
    *q = n / divisor;
    *r = n - *q * divisor;
  }
};

// Division by 2^log2 of 32-bit dividends.
struct Pow2Divider {
  uint32_t log2 = 0;

  KVCACHE_HOST_DEVICE void Divmod(uint32_t n, uint32_t* q, uint32_t* r) const {
    *q = n >> log2;
    *r = n & ((1u << log2) - 1);
  }
};

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_FAST_DIVMOD_H_
