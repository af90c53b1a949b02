#include "benchmarks/replay/kv_writer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::replay {
namespace {

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

double ErrorTotals::RelativeL2() const {
  return reference_sq > 0.0 ? std::sqrt(error_sq / reference_sq) : 0.0;
}

KvWriter::KvWriter(KVCacheManager* manager, Device* device, int64_t max_tokens,
                   int max_steps_in_flight)
    : manager_(manager),
      device_(device),
      config_(manager->config()),
      synthetic_(
          config_.input_dtype, config_.num_kv_heads, config_.head_size,
          config_.head_size_v != 0 ? config_.head_size_v : config_.head_size),
      max_tokens_(max_tokens),
      sets_(max_steps_in_flight) {
  k_row_ = static_cast<int64_t>(config_.num_kv_heads) * config_.head_size;
  v_row_ = static_cast<int64_t>(config_.num_kv_heads) *
           (config_.head_size_v != 0 ? config_.head_size_v : config_.head_size);
}

absl::StatusOr<std::unique_ptr<KvWriter>> KvWriter::Create(
    KVCacheManager* manager, Device* device, int64_t max_tokens,
    int max_steps_in_flight) {
  if (max_steps_in_flight < 1 || max_steps_in_flight > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_steps_in_flight ", max_steps_in_flight, " is not in [1, 8]"));
  }
  const DType input = manager->config().input_dtype;
  if (input != DType::kBFloat16 && input != DType::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("replay input_dtype ", DTypeName(input),
                     " is not bfloat16 or float16"));
  }
  std::unique_ptr<KvWriter> w(
      new KvWriter(manager, device, max_tokens, max_steps_in_flight));
  const bool cuda = device->kind() == DeviceKind::kCuda;
  const int layers = w->config_.num_layers;
  // K then V per token, like a slice of a fused QKV output.
  const size_t bytes = max_tokens * (w->k_row_ + w->v_row_) * sizeof(uint16_t);
  if (absl::Status s = cuda ? w->InitDevice(bytes) : w->InitHost(bytes);
      !s.ok()) {
    return s;
  }
  for (StepSet& set : w->sets_) {
    for (Event* e : {&set.step_start, &set.plan_start}) {
      absl::StatusOr<Event> event = device->CreateTimingEvent();
      if (!event.ok()) return event.status();
      *e = *std::move(event);
    }
    for (int l = 0; l < layers; ++l) {
      absl::StatusOr<Event> start = device->CreateTimingEvent();
      if (!start.ok()) return start.status();
      absl::StatusOr<Event> end = device->CreateTimingEvent();
      if (!end.ok()) return end.status();
      set.starts.push_back(*std::move(start));
      set.ends.push_back(*std::move(end));
    }
  }
  return w;
}

absl::Status KvWriter::InitHost(size_t bytes) {
  absl::StatusOr<Buffer> staging = device_->AllocateStaging(bytes);
  if (!staging.ok()) return staging.status();
  staging_ = *std::move(staging);
  return absl::OkStatus();
}

absl::Status KvWriter::InitDevice(size_t bytes) {
  const std::vector<uint16_t>& table = synthetic_.table();
  const size_t table_bytes = table.size() * sizeof(uint16_t);
  const size_t token_bytes = TokenBytes();
  for (auto [buffer, size, pinned] :
       {std::make_tuple(&device_table_, table_bytes, false),
        std::make_tuple(&token_staging_,
                        std::max(sets_.size() * token_bytes, table_bytes),
                        true),
        std::make_tuple(&device_tokens_, token_bytes, false),
        std::make_tuple(&input_, bytes, false)}) {
    absl::StatusOr<Buffer> b =
        pinned ? device_->AllocateStaging(size) : device_->Allocate(size);
    if (!b.ok()) return b.status();
    *buffer = *std::move(b);
  }
  for (StepSet& set : sets_) {
    absl::StatusOr<Event> uploaded = device_->CreateEvent();
    if (!uploaded.ok()) return uploaded.status();
    set.tokens_uploaded = *std::move(uploaded);
  }
  std::memcpy(token_staging_.data(), table.data(), table_bytes);
  if (absl::Status s = device_->CopyToDeviceAsync(
          device_table_.data(), token_staging_.data(), table_bytes, nullptr);
      !s.ok()) {
    return s;
  }
  return device_->SynchronizeStream(nullptr);
}

