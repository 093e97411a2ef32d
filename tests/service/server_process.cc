#include "tests/service/server_process.h"

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace gradservicetest {

std::string GradserverBinary() {
  const char* binary = std::getenv("GRADSERVER_BINARY");
  return binary == nullptr ? "" : binary;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (reader_.joinable()) reader_.join();
}

bool ServerProcess::Start(const std::string& binary, const std::vector<std::string>& flags) {
  // Built before fork: the child of a threaded process may only make async-signal-safe calls,
  // and allocating is not one.
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const std::string& flag : flags) argv.push_back(const_cast<char*>(flag.c_str()));
  argv.push_back(nullptr);
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return false;
  pid_ = fork();
  if (pid_ < 0) return false;
  if (pid_ == 0) {
    dup2(pipe_fds[1], STDERR_FILENO);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  const int fd = pipe_fds[0];
  reader_ = std::thread([this, fd] {
    char buffer[4096];
    ssize_t n;
    while ((n = read(fd, buffer, sizeof(buffer))) > 0) {
      absl::MutexLock lock(&mu_);
      stderr_.append(buffer, static_cast<size_t>(n));
    }
    close(fd);
    absl::MutexLock lock(&mu_);
    eof_ = true;
  });
  return true;
}

int ServerProcess::WaitForPort(absl::Duration timeout, const std::string& marker) {
  if (!WaitForStderr(marker, timeout)) return 0;
  int port = 0;
  auto line_done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return eof_ || stderr_.find('\n', stderr_.find(marker)) != std::string::npos;
  };
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&line_done), timeout);
  const size_t at = stderr_.find(marker) + marker.size();
  const std::string address = stderr_.substr(at, stderr_.find('\n', at) - at);
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port)) {
    return 0;
  }
  return port;
}

bool ServerProcess::WaitForStderr(const std::string& text, absl::Duration timeout) {
  auto seen = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return eof_ || stderr_.find(text) != std::string::npos;
  };
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&seen), timeout);
  return stderr_.find(text) != std::string::npos;
}

int ServerProcess::WaitForExit(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    const pid_t done = waitpid(pid_, &status, WNOHANG);
    if (done == pid_) {
      pid_ = 0;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return -1;
}

void ServerProcess::Signal(int signal_number) { kill(pid_, signal_number); }

std::string ServerProcess::Stderr() {
  if (reader_.joinable() && pid_ == 0) reader_.join();
  absl::MutexLock lock(&mu_);
  return stderr_;
}

}  // namespace gradservicetest
