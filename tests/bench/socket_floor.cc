// The socket floor for tests/bench/vs_engine: how long a plain connected socket pair, with no
// gRPC, HTTP/2 or protobuf, takes to move one call's bytes there and back.
//
//   build/tests/bench/socket_floor --kind=tcp|unix --request_bytes=N --response_bytes=M
//                                  [--iterations=K] [--chunk_bytes=C]
//
// tcp is a loopback TCP connection (a listener on 127.0.0.1, port 0, and a client connected to
// it; TCP_NODELAY on both ends, as gRPC sets it); unix is socketpair(AF_UNIX, SOCK_STREAM),
// the same kernel path as a unix stream socket bound to a file, which gRPC's unix: targets use.
// Socket buffer sizes stay at the kernel's defaults, as gRPC leaves them.
//
// An echo thread reads N bytes, then writes M bytes back; the main thread writes N bytes, then
// reads M, K times (default 100), after 2 untimed round trips. That runs twice: with both
// threads pinned to the CPU the program started on, then with the echo thread pinned to another
// CPU the process may use (skipped when there is none); each run has its own untimed round
// trips. The placement matters: on the 2-core VM a small round trip takes about 3 us on one CPU
// and about 45 us across two (the wake-ups), and two CPUs could overlap the copies of large
// messages, so both are measured and the lower counts. It prints one line:
//   kind=<kind> request_bytes=N response_bytes=M iterations=K same_cpu_ms=<median>
//   two_cpus_ms=<median> floor_ms=<the lower of the two>
// (two_cpus_ms=nan when skipped), the medians being of the K round trips' wall times.
// Every buffer is allocated and written once before the first round trip: on this VM a page's
// first touch costs about 16 us per 4 KiB, which a process that reuses its buffers (as
// gradserver does with KeepFreedMemoryForReuse) does not pay per call, so the floor must not.
// Errors are printed to stderr with exit status 1; bad flags exit with status 2.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace {

enum class SocketKind { kTcp, kUnix };

// Bytes handed to one send() or recv() call. On the 2-core VM, with resblock's bytes (13 MB
// request, 6.6 MB response) and 40 round trips per run, 1 MiB was among the fastest of 64 KiB,
// 256 KiB, 1 MiB, 4 MiB and whole-buffer calls over both kinds; whole-buffer calls were 10-30%
// slower, the others within run-to-run noise of 1 MiB.
constexpr int64_t kDefaultChunkBytes = int64_t{1} << 20;
// Untimed round trips before the timed ones, so that the kernel's socket buffers exist.
constexpr int kWarmupRoundTrips = 2;

struct Options {
  SocketKind kind = SocketKind::kTcp;
  int64_t request_bytes = -1;   // required
  int64_t response_bytes = -1;  // required
  int iterations = 100;
  int64_t chunk_bytes = kDefaultChunkBytes;
};

absl::Status ErrnoError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// Owns one file descriptor.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  ~FileDescriptor() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

struct SocketPair {
  FileDescriptor client;
  FileDescriptor server;
};

absl::Status SetNoDelay(int fd) {
  const int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return ErrnoError("setsockopt(TCP_NODELAY)");
  }
  return absl::OkStatus();
}

absl::StatusOr<SocketPair> ConnectTcp() {
  FileDescriptor listener(socket(AF_INET, SOCK_STREAM, 0));
  if (listener.get() < 0) return ErrnoError("socket(AF_INET)");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  if (bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    return ErrnoError("bind(127.0.0.1:0)");
  }
  if (listen(listener.get(), 1) != 0) return ErrnoError("listen");
  socklen_t length = sizeof(address);
  if (getsockname(listener.get(), reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return ErrnoError("getsockname");
  }
  SocketPair pair;
  pair.client = FileDescriptor(socket(AF_INET, SOCK_STREAM, 0));
  if (pair.client.get() < 0) return ErrnoError("socket(AF_INET)");
  // The kernel completes the handshake into the backlog, so connect returns before accept.
  if (connect(pair.client.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) !=
      0) {
    return ErrnoError("connect(127.0.0.1)");
  }
  pair.server = FileDescriptor(accept(listener.get(), nullptr, nullptr));
  if (pair.server.get() < 0) return ErrnoError("accept");
  if (absl::Status s = SetNoDelay(pair.client.get()); !s.ok()) return s;
  if (absl::Status s = SetNoDelay(pair.server.get()); !s.ok()) return s;
  return pair;
}

absl::StatusOr<SocketPair> ConnectUnix() {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return ErrnoError("socketpair(AF_UNIX)");
  SocketPair pair;
  pair.client = FileDescriptor(fds[0]);
  pair.server = FileDescriptor(fds[1]);
  return pair;
}

absl::StatusOr<SocketPair> Connect(SocketKind kind) {
  switch (kind) {
    case SocketKind::kTcp:
      return ConnectTcp();
    case SocketKind::kUnix:
      return ConnectUnix();
  }
  return absl::InternalError("unknown socket kind");
}

// Writes all `size` bytes at `data`, at most `chunk` per send().
absl::Status SendAll(int fd, const char* data, int64_t size, int64_t chunk) {
  while (size > 0) {
    const ssize_t sent = send(fd, data, static_cast<size_t>(std::min(size, chunk)), MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("send");
    }
    data += sent;
    size -= sent;
  }
  return absl::OkStatus();
}

// Reads exactly `size` bytes into `data`, at most `chunk` per recv().
absl::Status ReceiveAll(int fd, char* data, int64_t size, int64_t chunk) {
  while (size > 0) {
    const ssize_t received = recv(fd, data, static_cast<size_t>(std::min(size, chunk)), 0);
    if (received < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("recv");
    }
    if (received == 0) {
      return absl::UnavailableError(
          absl::StrCat("the peer closed the socket with ", size, " bytes still to come"));
    }
    data += received;
    size -= received;
  }
  return absl::OkStatus();
}

double Median(std::vector<double> values) {
  const size_t middle = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + middle, values.end());
  if (values.size() % 2 == 1) return values[middle];
  const double upper = values[middle];
  return (*std::max_element(values.begin(), values.begin() + middle) + upper) / 2;
}

absl::Status Pin(pthread_t thread, int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (const int error = pthread_setaffinity_np(thread, sizeof(set), &set); error != 0) {
    return absl::InternalError(
        absl::StrCat("pthread_setaffinity_np(cpu ", cpu, "): ", std::strerror(error)));
  }
  return absl::OkStatus();
}

// The CPU this thread runs on, and another one the process may use if there is one.
absl::StatusOr<std::pair<int, std::optional<int>>> ChooseCpus() {
  const int first = sched_getcpu();
  if (first < 0) return ErrnoError("sched_getcpu");
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return ErrnoError("sched_getaffinity");
  for (int step = 1; step < CPU_SETSIZE; ++step) {
    const int cpu = (first + step) % CPU_SETSIZE;
    if (CPU_ISSET(cpu, &allowed)) return std::make_pair(first, std::optional<int>(cpu));
  }
  return std::make_pair(first, std::optional<int>());
}

// Median round trips, in milliseconds, of each placement (see the top of this file).
struct FloorResult {
  double same_cpu_ms = 0;
  // NaN when the process may use only one CPU.
  double two_cpus_ms = std::numeric_limits<double>::quiet_NaN();
};

