#include "server/compute_pool.h"

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradserver {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<ComputePool> MakePool(int threads, int max_queued) {
  absl::StatusOr<std::unique_ptr<ComputePool>> pool = ComputePool::Create({threads, max_queued});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return pool.ok() ? *std::move(pool) : nullptr;
}

TEST(ComputePoolTest, RejectsOptionsOutOfRange) {
  absl::StatusOr<std::unique_ptr<ComputePool>> pool = ComputePool::Create({0, 1});
  EXPECT_EQ(pool.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pool.status().message(), HasSubstr("threads=0"));
  pool = ComputePool::Create({1, -1});
  EXPECT_EQ(pool.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pool.status().message(), HasSubstr("max_queued=-1"));
}

TEST(ComputePoolTest, RunsEveryTaskOnAPoolThread) {
  std::unique_ptr<ComputePool> pool = MakePool(3, 100);
  std::atomic<int> ran{0};
  std::atomic<bool> on_caller{false};
  const std::thread::id caller = std::this_thread::get_id();
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(pool->Submit([&](ComputePool::Slot&) {
                      if (std::this_thread::get_id() == caller) on_caller = true;
                      ++ran;
                    })
                    .ok());
  }
  pool->Stop();  // runs what is queued
  EXPECT_EQ(ran.load(), 100);
  EXPECT_FALSE(on_caller.load());
}

// With every thread blocked, exactly max_queued more tasks are accepted; the next is refused at
// once and never runs, and capacity returns when the threads do.
TEST(ComputePoolTest, RefusesBeyondRunningPlusQueued) {
  std::unique_ptr<ComputePool> pool = MakePool(2, 3);
  absl::Notification release;
  std::atomic<int> started{0};
  std::atomic<int> ran{0};
  auto blocking = [&](ComputePool::Slot&) {
    ++started;
    release.WaitForNotification();
    ++ran;
  };
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(pool->Submit(blocking).ok()) << i;

  bool refused_ran = false;
  absl::Status refused = pool->Submit([&](ComputePool::Slot&) { refused_ran = true; });
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("max_concurrent_requests=2"));
  EXPECT_THAT(refused.message(), HasSubstr("max_queued_requests=3"));

  release.Notify();
  pool->Stop();
  EXPECT_EQ(ran.load(), 5);
  EXPECT_FALSE(refused_ran);
}

TEST(ComputePoolTest, ZeroQueueAcceptsOnlyWhatTheThreadsCanRun) {
  std::unique_ptr<ComputePool> pool = MakePool(1, 0);
  absl::Notification release;
  ASSERT_TRUE(pool->Submit([&](ComputePool::Slot&) { release.WaitForNotification(); }).ok());
  EXPECT_EQ(pool->Submit([](ComputePool::Slot&) {}).code(), absl::StatusCode::kResourceExhausted);
  release.Notify();
  pool->Stop();
}

TEST(ComputePoolTest, CapacityComesBackWhenATaskFinishes) {
  std::unique_ptr<ComputePool> pool = MakePool(1, 0);
  for (int i = 0; i < 20; ++i) {
    absl::Notification done;
    ASSERT_TRUE(pool->Submit([&](ComputePool::Slot&) { done.Notify(); }).ok()) << i;
    done.WaitForNotification();
    // The slot is released just after the task returns.
    while (pool->running() > 0) std::this_thread::yield();
  }
}

// A task that releases its slot early lets the next task in while it is still running, so
// that a caller who is answered from inside a task can submit again at once.
TEST(ComputePoolTest, ReleasingTheSlotAdmitsTheNextTaskBeforeTheTaskReturns) {
  std::unique_ptr<ComputePool> pool = MakePool(1, 0);
  absl::Notification released;
  absl::Notification finish;
  ASSERT_TRUE(pool->Submit([&](ComputePool::Slot& slot) {
                    slot.Release();
                    slot.Release();  // idempotent
                    released.Notify();
                    finish.WaitForNotification();
                  })
                  .ok());
  released.WaitForNotification();
  EXPECT_EQ(pool->running(), 0);
  std::atomic<bool> next_ran{false};
  EXPECT_TRUE(pool->Submit([&](ComputePool::Slot&) { next_ran = true; }).ok());
  // Admitted, and it waits for the thread; one more is refused.
  EXPECT_EQ(pool->Submit([](ComputePool::Slot&) {}).code(), absl::StatusCode::kResourceExhausted);
  finish.Notify();
  pool->Stop();
  EXPECT_TRUE(next_ran.load());
  EXPECT_EQ(pool->running(), 0);
}

TEST(ComputePoolTest, SubmitAfterStopIsUnavailableAndStopIsIdempotent) {
  std::unique_ptr<ComputePool> pool = MakePool(1, 1);
  pool->Stop();
  pool->Stop();
  absl::Status status = pool->Submit([](ComputePool::Slot&) {});
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(status.message(), HasSubstr("shutting down"));
}

}  // namespace
}  // namespace gradserver
