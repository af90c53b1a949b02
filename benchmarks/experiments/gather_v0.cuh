// Device kernels of dequantize-gather (kernels/kernel_params.h: GatherParams).
//
// One group of kGroup lanes owns one (token, head) row of the output and
// handles its K and V rows. Each lane reads the cache elements of one 16-byte
// output vector (8 bytes of int8 for bf16 output), multiplies by the row's
// scale and stores 16 bytes. A padding slot (negative, or a negative block
// table entry) writes zeros. The scalar kernel handles outputs that rule out
// 16-byte stores.

#ifndef KVCACHE_V0_GATHER_CUH_
#define KVCACHE_V0_GATHER_CUH_

#include <cstdint>
#include <type_traits>

#include "benchmarks/experiments/split_row_v0.cuh"
#include "core/cache_layout.h"
#include "kernels/cuda_util.cuh"
#include "kernels/kernel_params.h"
#include "kernels/quantize.h"

namespace kvcache::v0 {
using namespace kvcache::internal;

// Slot of gathered token t; -1 for padding and for slots outside the cache.
__device__ __forceinline__ int64_t GatherSlotOf(const GatherParams& p,
                                                int64_t t) {
  const CacheLayout& layout = p.cache.layout;
  int64_t slot;
  if (p.slots != nullptr) {
    slot = __ldg(p.slots + t);
  } else {
    const int64_t pos = p.token_begin + t;
    const int64_t block_index = pos / layout.block_size;
    const int64_t block = __ldg(p.block_table + block_index);
    slot = block < 0 ? -1
                     : block * layout.block_size +
                           (pos - block_index * layout.block_size);
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

template <class Cache, class Out, int kGroup, int kVecs>
__global__ void __launch_bounds__(kThreadsPerBlock)
    GatherVecKernel(const GatherParams p) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
  constexpr int kElems = 16 / sizeof(OutT);
  using CacheVec = Vec<CacheT, kElems>;
  using OutVec = Vec<OutT, kElems>;
  constexpr int kGroupsPerBlock = kThreadsPerBlock / kGroup;

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
    SplitRow(row, layout.num_heads, &t, &h);
    const int64_t slot = GatherSlotOf(p, t);
    OutVec* kdst = reinterpret_cast<OutVec*>(
        key + t * p.output.key_token_stride + h * p.output.key_head_stride);
    OutVec* vdst =
        reinterpret_cast<OutVec*>(value + t * p.output.value_token_stride +
                                  h * p.output.value_head_stride);
    CacheVec kc[kVecs] = {};
    CacheVec vc[kVecs] = {};
    float kscale = 0.0f;
    float vscale = 0.0f;
    if (slot >= 0) {
      const CacheVec* ksrc = reinterpret_cast<const CacheVec*>(
          static_cast<const CacheT*>(p.cache.key_cache) +
          layout.key_offset(slot, h));
      const CacheVec* vsrc = reinterpret_cast<const CacheVec*>(
          static_cast<const CacheT*>(p.cache.value_cache) +
          layout.value_offset(slot, h));
      if constexpr (Cache::kQuantized) {
        const int64_t s = layout.scale_offset(slot, h);
        kscale = __ldg(p.cache.key_scale + s);
        vscale = __ldg(p.cache.value_scale + s);
      }
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = lane + i * kGroup;
        if (idx < nk) kc[i] = LoadVec(ksrc + idx);
        if (idx < nv) vc[i] = LoadVec(vsrc + idx);
      }
    }
    bool fast = false;
    if constexpr (std::is_same_v<Cache, Int8Type>) {
      fast = slot >= 0 && (FloatBits(kscale) & 0x7FFFFFFFu) < 0x7F800000u &&
             (FloatBits(vscale) & 0x7FFFFFFFu) < 0x7F800000u;
    }
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = lane + i * kGroup;
      OutVec ko;
      OutVec vo;
      bool done = false;
      if constexpr (std::is_same_v<Cache, Int8Type>) {
        if (fast) {  // int8 codes times a finite scale: no NaN to canonicalize.
#pragma unroll
          for (int j = 0; j < kElems; ++j) {
            ko.v[j] = Out::FromFloat(MulRn(Cache::Decode(kc[i].v[j]), kscale));
            vo.v[j] = Out::FromFloat(MulRn(Cache::Decode(vc[i].v[j]), vscale));
          }
          done = true;
        }
      }
      if (!done) {
#pragma unroll
        for (int j = 0; j < kElems; ++j) {
          ko.v[j] = slot >= 0 ? ConvertOut<Cache, Out>(kc[i].v[j], kscale)
                              : Out::FromFloat(0.0f);
          vo.v[j] = slot >= 0 ? ConvertOut<Cache, Out>(vc[i].v[j], vscale)
                              : Out::FromFloat(0.0f);
        }
      }
      if (idx < nk) kdst[idx] = ko;
      if (idx < nv) vdst[idx] = vo;
    }
  }
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
    GatherScalarKernel(const GatherParams p) {
  using CacheT = typename Cache::T;
  using OutT = typename Out::T;
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
    const int64_t slot = GatherSlotOf(p, t);
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

}  // namespace kvcache::v0

#endif  // KVCACHE_V0_GATHER_CUH_
