// Device kernels of quantize-and-write (kernels/kernel_params.h:
// QuantizeWriteParams).
//
// One group of kGroup lanes owns one (token, head) row and handles its K and V
// rows together. Each lane loads up to kVecs 16-byte vectors of K and of V (all
// loads issued before the slot is used), reduces |x| over the group with
// shuffles, and stores its quantized elements packed (8 bytes per 16-byte bf16
// vector); lane 0 stores the two scales. The scalar kernel handles operands
// whose alignment or strides rule out 16-byte accesses.

#ifndef KVCACHE_V0_QUANTIZE_WRITE_CUH_
#define KVCACHE_V0_QUANTIZE_WRITE_CUH_

#include <cstdint>
#include <type_traits>

#include "benchmarks/experiments/split_row_v0.cuh"
#include "core/cache_layout.h"
#include "kernels/cuda_util.cuh"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"

namespace kvcache::v0 {
using namespace kvcache::internal;

// Encodes one vector of finite inputs scaled by `inv` (|x * inv| <= QMAX up to
// rounding, as for every row whose absmax is finite). Bit-identical to
// Cache::Encode(MulRn(x, inv)) element by element for such inputs: int8 rounds
// to nearest even (the clamp cannot bind), fp8 converts two at a time with the
// same saturating round-to-nearest-even conversion.
template <class In, class Cache, class InVec, class OutVec>
__device__ __forceinline__ void EncodeFiniteVec(const InVec& x, float inv,
                                                OutVec* out) {
  constexpr int kElems = sizeof(x.v) / sizeof(x.v[0]);
  static_assert(kElems % 4 == 0, "vectors hold a multiple of 4 elements");
  uint32_t words[kElems / 4];
  if constexpr (std::is_same_v<Cache, Int8Type>) {
#pragma unroll
    for (int j = 0; j < kElems; j += 4) {
      const int q0 = __float2int_rn(MulRn(In::ToFloat(x.v[j]), inv));
      const int q1 = __float2int_rn(MulRn(In::ToFloat(x.v[j + 1]), inv));
      const int q2 = __float2int_rn(MulRn(In::ToFloat(x.v[j + 2]), inv));
      const int q3 = __float2int_rn(MulRn(In::ToFloat(x.v[j + 3]), inv));
      words[j / 4] = __byte_perm(__byte_perm(q0, q1, 0x0040),
                                 __byte_perm(q2, q3, 0x0040), 0x5410);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kElems; j += 4) {
      const uint32_t lo = __nv_cvt_float2_to_fp8x2(
          make_float2(MulRn(In::ToFloat(x.v[j]), inv),
                      MulRn(In::ToFloat(x.v[j + 1]), inv)),
          __NV_SATFINITE, __NV_E4M3);
      const uint32_t hi = __nv_cvt_float2_to_fp8x2(
          make_float2(MulRn(In::ToFloat(x.v[j + 2]), inv),
                      MulRn(In::ToFloat(x.v[j + 3]), inv)),
          __NV_SATFINITE, __NV_E4M3);
      words[j / 4] = __byte_perm(lo, hi, 0x5410);
    }
  }
  static_assert(sizeof(words) == sizeof(OutVec));
  memcpy(out, words, sizeof(words));
}

template <class In, class Cache, int kGroup, int kVecs>
__global__ void __launch_bounds__(kThreadsPerBlock)
    QuantizeWriteVecKernel(const QuantizeWriteParams p) {
  using InT = typename In::T;
  using CacheT = typename Cache::T;
  constexpr int kElems = 16 / sizeof(InT);
  using InVec = Vec<InT, kElems>;
  using OutVec = Vec<CacheT, kElems>;
  constexpr int kGroupsPerBlock = kThreadsPerBlock / kGroup;

  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % kGroup;
  const unsigned mask = GroupMask<kGroup>();
  const int nk = static_cast<int>(layout.head_size / kElems);
  const int nv = static_cast<int>(layout.head_size_v / kElems);
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int64_t num_slots = layout.num_slots();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;
  const InT* __restrict__ key = static_cast<const InT*>(p.input.key);
  const InT* __restrict__ value = static_cast<const InT*>(p.input.value);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock +
                     threadIdx.x / kGroup;
       row < rows; row += stride) {
    int64_t t, h;
    SplitRow(row, layout.num_heads, &t, &h);
    const int64_t slot = __ldg(p.slot_mapping + t);
    const InVec* ksrc = reinterpret_cast<const InVec*>(
        key + t * p.input.key_token_stride + h * p.input.key_head_stride);
    const InVec* vsrc = reinterpret_cast<const InVec*>(
        value + t * p.input.value_token_stride + h * p.input.value_head_stride);
    InVec kx[kVecs] = {};
    InVec vx[kVecs] = {};
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      if (idx < nk) kx[i] = LoadVec(ksrc + idx);
      if (idx < nv) vx[i] = LoadVec(vsrc + idx);
    }
    // Padding (negative) slots are skipped; out-of-range ones too (debug builds
    // report them).
    if (slot < 0 || slot >= num_slots) continue;
    CacheT* kdst =
        static_cast<CacheT*>(p.cache.key_cache) + layout.key_offset(slot, h);
    CacheT* vdst = static_cast<CacheT*>(p.cache.value_cache) +
                   layout.value_offset(slot, h);

