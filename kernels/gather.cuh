// Device kernels of dequantize-gather (kernels/kernel_params.h: GatherParams).
//
// One group of kGroup lanes owns one (token, head) row of the output and
// handles its K and V rows. Each lane reads the cache elements of one 16-byte
// output vector (8 bytes of int8 for bf16 output), multiplies by the row's
// scale and stores 16 bytes. A padding slot (negative, or a negative block
// table entry) writes zeros. The scalar kernel handles outputs that rule out
// 16-byte stores.

#ifndef KVCACHE_KERNELS_GATHER_CUH_
#define KVCACHE_KERNELS_GATHER_CUH_

#include <cstdint>
#include <type_traits>

#include "core/cache_layout.h"
#include "kernels/cuda_util.cuh"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"
#include "kernels/row_ref.h"

namespace kvcache::internal {

// Cache element -> output element.
template <class Cache, class Out>
__device__ __forceinline__ typename Out::T ConvertOut(typename Cache::T q,
                                                      float scale) {
  if constexpr (std::is_same_v<Cache, Out>) {
    return q;
  } else if constexpr (Cache::kQuantized) {
    return Out::FromFloat(Dequantize(Cache::Decode(q), scale));
  } else {
    return Out::FromFloat(CanonicalizeNan(Cache::ToFloat(q)));
  }
}

// Two float32 values as two packed output elements (round to nearest even;
// 16-bit outputs turn any NaN into the canonical 0x7FFF, as FromFloat does).
template <class Out>
__device__ __forceinline__ uint32_t PackPair(float a, float b) {
  if constexpr (std::is_same_v<Out, BFloat16Type>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    static_assert(std::is_same_v<Out, Float16Type>);
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The float32 values of two cache codes held in the low 16 bits of `pair`.
template <class Cache>
__device__ __forceinline__ float2 DecodePair(uint32_t pair) {
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    return make_float2(static_cast<float>(static_cast<int8_t>(pair & 0xFFu)),
                       static_cast<float>(static_cast<int8_t>(pair >> 8)));
  } else {
    static_assert(std::is_same_v<Cache, Fp8E4M3Type>);
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(pair & 0xFFFFu), __NV_E4M3);
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
  }
}

// The vectors of the 16-byte gather kernels: an output vector of kElems
// elements and the kElems cache codes it comes from.
template <class Cache, class Out>
struct GatherVecs {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
  static constexpr int kElems = 16 / sizeof(OutT);
  using CacheVec = Vec<CacheT, kElems>;
  using OutVec = Vec<OutT, kElems>;
};

// ConvertVec's `fast_int8` for a row is valid && FastInt8Scale(kscale) &&
// FastInt8Scale(vscale): int8 codes times finite scales, where q * scale gives
// no NaN. Always false for other caches.
template <class Cache>
__device__ __forceinline__ bool FastInt8Scale(float scale) {
  return std::is_same_v<Cache, Int8Type> && AbsBits(scale) < 0x7F800000u;
}

// One output vector from its cache elements `c` (kElems of them); zeros for a
// padding row. Quantized caches into 16-bit outputs work on code pairs:
// q * scale in float32 (DESIGN section 3), then one packed conversion per
// pair. `fast_int8`: see FastInt8Scale.
template <class Cache, class Out,
          class CacheVec = typename GatherVecs<Cache, Out>::CacheVec,
          class OutVec = typename GatherVecs<Cache, Out>::OutVec>
__device__ __forceinline__ OutVec ConvertVec(const CacheVec& c, float scale,
                                             bool valid, bool fast_int8) {
  constexpr int kElems = sizeof(OutVec) / sizeof(typename Out::T);
  OutVec o;
  constexpr bool kPairs = Cache::kQuantized && sizeof(typename Out::T) == 2;
  if constexpr (kPairs) {
    if (valid && (fast_int8 || !std::is_same_v<Cache, Int8Type>)) {
      static_assert(sizeof(CacheVec) == 8);
      uint32_t codes[2];
      memcpy(codes, &c, sizeof(codes));
      uint32_t out[kElems / 2];
#pragma unroll
      for (int j = 0; j < kElems / 2; ++j) {
        const float2 x = DecodePair<Cache>(codes[j / 2] >> (16 * (j % 2)));
        out[j] = PackPair<Out>(MulRn(x.x, scale), MulRn(x.y, scale));
      }
      memcpy(&o, out, sizeof(o));
      return o;
    }
  }
#pragma unroll
  for (int j = 0; j < kElems; ++j) {
    o.v[j] =
        valid ? ConvertOut<Cache, Out>(c.v[j], scale) : Out::FromFloat(0.0f);
  }
  return o;
}

// kRecords: CacheLayout::records(), fixed at compile time (the dense
// instantiation's index math is what it was before records existed).
template <class Cache, class Out, int kGroup, int kVecs, int kThreads,
          bool kRecords>
__global__ void __launch_bounds__(kThreads)
    GatherVecKernel(const GatherParams p, const RowDividers dividers) {
  using V = GatherVecs<Cache, Out>;
  constexpr int kGroupsPerBlock = kThreads / kGroup;

  WaitForPriorGrids();
  AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % kGroup;
  const int nk = static_cast<int>(layout.head_size / V::kElems);
  const int nv = static_cast<int>(layout.head_size_v / V::kElems);
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;
  typename V::OutT* __restrict__ key =
      static_cast<typename V::OutT*>(p.output.key);
  typename V::OutT* __restrict__ value =
      static_cast<typename V::OutT*>(p.output.value);

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock +
                   threadIdx.x / kGroup;
       r < rows; r += stride) {
    const RowRef row = GatherRowAt(p, dividers, r);
    // A padding row reads slot 0 (always in the cache) and discards it, so the
    // loads need no branch.
    RowRef read = row;
    read.slot = row.slot >= 0 ? row.slot : 0;
    const auto* ksrc = reinterpret_cast<const typename V::CacheVec*>(
        static_cast<const typename V::CacheT*>(p.cache.key_cache) +
        read.template key_offset_in<kRecords>(layout));
    const auto* vsrc = reinterpret_cast<const typename V::CacheVec*>(
        static_cast<const typename V::CacheT*>(p.cache.value_cache) +
        read.template value_offset_in<kRecords>(layout));
    float kscale = 0.0f;
    float vscale = 0.0f;
    if constexpr (Cache::kQuantized) {
      const int64_t s = read.template scale_offset_in<kRecords>(layout);
      kscale = __ldg(p.cache.key_scale + s);
      vscale = __ldg(p.cache.value_scale + s);
    }
    typename V::CacheVec kc[kVecs];
    typename V::CacheVec vc[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      if (idx < nk) kc[i] = LoadVec(ksrc + idx);
      if (idx < nv) vc[i] = LoadVec(vsrc + idx);
    }
    auto* kdst =
        reinterpret_cast<typename V::OutVec*>(key + row.key_offset(p.output));
    auto* vdst = reinterpret_cast<typename V::OutVec*>(
        value + row.value_offset(p.output));
    const bool valid = row.slot >= 0;
    const bool fast =
        valid && FastInt8Scale<Cache>(kscale) && FastInt8Scale<Cache>(vscale);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      if (idx < nk) {
        kdst[idx] = ConvertVec<Cache, Out>(kc[i], kscale, valid, fast);
      }
      if (idx < nv) {
        vdst[idx] = ConvertVec<Cache, Out>(vc[i], vscale, valid, fast);
      }
    }
  }
}

