// Without a CUDA toolkit the read floors report "no CUDA" (-1).

#include "benchmarks/read_floor.h"

namespace kvcache::bench {

int LaunchPagedRead(const PagedReadParams&, int, void*) { return -1; }
int LaunchLinearRead(const void*, int64_t, uint32_t*, int, void*) {
  return -1;
}

}  // namespace kvcache::bench
