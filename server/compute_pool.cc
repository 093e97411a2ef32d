#include "server/compute_pool.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace gradserver {

absl::StatusOr<std::unique_ptr<ComputePool>> ComputePool::Create(
    const ComputePoolOptions& options) {
  if (options.threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("compute pool threads=", options.threads, " must be >= 1"));
  }
  if (options.max_queued < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("compute pool max_queued=", options.max_queued, " must be >= 0"));
  }
  std::unique_ptr<ComputePool> pool(new ComputePool(options));
  absl::MutexLock lock(&pool->stop_mu_);
  pool->threads_.reserve(static_cast<size_t>(options.threads));
  for (int i = 0; i < options.threads; ++i) {
    pool->threads_.emplace_back([p = pool.get()] { p->WorkerLoop(); });
  }
  return pool;
}

ComputePool::ComputePool(const ComputePoolOptions& options) : options_(options) {}

ComputePool::~ComputePool() { Stop(); }

absl::Status ComputePool::Submit(Task task) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  // A task waits whenever every thread is taken, so the queue's bound applies to the tasks
  // beyond the running ones, whether or not a worker has picked them up yet.
  const int waiting = static_cast<int>(queue_.size()) + running_ - options_.threads;
  if (waiting >= options_.max_queued) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the server is at capacity: max_concurrent_requests=", options_.threads,
                     " calls are computing and max_queued_requests=", options_.max_queued,
                     " are waiting; retry later"));
  }
  queue_.push_back(std::move(task));
  return absl::OkStatus();
}

void ComputePool::WorkerLoop() {
  while (true) {
    Task task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &ComputePool::HasWorkOrStopping));
      if (queue_.empty()) return;  // stopping, and nothing left to run
      task = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    Slot slot(this);
    std::move(task)(slot);
    // Destroy what the task captured before its slot is handed back.
    task = nullptr;
    slot.Release();
  }
}

void ComputePool::Slot::Release() {
  if (released_) return;
  released_ = true;
  absl::MutexLock lock(&pool_->mu_);
  --pool_->running_;
}

void ComputePool::Stop() {
  absl::MutexLock stop_lock(&stop_mu_);
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
}

bool ComputePool::HasWorkOrStopping() const { return !queue_.empty() || stopping_; }

int ComputePool::running() const {
  absl::MutexLock lock(&mu_);
  return running_;
}

int ComputePool::queued() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

}  // namespace gradserver
