// Device kernels of paged decode attention (semantics: attention_params.h).
//
// Algorithm (split-KV flash decoding on the tensor cores):
//   grid  x = group of KV heads x row tile, y = sequence, z = split.
//   A thread block (4 warps) owns `heads` neighbouring KV heads (4, 2 or 1,
//   whichever divides the KV heads) of one sequence, a tile of 16 query rows
//   per head (row = query token j x GQA head g, j-major; padded rows are zero)
//   and one split: a contiguous range of `chunk` keys starting at the first
//   key the sequence's rows attend (key_begin: 0, or the window's start). So
//   each K/V byte of the split is read once for all the rows, and the warps
//   read neighbouring heads' rows of the same tokens side by side.
//   The split is cut into tiles of 16 keys; the 4 / heads warps of a head
//   take its tiles in turn and stream them through their own rings of
//   kStages shared-memory stages with cp.async (16-byte copies of codes,
//   4-byte copies of scales), the block table read one tile ahead of the
//   copies and the first copies issued before q is set up.
//   The operands lane (g = lane / 4, c = lane % 4) reads from a stage (the
//   scales and the validity mask are shared across the warp; K rows are
//   copied in row order by neighbouring lanes, AttnConfig::kRowCopy), so a
//   stage needs no barrier but the warp's own:
//     K: of keys g and 8 + g, the 16-byte chunks c, c + 4, ... of the row;
//        the head dimension is permuted consistently in q and K, so these are
//        the B fragments of mma.m16n8k16 (S = q K^T, fp32 accumulation).
//     V: of keys 2c, 2c + 1, 8 + 2c, 9 + 2c (the keys of the lane's S
//        columns), the units g, g + 8, ... of the row: B fragments of
//        O += P V with the output dimension permuted the same way.
//   Codes become mma operands exactly: int8 and fp8-e4m3 codes are exact in
//   fp16 (int8 by the 1024 + u magic number, fp8 by the paired hardware
//   conversion); q is scaled per row by a power of two into fp16's range
//   (exact for bf16 and fp16 inputs) and the factor undone on S in fp32.
//   S is scaled by each key's K scale in fp32; soft-cap, causal and window
//   masks; online softmax in base 2 per row. The V scale folds into the
//   weight in the exponent: P' = 2^(x + log2 |v_scale| - m') with its own
//   running max m', so P' stays in [0, 1] as an fp16 operand, while the
//   denominator sums 2^(x - m) in fp32. A bf16 cache runs the bf16 mma with
//   q and P split into a bf16 high and low part (two mmas), so neither loses
//   bits to bf16 (the low part of a bf16 q is zero and skipped).
//   A narrow tile (at most 8 rows: rows 8..15 padding) skips the second
//   row's softmax; the accumulators are rescaled only when a row's max moved.
//   For 8-bit caches a narrow tile swaps the operands (AttnConfig::kSwap):
//   S^T = K q^T and O^T = V^T P^T, the keys and head dimensions as the mma's
//   M and the 8 rows as its N; lane (g, c) then holds keys g, g + 8 of rows
//   2c, 2c + 1, a row's softmax reduces over the 8 lanes of its c, and P^T's
//   B fragments come from S^T by movmatrix.trans. An int8 cache's swapped
//   tiles (AttnConfig::kInt8Mma, the launcher's choice) compute S^T on the
//   integer tensor cores instead: the K words as copied are the A operand of
//   mma.m16n8k32.s8 and q enters as two int8 parts per row (hi + lo / 256
//   in units of max |q| / 127), so K needs no conversion at all.
//   End of the split: the warps of a head merge their states through shared
//   memory; with one split the block writes o = acc / sum, otherwise
//   (acc / sum, max + log2 sum) to the workspace, and AttentionReduceKernel
//   merges a row's splits (one warp per row). Splits past a sequence's last
//   key exit at once and the reduction ignores them, so short sequences in a
//   long batch cost nothing.

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
inline constexpr int kAttnRows = 16;  // Query rows per block (the mma's M).
inline constexpr int kAttnKeys = 16;  // Keys per warp tile.
inline constexpr float kLog2e = 1.4426950408889634f;

// Compile-time knob of a kernel instantiation (the launcher picks it per
// launch: kernels/attention_policy.h):
//   kBlocksPerSm blocks per multiprocessor the registers (launch bounds, for
//                head sizes up to 128) and the ring's shared memory are sized
//                for: 3 (the base kernel) or 4 (fewer stages, at most 128
//                registers; compiled for 8-bit caches with head sizes up to
//                128 only).
//   kRowCopy     how a tile's K rows are copied: true (the launcher's
//                default) in row order, so that the lanes of one copy
//                instruction cover whole rows (one L2 request per 128-byte
//                line: 16 per int8 tile of head size 128); false as the
//                operands are read (lane (g, c) copies the chunks c, c + 4,
//                ... of key g: 64-byte pieces of 8 rows per instruction, two
//                L2 requests per line: 32). With row copies the V rows are
//                also copied in row order, into slots arranged so that each
//                32-byte sector lands in one piece (AttnShape::VSlot): the
//                operand-order V copies fetch every sector twice
//                (benchmarks/results/NOTES.md "v6"). Same bytes, same result.
//   kSwap        narrow tiles with the mma's operands swapped (8-bit caches,
//                at most 8 query rows per KV head: the launcher's default
//                there): S^T = K q^T and O^T = V^T P^T, keys and head
//                dimensions as the mma's M, the 8 rows as its N, so no mma
//                works on the 8 padding rows of a 16-row tile (half the mmas,
//                half the accumulators, no zero operands to rebuild). K and V
//                fragments are the same registers as unswapped, regrouped;
//                P^T is the S^T tile transposed in registers (movmatrix).
//   kChains      swapped tiles: independent accumulator chains of S^T's k
//                steps (1: every mma adds to one accumulator, a chain of
//                head_size / 16 dependent mmas; 2: even and odd k steps in
//                two, summed at the end: half the chain's latency).
//   kL2Bytes     the L2 prefetch size the code copies ask for (0: none; 256:
//                cp.async's L2::256B hint, the neighbouring line of the
//                token's next head comes into L2 with the row).
//   kInt8Mma     swapped tiles of an int8 cache: S^T = K q^T on the integer
//                tensor cores (mma.m16n8k32.s8), the K codes as they are
//                stored (no conversion to fp16) and q as two int8 parts per
//                row, q ~ sq (hi + lo / 256) with sq = max |q| / 127 (error
//                at most sq / 512, finer than fp16's); two exact int32
//                accumulator chains, S^T = sq (hi + lo / 256) in fp32.
template <int kBlocksPerSm_, bool kRowCopy_ = true, bool kSwap_ = false,
          int kChains_ = 1, int kL2Bytes_ = 0, bool kInt8Mma_ = false>
struct AttnConfig {
  static constexpr int kBlocksPerSm = kBlocksPerSm_;
  static constexpr bool kRowCopy = kRowCopy_;
  static constexpr bool kSwap = kSwap_;
  static constexpr int kChains = kChains_;
  static constexpr int kL2Bytes = kL2Bytes_;
  static constexpr bool kInt8Mma = kInt8Mma_;
  static_assert(kChains == 1 || kChains == 2);
  static_assert(kL2Bytes == 0 || kL2Bytes == 256);
  static_assert(!kInt8Mma || kSwap, "int8 mma is compiled for swapped tiles");
  static_assert(!kSwap || kRowCopy, "swapped tiles read row-copied stages");
};
using AttnDefaultConfig = AttnConfig<3>;

