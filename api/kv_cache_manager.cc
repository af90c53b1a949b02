#include "api/kv_cache_manager.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager_test_peer.h"
#include "api/manager_impl.h"
#include "api/step_buffers.h"
#include "api/tensor_checks.h"
#include "dlpack/dlpack.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"
#include "kernels/kernel_validation.h"
#include "spdlog/spdlog.h"
#include "storage/cache_storage.h"
#include "storage/device.h"

namespace kvcache {

using internal::Annotate;

KVCacheManager::KVCacheManager(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
KVCacheManager::~KVCacheManager() = default;

absl::StatusOr<std::unique_ptr<KVCacheManager>> KVCacheManager::Create(
    const KVCacheConfig& config) {
  return internal::NoBadAlloc(
      "Create", [&]() -> absl::StatusOr<std::unique_ptr<KVCacheManager>> {
        if (absl::Status s = ValidateConfig(config); !s.ok()) return s;
        std::unique_ptr<Device> device;
        if (config.backend == Backend::kCuda) {
          absl::StatusOr<std::unique_ptr<Device>> cuda =
              CreateCudaDevice(config.device);
          if (!cuda.ok()) return cuda.status();
          device = *std::move(cuda);
        } else {
          device = CreateCpuDevice();
        }
        return KVCacheManagerTestPeer::CreateWithDevice(config,
                                                        std::move(device));
      });
}

absl::StatusOr<std::unique_ptr<KVCacheManager>>
KVCacheManagerTestPeer::CreateWithDevice(const KVCacheConfig& config,
                                         std::unique_ptr<Device> device) {
  return internal::NoBadAlloc(
      "CreateWithDevice",
      [&]() -> absl::StatusOr<std::unique_ptr<KVCacheManager>> {
        if (absl::Status s = ValidateConfig(config); !s.ok()) return s;
        auto impl =
            std::make_unique<KVCacheManager::Impl>(config, std::move(device));
        if (absl::Status s = impl->Init(); !s.ok()) return s;
        return std::unique_ptr<KVCacheManager>(
            new KVCacheManager(std::move(impl)));
      });
}

absl::StatusOr<int64_t> KVCacheManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  return internal::NoBadAlloc("AddSequence", [&]() -> absl::StatusOr<int64_t> {
    // Lengths reach the engine as int32 (BatchBlockTable's seq_lens).
    if (prompt.size() > static_cast<size_t>(INT32_MAX)) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt of ", prompt.size(), " tokens exceeds ",
                       INT32_MAX, " tokens"));
    }
    std::lock_guard<std::mutex> lock(impl_->mu_);
    return impl_->blocks_->AddSequence(id, prompt, extra);
  });
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Reserve(
    absl::Span<const ReserveRequest> batch, void* stream) {
  return internal::NoBadAlloc("Reserve", [&]() -> absl::StatusOr<StepPlanInfo> {
    Impl& m = *impl_;
    std::lock_guard<std::mutex> lock(m.mu_);
    if (absl::Status s = m.CheckBatch(batch); !s.ok()) return s;
    const int slot = m.steps_->FindFree();
    if (slot < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(m.config_.max_inflight_plans,
                       " plans are in flight (max_inflight_plans): commit or "
                       "abort one first"));
    }
    // Allocate what the plan's bookkeeping needs before the allocator
    // changes, so that running out of memory (std::bad_alloc) cannot leave a
    // half-made plan behind.
    Impl::PlanMap staged;
    Impl::PlanState& state = staged[0];
    state.sequences.reserve(batch.size());
    state.appended.assign(m.config_.num_layers, 0);
    m.plans_.reserve(m.plans_.size() + 1);  // The insert below cannot rehash.
    absl::StatusOr<StepPlan> plan = m.blocks_->Reserve(batch);
    if (!plan.ok()) {
      if (absl::IsResourceExhausted(plan.status()))
        ++m.counters_.reserve_failures;
      return plan.status();
    }
    // Copy-on-write runs here, in every layer, so that no block table names
    // a copy before it holds the sequence's data (issue #12 item 5); if it
    // cannot, the plan is undone.
    absl::Status uploaded;
    try {  // The CPU kernels may allocate (std::bad_alloc).
      uploaded =
          m.steps_->Upload(slot, plan->slot_mapping, plan->copies, stream);
      if (uploaded.ok()) {
        uploaded = m.CopyOnWrite(
            slot, static_cast<int64_t>(plan->copies.size()), stream);
      }
    } catch (...) {
      m.blocks_->Abort(plan->id).IgnoreError();
      throw;
    }
    if (!uploaded.ok()) {
      m.blocks_->Abort(plan->id).IgnoreError();
      return uploaded;
    }
    // From here on nothing allocates.
    state.slot = slot;
    state.num_tokens = static_cast<int64_t>(plan->slot_mapping.size());
    state.sequences.assign(plan->sequences.begin(), plan->sequences.end());
    state.num_copies = static_cast<int64_t>(plan->copies.size());
    m.steps_->slot(slot).busy = true;
    m.counters_.block_copies += state.num_copies;
    if (state.num_copies > 0)
      m.counters_.kernel_launches += m.config_.num_layers;
    StepPlanInfo info;
    info.id = plan->id;
    info.num_tokens = state.num_tokens;
    info.slot_mapping = m.steps_->device_slots(slot);
    info.host_slot_mapping = std::move(plan->slot_mapping);
    info.num_block_copies = state.num_copies;
    Impl::PlanMap::node_type node = staged.extract(staged.begin());
    node.key() = plan->id;
    m.plans_.insert(std::move(node));
    return info;
  });
}

