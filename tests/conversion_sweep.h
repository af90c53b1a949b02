// Test helper: runs the kernels' device conversions (hardware cvt on sm_89+)
// against the portable conversions compiled for the device, over every float32
// bit pattern, every fp8 code and every half pattern, and counts the
// mismatches. With the host-side comparison of the portable functions against
// cuda_fp8.h (tests/fp8_test.cc), this ties the device to the host bit for bit.

#ifndef KVCACHE_TESTS_CONVERSION_SWEEP_H_
#define KVCACHE_TESTS_CONVERSION_SWEEP_H_

#include <cstdint>

#include "absl/status/statusor.h"

namespace kvcache::testing {

struct ConversionMismatches {
  unsigned long long fp8_encode = 0;   // Over all 2^32 floats.
  unsigned long long bf16_encode = 0;  // Over all 2^32 floats.
  unsigned long long fp16_encode = 0;  // Over all 2^32 floats.
  unsigned long long fp8_decode =
      0;  // Over all 256 codes (NaN: NaN-ness only).
  unsigned long long fp16_widen =
      0;  // Over all 65536 halves (NaN: NaN-ness only).
  unsigned int first_fp8_encode = 0xFFFFFFFFu;  // Smallest mismatching pattern.
};

absl::StatusOr<ConversionMismatches> SweepConversionsOnDevice();

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_CONVERSION_SWEEP_H_
