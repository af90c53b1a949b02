// Test helper: a kernel case's caches rearranged into records (layer groups of
// several cache shapes; core/cache_layout.h "Records"), stated here without
// CacheLayout's helpers so that the kernels' record addressing is checked
// against an independent statement:
//
//   record of slot s     at s * pitch bytes
//   K rows               byte 0, H rows of the case's K row bytes
//   V rows               byte align16(H * K row bytes), H rows
//   side K scales        byte align16(V start + H * V row bytes), H floats
//   side V scales        right after the K scales, H floats
//   the rest up to pitch untouched by the kernels
//
// Inline rows carry their scales (Placement's row bytes). Bytes that belong
// to no part are filled from a seed, so two record images made with one seed
// differ only where the caches differ.

#ifndef KVCACHE_TESTS_RECORD_REFERENCE_H_
#define KVCACHE_TESTS_RECORD_REFERENCE_H_

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/cache_layout.h"
#include "tests/kernel_reference.h"
#include "tests/kernel_test_util.h"

namespace kvcache::testing::ref {

struct Records {
  int64_t pitch = 0;  // Bytes per slot.
  int64_t value = 0, key_scale = 0, value_scale = 0, need = 0;
  std::vector<uint8_t> bytes;  // num_slots * pitch.

  // The case's layer over records at `base` (host or device copy of bytes).
  LayerCache Cache(const HostCase& hc, void* base) const {
    LayerCache c;
    c.layout = hc.layout;
    const int64_t ce = static_cast<int64_t>(DTypeSize(hc.config.cache_dtype));
    c.layout.record_pitch = pitch / ce;
    char* b = static_cast<char*>(base);
    const bool has_v = hc.config.head_size_v > 0;
    const Placement place(hc);
    c.key_cache = b;
    c.value_cache = has_v ? b + value : nullptr;
    if (place.inline_scales) {
      c.key_scale = reinterpret_cast<float*>(b + place.scale_at);
      c.value_scale = has_v
                          ? reinterpret_cast<float*>(b + value + place.scale_at)
                          : nullptr;
    } else if (IsQuantized(hc.config.cache_dtype)) {
      c.key_scale = reinterpret_cast<float*>(b + key_scale);
      c.value_scale =
          has_v ? reinterpret_cast<float*>(b + value_scale) : nullptr;
    }
    return c;
  }
};

inline int64_t Align16(int64_t n) { return (n + 15) / 16 * 16; }

// The offsets of case hc's records, with `extra` bytes (a multiple of 16)
// beyond what a record needs.
inline Records RecordShape(const HostCase& hc, int64_t extra) {
  const Placement place(hc);
  const int64_t H = hc.config.num_heads;
  const bool has_v = hc.config.head_size_v > 0;
  const bool side = !place.inline_scales && IsQuantized(hc.config.cache_dtype);
  Records r;
  r.value = Align16(H * place.key_row_bytes);
  r.key_scale = Align16(r.value + (has_v ? H * place.value_row_bytes : 0));
  r.value_scale = r.key_scale + (side ? 4 * H : 0);
  r.need = Align16(r.value_scale + (side && has_v ? 4 * H : 0));
  r.pitch = r.need + extra;
  return r;
}

// Dense caches c of case hc (as kernel_reference.h holds them) as records of
// RecordShape(hc, extra); bytes outside the parts drawn from `filler_seed`.
inline Records ToRecords(const HostCase& hc, const Caches& c, int64_t extra,
                         uint64_t filler_seed) {
  Records r = RecordShape(hc, extra);
  const Placement place(hc);
  const int64_t H = hc.config.num_heads;
  const int64_t slots = hc.layout.num_slots();
  const bool has_v = hc.config.head_size_v > 0;
  const bool side = !place.inline_scales && IsQuantized(hc.config.cache_dtype);
  r.bytes.resize(static_cast<size_t>(slots * r.pitch));
  std::mt19937_64 fill(filler_seed);
  for (uint8_t& b : r.bytes) b = static_cast<uint8_t>(fill());
  for (int64_t s = 0; s < slots; ++s) {
    uint8_t* rec = r.bytes.data() + s * r.pitch;
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(rec + h * place.key_row_bytes,
                  c.key_cache.data() + place.Row(true, s, h, H),
                  place.key_row_bytes);
      if (has_v) {
        std::memcpy(rec + r.value + h * place.value_row_bytes,
                    c.value_cache.data() + place.Row(false, s, h, H),
                    place.value_row_bytes);
      }
      if (side) {
        std::memcpy(rec + r.key_scale + 4 * h, &c.key_scale[s * H + h], 4);
        if (has_v) {
          std::memcpy(rec + r.value_scale + 4 * h, &c.value_scale[s * H + h],
                      4);
        }
      }
    }
  }
  return r;
}

}  // namespace kvcache::testing::ref

#endif  // KVCACHE_TESTS_RECORD_REFERENCE_H_