// What the launcher decided for one launch.
struct AttentionGrid {
  int32_t splits = 1;
  int32_t chunk = 1;        // Keys per split.
  int32_t tiles = 1;        // Row tiles per (sequence, KV head).
  int32_t group = 1;        // Query heads per KV head.
  int32_t heads = 1;        // KV heads per block: 1, 2 or 4.
  bool wide = false;        // Some row tile has rows 8..15.
  bool vector_out = false;  // o rows allow 16-byte stores.
  FastDivmod block_size;
};

// Compile-time shape of one kernel instantiation: per-lane byte counts, the
// shared-memory layout and the pipeline depth.
template <class Cache, int kHeadDim, class Cfg = AttnDefaultConfig>
struct AttnShape {
  using T = typename Cache::T;
  static constexpr int kESize = sizeof(T);
  static constexpr bool kQuant = Cache::kQuantized;
  static constexpr bool kBf16 = std::is_same_v<Cache, BFloat16Type>;
  // K: a lane reads a quarter of a row as 16-byte chunks c, c + 4, ...
  static constexpr int kKChunks = kHeadDim * kESize / 4 / 16;
  static constexpr int kKChunkElems = 16 / kESize;
  // V: a lane reads an eighth of a row as units g, g + 8, ...
  static constexpr int kVBytes = kHeadDim * kESize / 8;
  static constexpr int kVUnit = kVBytes < 16 ? kVBytes : 16;
  static constexpr int kVUnits = kVBytes / kVUnit;
  static constexpr int kVUnitElems = kVUnit / kESize;
  static constexpr int kKSteps = kHeadDim / 16;
  static constexpr int kNBlocks = kHeadDim / 8;
  // One warp's stage: K [2 keys][chunk][lane], V [4 keys][unit][lane],
  // scales [K 16 | V 16].
  static constexpr int kKStage = 2 * kKChunks * 32 * 16;
  static constexpr int kVStage = 4 * kVUnits * 32 * kVUnit;
  static constexpr int kStageBytes = kKStage + kVStage + (kQuant ? 128 : 0);
  // q fragments: per KV head of the block, k step and lane, 8 bytes for
  // rows 0..7, 8 more for rows 8..15 when the tile is wide, the whole again
  // for the low bf16 part when q is split.
  static constexpr int kQFragHeadBytes = kKSteps * 32 * 8;
  // Stages: a block of 4 narrow heads' q fragments and the ring fit 216 KB /
  // kBlocksPerSm (72 KB: three blocks per multiprocessor).
  static constexpr int kStagesFit =
      (221184 / Cfg::kBlocksPerSm - kAttnWarps * kQFragHeadBytes) /
      (kAttnWarps * kStageBytes);
  static constexpr int kStages =
      kStagesFit < 2 ? 2 : (kStagesFit > 4 ? 4 : kStagesFit);
  static constexpr int kPipeBytes = kAttnWarps * kStages * kStageBytes;
  static constexpr int kMergeBytes = kAttnWarps * kAttnRows * kHeadDim * 4;
  static constexpr int kRingBytes =
      kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  // The layout after the ring: q fragments (q_parts x heads x
  // kQFragHeadBytes), validity masks [warp][stage], row multipliers
  // [head][row], then per warp and row: m, m', l.
  struct Layout {
    int q_parts, valid, rowmult, state, total;
  };
  __host__ __device__ static Layout MakeLayout(bool wide, bool q_split,
                                               int heads) {
    Layout l;
    l.q_parts = (wide ? 2 : 1) * (q_split ? 2 : 1);
    l.valid = kRingBytes + l.q_parts * heads * kQFragHeadBytes;
    l.rowmult = l.valid + kAttnWarps * kStages * 4;
    l.state = l.rowmult + kAttnWarps * kAttnRows * 4;
    l.total = l.state + 3 * kAttnWarps * kAttnRows * 4;
    return l;
  }
  static_assert(kKChunks >= 1 && kVUnits >= 1 && kVUnit >= 8);

  // Head dimension of a lane's local K element l (lane c = lane % 4).
  __device__ static int KDim(int l, int c) {
    return ((l / kKChunkElems) * 4 + c) * kKChunkElems + l % kKChunkElems;
  }
  // Head dimension of a lane's local V element l (lane g = lane / 4).
  __device__ static int VDim(int l, int g) {
    return ((l / kVUnitElems) * 8 + g) * kVUnitElems + l % kVUnitElems;
  }
  // The slot of a stage's V unit slab [32 slots] that reader lane `lane`
  // (g, c) takes its unit from, and where the copy puts that unit. The copy
  // unit fetches a 32-byte sector once only when the sector's bytes land
  // side by side in shared memory (ncu: otherwise every 16-byte piece
  // fetches its sector again, 32 L2 sectors per copy of 16). So the units
  // of one sector (neighbouring g, same c) take neighbouring slots, and the
  // rest is arranged so that neither the 8 (16) lanes of a shared-memory
  // read phase nor the lanes that copy one row share a bank group:
  //   16-byte units (m = g / 2):  slot = 8 m + 2 (c ^ m) + g % 2
  //    8-byte units (m = g / 4):  slot = 16 m + 4 (c ^ m) + g % 4
  // kSwizzle false: slot = lane (the operand-order copies, kRowCopy false).
  template <bool kSwizzle>
  __device__ static int VSlot(int lane) {
    const int g = lane / 4, c = lane % 4;
    if constexpr (!kSwizzle) {
      return lane;
    } else if constexpr (kVUnit == 16) {
      const int m = g / 2;
      return 8 * m + 2 * (c ^ m) + g % 2;
    } else {
      const int m = g / 4;
      return 16 * m + 4 * (c ^ m) + g % 4;
    }
  }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 (8, 4) bytes global -> shared; zero-fills when !pred. kL2Bytes
// 256: 16-byte copies ask the L2 to fetch 256 bytes around them.
template <int kBytes, int kL2Bytes = 0>
__device__ __forceinline__ void CpAsync(uint32_t dst, const void* src,
                                        bool pred) {
  const int n = pred ? kBytes : 0;
  if constexpr (kBytes == 16 && kL2Bytes == 256) {
    asm volatile(
        "cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst),
        "l"(src), "r"(n));
  } else if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(src), "r"(n));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst),
                 "l"(src), "n"(kBytes), "r"(n));
  }
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// d += a b (m16n8k16, fp32 accumulators).
template <bool kBf16>
__device__ __forceinline__ void Mma(float (&d)[4], const uint4& a, uint32_t b0,
                                    uint32_t b1) {
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
}

// d += a b (m16n8k32, int8 operands, exact int32 accumulators). Lane
// (g, c): a = rows g, g + 8 x k 4c..4c+3, then the same rows x k 16+4c..;
// b = k 4c..4c+3 and 16+4c.. of column g; d as Mma's.
__device__ __forceinline__ void MmaS8(int32_t (&d)[4], const uint4& a,
                                      uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// Four int8 values (rounded and clamped to [-127, 127]) in one word, the
// first in the lowest byte.
__device__ __forceinline__ uint32_t PackInt8x4(const float (&v)[4]) {
  uint32_t w = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int q = __float2int_rn(fminf(fmaxf(v[e], -127.0f), 127.0f));
    w |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * e);
  }
  return w;
}

