#include "testing/trace.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace kvcache {

absl::StatusOr<std::vector<TraceRequest>> LoadTrace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open trace ", path));
  std::vector<TraceRequest> requests;
  std::string line;
  for (int line_no = 1; std::getline(in, line); ++line_no) {
    if (line.empty()) continue;
    const nlohmann::json j =
        nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("input_length") ||
        !j.contains("hash_ids") || !j["hash_ids"].is_array() ||
        !j["input_length"].is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_no, ": expected {input_length, hash_ids, ...}"));
    }
    TraceRequest r;
    r.timestamp_ms = j.value("timestamp", int64_t{0});
    r.input_length = j["input_length"].get<int64_t>();
    r.output_length = j.value("output_length", int64_t{0});
    for (const nlohmann::json& id : j["hash_ids"]) {
      if (!id.is_number_integer()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", line_no, ": bad hash id"));
      }
      r.hash_ids.push_back(id.get<int64_t>());
    }
    if (r.input_length < 1 ||
        static_cast<int64_t>(r.hash_ids.size()) * kTraceBlockTokens <
            r.input_length) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_no, ": input_length ", r.input_length, " needs ",
          (r.input_length + kTraceBlockTokens - 1) / kTraceBlockTokens,
          " hash ids, got ", r.hash_ids.size()));
    }
    requests.push_back(std::move(r));
  }
  return requests;
}

TokenId TraceToken(int64_t hash_id, int position) {
  uint64_t x =
      (static_cast<uint64_t>(hash_id) << 20) | static_cast<uint64_t>(position);
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return static_cast<TokenId>(x & 0x7fffffffU);
}

std::vector<TokenId> TracePrompt(const TraceRequest& request) {
  std::vector<TokenId> tokens(request.input_length);
  for (int64_t t = 0; t < request.input_length; ++t) {
    tokens[t] = TraceToken(request.hash_ids[t / kTraceBlockTokens],
                           static_cast<int>(t % kTraceBlockTokens));
  }
  return tokens;
}

}  // namespace kvcache
