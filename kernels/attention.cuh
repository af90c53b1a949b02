// Device kernels of paged decode attention (semantics: attention_params.h).
//
// Algorithm (split-KV flash decoding, CUDA cores, float32 arithmetic):
//   grid  x = KV head x row tile, y = sequence, z = split of the keys.
//   A thread block (4 warps) owns one KV head of one sequence and a tile of
//   kRows query rows (row = query token j x GQA head g, j-major), so each K/V
//   row is read from memory once per split and decoded once for all of them.
//   Its split is a contiguous range of `chunk` keys, starting at the first key
//   the sequence's rows attend (key_begin: 0, or the window's start).
//   Lanes: a key row (head_size codes) is spread over kLanes lanes with one
//   16-byte vector each (kElems codes); a warp reads 32 / kLanes keys per
//   step, the 4 warps interleave, and each lane prefetches its next key's K/V
//   vectors and scales before it computes the current one.
//   Per key: codes -> float in registers (int8 by the 2^23 magic-number trick,
//   fp8 by the paired hardware conversion, bf16/fp16 by widening), the dot
//   with each row's query slice (q pre-scaled by softmax_scale and log2 e),
//   a butterfly sum over the kLanes lanes, times the key's scale; soft-cap,
//   causal and window masks; then an online softmax in base 2 per row, each
//   lane group keeping its own (max, sum, o slice) and adding p * v_scale *
//   code to it (the V scale folds into the weight: no dequantized copy).
//   End of the split: lane groups merge their states by shuffles, warps
//   through shared memory; with one split the block writes o = acc / sum,
//   otherwise (acc / sum, max + log2 sum) to the workspace, and
//   AttentionReduceKernel merges a row's splits (one warp per row).
//   Splits past a sequence's last key exit at once and the reduction ignores
//   them, so short sequences in a long batch cost nothing.

#ifndef KVCACHE_KERNELS_ATTENTION_CUH_
#define KVCACHE_KERNELS_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "kernels/attention_math.h"
#include "kernels/attention_params.h"
#include "kernels/cuda_util.cuh"
#include "kernels/fast_divmod.h"
#include "kernels/quantize.h"

namespace kvcache::internal {

inline constexpr int kAttnWarps = 4;
inline constexpr int kAttnThreads = 32 * kAttnWarps;
inline constexpr float kLog2e = 1.4426950408889634f;

// What the launcher decided for one launch.
struct AttentionGrid {
  int32_t splits = 1;
  int32_t chunk = 1;        // Keys per split.
  int32_t tiles = 1;        // Row tiles per (sequence, KV head).
  int32_t group = 1;        // Query heads per KV head.
  bool vector_out = false;  // o rows allow 16-byte stores.
  FastDivmod block_size;
};

// 16 bytes of cache codes as floats: raw codes for quantized caches (the
// scale is applied after the dot product), values for bf16/fp16.
template <class Cache>
__device__ __forceinline__ void DecodeVec(
    const uint4& raw, float (&f)[16 / sizeof(typename Cache::T)]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    // Biased byte u = code + 128 under exponent 2^23: float(2^23 + u) -
    // (2^23 + 128) = code, exactly.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t b = w[i] ^ 0x80808080u;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        f[4 * i + k] =
            __uint_as_float(__byte_perm(b, 0x4B000000u, 0x7440u | k)) -
            8388736.0f;
      }
    }
  } else if constexpr (std::is_same_v<Cache, Fp8E4M3Type>) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
          static_cast<__nv_fp8x2_storage_t>(w[i / 2] >> (16 * (i % 2))),
          __NV_E4M3);
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&h));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  } else if constexpr (std::is_same_v<Cache, BFloat16Type>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
    static_assert(std::is_same_v<Cache, Float16Type>);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
}

__device__ __forceinline__ float HalfToFloat(const void* base, int64_t i,
                                             bool bf16) {
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return bf16 ? __uint_as_float(static_cast<uint32_t>(h) << 16)
              : __half2float(__ushort_as_half(h));
}