// Generates layer `layer` of a step's K/V into `input_` on the device (the
// step's tokens are already there).
absl::Status KvWriter::FillOnDevice(int layer, int64_t num_tokens,
                                    void* stream) {
  SyntheticFillParams p;
  p.table = device_table_.as<uint16_t>();
  p.tokens = device_tokens_.as<int32_t>();
  p.positions = reinterpret_cast<const int64_t*>(device_tokens_.as<int32_t>() +
                                                 PositionsOffset());
  p.num_tokens = num_tokens;
  p.layer = layer;
  p.num_heads = config_.num_kv_heads;
  p.head_size = config_.head_size;
  p.head_size_v = static_cast<int>(v_row_ / config_.num_kv_heads);
  p.out = input_.as<uint16_t>();
  p.token_stride = k_row_ + v_row_;
  p.value_offset = k_row_;
  return FillSyntheticCuda(p, stream);
}

absl::Status KvWriter::UploadTokens(int set, absl::Span<const TokenAt> tokens,
                                    int64_t padded, void* stream) {
  // The set's previous upload (max_steps_in_flight() steps ago) must be done
  // before its staging is rewritten.
  const Event& uploaded = sets_[set].tokens_uploaded;
  if (absl::Status s = device_->SynchronizeEvent(uploaded); !s.ok()) {
    return s;
  }
  int32_t* ids = reinterpret_cast<int32_t*>(token_staging_.as<uint8_t>() +
                                            set * TokenBytes());
  int64_t* positions = reinterpret_cast<int64_t*>(ids + PositionsOffset());
  for (size_t i = 0; i < tokens.size(); ++i) {
    ids[i] = tokens[i].token;
    positions[i] = tokens[i].position;
  }
  const size_t n = std::max<size_t>(tokens.size(), padded);
  for (size_t i = tokens.size(); i < n; ++i) {
    ids[i] = 0;
    positions[i] = 0;
  }
  int32_t* device_ids = device_tokens_.as<int32_t>();
  if (absl::Status s = device_->CopyToDeviceAsync(device_ids, ids,
                                                  n * sizeof(int32_t), stream);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = device_->CopyToDeviceAsync(
          reinterpret_cast<int64_t*>(device_ids + PositionsOffset()), positions,
          n * sizeof(int64_t), stream);
      !s.ok()) {
    return s;
  }
  return device_->RecordEvent(uploaded, stream);
}

absl::StatusOr<KvWriter::StepSet*> KvWriter::NextSet() {
  if (in_flight_.size() >= sets_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(in_flight_.size(), " steps are in flight, at most ",
                     sets_.size(), ": WaitStep first"));
  }
  return &sets_[next_set_];
}

absl::Status KvWriter::MarkPlanStart(bool graph) {
  absl::StatusOr<StepSet*> set = NextSet();
  if (!set.ok()) return set.status();
  if (device_->kind() != DeviceKind::kCuda) return absl::OkStatus();
  void* s = nullptr;
  if (graph) {
    absl::StatusOr<void*> st = stream();
    if (!st.ok()) return st.status();
    s = *st;
  }
  (*set)->plan_marked = true;
  return device_->RecordEvent((*set)->plan_start, s);
}