// The 8x8 16-bit matrix whose lane t holds row t / 4, columns 2 (t % 4) and
// 2 (t % 4) + 1, transposed (lane t gets the same places of the transpose).
__device__ __forceinline__ uint32_t Transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n"
               : "=r"(y)
               : "r"(x));
  return y;
}

// log2 |x| (-inf for 0 and for subnormal x, whose weight is then 0).
__device__ __forceinline__ float Log2AbsFtz(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(fabsf(x)));
  return y;
}

// Two biased int8 codes (bytes 0 and 1 of w after `sel`) -> fp16x2, exactly:
// fp16 bits 0x64uu = 1024 + u, minus 1152 = code.
__device__ __forceinline__ uint32_t BiasedBytesToHalf2(uint32_t w,
                                                       uint32_t sel) {
  const uint32_t h = __byte_perm(w, 0x64646464u, sel);
  uint32_t d;
  asm("sub.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(h), "r"(0x64806480u));
  return d;
}
// Two fp8-e4m3 codes (the low 16 bits of w) -> fp16x2, exactly.
__device__ __forceinline__ uint32_t Fp8x2ToHalf2(uint32_t w) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
      static_cast<__nv_fp8x2_storage_t>(w & 0xFFFFu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// The 4 fp16 pairs (key a, key b) of elements 0..3 of two keys' words of
// 8-bit V codes (w0 of key a, w1 of key b).
template <class Cache>
__device__ __forceinline__ void VPairs(uint32_t w0, uint32_t w1,
                                       uint32_t (&b)[4]) {
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    const uint32_t x0 = w0 ^ 0x80808080u, x1 = w1 ^ 0x80808080u;
    const uint32_t t01 = __byte_perm(x0, x1, 0x5140u);
    const uint32_t t23 = __byte_perm(x0, x1, 0x7362u);
    b[0] = BiasedBytesToHalf2(t01, 0x4140u);
    b[1] = BiasedBytesToHalf2(t01, 0x4342u);
    b[2] = BiasedBytesToHalf2(t23, 0x4140u);
    b[3] = BiasedBytesToHalf2(t23, 0x4342u);
  } else {
    const uint32_t t01 = __byte_perm(w0, w1, 0x5140u);
    const uint32_t t23 = __byte_perm(w0, w1, 0x7362u);
    b[0] = Fp8x2ToHalf2(t01);
    b[1] = Fp8x2ToHalf2(t01 >> 16);
    b[2] = Fp8x2ToHalf2(t23);
    b[3] = Fp8x2ToHalf2(t23 >> 16);
  }
}

// The K B fragment of k step `s` within one 16-byte chunk of codes.
template <class Cache>
__device__ __forceinline__ void KFragment(const uint4& raw, int s, uint32_t* b0,
                                          uint32_t* b1) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (std::is_same_v<Cache, Int8Type>) {
    const uint32_t x = w[s] ^ 0x80808080u;
    *b0 = BiasedBytesToHalf2(x, 0x4140u);
    *b1 = BiasedBytesToHalf2(x, 0x4342u);
  } else if constexpr (std::is_same_v<Cache, Fp8E4M3Type>) {
    *b0 = Fp8x2ToHalf2(w[s]);
    *b1 = Fp8x2ToHalf2(w[s] >> 16);
  } else {
    *b0 = w[2 * s];
    *b1 = w[2 * s + 1];
  }
}

// Packs two floats (lo, hi) as the mma's 16-bit pair.
template <bool kBf16>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, 4);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, 4);
  }
  return r;
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

// A running max as the exponent's reference: 0 while it is -inf.
__device__ __forceinline__ float SafeMax(float m) {
  return m == -INFINITY ? 0.0f : m;
}

