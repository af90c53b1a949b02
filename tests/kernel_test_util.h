// Test helper: random cases for the cache kernels (host buffers only), shared
// by the CPU and CUDA kernel tests. A case holds a K/V input in one of several
// strided layouts, a slot mapping with padding, and caches filled with random
// bytes (so unwritten slots are checked too).

#ifndef KVCACHE_TESTS_KERNEL_TEST_UTIL_H_
#define KVCACHE_TESTS_KERNEL_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "kernels/float_convert.h"
#include "kernels/kernel_params.h"
#include "testing/test_seed.h"

namespace kvcache::testing {

// How K and V sit in the input buffer.
enum class InputLayout {
  kDense,      // K [T, H, D] then V [T, H, Dv], each contiguous.
  kFusedQkv,   // One row per token: [q: 2*H*D | k: H*D | v: H*Dv] (a fused QKV
               // output).
  kHeadMajor,  // K [H, T, D], V [H, T, Dv].
  kUnaligned,  // Odd strides and a base offset of one element: no 16-byte
               // vectors.
};

inline const char* LayoutName(InputLayout l) {
  switch (l) {
    case InputLayout::kDense:
      return "dense";
    case InputLayout::kFusedQkv:
      return "fused_qkv";
    case InputLayout::kHeadMajor:
      return "head_major";
    case InputLayout::kUnaligned:
      return "unaligned";
  }
  return "?";
}

struct CaseConfig {
  int64_t head_size = 128;
  int64_t head_size_v = 128;  // 0: a K-only (latent) cache.
  int64_t num_heads = 8;
  int64_t block_size = 16;
  int64_t num_tokens = 16;
  DType input_dtype = DType::kBFloat16;
  DType cache_dtype = DType::kInt8;
  InputLayout layout = InputLayout::kDense;
  bool specials = true;   // Zero, huge, NaN and Inf heads.
  double padding = 0.1;   // Fraction of padding tokens.
  bool gaussian = false;  // Plain N(0, 1) input instead of mixed magnitudes.
  // Scale placement of the cache (inline only with int8/fp8 caches).
  ScalePlacement placement = ScalePlacement::kSide;

  std::string Name() const {
    return absl::StrCat(
        "D=", head_size, " Dv=", head_size_v, " H=", num_heads,
        " bs=", block_size, " T=", num_tokens, " in=", DTypeName(input_dtype),
        " cache=", DTypeName(cache_dtype), " layout=", LayoutName(layout),
        " scales=", ScalePlacementName(placement));
  }
};

// Element offsets and strides of one operand inside a buffer.
struct Operand {
  int64_t offset = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

struct HostCase {
  CaseConfig config;
  CacheLayout layout;
  std::vector<uint8_t> input;  // Raw bytes of the input buffer.
  Operand key, value;
  std::vector<int64_t> slots;
  // Inline scales: in the rows of key_cache / value_cache, and the scale
  // vectors are empty.
  std::vector<uint8_t> key_cache, value_cache;
  std::vector<float> key_scale, value_scale;  // Empty for bf16/fp16 caches.
  std::vector<int64_t>
      special_rows;  // Rows (t * H + h) holding special values.

  size_t InElem() const { return DTypeSize(config.input_dtype); }
  // Raw pointer to element (t, h, 0) of K or V.
  const uint8_t* Row(bool is_key, int64_t t, int64_t h) const {
    const Operand& op = is_key ? key : value;
    return input.data() +
           (op.offset + t * op.token_stride + h * op.head_stride) * InElem();
  }

  // The layer over the given caches (host or device copies of this case's
  // buffers); with inline scales ks and vs are ignored and the scale pointers
  // point into kc and vc.
  LayerCache Cache(void* kc, void* vc, float* ks, float* vs) const {
    LayerCache cache;
    cache.layout = layout;
    cache.key_cache = kc;
    cache.value_cache = vc;
    cache.key_scale = layout.inline_scales() ? InlineScale(layout, kc) : ks;
    cache.value_scale = layout.inline_scales() ? InlineScale(layout, vc) : vs;
    if (!layout.has_value()) {  // K only: no V cache, no V scales.
      cache.value_cache = nullptr;
      cache.value_scale = nullptr;
    }
    return cache;
  }