// The block-table gather of the common shapes, with the index math cut to
// shifts and masks (it bounds the generic kernel: benchmarks/results/NOTES.md):
// dense caches (no records), power-of-two num_heads and block_size
// (Pow2Divider), head_size ==
// head_size_v == kGroup 16-byte output vectors, dense outputs, and fewer than
// 2^31 rows, cache elements and output elements. One row per group of kGroup
// lanes, one lane per vector, a grid that covers every row once. In 32 bits:
//
//   cache row (slot * num_heads + head)   (slot << log2 heads) | head
//   its codes                             cache row * row_vecs cache vectors
//   its scale                             cache row * scale_stride floats
//   dense output row (r * head_size)      r * kGroup vectors
//
// row_vecs is the row pitch in cache vectors (kGroup for side scales) and
// scale_stride is CacheLayout::scale_stride().
template <class Cache, class Out, int kGroup, int kThreads>
__global__ void __launch_bounds__(kThreads)
    GatherDenseBlockKernel(const GatherParams p,
                           const RowDividersOf<Pow2Divider> dividers,
                           const uint32_t row_vecs,
                           const uint32_t scale_stride) {
  using V = GatherVecs<Cache, Out>;
  constexpr uint32_t kGroupsPerBlock = kThreads / kGroup;

  WaitForPriorGrids();
  AllowDependentGrids();
  const uint32_t rows = static_cast<uint32_t>(p.num_tokens)
                        << dividers.heads.log2;
  const uint32_t r = blockIdx.x * kGroupsPerBlock + threadIdx.x / kGroup;
  if (r >= rows) return;
  const uint32_t lane = threadIdx.x % kGroup;
  uint32_t t, h, block_index, offset;
  dividers.heads.Divmod(r, &t, &h);
  dividers.block_size.Divmod(static_cast<uint32_t>(p.token_begin) + t,
                             &block_index, &offset);
  const int32_t block = LoadIndex(p.block_table + block_index);
  // A padding entry (negative) or one outside the cache reads block 0 and
  // stores zeros.
  const bool valid =
      block >= 0 && block < static_cast<int32_t>(p.cache.layout.num_blocks);
  const uint32_t slot =
      (static_cast<uint32_t>(valid ? block : 0) << dividers.block_size.log2) |
      offset;
  const uint32_t cache_row = (slot << dividers.heads.log2) | h;
  const auto k =
      LoadVec(static_cast<const typename V::CacheVec*>(p.cache.key_cache) +
              cache_row * row_vecs + lane);
  const auto v =
      LoadVec(static_cast<const typename V::CacheVec*>(p.cache.value_cache) +
              cache_row * row_vecs + lane);
  float kscale = 0.0f;
  float vscale = 0.0f;
  if constexpr (Cache::kQuantized) {
    kscale = __ldg(p.cache.key_scale + cache_row * scale_stride);
    vscale = __ldg(p.cache.value_scale + cache_row * scale_stride);
  }
  const bool fast =
      valid && FastInt8Scale<Cache>(kscale) && FastInt8Scale<Cache>(vscale);
  static_cast<typename V::OutVec*>(p.output.key)[r * kGroup + lane] =
      ConvertVec<Cache, Out>(k, kscale, valid, fast);
  static_cast<typename V::OutVec*>(p.output.value)[r * kGroup + lane] =
      ConvertVec<Cache, Out>(v, vscale, valid, fast);
}

