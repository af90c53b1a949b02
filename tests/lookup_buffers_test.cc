// LookupBuffers (api/lookup_buffers.h) on the CPU device: UploadBatchTable
// copies a random HostBatchTable into the fixed device buffer - row-major with
// row_stride = cols, each row's blocks then zeros (even over stale data),
// seq_lens after max_sequences * cols entries - and returns the same pointers
// on every call; the two gather ranges alternate and UploadGatherRange writes exactly
// the given block ids. KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/lookup_buffers.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/block_manager.h"
#include "api/block_table_view.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/test_seed.h"

namespace kvcache::internal {
namespace {

constexpr int32_t kStale = 0x7EADBEEF;

class LookupBuffersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = kvcache::testing::TestSeed();
    rng_.seed(seed);
    seed_trace_ = std::make_unique<::testing::ScopedTrace>(
        __FILE__, __LINE__,
        absl::StrCat("seed ", seed, " (rerun with KVCACHE_TEST_SEED=", seed,
                     ")"));
    max_sequences_ = Rand(1, 16);
    cols_ = Rand(1, 24);
    absl::StatusOr<std::unique_ptr<LookupBuffers>> b =
        LookupBuffers::Create(device_.get(), max_sequences_, cols_);
    ASSERT_TRUE(b.ok()) << b.status();
    lookups_ = *std::move(b);
    ASSERT_EQ(lookups_->cols(), cols_);
  }

  int64_t Rand(int64_t lo, int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }

  // A batch as BlockManager::BatchTable makes it: rows of max_blocks entries,
  // unused entries 0, block ids >= 1 here so that padding shows.
  HostBatchTable RandomBatch() {
    HostBatchTable batch;
    batch.num_sequences = static_cast<int32_t>(Rand(1, max_sequences_));
    for (int32_t r = 0; r < batch.num_sequences; ++r) {
      batch.num_blocks.push_back(static_cast<int32_t>(Rand(0, cols_)));
      batch.seq_lens.push_back(static_cast<int32_t>(Rand(0, INT32_MAX)));
    }
    batch.max_blocks =
        *std::max_element(batch.num_blocks.begin(), batch.num_blocks.end());
    batch.table.assign(
        static_cast<size_t>(batch.num_sequences) * batch.max_blocks, 0);
    for (int32_t r = 0; r < batch.num_sequences; ++r) {
      for (int32_t c = 0; c < batch.num_blocks[r]; ++c) {
        batch.table[r * batch.max_blocks + c] =
            static_cast<int32_t>(Rand(1, INT32_MAX));
      }
    }
    return batch;
  }

  // The whole device table (max_sequences x cols, then max_sequences lengths).
  std::vector<int32_t> ReadTable(const int32_t* base) {
    std::vector<int32_t> words(max_sequences_ * (cols_ + 1));
    EXPECT_TRUE(
        device_->CopyToHost(words.data(), base, words.size() * sizeof(int32_t))
            .ok());
    return words;
  }

  std::mt19937_64 rng_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  std::unique_ptr<Device> device_ = CreateCpuDevice();
  int64_t max_sequences_ = 0;
  int64_t cols_ = 0;
  std::unique_ptr<LookupBuffers> lookups_;
};

TEST_F(LookupBuffersTest, BatchTableIsRowMajorZeroPaddedWithLengthsAfter) {
  const int32_t* table = nullptr;
  const int32_t* lens = nullptr;
  for (int round = 0; round < 50; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const HostBatchTable batch = RandomBatch();
    if (table != nullptr) {
      // Stale data everywhere, so every entry of the new rows, padding
      // included, must be written by this upload.
      int32_t* words = const_cast<int32_t*>(table);
      std::fill(words, words + max_sequences_ * (cols_ + 1), kStale);
    }
    absl::StatusOr<BlockTableView> view =
        lookups_->UploadBatchTable(batch, /*stream=*/nullptr);
    ASSERT_TRUE(view.ok()) << view.status();
    if (table == nullptr) {
      table = view->block_table;
      lens = view->seq_lens;
    }
    // The same buffers on every call (CUDA-graph capturable).
    ASSERT_EQ(view->block_table, table);
    ASSERT_EQ(view->seq_lens, lens);
    ASSERT_EQ(view->seq_lens, view->block_table + max_sequences_ * cols_);
    EXPECT_EQ(view->num_sequences, batch.num_sequences);
    EXPECT_EQ(view->max_blocks, batch.max_blocks);
    EXPECT_EQ(view->row_stride, cols_);

    const std::vector<int32_t> words = ReadTable(view->block_table);
    for (int32_t r = 0; r < batch.num_sequences; ++r) {
      for (int64_t c = 0; c < cols_; ++c) {
        const int32_t expected =
            c < batch.num_blocks[r] ? batch.table[r * batch.max_blocks + c] : 0;
        ASSERT_EQ(words[r * cols_ + c], expected)
            << "row " << r << " column " << c << " (" << batch.num_blocks[r]
            << " blocks, " << cols_ << " columns)";
      }
      ASSERT_EQ(words[max_sequences_ * cols_ + r], batch.seq_lens[r])
          << "seq_lens[" << r << "]";
    }
  }
}

