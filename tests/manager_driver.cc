#include "tests/manager_driver.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "testing/kv_reference.h"

namespace kvcache::testing {
namespace {

constexpr int kMaxSequences = 12;

}  // namespace

absl::StatusOr<std::unique_ptr<ManagerDriver>> ManagerDriver::Create(
    const KVCacheConfig& config, uint64_t data_seed, uint64_t op_seed) {
  std::unique_ptr<ManagerDriver> d(
      new ManagerDriver(config, data_seed, op_seed));
  d->head_size_v_ =
      config.head_size_v != 0 ? config.head_size_v : config.head_size;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> manager =
      KVCacheManager::Create(config);
  if (!manager.ok()) return manager.status();
  d->manager_ = *std::move(manager);
  if (config.backend == Backend::kCuda) {
    absl::StatusOr<std::unique_ptr<Device>> device =
        CreateCudaDevice(config.device);
    if (!device.ok()) return device.status();
    d->device_ = *std::move(device);
  } else {
    d->device_ = CreateCpuDevice();
  }
  // A few shared prefixes, some longer than several blocks.
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> prefix(
        std::uniform_int_distribution<int>(1, 5 * config.block_size)(d->rng_));
    for (int32_t& t : prefix) {
      t = std::uniform_int_distribution<int32_t>(0, 50000)(d->rng_);
    }
    d->prefixes_.push_back(std::move(prefix));
  }
  return d;
}

void ManagerDriver::PushToken(Sequence& seq, int32_t token) {
  const uint64_t parent = seq.prefix_hash.empty() ? 0 : seq.prefix_hash.back();
  seq.tokens.push_back(token);
  seq.prefix_hash.push_back(ExtendPrefixHash(parent, token));
}

std::vector<float> ManagerDriver::Expected(const Sequence& seq, int64_t pos,
                                           int layer, bool is_value) const {
  const int d = is_value ? head_size_v_ : config_.head_size;
  std::vector<float> row =
      SyntheticRow(data_seed_, layer, is_value, seq.prefix_hash[pos],
                   config_.num_kv_heads, d);
  std::vector<float> out;
  out.reserve(row.size());
  for (int h = 0; h < config_.num_kv_heads; ++h) {
    std::vector<float> head(row.begin() + h * d, row.begin() + (h + 1) * d);
    std::vector<float> q = QuantizeDequantizeHead(head, config_.cache_dtype);
    out.insert(out.end(), q.begin(), q.end());
  }
  return out;
}

absl::Status ManagerDriver::RandomOp() {
  const int op = std::uniform_int_distribution<int>(0, 99)(rng_);
  if (sequences_.empty() || (op < 25 && sequences_.size() < kMaxSequences)) {
    return Add();
  }
  if (op < 80) return Step();
  if (op < 90) return Fork();
  auto it = sequences_.begin();
  std::advance(it, std::uniform_int_distribution<size_t>(
                       0, sequences_.size() - 1)(rng_));
  return Free(it->first);
}

absl::Status ManagerDriver::Add() {
  Sequence seq;
  const auto& prefix = prefixes_[std::uniform_int_distribution<size_t>(
      0, prefixes_.size() - 1)(rng_)];
  for (int32_t t : prefix) PushToken(seq, t);
  const int tail = std::uniform_int_distribution<int>(0, 9)(rng_);
  for (int i = 0; i < tail; ++i) {
    PushToken(seq, std::uniform_int_distribution<int32_t>(0, 50000)(rng_));
  }
  const int64_t id = next_id_++;
  absl::StatusOr<int64_t> computed =
      manager_->AddSequence(id, seq.tokens, ExtraKey{});
  if (!computed.ok()) return computed.status();
  if (*computed >= static_cast<int64_t>(seq.tokens.size())) {
    return absl::InternalError(
        absl::StrCat("sequence ", id, " of ", seq.tokens.size(),
                     " tokens reported ", *computed, " computed"));
  }
  seq.computed = *computed;
  counts_.prefix_hit_tokens += *computed;
  sequences_.emplace(id, std::move(seq));
  ++counts_.adds;
  return absl::OkStatus();
}

