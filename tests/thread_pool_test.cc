// ThreadPool (kernels/thread_pool.h): every item of every call runs exactly
// once, with 1 and N threads, over many calls and from concurrent callers; a
// thread start that fails (throwing std::system_error as std::thread does at a
// pid limit, or returning a thread that is not joinable) leaves a smaller pool
// that still completes every call, and the CPU kernels on it still succeed
// with the same bytes; pools are destroyed with idle workers. CI runs it under
// --config=tsan too.

#include "kernels/thread_pool.h"

#include <atomic>
#include <cstdint>
#include <random>
#include <set>
#include <system_error>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_kernels.h"
#include "tests/kernel_test_util.h"

namespace kvcache::internal {
namespace {

// Runs ParallelFor over n items and checks that each ran exactly once.
void ExpectEachOnce(ThreadPool& pool, int64_t n, int64_t chunks) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  pool.ParallelFor(n, chunks, [&](int64_t begin, int64_t end) {
    ASSERT_LE(0, begin);
    ASSERT_LE(begin, end);
    ASSERT_LE(end, n);
    for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1);
  });
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(hits[i].load(), 1) << "item " << i << " of " << n;
  }
}

TEST(ThreadPoolTest, ManyCallsRunEveryItemOnce) {
  std::mt19937_64 rng(7);
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int call = 0; call < 2000; ++call) {
      const int64_t n = 1 + static_cast<int64_t>(rng() % 300);
      ExpectEachOnce(pool, n, 1 + static_cast<int64_t>(rng() % 20));
      if (HasFatalFailure()) return;
    }
  }
}

TEST(ThreadPoolTest, OneThreadAndOneChunkRunOnTheCaller) {
  const std::thread::id me = std::this_thread::get_id();
  ThreadPool one(1);
  one.ParallelFor(100, 8, [&](int64_t begin, int64_t end) {
    EXPECT_EQ(std::this_thread::get_id(), me);
    EXPECT_EQ(begin, 0);
    EXPECT_EQ(end, 100);
  });
  ThreadPool four(4);
  four.ParallelFor(100, 1, [&](int64_t, int64_t) {
    EXPECT_EQ(std::this_thread::get_id(), me);
  });
  four.ParallelFor(0, 4, [&](int64_t, int64_t) { ADD_FAILURE(); });
}

TEST(ThreadPoolTest, ZeroMeansHardwareConcurrency) {
  EXPECT_GE(ThreadPool::ResolveThreads(0), 1);
  EXPECT_EQ(ThreadPool::ResolveThreads(3), 3);
}

TEST(ThreadPoolTest, WorkersShareTheWork) {
  ThreadPool pool(4);
  std::mutex mu;
  std::set<std::thread::id> ids;
  for (int call = 0; call < 200 && ids.size() < 2; ++call) {
    pool.ParallelFor(64, 64, [&](int64_t, int64_t) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    });
  }
  EXPECT_GE(ids.size(), 2u);
}

// A thread start that throws std::system_error (what std::thread does when
// pthread_create fails) at its k-th call.
ThreadPool::StartThreadFn FailingAt(int k, std::atomic<int>* calls) {
  return [k, calls](std::function<void()> body) {
    if (calls->fetch_add(1) == k) {
      throw std::system_error(
          std::make_error_code(std::errc::resource_unavailable_try_again),
          "injected pthread_create failure");
    }
    return std::thread(std::move(body));
  };
}

TEST(ThreadPoolTest, FailedThreadStartLeavesASmallerWorkingPool) {
  for (int k = 0; k < 4; ++k) {
    std::atomic<int> calls{0};
    ThreadPool pool(5, FailingAt(k, &calls));
    EXPECT_EQ(pool.num_threads(), k + 1);
    EXPECT_EQ(calls.load(), k + 1);  // No start after the failure.
    for (int call = 0; call < 50; ++call) ExpectEachOnce(pool, 97, 9);
  }
  // A start that returns a thread that is not joinable.
  ThreadPool none(4, [](std::function<void()>) { return std::thread(); });
  EXPECT_EQ(none.num_threads(), 1);
  ExpectEachOnce(none, 50, 5);
}

TEST(ThreadPoolTest, DestroyedWithIdleWorkers) {
  for (int i = 0; i < 20; ++i) {
    ThreadPool pool(4);
    if (i % 2 == 0) ExpectEachOnce(pool, 40, 8);
  }
}

TEST(ThreadPoolTest, ConcurrentCallersEachComplete) {
  ThreadPool pool(3);
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&pool] {
      for (int call = 0; call < 300; ++call) ExpectEachOnce(pool, 64, 8);
    });
  }
  for (std::thread& t : callers) t.join();
}

// The regression of issue #12: the CPU kernels used to start std::threads per
// call, so a failing thread start threw std::system_error out of Append and
// Gather. With a pool whose thread start fails, large calls still succeed and
// write the same bytes as without a pool.
TEST(ThreadPoolTest, KernelsSucceedWhenThreadStartFails) {
  std::mt19937_64 rng(11);
  testing::CaseConfig c;
  c.num_tokens = 2048;  // 2048 x 8 x 256 elements: split over the pool.
  const testing::HostCase hc = testing::MakeCase(c, rng);
  for (int k : {0, 1}) {
    std::atomic<int> calls{0};
    ThreadPool pool(4, FailingAt(k, &calls));
    std::vector<std::vector<uint8_t>> caches;
    for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
      testing::HostCase run = hc;
      const QuantizeWriteParams params = run.Params(
          run.input.data(), run.slots.data(), run.key_cache.data(),
          run.value_cache.data(), run.key_scale.data(), run.value_scale.data());
      ASSERT_TRUE(QuantizeWriteCpu(params, p).ok());
      testing::GatherCase g =
          testing::MakeGatherCase(run, DType::kFloat32, 3, rng);
      ASSERT_TRUE(GatherCpu(g.Params(params.cache, g.output.data(), nullptr,
                                     g.block_table.data()),
                            p)
                      .ok());
      caches.push_back(run.key_cache);
    }
    EXPECT_EQ(caches[0], caches[1]);
  }
}

}  // namespace
}  // namespace kvcache::internal
