// Device kernels of quantize-and-write (kernels/kernel_params.h:
// QuantizeWriteParams).
//
// One group of kGroup lanes owns one (token, head) row and handles its K and V
// rows together (K alone for a K-only cache, head_size_v == 0: no V loads or
// stores, one scale). Each lane loads up to kVecs 16-byte vectors of K and of V (all
// loads issued before the slot is used) and works on them as 32-bit words:
// |x| max on packed 16-bit halves, one shuffle reduction carrying the K and V
// maxima together, then the DESIGN section 3 arithmetic element by element and
// stores of the packed codes (8 bytes per 16-byte bf16 vector); lanes 0 and 1
// store the K and V scales (inline: with the row's padding,
// StoreInlineScale). The scalar kernel handles operands whose alignment or
// strides rule out 16-byte accesses.

#ifndef KVCACHE_KERNELS_QUANTIZE_WRITE_CUH_
#define KVCACHE_KERNELS_QUANTIZE_WRITE_CUH_

#include <cstdint>
#include <type_traits>

#include "core/cache_layout.h"
#include "kernels/cuda_util.cuh"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"
#include "kernels/row_ref.h"

namespace kvcache::internal {

template <class In>
inline constexpr bool kIs16BitInput = sizeof(typename In::T) == 2;

// The elements of one 16-byte input vector as float32 (exact conversions).
template <class In>
__device__ __forceinline__ void VecToFloats(
    const uint4& x, float (&f)[16 / sizeof(typename In::T)]) {
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kIs16BitInput<In>) {
      f[2 * i] = In::ToFloat(static_cast<uint16_t>(w[i]));
      f[2 * i + 1] = In::ToFloat(static_cast<uint16_t>(w[i] >> 16));
    } else {
      f[i] = BitsToFloat(w[i]);
    }
  }
}

// Max of |x| over one vector, as bits. 16-bit inputs: the two 16-bit halves
// keep separate maxima (unsigned 16-bit order of |h| equals the float order,
// NaN above inf, for bf16 and fp16 alike); float32: one 32-bit maximum.
template <class In>
__device__ __forceinline__ uint32_t VecAbsMax(const uint4& x, uint32_t m) {
  if constexpr (kIs16BitInput<In>) {
    m = __vmaxu2(m, x.x & 0x7FFF7FFFu);
    m = __vmaxu2(m, x.y & 0x7FFF7FFFu);
    m = __vmaxu2(m, x.z & 0x7FFF7FFFu);
    return __vmaxu2(m, x.w & 0x7FFF7FFFu);
  } else {
    m = max(m, x.x & 0x7FFFFFFFu);
    m = max(m, x.y & 0x7FFFFFFFu);
    m = max(m, x.z & 0x7FFFFFFFu);
    return max(m, x.w & 0x7FFFFFFFu);
  }
}

// Float bits of a 16-bit |x| maximum.
template <class In>
__device__ __forceinline__ uint32_t HalfMaxToFloatBits(uint32_t h) {
  return FloatBits(In::ToFloat(static_cast<uint16_t>(h)));
}

// Codes of four scaled values packed little-endian in one word. `finite`
// (a row whose absmax is finite, so |v| <= QMAX up to rounding) takes the short
// encode: round-to-nearest-even without a NaN test or clamp for int8, two at a
// time for fp8; both equal Cache::Encode element by element for such values.
template <class Cache>
__device__ __forceinline__ uint32_t Encode4(const float* x, float inv,
                                            bool finite) {
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = MulRn(x[j], inv);
  if (finite) {
    if constexpr (std::is_same_v<Cache, Int8Type>) {
      const int q0 = __float2int_rn(v[0]);
      const int q1 = __float2int_rn(v[1]);
      const int q2 = __float2int_rn(v[2]);
      const int q3 = __float2int_rn(v[3]);
      return __byte_perm(__byte_perm(q0, q1, 0x0040),
                         __byte_perm(q2, q3, 0x0040), 0x5410);
    } else {
      const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v[0], v[1]),
                                                   __NV_SATFINITE, __NV_E4M3);
      const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v[2], v[3]),
                                                   __NV_SATFINITE, __NV_E4M3);
      return __byte_perm(lo, hi, 0x5410);
    }
  }
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    word |= static_cast<uint32_t>(static_cast<uint8_t>(Cache::Encode(v[j])))
            << (8 * j);
  }
  return word;
}

// Encodes one 16-byte input vector into its packed codes (8 bytes for 16-bit
// inputs, 4 for float32) and stores them at dst.
template <class In, class Cache>
__device__ __forceinline__ void EncodeAndStore(const uint4& x, float inv,
                                               bool finite, void* dst) {
  constexpr int kElems = 16 / sizeof(typename In::T);
  float f[kElems];
  VecToFloats<In>(x, f);
  if constexpr (kElems == 8) {
    uint2 out;
    out.x = Encode4<Cache>(f, inv, finite);
    out.y = Encode4<Cache>(f + 4, inv, finite);
    *static_cast<uint2*>(dst) = out;
  } else {
    *static_cast<uint32_t*>(dst) = Encode4<Cache>(f, inv, finite);
  }
}

