// The launch policy of the CUDA decode attention kernel: for one launch, the
// KV heads per thread block and the blocks per multiprocessor the kernel
// instantiation is sized for, as AttentionParams::variant asks (0 "auto":
// chosen by cache type and shape; the others force a choice, for
// experiments). Host arithmetic on host-known sizes only (no device access,
// so a launch stays capturable in a CUDA graph, and CPU tests check it).
//
// Thread-safety: pure functions.

#ifndef KVCACHE_KERNELS_ATTENTION_POLICY_H_
#define KVCACHE_KERNELS_ATTENTION_POLICY_H_

#include <cstdint>

#include "kernels/attention_params.h"

namespace kvcache::internal {

// Query rows per thread block (the mma's M; kAttnRows in attention.cuh).
inline constexpr int32_t kAttentionTileRows = 16;

// What one launch runs.
struct AttentionKernelChoice {
  int heads = 4;          // KV heads per thread block: 1, 2 or 4.
  int blocks_per_sm = 3;  // The kernel instantiation: 3 or 4.
  // K rows copied in row order (AttnConfig::kRowCopy in attention.cuh; the
  // policy's choice), or as the lanes read them (the kernel before, for A/B).
  bool row_copy = true;
  // Narrow tiles with the mma's operands swapped (AttnConfig::kSwap in
  // attention.cuh): 8-bit caches with at most 8 query rows per KV head
  // (max_query_tokens x GQA group), row copies only.
  bool swap = false;
  // Swapped tiles only (AttnConfig::kChains and kL2Bytes in attention.cuh):
  // S^T's accumulator chains (1 or 2) and the L2 prefetch size the code
  // copies ask for (0 or 256); the policy: int8 1 and 256, fp8 2 and 256.
  int chains = 1;
  int l2_bytes = 0;
  // Swapped tiles of int8 caches: S^T on the integer tensor cores
  // (AttnConfig::kInt8Mma).
  bool int8_mma = false;
};

// Row tiles per KV head: max_query_tokens x GQA group rows, 16 per tile.
int32_t AttentionRowTiles(const AttentionParams& p);

// The choice for p (validated) on a device of `sms` multiprocessors, where
// `occ4_compiled` says whether a 4-blocks kernel exists for p's cache type
// and head size (without it, every choice runs the 3-blocks one). Heads that
// do not divide the KV heads fall back to the base (4, 2 or 1: the most of
// those that divide them).
//
// Variant 0, the policy, from one H200 run of the variants (README
// "Attention", benchmarks/results/NOTES.md "v4"), in terms of blocks = the
// thread blocks per split at the base heads per block (sequences x KV heads /
// base x row tiles): few = blocks < sms / 2, many = blocks >= 2 sms.
// - int8: the 4-blocks kernel (128 registers, no spills: 16 warps per
//   multiprocessor instead of 12); 1 head per block unless many. Without a
//   4-blocks kernel (head size 256), as fp8.
// - fp8: 1 head per block when few, else the base; the 4-blocks kernel
//   (whose fp8 dequantization spills at 128 registers) only when blocks >= 3
//   sms: when the base grid fills a wave of the 3-blocks kernel unsplit, so
//   split-KV adds no parallelism and the fourth block per multiprocessor is
//   what fills the device (many short sequences: 256 x 1k).
// - bf16/fp16: 1 head per block when few or many, 2 in between; 3 blocks.
// - Every cache: K and V rows copied in row order (row_copy), V into slots
//   that keep each 32-byte sector in one piece: the operand-order V copies
//   fetched every sector twice (benchmarks/results/NOTES.md "v6"). Variant 8
//   "auto_v4" is this policy with the operand-order copies of v4, for A/B;
//   the rows_* variants force heads and blocks per multiprocessor with row
//   copies.
// - 8-bit caches with at most 8 query rows per KV head: swapped tiles (swap;
//   no mma on padding rows), also in the rows_* variants. Variant 14
//   "auto_v5" is the policy without them, for A/B.
// - Swapped tiles (v10, benchmarks/results/NOTES.md): int8 computes S^T on
//   the integer tensor cores (int8_mma: the codes as stored, q as two int8
//   parts; 1.033-1.036x alone), fp8 in two accumulator chains; both with
//   the L2::256B hint on code copies (int8 1.044-1.045x, fp8 1.010-1.018x
//   over the v7 policy at 64 x 8k and 8 x 64k). Variant 15 "auto_v7" is the
//   policy before them.
AttentionKernelChoice ChooseAttentionKernel(const AttentionParams& p,
                                            bool occ4_compiled, int sms);

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_ATTENTION_POLICY_H_
