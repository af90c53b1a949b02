#include "allocator/prefix_cache_index.h"

#include <cstring>
#include <random>

#include "absl/base/macros.h"

namespace kvcache {
namespace internal {

PrefixCacheIndex::PrefixCacheIndex(int32_t num_blocks, int32_t block_size)
    : block_size_(block_size),
      table_(num_blocks, std::random_device{}()),
      hash_(num_blocks),
      content_id_(num_blocks, 0),
      parent_id_(num_blocks, 0),
      tokens_(static_cast<size_t>(num_blocks) * block_size) {}

uint64_t PrefixCacheIndex::Insert(const BlockHash& hash, BlockId block,
                                  uint64_t parent_id, const TokenId* tokens) {
  ABSL_ASSERT(!registered(block));
  table_.Insert(hash, block);
  hash_[block] = hash;
  parent_id_[block] = parent_id;
  content_id_[block] = NewId();
  std::memcpy(&tokens_[static_cast<size_t>(block) * block_size_], tokens,
              block_size_ * sizeof(TokenId));
  return content_id_[block];
}

void PrefixCacheIndex::Erase(BlockId block) {
  ABSL_ASSERT(registered(block));
  const bool erased = table_.Erase(hash_[block]);
  ABSL_ASSERT(erased);
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
