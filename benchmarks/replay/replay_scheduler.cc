#include "benchmarks/replay/replay_scheduler.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::replay {
namespace {

using Clock = std::chrono::steady_clock;

double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start)
      .count();
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

TokenId DecodeToken(int64_t request, int64_t index) {
  uint64_t x = (static_cast<uint64_t>(request) << 24) ^
               static_cast<uint64_t>(index) ^ 0xdec0de0000000000ULL;
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return static_cast<TokenId>(x & 0x7fffffffU);
}

struct Scheduler::Request {
  int64_t index = 0;  // In the trace.
  const TraceRequest* trace = nullptr;
  std::vector<TokenId> tokens;  // Prompt, then the tokens decoded so far.
  SequenceId sequence = 0;      // 0 while not admitted.
  int64_t computed = 0;         // Tokens committed in the current admission.
  int64_t max_computed = 0;     // Over all admissions (for recompute counts).
  int64_t generated = 0;        // Output tokens decoded.
  bool admitted_before = false;
  // async_onboard: its prefix is still being copied in from the host tier
  // (KVCacheManager::PrefixLoaded); it sits out the steps until it lands.
  bool loading = false;
};

Scheduler::Scheduler(KVCacheManager* manager, KvWriter* writer,
                     std::vector<TraceRequest> requests,
                     SchedulerOptions options)
    : manager_(manager),
      writer_(writer),
      trace_(std::move(requests)),
      options_(options) {
  stats_.requests_total = static_cast<int64_t>(trace_.size());
  if (options_.error_samples > 0) {
    sample_every_ = std::max<int64_t>(
        1, static_cast<int64_t>(trace_.size()) / options_.error_samples);
  }
}

Scheduler::~Scheduler() = default;

bool Scheduler::Done() const {
  return next_arrival_ >= trace_.size() && waiting_.empty() &&
         running_.empty() && in_flight_waited_.empty();
}

absl::Status Scheduler::WaitSteps(size_t keep) {
  while (in_flight_waited_.size() > keep) {
    absl::StatusOr<AppendTiming> timing = writer_->WaitStep();
    if (!timing.ok()) return timing.status();
    const bool waited = in_flight_waited_.front();
    in_flight_waited_.pop_front();
    stats_.wait_ms += timing->wait_ms;
    stats_.device_ms += timing->device_ms;
    stats_.device_before_ms += timing->before_ms;
    stats_.kernel_ms += timing->kernel_ms;
    const double extra = timing->device_ms - timing->kernel_ms;
    (waited ? stats_.device_extra_waited_ms : stats_.device_extra_other_ms) +=
        extra;
    stats_.steps_waited += waited;
  }
  return absl::OkStatus();
}

void Scheduler::Arrive() {
  const int64_t block_size = manager_->config().block_size;
  while (next_arrival_ < trace_.size() &&
         (options_.back_to_back ||
          trace_[next_arrival_].timestamp_ms <= now_ms_)) {
    const TraceRequest& t = trace_[next_arrival_];
    if (CeilDiv(t.input_length + t.output_length, block_size) >
        manager_->TotalBlocks()) {
      ++stats_.requests_rejected;  // Could never fit, even alone.
    } else {
      auto r = std::make_unique<Request>();
      r->index = static_cast<int64_t>(next_arrival_);
      r->trace = &t;
      waiting_.push_back(std::move(r));
    }
    ++next_arrival_;
  }
}

absl::StatusOr<bool> Scheduler::StillLoading(Request* r) {
  if (!r->loading) return false;
  const Clock::time_point start = Clock::now();
  absl::StatusOr<bool> loaded = manager_->PrefixLoaded(r->sequence);
  stats_.plan_loaded_ms += MillisSince(start);
  if (!loaded.ok()) return loaded.status();
  r->loading = !*loaded;
  return r->loading;
}

