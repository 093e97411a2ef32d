#include "gradengine/memory_budget.h"

#include <malloc.h>

#include <algorithm>
#include <cassert>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "gradengine/allocator.h"

namespace gradengine {
namespace {

// Reservations at least this big check whether freed heap memory must go back to the system
// first; smaller ones are too small to matter, and checking costs a walk over the heap's bins.
constexpr int64_t kReturnCheckBytes = int64_t{1} << 20;

constexpr absl::Duration kWaitSlice = absl::Milliseconds(50);

// Freed memory is returned to the system at most this often when the limit is near, unless 16
// MiB or more have been given back since.
constexpr absl::Duration kMinReturnInterval = absl::Milliseconds(100);

std::string MiB(int64_t bytes) {
  return absl::StrCat(bytes, " bytes (", (bytes + (1 << 19)) >> 20, " MiB)");
}

}  // namespace

MemoryBudget::Reservation::Reservation(Reservation&& other) noexcept
    : budget_(std::exchange(other.budget_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

MemoryBudget::Reservation& MemoryBudget::Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = std::exchange(other.budget_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

MemoryBudget::~MemoryBudget() {
  absl::MutexLock lock(&mu_);
  // A reservation or cached bytes outliving their budget would write to freed memory.
  assert(stats_.reserved_bytes == 0 && stats_.cached_bytes == 0);
}

MemoryBudget::Reservation MemoryBudget::Reservation::Split(int64_t bytes) {
  bytes = std::clamp<int64_t>(bytes, 0, bytes_);
  bytes_ -= bytes;
  return Reservation(budget_, bytes);
}

void MemoryBudget::Reservation::Release() {
  if (budget_ != nullptr && bytes_ > 0) budget_->Give(bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<std::unique_ptr<MemoryBudget>> MemoryBudget::Create(
    const MemoryBudgetOptions& options) {
  if (options.limit_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory budget limit_bytes=", options.limit_bytes, " must be positive"));
  }
  if (options.max_wait < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory budget max_wait=", absl::FormatDuration(options.max_wait), " must be >= 0"));
  }
  std::unique_ptr<MemoryBudget> budget(new MemoryBudget(options));
  budget->stats_.limit_bytes = options.limit_bytes;
  return budget;
}

bool MemoryBudget::TakeIfFits(int64_t bytes) {
  const int64_t in_use = stats_.reserved_bytes + stats_.cached_bytes;
  if (bytes > options_.limit_bytes - in_use) return false;
  stats_.reserved_bytes += bytes;
  stats_.peak_bytes = std::max(stats_.peak_bytes, in_use + bytes);
  return true;
}

absl::Status MemoryBudget::Refusal(int64_t bytes, absl::string_view purpose,
                                   absl::string_view why) const {
  return absl::ResourceExhaustedError(absl::StrCat(
      "the call needs ", MiB(bytes), " for ", purpose, why, "; ", MiB(stats_.reserved_bytes),
      " are reserved by calls and ", MiB(stats_.cached_bytes), " cached, of the server's ",
      options_.limit_name, " of ", MiB(options_.limit_bytes)));
}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::Grant(int64_t bytes, bool waited,
                                                              bool may_trim) {
  {
    absl::MutexLock lock(&mu_);
    ++stats_.reservations;
    if (waited) ++stats_.reservations_waited;
  }
  if (may_trim && bytes >= kReturnCheckBytes) ReturnFreedMemoryIfOverLimit(bytes);
  return Reservation(this, bytes);
}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::TryReserve(int64_t bytes,
                                                                   absl::string_view purpose) {
  return Reserve(bytes, purpose, nullptr, /*wait=*/false);
}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::Reserve(
    int64_t bytes, absl::string_view purpose,
    const std::function<absl::Status()>& should_continue) {
  return Reserve(bytes, purpose, should_continue, /*wait=*/true);
}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::Reserve(
    int64_t bytes, absl::string_view purpose, const std::function<absl::Status()>& should_continue,
    bool wait) {
  bytes = std::max<int64_t>(bytes, 0);
  if (bytes == 0) return Reservation();
  uint64_t ticket = 0;
  bool granted = false;
  {
    absl::MutexLock lock(&mu_);
    if (bytes > options_.limit_bytes) {
      ++stats_.reservations_refused;
      return Refusal(bytes, purpose, ", more than the whole budget");
    }
    // Waiting reservations are served first come, first served: a new one that would fit goes
    // behind them, so that a large one is not passed over for ever. TryReserve does not queue.
    granted = (!wait || waiting_.empty()) && TakeIfFits(bytes);
    if (!granted && wait) {
      ticket = next_ticket_++;
      waiting_.push_back(ticket);
    }
  }
  if (granted) return Grant(bytes, /*waited=*/false, /*may_trim=*/wait);
  // Under mu_: whether this reservation may take memory now, and leaving the queue.
  auto my_turn = [&] { return !wait || waiting_.front() == ticket; };
  auto leave = [&] {
    if (!wait) return;
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), ticket));
    given_back_.SignalAll();  // the next in line may fit now
  };
  const absl::Time give_up = absl::Now() + options_.max_wait;
  bool waited = false;
  while (true) {
    int64_t short_by = 0;
    bool cache_would_do = false;
    {
      absl::MutexLock lock(&mu_);
      if (my_turn() && TakeIfFits(bytes)) {
        leave();
        break;
      }
      short_by = bytes - (options_.limit_bytes - stats_.reserved_bytes - stats_.cached_bytes);
      // Only if giving up cached memory makes room; else it would be thrown away for nothing.
      cache_would_do = my_turn() && bytes <= options_.limit_bytes - stats_.reserved_bytes;
    }
    // Cached memory goes first: it is only kept in case it is needed again.
    if (cache_would_do && Reclaim(short_by) > 0) {
      absl::MutexLock lock(&mu_);
      if (my_turn() && TakeIfFits(bytes)) {
        leave();
        break;
      }
    }
    absl::MutexLock lock(&mu_);
    if (my_turn() && TakeIfFits(bytes)) {
      leave();
      break;
    }
    const absl::Time now = absl::Now();
    if (!wait || now >= give_up) {
      leave();
      ++stats_.reservations_refused;
      return Refusal(
          bytes, purpose,
          wait ? absl::StrCat(" and waited ", absl::FormatDuration(options_.max_wait), " for it")
               : std::string(" now"));
    }
    waited = true;
    // Woken when memory is given back; the slice bounds how late a cancellation is noticed.
    given_back_.WaitWithDeadline(&mu_, std::min(give_up, now + kWaitSlice));
    if (should_continue) {
      mu_.Unlock();
      absl::Status status = should_continue();
      mu_.Lock();
      if (!status.ok()) {
        leave();
        ++stats_.reservations_refused;
        return status;
      }
    }
  }
  return Grant(bytes, waited, /*may_trim=*/wait);
}

void MemoryBudget::Give(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  stats_.reserved_bytes -= bytes;
  freed_since_return_ += bytes;
  given_back_.SignalAll();
}

bool MemoryBudget::TryCache(int64_t bytes) {
  if (bytes <= 0) return true;
  absl::MutexLock lock(&mu_);
  if (!TakeIfFits(bytes)) return false;
  stats_.reserved_bytes -= bytes;
  stats_.cached_bytes += bytes;
  return true;
}

void MemoryBudget::Uncache(int64_t bytes) {
  if (bytes <= 0) return;
  absl::MutexLock lock(&mu_);
  stats_.cached_bytes -= bytes;
  freed_since_return_ += bytes;
  given_back_.SignalAll();
}

MemoryBudget::Reservation MemoryBudget::ClaimCached(int64_t bytes) {
  if (bytes <= 0) return Reservation();
  absl::MutexLock lock(&mu_);
  stats_.cached_bytes -= bytes;
  stats_.reserved_bytes += bytes;
  return Reservation(this, bytes);
}

void MemoryBudget::CacheReservation(Reservation reservation) {
  const int64_t bytes = std::exchange(reservation.bytes_, 0);
  reservation.budget_ = nullptr;
  if (bytes <= 0) return;
  absl::MutexLock lock(&mu_);
  stats_.reserved_bytes -= bytes;
  stats_.cached_bytes += bytes;
}

int MemoryBudget::AddReclaimer(Reclaimer reclaimer) {
  absl::MutexLock lock(&reclaim_mu_);
  const int id = next_reclaimer_id_++;
  reclaimers_.emplace_back(id, std::move(reclaimer));
  return id;
}

void MemoryBudget::RemoveReclaimer(int id) {
  absl::MutexLock lock(&reclaim_mu_);
  reclaimers_.erase(std::remove_if(reclaimers_.begin(), reclaimers_.end(),
                                   [id](const auto& entry) { return entry.first == id; }),
                    reclaimers_.end());
}

int64_t MemoryBudget::Reclaim(int64_t wanted) {
  int64_t freed = 0;
  {
    absl::MutexLock lock(&reclaim_mu_);
    for (const auto& [id, reclaimer] : reclaimers_) {
      if (freed >= wanted) break;
      freed += reclaimer(wanted - freed);
    }
  }
  if (freed > 0) {
    absl::MutexLock lock(&mu_);
    stats_.reclaimed_bytes += freed;
  }
  return freed;
}

void MemoryBudget::ReturnFreedMemoryIfOverLimit(int64_t incoming) {
  // The heap keeps freed chunks in its bins, counted as free even once returned, so the test is
  // the process's resident memory: with what is coming, would it pass the limit?
  const int64_t resident = ResidentMemoryBytes();
  if (resident < 0 || resident + incoming <= options_.limit_bytes) return;
  ReturnFreedMemory();
}

void MemoryBudget::ReturnFreedMemory() {
  {
    // Trimming walks the heap under its lock, stalling every allocation: not again and again for
    // nothing, but whenever enough has been given back since the last time.
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    if (now - last_return_ < kMinReturnInterval && freed_since_return_ < kReturnCheckBytes * 16) {
      return;
    }
    last_return_ = now;
    freed_since_return_ = 0;
    ++stats_.returned_to_system;
  }
  malloc_trim(0);
}

MemoryBudget::Stats MemoryBudget::stats() const {
  absl::MutexLock lock(&mu_);
  Stats stats = stats_;
  stats.waiting = static_cast<int64_t>(waiting_.size());
  return stats;
}

}  // namespace gradengine
