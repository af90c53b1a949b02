// BatchReserver: the pass over a batch (see batch_reserver.h).

#include "allocator/batch_reserver.h"

#include <algorithm>
#include <utility>

#include "absl/base/macros.h"
#include "absl/base/optimization.h"
#include "absl/strings/str_cat.h"
#include "core/shortfall.h"

namespace kvcache {

namespace internal {
namespace {

// Whether a request passes the checks: its sequence exists, is not marked
// (`reserved` is 0 for every sequence without a plan until the pass over the
// batch marks it), and 1 <= num_tokens <= its known tokens not computed (in
// one comparison).
ABSL_ATTRIBUTE_ALWAYS_INLINE inline bool Admissible(const ReserveRequest& r,
                                                    const Sequence* s,
                                                    int64_t bs) {
  if (s == nullptr || s->reserved != 0) return false;
  const int64_t room =
      s->known(bs) + static_cast<int64_t>(r.new_token_ids.size()) - s->computed;
  // Unsigned, so that num_tokens = INT64_MIN cannot overflow (issue #12).
  return static_cast<uint64_t>(r.num_tokens) - 1 < static_cast<uint64_t>(room);
}

// Appends the request's new tokens (REQUIRES: the capacity) and marks the
// sequence as reserved for the plan (Rollback undoes both).
ABSL_ATTRIBUTE_ALWAYS_INLINE inline void AppendAndMark(Sequence& s,
                                                       const ReserveRequest& r,
                                                       uint64_t plan_id) {
  if (r.new_token_ids.size() == 1) {
    s.tokens.push_back(r.new_token_ids[0]);
  } else {
    s.tokens.insert(s.tokens.end(), r.new_token_ids.begin(),
                    r.new_token_ids.end());
  }
  s.reserved = r.num_tokens;
  s.plan_id = plan_id;
}

// The error of a request that failed Admissible, where `plan_id` is the plan
// being made (0 in CanReserve). Cold.
ABSL_ATTRIBUTE_NOINLINE absl::Status RequestError(const ReserveRequest& r,
                                                  const Sequence* s,
                                                  uint64_t plan_id,
                                                  int64_t bs) {
  if (s == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("sequence ", r.sequence, " not found"));
  }
  if (s->plan_id != 0 && s->plan_id != plan_id) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", r.sequence,
        " already has an uncommitted reservation (plan ", s->plan_id, ")"));
  }
  if (s->reserved != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", r.sequence, " is named twice in one reserve"));
  }
  if (r.num_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("reserve of ", r.num_tokens, " tokens for sequence ",
                     r.sequence, ": num_tokens must be >= 1"));
  }
  const int64_t known =
      s->known(bs) + static_cast<int64_t>(r.new_token_ids.size());
  return absl::InvalidArgumentError(
      absl::StrCat("reserve of ", r.num_tokens, " tokens for sequence ",
                   r.sequence, ": ", s->computed, " computed + ", r.num_tokens,
                   " exceeds the ", known, " known tokens"));
}

}  // namespace

absl::Status BatchReserver::NoRoom(size_t batch_size, int64_t needed) const {
  const int64_t available = pool_.num_free() + pool_.num_cached();
  absl::Status status = absl::ResourceExhaustedError(
      absl::StrCat("reserve for ", batch_size, " sequences needs ", needed,
                   " new blocks, only ", available, " are free or evictable"));
  SetShortfall(status, Shortfall{needed, pool_.num_free(), pool_.num_cached(),
                                 pool_.num_blocks(), /*never_fits=*/false});
  return status;
}

absl::Status BatchReserver::CheckNeverFits(int64_t blocks,
                                           const std::string& what) const {
  if (blocks <= pool_.num_blocks()) return absl::OkStatus();
  absl::Status status = absl::OutOfRangeError(
      absl::StrCat(what, " can never fit: it needs ", blocks,
                   " blocks, the pool has ", pool_.num_blocks()));
  SetShortfall(status, Shortfall{blocks, pool_.num_free(), pool_.num_cached(),
                                 pool_.num_blocks(), /*never_fits=*/true});
  return status;
}

absl::Status BatchReserver::CheckSize(const Sequence& s,
                                      const ReserveRequest& r) const {
  const int64_t blocks = math_.CeilDiv(s.computed + r.num_tokens);
  if (blocks <= pool_.num_blocks() &&
      (max_blocks_ == 0 || blocks <= max_blocks_))
    return absl::OkStatus();
  const std::string what = absl::StrCat("reserve of ", r.num_tokens,
                                        " tokens for sequence ", r.sequence);
  if (absl::Status never = CheckNeverFits(blocks, what); !never.ok())
    return never;
  if (max_blocks_ == 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " would hold ", blocks, " blocks (", s.computed, " + ",
                   r.num_tokens, " tokens), more than max_blocks_per_sequence ",
                   max_blocks_));
}

