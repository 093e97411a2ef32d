// A process-wide memory budget: what every call may hold at once, reserved before it allocates.
//
// Two kinds of memory count against the limit:
//   - reservations: memory a call holds while it runs (a decoded request, intermediate buffers,
//     results until they are sent). Reserve() waits until the bytes fit and TryReserve() does not
//     wait; a reservation bigger than the whole limit fails at once with ResourceExhausted.
//   - cached memory: memory kept for reuse that can be given back on demand (compiled plans and
//     their idle workspaces). A reservation that does not fit first asks the reclaimers to free
//     cached memory, then waits for other reservations to end.
// Memory the C library keeps after it is freed counts too: when the process's resident memory
// plus a large reservation (1 MiB or more) would exceed the limit, freed memory is returned to
// the system (malloc_trim; at most every 100 ms unless 16 MiB have been given back since; never
// from TryReserve, whose callers must not wait) before it is granted, so keeping freed memory for
// reuse (gradengine/allocator.h) does not make the process hold more than the budget.
//
// Memory nobody reserves (the program itself, thread stacks, small per-call objects, gRPC's
// own buffers) is outside the budget; a process's resident size is the budget plus that.
//
// Thread safety: all methods may be called from any thread. Reclaimers are called without the
// budget's lock held, from the thread that reserves.

#ifndef GRADENGINE_MEMORY_BUDGET_H_
#define GRADENGINE_MEMORY_BUDGET_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace gradengine {

struct MemoryBudgetOptions {
  // Bytes that reservations and cached memory may total. Must be >= 1. Default: 1 GiB.
  int64_t limit_bytes = int64_t{1} << 30;
  // Longest Reserve() waits for other reservations to end before it gives up with
  // ResourceExhausted. Default: 10 s.
  absl::Duration max_wait = absl::Seconds(10);
  // Where errors say the limit comes from, e.g. "--max_memory_mb". Default: "the memory budget".
  std::string limit_name = "the memory budget";
};

class MemoryBudget {
 public:
  // A share of the budget, given back when destroyed (or Release()d). Move-only.
  class Reservation {
   public:
    Reservation() = default;
    Reservation(Reservation&& other) noexcept;
    Reservation& operator=(Reservation&& other) noexcept;
    Reservation(const Reservation&) = delete;
    Reservation& operator=(const Reservation&) = delete;
    ~Reservation() { Release(); }

    int64_t bytes() const { return bytes_; }
    // Moves `bytes` of this reservation into a new one. REQUIRES: 0 <= bytes <= this->bytes().
    Reservation Split(int64_t bytes);
    // Gives the bytes back. Idempotent.
    void Release();

   private:
    friend class MemoryBudget;
    Reservation(MemoryBudget* budget, int64_t bytes) : budget_(budget), bytes_(bytes) {}
    MemoryBudget* budget_ = nullptr;
    int64_t bytes_ = 0;
  };

  // Frees cached memory, about `wanted` bytes or more if it can, calling Uncache() for what it
  // frees; returns the bytes it freed.
  using Reclaimer = std::function<int64_t(int64_t wanted)>;

  struct Stats {
    int64_t limit_bytes = 0;
    int64_t reserved_bytes = 0;
    int64_t cached_bytes = 0;
    // Highest reserved + cached so far.
    int64_t peak_bytes = 0;
    int64_t reservations = 0;          // granted
    int64_t reservations_waited = 0;   // granted after waiting
    int64_t reservations_refused = 0;  // ResourceExhausted
    int64_t reclaimed_bytes = 0;       // cached memory freed for reservations
    int64_t returned_to_system = 0;    // times freed heap memory was given back (malloc_trim)
    int64_t waiting = 0;               // reservations waiting now
  };