template <class Cache, int kHeadDim, class Cfg = AttnDefaultConfig>
__global__ void __launch_bounds__(kAttnThreads,
                                  kHeadDim <= 128 ? Cfg::kBlocksPerSm : 1)
    AttentionKernel(const AttentionParams p, const AttentionGrid grid) {
  using Shape = AttnShape<Cache, kHeadDim, Cfg>;
  using CacheT = typename Cache::T;
  constexpr bool kQuant = Shape::kQuant;
  constexpr bool kBf16 = Shape::kBf16;
  constexpr int kStages = Shape::kStages;
  constexpr int kKSteps = Shape::kKSteps;
  extern __shared__ __align__(16) unsigned char smem[];

  WaitForPriorGrids();
  AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;
  const int c = lane % 4;
  // Warp -> (KV head of the block, its share of the head's tiles).
  const int heads = grid.heads;
  const int wph = kAttnWarps / heads;  // Warps per head.
  const int hb = warp / wph;
  const int kw = warp % wph;
  const int32_t head0 = (blockIdx.x / grid.tiles) * heads;
  const int32_t kv_head = head0 + hb;
  const int32_t tile = blockIdx.x % grid.tiles;
  const int32_t seq = blockIdx.y;
  const int32_t split = blockIdx.z;
  const AttentionSeq s = LoadAttentionSeq(p, seq, p.seq_lens[seq],
                                          p.q_start[seq], p.q_start[seq + 1]);
  const int32_t rows = s.num_q * grid.group;
  const int32_t first_row = tile * kAttnRows;
  const int64_t kb64 = static_cast<int64_t>(s.key_begin) +
                       static_cast<int64_t>(split) * grid.chunk;
  if (first_row >= rows || (split > 0 && kb64 >= s.len)) return;
  const int32_t kb = static_cast<int32_t>(kb64);
  const int32_t ke = static_cast<int32_t>(
      kb64 + grid.chunk < s.len ? kb64 + grid.chunk : s.len);

  const bool bf16_q = p.q_dtype == DType::kBFloat16;
  const bool q_split = kBf16 && !bf16_q;  // The low bf16 part is nonzero.
  const bool wide = grid.wide;
  const typename Shape::Layout lay = Shape::MakeLayout(wide, q_split, heads);
  uint2* s_q = reinterpret_cast<uint2*>(smem + Shape::kRingBytes);
  uint32_t* s_valid = reinterpret_cast<uint32_t*>(smem + lay.valid);
  float* s_rowmult = reinterpret_cast<float*>(smem + lay.rowmult);
  float* s_m = reinterpret_cast<float*>(smem + lay.state);  // [warp][row]
  float* s_m2 = s_m + kAttnWarps * kAttnRows;               // [warp][row]
  float* s_l = s_m2 + kAttnWarps * kAttnRows;               // [warp][row]
  // q fragment part (row half, low part) of head hb2, k step kk.
  auto q_frag = [&](int part, int hb2, int kk) -> uint2* {
    return s_q + ((part * heads + hb2) * kKSteps + kk) * 32;
  };

  // ---- The warp's tiles: block-table look-ups and the cp.async ring. ----
  const int32_t* table = p.block_table + seq * p.block_table_stride;
  const CacheT* kc = static_cast<const CacheT*>(p.cache.key_cache);
  const CacheT* vc = static_cast<const CacheT*>(p.cache.value_cache);
  const int32_t ntiles = (ke - kb + kAttnKeys - 1) / kAttnKeys;
  const int32_t my_tiles = ntiles > kw ? (ntiles - kw + wph - 1) / wph : 0;
  unsigned char* ring = smem + warp * kStages * Shape::kStageBytes;

  // Offsets of this lane's key (lane % 16) of the warp's i-th tile; key = -1
  // (row = kNoRow) when the key is past the split or its block-table entry is
  // out of range. With row copies (kRowCopy) the K rows are addressed by
  // row = slot x num_heads + kv_head, shuffled as 32 bits (rows of at least
  // 64 bytes: 2^32 of them would be a 256 GiB cache) and `key` is unused.
  constexpr bool kRowCopy = Cfg::kRowCopy;
  constexpr uint32_t kNoRow = 0xFFFFFFFFu;
  // This lane's V slot in a stage (swizzled with row copies: Shape::VSlot).
  const int v_slot = Shape::template VSlot<kRowCopy>(lane);
  const uint32_t k_pitch = static_cast<uint32_t>(layout.key_row_pitch());
  const uint32_t v_pitch = static_cast<uint32_t>(layout.value_row_pitch());
  struct KeyOffsets {
    int64_t key, value, scale;
    uint32_t row;
  };
  auto key_ok = [&](const KeyOffsets& o) {
    if constexpr (kRowCopy) {
      return o.row != kNoRow;
    } else {
      return o.key >= 0;
    }
  };
  // Whether key `src_lane` of the tile is valid, and (row copies) its row.
  auto shfl_ok = [&](const KeyOffsets& o, int src_lane, uint32_t* row) {
    if constexpr (kRowCopy) {
      *row = __shfl_sync(0xFFFFFFFFu, o.row, src_lane);
      return *row != kNoRow;
    } else {
      *row = 0;
      return __shfl_sync(0xFFFFFFFFu, o.key, src_lane) >= 0;
    }
  };
  auto offsets_of = [&](int32_t i) -> KeyOffsets {
    KeyOffsets o{-1, 0, 0, kNoRow};
    const int32_t key = kb + (kw + wph * i) * kAttnKeys + (lane & 15);
    if (i >= my_tiles || key >= ke) return o;
    uint32_t block_index, offset;
    grid.block_size.Divmod(static_cast<uint32_t>(key), &block_index, &offset);
    const int32_t block = __ldg(table + block_index);
    if (block < 0 || block >= layout.num_blocks) return o;
    const int64_t slot =
        static_cast<int64_t>(block) * layout.block_size + offset;
    // Dense caches only (ValidateAttention refuses records).
    o.key = layout.key_offset_in<false>(slot, kv_head);
    o.row = static_cast<uint32_t>(slot * layout.num_heads + kv_head);
    o.value = layout.value_offset_in<false>(slot, kv_head);
    o.scale = layout.scale_offset_in<false>(slot, kv_head);
    return o;
  };
  auto issue = [&](int stage, const KeyOffsets& ko) {
    unsigned char* st = ring + stage * Shape::kStageBytes;
    if constexpr (Cfg::kRowCopy) {
      // The tile's 16 K rows of kRowChunks 16-byte chunks, in row order:
      // each copy instruction reads 4 whole 128-byte lines (8 lanes each),
      // or 8 whole 64-byte rows. Each chunk lands where the lane that reads
      // it as an operand finds it (the slot of key 8 nb + g, chunk 4 i + c
      // below), so the stage's layout is the same.
      constexpr int kRowChunks = 4 * Shape::kKChunks;
      if constexpr (kRowChunks < 8) {
        // 64-byte rows: copy t of lane L is chunk L % 4 of key 8 t + L / 4,
        // which is where that lane reads it.
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
          uint32_t row;
          const bool ok = shfl_ok(ko, 8 * nb + g, &row);
          const CacheT* src = kc + (ok ? uint64_t{row} * k_pitch : 0);
          CpAsync<16, Cfg::kL2Bytes>(SmemAddr(st + (nb * 32 + lane) * 16),
                                     src + c * Shape::kKChunkElems, ok);
        }
      } else {
        // Lanes 8 j .. 8 j + 7 read line `line` of key 4 kk + j: chunk
        // 8 line + lane % 8 of the row; one shuffled offset per key.
        constexpr int kLines = kRowChunks / 8;
        const int j = lane / 8;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const int key = 4 * kk + j;
          uint32_t row;
          const bool ok = shfl_ok(ko, key, &row);
          const CacheT* src = kc + (ok ? uint64_t{row} * k_pitch : 0);
#pragma unroll
          for (int line = 0; line < kLines; ++line) {
            const int chunk = 8 * line + lane % 8;
            const int dst = ((key / 8) * Shape::kKChunks + chunk / 4) * 32 +
                            (key % 8) * 4 + chunk % 4;
            CpAsync<16, Cfg::kL2Bytes>(SmemAddr(st + dst * 16),
                                       src + chunk * Shape::kKChunkElems, ok);
          }
        }
      }
    } else {
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const int64_t ok = __shfl_sync(0xFFFFFFFFu, ko.key, 8 * nb + g);
        const CacheT* src = kc + (ok < 0 ? 0 : ok);
#pragma unroll
        for (int i = 0; i < Shape::kKChunks; ++i) {
          CpAsync<16>(
              SmemAddr(st + ((nb * Shape::kKChunks + i) * 32 + lane) * 16),
              src + (i * 4 + c) * Shape::kKChunkElems, ok >= 0);
        }
      }
    }
    if constexpr (Cfg::kRowCopy) {
      // V rows in row order too: lanes 8 j .. 8 j + 7 copy line u (units
      // 8 u .. 8 u + 7) of key 4 t + j. Unit 8 u + g of key k lands where
      // its reader finds it: slab vk = 2 (k / 8) + k % 2, the slot of lane
      // (g, c = (k % 8) / 2) (AttnShape::VSlot: a sector's units side by
      // side, so each sector is fetched once).
      const int j = lane / 8;
      const int gu = lane % 8;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int key = 4 * t + j;
        const int vk = 2 * (key / 8) + (key & 1);
        const int slot = Shape::template VSlot<true>(4 * gu + (key % 8) / 2);
        uint32_t row;
        const bool ok = shfl_ok(ko, key, &row);
        const CacheT* src = vc + (ok ? uint64_t{row} * v_pitch : 0);
#pragma unroll
        for (int u = 0; u < Shape::kVUnits; ++u) {
          CpAsync<Shape::kVUnit, Cfg::kL2Bytes>(
              SmemAddr(st + Shape::kKStage +
                       ((vk * Shape::kVUnits + u) * 32 + slot) * Shape::kVUnit),
              src + (u * 8 + gu) * Shape::kVUnitElems, ok);
        }
      }
    } else {
#pragma unroll
      for (int vk = 0; vk < 4; ++vk) {
        const int key = 8 * (vk >> 1) + 2 * c + (vk & 1);
        const int64_t ov = __shfl_sync(0xFFFFFFFFu, ko.value, key);
        const CacheT* src = vc + (ov < 0 ? 0 : ov);
        const bool ok = __shfl_sync(0xFFFFFFFFu, ko.key, key) >= 0;
#pragma unroll
        for (int u = 0; u < Shape::kVUnits; ++u) {
          CpAsync<Shape::kVUnit>(
              SmemAddr(st + Shape::kKStage +
                       ((vk * Shape::kVUnits + u) * 32 + lane) * Shape::kVUnit),
              src + (u * 8 + g) * Shape::kVUnitElems, ok);
        }
      }
    }
    if constexpr (kQuant) {
      const float* src = (lane < 16 ? p.cache.key_scale : p.cache.value_scale) +
                         (key_ok(ko) ? ko.scale : 0);
      CpAsync<4>(SmemAddr(st + Shape::kKStage + Shape::kVStage + lane * 4), src,
                 key_ok(ko));
    }
    const uint32_t valid = __ballot_sync(0xFFFFFFFFu, key_ok(ko)) & 0xFFFFu;
    if (lane == 0) s_valid[warp * kStages + stage] = valid;
  };

  // The first stages' copies go out before q is set up.
  KeyOffsets next = offsets_of(0);
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < my_tiles) issue(i, next);
    CpAsyncCommit();
    next = offsets_of(i + 1);
  }

  const bool capped = p.soft_cap > 0.0f;
  const float inv_cap = capped ? 1.0f / p.soft_cap : 0.0f;
  const float base_mult = capped ? p.softmax_scale : p.softmax_scale * kLog2e;
  // ---- q: per-row scale, then the A fragments in shared memory. ----
  for (int r = warp; r < heads * kAttnRows; r += kAttnWarps) {
    const int32_t row = first_row + r % kAttnRows;
    const int32_t j = row / grid.group;
    const int32_t h = (head0 + r / kAttnRows) * grid.group + row % grid.group;
    const int64_t base =
        (static_cast<int64_t>(s.q_begin) + j) * p.q_token_stride +
        static_cast<int64_t>(h) * p.q_head_stride;
    float mx = 0.0f;
    if (row < rows) {
      for (int d = lane; d < kHeadDim; d += 32) {
        mx = fmaxf(mx, fabsf(HalfToFloat(p.q, base + d, bf16_q)));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, off));
    }
    if (lane == 0) {
      if constexpr (Cfg::kInt8Mma) {
        // int8 parts in units of sq = max |q| / 127 (0 for a zero row; a
        // non-finite max makes the row's scores non-finite, as fp16 would).
        s_rowmult[r] = isfinite(mx) ? base_mult * (mx / 127.0f) : mx;
      } else {
        // fp16 operands: q * 2^(8 - E) with max |q| < 2^E, so |q'| < 256.
        int e = 0;
        if (!kBf16 && mx > 0.0f && isfinite(mx)) frexpf(mx, &e);
        s_rowmult[r] = ldexpf(base_mult, e - 8 * !kBf16);
      }
    }
  }
  __syncthreads();
  if constexpr (Cfg::kInt8Mma) {
    // B fragments of k32 step st2 = 2 i2 + h of lane (fg, fc): the 8 q values
    // of head dimensions 16 (4 i2 + fc) + 8 h + 0..7 (the dimensions of the
    // K words 2h, 2h + 1 of the lane's chunk 4 i2 + fc: load_k), as the hi
    // part (q_frag k step 2 st2) and the lo part (2 st2 + 1). Narrow tiles
    // only (swapped): row fg.
    for (int idx = threadIdx.x; idx < heads * (kKSteps / 2) * 32;
         idx += kAttnThreads) {
      const int hb2 = idx / (kKSteps / 2 * 32);
      const int st2 = idx / 32 % (kKSteps / 2), ln = idx % 32;
      const int fg = ln / 4, fc = ln % 4;
      const int32_t row = first_row + fg;
      const int32_t j = row / grid.group;
      const int32_t h = (head0 + hb2) * grid.group + row % grid.group;
      const int64_t base =
          (static_cast<int64_t>(s.q_begin) + j) * p.q_token_stride +
          static_cast<int64_t>(h) * p.q_head_stride;
      const float rm = s_rowmult[hb2 * kAttnRows + fg];
      const float f = rm > 0.0f && isfinite(rm) ? base_mult / rm : 0.0f;
      const int d0 = 16 * (4 * (st2 / 2) + fc) + 8 * (st2 % 2);
      float hi[2][4], lo[2][4];
#pragma unroll
      for (int w = 0; w < 2; ++w) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v =
              row < rows ? HalfToFloat(p.q, base + d0 + 4 * w + e, bf16_q) * f
                         : 0.0f;
          hi[w][e] = rintf(v);
          lo[w][e] = (v - hi[w][e]) * 256.0f;
        }
      }
      q_frag(0, hb2, 2 * st2)[ln] =
          make_uint2(PackInt8x4(hi[0]), PackInt8x4(hi[1]));
      q_frag(0, hb2, 2 * st2 + 1)[ln] =
          make_uint2(PackInt8x4(lo[0]), PackInt8x4(lo[1]));
    }
  }
  for (int idx = threadIdx.x; idx < (Cfg::kInt8Mma ? 0 : heads * kKSteps * 32);
       idx += kAttnThreads) {
    const int hb2 = idx / (kKSteps * 32);
    const int kk = idx / 32 % kKSteps, ln = idx % 32;
    const int fg = ln / 4, fc = ln % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // Rows fg, fg + 8.
      if (half == 1 && !wide) break;
      const int r = fg + 8 * half;
      const int32_t row = first_row + r;
      const int32_t j = row / grid.group;
      const int32_t h = (head0 + hb2) * grid.group + row % grid.group;
      const int64_t base =
          (static_cast<int64_t>(s.q_begin) + j) * p.q_token_stride +
          static_cast<int64_t>(h) * p.q_head_stride;
      uint32_t hi[2], lo[2];
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        const int l = 4 * kk + 2 * pair;
        float v[2] = {0.0f, 0.0f};
        if (row < rows) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            v[e] = HalfToFloat(p.q, base + Shape::KDim(l + e, fc), bf16_q);
          }
        }
        if constexpr (kBf16) {
          const __nv_bfloat162 h2 = __floats2bfloat162_rn(v[0], v[1]);
          const float2 back = __bfloat1622float2(h2);
          memcpy(&hi[pair], &h2, 4);
          lo[pair] = PackPair<true>(v[0] - back.x, v[1] - back.y);
        } else {
          // Undo the row multiplier's power of two: q' = q * 2^(8 - E).
          const float f = base_mult / s_rowmult[hb2 * kAttnRows + r];
          hi[pair] = PackPair<false>(v[0] * f, v[1] * f);
          lo[pair] = 0;
        }
      }
      q_frag(half, hb2, kk)[ln] = make_uint2(hi[0], hi[1]);
      if (q_split) {
        q_frag(half + (wide ? 2 : 1), hb2, kk)[ln] = make_uint2(lo[0], lo[1]);
      }
    }
  }
  __syncthreads();
  // A fragment {a0, a1, a2, a3} of k step kk: rows g (x, z), g + 8 (y, w).
  auto load_q = [&](int lo_part, int kk) -> uint4 {
    const int base_part = lo_part ? (wide ? 2 : 1) : 0;
    const uint2 a = q_frag(base_part, hb, kk)[lane];
    uint2 b = make_uint2(0, 0);
    if (wide) b = q_frag(base_part + 1, hb, kk)[lane];
    return make_uint4(a.x, b.x, a.y, b.y);
  };

  // Per-lane row state: rows g and g + 8 (swapped: rows 2c and 2c + 1).
  constexpr bool kSwap = Cfg::kSwap;
  static_assert(!kSwap || kQuant,
                "swapped tiles are compiled for 8-bit caches");
  auto lane_row = [&](int r) { return kSwap ? 2 * c + r : g + 8 * r; };
  float rowmult[2];
  int32_t rb[2], re[2];
  float m[2], m2[2], l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int32_t row = first_row + lane_row(r);
    rowmult[r] = s_rowmult[hb * kAttnRows + lane_row(r)];
    if (row < rows) {
      AttentionRowKeys(s, p.window, row / grid.group, &rb[r], &re[r]);
    } else {
      rb[r] = re[r] = 0;
    }
    m[r] = m2[r] = -INFINITY;
    l[r] = 0.0f;
  }
  // Unswapped: n-block nd of o (8 dims); swapped: m-block nd of o^T (16).
  constexpr int kAccBlocks = kSwap ? Shape::kNBlocks / 2 : Shape::kNBlocks;
  float acc[kAccBlocks][4];