absl::Status BatchReserver::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  if (batch.empty())
    return absl::InvalidArgumentError("reserve of an empty batch");
  sequences_.PrepareLookups(batch.size());
  const int64_t bs = math_.size();
  int64_t needed = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const ReserveRequest& r = batch[i];
    Sequence* s = sequences_.Lookup(i, r.sequence);
    if (!Admissible(r, s, bs)) {
      absl::Status error = RequestError(r, s, /*plan_id=*/0, bs);
      sequences_.UnmarkBatch(i);
      return error;
    }
    if (absl::Status size = CheckSize(*s, r); !size.ok()) {
      sequences_.UnmarkBatch(i);
      return size;
    }
    needed += BlocksNeeded(*s, r.num_tokens, NeedsCopy(*s));
    s->reserved = r.num_tokens;  // Marks it, for a second mention.
  }
  sequences_.UnmarkBatch(batch.size());
  const int64_t available = pool_.num_free() + pool_.num_cached();
  if (needed > available) return NoRoom(batch.size(), needed);
  return absl::OkStatus();
}

// ---- Reserve ---------------------------------------------------------------

// The pass over the batch (see the top of this file). Returns the first
// request's error; progress.done sequences are changed either way (also when
// it throws).
absl::Status BatchReserver::StartBatch(absl::Span<const ReserveRequest> batch,
                                       StepPlan& plan, PlanRecord& record,
                                       BatchProgress& p) {
  return math_.pow2() ? StartBatchAs<true>(batch, plan, record, p)
                      : StartBatchAs<false>(batch, plan, record, p);
}

// StartBatch for a block size that is (kPow2) or is not a power of two. Hot:
// everything it reads often is held in locals, since the compiler must assume
// that its int64 stores alias the members.
template <bool kPow2>
absl::Status BatchReserver::StartBatchAs(absl::Span<const ReserveRequest> batch,
                                         StepPlan& plan, PlanRecord& record,
                                         BatchProgress& p) {
  const int64_t bs = math_.size();
  const bool caching = prefix_.enabled();
  const uint64_t plan_id = plans_.next_id();
  Sequence* const* cached = sequences_.batch();
  const size_t n = batch.size();
  size_t valid = sequences_.cache_valid();
  SequenceId* out_ids = plan.sequences.data();
  int64_t* out_tokens = plan.num_tokens.data();
  int64_t* out_first = plan.first_positions.data();
  size_t* tokens_before = record.tokens_before.data();
  int64_t* slots = plan.slot_mapping.data();
  int64_t slots_size = static_cast<int64_t>(plan.slot_mapping.size());
  int64_t slots_used = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i + 8 < valid) __builtin_prefetch(cached[i + 8], /*rw=*/1);
    const ReserveRequest& r = batch[i];
    Sequence* s = sequences_.LookupAt(i, r.sequence, valid);
    if (ABSL_PREDICT_FALSE(!Admissible(r, s, bs))) {
      p.done = i;
      return RequestError(r, s, plan_id, bs);
    }
    const int64_t num_tokens = r.num_tokens;
    const int64_t offset = kPow2 ? s->computed & (bs - 1) : s->computed % bs;
    const bool copy =
        s->tail_maybe_shared && offset != 0 &&
        (pool_.ref_count(s->tail_block) > 1 || pool_.hashed(s->tail_block));
    const bool fits_tail = !copy && offset != 0 && offset + num_tokens <= bs;
    // Allocate first (until its marks below, the sequence is unchanged).
    if (ABSL_PREDICT_FALSE(!fits_tail ||
                           s->tokens.size() + r.new_token_ids.size() >
                               s->tokens.capacity() ||
                           slots_used + num_tokens > slots_size)) {
      p.done = i;  // In case it throws.
      p.slots = slots_used;
      if (!fits_tail) {
        if (absl::Status size = CheckSize(*s, r); !size.ok()) return size;
      }
      PrepareSlow(*s, r, copy, fits_tail, plan, p);
      slots = plan.slot_mapping.data();
      slots_size = static_cast<int64_t>(plan.slot_mapping.size());
    }
    // Change the sequence (no allocation: the capacities are there).
    tokens_before[i] = s->tokens.size();
    AppendAndMark(*s, r, plan_id);
    if (ABSL_PREDICT_TRUE(fits_tail)) {
      // The tail block is this sequence's alone (else it would be copied).
      s->tail_maybe_shared = false;
      const int64_t base = static_cast<int64_t>(s->tail_block) * bs + offset;
      slots[slots_used] = base;
      for (int64_t k = 1; k < num_tokens; ++k) slots[slots_used + k] = base + k;
    } else {
      slow_.push_back(  // Has the capacity.
          SlowPath{i, static_cast<size_t>(slots_used), copy});
    }
    slots_used += num_tokens;
    if (caching && offset + num_tokens >= bs)
      record.fillers.push_back(static_cast<int32_t>(i));
    out_ids[i] = r.sequence;
    out_tokens[i] = num_tokens;
    out_first[i] = s->computed;
  }
  p.done = n;
  p.slots = slots_used;
  return absl::OkStatus();
}

