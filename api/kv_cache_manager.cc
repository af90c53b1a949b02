// KVCacheManager: each public method converts std::bad_alloc into
// ResourceExhausted (api/no_bad_alloc.h), takes the lock and hands the call to
// Impl (api/manager_impl.h), which validates it once and delegates to its
// parts.

#include "api/kv_cache_manager.h"

#include <mutex>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/group_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "api/manager_impl.h"
#include "api/no_bad_alloc.h"
#include "core/status_macros.h"
#include "dlpack/dlpack.h"
#include "events/external_hash.h"
#include "storage/device.h"

namespace kvcache {

using internal::Annotate;
using internal::NoBadAlloc;
using Lock = std::lock_guard<std::mutex>;

namespace {

// What a manager with layer groups does not offer (yet).
absl::Status NotWithGroups(const char* what) {
  return absl::UnimplementedError(
      absl::StrCat(what, " is not offered with layer_groups yet"));
}

}  // namespace

KVCacheManager::KVCacheManager(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
KVCacheManager::KVCacheManager(std::unique_ptr<internal::GroupManager> groups)
    : groups_(std::move(groups)) {}
KVCacheManager::~KVCacheManager() = default;

absl::StatusOr<std::unique_ptr<KVCacheManager>> KVCacheManager::Create(
    const KVCacheConfig& config) {
  return NoBadAlloc(
      "Create", [&]() -> absl::StatusOr<std::unique_ptr<KVCacheManager>> {
        KVCACHE_RETURN_IF_ERROR(ValidateConfig(config));
        std::unique_ptr<Device> device;
        if (config.backend == Backend::kCuda) {
          KVCACHE_ASSIGN_OR_RETURN(device, CreateCudaDevice(config.device));
        } else {
          device = CreateCpuDevice();
        }
        return CreateOn(config, std::move(device));
      });
}

absl::StatusOr<std::unique_ptr<KVCacheManager>> KVCacheManager::CreateOn(
    const KVCacheConfig& config, std::unique_ptr<Device> device) {
  if (!config.layer_groups.empty()) {
    // Layer groups run on their own path (api/group_manager.h); a uniform
    // config never reaches it.
    KVCACHE_ASSIGN_OR_RETURN(
        std::unique_ptr<internal::GroupManager> groups,
        internal::GroupManager::Create(config, std::move(device)));
    return std::unique_ptr<KVCacheManager>(
        new KVCacheManager(std::move(groups)));
  }
  KVCACHE_ASSIGN_OR_RETURN(std::unique_ptr<Impl> impl,
                           Impl::Create(config, std::move(device)));
  return std::unique_ptr<KVCacheManager>(new KVCacheManager(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<KVCacheManager>>
KVCacheManagerTestPeer::CreateWithDevice(const KVCacheConfig& config,
                                         std::unique_ptr<Device> device) {
  return NoBadAlloc("CreateWithDevice",
                    [&]() -> absl::StatusOr<std::unique_ptr<KVCacheManager>> {
                      KVCACHE_RETURN_IF_ERROR(ValidateConfig(config));
                      return KVCacheManager::CreateOn(config,
                                                      std::move(device));
                    });
}

std::vector<uint64_t> KVCacheManagerTestPeer::CachedHashesForTesting(
    const KVCacheManager& manager, KVEventMedium medium) {
  std::vector<uint64_t> out;
  if (manager.groups_ != nullptr) {
    // Groups have no host tier: their hashes are all on the device.
    if (medium == KVEventMedium::kHost) return out;
    for (const BlockHash& h : manager.groups_->RegisteredHashesForTesting()) {
      out.push_back(ExternalBlockHash(h));
    }
    return out;
  }
  Lock lock(manager.impl_->mu());
  for (const BlockHash& h : manager.impl_->blocks().RegisteredHashesForTesting(
           medium == KVEventMedium::kHost ? BlockMedium::kHost
                                          : BlockMedium::kDevice)) {
    out.push_back(ExternalBlockHash(h));
  }
  return out;
}

void KVCacheManagerTestPeer::DisableCacheWrites(KVCacheManager& manager) {
  if (manager.groups_ != nullptr) return;
  Lock lock(manager.impl_->mu());
  manager.impl_->mutable_backend().DisableWritesForTest();
}

void KVCacheManagerTestPeer::CoalesceGraphStepUploads(KVCacheManager& manager) {
  if (manager.groups_ != nullptr) {
    manager.groups_->CoalesceGraphStepUploadsForTesting();
    return;
  }
  Lock lock(manager.impl_->mu());
  manager.impl_->CoalesceGraphStepUploadsForTesting();
}

absl::StatusOr<int64_t> KVCacheManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  return NoBadAlloc("AddSequence", [&]() -> absl::StatusOr<int64_t> {
    if (groups_ != nullptr) {
      return groups_->AddSequence(id, prompt, extra, nullptr);
    }
    Lock lock(impl_->mu());
    return impl_->AddSequence(id, prompt, extra);
  });
}

absl::StatusOr<int64_t> KVCacheManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra,
    PrefixHits* hits) {
  return NoBadAlloc("AddSequence", [&]() -> absl::StatusOr<int64_t> {
    if (groups_ != nullptr)
      return groups_->AddSequence(id, prompt, extra, hits);
    Lock lock(impl_->mu());
    return impl_->AddSequence(id, prompt, extra, hits);
  });
}

TierCopier* KVCacheManagerTestPeer::HostTierCopier(KVCacheManager& manager) {
  if (manager.groups_ != nullptr) return nullptr;
  Lock lock(manager.impl_->mu());
  internal::TierMover* tier = manager.impl_->tier();
  return tier != nullptr ? &tier->copier() : nullptr;
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Reserve(
    absl::Span<const ReserveRequest> batch, void* stream) {
  return NoBadAlloc("Reserve", [&]() -> absl::StatusOr<StepPlanInfo> {
    if (groups_ != nullptr) return groups_->Reserve(batch, stream);
    Lock lock(impl_->mu());
    return impl_->Reserve(batch, stream);
  });
}

absl::StatusOr<StepPlanInfo> KVCacheManager::ReserveGraphStep(
    absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
    void* stream) {
  return NoBadAlloc("ReserveGraphStep", [&]() -> absl::StatusOr<StepPlanInfo> {
    if (groups_ != nullptr) {
      return groups_->ReserveGraphStep(batch, graph_tokens, stream);
    }
    Lock lock(impl_->mu());
    return impl_->ReserveGraphStep(batch, graph_tokens, stream);
  });
}

absl::StatusOr<GraphStepInputs> KVCacheManager::GraphStep() const {
  if (groups_ != nullptr) {
    KVCACHE_RETURN_IF_ERROR(OneTable("GraphStep"));
    return groups_->GraphStep(0);
  }
  Lock lock(impl_->mu());
  return impl_->GraphStep();
}

absl::StatusOr<GraphStepInputs> KVCacheManager::GroupGraphStep(
    int32_t table) const {
  if (groups_ != nullptr) return groups_->GraphStep(table);
  if (table != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block table ", table, " out of range [0, 1) (no layer_groups)"));
  }
  return GraphStep();
}

absl::Status KVCacheManager::Append(uint64_t plan_id, int layer,
                                    const TensorView& key,
                                    const TensorView& value, void* stream) {
  return NoBadAlloc("Append", [&]() -> absl::Status {
    if (groups_ != nullptr) {
      return groups_->Append(plan_id, layer, key, value, stream);
    }
    Lock lock(impl_->mu());
    return impl_->Append(plan_id, layer, key, value, stream);
  });
}

absl::Status KVCacheManager::Append(uint64_t plan_id, int layer,
                                    const DLTensor& key, const DLTensor& value,
                                    void* stream) {
  return NoBadAlloc("Append", [&]() -> absl::Status {
    absl::StatusOr<TensorView> k = FromDLPack(key);
    if (!k.ok()) return Annotate(k.status(), "key");
    absl::StatusOr<TensorView> v = FromDLPack(value);
    if (!v.ok()) return Annotate(v.status(), "value");
    if (groups_ != nullptr)
      return groups_->Append(plan_id, layer, *k, *v, stream);
    Lock lock(impl_->mu());
    return impl_->Append(plan_id, layer, *k, *v, stream);
  });
}

absl::Status KVCacheManager::Commit(uint64_t plan_id) {
  return NoBadAlloc("Commit", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Commit(plan_id);
    Lock lock(impl_->mu());
    return impl_->Commit(plan_id);
  });
}

absl::Status KVCacheManager::Commit(uint64_t plan_id,
                                    absl::Span<const int64_t> accepted) {
  return NoBadAlloc("Commit", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Commit(plan_id, accepted);
    Lock lock(impl_->mu());
    return impl_->Commit(plan_id, accepted);
  });
}

absl::Status KVCacheManager::RemoveFromPlan(uint64_t plan_id,
                                            SequenceId sequence, void* stream) {
  return NoBadAlloc("RemoveFromPlan", [&]() -> absl::Status {
    if (groups_ != nullptr) {
      return groups_->RemoveFromPlan(plan_id, sequence, stream);
    }
    Lock lock(impl_->mu());
    return impl_->RemoveFromPlan(plan_id, sequence, stream);
  });
}

absl::Status KVCacheManager::Truncate(SequenceId sequence, int64_t new_length) {
  return NoBadAlloc("Truncate", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Truncate(sequence, new_length);
    Lock lock(impl_->mu());
    return impl_->Truncate(sequence, new_length);
  });
}

absl::StatusOr<bool> KVCacheManager::PrefixLoaded(SequenceId id) {
  return NoBadAlloc("PrefixLoaded", [&]() -> absl::StatusOr<bool> {
    if (groups_ != nullptr) {  // No host tier with groups: always landed.
      KVCACHE_RETURN_IF_ERROR(groups_->SequenceLength(id).status());
      return true;
    }
    Lock lock(impl_->mu());
    return impl_->PrefixLoaded(id);
  });
}

absl::StatusOr<int64_t> KVCacheManager::PeekPrefix(
    absl::Span<const TokenId> prompt, const ExtraKey& extra) const {
  return NoBadAlloc("PeekPrefix", [&]() -> absl::StatusOr<int64_t> {
    if (groups_ != nullptr) return groups_->PeekPrefix(prompt, extra);
    Lock lock(impl_->mu());
    return impl_->blocks().PeekPrefix(prompt, extra);
  });
}

absl::StatusOr<std::vector<PlanSequence>> KVCacheManager::PlanLayout(
    uint64_t plan_id) const {
  return NoBadAlloc("PlanLayout",
                    [&]() -> absl::StatusOr<std::vector<PlanSequence>> {
                      if (groups_ != nullptr)
                        return groups_->PlanLayout(plan_id);
                      Lock lock(impl_->mu());
                      return impl_->PlanLayout(plan_id);
                    });
}

absl::Status KVCacheManager::Abort(uint64_t plan_id) {
  return NoBadAlloc("Abort", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Abort(plan_id);
    Lock lock(impl_->mu());
    return impl_->Abort(plan_id);
  });
}

