// KVCacheManager::Impl: the state behind a KVCacheManager (device, cache
// storage, block manager, step buffers, plans in flight, counters) and the
// operations that touch more than one of them. Internal to api/. Guarded by
// mu_: every member function here REQUIRES the caller to hold it, except Init,
// which runs before the manager is shared.

#ifndef KVCACHE_API_MANAGER_IMPL_H_
#define KVCACHE_API_MANAGER_IMPL_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/block_manager.h"
#include "api/kv_cache_manager.h"
#include "api/no_bad_alloc.h"
#include "api/step_buffers.h"
#include "kernels/attention_params.h"
#include "kernels/kernel_params.h"
#include "kernels/thread_pool.h"
#include "storage/cache_storage.h"
#include "storage/device.h"

namespace kvcache {
namespace internal {

// Chooses the CPU or CUDA implementation of each kernel. The CPU backend owns
// the thread pool its kernels split large calls over (cpu_threads threads, 0 =
// the machine's hardware concurrency; workers that cannot be started are
// dropped, see kernels/thread_pool.h).
class Kernels {
 public:
  Kernels(DeviceKind kind, int cpu_threads);
  absl::Status QuantizeWrite(const QuantizeWriteParams& p, void* stream) const;
  absl::Status Gather(const GatherParams& p, void* stream) const;
  absl::Status BlockCopy(const BlockCopyParams& p, void* stream) const;
  absl::Status Attention(const AttentionParams& p, void* stream) const;

 private:
  bool cuda_;
  std::unique_ptr<ThreadPool> pool_;  // CPU backend only.
};

// KVCacheManager::Attention's buffers (api/attention.cc), made by Init only
// when config.num_q_heads > 0.
struct AttentionState;
struct AttentionStateDeleter {
  void operator()(AttentionState* state) const;
};

// Prefixes a status's message with `context`.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

}  // namespace internal

class KVCacheManager::Impl {
 public:
  struct PlanState {
    int slot = 0;
    int64_t num_tokens = 0;
    std::vector<SequenceId> sequences;
    std::vector<int64_t> appended;  // Per layer.
    // Copy-on-write copies Reserve ran (in every layer) before it returned.
    int64_t num_copies = 0;
  };

  Impl(const KVCacheConfig& config, std::unique_ptr<Device> device)
      : config_(config),
        device_(std::move(device)),
        kernels_(device_->kind(), config.cpu_threads) {}

  absl::Status Init();
  // Makes attention_ (api/attention.cc). REQUIRES: mu_ held, blocks_ made.
  absl::Status InitAttention() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The pool size: config_.num_blocks, or what the memory budget (or fraction
  // of free memory) holds of blocks of `block_bytes` (all layers).
  absl::StatusOr<int64_t> NumBlocks(int64_t block_bytes) const;

  KVCacheConfig config_;
  std::unique_ptr<Device> device_;
  internal::Kernels kernels_;
  CacheLayout layout_;
  int64_t table_cols_ = 0;
  std::unique_ptr<CacheStorage> storage_;

  mutable std::mutex mu_;
  std::unique_ptr<BlockManager> blocks_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<internal::StepBuffers> steps_ ABSL_GUARDED_BY(mu_);
  // Node-based: Reserve makes the node before the allocator changes and then
  // inserts it without allocating (see Reserve).
  using PlanMap = std::unordered_map<uint64_t, PlanState>;
  PlanMap plans_ ABSL_GUARDED_BY(mu_);
  // Batch block table: int32 [max_sequences, table_cols_] then int32 seq_lens
  // [max_sequences].
  Buffer table_staging_ ABSL_GUARDED_BY(mu_);
  Buffer table_device_ ABSL_GUARDED_BY(mu_);
  Event table_uploaded_ ABSL_GUARDED_BY(mu_);
  // One sequence's block table for Gather.
  Buffer gather_staging_ ABSL_GUARDED_BY(mu_);
  Buffer gather_device_ ABSL_GUARDED_BY(mu_);
  MetricsSnapshot counters_ ABSL_GUARDED_BY(mu_);
  // Attention (api/attention.cc): block tables, lengths and split-KV scratch.
  std::unique_ptr<internal::AttentionState, internal::AttentionStateDeleter>
      attention_ ABSL_GUARDED_BY(mu_);

  MemoryKind memory_kind() const {
    return device_->kind() == DeviceKind::kCuda ? MemoryKind::kCuda
                                                : MemoryKind::kHost;
  }
  absl::Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= config_.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layer ", layer, " out of range [0, ", config_.num_layers, ")"));
    }
    return absl::OkStatus();
  }
  // The api's plan state against the allocator's (see KVCacheManager::
  // Validate): each plan owns one busy step slot, holds at most its tokens in
  // every layer, and its live sequences are pending in it.
  absl::Status ValidatePlans() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckBatch(absl::Span<const ReserveRequest> batch) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<PlanState*> FindPlan(uint64_t plan_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleasePlan(uint64_t plan_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs the copy-on-write copies uploaded into step slot `slot` in every
  // layer (data and scales) on `stream`, after validating all of them. Called
  // by Reserve, so that no block table ever names a block before its copy.
  absl::Status CopyOnWrite(int slot, int64_t num_copies, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Append(uint64_t plan_id, int layer, const TensorView& key,
                      const TensorView& value, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
};

}  // namespace kvcache

#endif  // KVCACHE_API_MANAGER_IMPL_H_
