// GroupPrefixIndex: the prefix cache of a GroupBlockManager. Which block of
// which table holds the K/V of a chain of full blocks, confirmed exactly.
//
// Every distinct chain of full blocks ever registered is a node keyed by its
// chained hash, holding the block's token ids and its parent's hash. A query
// walks the nodes from the root and trusts a node only when its tokens and
// parent equal the query's, so the walk confirms the whole prefix token by
// token: a colliding hash (accidental or crafted) ends the walk, it never
// hands over another prefix's blocks. A node lives while a registered block,
// a child node or a live sequence (its chain tip) refers to it, so a sliding
// window's block stays confirmable after the blocks before it are evicted.
//
// Per table, a map from node hash to the one block registered for it (a
// second block with the same content stays unregistered). Not thread-safe;
// owned by GroupBlockManager.

#ifndef KVCACHE_ALLOCATOR_GROUP_PREFIX_INDEX_H_
#define KVCACHE_ALLOCATOR_GROUP_PREFIX_INDEX_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "allocator/block_hash.h"
#include "core/ids.h"

namespace kvcache {
namespace internal {

class GroupPrefixIndex {
 public:
  GroupPrefixIndex(int32_t num_tables, int32_t num_blocks);

  GroupPrefixIndex(const GroupPrefixIndex&) = delete;
  GroupPrefixIndex& operator=(const GroupPrefixIndex&) = delete;

  // The longest run of `hashes` (a chain from `root`, block i's tokens at
  // tokens[i * block_size]) whose nodes exist and match exactly.
  int64_t ConfirmedPrefix(const BlockHash& root,
                          absl::Span<const BlockHash> hashes,
                          absl::Span<const TokenId> tokens,
                          int32_t block_size) const;

  // The block registered for `hash` in `table`, or -1.
  BlockId Registered(int32_t table, const BlockHash& hash) const;

  // Makes the node of `hash` (parent `parent`, a node unless
  // parent_is_node is false: the first block, whose parent is the root;
  // `tokens`) exist and takes a reference on it for the caller (its chain
  // tip). False (no change) when a different node already has this hash.
  // REQUIRES: a parent node exists.
  bool AcquireTip(const BlockHash& parent, bool parent_is_node,
                  const BlockHash& hash, absl::Span<const TokenId> tokens);
  // Takes / drops a chain-tip reference on an existing node.
  void AcquireNode(const BlockHash& hash);
  void ReleaseNode(const BlockHash& hash);

  // Registers `block` for node `hash` in `table`. False (no change) when the
  // table already has a block for it. REQUIRES: the node exists.
  bool Register(int32_t table, const BlockHash& hash, BlockId block);
  // Drops an evicted block's registration, if any.
  void Unregister(BlockId block);
  bool IsRegistered(BlockId block) const { return meta_[block].table >= 0; }
  // The node hash a registered block is registered for.
  const BlockHash& RegisteredHash(BlockId block) const {
    return meta_[block].hash;
  }
  // Every hash registered in at least one table (for tests; O(entries)).
  std::vector<BlockHash> RegisteredHashes() const;

  // Nodes, registrations and their reference counts agree; `tips` are the
  // live sequences' chain tips.
  absl::Status Validate(absl::Span<const BlockHash> tips) const;
  size_t num_nodes() const { return nodes_.size(); }

 private:
  struct Node {
    BlockHash parent;
    std::vector<TokenId> tokens;
    int32_t refs = 0;  // Children + registered blocks + chain tips.
    bool has_parent = false;
  };
  struct BlockMeta {
    int32_t table = -1;  // -1: not registered.
    BlockHash hash;
  };

  void Unref(BlockHash hash);

  absl::flat_hash_map<BlockHash, Node> nodes_;
  std::vector<absl::flat_hash_map<BlockHash, BlockId>> tables_;
  std::vector<BlockMeta> meta_;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_GROUP_PREFIX_INDEX_H_
