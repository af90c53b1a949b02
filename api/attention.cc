// KVCacheManager::Attention (issue #20): decode attention over a layer's
// cache for a batch of sequences, through the kernels of kernels/attention_*
// (CUDA) and kernels/cpu_attention.* (CPU). The manager builds the batch's
// block tables, lengths and query offsets on the host, uploads them on the
// call's stream into one of two rotating buffer sets (so a call waits only
// for the call before the previous one), and launches; the split-KV scratch
// is allocated once by Create, sized for num_q_heads x 8 query tokens x
// kMaxAttentionSplits partial rows (larger batches get fewer splits, which
// they need less).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/manager_impl.h"
#include "api/tensor_checks.h"
#include "kernels/attention_params.h"
#include "kernels/attention_validation.h"

namespace kvcache {
namespace internal {

struct AttentionState {
  static constexpr int kSets = 2;
  struct Set {
    Buffer staging;  // int32: table [max_seqs, cols], lens [max_seqs],
    Buffer device;   // q_start [max_seqs + 1]; the same on the device.
    Event done;      // After the last kernel that read `device`.
  };
  Set sets[kSets];
  int next = 0;
  Buffer partial_o, partial_lse;  // CUDA only.
  int64_t partial_rows = 0;
};

void AttentionStateDeleter::operator()(AttentionState* state) const {
  delete state;
}

}  // namespace internal

absl::Status KVCacheManager::Impl::InitAttention() {
  std::unique_ptr<internal::AttentionState, internal::AttentionStateDeleter>
      state(new internal::AttentionState);
  const int64_t seqs = config_.max_sequences_per_step;
  const size_t bytes =
      static_cast<size_t>(seqs * table_cols_ + 2 * seqs + 1) * sizeof(int32_t);
  for (internal::AttentionState::Set& set : state->sets) {
    absl::StatusOr<Buffer> staging = device_->AllocateStaging(bytes);
    if (!staging.ok()) return staging.status();
    absl::StatusOr<Buffer> on_device = device_->Allocate(bytes);
    if (!on_device.ok()) return on_device.status();
    absl::StatusOr<Event> done = device_->CreateEvent();
    if (!done.ok()) return done.status();
    set.staging = *std::move(staging);
    set.device = *std::move(on_device);
    set.done = *std::move(done);
  }
  if (device_->kind() == DeviceKind::kCuda) {
    state->partial_rows = int64_t{config_.num_q_heads} *
                          kMaxAttentionQueryTokens * kMaxAttentionSplits;
    absl::StatusOr<Buffer> o = device_->Allocate(
        state->partial_rows * layout_.head_size_v * sizeof(float));
    if (!o.ok()) return o.status();
    absl::StatusOr<Buffer> lse =
        device_->Allocate(state->partial_rows * sizeof(float));
    if (!lse.ok()) return lse.status();
    state->partial_o = *std::move(o);
    state->partial_lse = *std::move(lse);
  }
  attention_ = std::move(state);
  return absl::OkStatus();
}

namespace {

// q [rows, Hq, D] and out [rows, Hq, Dv]: bf16/fp16, the same dtype, in the
// backend's memory.
template <class Impl>
absl::Status CheckQueryAndOutput(const Impl& m, const TensorView& q,
                                 const TensorView& out, int64_t rows) {
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q dtype ", DTypeName(q.dtype), " is not bfloat16 or float16"));
  }
  internal::ExpectedKV expected;
  expected.num_tokens = rows;
  expected.num_heads = m.config_.num_q_heads;
  expected.head_size = m.layout_.head_size;
  expected.dtype = q.dtype;
  expected.memory = m.memory_kind();
  expected.device = m.device_->ordinal();
  if (absl::Status s = internal::CheckKVTensor("q", q, expected); !s.ok()) {
    return s;
  }
  expected.head_size = m.layout_.head_size_v;
  return internal::CheckKVTensor("out", out, expected);
}

}  // namespace