#pragma unroll
  for (int nd = 0; nd < kAccBlocks; ++nd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nd][e] = 0.0f;
  }

  // This lane's 16-byte K chunk i2 of keys g (kraw[0]) and 8 + g (kraw[1]).
  auto load_k = [&](const unsigned char* st, int i2, uint4(&kraw)[2]) {
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      kraw[nb] = *reinterpret_cast<const uint4*>(
          st + ((nb * Shape::kKChunks + i2) * 32 + lane) * 16);
    }
  };
  // The words of V unit slab u of a stage that this lane reads, per key
  // slot vk (keys 2c, 2c + 1, 8 + 2c, 9 + 2c): w[vk][word].
  auto load_v = [&](const unsigned char* st, int u,
                    uint32_t(&w)[4][Shape::kVUnit / 4]) {
#pragma unroll
    for (int vk = 0; vk < 4; ++vk) {
      const unsigned char* src =
          st + Shape::kKStage +
          ((vk * Shape::kVUnits + u) * 32 + v_slot) * Shape::kVUnit;
      if constexpr (Shape::kVUnit == 16) {
        const uint4 t = *reinterpret_cast<const uint4*>(src);
        w[vk][0] = t.x;
        w[vk][1] = t.y;
        w[vk][2] = t.z;
        w[vk][3] = t.w;
      } else {
        const uint2 t = *reinterpret_cast<const uint2*>(src);
        w[vk][0] = t.x;
        w[vk][1] = t.y;
      }
    }
  };

  // One tile with swapped operands (kSwap): this lane holds S^T of keys g and
  // g + 8 for rows 2c and 2c + 1, and o^T of dims (VDim(2 nd, g),
  // VDim(2 nd + 1, g)) for the same rows.
  [[maybe_unused]] auto swapped_tile = [&](const unsigned char* st,
                                           int32_t key0, uint32_t valid) {
    // S^T = K q^T: A = keys g, g + 8 (the unswapped B fragments of n-blocks
    // 0 and 1), B = q row g.
    float sk[4];
    if constexpr (Cfg::kInt8Mma) {
      // Raw codes as A: words 2h, 2h + 1 of chunk 4 i2 + c of keys g, g + 8
      // are k 4c..4c+3 and 16+4c.. of k32 step 2 i2 + h (the q setup's
      // dimensions); hi and lo parts in two exact chains.
      int32_t shi[4] = {0, 0, 0, 0}, slo[4] = {0, 0, 0, 0};
#pragma unroll
      for (int i2 = 0; i2 < Shape::kKChunks; ++i2) {
        uint4 kraw[2];
        load_k(st, i2, kraw);
        const uint32_t k0[4] = {kraw[0].x, kraw[0].y, kraw[0].z, kraw[0].w};
        const uint32_t k1[4] = {kraw[1].x, kraw[1].y, kraw[1].z, kraw[1].w};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int st2 = 2 * i2 + h;
          const uint4 a =
              make_uint4(k0[2 * h], k1[2 * h], k0[2 * h + 1], k1[2 * h + 1]);
          const uint2 qh = q_frag(0, hb, 2 * st2)[lane];
          const uint2 ql = q_frag(0, hb, 2 * st2 + 1)[lane];
          MmaS8(shi, a, qh.x, qh.y);
          MmaS8(slo, a, ql.x, ql.y);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sk[e] = fmaf(static_cast<float>(slo[e]), 1.0f / 256.0f,
                     static_cast<float>(shi[e]));
      }
    } else {
      constexpr int kChains = Cfg::kChains;
      float skc[kChains][4];
#pragma unroll
      for (int ch = 0; ch < kChains; ++ch) {
#pragma unroll
        for (int e = 0; e < 4; ++e) skc[ch][e] = 0.0f;
      }
      constexpr int kStepsPerChunk = Shape::kKSteps / Shape::kKChunks;
#pragma unroll
      for (int i2 = 0; i2 < Shape::kKChunks; ++i2) {
        uint4 kraw[2];
        load_k(st, i2, kraw);
#pragma unroll
        for (int s2 = 0; s2 < kStepsPerChunk; ++s2) {
          const uint2 qb = q_frag(0, hb, i2 * kStepsPerChunk + s2)[lane];
          uint32_t k00, k01, k10, k11;
          KFragment<Cache>(kraw[0], s2, &k00, &k01);
          KFragment<Cache>(kraw[1], s2, &k10, &k11);
          Mma<false>(skc[(i2 * kStepsPerChunk + s2) % kChains],
                     make_uint4(k00, k10, k01, k11), qb.x, qb.y);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sk[e] = skc[0][e];
        if constexpr (kChains == 2) sk[e] += skc[kChains - 1][e];
      }
    }
    // Scales, soft-cap, masks; x[kq][r] is key g + 8 kq, row 2c + r.
    const float* scales =
        reinterpret_cast<const float*>(st + Shape::kKStage + Shape::kVStage);
    float x[2][2], x2[2][2], vsign[2];
    uint32_t row_mask[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int32_t a = min(max(rb[r] - key0, 0), kAttnKeys);
      const int32_t b = min(max(re[r] - key0, 0), kAttnKeys);
      row_mask[r] = valid & ((1u << b) - 1u) & ~((1u << a) - 1u);
    }
#pragma unroll
    for (int kq = 0; kq < 2; ++kq) {
      const int key = g + 8 * kq;
      const float ks = scales[key];
      const float vs = scales[16 + key];
      const float lvs = Log2AbsFtz(vs);
      vsign[kq] = vs < 0.0f ? -1.0f : 1.0f;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float v = sk[2 * kq + r] * ks * rowmult[r];
        if (capped) v = p.soft_cap * tanhf(v * inv_cap) * kLog2e;
        v = (row_mask[r] >> key) & 1u ? v : -INFINITY;
        x[kq][r] = v;
        x2[kq][r] = v + lvs;
      }
    }
    // Online softmax per row: a row's 16 keys are on the 8 lanes of its c.
    float mu[2], mu2[2], alpha2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mt = fmaxf(x[0][r], x[1][r]);
      float mt2 = fmaxf(x2[0][r], x2[1][r]);
#pragma unroll
      for (int off = 4; off < 32; off *= 2) {
        mt = fmaxf(mt, __shfl_xor_sync(0xFFFFFFFFu, mt, off));
        mt2 = fmaxf(mt2, __shfl_xor_sync(0xFFFFFFFFu, mt2, off));
      }
      const float mn = fmaxf(m[r], mt);
      mu[r] = SafeMax(mn);
      l[r] *= mn == m[r] ? 1.0f : exp2f(m[r] - mu[r]);
      m[r] = mn;
      const float mn2 = fmaxf(m2[r], mt2);
      mu2[r] = SafeMax(mn2);
      alpha2[r] = mn2 == m2[r] ? 1.0f : exp2f(m2[r] - mu2[r]);
      m2[r] = mn2;
    }
    float pw[2][2];
