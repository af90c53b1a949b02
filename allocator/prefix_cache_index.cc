#include "allocator/prefix_cache_index.h"

#include <algorithm>
#include <cstring>
#include <random>

#include "absl/base/attributes.h"
#include "absl/base/macros.h"
#include "allocator/block_hash_fixed.h"

namespace kvcache {
namespace internal {

PrefixCacheIndex::PrefixCacheIndex(int32_t num_blocks, int32_t block_size)
    : block_size_(block_size),
      table_(num_blocks, std::random_device{}()),
      ids_(num_blocks),
      tokens_(static_cast<size_t>(num_blocks) * block_size) {}

namespace {

// LongestMatch's loop; kBlockSize 16 compiles the 64-byte compare inline, 0
// takes the block size at run time. Everything it reads is in locals (see
// BlockHashTable::Reader). The lookups are independent until the first miss,
// so they overlap: each table slot is prefetched kAhead blocks before it is
// read.
template <int32_t kBlockSize, typename Ids, typename Equal>
int64_t Longest(const BlockHashTable::Reader table, const TokenId* stored,
                const Ids* ids, int32_t block_size, const BlockHash* hashes,
                const TokenId* tokens, int64_t count, uint64_t parent,
                BlockId* blocks, uint64_t& last_id, Equal equal) {
  constexpr int64_t kAhead = 16;
  const size_t bs = kBlockSize != 0 ? kBlockSize : block_size;
  for (int64_t i = 0; i < std::min(kAhead, count); ++i)
    table.Prefetch(hashes[i]);
  int64_t i = 0;
  for (; i < count; ++i) {
    if (i + kAhead < count) table.Prefetch(hashes[i + kAhead]);
    const BlockId b = table.Find(hashes[i]);
    if (b < 0 || ids[b].parent != parent ||
        !equal(stored + static_cast<size_t>(b) * bs, tokens + i * bs)) {
      break;
    }
    parent = ids[b].content;
    blocks[i] = b;
  }
  last_id = parent;
  return i;
}

}  // namespace

int64_t PrefixCacheIndex::LongestMatch(const BlockHash* hashes,
                                       const TokenId* tokens, int64_t count,
                                       uint64_t root_id, BlockId* blocks,
                                       uint64_t& last_id) const {
  const BlockHashTable::Reader table = table_.reader();
  const int32_t bs = block_size_;
  if (bs == 16) {
    return Longest<16>(table, tokens_.data(), ids_.data(), bs, hashes, tokens,
                       count, root_id, blocks, last_id,
                       [](const TokenId* a, const TokenId* b) {
                         return TokensEqual(a, b, 16);
                       });
  }
  return Longest<0>(table, tokens_.data(), ids_.data(), bs, hashes, tokens,
                    count, root_id, blocks, last_id,
                    [bs](const TokenId* a, const TokenId* b) {
                      return TokensEqual(a, b, bs);
                    });
}

int64_t PrefixCacheIndex::HashAndMatch16(const BlockHash& root_hash,
                                         const TokenId* tokens, int64_t full,
                                         int64_t count, uint64_t root_id,
                                         std::vector<BlockHash>& hashes,
                                         BlockId* blocks,
                                         uint64_t& last_id) const {
  ABSL_ASSERT(block_size_ == 16 && count <= full);
  constexpr int64_t kAhead = 8;
  const BlockHashTable::Reader table = table_.reader();
  const TokenId* stored = tokens_.data();
  const Ids* ids = ids_.data();
  const size_t base = hashes.size();
  BlockHash h = root_hash;
  int64_t hashed = 0;
  const auto hash_next = [&]() ABSL_ATTRIBUTE_ALWAYS_INLINE {
    h = HashFixed<16>(h, tokens + hashed * 16);
    hashes.push_back(h);
    table.Prefetch(h);
    ++hashed;
  };
  while (hashed < std::min(kAhead, full)) hash_next();
  uint64_t parent = root_id;
  int64_t i = 0;
  for (; i < count; ++i) {
    if (hashed < full) hash_next();
    const BlockId b = table.Find(hashes[base + i]);
    if (b < 0 || ids[b].parent != parent ||
        !TokensEqual(stored + static_cast<size_t>(b) * 16, tokens + i * 16,
                     16)) {
      break;
    }
    parent = ids[b].content;
    blocks[i] = b;
  }
  last_id = parent;
  while (hashed < full) hash_next();
  return i;
}

BlockId PrefixCacheIndex::FindOrInsert(const BlockHash& hash, BlockId block,
                                       uint64_t parent_id,
                                       const TokenId* tokens,
                                       uint64_t& content_id) {
  ABSL_ASSERT(!registered(block));
  const BlockId existing = table_.FindOrInsert(hash, block);
  if (existing >= 0) return existing;
  content_id = Register(hash, block, parent_id, NewId(), tokens);
  return -1;
}

void PrefixCacheIndex::Restore(const BlockHash& hash, BlockId block,
                               uint64_t parent_id, uint64_t content_id,
                               const TokenId* tokens) {
  ABSL_ASSERT(!registered(block));
  const BlockId existing = table_.FindOrInsert(hash, block);
  ABSL_ASSERT(existing < 0);
  (void)existing;
  Register(hash, block, parent_id, content_id, tokens);
}

// The block's record and tokens, once the table holds it.
uint64_t PrefixCacheIndex::Register(const BlockHash& hash, BlockId block,
                                    uint64_t parent_id, uint64_t content_id,
                                    const TokenId* tokens) {
  if (IsRoot(parent_id)) AcquireRoot(parent_id);  // Cannot allocate.
  ids_[block].hash = hash;
  ids_[block].parent = parent_id;
  ids_[block].content = content_id;
  TokenId* stored = &tokens_[static_cast<size_t>(block) * block_size_];
  if (block_size_ == 16) {  // A fixed-size copy: no call.
    std::memcpy(stored, tokens, 16 * sizeof(TokenId));
  } else {
    std::memcpy(stored, tokens, block_size_ * sizeof(TokenId));
  }
  return ids_[block].content;
}

void PrefixCacheIndex::Erase(BlockId block) {
  ABSL_ASSERT(registered(block));
  const bool erased = table_.Erase(ids_[block].hash);
  ABSL_ASSERT(erased);
  (void)erased;
  if (IsRoot(ids_[block].parent)) ReleaseRoot(ids_[block].parent);
  ids_[block] = Ids{};
}

uint64_t PrefixCacheIndex::AcquireRoot(int64_t adapter_id,
                                       const std::string& salt) {
  auto [it, inserted] = roots_.try_emplace(RootKey(adapter_id, salt));
  if (inserted) {
    try {
      root_by_id_.emplace(next_root_, &*it);
    } catch (...) {
      roots_.erase(it);
      throw;
    }
    it->second.id = next_root_++;
  }
  ++it->second.refs;
  return it->second.id;
}

uint64_t PrefixCacheIndex::FindRoot(int64_t adapter_id,
                                    const std::string& salt) const {
  auto it = roots_.find(RootKey(adapter_id, salt));
  return it == roots_.end() ? 0 : it->second.id;
}

void PrefixCacheIndex::AcquireRoot(uint64_t root_id) {
  auto it = root_by_id_.find(root_id);
  ABSL_ASSERT(it != root_by_id_.end());
  ++it->second->second.refs;
}

void PrefixCacheIndex::ReleaseRoot(uint64_t root_id) {
  auto it = root_by_id_.find(root_id);
  ABSL_ASSERT(it != root_by_id_.end() && it->second->second.refs > 0);
  if (--it->second->second.refs > 0) return;
  roots_.erase(it->second->first);
  root_by_id_.erase(it);
}

int64_t PrefixCacheIndex::root_refs(uint64_t root_id) const {
  auto it = root_by_id_.find(root_id);
  return it == root_by_id_.end() ? 0 : it->second->second.refs;
}

}  // namespace internal
}  // namespace kvcache
