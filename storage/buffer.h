// Buffer owns one allocation of host, pinned host or device memory and frees it
// on destruction.
//
// Move-only; thread-compatible. A default-constructed Buffer is empty. The
// memory is released by the deleter the allocating Device supplied, so a Buffer
// may outlive nothing but its Device's process.

#ifndef KVCACHE_STORAGE_BUFFER_H_
#define KVCACHE_STORAGE_BUFFER_H_

#include <cstddef>
#include <utility>

namespace kvcache {

class Buffer {
 public:
  using Deleter = void (*)(void* ptr);

  Buffer() = default;
  // Takes ownership of `ptr` (`bytes` long), released with `deleter`.
  Buffer(void* ptr, size_t bytes, Deleter deleter)
      : ptr_(ptr), bytes_(bytes), deleter_(deleter) {}
  Buffer(Buffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)),
        bytes_(std::exchange(other.bytes_, 0)),
        deleter_(std::exchange(other.deleter_, nullptr)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      Reset();
      ptr_ = std::exchange(other.ptr_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      deleter_ = std::exchange(other.deleter_, nullptr);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { Reset(); }

  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }
  bool empty() const { return ptr_ == nullptr; }

 private:
  void Reset() {
    if (ptr_ != nullptr && deleter_ != nullptr) deleter_(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  Deleter deleter_ = nullptr;
};

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_BUFFER_H_
