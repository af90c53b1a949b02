#include "allocator/group_block_manager.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace kvcache {

using internal::BlockState;

absl::StatusOr<std::unique_ptr<GroupBlockManager>> GroupBlockManager::Create(
    const GroupBlockManagerOptions& options) {
  if (options.num_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks ", options.num_blocks, " must be >= 1"));
  }
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size ", options.block_size, " must be >= 1"));
  }
  if (options.windows.empty()) {
    return absl::InvalidArgumentError("windows is empty: no table");
  }
  for (size_t t = 0; t < options.windows.size(); ++t) {
    if (options.windows[t] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("windows[", t, "] ", options.windows[t],
                       " must be >= 0 (0 = full attention)"));
    }
  }
  return std::unique_ptr<GroupBlockManager>(new GroupBlockManager(options));
}

GroupBlockManager::GroupBlockManager(const GroupBlockManagerOptions& options)
    : options_(options),
      pool_(options.num_blocks),
      index_(static_cast<int32_t>(options.windows.size()), options.num_blocks),
      held_(options.windows.size(), 0) {}

GroupBlockManager::~GroupBlockManager() = default;

int64_t GroupBlockManager::FirstNeeded(int32_t table, int64_t tokens) const {
  const int64_t window = options_.windows[table];
  if (window == 0) return 0;
  return std::max<int64_t>(0, tokens - window + 1) / options_.block_size;
}

void GroupBlockManager::HashKnown(Sequence& s) const {
  if (!options_.enable_prefix_caching) return;
  const size_t b = options_.block_size;
  while ((s.hashes.size() + 1) * b <= s.tokens.size()) {
    const BlockHash& parent = s.hashes.empty() ? s.root : s.hashes.back();
    s.hashes.push_back(HashBlock(
        parent, absl::MakeConstSpan(s.tokens.data() + s.hashes.size() * b, b)));
  }
}

int64_t GroupBlockManager::HitBlocks(const BlockHash& root,
                                     absl::Span<const BlockHash> hashes,
                                     absl::Span<const TokenId> prompt) const {
  if (!options_.enable_prefix_caching) return 0;
  const int64_t bs = options_.block_size;
  const int64_t most =
      std::min<int64_t>(static_cast<int64_t>(hashes.size()),
                        (static_cast<int64_t>(prompt.size()) - 1) / bs);
  int64_t limit = index_.ConfirmedPrefix(root, hashes.first(most), prompt,
                                         options_.block_size);
  // Full tables: the run of registered blocks from the first. Sliding
  // tables: per block, the run of registered blocks ending there.
  std::vector<std::vector<int32_t>> runs;
  std::vector<int32_t> sliding;
  for (int32_t t = 0; t < num_tables(); ++t) {
    if (options_.windows[t] == 0) {
      int64_t n = 0;
      while (n < limit && index_.Registered(t, hashes[n]) >= 0) ++n;
      limit = n;
    } else {
      sliding.push_back(t);
    }
  }
  for (int32_t t : sliding) {
    std::vector<int32_t> run(limit);
    for (int64_t i = 0; i < limit; ++i) {
      const bool cached = index_.Registered(t, hashes[i]) >= 0;
      run[i] = cached ? (i > 0 ? run[i - 1] : 0) + 1 : 0;
    }
    runs.push_back(std::move(run));
  }
  for (int64_t blocks = limit; blocks > 0; --blocks) {
    bool servable = true;
    for (size_t k = 0; k < sliding.size() && servable; ++k) {
      const int64_t needed = blocks - FirstNeeded(sliding[k], blocks * bs);
      servable = runs[k][blocks - 1] >= needed;
    }
    if (servable) return blocks;
  }
  return 0;
}

absl::StatusOr<int64_t> GroupBlockManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  if (sequences_.contains(id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("sequence ", id, " already exists"));
  }
  if (prompt.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", id, ": the prompt is empty"));
  }
  Sequence s;
  s.tokens.assign(prompt.begin(), prompt.end());
  if (options_.enable_prefix_caching) {
    s.root = HashExtraKey(extra.adapter_id, extra.salt);
  }
  s.adapter_id = extra.adapter_id;
  s.serial = next_serial_++;
  HashKnown(s);
  const int64_t hit = HitBlocks(s.root, s.hashes, prompt);
  const int64_t bs = options_.block_size;
  s.tables.resize(num_tables());
  s.released.resize(num_tables());
  s.cow_src.assign(num_tables(), kNullBlock);
  for (int32_t t = 0; t < num_tables(); ++t) {
    const int64_t first = FirstNeeded(t, hit * bs);
    s.tables[t].assign(hit, kNullBlock);
    s.released[t] = first;
    for (int64_t b = first; b < hit; ++b) {
      const BlockId block = index_.Registered(t, s.hashes[b]);
      pool_.Acquire(block);
      s.tables[t][b] = block;
    }
    held_[t] += hit - first;
  }
  s.computed = hit * bs;
  s.registered = hit;
  if (hit > 0) {
    index_.AcquireNode(s.hashes[hit - 1]);
    s.has_tip = true;
  }
  if (options_.enable_prefix_caching) {
    ++stats_.queries;
    stats_.query_tokens += static_cast<int64_t>(prompt.size());
    stats_.hit_tokens += s.computed;
  }
  const int64_t computed = s.computed;
  sequences_.emplace(id, std::move(s));
  return computed;
}

