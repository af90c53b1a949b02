#include "kernels/attention_policy.h"

#include <cstdint>

#include "core/dtype.h"

namespace kvcache::internal {
namespace {

// The variants of AttentionParams::variant (kAttentionVariantNames): KV heads
// per block (kBaseHeads; 1 or 2 forced; kAutoHeads: the first shape rule;
// kPolicy), blocks per multiprocessor (3, 4, kPolicy) and how K rows are
// copied (kRowCopies: whole rows per copy instruction, the kernel's default;
// kOperandCopies: as the lanes read them, the kernel before, kept for A/B).
constexpr int kBaseHeads = 0;
constexpr int kAutoHeads = -1;
constexpr int kPolicy = -2;
constexpr bool kRowCopies = true;
constexpr bool kOperandCopies = false;
struct VariantSpec {
  int heads;
  int blocks_per_sm;
  bool row_copy;
  bool swap = false;  // Swapped narrow tiles where they apply.
  // Swapped tiles with the v10 knobs (int8: S^T on the integer tensor cores;
  // fp8: two accumulator chains; both: the L2::256B hint on code copies).
  bool v10 = false;
};
constexpr VariantSpec kVariants[kNumAttentionVariants] = {
    {kPolicy, kPolicy, kRowCopies, true, true},  // auto (the default)
    {kBaseHeads, 3, kOperandCopies},             // base
    {1, 3, kOperandCopies},                      // heads1
    {2, 3, kOperandCopies},                      // heads2
    {kBaseHeads, 4, kOperandCopies},             // occ4
    {1, 4, kOperandCopies},                      // occ4_heads1
    {kAutoHeads, 3, kOperandCopies},             // auto_heads
    {kAutoHeads, 4, kOperandCopies},             // occ4_auto_heads
    {kPolicy, kPolicy, kOperandCopies},          // auto_v4
    {kBaseHeads, 3, kRowCopies, true},           // rows_base
    {1, 3, kRowCopies, true},                    // rows_heads1
    {2, 3, kRowCopies, true},                    // rows_heads2
    {kBaseHeads, 4, kRowCopies, true},           // rows_occ4
    {1, 4, kRowCopies, true},                    // rows_occ4_heads1
    {kPolicy, kPolicy, kRowCopies},              // auto_v5
    {kPolicy, kPolicy, kRowCopies, true},        // auto_v7
};

}  // namespace

int32_t AttentionRowTiles(const AttentionParams& p) {
  const int32_t group =
      p.num_q_heads / static_cast<int32_t>(p.cache.layout.num_heads);
  const int32_t rows = p.max_query_tokens * group;
  return (rows + kAttentionTileRows - 1) / kAttentionTileRows;
}

AttentionKernelChoice ChooseAttentionKernel(const AttentionParams& p,
                                            bool occ4_compiled, int sms) {
  const VariantSpec& v = kVariants[p.variant];
  const DType cache = p.cache.layout.cache_dtype;
  const bool wide = DTypeSize(cache) == 2;
  const bool int8 = cache == DType::kInt8;
  const int64_t kv_heads = p.cache.layout.num_heads;
  const int base = kv_heads % 4 == 0 ? 4 : (kv_heads % 2 == 0 ? 2 : 1);
  const int64_t blocks =
      int64_t{p.num_seqs} * (kv_heads / base) * AttentionRowTiles(p);
  const bool few = blocks * 2 < sms;
  const bool many = blocks >= 2 * int64_t{sms};
  AttentionKernelChoice c;
  c.heads = base;
  c.row_copy = v.row_copy;
  // Swapped tiles: 8-bit caches whose rows per KV head fit the mma's N (8).
  c.swap = v.swap && !wide &&
           int64_t{p.max_query_tokens} * (p.num_q_heads / kv_heads) <=
               kAttentionTileRows / 2;
  c.blocks_per_sm = v.blocks_per_sm == 4 && occ4_compiled ? 4 : 3;
  if (c.swap && v.v10) {
    // README "Attention", benchmarks/results/NOTES.md "v10".
    c.chains = int8 ? 1 : 2;
    c.l2_bytes = 256;
    c.int8_mma = int8;
  }
  int heads = v.heads;
  if (heads == kAutoHeads) {
    // The first shape rule: 1 head when few, and for 16-bit caches when
    // many; else the base.
    heads = few || (wide && many) ? 1 : kBaseHeads;
  } else if (heads == kPolicy) {
    if (wide) {
      heads = few || many ? 1 : 2;
    } else if (int8 && occ4_compiled) {
      heads = many ? kBaseHeads : 1;
    } else {
      heads = few ? 1 : kBaseHeads;
    }
  }
  if (v.blocks_per_sm == kPolicy) {
    const bool use4 = occ4_compiled && (int8 || blocks >= 3 * int64_t{sms});
    c.blocks_per_sm = use4 ? 4 : 3;
  }
  if (heads > 0 && kv_heads % heads == 0) c.heads = heads;
  return c;
}

}  // namespace kvcache::internal