  // Parameters over the given buffers (host or device copies of this case's
  // buffers; ks and vs as for Cache).
  QuantizeWriteParams Params(void* input_base, const int64_t* slot_ptr,
                             void* kc, void* vc, float* ks, float* vs) const {
    QuantizeWriteParams p;
    const size_t e = InElem();
    p.input.key = static_cast<uint8_t*>(input_base) + key.offset * e;
    p.input.value = layout.has_value()
                        ? static_cast<uint8_t*>(input_base) + value.offset * e
                        : nullptr;
    p.input.dtype = config.input_dtype;
    p.input.key_token_stride = key.token_stride;
    p.input.key_head_stride = key.head_stride;
    p.input.value_token_stride = value.token_stride;
    p.input.value_head_stride = value.head_stride;
    p.num_tokens = config.num_tokens;
    p.slot_mapping = slot_ptr;
    p.cache = Cache(kc, vc, ks, vs);
    return p;
  }
};

// Stores float f as one element of dtype at dst.
inline void StoreAs(DType dtype, float f, uint8_t* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, &f, 4);
  } else {
    const uint16_t h = dtype == DType::kBFloat16
                           ? internal::PortableFloatToBFloat16(f)
                           : internal::PortableFloatToFloat16(f);
    std::memcpy(dst, &h, 2);
  }
}

inline float LargestFinite(DType dtype) {
  if (dtype == DType::kFloat16) return 65504.0f;
  if (dtype == DType::kBFloat16)
    return 3.0e38f;  // FLT_MAX would round to bf16 infinity.
  return std::numeric_limits<float>::max();
}