absl::StatusOr<int64_t> GroupBlockManager::PeekPrefix(
    absl::Span<const TokenId> prompt, const ExtraKey& extra) const {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  Sequence s;
  s.tokens.assign(prompt.begin(), prompt.end());
  if (options_.enable_prefix_caching) {
    s.root = HashExtraKey(extra.adapter_id, extra.salt);
  }
  HashKnown(s);
  return HitBlocks(s.root, s.hashes, prompt) * options_.block_size;
}

bool GroupBlockManager::NeedsCopy(const Sequence& s, int32_t t) const {
  const int64_t bs = options_.block_size;
  if (s.computed % bs == 0) return false;
  // The partial last block holds position computed - 1, inside every
  // window: never kNullBlock.
  const BlockId b = s.tables[t][s.computed / bs];
  return pool_.ref_count(b) > 1 || pool_.hashed(b);
}

int64_t GroupBlockManager::NewPages(const Sequence& s, int64_t tokens) const {
  const int64_t bs = options_.block_size;
  const int64_t blocks = (s.computed + tokens + bs - 1) / bs;
  int64_t need = 0;
  for (int32_t t = 0; t < num_tables(); ++t) {
    const int64_t size = static_cast<int64_t>(s.tables[t].size());
    need += std::max<int64_t>(0, blocks - size) + (NeedsCopy(s, t) ? 1 : 0);
  }
  return need;
}

absl::Status GroupBlockManager::CheckBatch(
    absl::Span<const ReserveRequest> batch, int64_t& need) const {
  need = 0;
  absl::flat_hash_set<SequenceId> named;
  for (const ReserveRequest& r : batch) {
    auto it = sequences_.find(r.sequence);
    if (it == sequences_.end()) {
      return absl::NotFoundError(
          absl::StrCat("sequence ", r.sequence, " not found"));
    }
    if (!named.insert(r.sequence).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", r.sequence, " is named twice"));
    }
    const Sequence& s = it->second;
    if (s.plan_id != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", r.sequence, " has a reservation in plan ",
                       s.plan_id, " not committed or aborted"));
    }
    const int64_t known = static_cast<int64_t>(s.tokens.size()) +
                          static_cast<int64_t>(r.new_token_ids.size());
    if (r.num_tokens < 1 || s.computed + r.num_tokens > known) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", r.sequence, ": num_tokens ", r.num_tokens,
          " is not in [1, ", known - s.computed, "] (known tokens ", known,
          " - computed ", s.computed, ")"));
    }
    need += NewPages(s, r.num_tokens);
  }
  const int64_t available = pool_.num_free() + pool_.num_cached();
  if (need > available) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "Reserve needs ", need, " new blocks over ", num_tables(), " tables; ",
        pool_.num_free(), " free + ", pool_.num_cached(), " evictable"));
  }
  return absl::OkStatus();
}

absl::Status GroupBlockManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  int64_t need = 0;
  return CheckBatch(batch, need);
}

BlockId GroupBlockManager::TakePage() {
  if (pool_.num_free() > 0) return pool_.AllocateFree();
  const BlockId b = pool_.EvictOldest();
  if (options_.observer != nullptr) {
    const BlockHash hash = index_.RegisteredHash(b);
    auto it = tables_per_hash_.find(hash);
    if (--it->second == 0) {
      tables_per_hash_.erase(it);
      removed_.push_back(hash);
    }
  }
  index_.Unregister(b);
  ++stats_.evictions;
  return b;
}

