#include "gradengine/memory_budget.h"

#include <atomic>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradengine {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<MemoryBudget> NewBudget(int64_t limit, absl::Duration max_wait = absl::Seconds(5)) {
  MemoryBudgetOptions options;
  options.limit_bytes = limit;
  options.max_wait = max_wait;
  options.limit_name = "--max_memory_mb";
  absl::StatusOr<std::unique_ptr<MemoryBudget>> budget = MemoryBudget::Create(options);
  EXPECT_TRUE(budget.ok()) << budget.status();
  return *std::move(budget);
}

TEST(MemoryBudgetTest, RejectsOptionsOutOfRange) {
  MemoryBudgetOptions options;
  options.limit_bytes = 0;
  EXPECT_EQ(MemoryBudget::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.limit_bytes = 1;
  options.max_wait = absl::Seconds(-1);
  EXPECT_EQ(MemoryBudget::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MemoryBudgetTest, ReservationsAreGivenBackWhenDestroyed) {
  auto budget = NewBudget(1000);
  {
    absl::StatusOr<MemoryBudget::Reservation> a = budget->TryReserve(600, "a");
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(budget->stats().reserved_bytes, 600);
    MemoryBudget::Reservation moved = *std::move(a);
    MemoryBudget::Reservation part = moved.Split(200);
    EXPECT_EQ(moved.bytes(), 400);
    EXPECT_EQ(part.bytes(), 200);
    part.Release();
    EXPECT_EQ(budget->stats().reserved_bytes, 400);
  }
  EXPECT_EQ(budget->stats().reserved_bytes, 0);
  EXPECT_EQ(budget->stats().peak_bytes, 600);
}

TEST(MemoryBudgetTest, MoreThanTheWholeBudgetFailsAtOnceNamingBytesPurposeAndLimit) {
  auto budget = NewBudget(1000);
  const absl::Time start = absl::Now();
  absl::Status status = budget->Reserve(1001, "its results", nullptr).status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("1001 bytes"));
  EXPECT_THAT(status.message(), HasSubstr("its results"));
  EXPECT_THAT(status.message(), HasSubstr("--max_memory_mb of 1000 bytes"));
  EXPECT_EQ(budget->stats().reservations_refused, 1);
}

TEST(MemoryBudgetTest, TryReserveDoesNotWait) {
  auto budget = NewBudget(1000);
  auto held = budget->TryReserve(800, "first");
  ASSERT_TRUE(held.ok());
  absl::Status status = budget->TryReserve(300, "second").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("800 bytes"));
}

TEST(MemoryBudgetTest, ReserveWaitsForAnotherReservationToEnd) {
  auto budget = NewBudget(1000);
  auto held = std::make_unique<MemoryBudget::Reservation>(*budget->TryReserve(800, "first"));
  absl::Notification granted;
  std::thread waiter([&] {
    absl::StatusOr<MemoryBudget::Reservation> second = budget->Reserve(300, "second", nullptr);
    EXPECT_TRUE(second.ok()) << second.status();
    granted.Notify();
  });
  EXPECT_FALSE(granted.WaitForNotificationWithTimeout(absl::Milliseconds(200)));
  held.reset();
  EXPECT_TRUE(granted.WaitForNotificationWithTimeout(absl::Seconds(5)));
  waiter.join();
  EXPECT_EQ(budget->stats().reservations_waited, 1);
  EXPECT_EQ(budget->stats().reserved_bytes, 0);
}

TEST(MemoryBudgetTest, ReserveGivesUpAfterMaxWaitAndOnTheCallersError) {
  auto budget = NewBudget(1000, absl::Milliseconds(200));
  auto held = budget->TryReserve(800, "first");
  ASSERT_TRUE(held.ok());
  absl::Status status = budget->Reserve(300, "second", nullptr).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("waited"));

  auto patient = NewBudget(1000, absl::Seconds(30));
  auto held2 = patient->TryReserve(800, "first");
  const absl::Time start = absl::Now();
  status =
      patient->Reserve(300, "second", [] { return absl::CancelledError("the client went away"); })
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(MemoryBudgetTest, CachedMemoryIsReclaimedBeforeWaiting) {
  auto budget = NewBudget(1000);
  int64_t cache = 0;
  ASSERT_TRUE(budget->TryCache(700));
  cache = 700;
  const int id = budget->AddReclaimer([&](int64_t wanted) {
    const int64_t freed = std::min(cache, std::max<int64_t>(wanted, 100));
    cache -= freed;
    budget->Uncache(freed);
    return freed;
  });
  EXPECT_FALSE(budget->TryCache(400));  // no room beside the 700
  absl::StatusOr<MemoryBudget::Reservation> r = budget->TryReserve(500, "results");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LE(budget->stats().cached_bytes + 500, 1000);
  EXPECT_GE(budget->stats().reclaimed_bytes, 200);
  budget->RemoveReclaimer(id);
  r->Release();
  budget->Uncache(cache);
  EXPECT_EQ(budget->stats().cached_bytes, 0);
}