absl::Status ManagerDriver::Free(int64_t id) {
  if (absl::Status s = manager_->Free(id); !s.ok()) return s;
  sequences_.erase(id);
  ++counts_.frees;
  return absl::OkStatus();
}

absl::Status ManagerDriver::Fork() {
  auto it = sequences_.begin();
  std::advance(it, std::uniform_int_distribution<size_t>(
                       0, sequences_.size() - 1)(rng_));
  const int64_t child = next_id_++;
  if (absl::Status s = manager_->Fork(it->first, child); !s.ok()) return s;
  sequences_.emplace(child, it->second);
  ++counts_.forks;
  return absl::OkStatus();
}

absl::Status ManagerDriver::Step() {
  // A random subset of the sequences, in id order.
  std::vector<ReserveRequest> batch;
  std::vector<int64_t> ids;
  std::vector<std::pair<int64_t, int64_t>>
      rows;  // (sequence, position) per token.
  for (auto& [id, seq] : sequences_) {
    if (std::uniform_int_distribution<int>(0, 2)(rng_) == 0) continue;
    ReserveRequest request;
    request.sequence = id;
    const int64_t pending =
        static_cast<int64_t>(seq.tokens.size()) - seq.computed;
    if (pending > 0) {
      request.num_tokens = std::min<int64_t>(
          pending, std::uniform_int_distribution<int64_t>(1, 9)(rng_));
    } else {
      request.new_token_ids = {
          std::uniform_int_distribution<int32_t>(0, 50000)(rng_)};
      request.num_tokens = 1;
    }
    batch.push_back(request);
    ids.push_back(id);
  }
  if (batch.empty()) return absl::OkStatus();
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve(batch);
  if (absl::IsResourceExhausted(plan.status())) {
    // Preempt the newest sequence, as an engine would.
    ++counts_.preemptions;
    return Free(sequences_.rbegin()->first);
  }
  if (absl::IsOutOfRange(plan.status())) {
    // A sequence grew past the whole pool (it can never fit): drop the
    // longest one of the batch, as an engine would finish it.
    int64_t longest = ids[0];
    for (int64_t id : ids) {
      if (sequences_[id].tokens.size() > sequences_[longest].tokens.size()) {
        longest = id;
      }
    }
    ++counts_.preemptions;
    return Free(longest);
  }
  if (!plan.ok()) return plan.status();
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence& seq = sequences_[ids[i]];
    for (int32_t t : batch[i].new_token_ids) PushToken(seq, t);
    for (int64_t k = 0; k < batch[i].num_tokens; ++k) {
      rows.emplace_back(ids[i], seq.computed + k);
    }
  }
  counts_.block_copies += plan->num_block_copies;
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    if (absl::Status s = AppendLayer(plan->id, rows, ids, layer); !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = manager_->Commit(plan->id); !s.ok()) return s;
  for (size_t i = 0; i < batch.size(); ++i) {
    sequences_[ids[i]].computed += batch[i].num_tokens;
  }
  ++counts_.steps;
  return manager_->Validate();
}