absl::StatusOr<GroupStepPlan> GroupBlockManager::Reserve(
    absl::Span<const ReserveRequest> batch) {
  int64_t need = 0;
  if (absl::Status st = CheckBatch(batch, need); !st.ok()) return st;
  const int64_t bs = options_.block_size;
  GroupStepPlan out;
  out.id = next_plan_id_++;
  out.slot_mappings.resize(num_tables());
  Plan plan;
  for (const ReserveRequest& r : batch) {
    Sequence& s = sequences_.find(r.sequence)->second;
    plan.sequences.push_back(r.sequence);
    plan.tokens_before.push_back(s.tokens.size());
    std::vector<size_t>& sizes = plan.sizes_before.emplace_back();
    s.tokens.insert(s.tokens.end(), r.new_token_ids.begin(),
                    r.new_token_ids.end());
    HashKnown(s);
    const int64_t end = s.computed + r.num_tokens;
    for (int32_t t = 0; t < num_tables(); ++t) {
      std::vector<BlockId>& table = s.tables[t];
      sizes.push_back(table.size());
      if (NeedsCopy(s, t)) {
        // The source keeps this sequence's reference until Commit or Abort:
        // the copy reads it, and Abort puts it back.
        BlockId& last = table[s.computed / bs];
        const BlockId fresh = TakePage();
        out.copies.push_back(BlockCopy{last, fresh});
        s.cow_src[t] = last;
        last = fresh;
        ++s.version;
      }
      while (static_cast<int64_t>(table.size()) * bs < end) {
        table.push_back(TakePage());
        ++held_[t];
      }
      for (int64_t p = s.computed; p < end; ++p) {
        out.slot_mappings[t].push_back(int64_t{table[p / bs]} * bs + p % bs);
      }
    }
    s.reserved = r.num_tokens;
    s.plan_id = out.id;
    out.sequences.push_back(r.sequence);
    out.num_tokens.push_back(r.num_tokens);
    out.first_positions.push_back(s.computed);
  }
  plans_.emplace(out.id, std::move(plan));
  FlushEvents();
  return out;
}

void GroupBlockManager::RegisterFull(Sequence& s) {
  if (!options_.enable_prefix_caching || s.chain_broken || s.reset_cut) {
    return;
  }
  const int64_t bs = options_.block_size;
  const int64_t full = s.computed / bs;
  for (int64_t i = s.registered; i < full; ++i) {
    const BlockHash& parent = i == 0 ? s.root : s.hashes[i - 1];
    if (!index_.AcquireTip(parent, i > 0, s.hashes[i],
                           absl::MakeConstSpan(s.tokens.data() + i * bs, bs))) {
      s.chain_broken = true;
      return;
    }
    if (s.has_tip) index_.ReleaseNode(s.hashes[i - 1]);
    s.has_tip = true;
    s.registered = i + 1;
    for (int32_t t = 0; t < num_tables(); ++t) {
      const BlockId b = s.tables[t][i];
      if (b != kNullBlock && !pool_.hashed(b) &&
          index_.Register(t, s.hashes[i], b)) {
        pool_.MarkHashed(b);
        if (options_.observer != nullptr &&
            ++tables_per_hash_[s.hashes[i]] == 1) {
          StoredBlock stored;
          stored.block = b;
          stored.hash = s.hashes[i];
          stored.first_in_chain = i == 0;
          if (i > 0) stored.parent_hash = s.hashes[i - 1];
          stored.adapter_id = s.adapter_id;
          stored.tokens = absl::MakeConstSpan(s.tokens.data() + i * bs, bs);
          stored_.push_back(stored);
        }
      }
    }
  }
}

void GroupBlockManager::ReleaseOutOfWindow(Sequence& s) {
  for (int32_t t = 0; t < num_tables(); ++t) {
    const int64_t first = FirstNeeded(t, s.computed);
    for (int64_t b = s.released[t]; b < first; ++b) {
      if (s.tables[t][b] != kNullBlock) {
        pool_.Release(s.tables[t][b]);
        s.tables[t][b] = kNullBlock;
        --held_[t];
      }
    }
    s.released[t] = std::max(s.released[t], first);
  }
}

absl::Status GroupBlockManager::Commit(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(absl::StrCat("plan ", plan_id, " not found"));
  }
  for (SequenceId id : it->second.sequences) {
    auto s = sequences_.find(id);
    if (s == sequences_.end() || s->second.plan_id != plan_id) continue;
    CommitSequence(s->second);
  }
  plans_.erase(it);
  FlushEvents();
  return absl::OkStatus();
}

void GroupBlockManager::FlushEvents() {
  if (options_.observer == nullptr) return;
  if (!stored_.empty()) options_.observer->OnBlocksStored(stored_);
  if (!removed_.empty()) {
    options_.observer->OnBlocksRemoved(removed_, BlockMedium::kDevice);
  }
  stored_.clear();
  removed_.clear();
}