absl::Status KVCacheManager::Fork(SequenceId parent, SequenceId child) {
  return NoBadAlloc("Fork", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Fork(parent, child);
    Lock lock(impl_->mu());
    return impl_->Fork(parent, child);
  });
}

absl::Status KVCacheManager::Free(SequenceId id) {
  return NoBadAlloc("Free", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Free(id);
    Lock lock(impl_->mu());
    return impl_->Free(id);
  });
}

absl::StatusOr<std::vector<BlockId>> KVCacheManager::BlockTable(
    SequenceId id) const {
  return NoBadAlloc(
      "BlockTable", [&]() -> absl::StatusOr<std::vector<BlockId>> {
        if (groups_ != nullptr) {
          KVCACHE_RETURN_IF_ERROR(OneTable("BlockTable"));
          return groups_->BlockTable(id, 0);
        }
        Lock lock(impl_->mu());
        KVCACHE_ASSIGN_OR_RETURN(const absl::Span<const BlockId> table,
                                 impl_->blocks().BlockTable(id));
        return std::vector<BlockId>(table.begin(), table.end());
      });
}

absl::StatusOr<int64_t> KVCacheManager::SequenceLength(SequenceId id) const {
  return NoBadAlloc("SequenceLength", [&]() -> absl::StatusOr<int64_t> {
    if (groups_ != nullptr) return groups_->SequenceLength(id);
    Lock lock(impl_->mu());
    return impl_->blocks().ComputedLength(id);
  });
}

