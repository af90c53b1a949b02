#include "events/msgpack_encoder.h"

#include <cstring>

#include "msgpack.hpp"

namespace kvcache {
namespace internal {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void PackString(Packer& pk, const char* s) {
  const size_t n = std::strlen(s);
  pk.pack_str(static_cast<uint32_t>(n));
  pk.pack_str_body(s, static_cast<uint32_t>(n));
}

void PackHashes(Packer& pk, const KVEvent& e) {
  pk.pack_array(static_cast<uint32_t>(e.block_hashes.size()));
  for (const uint64_t h : e.block_hashes) pk.pack_uint64(h);
}

void PackMedium(Packer& pk, KVEventMedium medium) {
  PackString(pk, medium == KVEventMedium::kHost ? kMediumHost : kMediumDevice);
}

void PackEvent(Packer& pk, const KVEvent& e) {
  switch (e.type) {
    case KVEventType::kBlockStored:
      pk.pack_array(7);
      PackString(pk, "BlockStored");
      PackHashes(pk, e);
      if (e.has_parent) {
        pk.pack_uint64(e.parent_block_hash);
      } else {
        pk.pack_nil();
      }
      pk.pack_array(static_cast<uint32_t>(e.token_ids.size()));
      for (const int32_t t : e.token_ids) pk.pack_int32(t);
      pk.pack_int32(e.block_size);
      if (e.adapter_id != 0) {
        pk.pack_int64(e.adapter_id);
      } else {
        pk.pack_nil();
      }
      PackMedium(pk, e.medium);
      return;
    case KVEventType::kBlockRemoved:
      pk.pack_array(3);
      PackString(pk, "BlockRemoved");
      PackHashes(pk, e);
      PackMedium(pk, e.medium);
      return;
    case KVEventType::kAllBlocksCleared:
      pk.pack_array(1);
      PackString(pk, "AllBlocksCleared");
      return;
  }
}

}  // namespace

std::string EncodeEventBatch(const KVEventBatch& batch,
                             int32_t data_parallel_rank) {
  msgpack::sbuffer buffer;
  Packer pk(buffer);
  pk.pack_array(3);
  pk.pack_double(batch.timestamp);
  pk.pack_array(static_cast<uint32_t>(batch.events.size()));
  for (const KVEvent& e : batch.events) PackEvent(pk, e);
  pk.pack_int32(data_parallel_rank);
  return std::string(buffer.data(), buffer.size());
}

}  // namespace internal
}  // namespace kvcache
