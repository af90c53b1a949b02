// ZmqPublisher: publishes KV event batches on a ZeroMQ PUB socket and serves
// recent batches again on an optional ROUTER socket, as vLLM's KV events
// publisher does (README "KV events" gives the wire protocol):
//
//   PUB    every batch as a three-frame message
//            [topic, sequence (8 bytes, big-endian), msgpack payload]
//          (payload layout: msgpack_encoder.h).
//   ROUTER a request [routing id, "", start (8 bytes, big-endian)] (a DEALER
//          client sends ["", start]) is answered, for each kept batch with
//          sequence >= start, by [routing id, "", sequence, payload], then by
//          the end marker [routing id, "", -1 (8 bytes 0xff), ""]. Requests of
//          any other shape are ignored.
//
// Both sockets are bound (never connected) to their endpoints at Create. A
// thread of its own owns the sockets: Publish only copies the batch into a
// bounded queue (at most queue_capacity batches; when full the oldest is
// dropped and counted in dropped()), and the thread encodes and sends it,
// keeps the last replay_batches payloads, and answers replay requests (within
// about 10 ms). libzmq is loaded at Create (zmq_library.h).
//
// Thread-safe. The destructor sends what is still queued (giving the PUB
// socket up to 500 ms to hand it over), then closes both sockets.

#ifndef KVCACHE_EVENTS_ZMQ_PUBLISHER_H_
#define KVCACHE_EVENTS_ZMQ_PUBLISHER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "core/kv_event.h"
#include "events/kv_event_publisher.h"
#include "events/zmq_library.h"

namespace kvcache {
namespace internal {

class ZmqPublisher final : public KVEventPublisher {
 public:
  struct Options {
    std::string endpoint;         // PUB, e.g. "tcp://*:5557"; required.
    std::string replay_endpoint;  // ROUTER; "" = no replay.
    std::string topic;            // First frame of every PUB message.
    int64_t replay_batches = 4096;
    int64_t queue_capacity = 4096;
    int32_t data_parallel_rank = 0;
  };

  // FailedPrecondition when libzmq cannot be loaded, InvalidArgument naming the
  // endpoint when a socket cannot be bound to it.
  static absl::StatusOr<std::unique_ptr<ZmqPublisher>> Create(Options options);
  ZmqPublisher(const ZmqPublisher&) = delete;
  ZmqPublisher& operator=(const ZmqPublisher&) = delete;
  ~ZmqPublisher() override;

  void Publish(const KVEventBatch& batch) override;
  uint64_t dropped() const override { return dropped_.load(); }

 private:
  ZmqPublisher(const ZmqLibrary* zmq, Options options);
  absl::Status Bind(void* socket, const std::string& endpoint,
                    const char* field);
  void Run();
  void Send(const KVEventBatch& batch);
  void ServeReplay();
  void ServeOne();

  const ZmqLibrary* const zmq_;
  const Options options_;
  void* context_ = nullptr;
  void* pub_ = nullptr;     // Owned by the thread once it runs.
  void* router_ = nullptr;  // Likewise; null without replay.
  std::deque<std::pair<uint64_t, std::string>> replay_;  // The thread's.

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<KVEventBatch> pending_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<uint64_t> dropped_{0};
  std::thread thread_;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_EVENTS_ZMQ_PUBLISHER_H_
