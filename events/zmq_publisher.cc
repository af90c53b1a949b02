#include "events/zmq_publisher.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "events/msgpack_encoder.h"

namespace kvcache {
namespace internal {
namespace {

constexpr int kPubLingerMs = 500;
// Messages the PUB socket queues per subscriber before it drops (libzmq's
// default is 1000; a burst of small batches must not be lost to a subscriber
// that is a little behind).
constexpr int kPubHighWaterMark = 100000;
// The ROUTER socket's per-client queue: one whole replay and its end marker
// (past it ZeroMQ drops replies; the client then asks again).
int RouterHighWaterMark(int64_t replay_batches) {
  return static_cast<int>(std::min<int64_t>(replay_batches + 16, INT32_MAX));
}
constexpr auto kIdle = std::chrono::milliseconds(10);
// A replay request has three frames; longer messages are read and dropped.
constexpr int kMaxRequestFrames = 8;
// ZeroMQ routing ids are at most 255 bytes.
constexpr size_t kMaxFrameBytes = 256;

void BigEndian(uint64_t v, unsigned char out[8]) {
  for (int i = 7; i >= 0; --i) {
    out[i] = static_cast<unsigned char>(v & 0xff);
    v >>= 8;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ZmqPublisher>> ZmqPublisher::Create(
    Options options) {
  absl::StatusOr<const ZmqLibrary*> zmq = ZmqLibrary::Get();
  if (!zmq.ok()) return zmq.status();
  std::unique_ptr<ZmqPublisher> p(new ZmqPublisher(*zmq, std::move(options)));
  const ZmqLibrary& z = **zmq;
  p->context_ = z.ctx_new();
  if (p->context_ == nullptr) {
    return absl::InternalError(
        absl::StrCat("zmq_ctx_new failed: ", z.strerror(z.errno_())));
  }
  p->pub_ = z.socket(p->context_, ZMQ_PUB);
  if (p->pub_ == nullptr) {
    return absl::InternalError(
        absl::StrCat("zmq_socket(PUB) failed: ", z.strerror(z.errno_())));
  }
  const int linger = kPubLingerMs;
  z.setsockopt(p->pub_, ZMQ_LINGER, &linger, sizeof(linger));
  const int hwm = kPubHighWaterMark;
  z.setsockopt(p->pub_, ZMQ_SNDHWM, &hwm, sizeof(hwm));
  absl::Status s = p->Bind(p->pub_, p->options_.endpoint, "kv_events_endpoint");
  if (!s.ok()) return s;
  if (!p->options_.replay_endpoint.empty()) {
    p->router_ = z.socket(p->context_, ZMQ_ROUTER);
    if (p->router_ == nullptr) {
      return absl::InternalError(
          absl::StrCat("zmq_socket(ROUTER) failed: ", z.strerror(z.errno_())));
    }
    const int no_linger = 0;
    z.setsockopt(p->router_, ZMQ_LINGER, &no_linger, sizeof(no_linger));
    const int router_hwm = RouterHighWaterMark(p->options_.replay_batches);
    z.setsockopt(p->router_, ZMQ_SNDHWM, &router_hwm, sizeof(router_hwm));
    s = p->Bind(p->router_, p->options_.replay_endpoint,
                "kv_events_replay_endpoint");
    if (!s.ok()) return s;
  }
  p->thread_ = std::thread([raw = p.get()] { raw->Run(); });
  return p;
}

ZmqPublisher::ZmqPublisher(const ZmqLibrary* zmq, Options options)
    : zmq_(zmq), options_(std::move(options)) {}

absl::Status ZmqPublisher::Bind(void* socket, const std::string& endpoint,
                                const char* field) {
  if (zmq_->bind(socket, endpoint.c_str()) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " '", endpoint,
                     "' cannot be bound: ", zmq_->strerror(zmq_->errno_())));
  }
  return absl::OkStatus();
}

ZmqPublisher::~ZmqPublisher() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }
  if (router_ != nullptr) zmq_->close(router_);
  if (pub_ != nullptr) zmq_->close(pub_);
  if (context_ != nullptr) zmq_->ctx_term(context_);
}

void ZmqPublisher::Publish(const KVEventBatch& batch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int64_t>(pending_.size()) >= options_.queue_capacity) {
      pending_.pop_front();
      ++dropped_;
    }
    pending_.push_back(batch);
  }
  wake_.notify_one();
}