absl::Status ManagerDriver::AppendLayer(
    uint64_t plan, const std::vector<std::pair<int64_t, int64_t>>& rows,
    const std::vector<int64_t>& /*ids*/, int layer) {
  const int heads = config_.num_kv_heads;
  const int64_t t = static_cast<int64_t>(rows.size());
  const int64_t k_row = static_cast<int64_t>(heads) * config_.head_size;
  const int64_t v_row = static_cast<int64_t>(heads) * head_size_v_;
  // K and V interleaved in one buffer per token, like a fused QKV output: K
  // then V then padding.
  const int64_t stride = k_row + v_row + 8;
  std::vector<uint16_t> host(t * stride, 0xffff);
  for (int64_t i = 0; i < t; ++i) {
    const Sequence& seq = sequences_[rows[i].first];
    const uint64_t hash = seq.prefix_hash[rows[i].second];
    std::vector<float> k =
        SyntheticRow(data_seed_, layer, false, hash, heads, config_.head_size);
    std::vector<float> v =
        SyntheticRow(data_seed_, layer, true, hash, heads, head_size_v_);
    for (int64_t j = 0; j < k_row; ++j)
      host[i * stride + j] = FloatToBf16(k[j]);
    for (int64_t j = 0; j < v_row; ++j) {
      host[i * stride + k_row + j] = FloatToBf16(v[j]);
    }
  }
  const size_t bytes = host.size() * sizeof(uint16_t);
  absl::StatusOr<Buffer> buffer = device_->Allocate(bytes);
  if (!buffer.ok()) return buffer.status();
  if (absl::Status s = device_->CopyToDeviceAsync(buffer->data(), host.data(),
                                                  bytes, nullptr);
      !s.ok()) {
    return s;
  }
  const MemoryKind memory =
      config_.backend == Backend::kCuda ? MemoryKind::kCuda : MemoryKind::kHost;
  TensorView key = TensorView::Contiguous(buffer->data(), DType::kBFloat16,
                                          {t, heads, config_.head_size}, memory,
                                          config_.device);
  key.strides[0] = stride;
  TensorView value =
      TensorView::Contiguous(buffer->as<uint16_t>() + k_row, DType::kBFloat16,
                             {t, heads, head_size_v_}, memory, config_.device);
  value.strides[0] = stride;
  // Append in two pieces to exercise partial appends.
  const int64_t first = t / 2;
  if (first > 0) {
    TensorView k1 = key, v1 = value;
    k1.shape[0] = v1.shape[0] = first;
    if (absl::Status s = manager_->Append(plan, layer, k1, v1); !s.ok()) {
      return s;
    }
  }
  TensorView k2 = key, v2 = value;
  k2.data = buffer->as<uint16_t>() + first * stride;
  v2.data = buffer->as<uint16_t>() + first * stride + k_row;
  k2.shape[0] = v2.shape[0] = t - first;
  if (absl::Status s = manager_->Append(plan, layer, k2, v2); !s.ok()) {
    return s;
  }
  return device_->SynchronizeStream(nullptr);
}

absl::Status ManagerDriver::VerifyAll() {
  const int heads = config_.num_kv_heads;
  const MemoryKind memory =
      config_.backend == Backend::kCuda ? MemoryKind::kCuda : MemoryKind::kHost;
  for (const auto& [id, seq] : sequences_) {
    if (seq.computed == 0) continue;
    absl::StatusOr<int64_t> length = manager_->SequenceLength(id);
    if (!length.ok()) return length.status();
    if (*length != seq.computed) {
      return absl::InternalError(absl::StrCat("sequence ", id, " has length ",
                                              *length, ", expected ",
                                              seq.computed));
    }
    const int64_t t = seq.computed;
    const int64_t k_elems = t * heads * config_.head_size;
    const int64_t v_elems = t * heads * head_size_v_;
    absl::StatusOr<Buffer> out =
        device_->Allocate((k_elems + v_elems) * sizeof(float));
    if (!out.ok()) return out.status();
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      TensorView k = TensorView::Contiguous(out->data(), DType::kFloat32,
                                            {t, heads, config_.head_size},
                                            memory, config_.device);
      TensorView v = TensorView::Contiguous(
          out->as<float>() + k_elems, DType::kFloat32, {t, heads, head_size_v_},
          memory, config_.device);
      if (absl::Status s = manager_->Gather(id, layer, 0, t, k, v); !s.ok()) {
        return s;
      }
      std::vector<float> host(k_elems + v_elems);
      if (absl::Status s = device_->CopyToHost(host.data(), out->data(),
                                               host.size() * sizeof(float));
          !s.ok()) {
        return s;
      }
      for (int64_t pos = 0; pos < t; ++pos) {
        for (bool is_value : {false, true}) {
          const std::vector<float> expected =
              Expected(seq, pos, layer, is_value);
          const float* got = host.data() + (is_value ? k_elems : 0) +
                             pos * static_cast<int64_t>(expected.size());
          if (std::memcmp(got, expected.data(),
                          expected.size() * sizeof(float)) != 0) {
            size_t j = 0;
            while (std::memcmp(&got[j], &expected[j], sizeof(float)) == 0) ++j;
            return absl::InternalError(
                absl::StrCat("sequence ", id, " layer ", layer, " token ", pos,
                             is_value ? " V" : " K", " element ", j, ": got ",
                             got[j], ", expected ", expected[j]));
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::testing