absl::Status KVCacheManager::Append(uint64_t plan_id, int layer,
                                    const TensorView& key,
                                    const TensorView& value, void* stream) {
  return internal::NoBadAlloc("Append", [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    return impl_->Append(plan_id, layer, key, value, stream);
  });
}

absl::Status KVCacheManager::Append(uint64_t plan_id, int layer,
                                    const DLTensor& key, const DLTensor& value,
                                    void* stream) {
  return internal::NoBadAlloc("Append", [&]() -> absl::Status {
    absl::StatusOr<TensorView> k = FromDLPack(key);
    if (!k.ok()) return Annotate(k.status(), "key");
    absl::StatusOr<TensorView> v = FromDLPack(value);
    if (!v.ok()) return Annotate(v.status(), "value");
    return Append(plan_id, layer, *k, *v, stream);
  });
}

absl::Status KVCacheManager::Commit(uint64_t plan_id) {
  return internal::NoBadAlloc("Commit", [&]() -> absl::Status {
    Impl& m = *impl_;
    std::lock_guard<std::mutex> lock(m.mu_);
    absl::StatusOr<Impl::PlanState*> found = m.FindPlan(plan_id);
    if (!found.ok()) return found.status();
    const Impl::PlanState& plan = **found;
    for (int layer = 0; layer < m.config_.num_layers; ++layer) {
      if (plan.appended[layer] != plan.num_tokens) {
        return absl::FailedPreconditionError(absl::StrCat(
            "commit of plan ", plan_id, ": layer ", layer, " holds ",
            plan.appended[layer], " of its ", plan.num_tokens, " tokens"));
      }
    }
    if (absl::Status s = m.blocks_->Commit(plan_id); !s.ok()) return s;
    m.counters_.tokens_committed += plan.num_tokens;
    m.ReleasePlan(plan_id);
    return absl::OkStatus();
  });
}

