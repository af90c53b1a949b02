// CheckTierCopier: a TierCopier (storage/tier_copier.h) of a given device
// against a byte-level model. A fake cache of `runs` regions (run r of block
// b at region r + b * bytes, the regions at chosen alignments) and a pool of
// slots holding the runs in a shuffled order, with or without gaps; then
// rounds of batches of random (block, slot) pairs on random lanes, each
// batch ordered after the other lanes' last (TierDeps), some delayed (CPU),
// waited for with WaitOn on the null stream, and the whole cache and the
// whole pool compared byte for byte with the model, which copies the same
// runs with memcpy in batch order (so a byte written outside a run, a run
// at the wrong place or a batch run out of order shows). Also: in_flight
// and in_flight_bytes are 0 once everything is waited for, an injected
// failure copies nothing and enqueues nothing, an empty batch is no batch.
//
// Shared by the CPU test and the CUDA test (both copiers run it). Uses
// gtest assertions. Thread-compatible.

#ifndef KVCACHE_TESTS_TIER_COPIER_CHECK_H_
#define KVCACHE_TESTS_TIER_COPIER_CHECK_H_

#include <cstdint>
#include <vector>

#include "storage/device.h"

namespace kvcache::testing {

struct TierCopierShape {
  const char* name = "";
  std::vector<int64_t> run_bytes;  // Bytes of each run of a block.
  // Per run, the region's base address mod 256 (0: 256-byte aligned).
  std::vector<int> misalign;
  bool gaps = false;  // Unused bytes between the runs in a slot.
  int32_t num_blocks = 0;
  int32_t num_slots = 0;
  int64_t min_pairs = 1;      // Pairs of one batch, at least
  int64_t max_pairs = 0;      // and at most.
  int batches_per_round = 0;  // Batches enqueued before a wait.
  int rounds = 0;
  // TierCopier::set_copy_blocks before the first batch (CUDA: 0 = the copy
  // engines); -1 = the copier's default.
  int copy_blocks = -1;
  // TierCopier::set_staging_blocks before the first batch; -1 = default.
  int64_t staging_blocks = -1;
  // Each batch's pairs in slot order (runs of neighbouring slots, which the
  // copy engines' path merges into one descriptor).
  bool sorted_slots = false;
};

// Shapes both tests run: "layers" (8 layers of an int8 cache with side
// scales, 16 KiB K and V runs: the vectorized, unrolled path), "ragged" (odd
// lengths, misaligned regions, gaps in the slot: the byte path) and
// "many_pairs" (batches of 8,500 to 9,000 small blocks: more pairs than a
// CUDA ring entry's first buffer holds).
std::vector<TierCopierShape> TierCopierShapes();

void CheckTierCopier(Device& device, const TierCopierShape& shape,
                     uint64_t seed);

// The seed of a run: KVCACHE_TEST_SEED if set, else random (CheckTierCopier
// prints it with any failure).
uint64_t TierCopierSeed();

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TIER_COPIER_CHECK_H_