// Stores 8 floats as 16-bit values (one 16-byte store when `vector`).
__device__ __forceinline__ void StoreHalf8(void* base, int64_t i,
                                           const float (&x)[8], bool bf16,
                                           bool vector) {
  uint16_t h[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    h[e] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x[e]))
                : __half_as_ushort(__float2half_rn(x[e]));
  }
  uint16_t* dst = static_cast<uint16_t*>(base) + i;
  if (vector) {
    uint4 v;
    memcpy(&v, h, sizeof(v));
    *reinterpret_cast<uint4*>(dst) = v;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = h[e];
  }
}

// exp2(x - m), 0 when x is -inf (also when m is).
__device__ __forceinline__ float Exp2Diff(float x, float m) {
  return x == -INFINITY ? 0.0f : exp2f(x - m);
}

// One key's loaded vectors.
struct KeyRegs {
  uint4 k, v;
  float ks, vs;
  bool valid;
};

template <class Cache, int kHeadDim, int kRows>
__global__ void __launch_bounds__(kAttnThreads)
    AttentionKernel(const AttentionParams p, const AttentionGrid grid) {
  using CacheT = typename Cache::T;
  constexpr int kElems = 16 / sizeof(CacheT);
  constexpr int kLanes = kHeadDim / kElems;
  constexpr int kKeysPerWarp = 32 / kLanes;
  static_assert(kLanes >= 1 && kLanes <= 32 && 32 % kLanes == 0);
  __shared__ float s_acc[kAttnWarps][kRows][kHeadDim];
  __shared__ float s_m[kAttnWarps][kRows];
  __shared__ float s_l[kAttnWarps][kRows];

  WaitForPriorGrids();
  AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int32_t kv_head = blockIdx.x / grid.tiles;
  const int32_t tile = blockIdx.x % grid.tiles;
  const int32_t seq = blockIdx.y;
  const int32_t split = blockIdx.z;
  const AttentionSeq s = LoadAttentionSeq(p, seq, p.seq_lens[seq],
                                          p.q_start[seq], p.q_start[seq + 1]);
  const int32_t rows = s.num_q * grid.group;
  const int32_t first_row = tile * kRows;
  const int64_t kb64 = static_cast<int64_t>(s.key_begin) +
                       static_cast<int64_t>(split) * grid.chunk;
  if (first_row >= rows || (split > 0 && kb64 >= s.len)) return;
  const int32_t kb = static_cast<int32_t>(kb64);
  const int32_t ke = static_cast<int32_t>(
      kb64 + grid.chunk < s.len ? kb64 + grid.chunk : s.len);

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int sub = lane % kLanes;  // Which 16-byte vector of the row.
  const int kgroup = lane / kLanes;
  const bool bf16 = p.q_dtype == DType::kBFloat16;
  const bool capped = p.soft_cap > 0.0f;
  const float q_scale = capped ? p.softmax_scale : p.softmax_scale * kLog2e;

  float q[kRows][kElems];
  float acc[kRows][kElems];
  float m[kRows], l[kRows];
  int32_t rb[kRows], re[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int32_t row = first_row + r;
    const int32_t j = row / grid.group;
    const int32_t h = kv_head * grid.group + row % grid.group;
    const bool real = row < rows;
    if (real) {
      AttentionRowKeys(s, p.window, j, &rb[r], &re[r]);
    } else {
      rb[r] = re[r] = 0;
    }
    const int64_t base =
        (static_cast<int64_t>(s.q_begin) + j) * p.q_token_stride +
        static_cast<int64_t>(h) * p.q_head_stride + sub * kElems;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      q[r][e] = real ? HalfToFloat(p.q, base + e, bf16) * q_scale : 0.0f;
      acc[r][e] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  const int32_t* table = p.block_table + seq * p.block_table_stride;
  const CacheT* kc = static_cast<const CacheT*>(p.cache.key_cache);
  const CacheT* vc = static_cast<const CacheT*>(p.cache.value_cache);
  auto load = [&](int32_t t) {
    KeyRegs k;
    k.valid = false;
    k.k = k.v = make_uint4(0, 0, 0, 0);
    k.ks = k.vs = 0.0f;
    if (t < ke) {
      uint32_t block_index, offset;
      grid.block_size.Divmod(static_cast<uint32_t>(t), &block_index, &offset);
      const int32_t block = __ldg(table + block_index);
      if (block >= 0 && block < layout.num_blocks) {
        const int64_t slot =
            static_cast<int64_t>(block) * layout.block_size + offset;
        k.k = __ldg(reinterpret_cast<const uint4*>(
                        kc + layout.key_offset(slot, kv_head)) +
                    sub);
        k.v = __ldg(reinterpret_cast<const uint4*>(
                        vc + layout.value_offset(slot, kv_head)) +
                    sub);
        if constexpr (Cache::kQuantized) {
          const int64_t so = layout.scale_offset(slot, kv_head);
          k.ks = __ldg(p.cache.key_scale + so);
          k.vs = __ldg(p.cache.value_scale + so);
        }
        k.valid = true;
      }
    }
    return k;
  };

  constexpr int32_t kStep = kAttnWarps * kKeysPerWarp;
  int32_t base = kb + warp * kKeysPerWarp;
  KeyRegs cur = load(base + kgroup);
  for (; base < ke; base += kStep) {
    const int32_t t = base + kgroup;
    const KeyRegs next = load(t + kStep);
    float kf[kElems];
    DecodeVec<Cache>(cur.k, kf);
    float score[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float d = 0.0f;
#pragma unroll
      for (int e = 0; e < kElems; ++e) d = fmaf(q[r][e], kf[e], d);
      score[r] = d;
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        score[r] += __shfl_xor_sync(0xFFFFFFFFu, score[r], off);
      }
    }
    float vf[kElems];
    DecodeVec<Cache>(cur.v, vf);
    const float vscale = Cache::kQuantized ? cur.vs : 1.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float x = Cache::kQuantized ? score[r] * cur.ks : score[r];
      if (capped) x = p.soft_cap * tanhf(x / p.soft_cap) * kLog2e;
      const bool ok = cur.valid && t >= rb[r] && t < re[r];
      x = ok ? x : -INFINITY;
      if (x > m[r]) {
        const float a = Exp2Diff(m[r], x);
        l[r] *= a;
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[r][e] *= a;
        m[r] = x;
      }
      const float pr = Exp2Diff(x, m[r]);
      l[r] += pr;
      const float pv = pr * vscale;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] = fmaf(pv, vf[e], acc[r][e]);
    }
    cur = next;
  }

  // Merge the lane groups of the warp (lanes with the same `sub`).