absl::Status GroupBlockManager::ResetPrefixCache() {
  if (!plans_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("reset of the prefix cache while ", plans_.size(),
                     " plans are in flight: commit or abort them first"));
  }
  if (!options_.enable_prefix_caching) return absl::OkStatus();
  for (BlockId b = 0; b < pool_.num_blocks(); ++b) index_.Unregister(b);
  pool_.ClearHashes();
  // A live sequence's later blocks would chain to hashes no longer cached.
  for (auto& [id, s] : sequences_) s.reset_cut = true;
  tables_per_hash_.clear();
  if (options_.observer != nullptr) options_.observer->OnAllBlocksCleared();
  return absl::OkStatus();
}

void GroupBlockManager::CommitSequence(Sequence& s) {
  for (BlockId& src : s.cow_src) {
    if (src == kNullBlock) continue;
    pool_.Release(src);  // The copy now holds this sequence's data.
    src = kNullBlock;
  }
  s.computed += s.reserved;
  s.reserved = 0;
  s.plan_id = 0;
  RegisterFull(s);
  ReleaseOutOfWindow(s);
}

void GroupBlockManager::Unreserve(Sequence& s, size_t tokens_before,
                                  const std::vector<size_t>& sizes_before) {
  ++s.version;  // Tables shrink or get their copied entry back.
  for (int32_t t = 0; t < num_tables(); ++t) {
    std::vector<BlockId>& table = s.tables[t];
    while (table.size() > sizes_before[t]) {
      pool_.Release(table.back());  // Unhashed: straight to the free list.
      table.pop_back();
      --held_[t];
    }
    if (s.cow_src[t] != kNullBlock) {
      BlockId& last = table[s.computed / options_.block_size];
      pool_.Release(last);  // The unhashed copy.
      last = s.cow_src[t];
      s.cow_src[t] = kNullBlock;
    }
  }
  s.tokens.resize(tokens_before);
  s.hashes.resize(
      std::min(s.hashes.size(), tokens_before / options_.block_size));
  s.reserved = 0;
  s.plan_id = 0;
}

absl::Status GroupBlockManager::Abort(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(absl::StrCat("plan ", plan_id, " not found"));
  }
  const Plan& plan = it->second;
  for (size_t i = 0; i < plan.sequences.size(); ++i) {
    auto s = sequences_.find(plan.sequences[i]);
    if (s == sequences_.end() || s->second.plan_id != plan_id) continue;
    Unreserve(s->second, plan.tokens_before[i], plan.sizes_before[i]);
  }
  plans_.erase(it);
  return absl::OkStatus();
}

void GroupBlockManager::ReleaseAll(Sequence& s) {
  // The tail first, so that a chain's last blocks are evicted before its
  // first.
  for (int32_t t = 0; t < num_tables(); ++t) {
    std::vector<BlockId>& table = s.tables[t];
    for (auto b = table.rbegin(); b != table.rend(); ++b) {
      if (*b == kNullBlock) continue;
      pool_.Release(*b);
      --held_[t];
    }
    table.clear();
  }
  if (s.has_tip) index_.ReleaseNode(s.hashes[s.registered - 1]);
  s.has_tip = false;
}

absl::Status GroupBlockManager::Free(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  Sequence& s = it->second;
  if (s.plan_id != 0) {
    const Plan& plan = plans_.find(s.plan_id)->second;
    for (size_t i = 0; i < plan.sequences.size(); ++i) {
      if (plan.sequences[i] == id) {
        Unreserve(s, plan.tokens_before[i], plan.sizes_before[i]);
        break;
      }
    }
  }
  ReleaseAll(s);
  sequences_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<absl::Span<const BlockId>> GroupBlockManager::BlockTable(
    SequenceId id, int32_t table) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  if (table < 0 || table >= num_tables()) {
    return absl::InvalidArgumentError(
        absl::StrCat("table ", table, " is not in [0, ", num_tables(), ")"));
  }
  return absl::MakeConstSpan(it->second.tables[table]);
}

