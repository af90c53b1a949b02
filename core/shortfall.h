// Shortfall: why a reservation did not fit, in fields rather than only in a
// message. Reserve, CanReserve and AddSequence attach one to the statuses they
// return for lack of room:
//
//   code                 never_fits  meaning
//   -------------------  ----------  ------------------------------------------
//   RESOURCE_EXHAUSTED   false       not now: free or preempt blocks, retry
//   OUT_OF_RANGE         true        never: even an empty pool is too small
//
// blocks_needed is, when not now, the new blocks the batch needs; when never,
// the blocks the one sequence would hold. The payload travels in the status
// (absl::Status::SetPayload under kShortfallTypeUrl, 33 bytes: four
// little-endian int64 then one byte), so it survives copies of the status.
// Plain value type; the functions are thread-safe.

#ifndef KVCACHE_CORE_SHORTFALL_H_
#define KVCACHE_CORE_SHORTFALL_H_

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"

namespace kvcache {

struct Shortfall {
  int64_t blocks_needed = 0;     // See the table above.
  int64_t blocks_free = 0;       // On the free list when the call was made.
  int64_t blocks_evictable = 0;  // Cached and unreferenced then.
  int64_t blocks_total = 0;      // The whole pool.
  bool never_fits = false;       // True exactly for OUT_OF_RANGE.
};

inline constexpr absl::string_view kShortfallTypeUrl =
    "type.kvcache/kvcache.Shortfall";

// Attaches `shortfall` to `status` (not OK).
inline void SetShortfall(absl::Status& status, const Shortfall& shortfall) {
  char bytes[33];
  const int64_t fields[4] = {shortfall.blocks_needed, shortfall.blocks_free,
                             shortfall.blocks_evictable,
                             shortfall.blocks_total};
  std::memcpy(bytes, fields, sizeof(fields));  // x86-64 and ARM: little-endian.
  bytes[32] = shortfall.never_fits ? 1 : 0;
  status.SetPayload(kShortfallTypeUrl,
                    absl::Cord(absl::string_view(bytes, sizeof(bytes))));
}

// The shortfall attached to `status`, or nullopt (OK, another error, or a
// malformed payload).
inline std::optional<Shortfall> GetShortfall(const absl::Status& status) {
  const auto payload = status.GetPayload(kShortfallTypeUrl);  // absl::optional
  if (!payload.has_value() || payload->size() != 33) return std::nullopt;
  const std::string bytes(*payload);
  int64_t fields[4];
  std::memcpy(fields, bytes.data(), sizeof(fields));
  Shortfall s;
  s.blocks_needed = fields[0];
  s.blocks_free = fields[1];
  s.blocks_evictable = fields[2];
  s.blocks_total = fields[3];
  s.never_fits = bytes[32] != 0;
  return s;
}

}  // namespace kvcache

#endif  // KVCACHE_CORE_SHORTFALL_H_