#pragma unroll
    for (int kq = 0; kq < 2; ++kq) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        l[r] += exp2f(x[kq][r] - mu[r]);
        pw[kq][r] = exp2f(x2[kq][r] - mu2[r]) * vsign[kq];
      }
    }
    if (__any_sync(0xFFFFFFFFu, alpha2[0] != 1.0f || alpha2[1] != 1.0f)) {
#pragma unroll
      for (int nd = 0; nd < kAccBlocks; ++nd) {
        acc[nd][0] *= alpha2[0];
        acc[nd][1] *= alpha2[1];
        acc[nd][2] *= alpha2[0];
        acc[nd][3] *= alpha2[1];
      }
    }
    // P^T as the B operand (keys 2c, 2c + 1 | 8 + 2c, 9 + 2c of row g): the
    // lane's (key g | g + 8; rows 2c, 2c + 1) pairs, transposed.
    const uint32_t pb0 = Transpose8x8(PackPair<false>(pw[0][0], pw[0][1]));
    const uint32_t pb1 = Transpose8x8(PackPair<false>(pw[1][0], pw[1][1]));
    // O^T += V^T P^T: A = dims (VDim(2 nd, g) | VDim(2 nd + 1, g)) of keys
    // 2c, 2c + 1 | 8 + 2c, 9 + 2c: the unswapped B pairs of two elements.