// One row of n elements by the 32 lanes of a warp; zeros when src is null.
template <class Cache, class Out>
__device__ __forceinline__ void ReadRowScalar(
    const typename Cache::T* __restrict__ src, float scale, int64_t n,
    typename Out::T* __restrict__ dst, int lane) {
  for (int64_t i = lane; i < n; i += 32) {
    dst[i] = src != nullptr ? ConvertOut<Cache, Out>(src[i], scale)
                            : Out::FromFloat(0.0f);
  }
}

template <class Cache, class Out>
__global__ void __launch_bounds__(kThreadsPerBlock)
    GatherScalarKernel(const GatherParams p, const RowDividers dividers) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
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
    const RowRef row = GatherRowAt(p, dividers, r);
    const CacheT* ksrc = nullptr;
    const CacheT* vsrc = nullptr;
    float kscale = 0.0f;
    float vscale = 0.0f;
    if (row.slot >= 0) {
      ksrc = static_cast<const CacheT*>(p.cache.key_cache) +
             row.key_offset(layout);
      vsrc = static_cast<const CacheT*>(p.cache.value_cache) +
             row.value_offset(layout);
      if constexpr (Cache::kQuantized) {
        kscale = p.cache.key_scale[row.scale_offset(layout)];
        vscale = p.cache.value_scale[row.scale_offset(layout)];
      }
    }
    ReadRowScalar<Cache, Out>(
        ksrc, kscale, layout.head_size,
        static_cast<OutT*>(p.output.key) + row.key_offset(p.output), lane);
    ReadRowScalar<Cache, Out>(
        vsrc, vscale, layout.head_size_v,
        static_cast<OutT*>(p.output.value) + row.value_offset(p.output), lane);
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_GATHER_CUH_