absl::StatusOr<AppendTiming> KvWriter::WaitStep() {
  if (in_flight_.empty()) {
    return absl::FailedPreconditionError("no step is in flight");
  }
  StepSet& set = sets_[in_flight_.front()];
  const int last = set.graph ? 0 : config_.num_layers - 1;
  AppendTiming timing;
  timing.host_ms = set.host_ms;
  const auto wait_start = std::chrono::steady_clock::now();
  if (absl::Status s = device_->SynchronizeEvent(set.ends[last]); !s.ok()) {
    return s;
  }
  timing.wait_ms = MillisSince(wait_start);
  // A graph step's events are around the graph, which holds the fills too.
  const Event& first = set.graph ? set.starts[0] : set.step_start;
  absl::StatusOr<float> device_ms = device_->ElapsedMs(first, set.ends[last]);
  if (!device_ms.ok()) return device_ms.status();
  timing.device_ms = *device_ms;
  if (set.plan_marked) {  // Device time from the plan's start to the step's.
    absl::StatusOr<float> ms = device_->ElapsedMs(set.plan_start, first);
    if (!ms.ok()) return ms.status();
    timing.before_ms = *ms;
    set.plan_marked = false;
  }
  for (int layer = 0; layer <= last; ++layer) {
    absl::StatusOr<float> ms =
        device_->ElapsedMs(set.starts[layer], set.ends[layer]);
    if (!ms.ok()) return ms.status();
    timing.kernel_ms += *ms;
  }
  in_flight_.pop_front();
  return timing;
}

absl::StatusOr<double> KvWriter::AppendStep(uint64_t plan_id,
                                            absl::Span<const TokenAt> tokens) {
  const int64_t t = static_cast<int64_t>(tokens.size());
  if (t > max_tokens_) {
    return absl::InvalidArgumentError(
        absl::StrCat("step of ", t, " tokens exceeds ", max_tokens_));
  }
  absl::StatusOr<StepSet*> next = NextSet();
  if (!next.ok()) return next.status();
  StepSet& set = **next;
  const bool cuda = device_->kind() == DeviceKind::kCuda;
  const MemoryKind memory = cuda ? MemoryKind::kCuda : MemoryKind::kHost;
  const int64_t stride = k_row_ + v_row_;
  const int64_t d_v = v_row_ / config_.num_kv_heads;
  double host_ms = 0.0;
  if (absl::Status s = device_->RecordEvent(set.step_start, nullptr); !s.ok()) {
    return s;
  }
  if (cuda) {
    if (absl::Status s = UploadTokens(next_set_, tokens); !s.ok()) return s;
  }
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    uint16_t* input;
    if (cuda) {
      if (absl::Status s = FillOnDevice(layer, t); !s.ok()) return s;
      input = input_.as<uint16_t>();
    } else {
      input = staging_.as<uint16_t>();
      synthetic_.Fill(layer, /*is_value=*/false, tokens, input, stride);
      synthetic_.Fill(layer, /*is_value=*/true, tokens, input + k_row_, stride);
    }
    TensorView key = TensorView::Contiguous(
        input, config_.input_dtype,
        {t, config_.num_kv_heads, config_.head_size}, memory, config_.device);
    key.strides[0] = stride;
    TensorView value = TensorView::Contiguous(
        input + k_row_, config_.input_dtype, {t, config_.num_kv_heads, d_v},
        memory, config_.device);
    value.strides[0] = stride;
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status s = device_->RecordEvent(set.starts[layer], nullptr);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = manager_->Append(plan_id, layer, key, value);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = device_->RecordEvent(set.ends[layer], nullptr);
        !s.ok()) {
      return s;
    }
    host_ms += MillisSince(start);
  }
  Enqueued(/*graph=*/false, host_ms);
  return host_ms;
}

void KvWriter::Enqueued(bool graph, double host_ms) {
  StepSet& set = sets_[next_set_];
  set.graph = graph;
  set.host_ms = host_ms;
  in_flight_.push_back(next_set_);
  next_set_ = (next_set_ + 1) % max_steps_in_flight();
}

KvWriter::~KvWriter() {
  graphs_.clear();
  DestroyStepStream(stream_);
}

absl::StatusOr<void*> KvWriter::stream() {
  if (stream_ == nullptr) {
    absl::StatusOr<void*> s = CreateStepStream();
    if (!s.ok()) return s.status();
    stream_ = *s;
  }
  return stream_;
}

