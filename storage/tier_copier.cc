#include "storage/tier_copier.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvcache {

std::vector<SlotSegment> SlotSegments(absl::Span<const TierRun> runs) {
  std::vector<SlotSegment> segments;
  for (const TierRun& r : runs) segments.push_back({r.slot_offset, r.bytes});
  std::sort(segments.begin(), segments.end(),
            [](const SlotSegment& a, const SlotSegment& b) {
              return a.offset < b.offset;
            });
  size_t kept = 0;
  for (const SlotSegment& s : segments) {
    if (kept > 0 &&
        segments[kept - 1].offset + segments[kept - 1].bytes == s.offset) {
      segments[kept - 1].bytes += s.bytes;
    } else {
      segments[kept++] = s;
    }
  }
  segments.resize(kept);
  return segments;
}

void SortBySlot(absl::Span<TierPair> copies) {
  std::sort(copies.begin(), copies.end(),
            [](const TierPair& a, const TierPair& b) {
              return a.host_slot < b.host_slot;
            });
}

void AppendStagedCopies(absl::Span<const SlotSegment> segments,
                        absl::Span<const TierPair> copies, char* staging,
                        char* pool, int64_t slot_bytes,
                        std::vector<StagedCopy>& out) {
  for (size_t i = 0; i < copies.size(); ++i) {
    char* image = staging + static_cast<int64_t>(i) * slot_bytes;
    char* slot = pool + int64_t{copies[i].host_slot} * slot_bytes;
    for (const SlotSegment& seg : segments) {
      char* a = image + seg.offset;
      char* b = slot + seg.offset;
      if (!out.empty() && out.back().staging + out.back().bytes == a &&
          out.back().pool + out.back().bytes == b) {
        out.back().bytes += seg.bytes;
      } else {
        out.push_back({a, b, seg.bytes});
      }
    }
  }
}

absl::Status ValidateTierRuns(absl::Span<const TierRun> runs,
                              int64_t slot_bytes, int32_t num_slots) {
  if (runs.empty()) {
    return absl::InvalidArgumentError("tier runs: none (a block has no bytes)");
  }
  if (slot_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tier slot_bytes ", slot_bytes, ": expected > 0"));
  }
  if (num_slots < 1 ||
      slot_bytes > std::numeric_limits<int64_t>::max() / num_slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("tier num_slots ", num_slots, " of ", slot_bytes,
                     " bytes: expected at least 1, and a pool of at most ",
                     std::numeric_limits<int64_t>::max(), " bytes"));
  }
  std::vector<const TierRun*> by_offset;
  by_offset.reserve(runs.size());
  for (size_t r = 0; r < runs.size(); ++r) {
    const TierRun& run = runs[r];
    if (run.device == nullptr || run.bytes <= 0 || run.slot_offset < 0 ||
        run.slot_offset > slot_bytes - run.bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tier run ", r, " (device ", run.device == nullptr ? "null" : "set",
          ", bytes ", run.bytes, ", slot_offset ", run.slot_offset,
          "): expected a device pointer and bytes > 0 inside a slot of ",
          slot_bytes, " bytes"));
    }
    by_offset.push_back(&run);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TierRun* a, const TierRun* b) {
              return a->slot_offset < b->slot_offset;
            });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TierRun& prev = *by_offset[i - 1];
    if (prev.slot_offset + prev.bytes > by_offset[i]->slot_offset) {
      return absl::InvalidArgumentError(
          absl::StrCat("tier runs overlap in the slot: [", prev.slot_offset,
                       ", ", prev.slot_offset + prev.bytes,
                       ") and one at slot_offset ", by_offset[i]->slot_offset));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache
