#include "benchmarks/replay/group_replay.h"

#include <algorithm>
#include <deque>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/group_block_manager.h"
#include "benchmarks/replay/model_presets.h"
#include "core/layer_group.h"

namespace kvcache::replay {
namespace {

struct Running {
  size_t request = 0;  // Index into the trace.
  SequenceId id = 0;
  int64_t prompt = 0;
  int64_t computed = 0;
  int64_t decoded = 0;
};

GroupBlockManagerOptions ManagerOptions(const GroupPaging& paging,
                                        int32_t block_size, int64_t pages) {
  GroupBlockManagerOptions o;
  o.num_blocks = static_cast<int32_t>(std::min<int64_t>(pages, INT32_MAX));
  o.block_size = block_size;
  for (const GroupTable& t : paging.tables) {
    o.windows.push_back(t.sliding_window);
  }
  return o;
}

// Bytes of the pages one sequence of `tokens` tokens holds after its prefill
// (in chunks of `chunk`), per 1024 tokens.
absl::StatusOr<double> ContextBytesPer1k(const KVCacheConfig& config,
                                         int64_t tokens, int64_t chunk) {
  const GroupPaging paging = ConfigPaging(config);
  const int64_t bs = config.block_size;
  const int64_t pages = int64_t{static_cast<int64_t>(paging.tables.size())} *
                        ((tokens + chunk) / bs + 2);
  auto m = GroupBlockManager::Create(ManagerOptions(paging, bs, pages));
  if (!m.ok()) return m.status();
  std::vector<TokenId> prompt(tokens);
  for (int64_t i = 0; i < tokens; ++i) prompt[i] = static_cast<TokenId>(i);
  if (auto s = (*m)->AddSequence(0, prompt); !s.ok()) return s.status();
  for (int64_t done = 0; done < tokens;) {
    const int64_t n = std::min(chunk, tokens - done);
    auto plan = (*m)->Reserve({{0, {}, n}});
    if (!plan.ok()) return plan.status();
    if (absl::Status s = (*m)->Commit(plan->id); !s.ok()) return s;
    done += n;
  }
  return static_cast<double>((*m)->Usage().used_blocks) *
         static_cast<double>(paging.page_bytes()) * 1024.0 /
         static_cast<double>(tokens);
}

}  // namespace

absl::StatusOr<GroupReplayReport> RunGroupReplay(
    const std::string& model, const KVCacheConfig& config,
    const std::vector<TraceRequest>& trace, const GroupReplayOptions& options) {
  const GroupPaging paging = ConfigPaging(config);
  GroupReplayReport r;
  r.model = model;
  r.tables = static_cast<int32_t>(paging.tables.size());
  r.layers_per_page = paging.layers_per_page;
  r.page_bytes = paging.page_bytes();
  r.num_pages = options.kv_bytes / r.page_bytes;
  for (const LayerGroup& g : config.layer_groups) {
    r.kv_bytes_per_token +=
        static_cast<int64_t>(g.layers.size()) * GroupLayerBlockBytes(g, 1);
  }
  r.peak_pages_per_group.assign(config.layer_groups.size(), 0);
  r.tables_per_group.assign(config.layer_groups.size(), 0);
  for (const GroupTable& t : paging.tables) ++r.tables_per_group[t.group];
  auto created = GroupBlockManager::Create(
      ManagerOptions(paging, config.block_size, r.num_pages));
  if (!created.ok()) return created.status();
  GroupBlockManager& m = **created;

  std::deque<size_t> waiting;
  for (size_t i = 0; i < trace.size(); ++i) waiting.push_back(i);
  r.requests = static_cast<int64_t>(trace.size());
  std::deque<Running> running;
  SequenceId next_id = 1;
  const int64_t bs = config.block_size;
  while (!waiting.empty() || !running.empty()) {
    ++r.steps;
    int64_t budget = options.token_budget;
    std::vector<ReserveRequest> batch;
    for (Running& q : running) {
      if (budget == 0) break;
      ReserveRequest req{q.id, {}, 0};
      if (q.computed < q.prompt) {
        req.num_tokens = std::min(budget, q.prompt - q.computed);
      } else {
        req.new_token_ids = {static_cast<TokenId>(q.decoded + 7)};
        req.num_tokens = 1;
      }
      budget -= req.num_tokens;
      batch.push_back(std::move(req));
    }
    while (budget > 0 && !waiting.empty() &&
           static_cast<int>(running.size()) < options.max_running) {
      const size_t i = waiting.front();
      const std::vector<TokenId> prompt = TracePrompt(trace[i]);
      // Whole-pool check: prompt + output in every full table, a window and
      // a chunk in every sliding one.
      const int64_t blocks = static_cast<int64_t>(
          (prompt.size() + trace[i].output_length + bs - 1) / bs);
      int64_t need = 0;
      for (const GroupTable& t : paging.tables) {
        need +=
            t.sliding_window == 0
                ? blocks
                : std::min(blocks,
                           (t.sliding_window + options.token_budget) / bs + 2);
      }
      if (need > r.num_pages || prompt.empty()) {
        waiting.pop_front();
        ++r.rejected;
        continue;
      }
      auto hit = m.AddSequence(next_id, prompt);
      if (!hit.ok()) return hit.status();
      waiting.pop_front();
      Running q{i, next_id++, static_cast<int64_t>(prompt.size()), *hit, 0};
      const int64_t n = std::min(budget, q.prompt - q.computed);
      budget -= n;
      batch.push_back({q.id, {}, n});
      running.push_back(q);
    }
    absl::StatusOr<GroupStepPlan> plan = m.Reserve(batch);
    while (!plan.ok() &&
           plan.status().code() == absl::StatusCode::kResourceExhausted) {
      if (running.size() <= 1) {  // Cannot fit even alone now: drop it.
        const Running q = running.back();
        running.pop_back();
        if (absl::Status s = m.Free(q.id); !s.ok()) return s;
        ++r.rejected;
        batch.clear();
        break;
      }
      const Running q = running.back();
      running.pop_back();
      if (absl::Status s = m.Free(q.id); !s.ok()) return s;
      waiting.push_front(q.request);
      ++r.preemptions;
      batch.erase(std::remove_if(batch.begin(), batch.end(),
                                 [&](const ReserveRequest& x) {
                                   return x.sequence == q.id;
                                 }),
                  batch.end());
      plan = m.Reserve(batch);
    }
    if (batch.empty()) continue;
    if (!plan.ok()) return plan.status();
    std::vector<int64_t> per_group(config.layer_groups.size(), 0);
    for (int32_t t = 0; t < r.tables; ++t) {
      per_group[paging.tables[t].group] += m.HeldBlocks(t);
    }
    for (size_t g = 0; g < per_group.size(); ++g) {
      r.peak_pages_per_group[g] =
          std::max(r.peak_pages_per_group[g], per_group[g]);
    }
    r.peak_pages = std::max<int64_t>(r.peak_pages, m.Usage().used_blocks);
    if (absl::Status s = m.Commit(plan->id); !s.ok()) return s;
    for (size_t k = 0; k < plan->sequences.size(); ++k) {
      for (Running& q : running) {
        if (q.id != plan->sequences[k]) continue;
        if (q.computed >= q.prompt) ++q.decoded;
        q.computed += plan->num_tokens[k];
      }
    }
    for (auto it = running.begin(); it != running.end();) {
      if (it->computed >= it->prompt &&
          it->decoded >=
              std::max<int64_t>(1, trace[it->request].output_length)) {
        if (absl::Status s = m.Free(it->id); !s.ok()) return s;
        ++r.completed;
        it = running.erase(it);
      } else {
        ++it;
      }
    }
  }
  const GroupPrefixStats& stats = m.PrefixStats();
  r.hit_rate = stats.query_tokens == 0
                   ? 0.0
                   : static_cast<double>(stats.hit_tokens) /
                         static_cast<double>(stats.query_tokens);
  absl::StatusOr<double> with_windows =
      ContextBytesPer1k(config, options.context_tokens, options.token_budget);
  if (!with_windows.ok()) return with_windows.status();
  KVCacheConfig full = config;
  full.layer_groups = AllFull(config.layer_groups);
  absl::StatusOr<double> all_full =
      ContextBytesPer1k(full, options.context_tokens, options.token_budget);
  if (!all_full.ok()) return all_full.status();
  r.bytes_per_1k_context = *with_windows;
  r.bytes_per_1k_context_all_full = *all_full;
  return r;
}

std::string FormatGroupReport(const GroupReplayReport& r) {
  std::string out = absl::StrFormat(
      "model %s: %d tables, %d layers per page, page %d bytes, %d pages\n"
      "KV bytes per token (all layers, K+V+scales): %d\n",
      r.model, r.tables, r.layers_per_page, r.page_bytes, r.num_pages,
      r.kv_bytes_per_token);
  for (size_t g = 0; g < r.peak_pages_per_group.size(); ++g) {
    absl::StrAppendFormat(&out, "group %d: %d tables, peak %d pages\n", g,
                          r.tables_per_group[g], r.peak_pages_per_group[g]);
  }
  absl::StrAppendFormat(
      &out,
      "peak pages in use %d; requests %d, completed %d, rejected %d, "
      "preemptions %d, steps %d\nprefix hit rate %.4f\n"
      "memory per 1k tokens of context: %.3f MiB with windows, %.3f MiB "
      "every layer full (ratio %.3f)\n",
      r.peak_pages, r.requests, r.completed, r.rejected, r.preemptions, r.steps,
      r.hit_rate, r.bytes_per_1k_context / (1 << 20),
      r.bytes_per_1k_context_all_full / (1 << 20),
      r.bytes_per_1k_context / r.bytes_per_1k_context_all_full);
  return out;
}

}  // namespace kvcache::replay
