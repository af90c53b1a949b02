// BlockManager's lookups and its public methods, which forward to Impl.

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "allocator/block_manager.h"
#include "allocator/block_manager_impl.h"

namespace kvcache {

using internal::Sequence;

absl::StatusOr<const Sequence*> BlockManager::Impl::Find(SequenceId id) const {
  const Sequence* s = by_id_.Find(id);
  if (s == nullptr)
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  return s;
}

absl::StatusOr<HostBatchTable> BlockManager::Impl::BatchTable(
    absl::Span<const SequenceId> ids) const {
  HostBatchTable out;
  std::vector<const Sequence*> seqs;
  seqs.reserve(ids.size());
  for (SequenceId id : ids) {
    absl::StatusOr<const Sequence*> s = Find(id);
    if (!s.ok()) return s.status();
    seqs.push_back(*s);
    out.max_blocks =
        std::max(out.max_blocks, static_cast<int32_t>((*s)->blocks.size()));
  }
  out.num_sequences = static_cast<int32_t>(ids.size());
  out.table.assign(static_cast<size_t>(out.num_sequences) * out.max_blocks, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(),
              out.table.data() + i * out.max_blocks);
    out.num_blocks.push_back(static_cast<int32_t>(seqs[i]->blocks.size()));
    out.seq_lens.push_back(static_cast<int32_t>(seqs[i]->computed));
  }
  return out;
}

absl::StatusOr<int64_t> BlockManager::Impl::TokensThatFit(SequenceId id) const {
  absl::StatusOr<const Sequence*> found = Find(id);
  if (!found.ok()) return found.status();
  const Sequence& s = **found;
  if (s.plan_id != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, " already has an uncommitted reservation (plan ",
        s.plan_id, ")"));
  }
  const int64_t bs = options_.block_size;
  int64_t available = pool_.num_free() + pool_.num_cached();
  if (NeedsCopy(s) && --available < 0) return 0;
  const int64_t room_in_last =
      static_cast<int64_t>(s.blocks.size()) * bs - s.computed;
  return room_in_last + available * bs;
}

// ---- BlockManager: forwards to Impl
// ----------------------------------------------------------

absl::StatusOr<std::unique_ptr<BlockManager>> BlockManager::Create(
    const BlockManagerOptions& options) {
  if (options.num_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks ", options.num_blocks, " must be >= 1"));
  }
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size ", options.block_size, " must be >= 1"));
  }
  return std::unique_ptr<BlockManager>(
      new BlockManager(std::make_unique<Impl>(options)));
}

BlockManager::BlockManager(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
BlockManager::~BlockManager() = default;

absl::StatusOr<int64_t> BlockManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  return impl_->AddSequence(id, prompt, extra);
}
absl::StatusOr<StepPlan> BlockManager::Reserve(
    absl::Span<const ReserveRequest> batch) {
  return impl_->Reserve(batch);
}
absl::Status BlockManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  return impl_->CanReserve(batch);
}
absl::Status BlockManager::Commit(uint64_t plan_id) {
  return impl_->Commit(plan_id);
}
absl::Status BlockManager::Abort(uint64_t plan_id) {
  return impl_->Abort(plan_id);
}
absl::Status BlockManager::Free(SequenceId id) { return impl_->Free(id); }
absl::Status BlockManager::Fork(SequenceId parent, SequenceId child) {
  return impl_->Fork(parent, child);
}

absl::StatusOr<absl::Span<const BlockId>> BlockManager::BlockTable(
    SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  if (!s.ok()) return s.status();
  return absl::Span<const BlockId>((*s)->blocks);
}
absl::StatusOr<int64_t> BlockManager::ComputedLength(SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  if (!s.ok()) return s.status();
  return (*s)->computed;
}
absl::StatusOr<int64_t> BlockManager::KnownLength(SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  if (!s.ok()) return s.status();
  return (*s)->known(impl_->options().block_size);
}
absl::StatusOr<HostBatchTable> BlockManager::BatchTable(
    absl::Span<const SequenceId> ids) const {
  return impl_->BatchTable(ids);
}
absl::StatusOr<int64_t> BlockManager::TokensThatFit(SequenceId id) const {
  return impl_->TokensThatFit(id);
}
uint64_t BlockManager::PendingPlan(SequenceId id) const {
  absl::StatusOr<const Sequence*> s = impl_->Find(id);
  return s.ok() ? (*s)->plan_id : 0;
}
bool BlockManager::Contains(SequenceId id) const {
  return impl_->Find(id).ok();
}
int64_t BlockManager::num_sequences() const { return impl_->num_sequences(); }
size_t BlockManager::num_prefix_roots() const {
  return impl_->num_prefix_roots();
}

PoolUsage BlockManager::Usage() const {
  const internal::BlockPool& pool = impl_->pool();
  return PoolUsage{pool.num_blocks(), pool.num_free(), pool.num_cached(),
                   pool.num_used()};
}
PrefixCacheStats BlockManager::PrefixStats() const { return impl_->stats(); }
const BlockManagerOptions& BlockManager::options() const {
  return impl_->options();
}
absl::Status BlockManager::Validate() const { return impl_->Validate(); }

}  // namespace kvcache