inline HostCase MakeCase(const CaseConfig& c, std::mt19937_64& rng) {
  HostCase hc;
  hc.config = c;
  const int64_t T = c.num_tokens, H = c.num_heads, D = c.head_size,
                Dv = c.head_size_v;
  // Slots: distinct, from a cache with room to spare; ~padding of them
  // negative.
  const int64_t needed = std::max<int64_t>(T + T / 2 + 1, c.block_size);
  hc.layout.num_blocks = (needed + c.block_size - 1) / c.block_size + 1;
  hc.layout.block_size = c.block_size;
  hc.layout.num_heads = H;
  hc.layout.head_size = D;
  hc.layout.head_size_v = Dv;
  hc.layout.cache_dtype = c.cache_dtype;
  hc.layout.scale_placement = c.placement;
  std::vector<int64_t> all(static_cast<size_t>(hc.layout.num_slots()));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::bernoulli_distribution pad(c.padding);
  for (int64_t t = 0; t < T; ++t)
    hc.slots.push_back(pad(rng) ? -1 - t % 3 : all[t]);

  // Input layout.
  switch (c.layout) {
    case InputLayout::kDense:
      hc.key = {0, H * D, D};
      hc.value = {T * H * D, H * Dv, Dv};
      break;
    case InputLayout::kFusedQkv: {
      const int64_t row = 2 * H * D + H * D + H * Dv;
      hc.key = {2 * H * D, row, D};
      hc.value = {3 * H * D, row, Dv};
      break;
    }
    case InputLayout::kHeadMajor:
      hc.key = {0, D, T * D};
      hc.value = {H * T * D, Dv, T * Dv};
      break;
    case InputLayout::kUnaligned:
      hc.key = {1, H * (D + 1) + 3, D + 1};
      hc.value = {1 + T * (H * (D + 1) + 3), H * (Dv + 3) + 1, Dv + 3};
      break;
  }
  auto extent = [&](const Operand& op, int64_t d) {
    return op.offset + (T - 1) * op.token_stride + (H - 1) * op.head_stride + d;
  };
  const int64_t elems = std::max(extent(hc.key, D), extent(hc.value, Dv));
  hc.input.resize(static_cast<size_t>(elems) * DTypeSize(c.input_dtype));
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : hc.input)
    b = static_cast<uint8_t>(byte(rng));  // Gaps hold garbage.

  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-4.0f, 3.0f);
  const int64_t rows = T * H;
  if (c.specials && rows >= 2) {
    for (int i = 0; i < 4; ++i)
      hc.special_rows.push_back(static_cast<int64_t>(rng() % rows));
  }
  const size_t e = DTypeSize(c.input_dtype);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        const bool is_key = kv == 0;
        const int64_t d = is_key ? D : Dv;
        uint8_t* row = const_cast<uint8_t*>(hc.Row(is_key, t, h));
        const float mag = c.gaussian ? 1.0f : std::pow(10.0f, log_mag(rng));
        int special = -1;
        for (size_t i = 0; i < hc.special_rows.size(); ++i) {
          if (hc.special_rows[i] == t * H + h) special = static_cast<int>(i);
        }
        for (int64_t i = 0; i < d; ++i) {
          float x = normal(rng) * mag;
          if (special == 0) x = 0.0f;  // All zero.
          if (special == 1)
            x = (i % 2 ? -1.0f : 1.0f) * LargestFinite(c.input_dtype) *
                (i % 3 == 0 ? 1.0f : 0.5f);  // Huge.
          if (special == 2 && i == d / 2)
            x = std::numeric_limits<float>::quiet_NaN();
          if (special == 3 && i == 1)
            x = -std::numeric_limits<float>::infinity();
          StoreAs(c.input_dtype, x, row + i * e);
        }
      }
    }
  }

  // Caches start as random bytes (inline scales and padding too); side scales
  // as random floats. The draws above do not depend on the placement, so two
  // cases that differ only in it get the same input and slots.
  const int64_t ce = static_cast<int64_t>(DTypeSize(c.cache_dtype));
  hc.key_cache.resize(static_cast<size_t>(hc.layout.num_blocks *
                                          hc.layout.key_block_elems() * ce));
  hc.value_cache.resize(static_cast<size_t>(
      hc.layout.num_blocks * hc.layout.value_block_elems() * ce));
  for (uint8_t& b : hc.key_cache) b = static_cast<uint8_t>(byte(rng));
  for (uint8_t& b : hc.value_cache) b = static_cast<uint8_t>(byte(rng));
  if (hc.layout.side_scales()) {
    const size_t n = static_cast<size_t>(hc.layout.num_blocks *
                                         hc.layout.side_scale_block_elems());
    std::uniform_real_distribution<float> any(-1.0f, 1.0f);
    hc.key_scale.resize(n);
    hc.value_scale.resize(hc.layout.has_value() ? n : 0);
    for (float& s : hc.key_scale) s = any(rng);
    for (float& s : hc.value_scale) s = any(rng);
  }
  return hc;
}

// A gather over a case's caches: by slot list or by block table, into a strided
// output.
struct GatherCase {
  DType out_dtype = DType::kFloat32;
  bool use_block_table = false;
  std::vector<int64_t> slots;
  std::vector<int32_t> block_table;
  int64_t token_begin = 0;
  int64_t num_tokens = 0;
  Operand key, value;
  std::vector<uint8_t> output;  // Poisoned initial contents.

  // Slot of gathered token t, -1 for padding.
  int64_t SlotOf(int64_t t, int64_t block_size) const {
    if (!use_block_table) return slots[t];
    const int64_t pos = token_begin + t;
    const int32_t b = block_table[pos / block_size];
    return b < 0 ? -1 : b * block_size + pos % block_size;
  }

  GatherParams Params(const LayerCache& cache, void* out_base,
                      const int64_t* slot_ptr, const int32_t* table_ptr) const {
    GatherParams p;
    p.cache = cache;
    const size_t e = DTypeSize(out_dtype);
    if (use_block_table) {
      p.block_table = table_ptr;
      p.block_table_len = static_cast<int64_t>(block_table.size());
      p.token_begin = token_begin;
    } else {
      p.slots = slot_ptr;
    }
    p.num_tokens = num_tokens;
    p.output.key = static_cast<uint8_t*>(out_base) + key.offset * e;
    p.output.value = cache.layout.has_value()
                         ? static_cast<uint8_t*>(out_base) + value.offset * e
                         : nullptr;
    p.output.dtype = out_dtype;
    p.output.key_token_stride = key.token_stride;
    p.output.key_head_stride = key.head_stride;
    p.output.value_token_stride = value.token_stride;
    p.output.value_head_stride = value.head_stride;
    return p;
  }
};