// Stores an inline scale with the zeros after it up to the row's end (pad 4
// or 12 bytes: CacheLayout::scale_pad_bytes) in one 8- or 16-byte store, so
// that the row's sectors are written whole. The address is aligned to the
// store when the cache is 16-byte aligned.
__device__ __forceinline__ void StoreInlineScale(char* at, float value,
                                                 int64_t pad) {
  if (pad == 12) {
    *reinterpret_cast<uint4*>(at) = make_uint4(FloatBits(value), 0, 0, 0);
  } else {
    *reinterpret_cast<uint2*>(at) = make_uint2(FloatBits(value), 0);
  }
}

// The body of the vector kernels. kInline: the cache's scale placement
// (CacheLayout::inline_scales()), and kRecords: whether its slots are records
// (CacheLayout::records(), layer groups of several shapes), fixed at compile
// time so that each layout's index math stays lean: a runtime placement cost
// the side kernel 5 registers (36 > 32) and a quarter of its occupancy on an
// H200, and the record offsets, taken for dense caches too, 2 registers.
template <class In, class Cache, int kGroup, int kVecs, int kThreads,
          bool kInline, bool kRecords>
__device__ __forceinline__ void QuantizeWriteVecRows(
    const QuantizeWriteParams& p, const RowDividers& dividers) {
  using InT = typename In::T;
  using CacheT = typename Cache::T;
  constexpr int kElems = 16 / sizeof(InT);
  // Bytes of cache per 16-byte input vector.
  constexpr int kOutBytes = kElems * sizeof(CacheT);
  constexpr int kGroupsPerBlock = kThreads / kGroup;

  WaitForPriorGrids();
  AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % kGroup;
  const unsigned mask = GroupMask<kGroup>();
  const int nk = static_cast<int>(layout.head_size / kElems);
  const int nv = static_cast<int>(layout.head_size_v / kElems);
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int64_t num_slots = layout.num_slots();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;
  const char* __restrict__ key = static_cast<const char*>(p.input.key);
  const char* __restrict__ value = static_cast<const char*>(p.input.value);

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock +
                   threadIdx.x / kGroup;
       r < rows; r += stride) {
    const RowRef row = WriteRowAt(p, dividers, r);
    const uint4* ksrc = reinterpret_cast<const uint4*>(
        key + row.key_offset(p.input) * static_cast<int64_t>(sizeof(InT)));
    const uint4* vsrc = reinterpret_cast<const uint4*>(
        value + row.value_offset(p.input) * static_cast<int64_t>(sizeof(InT)));
    uint4 kx[kVecs];
    uint4 vx[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      kx[i] = idx < nk ? __ldg(ksrc + idx) : make_uint4(0, 0, 0, 0);
      vx[i] = idx < nv ? __ldg(vsrc + idx) : make_uint4(0, 0, 0, 0);
    }
    // Padding (negative) slots are skipped; out-of-range ones too (debug builds
    // report them).
    if (!row.in_cache(num_slots)) continue;
    char* kdst = static_cast<char*>(p.cache.key_cache) +
                 row.template key_offset_as<kInline, kRecords>(layout) *
                     static_cast<int64_t>(sizeof(CacheT));
    char* vdst = static_cast<char*>(p.cache.value_cache) +
                 row.template value_offset_as<kInline, kRecords>(layout) *
                     static_cast<int64_t>(sizeof(CacheT));

    if constexpr (!Cache::kQuantized) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = lane + i * kGroup;
        if (idx < nk) reinterpret_cast<uint4*>(kdst)[idx] = kx[i];
        if (idx < nv) reinterpret_cast<uint4*>(vdst)[idx] = vx[i];
      }
    } else {
      uint32_t km = 0, vm = 0;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        km = VecAbsMax<In>(kx[i], km);
        vm = VecAbsMax<In>(vx[i], vm);
      }
      uint32_t kbits, vbits;
      if constexpr (kIs16BitInput<In>) {
        // (K max, V max) as one pair of 16-bit halves, reduced together.
        uint32_t m =
            __vmaxu2(__byte_perm(km, vm, 0x5410), __byte_perm(km, vm, 0x7632));
#pragma unroll
        for (int offset = kGroup / 2; offset > 0; offset /= 2) {
          m = __vmaxu2(m, __shfl_xor_sync(mask, m, offset, kGroup));
        }
        kbits = HalfMaxToFloatBits<In>(m & 0xFFFFu);
        vbits = HalfMaxToFloatBits<In>(m >> 16);
      } else {
        kbits = GroupMax<kGroup>(km, mask);
        vbits = GroupMax<kGroup>(vm, mask);
      }
      const float kscale = ScaleFromAbsMaxBits(kbits, Cache::kQMax);
      const float vscale = ScaleFromAbsMaxBits(vbits, Cache::kQMax);
      const float kinv = InverseScale(kscale);
      const float vinv = InverseScale(vscale);
      const bool finite = kbits < 0x7F800000u && vbits < 0x7F800000u;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = lane + i * kGroup;
        if (idx < nk) {
          EncodeAndStore<In, Cache>(kx[i], kinv, finite,
                                    kdst + idx * kOutBytes);
        }
        if (idx < nv) {
          EncodeAndStore<In, Cache>(vx[i], vinv, finite,
                                    vdst + idx * kOutBytes);
        }
      }
      // Lane 1 stores the V scale; a K-only cache (nv == 0) has none.
      if (lane == 0 || (lane == 1 && nv > 0)) {
        if constexpr (kInline) {
          // Byte scale_byte_offset of the row: where the scale pointer's
          // scale_offset lands.
          StoreInlineScale(
              (lane == 0 ? kdst : vdst) + layout.scale_byte_offset(),
              lane == 0 ? kscale : vscale, layout.scale_pad_bytes());
        } else {
          const int64_t s =
              row.template scale_offset_as<false, kRecords>(layout);
          float* scales = lane == 0 ? p.cache.key_scale : p.cache.value_scale;
          scales[s] = lane == 0 ? kscale : vscale;
        }
      }
    }
  }
}

