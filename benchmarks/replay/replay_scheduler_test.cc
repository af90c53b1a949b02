#include "benchmarks/replay/replay_scheduler.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "benchmarks/replay/kv_writer.h"
#include "benchmarks/replay/replay_report.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "storage/device.h"
#include "storage/tier_copier.h"
#include "testing/trace.h"

namespace kvcache::replay {
namespace {

constexpr int kLayers = 2;

// 12 requests of 20..300 prompt tokens; every third starts a new "conversation"
// (hash id), the others continue the previous one, so prefixes are shared.
std::vector<TraceRequest> TinyTrace() {
  std::vector<TraceRequest> trace;
  for (int i = 0; i < 12; ++i) {
    TraceRequest r;
    r.timestamp_ms = 100 * i;
    r.input_length = 20 + (i % 3) * 130 + i;
    r.output_length = 3 + i % 5;
    r.hash_ids = {1000 + i / 3};
    trace.push_back(r);
  }
  return trace;
}

struct Harness {
  std::unique_ptr<Device> device = CreateCpuDevice();
  std::unique_ptr<KVCacheManager> manager;
  std::unique_ptr<KvWriter> writer;
  std::unique_ptr<Scheduler> scheduler;

  Harness(int64_t num_blocks, SchedulerOptions options,
          std::vector<TraceRequest> trace = TinyTrace(),
          int64_t tier_blocks = 0) {
    KVCacheConfig config;
    config.num_layers = kLayers;
    config.num_kv_heads = 2;
    config.head_size = 32;
    config.block_size = 16;
    config.cache_dtype = DType::kInt8;
    config.num_blocks = num_blocks;
    config.max_tokens_per_step = static_cast<int32_t>(options.token_budget);
    if (tier_blocks > 0) {  // Every evicted block offloaded, reused at once.
      config.host_tier_bytes =
          tier_blocks * BlockBytesAllLayers(config).value();
      config.tier_offload_min_hits = 0;
      config.tier_hold_offloads = false;
    }
    manager = KVCacheManager::Create(config).value();
    writer = KvWriter::Create(manager.get(), device.get(), options.token_budget,
                              options.pipeline ? options.steps_in_flight : 1)
                 .value();
    scheduler = std::make_unique<Scheduler>(manager.get(), writer.get(),
                                            std::move(trace), options);
  }

  void RunToEnd() {
    for (int i = 0; i < 100000 && !scheduler->Done(); ++i) {
      const absl::Status status = scheduler->Step();
      ASSERT_TRUE(status.ok()) << status;
    }
    ASSERT_TRUE(scheduler->Done());
    ASSERT_TRUE(manager->Validate().ok());
  }
};

SchedulerOptions Options() {
  SchedulerOptions options;
  options.token_budget = 64;
  options.max_running = 4;
  options.back_to_back = true;
  options.error_samples = 12;
  return options;
}

TEST(ReplaySchedulerTest, EveryRequestFinishesAndEveryTokenIsAppended) {
  Harness h(/*num_blocks=*/512, Options());
  h.RunToEnd();
  const ReplayStats& s = h.scheduler->stats();
  int64_t prompt = 0, output = 0;
  for (const TraceRequest& r : TinyTrace()) {
    prompt += r.input_length;
    output += r.output_length;
  }
  EXPECT_EQ(s.requests_finished, 12);
  EXPECT_EQ(s.requests_rejected, 0);
  EXPECT_EQ(s.preemptions, 0);
  EXPECT_EQ(s.prompt_tokens, prompt);
  EXPECT_GT(s.prefix_hit_tokens, 0);  // Continuations share their prefix.
  EXPECT_EQ(s.prefill_tokens, prompt - s.prefix_hit_tokens);
  EXPECT_EQ(s.decode_tokens, output);
  const MetricsSnapshot m = h.manager->Metrics();
  EXPECT_EQ(m.tokens_appended,
            kLayers * (prompt - s.prefix_hit_tokens + output));
  EXPECT_EQ(m.prefix_hit_tokens, s.prefix_hit_tokens);
  EXPECT_EQ(m.blocks_in_use, 0);
  EXPECT_EQ(m.sequences, 0);
  EXPECT_EQ(static_cast<int64_t>(s.step_host_ms.size()), s.steps);
  // Every prefill chunk and decode token fits the budget of 64.
  EXPECT_GE(s.steps, (prompt - s.prefix_hit_tokens + output + 63) / 64);
}

TEST(ReplaySchedulerTest, TinyPoolPreemptsAndStillFinishesEverything) {
  SchedulerOptions options = Options();
  options.max_running = 8;
  Harness h(/*num_blocks=*/24, options);
  h.RunToEnd();
  const ReplayStats& s = h.scheduler->stats();
  EXPECT_EQ(s.requests_finished, 12);
  EXPECT_EQ(s.requests_rejected, 0);
  EXPECT_GT(s.preemptions, 0);
  EXPECT_LE(s.peak_blocks_in_use, 24);
  const MetricsSnapshot m = h.manager->Metrics();
  EXPECT_EQ(m.tokens_appended, kLayers * s.tokens_appended());
  EXPECT_GT(m.reserve_failures, 0);
  EXPECT_EQ(m.blocks_in_use, 0);
}

TEST(ReplaySchedulerTest, SpeculationKeepsTheAcceptedDraftsOnly) {
  for (int64_t blocks : {512, 24}) {  // Roomy, and preempting.
    SchedulerOptions options = Options();
    options.spec_tokens = 3;
    Harness h(blocks, options);
    h.RunToEnd();
    const ReplayStats& s = h.scheduler->stats();
    int64_t output = 0;
    for (const TraceRequest& r : TinyTrace()) output += r.output_length;
    EXPECT_EQ(s.requests_finished, 12);
    EXPECT_EQ(s.decode_tokens, output);
    EXPECT_GT(s.draft_tokens_accepted, 0);
    EXPECT_GT(s.draft_tokens_rejected, 0);
    const MetricsSnapshot m = h.manager->Metrics();
    EXPECT_EQ(m.tokens_rejected, s.draft_tokens_rejected);
    EXPECT_EQ(m.tokens_appended, kLayers * s.tokens_appended());
    EXPECT_EQ(m.blocks_in_use, 0);
    EXPECT_GT(s.error.samples, 0);
  }
}

TEST(ReplaySchedulerTest, RequestLargerThanThePoolIsRejected) {
  std::vector<TraceRequest> trace = TinyTrace();
  trace[4].input_length = 500;  // 32 blocks of 16 > 24.
  Harness h(/*num_blocks=*/24, Options(), trace);
  h.RunToEnd();
  EXPECT_EQ(h.scheduler->stats().requests_rejected, 1);
  EXPECT_EQ(h.scheduler->stats().requests_finished, 11);
}

TEST(ReplaySchedulerTest, GatheredBlocksMatchTheInputWithinInt8Error) {
  Harness h(/*num_blocks=*/512, Options());
  h.RunToEnd();
  const ErrorTotals& e = h.scheduler->stats().error;
  EXPECT_EQ(e.samples, 12);
  EXPECT_GT(e.tokens, 12);
  // int8 per-(token, head) rounding on Gaussian data: about 6.5e-3.
  EXPECT_GT(e.RelativeL2(), 3e-3);
  EXPECT_LT(e.RelativeL2(), 1e-2);
}

// With a host tier whose copies are slow, a request whose prefix is being
// onboarded sits out the steps (async_onboard) instead of making them wait;
// either way every request finishes with the same tokens and its gathered
// blocks (onboarded ones among them) match the input.
TEST(ReplaySchedulerTest, AsyncOnboardSitsOutUntilThePrefixLands) {
  for (bool async : {true, false}) {
    SCOPED_TRACE(async ? "async_onboard" : "sync onboard");
    SchedulerOptions options = Options();
    options.max_running = 8;
    options.async_onboard = async;
    // Conversations whose turns are far apart: the pool of 24 blocks
    // evicts a conversation's prefix before its next turn.
    std::vector<TraceRequest> trace;
    for (int i = 0; i < 18; ++i) {
      TraceRequest r;
      r.input_length = 100 + 40 * (i / 6) + i;
      r.output_length = 2;
      r.hash_ids = {2000 + i % 6};
      trace.push_back(r);
    }
    Harness h(/*num_blocks=*/24, options, trace, /*tier_blocks=*/64);
    TierCopier* copier = KVCacheManagerTestPeer::HostTierCopier(*h.manager);
    ASSERT_NE(copier, nullptr);
    copier->set_delay_for_testing(absl::Milliseconds(5));
    h.RunToEnd();
    const ReplayStats& s = h.scheduler->stats();
    EXPECT_EQ(s.requests_finished, 18);
    EXPECT_GT(s.prefix_hit_tokens_host, 0);
    if (async) {
      EXPECT_GT(s.onboard_deferrals, 0);
    } else {
      EXPECT_EQ(s.onboard_deferrals, 0);
    }
    const MetricsSnapshot m = h.manager->Metrics();
    EXPECT_EQ(m.tokens_appended, kLayers * s.tokens_appended());
    EXPECT_EQ(m.blocks_in_use, 0) << h.manager->MetricsText();
    EXPECT_EQ(m.sequences, 0);
    EXPECT_GT(m.tier_onboards, 0);
    EXPECT_LT(s.error.RelativeL2(), 1e-2);
    EXPECT_GT(s.error.samples, 0);
  }
}

// Two requests of one conversation arrive together after its prefix went to
// the tier: the first onboards it (host hits); the second's hits are device
// hits on the blocks that onboard still fills. Both sit out until it lands
// (PrefixLoaded knows both cases), so no step waits for the copy; a request
// of another conversation keeps the steps going meanwhile.
TEST(ReplaySchedulerTest, DeviceHitsOnAnOnboardInFlightSitOutToo) {
  SchedulerOptions options = Options();
  options.back_to_back = false;
  options.step_ms = 1.0;
  options.max_running = 8;
  // A hash id per 512 tokens of the prompt (the trace's blocks).
  auto request = [](double t, int64_t input, int64_t output, int64_t hash) {
    TraceRequest r;
    r.timestamp_ms = t;
    r.input_length = input;
    r.output_length = output;
    for (int64_t i = 0; i * kTraceBlockTokens < input; ++i) {
      r.hash_ids.push_back(hash + 100 * i);
    }
    return r;
  };
  const std::vector<TraceRequest> trace = {
      request(0, 64, 2, 7000),    // Caches the conversation's 4 blocks.
      request(5, 16, 150, 7001),  // Runs throughout.
      request(10, 960, 2, 7002),  // Evicts them to the tier.
      request(100, 80, 2, 7000),  // Host hits: onboards them.
      request(100, 80, 2, 7000),  // Device hits on that onboard.
  };
  Harness h(/*num_blocks=*/64, options, trace, /*tier_blocks=*/64);
  TierCopier* copier = KVCacheManagerTestPeer::HostTierCopier(*h.manager);
  ASSERT_NE(copier, nullptr);
  copier->set_delay_for_testing(absl::Milliseconds(30));
  h.RunToEnd();
  const ReplayStats& s = h.scheduler->stats();
  EXPECT_EQ(s.requests_finished, 5);
  EXPECT_EQ(s.preemptions, 0);
  EXPECT_GT(s.prefix_hit_tokens_host, 0);
  EXPECT_EQ(s.requests_deferred, 2)
      << "preemptions " << s.preemptions << ", deferrals "
      << s.onboard_deferrals << ", host hits " << s.prefix_hit_tokens_host
      << ", hits " << s.prefix_hit_tokens;
  EXPECT_GE(s.onboard_deferrals, 2);
}

// Pipelined steps (the host plans step N+1 before waiting for step N) make
// the same manager calls in the same order as steps that each wait for their
// own kernels: the same tokens, hits, preemptions and gathered bytes, and
// every step's timing is collected by the end.
TEST(ReplaySchedulerTest, PipelinedStepsMatchWaitedSteps) {
  for (auto [blocks, depth] : {std::pair<int64_t, int>{512, 2},
                               {24, 2},
                               {24, 3}}) {  // Roomy, and preempting.
    SCOPED_TRACE(absl::StrCat(blocks, " blocks, ", depth, " in flight"));
    SchedulerOptions waited = Options();
    waited.pipeline = false;
    Harness a(blocks, waited);
    a.RunToEnd();
    SchedulerOptions piped = Options();
    ASSERT_TRUE(piped.pipeline);
    piped.steps_in_flight = depth;
    Harness b(blocks, piped);
    ASSERT_EQ(b.writer->max_steps_in_flight(), depth);
    b.RunToEnd();
    const ReplayStats& x = a.scheduler->stats();
    const ReplayStats& y = b.scheduler->stats();
    EXPECT_EQ(y.requests_finished, 12);
    EXPECT_EQ(y.steps, x.steps);
    EXPECT_EQ(y.prefill_tokens, x.prefill_tokens);
    EXPECT_EQ(y.recompute_tokens, x.recompute_tokens);
    EXPECT_EQ(y.decode_tokens, x.decode_tokens);
    EXPECT_EQ(y.prefix_hit_tokens, x.prefix_hit_tokens);
    EXPECT_EQ(y.preemptions, x.preemptions);
    EXPECT_EQ(y.peak_blocks_in_use, x.peak_blocks_in_use);
    EXPECT_EQ(y.error.samples, x.error.samples);
    EXPECT_EQ(y.error.tokens, x.error.tokens);
    EXPECT_EQ(y.error.error_sq, x.error.error_sq);
    EXPECT_EQ(b.manager->Metrics().evictions, a.manager->Metrics().evictions);
    EXPECT_EQ(b.manager->Metrics().tokens_appended,
              a.manager->Metrics().tokens_appended);
    EXPECT_EQ(b.writer->steps_in_flight(), 0);
    EXPECT_GT(y.kernel_ms, 0.0);
    EXPECT_GE(y.device_ms, y.kernel_ms);
  }
}

// The writer keeps at most max_steps_in_flight steps enqueued; WaitStep
// takes them oldest first, and refuses when none is in flight.
TEST(ReplaySchedulerTest, WriterKeepsAtMostTwoStepsInFlight) {
  Harness h(/*num_blocks=*/64, Options());
  ASSERT_EQ(h.writer->max_steps_in_flight(), 2);
  KVCacheManager& m = *h.manager;
  std::vector<TokenId> prompt(40);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = 11 + i;
  ASSERT_TRUE(m.AddSequence(1, prompt).ok());
  auto step = [&](int64_t begin, int64_t n) -> absl::Status {
    absl::StatusOr<StepPlanInfo> plan = m.Reserve({{1, {}, n}});
    if (!plan.ok()) return plan.status();
    std::vector<TokenAt> tokens;
    for (int64_t p = begin; p < begin + n; ++p)
      tokens.push_back({prompt[p], p});
    if (absl::Status s = h.writer->MarkPlanStart(false); !s.ok()) {
      m.Abort(plan->id).IgnoreError();
      return s;
    }
    absl::StatusOr<double> host_ms = h.writer->AppendStep(plan->id, tokens);
    if (!host_ms.ok()) {
      m.Abort(plan->id).IgnoreError();
      return host_ms.status();
    }
    return m.Commit(plan->id);
  };
  EXPECT_TRUE(absl::IsFailedPrecondition(h.writer->WaitStep().status()));
  ASSERT_TRUE(step(0, 10).ok());
  ASSERT_TRUE(step(10, 10).ok());
  EXPECT_EQ(h.writer->steps_in_flight(), 2);
  const absl::Status third = step(20, 10);
  EXPECT_TRUE(absl::IsFailedPrecondition(third)) << third;
  EXPECT_NE(third.message().find("2 steps are in flight"), std::string::npos)
      << third;
  EXPECT_EQ(m.SequenceLength(1).value(), 20);  // The refused step rolled back.
  ASSERT_TRUE(h.writer->WaitStep().ok());
  ASSERT_TRUE(step(20, 10).ok());
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<AppendTiming> t = h.writer->WaitStep();
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_GE(t->device_ms, t->kernel_ms);
  }
  EXPECT_EQ(h.writer->steps_in_flight(), 0);
  EXPECT_TRUE(absl::IsFailedPrecondition(h.writer->WaitStep().status()));
  EXPECT_EQ(m.Metrics().tokens_appended, kLayers * 30);
}

TEST(ReplaySchedulerTest, ArrivalsFollowTimestamps) {
  SchedulerOptions options = Options();
  options.back_to_back = false;
  options.step_ms = 1.0;
  std::vector<TraceRequest> trace = TinyTrace();
  trace.back().timestamp_ms = 1000000;  // Long idle gap before the last.
  Harness h(/*num_blocks=*/512, options, trace);
  h.RunToEnd();
  const ReplayStats& s = h.scheduler->stats();
  EXPECT_EQ(s.requests_finished, 12);
  EXPECT_GE(s.simulated_ms, 1000000.0);  // The gap was skipped, not stepped.
  EXPECT_LT(s.steps, 1000);
}

TEST(ReplaySchedulerTest, JsonReportParsesAndHasEveryField) {
  Harness h(/*num_blocks=*/24, Options());
  h.RunToEnd();
  ReplayReport report = MakeReport(h.scheduler->stats(), h.manager->Metrics(),
                                   h.writer->BytesPerToken(), /*wall_s=*/1.0);
  const nlohmann::json j = nlohmann::json::parse(ReportJson(report));
  for (const char* key : {"backend",
                          "cache_dtype",
                          "num_layers",
                          "requests_total",
                          "requests_finished",
                          "requests_rejected",
                          "steps",
                          "tokens_appended",
                          "prefill_tokens",
                          "recompute_tokens",
                          "decode_tokens",
                          "layer_appends",
                          "prefix_hit_rate",
                          "evictions",
                          "preemptions",
                          "peak_blocks_in_use",
                          "total_blocks",
                          "host_ms_per_step_median",
                          "host_ms_per_step_p99",
                          "plan_s",
                          "plan_add_s",
                          "plan_reserve_s",
                          "kernel_s",
                          "append_gb_per_s",
                          "quant_rel_l2_error",
                          "error_samples",
                          "error_tokens",
                          "simulated_s",
                          "wall_s",
                          "tokens_per_s"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_EQ(j["requests_finished"], 12);
  EXPECT_EQ(j["layer_appends"], h.manager->Metrics().tokens_appended);
  EXPECT_GT(j["append_gb_per_s"].get<double>(), 0.0);
  EXPECT_GT(j["prefix_hit_rate"].get<double>(), 0.0);
  EXPECT_NE(ReportText(report).find("preemptions"), std::string::npos);
  // The plan's calls are part of it.
  const ReplayStats& s = h.scheduler->stats();
  EXPECT_GT(s.plan_add_ms, 0.0);
  EXPECT_GT(s.plan_reserve_ms, 0.0);
  EXPECT_LE(s.plan_add_ms + s.plan_can_reserve_ms + s.plan_reserve_ms +
                s.plan_loaded_ms,
            s.plan_ms);
}

}  // namespace
}  // namespace kvcache::replay