TEST_F(LookupBuffersTest, FirstUploadZeroPadsAFreshBuffer) {
  // One row of one block into a fresh buffer: every other column of the row
  // reads 0.
  HostBatchTable batch;
  batch.num_sequences = 1;
  batch.max_blocks = 1;
  batch.table = {static_cast<int32_t>(Rand(1, INT32_MAX))};
  batch.num_blocks = {1};
  batch.seq_lens = {static_cast<int32_t>(Rand(1, INT32_MAX))};
  absl::StatusOr<BlockTableView> view =
      lookups_->UploadBatchTable(batch, nullptr);
  ASSERT_TRUE(view.ok()) << view.status();
  const std::vector<int32_t> words = ReadTable(view->block_table);
  EXPECT_EQ(words[0], batch.table[0]);
  for (int64_t c = 1; c < cols_; ++c) EXPECT_EQ(words[c], 0) << "column " << c;
  EXPECT_EQ(view->seq_lens[0], batch.seq_lens[0]);
}

TEST_F(LookupBuffersTest, FullBatchFillsEveryRow) {
  HostBatchTable batch;
  batch.num_sequences = static_cast<int32_t>(max_sequences_);
  batch.max_blocks = static_cast<int32_t>(cols_);
  for (int64_t r = 0; r < max_sequences_; ++r) {
    batch.num_blocks.push_back(static_cast<int32_t>(cols_));
    batch.seq_lens.push_back(static_cast<int32_t>(Rand(0, INT32_MAX)));
    for (int64_t c = 0; c < cols_; ++c) {
      batch.table.push_back(static_cast<int32_t>(Rand(0, INT32_MAX)));
    }
  }
  absl::StatusOr<BlockTableView> view =
      lookups_->UploadBatchTable(batch, nullptr);
  ASSERT_TRUE(view.ok()) << view.status();
  std::vector<int32_t> expected = batch.table;
  expected.insert(expected.end(), batch.seq_lens.begin(), batch.seq_lens.end());
  EXPECT_EQ(ReadTable(view->block_table), expected);
}

TEST_F(LookupBuffersTest, GatherRangesAlternateAndHoldTheGivenBlocks) {
  ASSERT_GE(lookups_->gather_capacity(), cols_);
  const int32_t* previous = nullptr;
  const int32_t* before_previous = nullptr;
  for (int round = 0; round < 50; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    std::vector<BlockId> blocks(Rand(1, lookups_->gather_capacity()));
    for (BlockId& b : blocks) b = static_cast<BlockId>(Rand(0, INT32_MAX));
    absl::StatusOr<const int32_t*> range =
        lookups_->UploadGatherRange(blocks, /*stream=*/nullptr);
    ASSERT_TRUE(range.ok()) << range.status();
    ASSERT_TRUE(lookups_->GatherDone(nullptr).ok());
    // Two fixed ranges used in turn.
    ASSERT_NE(*range, previous);
    if (round >= 2) {
      ASSERT_EQ(*range, before_previous);
    }
    before_previous = previous;
    previous = *range;
    std::vector<int32_t> got(blocks.size());
    ASSERT_TRUE(
        device_->CopyToHost(got.data(), *range, got.size() * sizeof(int32_t))
            .ok());
    ASSERT_EQ(got, blocks);
  }
  // The gather ranges are their own buffers: a batch table upload leaves them
  // alone.
  std::vector<BlockId> blocks(cols_);
  for (BlockId& b : blocks) b = static_cast<BlockId>(Rand(0, INT32_MAX));
  absl::StatusOr<const int32_t*> range =
      lookups_->UploadGatherRange(blocks, nullptr);
  ASSERT_TRUE(range.ok());
  ASSERT_TRUE(lookups_->UploadBatchTable(RandomBatch(), nullptr).ok());
  EXPECT_EQ(std::vector<int32_t>(*range, *range + cols_), blocks);
}

}  // namespace
}  // namespace kvcache::internal