absl::Status KVCacheManager::Abort(uint64_t plan_id) {
  return internal::NoBadAlloc("Abort", [&]() -> absl::Status {
    Impl& m = *impl_;
    std::lock_guard<std::mutex> lock(m.mu_);
    if (absl::StatusOr<Impl::PlanState*> found = m.FindPlan(plan_id);
        !found.ok()) {
      return found.status();
    }
    if (absl::Status s = m.blocks_->Abort(plan_id); !s.ok()) return s;
    m.ReleasePlan(plan_id);
    return absl::OkStatus();
  });
}

absl::Status KVCacheManager::Fork(SequenceId parent, SequenceId child) {
  return internal::NoBadAlloc("Fork", [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    if (const uint64_t plan = impl_->blocks_->PendingPlan(parent); plan != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("fork of sequence ", parent, " while plan ", plan,
                       " is in flight: commit or abort it first"));
    }
    return impl_->blocks_->Fork(parent, child);
  });
}

absl::Status KVCacheManager::Free(SequenceId id) {
  return internal::NoBadAlloc("Free", [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    if (const uint64_t plan = impl_->blocks_->PendingPlan(id); plan != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("free of sequence ", id, " while plan ", plan,
                       " is in flight: commit or abort it first"));
    }
    return impl_->blocks_->Free(id);
  });
}

absl::StatusOr<std::vector<BlockId>> KVCacheManager::BlockTable(
    SequenceId id) const {
  return internal::NoBadAlloc(
      "BlockTable", [&]() -> absl::StatusOr<std::vector<BlockId>> {
        std::lock_guard<std::mutex> lock(impl_->mu_);
        absl::StatusOr<absl::Span<const BlockId>> table =
            impl_->blocks_->BlockTable(id);
        if (!table.ok()) return table.status();
        return std::vector<BlockId>(table->begin(), table->end());
      });
}

absl::StatusOr<int64_t> KVCacheManager::SequenceLength(SequenceId id) const {
  return internal::NoBadAlloc("SequenceLength",
                              [&]() -> absl::StatusOr<int64_t> {
                                std::lock_guard<std::mutex> lock(impl_->mu_);
                                return impl_->blocks_->ComputedLength(id);
                              });
}

absl::StatusOr<BlockTableView> KVCacheManager::BatchBlockTable(
    absl::Span<const SequenceId> ids, void* stream) {
  return internal::NoBadAlloc(
      "BatchBlockTable", [&]() -> absl::StatusOr<BlockTableView> {
        Impl& m = *impl_;
        std::lock_guard<std::mutex> lock(m.mu_);
        if (ids.empty() || static_cast<int64_t>(ids.size()) >
                               m.config_.max_sequences_per_step) {
          return absl::InvalidArgumentError(
              absl::StrCat("block table of ", ids.size(),
                           " sequences: expected 1 to max_sequences_per_step ",
                           m.config_.max_sequences_per_step));
        }
        absl::StatusOr<kvcache::HostBatchTable> batch =
            m.blocks_->BatchTable(ids);
        if (!batch.ok()) return batch.status();
        if (batch->max_blocks > m.table_cols_) {
          return absl::InvalidArgumentError(absl::StrCat(
              "a sequence of this batch holds ", batch->max_blocks,
              " blocks, more than max_blocks_per_sequence ", m.table_cols_));
        }
        if (absl::Status s = m.device_->SynchronizeEvent(m.table_uploaded_);
            !s.ok()) {
          return s;
        }
        const int64_t rows = static_cast<int64_t>(ids.size());
        const int64_t cols = m.table_cols_;
        int32_t* staged = m.table_staging_.as<int32_t>();
        std::fill(staged, staged + rows * cols, 0);
        for (int64_t r = 0; r < rows; ++r) {
          std::copy_n(batch->table.data() + r * batch->max_blocks,
                      batch->num_blocks[r], staged + r * cols);
        }
        int32_t* lens = staged + m.config_.max_sequences_per_step * cols;
        std::copy_n(batch->seq_lens.data(), rows, lens);
        int32_t* device_table = m.table_device_.as<int32_t>();
        int32_t* device_lens =
            device_table + m.config_.max_sequences_per_step * cols;
        for (absl::Status s :
             {m.device_->CopyToDeviceAsync(
                  device_table, staged, rows * cols * sizeof(int32_t), stream),
              m.device_->CopyToDeviceAsync(device_lens, lens,
                                           rows * sizeof(int32_t), stream),
              m.device_->RecordEvent(m.table_uploaded_, stream)}) {
          if (!s.ok()) return s;
        }
        BlockTableView view;
        view.block_table = device_table;
        view.seq_lens = device_lens;
        view.num_sequences = static_cast<int32_t>(rows);
        view.max_blocks = batch->max_blocks;
        view.row_stride = static_cast<int32_t>(cols);
        return view;
      });
}

