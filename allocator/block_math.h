// BlockMath: token position -> (block, offset) arithmetic for one block size,
// and ReserveGeometric, the amortized growth of the allocator's vectors.
// Internal to //allocator; header-only, since both run on the per-token path.

#ifndef KVCACHE_ALLOCATOR_BLOCK_MATH_H_
#define KVCACHE_ALLOCATOR_BLOCK_MATH_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/base/attributes.h"

namespace kvcache {
namespace internal {

// Shifts when the block size is a power of two: a 64-bit division costs tens
// of cycles on the per-token path.
class BlockMath {
 public:
  // REQUIRES: block_size >= 1.
  explicit BlockMath(int64_t block_size)
      : size_(block_size),
        shift_((block_size & (block_size - 1)) == 0
                   ? __builtin_ctzll(static_cast<uint64_t>(block_size))
                   : -1) {}
  int64_t size() const { return size_; }
  // REQUIRES: x >= 0.
  int64_t Div(int64_t x) const { return shift_ >= 0 ? x >> shift_ : x / size_; }
  int64_t Mod(int64_t x) const {
    return shift_ >= 0 ? x & (size_ - 1) : x % size_;
  }
  int64_t CeilDiv(int64_t x) const { return Div(x + size_ - 1); }
  bool pow2() const { return shift_ >= 0; }

 private:
  int64_t size_;
  int shift_;
};

// Grows `v`'s capacity to at least `n` geometrically, so that per-step
// reservations stay amortized O(1). May throw std::bad_alloc, changing nothing.
template <class T>
ABSL_ATTRIBUTE_ALWAYS_INLINE inline void ReserveGeometric(std::vector<T>& v,
                                                          size_t n) {
  if (v.capacity() < n) v.reserve(std::max(n, 2 * v.capacity()));
}

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_MATH_H_
