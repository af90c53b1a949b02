// What the C API's sources share (kvcache_c.cc, kvcache_c_spec.cc): the
// handle's definition and the recording of a failed call as the calling
// thread's last error and last shortfall. Internal to api/.

#ifndef KVCACHE_API_KVCACHE_C_INTERNAL_H_
#define KVCACHE_API_KVCACHE_C_INTERNAL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "api/kv_cache_manager.h"
#include "api/kvcache_c.h"

struct kvcache_manager {
  std::unique_ptr<kvcache::KVCacheManager> impl;
  // Host copies of the slot mappings of the plans in flight
  // (kvcache_plan::host_slot_mapping), until their commit or abort. A map:
  // its node is made before Reserve and inserted after it without allocating.
  std::mutex mu;
  std::map<uint64_t, std::vector<int64_t>> host_slots;
};

namespace kvcache::c_api {

// Maps `status` to a kvcache_status; a failure becomes the thread's last
// error (and its shortfall, if any, the last shortfall). Never throws.
kvcache_status RecordStatus(const absl::Status& status) noexcept;
// Keeps the shortfall of a failed call (or none) for kvcache_last_shortfall.
void NoteShortfall(const absl::Status& status) noexcept;

}  // namespace kvcache::c_api

#endif  // KVCACHE_API_KVCACHE_C_INTERNAL_H_