absl::StatusOr<LayerView> KVCacheManager::GetLayerView(int layer) const {
  return internal::NoBadAlloc(
      "GetLayerView", [&]() -> absl::StatusOr<LayerView> {
        const Impl& m = *impl_;
        if (absl::Status s = m.CheckLayer(layer); !s.ok()) return s;
        const LayerCache& cache = m.storage_->layer(layer);
        const CacheLayout& l = m.layout_;
        LayerView view;
        view.key_cache = cache.key_cache;
        view.value_cache = cache.value_cache;
        view.key_scale = cache.key_scale;
        view.value_scale = cache.value_scale;
        view.cache_dtype = l.cache_dtype;
        view.memory = m.memory_kind();
        view.device = m.device_->ordinal();
        view.num_blocks = l.num_blocks;
        view.block_size = l.block_size;
        view.num_kv_heads = l.num_heads;
        view.head_size = l.head_size;
        view.head_size_v = l.head_size_v;
        const int64_t k[4] = {l.key_block_elems(), l.key_slot_elems(),
                              l.head_size, 1};
        const int64_t v[4] = {l.value_block_elems(), l.value_slot_elems(),
                              l.head_size_v, 1};
        std::copy_n(k, 4, view.key_strides);
        std::copy_n(v, 4, view.value_strides);
        view.scale_strides[0] = l.scale_block_elems();
        view.scale_strides[1] = l.num_heads;
        view.scale_strides[2] = 1;
        return view;
      });
}

absl::Status KVCacheManager::Gather(SequenceId id, int layer,
                                    int64_t token_begin, int64_t num_tokens,
                                    const TensorView& key_out,
                                    const TensorView& value_out, void* stream) {
  return internal::NoBadAlloc("Gather", [&]() -> absl::Status {
    Impl& m = *impl_;
    std::lock_guard<std::mutex> lock(m.mu_);
    if (absl::Status s = m.CheckLayer(layer); !s.ok()) return s;
    absl::StatusOr<int64_t> length = m.blocks_->ComputedLength(id);
    if (!length.ok()) return length.status();
    if (token_begin < 0 || num_tokens < 1 || token_begin > *length ||
        num_tokens > *length - token_begin) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gather of ", num_tokens, " tokens from token ", token_begin,
          " of sequence ", id, ": it has ", *length, " computed tokens"));
    }
    internal::ExpectedKV expected;
    expected.num_tokens = num_tokens;
    expected.num_heads = m.layout_.num_heads;
    expected.head_size = m.layout_.head_size;
    expected.any_float_dtype = true;
    expected.memory = m.memory_kind();
    expected.device = m.device_->ordinal();
    GatherParams params;
    int64_t checked_tokens = 0;
    if (absl::Status s = internal::CheckKVPair(key_out, value_out, expected,
                                               m.layout_.head_size_v,
                                               &params.output, &checked_tokens);
        !s.ok()) {
      return s;
    }
    absl::StatusOr<absl::Span<const BlockId>> table = m.blocks_->BlockTable(id);
    if (!table.ok()) return table.status();
    const int64_t first = token_begin / m.layout_.block_size;
    const int64_t last = (token_begin + num_tokens - 1) / m.layout_.block_size;
    const int64_t count = last - first + 1;
    if (count > m.table_cols_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gather of ", num_tokens, " tokens spans ", count,
          " blocks, more than max_blocks_per_sequence ", m.table_cols_));
    }
    params.cache = m.storage_->layer(layer);
    params.block_table = m.gather_device_.as<int32_t>();
    params.block_table_len = count;
    params.token_begin = token_begin - first * m.layout_.block_size;
    params.num_tokens = num_tokens;
    // Everything the kernel would refuse, and outputs that overlap each other
    // or the cache, are refused before anything runs (issue #12 items 8, 10).
    if (absl::Status s = internal::ValidateGather(params); !s.ok()) {
      return Annotate(s, absl::StrCat("gather of layer ", layer));
    }
    if (absl::Status s = internal::CheckGatherOutputs(params.output, num_tokens,
                                                      m.layout_, *m.storage_);
        !s.ok()) {
      return s;
    }
    int32_t* staged = m.gather_staging_.as<int32_t>();
    std::copy_n(table->data() + first, count, staged);
    if (absl::Status s = m.device_->CopyToDeviceAsync(
            m.gather_device_.data(), staged, count * sizeof(int32_t), stream);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = m.kernels_.Gather(params, stream); !s.ok()) {
      return Annotate(s, absl::StrCat("gather of layer ", layer));
    }
    ++m.counters_.kernel_launches;
    return m.device_->SynchronizeStream(stream);
  });
}