#pragma unroll
  for (int off = kLanes; off < 32; off *= 2) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float mo = __shfl_xor_sync(0xFFFFFFFFu, m[r], off);
      const float lo = __shfl_xor_sync(0xFFFFFFFFu, l[r], off);
      const float mx = fmaxf(m[r], mo);
      const float a = Exp2Diff(m[r], mx), b = Exp2Diff(mo, mx);
      l[r] = l[r] * a + lo * b;
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const float ao = __shfl_xor_sync(0xFFFFFFFFu, acc[r][e], off);
        acc[r][e] = acc[r][e] * a + ao * b;
      }
      m[r] = mx;
    }
  }
  if (kgroup == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int e = 0; e < kElems; ++e)
        s_acc[warp][r][sub * kElems + e] = acc[r][e];
      if (sub == 0) {
        s_m[warp][r] = m[r];
        s_l[warp][r] = l[r];
      }
    }
  }
  __syncthreads();

  // Merge the warps and write: one thread per (row, 8 elements).
  constexpr int kChunks = kHeadDim / 8;
  for (int item = threadIdx.x; item < kRows * kChunks; item += kAttnThreads) {
    const int r = item / kChunks;
    const int d0 = (item % kChunks) * 8;
    const int32_t row = first_row + r;
    if (row >= rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mx = fmaxf(mx, s_m[w][r]);
    float sum = 0.0f, o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float a = Exp2Diff(s_m[w][r], mx);
      sum += s_l[w][r] * a;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += s_acc[w][r][d0 + e] * a;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    const int32_t j = row / grid.group;
    const int32_t h = kv_head * grid.group + row % grid.group;
    const int64_t qrow = static_cast<int64_t>(s.q_begin) + j;
    if (grid.splits == 1) {
      StoreHalf8(p.o, qrow * p.o_token_stride + h * p.o_head_stride + d0, o,
                 bf16, grid.vector_out);
    } else {
      const int64_t idx = (qrow * p.num_q_heads + h) * grid.splits + split;
      float4* dst = reinterpret_cast<float4*>(p.workspace.partial_o +
                                              idx * kHeadDim + d0);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (d0 == 0) {
        p.workspace.partial_lse[idx] = sum > 0.0f ? mx + log2f(sum) : -INFINITY;
      }
    }
  }
}