// StartBatch's allocations for a request that needs more capacity, new blocks
// or a copy (counted in `p`). May throw std::bad_alloc, changing nothing
// observable.
void BatchReserver::PrepareSlow(Sequence& s, const ReserveRequest& r, bool copy,
                                bool fits_tail, StepPlan& plan,
                                BatchProgress& p) {
  ReserveGeometric(s.tokens, s.tokens.size() + r.new_token_ids.size());
  const size_t slot_end = static_cast<size_t>(p.slots + r.num_tokens);
  if (slot_end > plan.slot_mapping.size())
    plan.slot_mapping.resize(std::max(slot_end, 2 * plan.slot_mapping.size()));
  if (fits_tail) return;
  const int64_t end = s.computed + r.num_tokens;
  ReserveGeometric(s.blocks, static_cast<size_t>(math_.CeilDiv(end)));
  p.needed += BlocksNeeded(s, r.num_tokens, copy);
  p.copies += copy;
}

// Undoes StartBatch's changes to the batch's first n sequences.
void BatchReserver::Rollback(const PlanRecord& record, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    Sequence& s = *sequences_.batch()[i];
    s.tokens.resize(record.tokens_before[i]);
    s.reserved = 0;
    s.plan_id = 0;
  }
}

// The blocks of a sequence that needs new ones or a copy, and its slots.
void BatchReserver::ApplySlow(const SlowPath& path,
                              absl::Span<const ReserveRequest> batch,
                              StepPlan& plan) {
  const int64_t bs = math_.size();
  Sequence& s = *sequences_.batch()[path.index];
  if (path.copy) {
    const BlockId fresh = AllocateBlock();
    plan.copies.push_back(BlockCopy{s.blocks.back(), fresh});
    s.cow_src = s.blocks.back();  // Keeps its reference: the copy reads it.
    s.blocks.back() = fresh;
    ++s.table_version;
  }
  const int64_t end = s.computed + batch[path.index].num_tokens;
  const size_t num_blocks = static_cast<size_t>(math_.CeilDiv(end));
  while (s.blocks.size() < num_blocks) s.blocks.push_back(AllocateBlock());
  s.tail_block = s.blocks.back();
  s.tail_maybe_shared = false;  // Fresh, or copied.
  int64_t* slot = &plan.slot_mapping[path.slot];
  for (int64_t p = s.computed; p < end;) {
    const int64_t offset = math_.Mod(p);
    const int64_t run = std::min(end - p, bs - offset);
    const int64_t base = static_cast<int64_t>(s.blocks[math_.Div(p)]) * bs;
    for (int64_t k = 0; k < run; ++k) *slot++ = base + offset + k;
    p += run;
  }
}

// After the pass: refuses a batch that does not fit, registers the plan, then
// changes the pool. Only the registration may throw (std::bad_alloc).
absl::Status BatchReserver::FinishBatch(absl::Span<const ReserveRequest> batch,
                                        const BatchProgress& p, StepPlan& plan,
                                        PlanRecord& record) {
  const int64_t available = pool_.num_free() + pool_.num_cached();
  if (p.needed > available) return NoRoom(batch.size(), p.needed);
  plan.copies.reserve(p.copies);
  // Blocks this batch can spare for the tier's held offloads.
  prefix_.set_hold_allowance(available - p.needed);
  plan.id = plans_.Admit(record);
  // From here on nothing can fail or allocate.
  for (const SlowPath& path : slow_) ApplySlow(path, batch, plan);
  std::copy(sequences_.batch(), sequences_.batch() + batch.size(),
            record.sequences.begin());
  plan.slot_mapping.resize(p.slots);  // Shrinks: no allocation.
  return absl::OkStatus();
}

absl::StatusOr<StepPlan> BatchReserver::Reserve(
    absl::Span<const ReserveRequest> batch) {
  if (batch.empty())
    return absl::InvalidArgumentError("reserve of an empty batch");
  // Allocations before any change (may throw std::bad_alloc).
  const size_t n = batch.size();
  sequences_.PrepareLookups(n);
  slow_.clear();
  slow_.reserve(n);
  StepPlan plan;
  plan.sequences.resize(n);
  plan.num_tokens.resize(n);
  plan.first_positions.resize(n);
  plan.slot_mapping.resize(n);  // Grown by the pass when it needs more.
  PlanRecord& record = plans_.Spare(n);
  BatchProgress progress;
  absl::Status status;
  try {
    status = StartBatch(batch, plan, record, progress);
    if (status.ok()) status = FinishBatch(batch, progress, plan, record);
  } catch (...) {
    Rollback(record, progress.done);
    throw;
  }
  if (!status.ok()) {
    Rollback(record, progress.done);
    return status;
  }
  return plan;
}

}  // namespace internal
}  // namespace kvcache