absl::StatusOr<double> KvWriter::GraphStep(uint64_t plan_id,
                                           absl::Span<const TokenAt> tokens,
                                           int64_t padded) {
  if (device_->kind() != DeviceKind::kCuda) {
    return absl::FailedPreconditionError("--cuda_graph needs --backend=cuda");
  }
  if (padded > max_tokens_ || static_cast<int64_t>(tokens.size()) > padded) {
    return absl::InvalidArgumentError(absl::StrCat(
        "graph step of ", tokens.size(), " tokens padded to ", padded));
  }
  absl::StatusOr<StepSet*> next = NextSet();
  if (!next.ok()) return next.status();
  StepSet& set = **next;
  absl::StatusOr<void*> s = stream();
  if (!s.ok()) return s.status();
  if (absl::Status st = UploadTokens(next_set_, tokens, padded, *s); !st.ok()) {
    return st;
  }
  auto it = graphs_.find(padded);
  if (it == graphs_.end()) {
    const int64_t stride = k_row_ + v_row_;
    const int64_t d_v = v_row_ / config_.num_kv_heads;
    absl::StatusOr<std::unique_ptr<StepGraph>> graph =
        StepGraph::Capture(*s, [&]() -> absl::Status {
          for (int layer = 0; layer < config_.num_layers; ++layer) {
            if (absl::Status st = FillOnDevice(layer, padded, *s); !st.ok()) {
              return st;
            }
            uint16_t* input = input_.as<uint16_t>();
            TensorView key = TensorView::Contiguous(
                input, config_.input_dtype,
                {padded, config_.num_kv_heads, config_.head_size},
                MemoryKind::kCuda, config_.device);
            key.strides[0] = stride;
            TensorView value =
                TensorView::Contiguous(input + k_row_, config_.input_dtype,
                                       {padded, config_.num_kv_heads, d_v},
                                       MemoryKind::kCuda, config_.device);
            value.strides[0] = stride;
            if (absl::Status st =
                    manager_->Append(plan_id, layer, key, value, *s);
                !st.ok()) {
              return st;
            }
          }
          return absl::OkStatus();
        });
    if (!graph.ok()) return graph.status();
    it = graphs_.emplace(padded, *std::move(graph)).first;
  }
  const auto start = std::chrono::steady_clock::now();
  if (absl::Status st = device_->RecordEvent(set.starts[0], *s); !st.ok()) {
    return st;
  }
  if (absl::Status st = it->second->Launch(*s); !st.ok()) return st;
  if (absl::Status st = device_->RecordEvent(set.ends[0], *s); !st.ok()) {
    return st;
  }
  const double host_ms = MillisSince(start);
  Enqueued(/*graph=*/true, host_ms);
  return host_ms;
}

absl::StatusOr<double> KvWriter::AttentionStep(
    absl::Span<const SequenceId> ids) {
  if (!in_flight_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        in_flight_.size(), " steps are in flight: WaitStep first"));
  }
  std::vector<Event>& starts = sets_[0].starts;
  std::vector<Event>& ends = sets_[0].ends;
  const bool cuda = device_->kind() == DeviceKind::kCuda;
  const MemoryKind memory = cuda ? MemoryKind::kCuda : MemoryKind::kHost;
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t hq = config_.num_q_heads;
  const int64_t d_v = v_row_ / config_.num_kv_heads;
  const size_t q_elems = static_cast<size_t>(config_.max_sequences_per_step) *
                         hq * std::max<int64_t>(config_.head_size, d_v);
  if (attention_q_.data() == nullptr) {  // Queries: a fixed non-zero pattern.
    absl::StatusOr<Buffer> q = device_->Allocate(q_elems * 2);
    if (!q.ok()) return q.status();
    absl::StatusOr<Buffer> o = device_->Allocate(q_elems * 2);
    if (!o.ok()) return o.status();
    attention_q_ = *std::move(q);
    attention_out_ = *std::move(o);
    std::vector<uint16_t> pattern(q_elems);
    for (size_t i = 0; i < q_elems; ++i) {
      pattern[i] = static_cast<uint16_t>(0x3C00 + (i * 2654435761u) % 0x300);
    }
    if (absl::Status s = device_->CopyToDeviceAsync(
            attention_q_.data(), pattern.data(), q_elems * 2, nullptr);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = device_->SynchronizeStream(nullptr); !s.ok()) return s;
  }
  const DType dtype = DType::kBFloat16;
  const TensorView q = TensorView::Contiguous(attention_q_.data(), dtype,
                                              {n, hq, config_.head_size},
                                              memory, config_.device);
  const TensorView out = TensorView::Contiguous(
      attention_out_.data(), dtype, {n, hq, d_v}, memory, config_.device);
  AttentionOptions options;
  options.softmax_scale =
      1.0f / std::sqrt(static_cast<float>(config_.head_size));
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    if (absl::Status s = device_->RecordEvent(starts[layer], nullptr);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = manager_->Attention(ids, layer, q, out, options);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = device_->RecordEvent(ends[layer], nullptr); !s.ok()) {
      return s;
    }
  }
  double total = 0.0;
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    absl::StatusOr<float> ms = device_->ElapsedMs(starts[layer], ends[layer]);
    if (!ms.ok()) return ms.status();
    total += *ms;
  }
  return total;
}