absl::StatusOr<int64_t> KVCacheManager::KnownLength(SequenceId id) const {
  return NoBadAlloc("KnownLength", [&]() -> absl::StatusOr<int64_t> {
    if (groups_ != nullptr) return groups_->KnownLength(id);
    Lock lock(impl_->mu());
    return impl_->blocks().KnownLength(id);
  });
}

absl::StatusOr<BlockTableView> KVCacheManager::BatchBlockTable(
    absl::Span<const SequenceId> ids, void* stream) {
  return NoBadAlloc("BatchBlockTable", [&]() -> absl::StatusOr<BlockTableView> {
    if (groups_ != nullptr) {
      KVCACHE_RETURN_IF_ERROR(OneTable("BatchBlockTable"));
      return groups_->BatchBlockTable(ids, 0, stream);
    }
    Lock lock(impl_->mu());
    return impl_->BatchBlockTable(ids, stream);
  });
}

absl::StatusOr<LayerView> KVCacheManager::GetLayerView(int layer) const {
  if (groups_ != nullptr) return groups_->GetLayerView(layer);
  // The layout never changes after Create: no lock.
  KVCACHE_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  return impl_->backend().View(layer);
}

absl::Status KVCacheManager::Gather(SequenceId id, int layer,
                                    int64_t token_begin, int64_t num_tokens,
                                    const TensorView& key_out,
                                    const TensorView& value_out, void* stream) {
  return NoBadAlloc("Gather", [&]() -> absl::Status {
    if (groups_ != nullptr) {
      const GatherRequest request{id, token_begin, num_tokens};
      return groups_->GatherBatch(absl::MakeConstSpan(&request, 1), layer,
                                  key_out, value_out, GatherOptions(), stream,
                                  /*wait=*/true);
    }
    Lock lock(impl_->mu());
    return impl_->Gather(id, layer, token_begin, num_tokens, key_out, value_out,
                         stream);
  });
}

