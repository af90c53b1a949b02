// The C API's speculative-decoding and scheduling calls (kvcache_c.h):
// each checks and converts its arguments, calls the KVCacheManager and
// records a failure (kvcache_c_internal.h).

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/kvcache_c.h"
#include "api/kvcache_c_internal.h"
#include "api/no_bad_alloc.h"
#include "core/shortfall.h"

namespace {

// The calling thread's last failed call's shortfall, if it had one.
thread_local bool has_shortfall = false;
thread_local kvcache::Shortfall last_shortfall;

template <typename F>
kvcache_status Guarded(const char* call, F&& body) noexcept {
  return kvcache::c_api::RecordStatus(
      kvcache::internal::NoBadAlloc(call, std::forward<F>(body)));
}

absl::Status NullHandle(const char* call) {
  return absl::InvalidArgumentError(absl::StrCat(call, ": manager is NULL"));
}

absl::Status CheckCount(const char* name, int64_t count, int64_t max) {
  if (count < 0 || count > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " ", count, count < 0 ? " is negative" : " exceeds ",
                     count < 0 ? std::string() : absl::StrCat(max)));
  }
  return absl::OkStatus();
}

}  // namespace

void kvcache::c_api::NoteShortfall(const absl::Status& status) noexcept {
  const std::optional<Shortfall> shortfall = GetShortfall(status);
  has_shortfall = shortfall.has_value();
  if (has_shortfall) last_shortfall = *shortfall;
}

extern "C" {

int32_t kvcache_last_shortfall(kvcache_shortfall* out) {
  if (!has_shortfall) return 0;
  if (out != nullptr) {
    out->blocks_needed = last_shortfall.blocks_needed;
    out->blocks_free = last_shortfall.blocks_free;
    out->blocks_evictable = last_shortfall.blocks_evictable;
    out->blocks_total = last_shortfall.blocks_total;
    out->never_fits = last_shortfall.never_fits ? 1 : 0;
  }
  return 1;
}

kvcache_status kvcache_commit_accepted(kvcache_manager* m, uint64_t plan_id,
                                       const int64_t* accepted,
                                       int64_t num_accepted) {
  return Guarded(__func__, [&]() -> absl::Status {
    if (m == nullptr) return NullHandle(__func__);
    if (absl::Status s =
            CheckCount("num_accepted", num_accepted, KVCACHE_MAX_BATCH);
        !s.ok()) {
      return s;
    }
    if (accepted == nullptr && num_accepted > 0) {
      return absl::InvalidArgumentError("accepted is NULL");
    }
    return m->impl->Commit(plan_id,
                           absl::MakeConstSpan(accepted, num_accepted));
  });
}

kvcache_status kvcache_remove_from_plan(kvcache_manager* m, uint64_t plan_id,
                                        int64_t sequence, void* stream) {
  return Guarded(__func__, [&]() -> absl::Status {
    if (m == nullptr) return NullHandle(__func__);
    return m->impl->RemoveFromPlan(plan_id, sequence, stream);
  });
}

kvcache_status kvcache_truncate(kvcache_manager* m, int64_t sequence,
                                int64_t new_length) {
  return Guarded(__func__, [&]() -> absl::Status {
    if (m == nullptr) return NullHandle(__func__);
    return m->impl->Truncate(sequence, new_length);
  });
}

kvcache_status kvcache_peek_prefix(kvcache_manager* m, const int32_t* prompt,
                                   int64_t prompt_len, int64_t adapter_id,
                                   const uint8_t* salt, size_t salt_len,
                                   int64_t* cached_tokens) {
  return Guarded(__func__, [&]() -> absl::Status {
    if (m == nullptr) return NullHandle(__func__);
    if (absl::Status s =
            CheckCount("prompt_len", prompt_len, KVCACHE_MAX_TOKENS);
        !s.ok()) {
      return s;
    }
    if (prompt == nullptr && prompt_len > 0) {
      return absl::InvalidArgumentError("prompt is NULL");
    }
    if (salt_len > KVCACHE_MAX_SALT_BYTES) {
      return absl::InvalidArgumentError(absl::StrCat(
          "salt_len ", salt_len, " exceeds ", KVCACHE_MAX_SALT_BYTES));
    }
    if (salt == nullptr && salt_len > 0) {
      return absl::InvalidArgumentError("salt is NULL");
    }
    kvcache::ExtraKey extra;
    extra.adapter_id = adapter_id;
    if (salt_len > 0) {
      extra.salt.assign(reinterpret_cast<const char*>(salt), salt_len);
    }
    absl::StatusOr<int64_t> cached =
        m->impl->PeekPrefix(absl::MakeConstSpan(prompt, prompt_len), extra);
    if (!cached.ok()) return cached.status();
    if (cached_tokens != nullptr) *cached_tokens = *cached;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_plan_layout(kvcache_manager* m, uint64_t plan_id,
                                   int64_t capacity, int64_t* sequences,
                                   int64_t* slot_offsets, int64_t* num_tokens,
                                   int64_t* first_positions,
                                   int64_t* num_sequences) {
  return Guarded(__func__, [&]() -> absl::Status {
    if (m == nullptr) return NullHandle(__func__);
    if (capacity < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("capacity ", capacity, " is negative"));
    }
    absl::StatusOr<std::vector<kvcache::PlanSequence>> layout =
        m->impl->PlanLayout(plan_id);
    if (!layout.ok()) return layout.status();
    const int64_t n = static_cast<int64_t>(layout->size());
    if (num_sequences != nullptr) *num_sequences = n;
    if (n > capacity) {
      return absl::OutOfRangeError(
          absl::StrCat("plan ", plan_id, " has ", n,
                       " sequences, more than capacity ", capacity));
    }
    for (int64_t i = 0; i < n; ++i) {
      const kvcache::PlanSequence& s = (*layout)[i];
      if (sequences != nullptr) sequences[i] = s.sequence;
      if (slot_offsets != nullptr) slot_offsets[i] = s.slot_offset;
      if (num_tokens != nullptr) num_tokens[i] = s.num_tokens;
      if (first_positions != nullptr) first_positions[i] = s.first_position;
    }
    return absl::OkStatus();
  });
}

}  // extern "C"
