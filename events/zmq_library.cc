#include "events/zmq_library.h"

#include <dlfcn.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {
namespace {

constexpr char kLibrary[] = "libzmq.so.5";

template <typename F>
bool Resolve(void* handle, const char* name, F& out, std::string& error) {
  out = reinterpret_cast<F>(dlsym(handle, name));
  if (out == nullptr && error.empty()) {
    error = absl::StrCat(kLibrary, " has no ", name);
  }
  return out != nullptr;
}

absl::StatusOr<ZmqLibrary> Load() {
  void* handle = dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    return absl::FailedPreconditionError(absl::StrCat(
        "kv_events_endpoint needs ZeroMQ: cannot load ", kLibrary, " (",
        why == nullptr ? "unknown error" : why, "); install Debian's libzmq5"));
  }
  ZmqLibrary z;
  std::string error;
  Resolve(handle, "zmq_ctx_new", z.ctx_new, error);
  Resolve(handle, "zmq_ctx_term", z.ctx_term, error);
  Resolve(handle, "zmq_socket", z.socket, error);
  Resolve(handle, "zmq_close", z.close, error);
  Resolve(handle, "zmq_bind", z.bind, error);
  Resolve(handle, "zmq_setsockopt", z.setsockopt, error);
  Resolve(handle, "zmq_getsockopt", z.getsockopt, error);
  Resolve(handle, "zmq_send", z.send, error);
  Resolve(handle, "zmq_recv", z.recv, error);
  Resolve(handle, "zmq_poll", z.poll, error);
  Resolve(handle, "zmq_errno", z.errno_, error);
  Resolve(handle, "zmq_strerror", z.strerror, error);
  if (!error.empty()) {
    dlclose(handle);
    return absl::FailedPreconditionError(error);
  }
  // Never unloaded: libzmq's own threads may outlive any one publisher.
  return z;
}

}  // namespace

absl::StatusOr<const ZmqLibrary*> ZmqLibrary::Get() {
  // A magic static: loaded once, thread-safe; a failure is remembered too.
  static const absl::StatusOr<ZmqLibrary>* const library =
      new absl::StatusOr<ZmqLibrary>(Load());
  if (!library->ok()) return library->status();
  return &**library;
}

}  // namespace internal
}  // namespace kvcache
