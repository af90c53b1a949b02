#include "fuzz/group_harness.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "allocator/group_block_manager.h"
#include "api/kv_cache_config.h"

namespace kvcache {
namespace {

class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  int Range(int n) { return Byte() % n; }
  // Mostly small, sometimes hostile.
  int32_t Int() {
    static const int32_t kHostile[] = {0, -1, 1 << 30, INT32_MIN, INT32_MAX};
    const uint8_t b = Byte();
    return b < 200 ? b % 40 : kHostile[b % 5];
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

void Fail(const char* what, const absl::Status& s) {
  std::fprintf(stderr, "group fuzzer: %s: %s\n", what, s.ToString().c_str());
  std::abort();
}

// A config of hostile layer groups: ValidateConfig either refuses it with
// InvalidArgument or accepts it, and then its paging covers every layer once.
void FuzzConfig(Bytes& in) {
  KVCacheConfig c;
  c.num_layers = 1 + in.Range(8);
  c.block_size = 1 + in.Range(16);
  c.num_blocks = 1 + in.Range(64);
  const int groups = in.Range(4);
  for (int g = 0; g < groups; ++g) {
    LayerGroup& lg = c.layer_groups.emplace_back();
    const int n = in.Range(5);
    for (int i = 0; i < n; ++i) lg.layers.push_back(in.Int() % 10);
    lg.kind = static_cast<AttentionKind>(in.Range(3));
    lg.sliding_window = in.Int();
    lg.num_kv_heads = in.Int();
    lg.head_size = 8 * in.Range(5) + (in.Range(4) == 0 ? 3 : 0);
    lg.head_size_v = 8 * in.Range(3);
    lg.cache_dtype = static_cast<DType>(in.Range(6));
  }
  const absl::Status s = ValidateConfig(c);
  if (!s.ok()) {
    if (s.code() != absl::StatusCode::kInvalidArgument || s.message().empty()) {
      Fail("ValidateConfig", s);
    }
    return;
  }
  if (c.layer_groups.empty()) return;
  const GroupPaging p = ConfigPaging(c);
  std::vector<int> seen(c.num_layers, 0);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    if (p.layer_table[l] < 0 || p.layer_slot[l] < 0 ||
        p.layer_slot[l] >= p.layers_per_page) {
      Fail("paging", absl::InternalError("a layer has no table or slot"));
    }
  }
  if (!BlockBytesAllLayers(c).ok()) Fail("BlockBytesAllLayers", s);
}

struct Ref {
  int64_t computed = 0;
  int64_t known = 0;
};

void FuzzManager(Bytes& in) {
  GroupBlockManagerOptions o;
  o.block_size = 1 + in.Range(4);
  o.num_blocks = 4 + in.Range(40);
  o.enable_prefix_caching = (in.Byte() & 1) == 0;
  const int tables = 1 + in.Range(3);
  for (int t = 0; t < tables; ++t) {
    o.windows.push_back(in.Range(3) == 0 ? 0 : 1 + in.Range(12));
  }
  auto created = GroupBlockManager::Create(o);
  if (!created.ok()) Fail("Create", created.status());
  GroupBlockManager& m = **created;
  std::vector<uint64_t> plans;
  for (int op = 0; op < 64 && !in.empty(); ++op) {
    const PoolUsage before = m.Usage();
    absl::Status st;
    switch (in.Range(12)) {
      case 0: {  // AddSequence, maybe empty, maybe a duplicate id.
        std::vector<TokenId> prompt(in.Range(20));
        for (TokenId& t : prompt) t = in.Range(3);
        ExtraKey extra;
        extra.salt = std::string(in.Range(2), '\0');
        st = m.AddSequence(in.Range(6), prompt, extra).status();
        break;
      }
      case 1:
      case 2: {  // Reserve: hostile ids, counts and duplicates.
        std::vector<ReserveRequest> batch(1 + in.Range(3));
        for (ReserveRequest& r : batch) {
          r.sequence = in.Range(8) - 1;
          r.new_token_ids.resize(in.Range(3), 1);
          r.num_tokens = in.Int();
        }
        auto plan = m.Reserve(batch);
        st = plan.status();
        if (plan.ok()) {
          plans.push_back(plan->id);
          for (const auto& slots : plan->slot_mappings) {
            for (int64_t slot : slots) {
              if (slot < 0 || slot >= int64_t{o.num_blocks} * o.block_size) {
                Fail("slot", absl::InternalError("slot out of the pool"));
              }
            }
          }
        }
        break;
      }
      case 3:
      case 4: {  // Commit or Abort, of a real or made-up plan.
        uint64_t id = plans.empty() || in.Range(4) == 0
                          ? static_cast<uint64_t>(in.Int())
                          : plans[in.Range(static_cast<int>(plans.size()))];
        st = in.Range(2) == 0 ? m.Commit(id) : m.Abort(id);
        break;
      }
      case 5:
        st = m.Free(in.Range(8) - 1);
        break;
      case 6: {  // Tables with a hostile table index.
        const SequenceId ids[] = {in.Range(8) - 1, in.Range(8) - 1};
        st = m.BatchTable(ids, in.Int()).status();
        break;
      }
      case 7:
        st = m.PeekPrefix(std::vector<TokenId>(in.Range(12), 1)).status();
        break;
      case 8:
        st = m.Fork(in.Range(8) - 1, in.Range(8) - 1);
        break;
      case 9:  // Truncate to a hostile or near length.
        st = m.Truncate(in.Range(8) - 1, in.Int());
        break;
      case 10: {  // Commit with accepted counts, hostile sizes and values.
        const uint64_t id =
            plans.empty() ? 1 : plans[in.Range(static_cast<int>(plans.size()))];
        std::vector<int64_t> accepted(in.Range(4));
        for (int64_t& a : accepted) a = in.Int() % 8;
        st = m.Commit(id, accepted);
        break;
      }
      default: {
        const uint64_t id =
            plans.empty() ? 1 : plans[in.Range(static_cast<int>(plans.size()))];
        st = m.RemoveFromPlan(id, in.Range(8) - 1);
        break;
      }
    }
    if (absl::Status v = m.Validate(); !v.ok()) Fail("Validate", v);
    if (!st.ok()) {
      const PoolUsage after = m.Usage();
      if (after.free_blocks != before.free_blocks ||
          after.cached_blocks != before.cached_blocks) {
        Fail("a failed call changed the pool", st);
      }
    }
  }
}

}  // namespace

void FuzzLayerGroups(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  FuzzConfig(in);
  FuzzManager(in);
}

}  // namespace kvcache