absl::Status KvWriter::SampleError(SequenceId id, int layer, int64_t begin,
                                   absl::Span<const TokenAt> tokens) {
  const int64_t t = static_cast<int64_t>(tokens.size());
  const int heads = config_.num_kv_heads;
  const int64_t d_v = v_row_ / heads;
  const size_t bytes = t * (k_row_ + v_row_) * sizeof(float);
  if (gather_out_.size() < bytes) {
    absl::StatusOr<Buffer> out = device_->Allocate(bytes);
    if (!out.ok()) return out.status();
    gather_out_ = *std::move(out);
  }
  const MemoryKind memory = device_->kind() == DeviceKind::kCuda
                                ? MemoryKind::kCuda
                                : MemoryKind::kHost;
  TensorView key = TensorView::Contiguous(gather_out_.data(), DType::kFloat32,
                                          {t, heads, config_.head_size}, memory,
                                          config_.device);
  TensorView value = TensorView::Contiguous(
      gather_out_.as<float>() + t * k_row_, DType::kFloat32, {t, heads, d_v},
      memory, config_.device);
  if (absl::Status s = manager_->Gather(id, layer, begin, t, key, value);
      !s.ok()) {
    return s;
  }
  std::vector<float> got(t * (k_row_ + v_row_));
  if (absl::Status s = device_->CopyToHost(got.data(), gather_out_.data(),
                                           got.size() * sizeof(float));
      !s.ok()) {
    return s;
  }
  std::vector<float> exact(std::max(config_.head_size, static_cast<int>(d_v)));
  for (bool is_value : {false, true}) {
    const int64_t d = is_value ? d_v : config_.head_size;
    const float* base = got.data() + (is_value ? t * k_row_ : 0);
    for (int64_t i = 0; i < t; ++i) {
      for (int h = 0; h < heads; ++h) {
        synthetic_.Exact(layer, is_value, tokens[i], h, exact.data());
        const float* row = base + (i * heads + h) * d;
        for (int64_t j = 0; j < d; ++j) {
          const double diff = static_cast<double>(row[j]) - exact[j];
          error_.error_sq += diff * diff;
          error_.reference_sq += static_cast<double>(exact[j]) * exact[j];
        }
      }
    }
  }
  error_.tokens += t;
  ++error_.samples;
  return absl::OkStatus();
}

int64_t KvWriter::BytesPerToken() const {
  const int64_t elements = k_row_ + v_row_;
  int64_t bytes = elements * (DTypeSize(config_.input_dtype) +
                              DTypeSize(config_.cache_dtype));
  if (IsQuantized(config_.cache_dtype)) {
    bytes += 2 * config_.num_kv_heads * static_cast<int64_t>(sizeof(float));
  }
  return bytes * config_.num_layers;
}

}  // namespace kvcache::replay