#pragma unroll
    for (int u = 0; u < Shape::kVUnits; ++u) {
      uint32_t w[4][Shape::kVUnit / 4];
      load_v(st, u, w);
#pragma unroll
      for (int wi = 0; wi < Shape::kVUnit / 4; ++wi) {
        uint32_t b[2][4];  // [keys half][element 4 wi + e]
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          VPairs<Cache>(w[2 * half][wi], w[2 * half + 1][wi], b[half]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int nd = (u * Shape::kVUnitElems + 4 * wi) / 2 + j;
          Mma<false>(acc[nd],
                     make_uint4(b[0][2 * j], b[0][2 * j + 1], b[1][2 * j],
                                b[1][2 * j + 1]),
                     pb0, pb1);
        }
      }
    }
  };

  int stage = 0;
  for (int32_t i = 0; i < my_tiles; ++i) {
    {
      const int32_t ahead = i + kStages - 1;
      int ahead_stage = stage + kStages - 1;
      if (ahead_stage >= kStages) ahead_stage -= kStages;
      if (ahead < my_tiles) issue(ahead_stage, next);
      CpAsyncCommit();
      next = offsets_of(ahead + 1);
    }
    CpAsyncWait<kStages - 1>();
    __syncwarp();
    const unsigned char* st = ring + stage * Shape::kStageBytes;
    const int32_t key0 = kb + (kw + wph * i) * kAttnKeys;
    const uint32_t valid = s_valid[warp * kStages + stage];
    if constexpr (kSwap) {
      swapped_tile(st, key0, valid);
    } else {
      // S = q K^T for the tile's two blocks of 8 keys.
      float sc[2][4];
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nb][e] = 0.0f;
      }
      constexpr int kStepsPerChunk = Shape::kKSteps / Shape::kKChunks;
#pragma unroll
      for (int i2 = 0; i2 < Shape::kKChunks; ++i2) {
        uint4 kraw[2];
        load_k(st, i2, kraw);
#pragma unroll
        for (int s2 = 0; s2 < kStepsPerChunk; ++s2) {
          const int kk = i2 * kStepsPerChunk + s2;
          const uint4 qa = load_q(0, kk);
#pragma unroll
          for (int nb = 0; nb < 2; ++nb) {
            uint32_t b0, b1;
            KFragment<Cache>(kraw[nb], s2, &b0, &b1);
            Mma<kBf16>(sc[nb], qa, b0, b1);
          }
          if (q_split) {
            const uint4 ql = load_q(1, kk);
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
              uint32_t b0, b1;
              KFragment<Cache>(kraw[nb], s2, &b0, &b1);
              Mma<kBf16>(sc[nb], ql, b0, b1);
            }
          }
        }
      }

      // Scales, soft-cap and masks; element (nb, e) is row g + 8 (e >> 1),
      // key 8 nb + 2c + (e & 1) of the tile. A narrow tile (rows 8..15 are all
      // padding) skips the second row: its weights stay 0.
      float pw[2][4];
      float alpha2[2] = {1.0f, 1.0f};
      auto softmax = [&](auto wide_tag) {
        constexpr bool kWide = decltype(wide_tag)::value;
        constexpr int kRowsPerLane = kWide ? 2 : 1;
        float x[2][4], x2[2][4], lvs[2][2];
        [[maybe_unused]] float vsign[2][2] = {};
        [[maybe_unused]] const float* scales = reinterpret_cast<const float*>(
            st + Shape::kKStage + Shape::kVStage);
        // Keys of the tile each row attends, as a bit mask.
        uint32_t row_mask[2];
#pragma unroll
        for (int r = 0; r < kRowsPerLane; ++r) {
          const int32_t a = min(max(rb[r] - key0, 0), kAttnKeys);
          const int32_t b = min(max(re[r] - key0, 0), kAttnKeys);
          row_mask[r] = valid & ((1u << b) - 1u) & ~((1u << a) - 1u);
        }
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
          float ks[2] = {1.0f, 1.0f};
          lvs[nb][0] = lvs[nb][1] = 0.0f;
          if constexpr (kQuant) {
            const float2 k2 =
                *reinterpret_cast<const float2*>(scales + 8 * nb + 2 * c);
            const float2 v2 =
                *reinterpret_cast<const float2*>(scales + 16 + 8 * nb + 2 * c);
            ks[0] = k2.x;
            ks[1] = k2.y;
            lvs[nb][0] = Log2AbsFtz(v2.x);
            lvs[nb][1] = Log2AbsFtz(v2.y);
            vsign[nb][0] = v2.x < 0.0f ? -1.0f : 1.0f;
            vsign[nb][1] = v2.y < 0.0f ? -1.0f : 1.0f;
          }
#pragma unroll
          for (int e = 0; e < 2 * kRowsPerLane; ++e) {
            x[nb][e] = sc[nb][e] * ks[e & 1] * rowmult[e >> 1];
          }
        }
        if (capped) {
#pragma unroll
          for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
            for (int e = 0; e < 2 * kRowsPerLane; ++e) {
              x[nb][e] = p.soft_cap * tanhf(x[nb][e] * inv_cap) * kLog2e;
            }
          }
        }
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
          for (int e = 0; e < 2 * kRowsPerLane; ++e) {
            const int kt = 8 * nb + 2 * c + (e & 1);
            const bool ok = (row_mask[e >> 1] >> kt) & 1u;
            x[nb][e] = ok ? x[nb][e] : -INFINITY;
            x2[nb][e] = x[nb][e] + lvs[nb][e & 1];
          }
        }

        // Online softmax per row (the quad of lanes holds a row's 16 keys).
        float mu[2], mu2[2];
