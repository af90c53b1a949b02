// The AVX2 (+ F16C) path of the CPU kernels: the row walks of cpu_rows.h over
// 8-float vectors, giving exactly the bytes of the scalar rows (and so of the
// CUDA kernels): the same IEEE multiplications and divisions, round to nearest
// even, cuda_fp8.h's saturating fp8 encoding. Only the functions of
// cpu_kernels_avx2.cc carry __attribute__((target("avx2,f16c"))); the build
// flags stay portable and the kernels pick this path at run time when
// CpuHasAvx2() (kernels/cpu_kernels.cc).
//
// Thread-compatible: functions of rows or arrays, no state.

#ifndef KVCACHE_KERNELS_CPU_KERNELS_AVX2_H_
#define KVCACHE_KERNELS_CPU_KERNELS_AVX2_H_

#include <cstdint>

#include "kernels/kernel_params.h"

namespace kvcache::internal {

// True when the CPU and the OS support AVX2 and F16C (checked once).
bool CpuHasAvx2();

// Rows [begin, end) of validated params (row = t * num_heads + h).
// REQUIRES: CpuHasAvx2().
void QuantizeWriteRowsAvx2(const QuantizeWriteParams& p, int64_t begin,
                           int64_t end);
void GatherRowsAvx2(const GatherParams& p, int64_t begin, int64_t end);

// The element conversions of the AVX2 rows over arrays of n elements (n a
// multiple of 8), for the exhaustive tests against the scalar conversions.
// REQUIRES: CpuHasAvx2().
void EncodeInt8ArrayAvx2(const float* x, int64_t n, int8_t* out);
void EncodeFp8ArrayAvx2(const float* x, int64_t n, uint8_t* out);
void DecodeFp8ArrayAvx2(const uint8_t* q, int64_t n, float* out);
void FloatToBFloat16ArrayAvx2(const float* x, int64_t n, uint16_t* out);
void FloatToFloat16ArrayAvx2(const float* x, int64_t n, uint16_t* out);
void Float16ToFloatArrayAvx2(const uint16_t* h, int64_t n, float* out);

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_CPU_KERNELS_AVX2_H_