TEST(MemoryBudgetTest, ClaimAndCacheMoveBytesWithoutChangingTheTotal) {
  auto budget = NewBudget(1000);
  ASSERT_TRUE(budget->TryCache(600));
  MemoryBudget::Reservation claimed = budget->ClaimCached(600);
  EXPECT_EQ(budget->stats().reserved_bytes, 600);
  EXPECT_EQ(budget->stats().cached_bytes, 0);
  budget->CacheReservation(std::move(claimed));
  EXPECT_EQ(budget->stats().reserved_bytes, 0);
  EXPECT_EQ(budget->stats().cached_bytes, 600);
  budget->Uncache(600);
}

TEST(MemoryBudgetTest, WaitingReservationsAreServedFirstComeFirstServed) {
  auto budget = NewBudget(1000, absl::Seconds(30));
  auto held = std::make_unique<MemoryBudget::Reservation>(*budget->TryReserve(600, "held"));
  std::atomic<int> order{0};
  int large_rank = 0;
  int small_rank = 0;
  std::thread large([&] {
    // Large enough that the small one cannot fit beside it.
    absl::StatusOr<MemoryBudget::Reservation> r = budget->Reserve(750, "large", nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    large_rank = ++order;
    absl::SleepFor(absl::Milliseconds(100));  // holds it a while
  });
  // The large one is waiting; a small one that would fit now must wait behind it.
  auto wait_for_waiting = [&](int64_t n) {
    while (budget->stats().waiting < n) absl::SleepFor(absl::Milliseconds(5));
  };
  wait_for_waiting(1);
  std::thread small([&] {
    absl::StatusOr<MemoryBudget::Reservation> r = budget->Reserve(300, "small", nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    small_rank = ++order;
  });
  wait_for_waiting(2);
  absl::SleepFor(absl::Milliseconds(100));  // time for the small one to pass, were it allowed
  EXPECT_EQ(order.load(), 0) << "the small reservation passed the large one waiting before it";
  held.reset();
  large.join();
  small.join();
  EXPECT_EQ(large_rank, 1);
  EXPECT_EQ(small_rank, 2);
  // TryReserve never queues: it takes what fits at once.
  EXPECT_TRUE(budget->TryReserve(1000, "all").ok());
  EXPECT_EQ(budget->stats().reserved_bytes, 0);
}

TEST(MemoryBudgetTest, AReservationThatGivesUpLeavesTheQueue) {
  auto budget = NewBudget(1000, absl::Milliseconds(100));
  auto held = budget->TryReserve(900, "held");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(budget->Reserve(500, "first", nullptr).status().code(),
            absl::StatusCode::kResourceExhausted);
  held->Release();
  // Nobody is left in line ahead of the next one.
  EXPECT_TRUE(budget->Reserve(500, "second", nullptr).ok());
}

TEST(MemoryBudgetTest, ConcurrentReservationsNeverExceedTheLimit) {
  auto budget = NewBudget(1000, absl::Seconds(30));
  std::atomic<int64_t> held{0};
  std::atomic<int64_t> most{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const int64_t bytes = 100 + 50 * ((t + i) % 8);
        absl::StatusOr<MemoryBudget::Reservation> r = budget->Reserve(bytes, "work", nullptr);
        ASSERT_TRUE(r.ok()) << r.status();
        const int64_t now = held.fetch_add(bytes) + bytes;
        int64_t seen = most.load();
        while (now > seen && !most.compare_exchange_weak(seen, now)) {
        }
        held.fetch_sub(bytes);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_LE(most.load(), 1000);
  EXPECT_LE(budget->stats().peak_bytes, 1000);
  EXPECT_EQ(budget->stats().reserved_bytes, 0);
}

}  // namespace
}  // namespace gradengine
