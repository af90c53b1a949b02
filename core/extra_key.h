// ExtraKey is the part of a block's prefix-cache identity besides its tokens
// (DESIGN.md section 4): blocks of different extra keys never share. Plain
// value type; thread-compatible.

#ifndef KVCACHE_CORE_EXTRA_KEY_H_
#define KVCACHE_CORE_EXTRA_KEY_H_

#include <cstdint>
#include <string>

namespace kvcache {

struct ExtraKey {
  int64_t adapter_id = 0;  // e.g. a LoRA adapter; 0 = none.
  std::string salt;        // Per-tenant salt, as bytes; empty = none.
};

}  // namespace kvcache

#endif  // KVCACHE_CORE_EXTRA_KEY_H_