// Side scales (and bf16/fp16 caches).
template <class In, class Cache, int kGroup, int kVecs, int kThreads,
          bool kRecords>
__global__ void __launch_bounds__(kThreads)
    QuantizeWriteVecKernel(const QuantizeWriteParams p,
                           const RowDividers dividers) {
  QuantizeWriteVecRows<In, Cache, kGroup, kVecs, kThreads, false, kRecords>(
      p, dividers);
}

// Threads one SM of the compile target holds (sm_86 and sm_89: 1536; 2048 on
// sm_80 and sm_90, and in the host pass, where the value is not used).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890)
inline constexpr int kMaxThreadsPerSm = 1536;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
inline constexpr int kMaxThreadsPerSm = 1024;
#else
inline constexpr int kMaxThreadsPerSm = 2048;
#endif

// Inline scales. One vector per lane fits in 32 registers when asked to (35
// otherwise): full occupancy on sm_90, as the side kernel has.
template <class In, class Cache, int kGroup, int kVecs, int kThreads,
          bool kRecords>
__global__ void __launch_bounds__(kThreads,
                                  kVecs == 1 ? kMaxThreadsPerSm / kThreads : 1)
    QuantizeWriteInlineVecKernel(const QuantizeWriteParams p,
                                 const RowDividers dividers) {
  QuantizeWriteVecRows<In, Cache, kGroup, kVecs, kThreads, true, kRecords>(
      p, dividers);
}

// One row of n elements by the 32 lanes of a warp, element by element; `pad`
// zero bytes after an inline scale (byte stores: the scalar kernel makes no
// alignment assumption beyond the scale's own).
template <class In, class Cache>
__device__ __forceinline__ void WriteRowScalar(
    const typename In::T* __restrict__ src, int64_t n,
    typename Cache::T* __restrict__ dst, float* __restrict__ scale, int64_t pad,
    int lane) {
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
    for (int64_t i = lane; i < pad; i += 32) {
      reinterpret_cast<char*>(scale + 1)[i] = 0;
    }
  }
}

template <class In, class Cache>
__global__ void __launch_bounds__(kThreadsPerBlock)
    QuantizeWriteScalarKernel(const QuantizeWriteParams p,
                              const RowDividers dividers) {
  using InT = typename In::T;
  using CacheT = typename Cache::T;
  constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
  WaitForPriorGrids();
  AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r =
           static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       r < rows; r += stride) {
    const RowRef row = WriteRowAt(p, dividers, r);
    if (!row.in_cache(layout.num_slots())) continue;
    const int64_t s = row.scale_offset(layout);
    WriteRowScalar<In, Cache>(
        static_cast<const InT*>(p.input.key) + row.key_offset(p.input),
        layout.head_size,
        static_cast<CacheT*>(p.cache.key_cache) + row.key_offset(layout),
        Cache::kQuantized ? p.cache.key_scale + s : nullptr,
        layout.scale_pad_bytes(), lane);
    if (!layout.has_value()) continue;  // A K-only cache.
    WriteRowScalar<In, Cache>(
        static_cast<const InT*>(p.input.value) + row.value_offset(p.input),
        layout.head_size_v,
        static_cast<CacheT*>(p.cache.value_cache) + row.value_offset(layout),
        Cache::kQuantized ? p.cache.value_scale + s : nullptr,
        layout.scale_pad_bytes(), lane);
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_QUANTIZE_WRITE_CUH_
