// BlockManager::Validate: the invariants of DESIGN.md section 4, checked from
// scratch.

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/block_manager_impl.h"

namespace kvcache {

// The prefix-cache chain of `s`: hashes for at least every full computed
// block and at most every full known one, every full computed block chained,
// and each registered one registered under the sequence's hash for it.
absl::Status BlockManager::Impl::ValidateChain(const Sequence& s,
                                               const std::string& name) const {
  const int64_t bs = options_.block_size;
  const int64_t known = s.known(bs);
  if (s.prefix_blocks < 0 || s.prefix_blocks > s.computed / bs ||
      s.prefix_blocks > s.chained_blocks) {
    return absl::InternalError(absl::StrCat(
        name, s.prefix_blocks, " prefix blocks without stored tokens for ",
        s.computed, " computed tokens and ", s.chained_blocks,
        " chained blocks"));
  }
  const size_t full = static_cast<size_t>(s.computed / bs);
  if (s.hashes.size() < full ||
      s.chained_blocks != static_cast<int64_t>(full) ||
      s.hashes.size() > static_cast<size_t>(known / bs)) {
    return absl::InternalError(
        absl::StrCat(name, s.hashes.size(), " hashes and ", s.chained_blocks,
                     " chained blocks for ", full, " full computed blocks"));
  }
  for (size_t i = 0; i < full; ++i) {
    const BlockId b = s.blocks[i];
    if (!index_.registered(b)) continue;
    if (index_.hash(b) != s.hashes[i]) {
      return absl::InternalError(
          absl::StrCat(name, "block ", b, " is registered under another hash"));
    }
    // What the index stored for the block is this sequence's own: its tokens
    // (where the sequence still holds them), and its chain (issue #12).
    if (static_cast<int64_t>(i) >= s.prefix_blocks &&
        std::memcmp(index_.stored_tokens(b), s.token(i * bs, bs),
                    bs * sizeof(TokenId)) != 0) {
      return absl::InternalError(absl::StrCat(
          name, "block ", b, " is registered with other tokens than its own"));
    }
    const uint64_t parent = i == 0 ? s.root_id
                                   : (index_.registered(s.blocks[i - 1])
                                          ? index_.content_id(s.blocks[i - 1])
                                          : index_.parent_id(b));
    if (index_.parent_id(b) != parent) {
      return absl::InternalError(
          absl::StrCat(name, "block ", b, " is registered under parent ",
                       index_.parent_id(b), ", not ", parent, " of its chain"));
    }
  }
  return absl::OkStatus();
}

// The partial last block of a sequence that says it is its alone
// (tail_maybe_shared false) has no other holder.
absl::Status BlockManager::Impl::ValidateTail(const Sequence& s,
                                              const std::string& name) const {
  const int64_t end = s.computed + s.reserved;
  if (s.tail_maybe_shared || s.tail_block < 0 || math_.Mod(end) == 0) {
    return absl::OkStatus();
  }
  if (pool_.ref_count(s.tail_block) != 1) {
    return absl::InternalError(absl::StrCat(
        name, "partial tail block ", s.tail_block, " has ",
        pool_.ref_count(s.tail_block),
        " holders but is marked as not shared: a write would reach them"));
  }
  return absl::OkStatus();
}

// Every root of the prefix index is held exactly by the sequences and the
// registered first blocks that name it, and by at least one.
absl::Status BlockManager::Impl::ValidateRoots() const {
  std::unordered_map<uint64_t, int64_t> holders;
  for (const auto& [id, seq] : sequences_) {
    if (!internal::PrefixCacheIndex::IsRoot(seq->root_id)) {
      return absl::InternalError(absl::StrCat(
          "sequence ", id, ": root ", seq->root_id, " is not a root id"));
    }
    ++holders[seq->root_id];
  }
  for (BlockId b = 0; b < pool_.num_blocks(); ++b) {
    if (index_.registered(b) &&
        internal::PrefixCacheIndex::IsRoot(index_.parent_id(b))) {
      ++holders[index_.parent_id(b)];
    }
  }
  if (holders.size() != index_.num_roots()) {
    return absl::InternalError(absl::StrCat(
        index_.num_roots(), " prefix roots but ", holders.size(), " are held"));
  }
  for (const auto& [root, count] : holders) {
    if (index_.root_refs(root) != count) {
      return absl::InternalError(
          absl::StrCat("prefix root ", root, " has ", index_.root_refs(root),
                       " references but ", count, " holders"));
    }
  }
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::ValidateSequence(
    const Sequence& s, std::vector<int32_t>& refs) const {
  const int64_t bs = options_.block_size;
  const int64_t end = s.computed + s.reserved;
  const std::string name = absl::StrCat("sequence ", s.id, ": ");
  const int64_t known = s.known(bs);
  if (s.computed < 0 || s.reserved < 0 || end > known) {
    return absl::InternalError(absl::StrCat(name, s.computed, " computed + ",
                                            s.reserved, " reserved of ", known,
                                            " known tokens"));
  }
  if (static_cast<int64_t>(s.blocks.size()) != (end + bs - 1) / bs) {
    return absl::InternalError(
        absl::StrCat(name, s.blocks.size(), " blocks for ", end, " tokens"));
  }
  if ((s.plan_id == 0) != (s.reserved == 0) ||
      (s.cow_src >= 0 && s.plan_id == 0)) {
    return absl::InternalError(
        absl::StrCat(name, "plan ", s.plan_id, " with ", s.reserved,
                     " reserved tokens, copy source ", s.cow_src));
  }
  if (s.plan_id != 0 && plans_.count(s.plan_id) == 0) {
    return absl::InternalError(
        absl::StrCat(name, "plan ", s.plan_id, " does not exist"));
  }
  if (s.tail_block != (s.blocks.empty() ? -1 : s.blocks.back())) {
    return absl::InternalError(absl::StrCat(name, "tail block ", s.tail_block,
                                            " is not its last block"));
  }
  for (BlockId b : s.blocks) {
    if (b < 0 || b >= pool_.num_blocks())
      return absl::InternalError(absl::StrCat(name, "block ", b));
    ++refs[b];
  }
  if (s.cow_src >= 0) ++refs[s.cow_src];
  if (absl::Status status = ValidateTail(s, name); !status.ok()) return status;
  if (options_.enable_prefix_caching) return ValidateChain(s, name);
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::ValidateIndex() const {
  int32_t hashed = 0;
  for (BlockId b = 0; b < pool_.num_blocks(); ++b) {
    if (pool_.hashed(b)) ++hashed;
    if (options_.enable_prefix_caching &&
        pool_.hashed(b) != index_.registered(b)) {
      return absl::InternalError(
          absl::StrCat("block ", b, ": hashed ", pool_.hashed(b),
                       " but registered ", index_.registered(b)));
    }
  }
  if (static_cast<size_t>(hashed) != index_.size()) {
    return absl::InternalError(absl::StrCat(hashed, " hashed blocks but ",
                                            index_.size(), " index entries"));
  }
  absl::Status status;
  index_.table().ForEach([&](const BlockHash& hash, BlockId b) {
    if (!status.ok()) return;
    if (b < 0 || b >= pool_.num_blocks() || !pool_.hashed(b) ||
        index_.hash(b) != hash || index_.Find(hash) != b) {
      status = absl::InternalError(
          absl::StrCat("index entry for block ", b, " is stale"));
    } else if (pool_.state(b) == internal::BlockState::kFree) {
      status = absl::InternalError(absl::StrCat("index holds free block ", b));
    }
  });
  if (!status.ok()) return status;
  return absl::OkStatus();
}

// Every plan lists each of its sequences exactly once (and every sequence with
// a plan is listed by it, given ValidateSequence's check that its plan exists).
absl::Status BlockManager::Impl::ValidatePlans() const {
  std::vector<const Sequence*> all;
  for (const auto& [plan_id, record] : plans_) {
    for (const Sequence* s : record->sequences) {
      if (s == nullptr) continue;
      if (s->plan_id != plan_id) {
        return absl::InternalError(absl::StrCat("plan ", plan_id,
                                                " lists sequence ", s->id,
                                                " whose plan is ", s->plan_id));
      }
      all.push_back(s);
    }
  }
  std::sort(all.begin(), all.end());
  if (auto twice = std::adjacent_find(all.begin(), all.end());
      twice != all.end()) {
    return absl::InternalError(
        absl::StrCat("sequence ", (*twice)->id, " is listed twice by plans"));
  }
  size_t pending = 0;
  for (const auto& [id, seq] : sequences_) pending += seq->plan_id != 0;
  if (pending != all.size()) {
    return absl::InternalError(absl::StrCat(pending,
                                            " sequences have a plan but plans "
                                            "list ",
                                            all.size()));
  }
  if (plans_.size() + spare_records_.size() != records_.size()) {
    return absl::InternalError(
        absl::StrCat(plans_.size(), " plans and ", spare_records_.size(),
                     " spare records, but ", records_.size(), " records"));
  }
  return absl::OkStatus();
}

absl::Status BlockManager::Impl::Validate() const {
  if (absl::Status s = pool_.Validate(); !s.ok()) return s;
  std::vector<int32_t> refs(pool_.num_blocks(), 0);
  for (const auto& [id, seq] : sequences_) {
    if (seq->id != id)
      return absl::InternalError(
          absl::StrCat("sequence ", id, " has id ", seq->id));
    if (by_id_.Find(id) != seq.get())
      return absl::InternalError(
          absl::StrCat("sequence ", id, " is missing from the id index"));
    if (absl::Status s = ValidateSequence(*seq, refs); !s.ok()) return s;
  }
  if (by_id_.size() != sequences_.size()) {
    return absl::InternalError(absl::StrCat("the id index holds ",
                                            by_id_.size(), " sequences, not ",
                                            sequences_.size()));
  }
  for (BlockId b = 0; b < pool_.num_blocks(); ++b) {
    if (refs[b] != pool_.ref_count(b)) {
      return absl::InternalError(absl::StrCat("block ", b, " has ref count ",
                                              pool_.ref_count(b), " but ",
                                              refs[b], " holders"));
    }
  }
  if (absl::Status s = ValidatePlans(); !s.ok()) return s;
  if (absl::Status s = ValidateIndex(); !s.ok()) return s;
  return options_.enable_prefix_caching ? ValidateRoots() : absl::OkStatus();
}

}  // namespace kvcache