// Gather variants of a case (MakeGatherCase): 0: slot list (the case's slots,
// padding included), dense output; 1: block table over random blocks (some
// -1), padded output; 2: block table, unaligned output; 3: block table, dense
// output.
inline constexpr int kGatherVariants = 4;

inline GatherCase MakeGatherCase(const HostCase& hc, DType out, int variant,
                                 std::mt19937_64& rng) {
  GatherCase g;
  g.out_dtype = out;
  const CacheLayout& L = hc.layout;
  const int64_t H = L.num_heads, D = L.head_size, Dv = L.head_size_v;
  if (variant == 0) {
    g.slots = hc.slots;
    g.num_tokens = hc.config.num_tokens;
  } else {
    g.use_block_table = true;
    std::vector<int32_t> blocks(static_cast<size_t>(L.num_blocks));
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    g.block_table = blocks;
    g.block_table[rng() % g.block_table.size()] = -1;
    const int64_t capacity = L.num_blocks * L.block_size;
    g.token_begin = static_cast<int64_t>(
        rng() % std::min<int64_t>(capacity, L.block_size + 3));
    g.num_tokens =
        std::min<int64_t>(hc.config.num_tokens + 5, capacity - g.token_begin);
  }
  const int64_t T = g.num_tokens;
  if (variant == 0 || variant == 3) {
    g.key = {0, H * D, D};
    g.value = {T * H * D, H * Dv, Dv};
  } else if (variant == 1) {
    g.key = {8, H * (D + 8) + 16, D + 8};
    g.value = {8 + T * (H * (D + 8) + 16), H * (Dv + 8) + 8, Dv + 8};
  } else {
    g.key = {1, H * (D + 1) + 1, D + 1};
    g.value = {1 + T * (H * (D + 1) + 1), Dv, T * Dv + 3};
  }
  const int64_t extent =
      std::max(g.key.offset + (T - 1) * g.key.token_stride +
                   (H - 1) * g.key.head_stride + D,
               g.value.offset + (T - 1) * g.value.token_stride +
                   (H - 1) * g.value.head_stride + Dv);
  g.output.assign(static_cast<size_t>(extent) * DTypeSize(out), 0xAB);
  return g;
}

// The input/cache dtype pairs quantize-and-write supports.
struct DTypePair {
  DType input, cache;
};
inline std::vector<DTypePair> WriteDTypePairs() {
  std::vector<DTypePair> pairs;
  for (DType in : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (DType cache : {DType::kInt8, DType::kFp8E4M3})
      pairs.push_back({in, cache});
  }
  pairs.push_back({DType::kBFloat16, DType::kBFloat16});
  pairs.push_back({DType::kFloat16, DType::kFloat16});
  return pairs;
}

// Head sizes of the test matrix, and the V head size paired with each (D != Dv
// when asked).
inline const std::vector<int64_t>& MatrixHeadSizes() {
  static const std::vector<int64_t> sizes = {8, 64, 80, 96, 128, 192, 256, 576};
  return sizes;
}
inline int64_t OtherHeadSize(int64_t d) { return d == 128 ? 192 : 128; }

// The scale placements a cache dtype supports.
inline std::vector<ScalePlacement> PlacementsFor(DType cache) {
  if (!IsQuantized(cache)) return {ScalePlacement::kSide};
  return {ScalePlacement::kSide, ScalePlacement::kInline};
}

// Tokens for a case of about `budget` elements.
inline int64_t TokensFor(int64_t heads, int64_t d, int64_t dv, int64_t budget) {
  return std::clamp<int64_t>(budget / (heads * (d + dv)), 3, 48);
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_KERNEL_TEST_UTIL_H_
