// KVCacheManager::Attention: decode attention over a layer's cache for a batch
// of sequences, through the backend's attention kernel (kernels/attention_*
// on CUDA, kernels/cpu_attention.* on the CPU). The manager builds the batch's
// block tables, lengths and query offsets on the host and uploads them into
// AttentionBuffers (api/attention_buffers.h) on the call's stream.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/manager_impl.h"
#include "api/no_bad_alloc.h"
#include "api/tensor_checks.h"
#include "core/status_macros.h"
#include "kernels/attention_params.h"
#include "kernels/attention_validation.h"

namespace kvcache {

absl::Status KVCacheManager::Attention(absl::Span<const SequenceId> sequences,
                                       int layer, const TensorView& q,
                                       const TensorView& out,
                                       const AttentionOptions& options,
                                       void* stream) {
  return internal::NoBadAlloc("Attention", [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(impl_->mu());
    return impl_->Attention(sequences, layer, q, out, options, stream);
  });
}

absl::Status KVCacheManager::Impl::CheckAttentionOptions(
    const AttentionOptions& options) const {
  if (attention_ == nullptr) {
    return absl::FailedPreconditionError(
        "attention needs config.num_q_heads > 0 at Create");
  }
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
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Attention(
    absl::Span<const SequenceId> sequences, int layer, const TensorView& q,
    const TensorView& out, const AttentionOptions& options, void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckAttentionOptions(options));
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  const int32_t n = options.num_query_tokens_per_sequence;
  const int64_t num = static_cast<int64_t>(sequences.size());
  if (num < 1 || num > config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention over ", num,
                     " sequences: expected 1 to max_sequences_per_step ",
                     config_.max_sequences_per_step));
  }
  // q [rows, Hq, D] and out [rows, Hq, Dv]: bf16 or fp16, the same dtype, in
  // the backend's memory.
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q dtype ", DTypeName(q.dtype), " is not bfloat16 or float16"));
  }
  const CacheLayout& layout = backend_->layout();
  internal::ExpectedKV expected;
  expected.num_tokens = num * n;
  expected.num_heads = config_.num_q_heads;
  expected.head_size = layout.head_size;
  expected.dtype = q.dtype;
  expected.memory = backend_->memory_kind();
  expected.device = backend_->ordinal();
  KVCACHE_RETURN_IF_ERROR(internal::CheckKVTensor("q", q, expected));
  expected.head_size = layout.head_size_v;
  KVCACHE_RETURN_IF_ERROR(internal::CheckKVTensor("out", out, expected));
  KVCACHE_ASSIGN_OR_RETURN(const HostBatchTable batch, BatchTable(sequences));
  AttentionParams p;
  p.cache = backend_->layer(layer);
  p.q = q.data;
  p.q_dtype = q.dtype;
  p.q_token_stride = q.strides[0];
  p.q_head_stride = q.strides[1];
  p.o = out.data;
  p.o_token_stride = out.strides[0];
  p.o_head_stride = out.strides[1];
  p.num_q_tokens = static_cast<int32_t>(num * n);
  p.num_q_heads = config_.num_q_heads;
  p.num_seqs = static_cast<int32_t>(num);
  p.max_query_tokens = n;
  p.max_seq_len =
      *std::max_element(batch.seq_lens.begin(), batch.seq_lens.end());
  p.softmax_scale = options.softmax_scale;
  p.soft_cap = options.soft_cap;
  p.window = options.window;
  attention_->Bind(p);
  const std::string context = absl::StrCat("attention of layer ", layer);
  // Everything the kernel would refuse is refused before anything runs.
  KVCACHE_RETURN_IF_ERROR(
      internal::Annotate(internal::ValidateAttention(p), context));
  KVCACHE_RETURN_IF_ERROR(attention_->Upload(batch, n, stream));
  KVCACHE_RETURN_IF_ERROR(
      OrderAfterTierCopies(stream, OnboardWaitFor(sequences)));
  KVCACHE_RETURN_IF_ERROR(
      internal::Annotate(backend_->Attention(p, stream), context));
  ++counters_.kernel_launches;
  return attention_->Finish(stream);
}

}  // namespace kvcache