absl::Status Scheduler::BuildRunningEntries(std::vector<Entry>* entries,
                                            int64_t* budget,
                                            bool include_loading) {
  for (const std::unique_ptr<Request>& r : running_) {
    if (*budget == 0) break;
    if (!include_loading) {
      absl::StatusOr<bool> loading = StillLoading(r.get());
      if (!loading.ok()) return loading.status();
      if (*loading) {
        ++stats_.onboard_deferrals;
        continue;
      }
    }
    r->loading = false;
    const int64_t pending =
        static_cast<int64_t>(r->tokens.size()) - r->computed;
    if (pending > 0) {
      const int64_t n = std::min(pending, *budget);
      entries->push_back({r.get(), n, /*decode=*/false, 0, n});
      *budget -= n;
    } else {
      // The sampled token, and drafts up to the output's end and the budget.
      const int64_t drafts = std::max<int64_t>(
          0, std::min<int64_t>({options_.spec_tokens,
                                r->trace->output_length - r->generated - 1,
                                *budget - 1}));
      const int64_t accepted =
          options_.spec_tokens == 0
              ? 1
              : std::min<int64_t>(
                    1 + drafts,
                    1 + (r->index + stats_.steps) % (options_.spec_tokens + 1));
      entries->push_back(
          {r.get(), 1 + drafts, /*decode=*/true, drafts, accepted});
      *budget -= 1 + drafts;
    }
  }
  return absl::OkStatus();
}

