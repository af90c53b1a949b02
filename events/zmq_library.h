// ZmqLibrary: the few libzmq functions the publisher calls, looked up at run
// time in libzmq.so.5 (dlopen), so that nothing of ours links libzmq: an
// engine that never publishes events never loads it, and libkvcache.so needs
// no shared library beyond glibc's and the C++ runtime (third_party/
// zmq.BUILD). Loaded once per process and never unloaded; thread-safe.

#ifndef KVCACHE_EVENTS_ZMQ_LIBRARY_H_
#define KVCACHE_EVENTS_ZMQ_LIBRARY_H_

#include "absl/status/statusor.h"
#include "zmq.h"

namespace kvcache {
namespace internal {

struct ZmqLibrary {
  decltype(&zmq_ctx_new) ctx_new;
  decltype(&zmq_ctx_term) ctx_term;
  decltype(&zmq_socket) socket;
  decltype(&zmq_close) close;
  decltype(&zmq_bind) bind;
  decltype(&zmq_setsockopt) setsockopt;
  decltype(&zmq_getsockopt) getsockopt;
  decltype(&zmq_send) send;
  decltype(&zmq_recv) recv;
  decltype(&zmq_poll) poll;
  decltype(&zmq_errno) errno_;
  decltype(&zmq_strerror) strerror;

  // The process's copy: FailedPrecondition naming the library and dlerror()
  // when libzmq.so.5 or one of its functions cannot be found.
  static absl::StatusOr<const ZmqLibrary*> Get();
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_EVENTS_ZMQ_LIBRARY_H_
