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
#include "kernels/fast_divmod.h"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"

namespace kvcache::internal {

// Slot of gathered token t; -1 for padding and for slots outside the cache.
__device__ __forceinline__ int64_t GatherSlotOf(const GatherParams& p,
                                                const FastDivmod& block_size,
                                                int64_t t) {
  const CacheLayout& layout = p.cache.layout;
  int64_t slot;
  if (p.slots != nullptr) {
    slot = __ldg(p.slots + t);
  } else {
    int64_t block_index, offset;
    block_size.Divmod(p.token_begin + t, &block_index, &offset);
    const int64_t block = __ldg(p.block_table + block_index);
    slot = block < 0 ? -1 : block * layout.block_size + offset;
  }
  return slot < layout.num_slots() ? slot : -1;
}

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

// One 16-byte output vector from its cache elements `c` (kElems of them);
// zeros for a padding row. Quantized caches into 16-bit outputs work on code
// pairs: q * scale in float32 (DESIGN section 3), then one packed conversion
// per pair. `fast_int8`: int8 codes times a finite scale, where no NaN arises.
template <class Cache, class Out, class CacheVec, class OutVec>
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

template <class Cache, class Out, int kGroup, int kVecs, int kThreads>
__global__ void __launch_bounds__(kThreads)
    GatherVecKernel(const GatherParams p, const RowDividers dividers) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
  constexpr int kElems = 16 / sizeof(OutT);
  using CacheVec = Vec<CacheT, kElems>;
  using OutVec = Vec<OutT, kElems>;
  constexpr int kGroupsPerBlock = kThreads / kGroup;

  WaitForPriorGrids();
  AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % kGroup;
  const int nk = static_cast<int>(layout.head_size / kElems);
  const int nv = static_cast<int>(layout.head_size_v / kElems);
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;
  OutT* __restrict__ key = static_cast<OutT*>(p.output.key);
  OutT* __restrict__ value = static_cast<OutT*>(p.output.value);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock +
                     threadIdx.x / kGroup;
       row < rows; row += stride) {
    int64_t t, h;
    dividers.heads.Divmod(row, &t, &h);
    const int64_t slot = GatherSlotOf(p, dividers.block_size, t);
    // A padding row reads slot 0 (always in the cache) and discards it, so the
    // loads need no branch.
    const int64_t read_slot = slot >= 0 ? slot : 0;
    const CacheVec* ksrc = reinterpret_cast<const CacheVec*>(
        static_cast<const CacheT*>(p.cache.key_cache) +
        layout.key_offset(read_slot, h));
    const CacheVec* vsrc = reinterpret_cast<const CacheVec*>(
        static_cast<const CacheT*>(p.cache.value_cache) +
        layout.value_offset(read_slot, h));
    float kscale = 0.0f;
    float vscale = 0.0f;
    if constexpr (Cache::kQuantized) {
      const int64_t s = layout.scale_offset(read_slot, h);
      kscale = __ldg(p.cache.key_scale + s);
      vscale = __ldg(p.cache.value_scale + s);
    }
    CacheVec kc[kVecs];
    CacheVec vc[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      if (idx < nk) kc[i] = LoadVec(ksrc + idx);
      if (idx < nv) vc[i] = LoadVec(vsrc + idx);
    }
    OutVec* kdst = reinterpret_cast<OutVec*>(
        key + t * p.output.key_token_stride + h * p.output.key_head_stride);
    OutVec* vdst =
        reinterpret_cast<OutVec*>(value + t * p.output.value_token_stride +
                                  h * p.output.value_head_stride);
    const bool valid = slot >= 0;
    bool fast = false;
    if constexpr (std::is_same_v<Cache, Int8Type>) {
      fast = valid && AbsBits(kscale) < 0x7F800000u &&
             AbsBits(vscale) < 0x7F800000u;
    }
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      if (idx < nk) {
        kdst[idx] = ConvertVec<Cache, Out, CacheVec, OutVec>(kc[i], kscale,
                                                             valid, fast);
      }
      if (idx < nv) {
        vdst[idx] = ConvertVec<Cache, Out, CacheVec, OutVec>(vc[i], vscale,
                                                             valid, fast);
      }
    }
  }
}

