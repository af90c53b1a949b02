// The speculative-decoding operations of block_manager_model_test: Commit with
// accepted counts, RemoveFromPlan and Truncate, each against the reference
// model (block_manager_model.h), hostile arguments included.
//
// A token the model rolls back (a rejected draft, a sequence removed from its
// plan, an aborted plan) has its simulated K/V overwritten with poison: the
// engine wrote it, nobody may read it. So a block holding a rejected draft
// that the prefix cache handed to another sequence, or that stayed in a
// table, fails CheckAll's read-back of every live token's fingerprint.

#include <iterator>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/block_manager_model.h"

namespace kvcache {
namespace model_test {

namespace {
constexpr uint64_t kPoison = 0xdeadbeefdeadbeefULL;
}  // namespace

uint64_t ModelTest::PickPlan() {
  if (!open_plans_.empty() && Rand(0, 15) > 0) {
    return *std::next(open_plans_.begin(),
                      Rand(0, static_cast<int>(open_plans_.size()) - 1));
  }
  if (!closed_plans_.empty() && Rand(0, 1) == 0)
    return closed_plans_[Rand(0, static_cast<int>(closed_plans_.size()) - 1)];
  return 12345678;
}

void ModelTest::CloseCommitted(ModelSeq& s, int64_t accepted) {
  const int64_t end = s.computed + accepted;
  for (int64_t p = end; p < s.computed + s.reserved; ++p)
    kv_[s.table[p / kBs] * kBs + p % kBs] = kPoison ^ p;
  if (accepted < s.reserved) {  // Known tokens end at the accepted ones.
    s.tokens.resize(end);
    s.fp.resize(end);
  }
  s.computed = end;
  s.table.resize((end + kBs - 1) / kBs);
  s.plan = 0;
  s.reserved = 0;
  s.cow_src = -1;
}

void ModelTest::CloseAborted(ModelSeq& s) {
  for (int64_t p = s.computed; p < s.computed + s.reserved; ++p)
    kv_[s.table[p / kBs] * kBs + p % kBs] = kPoison ^ p;
  s.table = s.table_before;
  s.tokens.resize(s.tokens_before);
  s.fp.resize(s.tokens_before);
  s.plan = 0;
  s.reserved = 0;
  s.cow_src = -1;
}

void ModelTest::CommitAccepted() {
  const uint64_t id = PickPlan();
  const bool open = open_plans_.count(id) > 0;
  std::vector<int64_t> accepted;
  std::vector<ModelSeq*> live;  // Per entry: the sequence still in the plan.
  if (open) {
    for (SequenceId sid : plan_batches_[id]) {
      auto it = seqs_.find(sid);
      ModelSeq* s =
          it != seqs_.end() && it->second.plan == id ? &it->second : nullptr;
      live.push_back(s);
      const int64_t reserved = s != nullptr ? s->reserved : 0;
      accepted.push_back(Rand(0, 2) == 0 ? reserved
                                         : Rand(0, static_cast<int>(reserved)));
    }
  } else {
    accepted.push_back(Rand(0, 2));
  }
  bool bad = false;
  if (Rand(0, 40) == 0) {  // One count too many or too few.
    if (Rand(0, 1) == 0 || accepted.empty()) {
      accepted.push_back(0);
    } else {
      accepted.pop_back();
    }
    bad = true;
  } else if (open && Rand(0, 30) == 0) {  // An entry out of range.
    const size_t k = Rand(0, static_cast<int>(accepted.size()) - 1);
    accepted[k] = Rand(0, 1) == 0 ? -1 - Rand(0, 2)
                                  : (live[k] ? live[k]->reserved : 0) + 1;
    bad = live[k] != nullptr;  // Entries of sequences gone are ignored.
  }
  const absl::Status status = m_->Commit(id, accepted);
  const absl::StatusCode want = !open ? absl::StatusCode::kNotFound
                                : bad ? absl::StatusCode::kInvalidArgument
                                      : absl::StatusCode::kOk;
  ASSERT_EQ(status.code(), want) << status;
  if (!status.ok()) return;
  open_plans_.erase(id);
  closed_plans_.push_back(id);
  plan_batches_.erase(id);
  for (size_t k = 0; k < live.size(); ++k) {
    if (live[k] != nullptr) CloseCommitted(*live[k], accepted[k]);
  }
}

void ModelTest::RemoveFromPlan() {
  const uint64_t id = PickPlan();
  const bool open = open_plans_.count(id) > 0;
  SequenceId sid = RandomId();
  if (open && Rand(0, 4) > 0) {
    const std::vector<SequenceId>& batch = plan_batches_[id];
    sid = batch[Rand(0, static_cast<int>(batch.size()) - 1)];
  }
  auto it = seqs_.find(sid);
  const absl::StatusCode want =
      !open || it == seqs_.end() ? absl::StatusCode::kNotFound
      : it->second.plan != id    ? absl::StatusCode::kInvalidArgument
                                 : absl::StatusCode::kOk;
  const absl::Status status = m_->RemoveFromPlan(id, sid);
  ASSERT_EQ(status.code(), want) << status;
  if (status.ok()) CloseAborted(it->second);
}

void ModelTest::Truncate() {
  SequenceId sid = RandomId();
  if (!seqs_.empty() && Rand(0, 9) > 0) {
    sid = std::next(seqs_.begin(), Rand(0, static_cast<int>(seqs_.size()) - 1))
              ->first;
  }
  auto it = seqs_.find(sid);
  const int64_t computed = it == seqs_.end() ? 2 : it->second.computed;
  // Mostly a rewind of a few tokens (a rejected path), at times far back.
  int64_t n = Rand(0, 1) == 0 ? computed - Rand(0, 5) : Rand(0, computed);
  if (Rand(0, 30) == 0) n = Rand(0, 1) == 0 ? -1 : computed + Rand(1, 3);
  if (n < 0 && Rand(0, 3) > 0) n = 0;
  const absl::StatusCode want =
      it == seqs_.end()       ? absl::StatusCode::kNotFound
      : it->second.plan != 0  ? absl::StatusCode::kFailedPrecondition
      : n < 0 || n > computed ? absl::StatusCode::kInvalidArgument
                              : absl::StatusCode::kOk;
  const absl::Status status = m_->Truncate(sid, n);
  ASSERT_EQ(status.code(), want) << status;
  if (!status.ok()) return;
  ModelSeq& s = it->second;
  s.computed = n;
  s.tokens.resize(n);
  s.fp.resize(n);
  s.table.resize((n + kBs - 1) / kBs);
}

}  // namespace model_test
}  // namespace kvcache