absl::Status Scheduler::AdmitWaiting(std::vector<Entry>* entries,
                                     int64_t* budget) {
  while (*budget > 0 && !waiting_.empty() &&
         static_cast<int>(running_.size()) < options_.max_running) {
    Request* r = waiting_.front().get();
    if (r->tokens.empty()) r->tokens = TracePrompt(*r->trace);
    const SequenceId id = next_sequence_id_++;
    PrefixHits hits;
    const Clock::time_point add_start = Clock::now();
    absl::StatusOr<int64_t> hit =
        manager_->AddSequence(id, r->tokens, {}, &hits);
    stats_.plan_add_ms += MillisSince(add_start);
    if (!hit.ok()) return hit.status();
    const int64_t n =
        std::min(static_cast<int64_t>(r->tokens.size()) - *hit, *budget);
    entries->push_back({r, n, /*decode=*/false, 0, n});
    r->sequence = id;
    r->computed = *hit;
    const Clock::time_point can_start = Clock::now();
    const absl::Status fits = manager_->CanReserve(ToReserve(*entries));
    stats_.plan_can_reserve_ms += MillisSince(can_start);
    if (absl::IsResourceExhausted(fits)) {
      entries->pop_back();
      r->sequence = 0;
      r->computed = 0;
      return manager_->Free(id);
    }
    if (!fits.ok()) return fits;
    if (!r->admitted_before) {
      stats_.prompt_tokens += static_cast<int64_t>(r->tokens.size());
      stats_.prefix_hit_tokens += *hit;
      stats_.prefix_hit_tokens_host += hits.host_tokens;
      r->admitted_before = true;
    }
    if (options_.async_onboard && *hit > 0) {
      // Its chunk fits (checked above), but it waits for its prefix rather
      // than making this step wait on the copy: its own host hits, or
      // device hits on blocks another sequence's onboard still fills
      // (PrefixLoaded knows both).
      r->loading = true;
      absl::StatusOr<bool> loading = StillLoading(r);
      if (!loading.ok()) return loading.status();
      if (*loading) {
        entries->pop_back();
        ++stats_.onboard_deferrals;
        ++stats_.requests_deferred;
        running_.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
        continue;
      }
    }
    *budget -= n;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  return absl::OkStatus();
}

absl::Status Scheduler::Preempt(std::vector<Entry>* entries) {
  std::unique_ptr<Request> victim = std::move(running_.back());
  running_.pop_back();
  entries->erase(
      std::remove_if(entries->begin(), entries->end(),
                     [&](const Entry& e) { return e.request == victim.get(); }),
      entries->end());
  if (absl::Status s = manager_->Free(victim->sequence); !s.ok()) return s;
  victim->sequence = 0;
  victim->computed = 0;
  if (running_.empty()) {
    ++stats_.requests_rejected;  // Does not fit even alone.
    return absl::OkStatus();
  }
  ++stats_.preemptions;
  waiting_.push_front(std::move(victim));
  return absl::OkStatus();
}

absl::Status Scheduler::Finish(Request* r) {
  const int64_t block_size = manager_->config().block_size;
  if (options_.error_samples > 0 &&
      stats_.error.samples < options_.error_samples &&
      stats_.requests_finished % sample_every_ == 0 && r->computed > 0) {
    // One committed block (or the whole sequence if shorter) of one layer.
    const int64_t n = std::min(block_size, r->computed);
    const int64_t blocks = r->computed / n;
    const int64_t begin = (r->index * 7919 % blocks) * n;
    const int layer =
        static_cast<int>(r->index % manager_->config().num_layers);
    std::vector<TokenAt> tokens;
    for (int64_t p = begin; p < begin + n; ++p) {
      tokens.push_back({r->tokens[p], p});
    }
    if (absl::Status s =
            writer_->SampleError(r->sequence, layer, begin, tokens);
        !s.ok()) {
      return s;
    }
    stats_.error = writer_->error();
  }
  ++stats_.requests_finished;
  return manager_->Free(r->sequence);
}

TokenId Scheduler::StepToken(const Entry& e, int64_t i) {
  const TokenId t = DecodeToken(e.request->index, e.request->generated + i);
  return i < e.accepted ? t : (t ^ 0x40000000);  // A rejected draft differs.
}

std::vector<ReserveRequest> Scheduler::ToReserve(
    const std::vector<Entry>& entries) const {
  std::vector<ReserveRequest> batch;
  batch.reserve(entries.size());
  for (const Entry& e : entries) {
    ReserveRequest request;
    request.sequence = e.request->sequence;
    request.num_tokens = e.num_tokens;
    if (e.decode) {
      for (int64_t i = 0; i < e.num_tokens; ++i)
        request.new_token_ids.push_back(StepToken(e, i));
    }
    batch.push_back(std::move(request));
  }
  return batch;
}

absl::Status Scheduler::Step() {
  Arrive();
  if (running_.empty() && waiting_.empty()) {
    if (next_arrival_ >= trace_.size()) return WaitSteps(0);
    now_ms_ = std::max<double>(now_ms_, trace_[next_arrival_].timestamp_ms);
    Arrive();                                       // Skip the idle gap.
    if (waiting_.empty()) return absl::OkStatus();  // All rejected.
  }
  const Clock::time_point start = Clock::now();
  const int64_t waited_before = manager_->Metrics().tier_offloads_waited;
  std::vector<Entry> entries;
  int64_t budget = options_.token_budget;
  if (absl::Status s = BuildRunningEntries(&entries, &budget, false); !s.ok()) {
    return s;
  }
  if (absl::Status s = AdmitWaiting(&entries, &budget); !s.ok()) return s;
  if (entries.empty() && !running_.empty()) {
    // Every running request waits for its prefix: nothing to overlap the
    // copies with, so the step takes them (and waits on its stream).
    budget = options_.token_budget;
    if (absl::Status s = BuildRunningEntries(&entries, &budget, true);
        !s.ok()) {
      return s;
    }
  }
  absl::StatusOr<StepPlanInfo> plan;
  int64_t padded = 0;  // A graph step's padded size; 0 for other steps.
  bool decode_only = true;
  while (!entries.empty()) {
    decode_only = true;
    int64_t step_tokens = 0;
    for (const Entry& e : entries) {
      decode_only = decode_only && e.decode && e.num_tokens == 1;
      step_tokens += e.num_tokens;
    }
    padded = 0;
    if (options_.cuda_graph && decode_only) {
      padded = 1;
      while (padded < step_tokens) padded *= 2;
      padded = std::min<int64_t>(
          {padded, options_.max_running, options_.token_budget});
    }
    if (absl::Status s = writer_->MarkPlanStart(padded > 0); !s.ok()) {
      return s;
    }
    const Clock::time_point reserve_start = Clock::now();
    if (padded > 0) {
      absl::StatusOr<void*> stream = writer_->stream();
      if (!stream.ok()) return stream.status();
      plan = manager_->ReserveGraphStep(ToReserve(entries), padded, *stream);
    } else {
      plan = manager_->Reserve(ToReserve(entries));
    }
    stats_.plan_reserve_ms += MillisSince(reserve_start);
    if (plan.ok()) break;
    if (!absl::IsResourceExhausted(plan.status())) return plan.status();
    if (absl::Status s = Preempt(&entries); !s.ok()) return s;
  }
  now_ms_ += options_.step_ms;
  if (entries.empty()) return absl::OkStatus();
  double host_ms = MillisSince(start);
  const MetricsSnapshot metrics = manager_->Metrics();
  stats_.peak_blocks_in_use =
      std::max(stats_.peak_blocks_in_use, metrics.blocks_in_use);
  const bool waited = metrics.tier_offloads_waited > waited_before;

  std::vector<TokenAt> tokens;
  for (const Entry& e : entries) {
    Request* r = e.request;
    for (int64_t k = 0; k < e.num_tokens; ++k) {
      const TokenId t = e.decode ? StepToken(e, k) : r->tokens[r->computed + k];
      tokens.push_back({t, r->computed + k});
    }
  }
  stats_.plan_ms += host_ms;
  const Clock::time_point append_start = Clock::now();
  absl::StatusOr<double> append_ms =
      padded > 0 ? writer_->GraphStep(plan->id, tokens, padded)
                 : writer_->AppendStep(plan->id, tokens);
  if (!append_ms.ok()) return append_ms.status();
  stats_.enqueue_ms += MillisSince(append_start);
  stats_.append_calls_ms += *append_ms;
  in_flight_waited_.push_back(waited);
  stats_.graph_steps += padded > 0;
  if (!options_.pipeline) {
    if (absl::Status s = WaitSteps(0); !s.ok()) return s;
  }
  const Clock::time_point commit_start = Clock::now();
  if (options_.spec_tokens == 0) {
    if (absl::Status s = manager_->Commit(plan->id); !s.ok()) return s;
  } else {
    std::vector<int64_t> accepted;
    accepted.reserve(entries.size());
    for (const Entry& e : entries) accepted.push_back(e.accepted);
    if (absl::Status s = manager_->Commit(plan->id, accepted); !s.ok()) {
      return s;
    }
  }
  stats_.commit_ms += MillisSince(commit_start);
  host_ms += *append_ms + MillisSince(commit_start);
  ++stats_.steps;
  if (options_.attention) {  // One query token per sequence of the step.
    if (absl::Status s = WaitSteps(0); !s.ok()) return s;
    std::vector<SequenceId> ids;
    for (const Entry& e : entries) ids.push_back(e.request->sequence);
    absl::StatusOr<double> ms = writer_->AttentionStep(ids);
    if (!ms.ok()) return ms.status();
    stats_.attention_ms.push_back(*ms);
  }

  for (const Entry& e : entries) {
    Request* r = e.request;
    if (e.decode) {
      for (int64_t i = 0; i < e.accepted; ++i)
        r->tokens.push_back(DecodeToken(r->index, r->generated + i));
      r->generated += e.accepted;
      stats_.decode_tokens += e.accepted;
      stats_.draft_tokens_accepted += e.accepted - 1;
      stats_.draft_tokens_rejected += e.num_tokens - e.accepted;
      r->computed += e.accepted;
      r->max_computed = std::max(r->max_computed, r->computed);
      continue;
    }
    stats_.prefill_tokens += e.num_tokens;
    stats_.recompute_tokens += std::max<int64_t>(
        0, std::min(r->max_computed, r->computed + e.num_tokens) - r->computed);
    r->computed += e.num_tokens;
    r->max_computed = std::max(r->max_computed, r->computed);
  }
  // Free the finished, keeping the others in admission order.
  std::vector<std::unique_ptr<Request>> still_running;
  for (std::unique_ptr<Request>& r : running_) {
    if (r->computed == static_cast<int64_t>(r->tokens.size()) &&
        r->generated >= r->trace->output_length) {
      const Clock::time_point free_start = Clock::now();
      if (absl::Status s = Finish(r.get()); !s.ok()) return s;
      host_ms += MillisSince(free_start);
      stats_.finish_ms += MillisSince(free_start);
    } else {
      still_running.push_back(std::move(r));
    }
  }
  running_ = std::move(still_running);
  stats_.step_host_ms.push_back(host_ms);
  if (decode_only) stats_.decode_step_host_ms.push_back(host_ms);
  stats_.simulated_ms = now_ms_;
  // Pipelined, this step stays in flight while the next one is planned.
  if (!options_.pipeline) return WaitSteps(0);
  const int depth =
      std::min(options_.steps_in_flight, writer_->max_steps_in_flight());
  return WaitSteps(static_cast<size_t>(std::max(depth - 1, 0)));
}

}  // namespace kvcache::replay
