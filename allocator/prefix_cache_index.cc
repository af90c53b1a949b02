#include "allocator/prefix_cache_index.h"

#include <cstring>
#include <utility>

#include "absl/base/macros.h"

namespace kvcache {
namespace internal {

PrefixCacheIndex::PrefixCacheIndex(int32_t num_blocks, int32_t block_size)
    : block_size_(block_size),
      hash_(num_blocks),
      content_id_(num_blocks, 0),
      parent_id_(num_blocks, 0),
      tokens_(static_cast<size_t>(num_blocks) * block_size) {}

bool PrefixCacheIndex::Matches(BlockId block, uint64_t parent_id,
                               absl::Span<const TokenId> tokens) const {
  ABSL_ASSERT(registered(block));
  return parent_id_[block] == parent_id &&
         tokens.size() == static_cast<size_t>(block_size_) &&
         std::memcmp(&tokens_[static_cast<size_t>(block) * block_size_],
                     tokens.data(), tokens.size() * sizeof(TokenId)) == 0;
}

uint64_t PrefixCacheIndex::Insert(const BlockHash& hash, BlockId block,
                                  uint64_t parent_id,
                                  absl::Span<const TokenId> tokens) {
  ABSL_ASSERT(!registered(block));
  ABSL_ASSERT(tokens.size() == static_cast<size_t>(block_size_));
  bool inserted;
  if (!spare_.empty()) {
    Map::node_type node = spare_.extract(spare_.begin());
    node.key() = hash;
    node.mapped() = block;
    inserted = map_.insert(std::move(node)).inserted;
  } else {
    inserted = map_.emplace(hash, block).second;
  }
  ABSL_ASSERT(inserted);
  (void)inserted;
  hash_[block] = hash;
  parent_id_[block] = parent_id;
  content_id_[block] = NewId();
  std::memcpy(&tokens_[static_cast<size_t>(block) * block_size_], tokens.data(),
              tokens.size() * sizeof(TokenId));
  return content_id_[block];
}

void PrefixCacheIndex::Reserve(size_t n) {
  map_.reserve(map_.size() + n);
  uint64_t key = spare_.size();
  while (spare_.size() < n) spare_.emplace(BlockHash{++key, 0}, -1);
}

void PrefixCacheIndex::Erase(BlockId block) {
  ABSL_ASSERT(registered(block));
  const size_t erased = map_.erase(hash_[block]);
  ABSL_ASSERT(erased == 1);
  (void)erased;
  content_id_[block] = 0;
  parent_id_[block] = 0;
}

uint64_t PrefixCacheIndex::RootId(int64_t adapter_id, const std::string& salt) {
  auto [it, inserted] = roots_.try_emplace(std::make_pair(adapter_id, salt), 0);
  if (inserted) it->second = NewId();
  return it->second;
}

}  // namespace internal
}  // namespace kvcache
