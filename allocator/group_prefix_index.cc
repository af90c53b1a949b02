#include "allocator/group_prefix_index.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {

GroupPrefixIndex::GroupPrefixIndex(int32_t num_tables, int32_t num_blocks)
    : tables_(num_tables), meta_(num_blocks) {}

int64_t GroupPrefixIndex::ConfirmedPrefix(const BlockHash& root,
                                          absl::Span<const BlockHash> hashes,
                                          absl::Span<const TokenId> tokens,
                                          int32_t block_size) const {
  for (size_t i = 0; i < hashes.size(); ++i) {
    auto it = nodes_.find(hashes[i]);
    if (it == nodes_.end()) return static_cast<int64_t>(i);
    const Node& n = it->second;
    const bool parent_ok = i == 0 ? !n.has_parent && n.parent == root
                                  : n.has_parent && n.parent == hashes[i - 1];
    const TokenId* block = tokens.data() + i * block_size;
    if (!parent_ok || !std::equal(n.tokens.begin(), n.tokens.end(), block,
                                  block + block_size)) {
      return static_cast<int64_t>(i);
    }
  }
  return static_cast<int64_t>(hashes.size());
}

BlockId GroupPrefixIndex::Registered(int32_t table,
                                     const BlockHash& hash) const {
  auto it = tables_[table].find(hash);
  return it == tables_[table].end() ? -1 : it->second;
}

bool GroupPrefixIndex::AcquireTip(const BlockHash& parent, bool parent_is_node,
                                  const BlockHash& hash,
                                  absl::Span<const TokenId> tokens) {
  auto [it, inserted] = nodes_.try_emplace(hash);
  Node& n = it->second;
  if (inserted) {
    n.parent = parent;
    n.has_parent = parent_is_node;
    n.tokens.assign(tokens.begin(), tokens.end());
    if (parent_is_node) ++nodes_.find(parent)->second.refs;
  } else if (n.parent != parent || n.has_parent != parent_is_node ||
             !std::equal(n.tokens.begin(), n.tokens.end(), tokens.begin(),
                         tokens.end())) {
    return false;  // Another chain has this hash: never share with it.
  }
  ++n.refs;
  return true;
}

void GroupPrefixIndex::AcquireNode(const BlockHash& hash) {
  ++nodes_.find(hash)->second.refs;
}

void GroupPrefixIndex::ReleaseNode(const BlockHash& hash) { Unref(hash); }

void GroupPrefixIndex::Unref(BlockHash hash) {
  while (true) {
    auto it = nodes_.find(hash);
    if (--it->second.refs > 0) return;
    const bool has_parent = it->second.has_parent;
    const BlockHash parent = it->second.parent;
    nodes_.erase(it);
    if (!has_parent) return;
    hash = parent;  // The child's reference on its parent goes too.
  }
}

bool GroupPrefixIndex::Register(int32_t table, const BlockHash& hash,
                                BlockId block) {
  if (!tables_[table].try_emplace(hash, block).second) return false;
  meta_[block] = {table, hash};
  ++nodes_.find(hash)->second.refs;
  return true;
}

std::vector<BlockHash> GroupPrefixIndex::RegisteredHashes() const {
  absl::flat_hash_map<BlockHash, bool> seen;
  std::vector<BlockHash> out;
  for (const auto& table : tables_) {
    for (const auto& [hash, block] : table) {
      if (seen.emplace(hash, true).second) out.push_back(hash);
    }
  }
  return out;
}

void GroupPrefixIndex::Unregister(BlockId block) {
  BlockMeta& m = meta_[block];
  if (m.table < 0) return;
  tables_[m.table].erase(m.hash);
  const BlockHash hash = m.hash;
  m = BlockMeta{};
  Unref(hash);
}

absl::Status GroupPrefixIndex::Validate(
    absl::Span<const BlockHash> tips) const {
  absl::flat_hash_map<BlockHash, int32_t> refs;
  for (const auto& [hash, node] : nodes_) {
    if (node.has_parent) {
      if (!nodes_.contains(node.parent)) {
        return absl::InternalError("a prefix node's parent is gone");
      }
      ++refs[node.parent];
    }
  }
  for (size_t t = 0; t < tables_.size(); ++t) {
    for (const auto& [hash, block] : tables_[t]) {
      if (meta_[block].table != static_cast<int32_t>(t) ||
          meta_[block].hash != hash) {
        return absl::InternalError(
            absl::StrCat("block ", block, " is registered in table ", t,
                         " but its entry says table ", meta_[block].table));
      }
      if (!nodes_.contains(hash)) {
        return absl::InternalError(
            absl::StrCat("block ", block, " has no prefix node"));
      }
      ++refs[hash];
    }
  }
  size_t registered = 0;
  for (const BlockMeta& m : meta_) registered += m.table >= 0;
  size_t in_tables = 0;
  for (const auto& t : tables_) in_tables += t.size();
  if (registered != in_tables) {
    return absl::InternalError(absl::StrCat(registered,
                                            " blocks say they are "
                                            "registered, the tables hold ",
                                            in_tables));
  }
  for (const BlockHash& tip : tips) ++refs[tip];
  for (const auto& [hash, node] : nodes_) {
    auto it = refs.find(hash);
    const int32_t expected = it == refs.end() ? 0 : it->second;
    if (node.refs != expected || expected == 0) {
      return absl::InternalError(absl::StrCat(
          "a prefix node has ", node.refs, " references, expected ", expected));
    }
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvcache
