// ToPrometheusText (api/metrics.h): for a snapshot of distinct random values
// (large counters included), every metric appears once with its exact value
// (the host tier's families exactly when host_tier_blocks_total > 0),
// every family has one HELP and one TYPE line before its samples (counters
// named *_total), and the text parses as the exposition format: each
// non-comment line is `name value` or `name{label="v",...} value`.
// KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/metrics.h"

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"
#include "testing/test_seed.h"

namespace kvcache {
namespace {

// The samples each field must produce: sample (name with labels) -> field.
struct Expected {
  std::string sample;
  std::string family;
  std::string type;
  int64_t MetricsSnapshot::*field;
  // A host tier family: written only when host_tier_blocks_total > 0.
  bool tier = false;
};

// Whether `e`'s sample belongs in the text of `m`.
bool Present(const Expected& e, const MetricsSnapshot& m) {
  return !e.tier || m.host_tier_blocks_total > 0;
}

const std::vector<Expected>& IntegerSamples() {
  static const auto* samples = new std::vector<Expected>{
      {"kvcache_blocks{state=\"free\"}", "kvcache_blocks", "gauge",
       &MetricsSnapshot::blocks_free},
      {"kvcache_blocks{state=\"cached\"}", "kvcache_blocks", "gauge",
       &MetricsSnapshot::blocks_cached},
      {"kvcache_blocks{state=\"in_use\"}", "kvcache_blocks", "gauge",
       &MetricsSnapshot::blocks_in_use},
      {"kvcache_blocks_total", "kvcache_blocks_total", "gauge",
       &MetricsSnapshot::blocks_total},
      {"kvcache_sequences", "kvcache_sequences", "gauge",
       &MetricsSnapshot::sequences},
      {"kvcache_plans_in_flight", "kvcache_plans_in_flight", "gauge",
       &MetricsSnapshot::plans_in_flight},
      {"kvcache_prefix_queries_total", "kvcache_prefix_queries_total",
       "counter", &MetricsSnapshot::prefix_queries},
      {"kvcache_prefix_query_tokens_total", "kvcache_prefix_query_tokens_total",
       "counter", &MetricsSnapshot::prefix_query_tokens},
      {"kvcache_prefix_hit_tokens_total", "kvcache_prefix_hit_tokens_total",
       "counter", &MetricsSnapshot::prefix_hit_tokens},
      {"kvcache_evictions_total", "kvcache_evictions_total", "counter",
       &MetricsSnapshot::evictions},
      {"kvcache_tokens_appended_total", "kvcache_tokens_appended_total",
       "counter", &MetricsSnapshot::tokens_appended},
      {"kvcache_tokens_committed_total", "kvcache_tokens_committed_total",
       "counter", &MetricsSnapshot::tokens_committed},
      {"kvcache_tokens_rejected_total", "kvcache_tokens_rejected_total",
       "counter", &MetricsSnapshot::tokens_rejected},
      {"kvcache_kernel_launches_total", "kvcache_kernel_launches_total",
       "counter", &MetricsSnapshot::kernel_launches},
      {"kvcache_reserve_failures_total", "kvcache_reserve_failures_total",
       "counter", &MetricsSnapshot::reserve_failures},
      {"kvcache_block_copies_total", "kvcache_block_copies_total", "counter",
       &MetricsSnapshot::block_copies},
      {"kvcache_kv_event_batches_total", "kvcache_kv_event_batches_total",
       "counter", &MetricsSnapshot::kv_event_batches},
      {"kvcache_kv_event_batches_dropped_total",
       "kvcache_kv_event_batches_dropped_total", "counter",
       &MetricsSnapshot::kv_event_batches_dropped},
      {"kvcache_kv_event_batches_unpublished_total",
       "kvcache_kv_event_batches_unpublished_total", "counter",
       &MetricsSnapshot::kv_event_batches_unpublished},
      {"kvcache_prefix_hit_tokens_by_tier_total{tier=\"device\"}",
       "kvcache_prefix_hit_tokens_by_tier_total", "counter",
       &MetricsSnapshot::prefix_hit_tokens_device, true},
      {"kvcache_prefix_hit_tokens_by_tier_total{tier=\"host\"}",
       "kvcache_prefix_hit_tokens_by_tier_total", "counter",
       &MetricsSnapshot::prefix_hit_tokens_host, true},
      {"kvcache_tier_evictions_total{tier=\"device\"}",
       "kvcache_tier_evictions_total", "counter", &MetricsSnapshot::evictions,
       true},
      {"kvcache_tier_evictions_total{tier=\"host\"}",
       "kvcache_tier_evictions_total", "counter",
       &MetricsSnapshot::host_tier_evictions, true},
      {"kvcache_tier_blocks_moved_total{direction=\"offload\"}",
       "kvcache_tier_blocks_moved_total", "counter",
       &MetricsSnapshot::tier_offloads, true},
      {"kvcache_tier_blocks_moved_total{direction=\"onboard\"}",
       "kvcache_tier_blocks_moved_total", "counter",
       &MetricsSnapshot::tier_onboards, true},
      {"kvcache_tier_bytes_moved_total{direction=\"offload\"}",
       "kvcache_tier_bytes_moved_total", "counter",
       &MetricsSnapshot::tier_offload_bytes, true},
      {"kvcache_tier_bytes_moved_total{direction=\"onboard\"}",
       "kvcache_tier_bytes_moved_total", "counter",
       &MetricsSnapshot::tier_onboard_bytes, true},
      {"kvcache_host_tier_blocks{state=\"stored\"}", "kvcache_host_tier_blocks",
       "gauge", &MetricsSnapshot::host_tier_blocks_stored, true},
      {"kvcache_host_tier_blocks{state=\"total\"}", "kvcache_host_tier_blocks",
       "gauge", &MetricsSnapshot::host_tier_blocks_total, true},
      {"kvcache_tier_copy_failures_total", "kvcache_tier_copy_failures_total",
       "counter", &MetricsSnapshot::tier_copy_failures, true},
      {"kvcache_tier_offloads_skipped_total",
       "kvcache_tier_offloads_skipped_total", "counter",
       &MetricsSnapshot::tier_offloads_skipped, true},
      {"kvcache_tier_offloads_unselected_total",
       "kvcache_tier_offloads_unselected_total", "counter",
       &MetricsSnapshot::tier_offloads_unselected, true},
      {"kvcache_tier_offloads_waited_total",
       "kvcache_tier_offloads_waited_total", "counter",
       &MetricsSnapshot::tier_offloads_waited, true},
      {"kvcache_tier_offload_ahead_copies_total",
       "kvcache_tier_offload_ahead_copies_total", "counter",
       &MetricsSnapshot::tier_offload_ahead_copies, true},
      {"kvcache_tier_offloads_ahead_total", "kvcache_tier_offloads_ahead_total",
       "counter", &MetricsSnapshot::tier_offloads_ahead, true},
      {"kvcache_tier_offloads_kept_total", "kvcache_tier_offloads_kept_total",
       "counter", &MetricsSnapshot::tier_offloads_kept, true},
      {"kvcache_tier_evictions_deferred_total",
       "kvcache_tier_evictions_deferred_total", "counter",
       &MetricsSnapshot::tier_evictions_deferred, true},
  };
  return *samples;
}

constexpr absl::string_view kUsage = "kvcache_usage_ratio";

// The parsed text: sample -> value text, family -> TYPE, families with HELP.
struct Parsed {
  std::map<std::string, std::string> values;
  std::map<std::string, std::string> types;
  std::set<std::string> helps;
};

bool NameStart(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
         c == ':';
}
bool NameChar(char c) { return NameStart(c) || (c >= '0' && c <= '9'); }

// Consumes a metric name (labels: no ':') from the front of `s`.
bool ConsumeName(absl::string_view* s, bool label, std::string* name) {
  size_t n = 0;
  while (n < s->size() && (n == 0 ? NameStart((*s)[n]) : NameChar((*s)[n])) &&
         !(label && (*s)[n] == ':')) {
    ++n;
  }
  if (n == 0) return false;
  *name = std::string(s->substr(0, n));
  s->remove_prefix(n);
  return true;
}

bool Consume(absl::string_view* s, absl::string_view prefix) {
  if (!absl::StartsWith(*s, prefix)) return false;
  s->remove_prefix(prefix.size());
  return true;
}

// A sample line: name, optional {label="value",...}, one space, a value that
// strtod reads whole. Sets `name` and `sample` (name with labels).
bool ParseSample(absl::string_view line, std::string* name, std::string* sample,
                 std::string* value) {
  absl::string_view s = line;
  if (!ConsumeName(&s, /*label=*/false, name)) return false;
  if (Consume(&s, "{")) {
    do {
      std::string label;
      if (!ConsumeName(&s, /*label=*/true, &label) || !Consume(&s, "=\"")) {
        return false;
      }
      const size_t close = s.find('"');
      if (close == absl::string_view::npos ||
          s.substr(0, close).find('\\') != absl::string_view::npos) {
        return false;
      }
      s.remove_prefix(close + 1);
    } while (Consume(&s, ","));
    if (!Consume(&s, "}")) return false;
  }
  *sample = std::string(line.substr(0, line.size() - s.size()));
  if (!Consume(&s, " ") || s.empty() ||
      s.find_first_of(" \t") != absl::string_view::npos) {
    return false;
  }
  *value = std::string(s);
  char* end = nullptr;
  std::strtod(value->c_str(), &end);
  return *end == '\0';
}

// Parses `text` as the Prometheus text exposition format, failing the test on
// any line that is not a HELP/TYPE comment or a `name[{labels}] value` sample.
Parsed Parse(const std::string& text) {
  Parsed p;
  EXPECT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n') << "the text ends with a line feed";
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty()) continue;
    absl::string_view rest = line;
    std::string name, sample, value;
    if (Consume(&rest, "# HELP ")) {
      EXPECT_TRUE(ConsumeName(&rest, false, &name) && Consume(&rest, " ") &&
                  !rest.empty())
          << "bad HELP line: " << line;
      EXPECT_TRUE(p.helps.insert(name).second) << "second HELP: " << line;
      EXPECT_EQ(p.types.count(name), 0u) << "HELP after TYPE: " << line;
    } else if (Consume(&rest, "# TYPE ")) {
      EXPECT_TRUE(ConsumeName(&rest, false, &name) && Consume(&rest, " "))
          << "bad TYPE line: " << line;
      const std::string type(rest);
      EXPECT_TRUE(type == "counter" || type == "gauge" || type == "histogram" ||
                  type == "summary" || type == "untyped")
          << "bad TYPE line: " << line;
      EXPECT_TRUE(p.types.emplace(name, type).second)
          << "second TYPE: " << line;
      EXPECT_EQ(p.helps.count(name), 1u) << "TYPE without HELP: " << line;
    } else if (ParseSample(line, &name, &sample, &value)) {
      EXPECT_EQ(p.types.count(name), 1u) << "sample before its TYPE: " << line;
      EXPECT_TRUE(p.values.emplace(sample, value).second)
          << "second sample: " << line;
    } else {
      ADD_FAILURE() << "not an exposition-format line: \"" << line << "\"";
    }
  }
  return p;
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = kvcache::testing::TestSeed();
    rng_.seed(seed);
    seed_trace_ = std::make_unique<::testing::ScopedTrace>(
        __FILE__, __LINE__,
        absl::StrCat("seed ", seed, " (rerun with KVCACHE_TEST_SEED=", seed,
                     ")"));
  }

  // Distinct random values of every field, from small to 2^62 (a field in
  // two samples keeps its last value); with `tier` false,
  // host_tier_blocks_total is 0 (no tier: its families are left out).
  MetricsSnapshot RandomSnapshot(bool tier = true) {
    MetricsSnapshot m;
    std::set<int64_t> used;
    for (const Expected& e : IntegerSamples()) {
      int64_t v;
      do {
        const int bits = static_cast<int>(rng_() % 63);
        v = static_cast<int64_t>(rng_() >> (64 - bits - 1) >> 1);
      } while (!used.insert(v).second);
      m.*e.field = v;
    }
    if (!tier) m.host_tier_blocks_total = 0;
    if (tier && m.host_tier_blocks_total == 0) {
      m.host_tier_blocks_total = *used.rbegin() + 1;
    }
    m.usage = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
    return m;
  }

  std::mt19937_64 rng_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
};

TEST_F(MetricsTest, EveryMetricHasItsExactValue) {
  for (int round = 0; round < 50 && !HasFailure(); ++round) {
    const MetricsSnapshot m = RandomSnapshot(/*tier=*/round % 2 == 0);
    const std::string text = ToPrometheusText(m);
    SCOPED_TRACE(text);
    const Parsed p = Parse(text);
    std::set<std::string> families = {std::string(kUsage)};
    size_t samples = 1;
    for (const Expected& e : IntegerSamples()) {
      if (!Present(e, m)) {
        EXPECT_EQ(p.values.count(e.sample), 0u) << e.sample << " without tier";
        continue;
      }
      families.insert(e.family);
      ++samples;
      auto it = p.values.find(e.sample);
      ASSERT_NE(it, p.values.end()) << e.sample << " is missing";
      EXPECT_EQ(it->second, absl::StrCat(m.*e.field)) << e.sample;
      auto type = p.types.find(e.family);
      ASSERT_NE(type, p.types.end()) << "no TYPE for " << e.family;
      EXPECT_EQ(type->second, e.type) << e.family;
      EXPECT_EQ(p.helps.count(e.family), 1u) << "no HELP for " << e.family;
    }
    auto usage = p.values.find(std::string(kUsage));
    ASSERT_NE(usage, p.values.end()) << "usage_ratio is missing";
    EXPECT_EQ(std::strtod(usage->second.c_str(), nullptr), m.usage)
        << "usage_ratio " << usage->second << " does not read back as "
        << absl::StrCat(m.usage);
    EXPECT_EQ(p.types.at(std::string(kUsage)), "gauge");
    // Nothing else: the integer samples and the ratio, in their families.
    EXPECT_EQ(p.values.size(), samples);
    EXPECT_EQ(p.types.size(), families.size());
    EXPECT_EQ(p.helps.size(), families.size());
  }
}