// Merges the splits of one output row per warp: o = sum_s 2^(lse_s - M) o_s /
// sum_s 2^(lse_s - M) over the splits that hold keys of the row's sequence.
template <int kHeadDim>
__global__ void __launch_bounds__(kAttnThreads)
    AttentionReduceKernel(const AttentionParams p, const AttentionGrid grid) {
  __shared__ float s_w[kAttnWarps][kMaxAttentionSplits];
  WaitForPriorGrids();
  AllowDependentGrids();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kAttnWarps + warp;
  const int64_t per_seq =
      static_cast<int64_t>(p.max_query_tokens) * p.num_q_heads;
  if (item >= per_seq * p.num_seqs) return;
  const int32_t seq = static_cast<int32_t>(item / per_seq);
  const int32_t j = static_cast<int32_t>(item % per_seq / p.num_q_heads);
  const int32_t h = static_cast<int32_t>(item % p.num_q_heads);
  const AttentionSeq s = LoadAttentionSeq(p, seq, p.seq_lens[seq],
                                          p.q_start[seq], p.q_start[seq + 1]);
  if (j >= s.num_q) return;
  const int32_t keys = s.len - s.key_begin;
  int32_t used = keys > 0 ? (keys + grid.chunk - 1) / grid.chunk : 1;
  used = used < grid.splits ? used : grid.splits;
  const int64_t qrow = static_cast<int64_t>(s.q_begin) + j;
  const int64_t idx0 = (qrow * p.num_q_heads + h) * grid.splits;
  float lse[2], mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int sp = lane + 32 * i;
    lse[i] = sp < used ? p.workspace.partial_lse[idx0 + sp] : -INFINITY;
    mx = fmaxf(mx, lse[i]);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, off));
  }
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float w = Exp2Diff(lse[i], mx);
    s_w[warp][lane + 32 * i] = w;
    total += w;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    total += __shfl_xor_sync(0xFFFFFFFFu, total, off);
  }
  __syncwarp();
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const bool bf16 = p.q_dtype == DType::kBFloat16;
  for (int d0 = lane * 8; d0 < kHeadDim; d0 += 256) {
    float o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int sp = 0; sp < used; ++sp) {
      const float w = s_w[warp][sp];
      if (w == 0.0f) continue;
      const float4* src = reinterpret_cast<const float4*>(
          p.workspace.partial_o + (idx0 + sp) * kHeadDim + d0);
      const float4 a = src[0], b = src[1];
      o[0] += w * a.x;
      o[1] += w * a.y;
      o[2] += w * a.z;
      o[3] += w * a.w;
      o[4] += w * b.x;
      o[5] += w * b.y;
      o[6] += w * b.z;
      o[7] += w * b.w;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    StoreHalf8(p.o, qrow * p.o_token_stride + h * p.o_head_stride + d0, o, bf16,
               grid.vector_out);
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_ATTENTION_CUH_
