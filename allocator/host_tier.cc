#include "allocator/host_tier.h"

#include <cstring>
#include <random>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {

namespace {

// The filter's size: a power of two, at least `want` and at least 2 (an
// index is the top log2(size) bits of a 64-bit product).
size_t FilterSize(int32_t num_slots, int64_t want) {
  if (want <= 0) want = int64_t{16} * num_slots;
  size_t size = 2;
  while (size < static_cast<size_t>(want)) size *= 2;
  return size;
}

}  // namespace

HostTier::HostTier(int32_t num_slots, int32_t block_size,
                   int64_t filter_buckets)
    : num_slots_(num_slots),
      block_size_(block_size),
      table_(num_slots, std::random_device{}()),
      filter_(FilterSize(num_slots, filter_buckets), 0),
      filter_bits_((filter_.size() + 63) / 64, 0),
      filter_key_((static_cast<uint64_t>(std::random_device{}()) << 32 |
                   std::random_device{}()) |
                  1),
      filter_shift_(64 - __builtin_ctzll(filter_.size())),
      entries_(num_slots),
      tokens_(static_cast<size_t>(num_slots) * block_size),
      state_(num_slots, kFree),
      prev_(num_slots + 1, -1),
      next_(num_slots + 1, -1) {
  prev_[Head()] = next_[Head()] = Head();
  free_.reserve(num_slots);
  pinned_.reserve(num_slots);
  for (int32_t s = num_slots - 1; s >= 0; --s) free_.push_back(s);
}

bool HostTier::Matches(int32_t slot, uint64_t parent_id,
                       const TokenId* tokens) const {
  ABSL_ASSERT(state_[slot] == kStored);
  return entries_[slot].parent_id == parent_id &&
         std::memcmp(this->tokens(slot), tokens,
                     static_cast<size_t>(block_size_) * sizeof(TokenId)) == 0;
}

int32_t HostTier::Insert(const TierEntry& entry, const TokenId* tokens) {
  ABSL_ASSERT(!free_.empty());
  const int32_t s = free_.back();
  free_.pop_back();
  Store(s, entry, tokens);
  return s;
}

int32_t HostTier::ReserveSlot() {
  ABSL_ASSERT(!free_.empty());
  const int32_t s = free_.back();
  free_.pop_back();
  state_[s] = kReserved;
  ++num_reserved_;
  return s;
}

void HostTier::Unreserve(int32_t s) {
  ABSL_ASSERT(state_[s] == kReserved);
  state_[s] = kFree;
  --num_reserved_;
  free_.push_back(s);
}

void HostTier::InsertReserved(int32_t s, const TierEntry& entry,
                              const TokenId* tokens) {
  ABSL_ASSERT(state_[s] == kReserved);
  --num_reserved_;
  Store(s, entry, tokens);
}

void HostTier::Store(int32_t s, const TierEntry& entry, const TokenId* tokens) {
  ABSL_ASSERT(table_.Find(entry.hash) < 0);
  entries_[s] = entry;
  std::memcpy(&tokens_[static_cast<size_t>(s) * block_size_], tokens,
              static_cast<size_t>(block_size_) * sizeof(TokenId));
  state_[s] = kStored;
  const int32_t last = prev_[Head()];
  prev_[s] = last;
  next_[s] = Head();
  next_[last] = s;
  prev_[Head()] = s;
  table_.FindOrInsert(entry.hash, s);
  FilterAdd(FilterIndex(entry.hash));
  ++num_stored_;
}

int32_t HostTier::Oldest() const {
  const int32_t s = next_[Head()];
  return s == Head() ? -1 : s;
}

void HostTier::Unlink(int32_t s) {
  ABSL_ASSERT(state_[s] == kStored);
  next_[prev_[s]] = next_[s];
  prev_[next_[s]] = prev_[s];
  prev_[s] = next_[s] = -1;
  const bool erased = table_.Erase(entries_[s].hash);
  ABSL_ASSERT(erased);
  (void)erased;
  FilterRemove(FilterIndex(entries_[s].hash));
  --num_stored_;
}