  // InvalidArgument for options out of range.
  static absl::StatusOr<std::unique_ptr<MemoryBudget>> Create(const MemoryBudgetOptions& options);

  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;
  // REQUIRES: no Reservation and no cached bytes are outstanding, no reclaimer is registered
  // (debug builds check the first two).
  ~MemoryBudget();

  // `bytes` for `purpose` ("intermediate buffers", ...): granted at once if they fit, possibly
  // after reclaiming cached memory; else ResourceExhausted naming the bytes, the purpose, what
  // is in use and the limit. Never waits.
  absl::StatusOr<Reservation> TryReserve(int64_t bytes, absl::string_view purpose);
  // As TryReserve, but waits up to max_wait for other reservations to end, checking
  // `should_continue` (may be empty) every 50 ms and returning its error. Waiting reservations
  // are granted first come, first served: one that would fit waits while an older one does not.
  absl::StatusOr<Reservation> Reserve(int64_t bytes, absl::string_view purpose,
                                      const std::function<absl::Status()>& should_continue);

  // Cached memory. TryCache charges `bytes` if they fit beside everything else and returns
  // whether it did; Uncache gives them back.
  bool TryCache(int64_t bytes);
  void Uncache(int64_t bytes);
  // Turns cached bytes into a reservation and back; the total never changes, so neither waits.
  Reservation ClaimCached(int64_t bytes);
  void CacheReservation(Reservation reservation);

  // Registers a reclaimer; returns its id for RemoveReclaimer. The reclaimer must stay callable
  // until RemoveReclaimer returns.
  int AddReclaimer(Reclaimer reclaimer);
  void RemoveReclaimer(int id);

  // Gives the heap's free memory back to the system now (unless it did less than 100 ms ago
  // and under 16 MiB have been given back since), as after a cache frees a lot of it.
  void ReturnFreedMemory() ABSL_LOCKS_EXCLUDED(mu_);

  int64_t limit_bytes() const { return options_.limit_bytes; }
  Stats stats() const;

 private:
  explicit MemoryBudget(const MemoryBudgetOptions& options) : options_(options) {}

  void Give(int64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Under mu_: whether `bytes` more fit now; if so, takes them.
  bool TakeIfFits(int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Asks the reclaimers for about `wanted` bytes; returns what they freed.
  int64_t Reclaim(int64_t wanted) ABSL_LOCKS_EXCLUDED(mu_);
  // Gives freed heap memory back to the system if the resident memory with `incoming` more
  // bytes would pass the limit (at most every 100 ms).
  void ReturnFreedMemoryIfOverLimit(int64_t incoming) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Refusal(int64_t bytes, absl::string_view purpose, absl::string_view why) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `may_trim`: whether this thread may spend time returning freed memory (not gRPC's).
  absl::StatusOr<Reservation> Grant(int64_t bytes, bool waited, bool may_trim)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<Reservation> Reserve(int64_t bytes, absl::string_view purpose,
                                      const std::function<absl::Status()>& should_continue,
                                      bool wait) ABSL_LOCKS_EXCLUDED(mu_);

  const MemoryBudgetOptions options_;
  mutable absl::Mutex mu_;
  Stats stats_ ABSL_GUARDED_BY(mu_);
  // Signalled whenever reserved or cached bytes are given back.
  absl::CondVar given_back_;
  absl::Time last_return_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Bytes given back (reservations ended, cached memory freed) since then.
  int64_t freed_since_return_ ABSL_GUARDED_BY(mu_) = 0;
  // Tickets of the reservations waiting, oldest first; only the oldest may take memory.
  std::deque<uint64_t> waiting_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  // Serializes reclaimers, and guards their list.
  absl::Mutex reclaim_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  int next_reclaimer_id_ ABSL_GUARDED_BY(reclaim_mu_) = 0;
  std::vector<std::pair<int, Reclaimer>> reclaimers_ ABSL_GUARDED_BY(reclaim_mu_);
};

}  // namespace gradengine

#endif  // GRADENGINE_MEMORY_BUDGET_H_