absl::Status KVCacheManager::GatherAsync(
    SequenceId id, int layer, int64_t token_begin, int64_t num_tokens,
    const TensorView& key_out, const TensorView& value_out,
    const GatherOptions& options, void* stream) {
  return NoBadAlloc("GatherAsync", [&]() -> absl::Status {
    const GatherRequest request{id, token_begin, num_tokens};
    if (groups_ != nullptr) {
      return groups_->GatherBatch(absl::MakeConstSpan(&request, 1), layer,
                                  key_out, value_out, options, stream,
                                  /*wait=*/false);
    }
    Lock lock(impl_->mu());
    return impl_->GatherBatch(absl::MakeConstSpan(&request, 1), layer, key_out,
                              value_out, options, stream);
  });
}

absl::Status KVCacheManager::GatherBatch(
    absl::Span<const GatherRequest> requests, int layer,
    const TensorView& key_out, const TensorView& value_out,
    const GatherOptions& options, void* stream) {
  return NoBadAlloc("GatherBatch", [&]() -> absl::Status {
    if (groups_ != nullptr) {
      return groups_->GatherBatch(requests, layer, key_out, value_out, options,
                                  stream, /*wait=*/false);
    }
    Lock lock(impl_->mu());
    return impl_->GatherBatch(requests, layer, key_out, value_out, options,
                              stream);
  });
}

int64_t KVCacheManager::FreeBlocks() const {
  if (groups_ != nullptr) return groups_->FreeBlocks();
  Lock lock(impl_->mu());
  return impl_->blocks().Usage().free_blocks;
}

int64_t KVCacheManager::EvictableBlocks() const {
  if (groups_ != nullptr) return groups_->EvictableBlocks();
  Lock lock(impl_->mu());
  return impl_->blocks().Usage().cached_blocks;
}

int64_t KVCacheManager::TotalBlocks() const {
  if (groups_ != nullptr) return groups_->TotalBlocks();
  return impl_->backend().layout().num_blocks;
}

