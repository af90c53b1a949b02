// The previous kernels' row split (row = token * heads + head, with a 32-bit
// division when the numbers allow it), kept for the v0 copies beside it; the
// current kernels use FastDivmod (kernels/fast_divmod.h).

#ifndef KVCACHE_V0_SPLIT_ROW_CUH_
#define KVCACHE_V0_SPLIT_ROW_CUH_

#include <cstdint>

namespace kvcache::v0 {

__device__ __forceinline__ void SplitRow(int64_t row, int64_t heads,
                                         int64_t* token, int64_t* head) {
  if (row <= 0xFFFFFFFFll && heads <= 0xFFFFFFFFll) {
    const uint32_t r = static_cast<uint32_t>(row);
    const uint32_t h = static_cast<uint32_t>(heads);
    const uint32_t t = r / h;
    *token = t;
    *head = r - t * h;
  } else {
    *token = row / heads;
    *head = row - *token * heads;
  }
}

}  // namespace kvcache::v0

#endif  // KVCACHE_V0_SPLIT_ROW_CUH_