TEST_F(MetricsTest, FamiliesArePrefixedAndCountersEndInTotal) {
  const Parsed p = Parse(ToPrometheusText(RandomSnapshot()));
  for (const auto& [family, type] : p.types) {
    EXPECT_EQ(family.rfind("kvcache_", 0), 0u) << family;
    const bool total = family.size() > 6 &&
                       family.compare(family.size() - 6, 6, "_total") == 0;
    if (type == "counter") {
      EXPECT_TRUE(total) << family;
    }
  }
}

TEST_F(MetricsTest, ZeroAndExtremeValues) {
  MetricsSnapshot zero;
  Parsed p = Parse(ToPrometheusText(zero));
  for (const Expected& e : IntegerSamples()) {
    if (e.tier) {
      EXPECT_EQ(p.values.count(e.sample), 0u) << e.sample << " without tier";
    } else {
      EXPECT_EQ(p.values[e.sample], "0") << e.sample;
    }
  }
  EXPECT_EQ(std::strtod(p.values[std::string(kUsage)].c_str(), nullptr), 0.0);

  MetricsSnapshot big;
  for (const Expected& e : IntegerSamples()) big.*e.field = INT64_MAX;
  big.usage = 1.0;
  p = Parse(ToPrometheusText(big));
  for (const Expected& e : IntegerSamples()) {
    EXPECT_EQ(p.values[e.sample], "9223372036854775807") << e.sample;
  }
  EXPECT_EQ(std::strtod(p.values[std::string(kUsage)].c_str(), nullptr), 1.0);
}

}  // namespace
}  // namespace kvcache