absl::Status KVCacheManager::Attention(absl::Span<const SequenceId> sequences,
                                       int layer, const TensorView& q,
                                       const TensorView& out,
                                       const AttentionOptions& options,
                                       void* stream) {
  return internal::NoBadAlloc("Attention", [&]() -> absl::Status {
    Impl& m = *impl_;
    std::lock_guard<std::mutex> lock(m.mu_);
    if (m.attention_ == nullptr) {
      return absl::FailedPreconditionError(
          "attention needs config.num_q_heads > 0 at Create");
    }
    if (absl::Status s = m.CheckLayer(layer); !s.ok()) return s;
    const int32_t n = options.num_query_tokens_per_sequence;
    if (n < 1 || n > kMaxAttentionQueryTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_query_tokens_per_sequence ", n, " is not in [1, ",
                       kMaxAttentionQueryTokens, "]"));
    }
    if (!(options.softmax_scale > 0.0f) ||
        !std::isfinite(options.softmax_scale)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "softmax_scale ", options.softmax_scale, " is not finite and > 0"));
    }
    const int64_t num = static_cast<int64_t>(sequences.size());
    if (num < 1 || num > m.config_.max_sequences_per_step) {
      return absl::InvalidArgumentError(
          absl::StrCat("attention over ", num,
                       " sequences: expected 1 to max_sequences_per_step ",
                       m.config_.max_sequences_per_step));
    }
    if (absl::Status s = CheckQueryAndOutput(m, q, out, num * n); !s.ok()) {
      return s;
    }
    absl::StatusOr<HostBatchTable> batch = m.blocks_->BatchTable(sequences);
    if (!batch.ok()) return batch.status();
    if (batch->max_blocks > m.table_cols_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a sequence of this batch holds ", batch->max_blocks,
          " blocks, more than max_blocks_per_sequence ", m.table_cols_));
    }
    internal::AttentionState& st = *m.attention_;
    internal::AttentionState::Set& set = st.sets[st.next];
    const int64_t cols = m.table_cols_;
    const int64_t seqs = m.config_.max_sequences_per_step;
    AttentionParams p;
    p.cache = m.storage_->layer(layer);
    p.q = q.data;
    p.q_dtype = q.dtype;
    p.q_token_stride = q.strides[0];
    p.q_head_stride = q.strides[1];
    p.o = out.data;
    p.o_token_stride = out.strides[0];
    p.o_head_stride = out.strides[1];
    p.num_q_tokens = static_cast<int32_t>(num * n);
    p.num_q_heads = m.config_.num_q_heads;
    p.num_seqs = static_cast<int32_t>(num);
    const int32_t* device = set.device.as<int32_t>();
    p.block_table = device;
    p.block_table_stride = cols;
    p.seq_lens = device + seqs * cols;
    p.q_start = device + seqs * cols + seqs;
    p.max_query_tokens = n;
    p.max_seq_len =
        *std::max_element(batch->seq_lens.begin(), batch->seq_lens.end());
    p.softmax_scale = options.softmax_scale;
    p.soft_cap = options.soft_cap;
    p.window = options.window;
    p.workspace.partial_o = st.partial_o.as<float>();
    p.workspace.partial_lse = st.partial_lse.as<float>();
    p.workspace.partial_o_floats = st.partial_rows * m.layout_.head_size_v;
    p.workspace.partial_lse_floats = st.partial_rows;
    // Everything the kernel would refuse is refused before anything runs.
    if (absl::Status s = internal::ValidateAttention(p); !s.ok()) {
      return internal::Annotate(s, absl::StrCat("attention of layer ", layer));
    }
    // This set's staging memory may be rewritten once its last kernels ran.
    if (absl::Status s = m.device_->SynchronizeEvent(set.done); !s.ok()) {
      return s;
    }
    int32_t* staged = set.staging.as<int32_t>();
    std::fill(staged, staged + num * cols, 0);
    for (int64_t r = 0; r < num; ++r) {
      std::copy_n(batch->table.data() + r * batch->max_blocks,
                  batch->num_blocks[r], staged + r * cols);
    }
    int32_t* lens = staged + seqs * cols;
    int32_t* starts = lens + seqs;
    std::copy_n(batch->seq_lens.data(), num, lens);
    for (int64_t i = 0; i <= num; ++i) starts[i] = static_cast<int32_t>(i * n);
    for (absl::Status s :
         {m.device_->CopyToDeviceAsync(set.device.data(), staged,
                                       num * cols * sizeof(int32_t), stream),
          m.device_->CopyToDeviceAsync(set.device.as<int32_t>() + seqs * cols,
                                       lens, (2 * seqs + 1) * sizeof(int32_t),
                                       stream)}) {
      if (!s.ok()) return s;
    }
    if (absl::Status s = m.kernels_.Attention(p, stream); !s.ok()) {
      return internal::Annotate(s, absl::StrCat("attention of layer ", layer));
    }
    ++m.counters_.kernel_launches;
    st.next = (st.next + 1) % internal::AttentionState::kSets;
    return m.device_->RecordEvent(set.done, stream);
  });
}

}  // namespace kvcache