void ZmqPublisher::Run() {
  for (;;) {
    std::deque<KVEventBatch> work;
    bool stop;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait_for(lock, kIdle, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !pending_.empty();
      });
      work.swap(pending_);
      stop = stop_;
    }
    for (const KVEventBatch& batch : work) Send(batch);
    if (router_ != nullptr) ServeReplay();
    if (stop) return;
  }
}

void ZmqPublisher::Send(const KVEventBatch& batch) {
  std::string payload;
  try {
    payload = EncodeEventBatch(batch, options_.data_parallel_rank);
  } catch (const std::bad_alloc&) {
    ++dropped_;
    return;
  }
  unsigned char seq[8];
  BigEndian(batch.sequence, seq);
  const std::string& topic = options_.topic;
  // A PUB socket never blocks: at its high-water mark it drops the message.
  const bool sent =
      zmq_->send(pub_, topic.data(), topic.size(), ZMQ_SNDMORE) >= 0 &&
      zmq_->send(pub_, seq, sizeof(seq), ZMQ_SNDMORE) >= 0 &&
      zmq_->send(pub_, payload.data(), payload.size(), 0) >= 0;
  if (!sent) ++dropped_;
  if (options_.replay_batches <= 0) return;
  try {
    if (static_cast<int64_t>(replay_.size()) >= options_.replay_batches) {
      replay_.pop_front();
    }
    replay_.emplace_back(batch.sequence, std::move(payload));
  } catch (const std::bad_alloc&) {
    // The batch is simply not kept for replay.
  }
}

void ZmqPublisher::ServeReplay() {
  zmq_pollitem_t item{router_, 0, ZMQ_POLLIN, 0};
  // Bounded, so a flood of requests cannot starve publishing.
  for (int i = 0; i < 64 && zmq_->poll(&item, 1, 0) > 0; ++i) ServeOne();
}

void ZmqPublisher::ServeOne() {
  unsigned char frames[kMaxRequestFrames][kMaxFrameBytes];
  int sizes[kMaxRequestFrames];
  int count = 0;
  int more = 1;
  while (more) {
    unsigned char scratch[kMaxFrameBytes];
    unsigned char* into = count < kMaxRequestFrames ? frames[count] : scratch;
    const int n = zmq_->recv(router_, into, kMaxFrameBytes, ZMQ_DONTWAIT);
    if (n < 0) return;
    if (count < kMaxRequestFrames) sizes[count] = n;
    ++count;
    size_t more_size = sizeof(more);
    if (zmq_->getsockopt(router_, ZMQ_RCVMORE, &more, &more_size) != 0) return;
  }
  // [routing id, "", start]; a routing id longer than the buffer was cut.
  if (count != 3 || sizes[0] > static_cast<int>(kMaxFrameBytes) ||
      sizes[1] != 0 || sizes[2] != 8) {
    return;
  }
  uint64_t start = 0;
  for (int i = 0; i < 8; ++i) start = (start << 8) | frames[2][i];
  const void* id = frames[0];
  const size_t id_size = static_cast<size_t>(sizes[0]);
  // ROUTER drops what cannot be delivered (a client gone, a full pipe).
  const int more_flags = ZMQ_SNDMORE | ZMQ_DONTWAIT;
  for (const auto& [sequence, payload] : replay_) {
    if (sequence < start) continue;
    unsigned char seq[8];
    BigEndian(sequence, seq);
    if (zmq_->send(router_, id, id_size, more_flags) < 0) return;
    zmq_->send(router_, "", 0, more_flags);
    zmq_->send(router_, seq, sizeof(seq), more_flags);
    zmq_->send(router_, payload.data(), payload.size(), ZMQ_DONTWAIT);
  }
  unsigned char end[8];
  BigEndian(~uint64_t{0}, end);  // -1 as a signed 64-bit integer.
  if (zmq_->send(router_, id, id_size, more_flags) < 0) return;
  zmq_->send(router_, "", 0, more_flags);
  zmq_->send(router_, end, sizeof(end), more_flags);
  zmq_->send(router_, "", 0, ZMQ_DONTWAIT);
}

}  // namespace internal
}  // namespace kvcache