    if constexpr (!Cache::kQuantized) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = lane + i * kGroup;
        if (idx < nk) reinterpret_cast<InVec*>(kdst)[idx] = kx[i];
        if (idx < nv) reinterpret_cast<InVec*>(vdst)[idx] = vx[i];
      }
    } else {
      uint32_t kmax = 0;
      uint32_t vmax = 0;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
#pragma unroll
        for (int j = 0; j < kElems; ++j) {
          kmax = MaxBits(kmax, AbsBits(In::ToFloat(kx[i].v[j])));
          vmax = MaxBits(vmax, AbsBits(In::ToFloat(vx[i].v[j])));
        }
      }
      kmax = GroupMax<kGroup>(kmax, mask);
      vmax = GroupMax<kGroup>(vmax, mask);
      const float kscale = ScaleFromAbsMaxBits(kmax, Cache::kQMax);
      const float vscale = ScaleFromAbsMaxBits(vmax, Cache::kQMax);
      const float kinv = InverseScale(kscale);
      const float vinv = InverseScale(vscale);
      // Rows of finite input (all but pathological ones) take the short encode:
      // every scaled value is finite with |v| <= QMAX (up to rounding), where
      // round-to-nearest-even without a NaN check or clamp is exact.
      const bool finite = kmax < 0x7F800000u && vmax < 0x7F800000u;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = lane + i * kGroup;
        OutVec kq;
        OutVec vq;
        if (finite) {
          EncodeFiniteVec<In, Cache>(kx[i], kinv, &kq);
          EncodeFiniteVec<In, Cache>(vx[i], vinv, &vq);
        } else {
#pragma unroll
          for (int j = 0; j < kElems; ++j) {
            kq.v[j] = Cache::Encode(MulRn(In::ToFloat(kx[i].v[j]), kinv));
            vq.v[j] = Cache::Encode(MulRn(In::ToFloat(vx[i].v[j]), vinv));
          }
        }
        if (idx < nk) reinterpret_cast<OutVec*>(kdst)[idx] = kq;
        if (idx < nv) reinterpret_cast<OutVec*>(vdst)[idx] = vq;
      }
      if (lane == 0) {
        const int64_t s = layout.scale_offset(slot, h);
        p.cache.key_scale[s] = kscale;
        p.cache.value_scale[s] = vscale;
      }
    }
  }
}

// One row of n elements by the 32 lanes of a warp, element by element.
template <class In, class Cache>
__device__ __forceinline__ void WriteRowScalar(
    const typename In::T* __restrict__ src, int64_t n,
    typename Cache::T* __restrict__ dst, float* __restrict__ scale, int lane) {
  if constexpr (!Cache::kQuantized) {
    for (int64_t i = lane; i < n; i += 32) dst[i] = src[i];
  } else {
    uint32_t m = 0;
    for (int64_t i = lane; i < n; i += 32)
      m = MaxBits(m, AbsBits(In::ToFloat(src[i])));
    m = GroupMax<32>(m, 0xFFFFFFFFu);
    const float s = ScaleFromAbsMaxBits(m, Cache::kQMax);
    const float inv = InverseScale(s);
    for (int64_t i = lane; i < n; i += 32)
      dst[i] = Cache::Encode(MulRn(In::ToFloat(src[i]), inv));
    if (lane == 0) *scale = s;
  }
}

template <class In, class Cache>
__global__ void __launch_bounds__(kThreadsPerBlock)
    QuantizeWriteScalarKernel(const QuantizeWriteParams p) {
  using InT = typename In::T;
  using CacheT = typename Cache::T;
  constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row =
           static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       row < rows; row += stride) {
    int64_t t, h;
    SplitRow(row, layout.num_heads, &t, &h);
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0 || slot >= layout.num_slots()) continue;
    const int64_t s = layout.scale_offset(slot, h);
    WriteRowScalar<In, Cache>(
        static_cast<const InT*>(p.input.key) + t * p.input.key_token_stride +
            h * p.input.key_head_stride,
        layout.head_size,
        static_cast<CacheT*>(p.cache.key_cache) + layout.key_offset(slot, h),
        Cache::kQuantized ? p.cache.key_scale + s : nullptr, lane);
    WriteRowScalar<In, Cache>(
        static_cast<const InT*>(p.input.value) +
            t * p.input.value_token_stride + h * p.input.value_head_stride,
        layout.head_size_v,
        static_cast<CacheT*>(p.cache.value_cache) +
            layout.value_offset(slot, h),
        Cache::kQuantized ? p.cache.value_scale + s : nullptr, lane);
  }
}

}  // namespace kvcache::v0

#endif  // KVCACHE_V0_QUANTIZE_WRITE_CUH_