void HostTier::FilterAdd(size_t b) {
  uint8_t& count = filter_[b];
  if (count == 0) filter_bits_[b >> 6] |= uint64_t{1} << (b & 63);
  if (count != kFilterStuck) ++count;
}

void HostTier::FilterRemove(size_t b) {
  uint8_t& count = filter_[b];
  ABSL_ASSERT(count > 0);
  if (count == kFilterStuck) return;
  if (--count == 0) filter_bits_[b >> 6] &= ~(uint64_t{1} << (b & 63));
}

TierEntry HostTier::Drop(int32_t s) {
  Unlink(s);
  state_[s] = kFree;
  free_.push_back(s);
  return entries_[s];
}

TierEntry HostTier::Take(int32_t s) {
  Unlink(s);
  state_[s] = kPinned;
  pinned_.push_back(s);
  return entries_[s];
}

void HostTier::KeepPinned(int32_t s) {
  ABSL_ASSERT(state_[s] == kPinned);
  state_[s] = kReserved;
  ++num_reserved_;
}

TierEntry HostTier::Keep(int32_t s) {
  Unlink(s);
  state_[s] = kReserved;
  ++num_reserved_;
  return entries_[s];
}

void HostTier::ReleasePinned() {
  for (int32_t s : pinned_) {
    if (state_[s] == kReserved) continue;  // Kept (KeepPinned).
    ABSL_ASSERT(state_[s] == kPinned);
    state_[s] = kFree;
    free_.push_back(s);
  }
  pinned_.clear();
}

absl::Status HostTier::Validate() const {
  int32_t counts[4] = {0, 0, 0, 0};
  for (int32_t s = 0; s < num_slots_; ++s) ++counts[state_[s]];
  if (counts[kFree] != num_free() || counts[kStored] != num_stored_ ||
      counts[kPinned] != num_pinned() || counts[kReserved] != num_reserved_) {
    return absl::InternalError(absl::StrCat(
        "host tier: ", counts[kFree], " free, ", counts[kStored], " stored, ",
        counts[kPinned], " pinned, ", counts[kReserved],
        " reserved slots, but lists say ", num_free(), ", ", num_stored_, ", ",
        num_pinned(), ", ", num_reserved_));
  }
  for (int32_t s : free_) {
    if (state_[s] != kFree)
      return absl::InternalError(
          absl::StrCat("host slot ", s, " is on the free stack but not free"));
  }
  int32_t listed = 0;
  int32_t prev = Head();
  for (int32_t s = next_[Head()]; s != Head(); s = next_[s]) {
    if (s < 0 || s >= num_slots_ || state_[s] != kStored || prev_[s] != prev ||
        ++listed > num_stored_) {
      return absl::InternalError(
          absl::StrCat("host tier LRU list is broken at slot ", s));
    }
    if (table_.Find(entries_[s].hash) != s) {
      return absl::InternalError(
          absl::StrCat("host slot ", s, " is not indexed under its hash"));
    }
    prev = s;
  }
  if (listed != num_stored_ || table_.size() != static_cast<size_t>(listed)) {
    return absl::InternalError(
        absl::StrCat("host tier: ", listed, " slots listed, ", num_stored_,
                     " counted, ", table_.size(), " indexed"));
  }
  // Each filter counter: the stored hashes that map to it (or stuck).
  std::vector<int32_t> expected(filter_.size(), 0);
  for (int32_t s = next_[Head()]; s != Head(); s = next_[s]) {
    ++expected[FilterIndex(entries_[s].hash)];
  }
  for (size_t b = 0; b < filter_.size(); ++b) {
    if (filter_[b] != kFilterStuck && filter_[b] != expected[b]) {
      return absl::InternalError(
          absl::StrCat("host tier filter bucket ", b, " counts ", filter_[b],
                       " hashes, ", expected[b], " are stored there"));
    }
    if (FilterBit(b) != (filter_[b] != 0)) {
      return absl::InternalError(
          absl::StrCat("host tier filter bucket ", b, " counts ", filter_[b],
                       " hashes but its bit is ", FilterBit(b) ? 1 : 0));
    }
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvcache
