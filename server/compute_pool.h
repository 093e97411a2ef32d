// A fixed set of compute threads with a bounded wait queue: where the server runs every engine
// call, so that gRPC's own threads never compute.
//
// At most `threads` tasks run at once, one per thread; at most `max_queued` more wait, first in
// first out. Submit() never blocks: a task that finds every thread busy and the queue full is
// refused at once with ResourceExhausted, and the caller keeps it (it is destroyed unrun).
//
// Thread safety: all methods may be called from any thread, except that a task must not call
// Stop() or destroy its own pool.

#ifndef SERVER_COMPUTE_POOL_H_
#define SERVER_COMPUTE_POOL_H_

#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace gradserver {

struct ComputePoolOptions {
  // Threads, i.e. tasks running at once. Must be >= 1. Default: 1.
  int threads = 1;
  // Tasks that may wait for a thread. Must be >= 0. Default: 64.
  int max_queued = 64;
};

class ComputePool {
 public:
  // A running task's claim on its thread. Release() hands the claim back before the task
  // returns, so that the pool admits the next task while this one only finishes up (say, sends
  // a reply whose sender may submit again at once). Otherwise it is handed back when the task
  // returns. Used only by the task's own thread.
  class Slot {
   public:
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    // Idempotent.
    void Release();

   private:
    friend class ComputePool;
    explicit Slot(ComputePool* pool) : pool_(pool) {}
    ComputePool* const pool_;
    bool released_ = false;
  };

  using Task = absl::AnyInvocable<void(Slot&) &&>;

  // Starts the threads. InvalidArgument for options out of range.
  static absl::StatusOr<std::unique_ptr<ComputePool>> Create(const ComputePoolOptions& options);

  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;
  // Stops (as Stop()).
  ~ComputePool();

  // Queues `task` to run once on a pool thread. Errors: ResourceExhausted when `threads` tasks
  // are running and `max_queued` are waiting, naming both limits; Unavailable after Stop().
  // On error `task` is not run.
  absl::Status Submit(Task task) ABSL_LOCKS_EXCLUDED(mu_);

  // Refuses new tasks, runs every task already queued, and joins the threads. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

  // Tasks holding a slot and tasks waiting right now; for observation and tests.
  int running() const ABSL_LOCKS_EXCLUDED(mu_);
  int queued() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit ComputePool(const ComputePoolOptions& options);
  void WorkerLoop() ABSL_LOCKS_EXCLUDED(mu_);
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ComputePoolOptions options_;
  mutable absl::Mutex mu_;
  std::deque<Task> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Joined by the first Stop(); guarded by stop_mu_ so that a second Stop() waits for it.
  absl::Mutex stop_mu_;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(stop_mu_);
};

}  // namespace gradserver

#endif  // SERVER_COMPUTE_POOL_H_