absl::Status KVCacheManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  return NoBadAlloc("CanReserve", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->CanReserve(batch);
    Lock lock(impl_->mu());
    return impl_->CanReserve(batch);
  });
}

absl::StatusOr<int64_t> KVCacheManager::TokensThatFit(SequenceId id) const {
  return NoBadAlloc("TokensThatFit", [&]() -> absl::StatusOr<int64_t> {
    if (groups_ != nullptr) return NotWithGroups("TokensThatFit");
    Lock lock(impl_->mu());
    return impl_->blocks().TokensThatFit(id);
  });
}

MetricsSnapshot KVCacheManager::Metrics() const {
  if (groups_ != nullptr) return groups_->Metrics();
  Lock lock(impl_->mu());
  return impl_->Metrics();
}

std::string KVCacheManager::MetricsText() const {
  // The text needs memory; when there is none the answer is empty.
  try {
    return ToPrometheusText(Metrics());
  } catch (const std::bad_alloc&) {
    return std::string();
  }
}

absl::StatusOr<std::vector<KVEventBatch>> KVCacheManager::TakeEvents() {
  return NoBadAlloc("TakeEvents",
                    [&]() -> absl::StatusOr<std::vector<KVEventBatch>> {
                      if (groups_ != nullptr) return groups_->TakeEvents();
                      Lock lock(impl_->mu());
                      return impl_->TakeEvents();
                    });
}

absl::Status KVCacheManager::ResetPrefixCache() {
  return NoBadAlloc("ResetPrefixCache", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->ResetPrefixCache();
    Lock lock(impl_->mu());
    return impl_->blocks().ResetPrefixCache();
  });
}

const KVCacheConfig& KVCacheManager::config() const {
  return groups_ != nullptr ? groups_->config() : impl_->config();
}

absl::Status KVCacheManager::Validate() const {
  return NoBadAlloc("Validate", [&]() -> absl::Status {
    if (groups_ != nullptr) return groups_->Validate();
    Lock lock(impl_->mu());
    return impl_->Validate();
  });
}

int32_t KVCacheManager::NumBlockTables() const {
  if (groups_ == nullptr) return 1;
  return static_cast<int32_t>(groups_->paging().tables.size());
}

absl::StatusOr<int32_t> KVCacheManager::LayerBlockTable(int layer) const {
  if (groups_ != nullptr) return groups_->LayerTable(layer);
  KVCACHE_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  return 0;
}

absl::Status KVCacheManager::OneTable(const char* what) const {
  const int32_t n = NumBlockTables();
  if (n == 1) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " of a manager whose sequences have ", n,
                   " block tables (layer_groups): name the table (Group", what,
                   "; LayerBlockTable(layer) gives a layer's)"));
}

absl::StatusOr<std::vector<BlockId>> KVCacheManager::GroupBlockTable(
    SequenceId id, int32_t table) const {
  return NoBadAlloc(
      "GroupBlockTable", [&]() -> absl::StatusOr<std::vector<BlockId>> {
        if (groups_ != nullptr) return groups_->BlockTable(id, table);
        if (table != 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "block table ", table, " out of range [0, 1) (no layer_groups)"));
        }
        return BlockTable(id);
      });
}

absl::StatusOr<BlockTableView> KVCacheManager::GroupBatchBlockTable(
    absl::Span<const SequenceId> ids, int32_t table, void* stream) {
  return NoBadAlloc(
      "GroupBatchBlockTable", [&]() -> absl::StatusOr<BlockTableView> {
        if (groups_ != nullptr) {
          return groups_->BatchBlockTable(ids, table, stream);
        }
        if (table != 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "block table ", table, " out of range [0, 1) (no layer_groups)"));
        }
        return BatchBlockTable(ids, stream);
      });
}

int64_t KVCacheManager::HeldBlocks(int32_t table) const {
  if (groups_ != nullptr) return groups_->HeldBlocks(table);
  if (table != 0) return 0;
  Lock lock(impl_->mu());
  return impl_->blocks().Usage().used_blocks;
}

}  // namespace kvcache