int64_t KVCacheManager::FreeBlocks() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->Usage().free_blocks;
}

int64_t KVCacheManager::EvictableBlocks() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->Usage().cached_blocks;
}

int64_t KVCacheManager::TotalBlocks() const {
  return impl_->layout_.num_blocks;
}

absl::Status KVCacheManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  return internal::NoBadAlloc("CanReserve", [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    if (absl::Status s = impl_->CheckBatch(batch); !s.ok()) return s;
    return impl_->blocks_->CanReserve(batch);
  });
}

absl::StatusOr<int64_t> KVCacheManager::TokensThatFit(SequenceId id) const {
  return internal::NoBadAlloc("TokensThatFit",
                              [&]() -> absl::StatusOr<int64_t> {
                                std::lock_guard<std::mutex> lock(impl_->mu_);
                                return impl_->blocks_->TokensThatFit(id);
                              });
}

MetricsSnapshot KVCacheManager::Metrics() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  MetricsSnapshot s = m.counters_;
  const PoolUsage usage = m.blocks_->Usage();
  const PrefixCacheStats prefix = m.blocks_->PrefixStats();
  s.blocks_total = usage.total_blocks;
  s.blocks_free = usage.free_blocks;
  s.blocks_cached = usage.cached_blocks;
  s.blocks_in_use = usage.used_blocks;
  s.usage = usage.total_blocks > 0
                ? static_cast<double>(usage.used_blocks) / usage.total_blocks
                : 0.0;
  s.sequences = m.blocks_->num_sequences();
  s.plans_in_flight = static_cast<int64_t>(m.plans_.size());
  s.prefix_queries = prefix.queries;
  s.prefix_query_tokens = prefix.query_tokens;
  s.prefix_hit_tokens = prefix.hit_tokens;
  s.evictions = prefix.evictions;
  return s;
}

std::string KVCacheManager::MetricsText() const {
  // The text needs memory; when there is none the answer is empty.
  try {
    return ToPrometheusText(Metrics());
  } catch (const std::bad_alloc&) {
    return std::string();
  }
}

const KVCacheConfig& KVCacheManager::config() const { return impl_->config_; }

absl::Status KVCacheManager::Validate() const {
  return internal::NoBadAlloc("Validate", [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    if (absl::Status s = impl_->blocks_->Validate(); !s.ok()) return s;
    return impl_->ValidatePlans();
  });
}

}  // namespace kvcache