#pragma unroll
        for (int r = 0; r < kRowsPerLane; ++r) {
          float mt = fmaxf(fmaxf(x[0][2 * r], x[0][2 * r + 1]),
                           fmaxf(x[1][2 * r], x[1][2 * r + 1]));
          mt = fmaxf(mt, __shfl_xor_sync(0xFFFFFFFFu, mt, 1));
          mt = fmaxf(mt, __shfl_xor_sync(0xFFFFFFFFu, mt, 2));
          const float mn = fmaxf(m[r], mt);
          mu[r] = SafeMax(mn);
          // 1 when the max stayed (also at -inf: a row with no key yet, or a
          // padding row, whose accumulators are 0 and need no rescale).
          const float alpha = mn == m[r] ? 1.0f : exp2f(m[r] - mu[r]);
          l[r] *= alpha;
          m[r] = mn;
          if constexpr (kQuant) {
            float mt2 = fmaxf(fmaxf(x2[0][2 * r], x2[0][2 * r + 1]),
                              fmaxf(x2[1][2 * r], x2[1][2 * r + 1]));
            mt2 = fmaxf(mt2, __shfl_xor_sync(0xFFFFFFFFu, mt2, 1));
            mt2 = fmaxf(mt2, __shfl_xor_sync(0xFFFFFFFFu, mt2, 2));
            const float mn2 = fmaxf(m2[r], mt2);
            mu2[r] = SafeMax(mn2);
            alpha2[r] = mn2 == m2[r] ? 1.0f : exp2f(m2[r] - mu2[r]);
            m2[r] = mn2;
          } else {
            mu2[r] = mu[r];
            alpha2[r] = alpha;
          }
        }
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            if (r >= kRowsPerLane) {
              pw[nb][e] = 0.0f;
              continue;
            }
            const float pr = exp2f(x[nb][e] - mu[r]);
            l[r] += pr;
            if constexpr (kQuant) {
              pw[nb][e] = exp2f(x2[nb][e] - mu2[r]) * vsign[nb][e & 1];
            } else {
              pw[nb][e] = pr;
            }
          }
        }
      };
      if (wide) {
        softmax(std::true_type{});
      } else {
        softmax(std::false_type{});
      }
      // Rescale only when some row's max moved (rare after the first tiles).
      if (__any_sync(0xFFFFFFFFu, alpha2[0] != 1.0f || alpha2[1] != 1.0f)) {
#pragma unroll
        for (int nd = 0; nd < Shape::kNBlocks; ++nd) {
          acc[nd][0] *= alpha2[0];
          acc[nd][1] *= alpha2[0];
          acc[nd][2] *= alpha2[1];
          acc[nd][3] *= alpha2[1];
        }
      }
      uint4 pa, pl = make_uint4(0, 0, 0, 0);
      pa.x = PackPair<kBf16>(pw[0][0], pw[0][1]);
      pa.y = PackPair<kBf16>(pw[0][2], pw[0][3]);
      pa.z = PackPair<kBf16>(pw[1][0], pw[1][1]);
      pa.w = PackPair<kBf16>(pw[1][2], pw[1][3]);
      if constexpr (kBf16) {
        auto rest = [](uint32_t h, float a, float b) {
          return PackPair<true>(a - __uint_as_float(h << 16),
                                b - __uint_as_float(h & 0xFFFF0000u));
        };
        pl.x = rest(pa.x, pw[0][0], pw[0][1]);
        pl.y = rest(pa.y, pw[0][2], pw[0][3]);
        pl.z = rest(pa.z, pw[1][0], pw[1][1]);
        pl.w = rest(pa.w, pw[1][2], pw[1][3]);
      }

      // O += P V: V units of keys (2c, 2c + 1) give b0, (8 + 2c, 9 + 2c) b1.
#pragma unroll
      for (int u = 0; u < Shape::kVUnits; ++u) {
        uint32_t w[4][Shape::kVUnit / 4];
        load_v(st, u, w);
#pragma unroll
        for (int wi = 0; wi < Shape::kVUnit / 4; ++wi) {
          constexpr int kPerWord = 4 / Shape::kESize;
          // b[half][e]: keys (2c, 2c + 1) for half 0, (8 + 2c, 9 + 2c) for
          // half 1, at element e of word wi.
          uint32_t b[2][kPerWord];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const uint32_t w0 = w[2 * half][wi], w1 = w[2 * half + 1][wi];
            if constexpr (Shape::kQuant) {
              VPairs<Cache>(w0, w1, b[half]);
            } else {
              b[half][0] = __byte_perm(w0, w1, 0x5410u);
              b[half][1] = __byte_perm(w0, w1, 0x7632u);
            }
          }
#pragma unroll
          for (int e = 0; e < kPerWord; ++e) {
            const int nd = u * Shape::kVUnitElems + wi * kPerWord + e;
            Mma<kBf16>(acc[nd], pa, b[0][e], b[1][e]);
            if constexpr (kBf16) Mma<kBf16>(acc[nd], pl, b[0][e], b[1][e]);
          }
        }
      }
    }  // !kSwap
    __syncwarp();
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  CpAsyncWait<0>();

  // ---- Merge the warps through shared memory and write. ----
  // A row's sums are spread over the lanes of its g (swapped: of its c).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int off = kSwap ? 4 : 1; off < (kSwap ? 32 : 4); off *= 2) {
      l[r] += __shfl_xor_sync(0xFFFFFFFFu, l[r], off);
    }
  }
  __syncthreads();  // Every warp is done with its ring.
  float* s_o = reinterpret_cast<float*>(smem);  // [warp][row][dim]
  if ((kSwap ? g : c) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s_m[warp * kAttnRows + lane_row(r)] = m[r];
      s_m2[warp * kAttnRows + lane_row(r)] = kQuant ? m2[r] : m[r];
      s_l[warp * kAttnRows + lane_row(r)] = l[r];
    }
  }
#pragma unroll
  for (int nd = 0; nd < kAccBlocks; ++nd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      // Unswapped: row g + 8 (e / 2), dim of n-block nd at column
      // 2c + e % 2; swapped: row 2c + e % 2, dim (2 nd + e / 2, g).
      const int r = kSwap ? 2 * c + (e & 1) : g + 8 * (e >> 1);
      const int d = kSwap ? Shape::VDim(2 * nd + (e >> 1), g)
                          : Shape::VDim(nd, 2 * c + (e & 1));
      s_o[(warp * kAttnRows + r) * kHeadDim + d] = acc[nd][e];
    }
  }
  __syncthreads();

  // One thread per (head of the block, row, 8 elements): merges the warps of
  // that head.
  const bool bf16_out = bf16_q;
  constexpr int kChunks = kHeadDim / 8;
  for (int item = threadIdx.x; item < heads * kAttnRows * kChunks;
       item += kAttnThreads) {
    const int hb2 = item / (kAttnRows * kChunks);
    const int r = item / kChunks % kAttnRows;
    const int d0 = (item % kChunks) * 8;
    const int32_t row = first_row + r;
    if (row >= rows) continue;
    const int w0 = hb2 * wph;
    float mx = -INFINITY, mx2 = -INFINITY;
    for (int w = w0; w < w0 + wph; ++w) {
      mx = fmaxf(mx, s_m[w * kAttnRows + r]);
      mx2 = fmaxf(mx2, s_m2[w * kAttnRows + r]);
    }
    float sum = 0.0f, o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int w = w0; w < w0 + wph; ++w) {
      sum += s_l[w * kAttnRows + r] * Exp2Diff(s_m[w * kAttnRows + r], mx);
      const float a = Exp2Diff(s_m2[w * kAttnRows + r], mx2);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        o[e] += s_o[(w * kAttnRows + r) * kHeadDim + d0 + e] * a;
      }
    }
    // o = num 2^mx2 / (sum 2^mx).
    const float f =
        sum > 0.0f && mx2 != -INFINITY ? exp2f(mx2 - mx) / sum : 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= f;
    const int32_t j = row / grid.group;
    const int32_t h = (head0 + hb2) * grid.group + row % grid.group;
    const int64_t qrow = static_cast<int64_t>(s.q_begin) + j;
    if (grid.splits == 1) {
      StoreHalf8(p.o, qrow * p.o_token_stride + h * p.o_head_stride + d0, o,
                 bf16_out, grid.vector_out);
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
