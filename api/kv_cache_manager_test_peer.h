// KVCacheManagerTestPeer: test seams of KVCacheManager. Not for engines.
//
// CreateWithDevice builds a manager on a caller-supplied Device (e.g. one that
// fails chosen allocations), so tests can reach every allocation point at
// Create and during operation. DisableCacheWrites turns Append's kernel into a
// no-op (a no-op device for the write path).

#ifndef KVCACHE_API_KV_CACHE_MANAGER_TEST_PEER_H_
#define KVCACHE_API_KV_CACHE_MANAGER_TEST_PEER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "api/kv_cache_manager.h"
#include "core/kv_event.h"
#include "storage/device.h"
#include "storage/tier_copier.h"

namespace kvcache {

class KVCacheManagerTestPeer {
 public:
  // Like KVCacheManager::Create, on `device` instead of the config's backend
  // (whose memory kind must still match `device`'s kind).
  static absl::StatusOr<std::unique_ptr<KVCacheManager>> CreateWithDevice(
      const KVCacheConfig& config, std::unique_ptr<Device> device);
  // The host tier's copy queue (delay and failure seams), or null without a
  // tier. Valid while the manager lives.
  static TierCopier* HostTierCopier(KVCacheManager& manager);

  // The external (64-bit, events/external_hash.h) hashes of every block the
  // manager holds registered in `medium`, in no particular order: what a KV
  // events subscriber should have rebuilt (kHost: the host tier's; none
  // without one).
  static std::vector<uint64_t> CachedHashesForTesting(
      const KVCacheManager& manager, KVEventMedium medium);
  // Makes every later Append's kernel a no-op (nothing written), so that a
  // benchmark times Append's own host work: checks, bookkeeping, dispatch.
  static void DisableCacheWrites(KVCacheManager& manager);
  // Makes the graph step upload its inputs as on a GPU (one copy from the
  // buffers' start to the last changed byte) on the CPU backend too, which
  // otherwise copies each run of changed bytes (api/graph_step_buffers.h).
  // No-op without graph step buffers.
  static void CoalesceGraphStepUploads(KVCacheManager& manager);
};

}  // namespace kvcache

#endif  // KVCACHE_API_KV_CACHE_MANAGER_TEST_PEER_H_