absl::Status GroupBlockManager::TablesWithVersion(
    absl::Span<const SequenceId> ids, absl::Span<BlockTableRef> out) const {
  const size_t tables = static_cast<size_t>(num_tables());
  for (size_t i = 0; i < ids.size(); ++i) {
    auto it = sequences_.find(ids[i]);
    if (it == sequences_.end()) {
      return absl::NotFoundError(
          absl::StrCat("sequence ", ids[i], " not found"));
    }
    const Sequence& s = it->second;
    for (size_t t = 0; t < tables; ++t) {
      out[i * tables + t] = BlockTableRef{absl::MakeConstSpan(s.tables[t]),
                                          s.serial, s.version, s.released[t]};
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<HostBatchTable> GroupBlockManager::BatchTable(
    absl::Span<const SequenceId> ids, int32_t table) const {
  HostBatchTable out;
  out.num_sequences = static_cast<int32_t>(ids.size());
  std::vector<absl::Span<const BlockId>> rows;
  for (SequenceId id : ids) {
    absl::StatusOr<absl::Span<const BlockId>> row = BlockTable(id, table);
    if (!row.ok()) return row.status();
    rows.push_back(*row);
    out.max_blocks =
        std::max(out.max_blocks, static_cast<int32_t>(row->size()));
    out.num_blocks.push_back(static_cast<int32_t>(row->size()));
    out.seq_lens.push_back(
        static_cast<int32_t>(sequences_.find(id)->second.computed));
  }
  out.table.assign(static_cast<size_t>(out.num_sequences) * out.max_blocks, 0);
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy(rows[i].begin(), rows[i].end(),
              out.table.begin() + i * out.max_blocks);
  }
  return out;
}

absl::StatusOr<int64_t> GroupBlockManager::ComputedLength(SequenceId id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  return it->second.computed;
}

absl::StatusOr<int64_t> GroupBlockManager::KnownLength(SequenceId id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  return static_cast<int64_t>(it->second.tokens.size());
}

PoolUsage GroupBlockManager::Usage() const {
  return {pool_.num_blocks(), pool_.num_free(), pool_.num_cached(),
          pool_.num_used()};
}

absl::Status GroupBlockManager::Validate() const {
  if (absl::Status st = pool_.Validate(); !st.ok()) return st;
  std::vector<int32_t> refs(pool_.num_blocks(), 0);
  std::vector<int64_t> held(num_tables(), 0);
  std::vector<BlockHash> tips;
  for (const auto& [id, s] : sequences_) {
    for (int32_t t = 0; t < num_tables(); ++t) {
      const std::vector<BlockId>& table = s.tables[t];
      for (size_t b = 0; b < table.size(); ++b) {
        const bool released = static_cast<int64_t>(b) < s.released[t];
        if (released != (table[b] == kNullBlock)) {
          return absl::InternalError(absl::StrCat(
              "sequence ", id, " table ", t, " entry ", b, " is ", table[b],
              " but ", s.released[t], " leading entries are released"));
        }
        if (table[b] == kNullBlock) continue;
        ++refs[table[b]];
        ++held[t];
      }
      if (s.cow_src[t] != kNullBlock) {
        if (s.plan_id == 0) {
          return absl::InternalError(
              absl::StrCat("sequence ", id, " table ", t, " keeps copy source ",
                           s.cow_src[t], " outside a plan"));
        }
        ++refs[s.cow_src[t]];
      }
    }
    if (s.has_tip) tips.push_back(s.hashes[s.registered - 1]);
    if ((s.plan_id != 0) != (s.reserved != 0) ||
        (s.plan_id != 0 && !plans_.contains(s.plan_id))) {
      return absl::InternalError(
          absl::StrCat("sequence ", id, " has a broken reservation"));
    }
  }
  if (held != held_) {
    return absl::InternalError("the per-table held counts are off");
  }
  for (BlockId b = 0; b < pool_.num_blocks(); ++b) {
    if (pool_.ref_count(b) != refs[b]) {
      return absl::InternalError(absl::StrCat("block ", b, " has ref count ",
                                              pool_.ref_count(b), " but ",
                                              refs[b], " holders"));
    }
    if (pool_.hashed(b) != index_.IsRegistered(b)) {
      return absl::InternalError(
          absl::StrCat("block ", b, " hashed ", pool_.hashed(b),
                       " but registered ", index_.IsRegistered(b)));
    }
  }
  return index_.Validate(tips);
}

BlockId GroupBlockManager::RegisteredForTesting(
    int32_t table, absl::Span<const TokenId> prefix,
    const ExtraKey& extra) const {
  Sequence s;
  s.tokens.assign(prefix.begin(), prefix.end());
  s.root = HashExtraKey(extra.adapter_id, extra.salt);
  const bool enabled = options_.enable_prefix_caching;
  if (!enabled || s.tokens.empty()) return -1;
  HashKnown(s);
  if (index_.ConfirmedPrefix(s.root, s.hashes, s.tokens, options_.block_size) <
      static_cast<int64_t>(s.hashes.size())) {
    return -1;
  }
  return index_.Registered(table, s.hashes.back());
}

}  // namespace kvcache
