#include "api/attention_buffers.h"

#include <algorithm>
#include <utility>

#include "api/lookup_buffers.h"
#include "core/status_macros.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<AttentionBuffers>> AttentionBuffers::Create(
    Device* device, int64_t max_sequences, int64_t cols, int32_t num_q_heads,
    int64_t head_size_v) {
  std::unique_ptr<AttentionBuffers> b(
      new AttentionBuffers(device, max_sequences, cols));
  const size_t bytes =
      static_cast<size_t>(max_sequences * cols + 2 * max_sequences + 1) *
      sizeof(int32_t);
  for (Set& set : b->sets_) {
    KVCACHE_ASSIGN_OR_RETURN(set.staging, device->AllocateStaging(bytes));
    KVCACHE_ASSIGN_OR_RETURN(set.device, device->Allocate(bytes));
    KVCACHE_ASSIGN_OR_RETURN(set.done, device->CreateEvent());
  }
  b->head_size_v_ = head_size_v;
  if (device->kind() == DeviceKind::kCuda) {
    b->partial_rows_ =
        int64_t{num_q_heads} * kMaxAttentionQueryTokens * kMaxAttentionSplits;
    KVCACHE_ASSIGN_OR_RETURN(
        b->partial_o_,
        device->Allocate(b->partial_rows_ * head_size_v * sizeof(float)));
    KVCACHE_ASSIGN_OR_RETURN(
        b->partial_lse_, device->Allocate(b->partial_rows_ * sizeof(float)));
  }
  return b;
}

void AttentionBuffers::Bind(AttentionParams& p) const {
  const int32_t* on_device = sets_[next_].device.as<int32_t>();
  p.block_table = on_device;
  p.block_table_stride = cols_;
  p.seq_lens = on_device + max_sequences_ * cols_;
  p.q_start = p.seq_lens + max_sequences_;
  p.workspace.partial_o = partial_o_.as<float>();
  p.workspace.partial_lse = partial_lse_.as<float>();
  p.workspace.partial_o_floats = partial_rows_ * head_size_v_;
  p.workspace.partial_lse_floats = partial_rows_;
}

absl::Status AttentionBuffers::Upload(const HostBatchTable& batch, int32_t n,
                                      void* stream) {
  Set& set = sets_[next_];
  // This set's staging memory may be rewritten once its last kernels ran.
  KVCACHE_RETURN_IF_ERROR(device_->SynchronizeEvent(set.done));
  const int64_t num = batch.num_sequences;
  int32_t* staged = set.staging.as<int32_t>();
  int32_t* lens = StageBatchTable(batch, max_sequences_, cols_, staged);
  int32_t* starts = lens + max_sequences_;
  for (int64_t i = 0; i <= num; ++i) starts[i] = static_cast<int32_t>(i * n);
  KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
      set.device.data(), staged, num * cols_ * sizeof(int32_t), stream));
  KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
      set.device.as<int32_t>() + max_sequences_ * cols_, lens,
      (2 * max_sequences_ + 1) * sizeof(int32_t), stream));
  return absl::OkStatus();
}

absl::Status AttentionBuffers::Finish(void* stream) {
  const int used = next_;
  next_ = (next_ + 1) % kSets;
  return device_->RecordEvent(sets_[used].done, stream);
}

}  // namespace kvcache::internal
