// AttentionBuffers are the fixed buffers of KVCacheManager::Attention,
// allocated once at Create when config.num_q_heads > 0:
//
//   two rotating sets   int32 block table [max_sequences, cols], seq_lens
//                       [max_sequences], q_start [max_sequences + 1]: staging
//                       and device, so a call waits only for the call before
//                       the previous one
//   split-KV scratch    partial o and log-sum-exp for num_q_heads x 8 query
//                       tokens x kMaxAttentionSplits rows (CUDA only; larger
//                       batches get fewer splits, which they need less)
//
// Thread-compatible: the manager's mutex guards it. Internal to api/.

#ifndef KVCACHE_API_ATTENTION_BUFFERS_H_
#define KVCACHE_API_ATTENTION_BUFFERS_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "allocator/block_manager.h"
#include "kernels/attention_params.h"
#include "storage/buffer.h"
#include "storage/device.h"

namespace kvcache::internal {

class AttentionBuffers {
 public:
  // REQUIRES: `device` outlives the buffers.
  static absl::StatusOr<std::unique_ptr<AttentionBuffers>> Create(
      Device* device, int64_t max_sequences, int64_t cols, int32_t num_q_heads,
      int64_t head_size_v);

  int64_t cols() const { return cols_; }

  // Points `p`'s block_table, seq_lens, q_start and workspace at the next
  // set and the scratch.
  void Bind(AttentionParams& p) const;
  // Writes the batch's tables, lengths and query starts (n query tokens per
  // sequence) into the next set and uploads them on `stream`.
  // REQUIRES: batch.max_blocks <= cols().
  absl::Status Upload(const HostBatchTable& batch, int32_t n, void* stream);
  // After the kernels that read the set Upload filled were enqueued.
  absl::Status Finish(void* stream);

 private:
  static constexpr int kSets = 2;
  struct Set {
    Buffer staging;
    Buffer device;
    Event done;  // After the last kernel that read `device`.
  };
  AttentionBuffers(Device* device, int64_t max_sequences, int64_t cols)
      : device_(device), max_sequences_(max_sequences), cols_(cols) {}

  Device* const device_;
  const int64_t max_sequences_;
  const int64_t cols_;
  Set sets_[kSets];
  int next_ = 0;
  Buffer partial_o_, partial_lse_;  // CUDA only.
  int64_t partial_rows_ = 0;
  int64_t head_size_v_ = 0;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_ATTENTION_BUFFERS_H_