// The block-table gather of the common shapes, with the index math cut to
// shifts and masks (it bounds the generic kernel: benchmarks/results/NOTES.md):
// power-of-two num_heads and block_size (log2 in the arguments), head_size ==
// head_size_v == kGroup 16-byte output vectors, dense outputs, and fewer than
// 2^31 rows, cache elements and output elements. One row per group of kGroup
// lanes, one lane per vector, a grid that covers every row once.
struct DenseBlockShifts {
  uint32_t log2_heads = 0;
  uint32_t log2_block_size = 0;
};

template <class Cache, class Out, int kGroup, int kThreads>
__global__ void __launch_bounds__(kThreads)
    GatherDenseBlockKernel(const GatherParams p,
                           const DenseBlockShifts shifts) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
  constexpr int kElems = 16 / sizeof(OutT);
  using CacheVec = Vec<CacheT, kElems>;
  using OutVec = Vec<OutT, kElems>;
  constexpr uint32_t kGroupsPerBlock = kThreads / kGroup;

  WaitForPriorGrids();
  AllowDependentGrids();
  const uint32_t rows = static_cast<uint32_t>(p.num_tokens)
                        << shifts.log2_heads;
  const uint32_t row = blockIdx.x * kGroupsPerBlock + threadIdx.x / kGroup;
  if (row >= rows) return;
  const uint32_t lane = threadIdx.x % kGroup;
  const uint32_t t = row >> shifts.log2_heads;
  const uint32_t h = row & ((1u << shifts.log2_heads) - 1);
  const uint32_t pos = static_cast<uint32_t>(p.token_begin) + t;
  const int32_t block = __ldg(p.block_table + (pos >> shifts.log2_block_size));
  // A padding entry (negative) or one outside the cache reads block 0 and
  // stores zeros.
  const bool valid =
      block >= 0 && block < static_cast<int32_t>(p.cache.layout.num_blocks);
  const uint32_t slot =
      (static_cast<uint32_t>(valid ? block : 0) << shifts.log2_block_size) |
      (pos & ((1u << shifts.log2_block_size) - 1));
  const uint32_t cache_row = (slot << shifts.log2_heads) | h;
  const CacheVec k = LoadVec(static_cast<const CacheVec*>(p.cache.key_cache) +
                             cache_row * kGroup + lane);
  const CacheVec v = LoadVec(static_cast<const CacheVec*>(p.cache.value_cache) +
                             cache_row * kGroup + lane);
  float kscale = 0.0f;
  float vscale = 0.0f;
  if constexpr (Cache::kQuantized) {
    kscale = __ldg(p.cache.key_scale + cache_row);
    vscale = __ldg(p.cache.value_scale + cache_row);
  }
  bool fast = false;
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    fast =
        valid && AbsBits(kscale) < 0x7F800000u && AbsBits(vscale) < 0x7F800000u;
  }
  static_cast<OutVec*>(p.output.key)[row * kGroup + lane] =
      ConvertVec<Cache, Out, CacheVec, OutVec>(k, kscale, valid, fast);
  static_cast<OutVec*>(p.output.value)[row * kGroup + lane] =
      ConvertVec<Cache, Out, CacheVec, OutVec>(v, vscale, valid, fast);
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
  for (int64_t row =
           static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       row < rows; row += stride) {
    int64_t t, h;
    dividers.heads.Divmod(row, &t, &h);
    const int64_t slot = GatherSlotOf(p, dividers.block_size, t);
    const CacheT* ksrc = nullptr;
    const CacheT* vsrc = nullptr;
    float kscale = 0.0f;
    float vscale = 0.0f;
    if (slot >= 0) {
      ksrc = static_cast<const CacheT*>(p.cache.key_cache) +
             layout.key_offset(slot, h);
      vsrc = static_cast<const CacheT*>(p.cache.value_cache) +
             layout.value_offset(slot, h);
      if constexpr (Cache::kQuantized) {
        kscale = p.cache.key_scale[layout.scale_offset(slot, h)];
        vscale = p.cache.value_scale[layout.scale_offset(slot, h)];
      }
    }
    ReadRowScalar<Cache, Out>(ksrc, kscale, layout.head_size,
                              static_cast<OutT*>(p.output.key) +
                                  t * p.output.key_token_stride +
                                  h * p.output.key_head_stride,
                              lane);
    ReadRowScalar<Cache, Out>(vsrc, vscale, layout.head_size_v,
                              static_cast<OutT*>(p.output.value) +
                                  t * p.output.value_token_stride +
                                  h * p.output.value_head_stride,
                              lane);
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_GATHER_CUH_
