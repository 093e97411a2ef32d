// A gradserver binary run as a child process, for tests of the real program: its flags, its
// signals, its exit code, several replicas. Its stderr is collected on a thread.

#ifndef TESTS_SERVICE_SERVER_PROCESS_H_
#define TESTS_SERVICE_SERVER_PROCESS_H_

#include <sys/types.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace gradservicetest {

// The gradserver binary's path from the GRADSERVER_BINARY environment variable (set by CTest),
// or "" when it is not set.
std::string GradserverBinary();

class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  // Kills the process (SIGKILL) if it is still running.
  ~ServerProcess();

  // Starts `binary` with `flags`; false if it cannot be started.
  bool Start(const std::string& binary, const std::vector<std::string>& flags);

  // The port from the line "<marker><host>:<port>" once it is complete, or 0 if it does not
  // come within `timeout`. The default marker is the main listener's line; the health
  // listener's is "gradserver health listening on ".
  int WaitForPort(absl::Duration timeout, const std::string& marker = "gradserver listening on ");

  // Whether stderr comes to contain `text` within `timeout`.
  bool WaitForStderr(const std::string& text, absl::Duration timeout);

  // The exit status (128 + the signal for a process killed by one), or -1 if the process has
  // not exited within `timeout`.
  int WaitForExit(absl::Duration timeout);

  void Signal(int signal_number);

  // The process's id; 0 before Start.
  pid_t pid() const { return pid_; }

  // Everything written to stderr so far (all of it, once the process has exited).
  std::string Stderr();

 private:
  pid_t pid_ = 0;
  std::thread reader_;
  absl::Mutex mu_;
  std::string stderr_ ABSL_GUARDED_BY(mu_);
  bool eof_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace gradservicetest

#endif  // TESTS_SERVICE_SERVER_PROCESS_H_