// Runs the round trips of the top of this file.
absl::StatusOr<FloorResult> MeasureRoundTrips(const Options& options) {
  absl::StatusOr<std::pair<int, std::optional<int>>> cpus = ChooseCpus();
  if (!cpus.ok()) return cpus.status();
  const auto [main_cpu, other_cpu] = *cpus;
  absl::StatusOr<SocketPair> pair = Connect(options.kind);
  if (!pair.ok()) return pair.status();
  const int phases = other_cpu.has_value() ? 2 : 1;
  const int round_trips_per_phase = kWarmupRoundTrips + options.iterations;
  // Filled, not just allocated, so every page is touched before the clock runs.
  std::vector<char> client_request(static_cast<size_t>(options.request_bytes), 'q');
  std::vector<char> client_response(static_cast<size_t>(options.response_bytes), 'r');
  std::vector<char> server_request(static_cast<size_t>(options.request_bytes), 'q');
  std::vector<char> server_response(static_cast<size_t>(options.response_bytes), 'r');

  absl::Status echo_status;
  const int server_fd = pair->server.get();
  std::thread echo([&] {
    for (int i = 0; i < phases * round_trips_per_phase && echo_status.ok(); ++i) {
      echo_status =
          ReceiveAll(server_fd, server_request.data(), options.request_bytes, options.chunk_bytes);
      if (echo_status.ok()) {
        echo_status =
            SendAll(server_fd, server_response.data(), options.response_bytes, options.chunk_bytes);
      }
    }
    // On failure, unblock the main thread's recv.
    if (!echo_status.ok()) shutdown(server_fd, SHUT_RDWR);
  });

  // The echo thread is either blocked in recv or about to be when it is re-pinned: the main
  // thread has read all of the previous response.
  FloorResult result;
  absl::Status status = Pin(pthread_self(), main_cpu);
  const int client_fd = pair->client.get();
  for (int phase = 0; phase < phases && status.ok(); ++phase) {
    status = Pin(echo.native_handle(), phase == 0 ? main_cpu : *other_cpu);
    std::vector<double> times_ms;
    times_ms.reserve(static_cast<size_t>(options.iterations));
    for (int i = 0; i < round_trips_per_phase && status.ok(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      status =
          SendAll(client_fd, client_request.data(), options.request_bytes, options.chunk_bytes);
      if (status.ok()) {
        status = ReceiveAll(client_fd, client_response.data(), options.response_bytes,
                            options.chunk_bytes);
      }
      const auto stop = std::chrono::steady_clock::now();
      if (i >= kWarmupRoundTrips) {
        times_ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
      }
    }
    if (status.ok()) (phase == 0 ? result.same_cpu_ms : result.two_cpus_ms) = Median(times_ms);
  }
  // On failure, unblock the echo thread's recv.
  if (!status.ok()) shutdown(client_fd, SHUT_RDWR);
  echo.join();
  if (!echo_status.ok()) {
    return absl::Status(echo_status.code(), absl::StrCat("echo side: ", echo_status.message()));
  }
  if (!status.ok()) return status;
  return result;
}

// Fills `options` from argv; InvalidArgument naming the flag otherwise.
absl::Status ParseFlags(int argc, char** argv, Options* options) {
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg(argv[i]);
    const size_t equals = arg.find('=');
    const absl::string_view name = arg.substr(0, equals);
    const absl::string_view value =
        equals == absl::string_view::npos ? absl::string_view() : arg.substr(equals + 1);
    bool ok = equals != absl::string_view::npos;
    if (name == "--kind") {
      if (value == "tcp") {
        options->kind = SocketKind::kTcp;
      } else if (value == "unix") {
        options->kind = SocketKind::kUnix;
      } else {
        ok = false;
      }
    } else if (name == "--request_bytes") {
      ok = ok && absl::SimpleAtoi(value, &options->request_bytes) && options->request_bytes >= 0;
    } else if (name == "--response_bytes") {
      ok = ok && absl::SimpleAtoi(value, &options->response_bytes) && options->response_bytes >= 0;
    } else if (name == "--iterations") {
      ok = ok && absl::SimpleAtoi(value, &options->iterations) && options->iterations >= 1;
    } else if (name == "--chunk_bytes") {
      ok = ok && absl::SimpleAtoi(value, &options->chunk_bytes) && options->chunk_bytes >= 1;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag '", arg, "'"));
    }
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("bad value in '", arg, "'"));
  }
  if (options->request_bytes < 0 || options->response_bytes < 0) {
    return absl::InvalidArgumentError("--request_bytes and --response_bytes are required");
  }
  return absl::OkStatus();
}

absl::string_view KindName(SocketKind kind) {
  switch (kind) {
    case SocketKind::kTcp:
      return "tcp";
    case SocketKind::kUnix:
      return "unix";
  }
  return "?";
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (absl::Status s = ParseFlags(argc, argv, &options); !s.ok()) {
    std::cerr << "socket_floor: " << s.message()
              << "\nusage: socket_floor --kind=tcp|unix --request_bytes=N --response_bytes=M "
                 "[--iterations=K] [--chunk_bytes=C]\n";
    return 2;
  }
  absl::StatusOr<FloorResult> floor = MeasureRoundTrips(options);
  if (!floor.ok()) {
    std::cerr << "socket_floor: " << floor.status() << "\n";
    return 1;
  }
  // std::fmin ignores a NaN two_cpus_ms.
  std::cout << "kind=" << KindName(options.kind) << " request_bytes=" << options.request_bytes
            << " response_bytes=" << options.response_bytes << " iterations=" << options.iterations
            << " same_cpu_ms=" << floor->same_cpu_ms << " two_cpus_ms=" << floor->two_cpus_ms
            << " floor_ms=" << std::fmin(floor->same_cpu_ms, floor->two_cpus_ms) << std::endl;
  return 0;
}
