// Shared memory against careless and hostile clients of an in-process server: every bad
// registration and reference gets its specific code and a message naming the field (never the
// key), the server keeps serving and keeps its regions intact, regions are per token, a region
// truncated behind the server's back fails the next call instead of crashing the server, an
// unregistered region stays mapped for the call using it, and nothing stays mapped after
// unregistering or shutting down.

#include "gradclient/shared_memory.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gradclient/client.h"
#include "gtest/gtest.h"
#include "proto/wire.h"
#include "tests/service/service_test_util.h"

namespace gradservicetest {
namespace {

using gradengine::ObjectiveKind;

// A POSIX shared memory object made by the test itself, so that it can be truncated or
// replaced; unlinked on destruction.
class TestObject {
 public:
  explicit TestObject(size_t bytes)
      : key_(absl::StrCat(gradwire::kSharedMemoryKeyPrefix, "test-", getpid(), "-", next_++)) {
    const int fd = shm_open(("/" + key_).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << std::strerror(errno);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0);
    data_ = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    EXPECT_NE(data_, MAP_FAILED);
    close(fd);
    bytes_ = bytes;
    Live()[key_] = this;
  }
  ~TestObject() {
    Live().erase(key_);
    munmap(data_, bytes_);
    shm_unlink(("/" + key_).c_str());
  }
  const std::string& key() const { return key_; }

  // The proof a registration of the range at `offset` needs, written there as a client does
  // (the object's owner can); junk of the right length for a key no TestObject has.
  static std::string ProofFor(const std::string& key, int64_t offset) {
    const std::string proof = absl::StrCat("proof-", key, "-", offset, "-0123456789").substr(0, 32);
    const auto it = Live().find(key);
    if (it != Live().end() && offset >= 0 &&
        static_cast<size_t>(offset) + proof.size() <= it->second->bytes_) {
      std::memcpy(it->second->data_ + offset, proof.data(), proof.size());
    }
    return proof;
  }
  float* floats(int64_t byte_offset) { return reinterpret_cast<float*>(data_ + byte_offset); }
  void Truncate(size_t bytes) {
    const int fd = shm_open(("/" + key_).c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0);
    close(fd);
  }

 private:
  static std::map<std::string, TestObject*>& Live() {
    static auto* live = new std::map<std::string, TestObject*>;
    return *live;
  }

  inline static int next_ = 0;
  std::string key_;
  char* data_ = nullptr;
  size_t bytes_ = 0;
};

class LogLines {
 public:
  std::function<void(absl::string_view)> Sink() {
    return [this](absl::string_view line) {
      absl::MutexLock lock(&mu_);
      absl::StrAppend(&all_, line, "\n");
    };
  }
  std::string All() {
    absl::MutexLock lock(&mu_);
    return all_;
  }

 private:
  absl::Mutex mu_;
  std::string all_ ABSL_GUARDED_BY(mu_);
};

// Registers with the proof written into the object (TestObject::ProofFor), unless `proof` is
// given.
grpc::Status Register(grad::v1::GradientService::Stub& stub, const std::string& name,
                      const std::string& key, int64_t offset, int64_t byte_size,
                      const std::string& token = "",
                      std::optional<std::string> proof = std::nullopt) {
  grad::v1::RegisterSharedMemoryRequest request;
  request.set_name(name);
  request.set_key(key);
  request.set_offset(offset);
  request.set_byte_size(byte_size);
  request.set_proof(proof.has_value() ? *proof : TestObject::ProofFor(key, offset));
  grad::v1::RegisterSharedMemoryResponse response;
  grpc::ClientContext context;
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  return stub.RegisterSharedMemory(&context, request, &response);
}

grpc::Status Unregister(grad::v1::GradientService::Stub& stub, const std::string& name,
                        int* removed = nullptr, const std::string& token = "") {
  grad::v1::UnregisterSharedMemoryRequest request;
  request.set_name(name);
  grad::v1::UnregisterSharedMemoryResponse response;
  grpc::ClientContext context;
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  grpc::Status status = stub.UnregisterSharedMemory(&context, request, &response);
  if (removed != nullptr) *removed = response.unregistered();
  return status;
}

grpc::Status Call(grad::v1::GradientService::Stub& stub,
                  const grad::v1::ComputeGradientsRequest& request,
                  grad::v1::ComputeGradientsResponse* response, const std::string& token = "") {
  grpc::ClientContext context;
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  return stub.ComputeGradients(&context, request, response);
}

void SetRef(grad::v1::SharedMemoryRef* ref, const std::string& region, int64_t offset,
            int64_t byte_size) {
  ref->set_region(region);
  ref->set_offset(offset);
  ref->set_byte_size(byte_size);
}

// How many mappings of this process (the test's own and the in-process server's) show the
// shared memory object `key`.
int Mappings(const std::string& key) {
  std::ifstream maps("/proc/self/maps");
  int count = 0;
  std::string line;
  while (std::getline(maps, line)) {
    if (absl::StrContains(line, "/dev/shm/" + key)) ++count;
  }
  return count;
}

// Mappings(key) once it reaches `expected`, or after 5 s. A call's last reference to a
// region goes when the server deletes the call, just after the client has its answer.
int MappingsOnceSettled(const std::string& key, int expected) {
  for (int i = 0; i < 500 && Mappings(key) != expected; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return Mappings(key);
}

constexpr int64_t kRegionBytes = 1 << 20;
constexpr char kToken[] = "token-a";
constexpr char kOtherToken[] = "token-b";

class SharedMemoryTest : public ::testing::Test {
 public:
  void SetUp() override {
    const std::string tokens = absl::StrCat(::testing::TempDir(), "/shm_tokens.", getpid());
    std::ofstream(tokens) << kToken << "\n" << kOtherToken << "\n";
    gradserver::ServerOptions options;
    options.threads_per_request = 1;
    options.shared_memory.allowed = true;
    options.shared_memory.max_regions = 4;
    options.shared_memory.max_mapped_bytes = 8 * kRegionBytes;
    options.auth_token_file = tokens;
    options.request_log_sink = log_.Sink();
    server_ = StartTestServer(options, /*log_requests=*/true);
    ASSERT_NE(server_, nullptr);
    case_ = SmallCase("conv_relu_conv_tanh");
    engine_ = MakeReferenceEngine(1);
    object_ = std::make_unique<TestObject>(kRegionBytes);
    ASSERT_TRUE(Register(*server_->stub, "main", object_->key(), 0, kRegionBytes, kToken).ok());
  }

  // The case's request with the input in region "main" at `offset` (the bytes copied there).
  grad::v1::ComputeGradientsRequest RequestWithSharedInput(int64_t offset = 0) {
    const gradengine::GradientRequest request = case_.GradientRequest(ObjectiveKind::kMse);
    std::copy(request.input.data, request.input.data + request.input.size, object_->floats(offset));
    grad::v1::ComputeGradientsRequest wire;
    gradwire::EncodeGradientRequest(request, &wire);
    wire.mutable_input()->clear_data();
    SetRef(wire.mutable_input()->mutable_shared_memory(), "main", offset, InputBytes());
    return wire;
  }
  int64_t InputBytes() const { return case_.input.num_elements() * 4; }
  // Every key the bad-input table sends.
  std::vector<std::string> SentKeys() const {
    return {object_->key(), "a/../etc", "sem.lock", ".hidden", "gradclient-test-never-made"};
  }
  int64_t OutputBytes() const { return case_.output_like.num_elements() * 4; }

  LogLines log_;
  std::unique_ptr<TestServer> server_;
  OwnedCase case_;
  std::unique_ptr<gradengine::Engine> engine_;
  std::unique_ptr<TestObject> object_;
};

TEST_F(SharedMemoryTest, AReferencedInputGivesTheEngineResult) {
  grad::v1::ComputeGradientsResponse response;
  const grpc::Status status = Call(*server_->stub, RequestWithSharedInput(4096), &response, kToken);
  ASSERT_TRUE(status.ok()) << status.error_message();
  absl::StatusOr<gradengine::GradientResult> actual = gradwire::DecodeGradientResult(response);
  ASSERT_TRUE(actual.ok()) << actual.status();
  absl::StatusOr<gradengine::GradientResult> expected =
      engine_->ComputeGradients(case_.GradientRequest(ObjectiveKind::kMse));
  ASSERT_TRUE(expected.ok());
  EXPECT_TRUE(SameGradientResult(*actual, *expected));
}

TEST_F(SharedMemoryTest, PlacedResultsAreWrittenIntoTheRegionAndReturnedAsReferences) {
  grad::v1::ComputeGradientsRequest wire = RequestWithSharedInput(0);
  const int64_t output_offset = 65536;
  const int64_t input_grad_offset = 131072;
  SetRef(wire.mutable_placement()->mutable_output(), "main", output_offset, OutputBytes());
  SetRef(wire.mutable_placement()->mutable_input_grad(), "main", input_grad_offset, InputBytes());
  grad::v1::ComputeGradientsResponse response;
  const grpc::Status status = Call(*server_->stub, wire, &response, kToken);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.output().data().empty());
  EXPECT_EQ(response.output().shared_memory().offset(), output_offset);
  EXPECT_EQ(response.input_grad().shared_memory().offset(), input_grad_offset);
  absl::StatusOr<gradengine::GradientResult> expected =
      engine_->ComputeGradients(case_.GradientRequest(ObjectiveKind::kMse));
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(std::memcmp(object_->floats(output_offset), expected->output.data.data(),
                        static_cast<size_t>(OutputBytes())),
            0);
  EXPECT_EQ(std::memcmp(object_->floats(input_grad_offset), expected->input_grad->data.data(),
                        static_cast<size_t>(InputBytes())),
            0);
}

// One bad registration or reference: what to change, the code, a substring of the message.
struct BadCase {
  std::string name;
  std::function<grpc::Status(SharedMemoryTest*)> run;
  grpc::StatusCode code;
  std::string message;
};

TEST_F(SharedMemoryTest, EveryBadRegistrationAndReferenceGetsItsCodeAndNamesTheField) {
  auto with_request = [](std::function<void(grad::v1::ComputeGradientsRequest*)> change,
                         int64_t input_offset = 0) {
    return [change, input_offset](SharedMemoryTest* t) {
      grad::v1::ComputeGradientsRequest wire = t->RequestWithSharedInput(input_offset);
      change(&wire);
      grad::v1::ComputeGradientsResponse response;
      return Call(*t->server_->stub, wire, &response, kToken);
    };
  };
  auto registering = [](std::string name, std::function<std::string(SharedMemoryTest*)> key,
                        int64_t offset, int64_t size) {
    return [=](SharedMemoryTest* t) {
      return Register(*t->server_->stub, name, key(t), offset, size, kToken);
    };
  };
  auto own_key = [](SharedMemoryTest* t) { return t->object_->key(); };
  const std::vector<BadCase> cases = {
      {"unknown region", with_request([](auto* w) {
         w->mutable_input()->mutable_shared_memory()->set_region("nope");
       }),
       grpc::StatusCode::NOT_FOUND, "input.shared_memory.region=\"nope\" is not a registered"},
      {"key with a slash",
       registering(
           "k1", [](auto*) { return std::string("a/../etc"); }, 0, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "key may hold only letters"},
      {"empty key",
       registering(
           "k2", [](auto*) { return std::string(); }, 0, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "key is empty"},
      {"key without the prefix",
       registering(
           "k3", [](auto*) { return std::string("sem.lock"); }, 0, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "key must start with \"gradclient-\""},
      {"key starting with a dot",
       registering(
           "k4", [](auto*) { return std::string(".hidden"); }, 0, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "key must start with \"gradclient-\""},
      {"no such object",
       registering(
           "k5", [](auto*) { return std::string("gradclient-test-never-made"); }, 0, 64),
       grpc::StatusCode::NOT_FOUND, "no shared memory object has the given key"},
      {"registration past the object's end", registering("k6", own_key, 0, kRegionBytes + 1),
       grpc::StatusCode::INVALID_ARGUMENT, "past the end of the object"},
      {"registration size overflow",
       registering("k7", own_key, std::numeric_limits<int64_t>::max() - 8, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "overflows"},
      {"negative registration offset", registering("k8", own_key, -4096, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "offset=-4096 must be >= 0"},
      {"zero byte_size", registering("k9", own_key, 0, 0), grpc::StatusCode::INVALID_ARGUMENT,
       "byte_size=0 must be > 0"},
      {"name repeated", registering("main", own_key, 0, 64), grpc::StatusCode::ALREADY_EXISTS,
       "\"main\" is already registered"},
      {"name not printable", registering(std::string("a\x01", 2), own_key, 0, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "printable ASCII"},
      {"name too long", registering(std::string(200, 'n'), own_key, 0, 64),
       grpc::StatusCode::INVALID_ARGUMENT, "name has 200 bytes"},
      {"offset past the region's end", with_request([](auto* w) {
         w->mutable_input()->mutable_shared_memory()->set_offset(kRegionBytes);
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "input.shared_memory.offset=1048576 + byte_size="},
      {"offset + size overflowing", with_request([](auto* w) {
         w->mutable_input()->mutable_shared_memory()->set_offset(
             std::numeric_limits<int64_t>::max());
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "past the end of region \"main\""},
      {"negative reference offset",
       with_request([](auto* w) { w->mutable_input()->mutable_shared_memory()->set_offset(-8); }),
       grpc::StatusCode::INVALID_ARGUMENT, "must both be >= 0"},
      {"misaligned reference",
       with_request([](auto* w) { w->mutable_input()->mutable_shared_memory()->set_offset(2); }),
       grpc::StatusCode::INVALID_ARGUMENT, "is not aligned for FLOAT32"},
      {"byte_size not the shape's",
       with_request([](auto* w) { w->mutable_input()->mutable_shared_memory()->set_byte_size(4); }),
       grpc::StatusCode::INVALID_ARGUMENT, "input.shared_memory.byte_size=4, but shape="},
      {"both data and a reference",
       with_request([](auto* w) { w->mutable_input()->set_data(std::string(8, '\0')); }),
       grpc::StatusCode::INVALID_ARGUMENT, "input has both data (8 bytes) and shared_memory"},
      {"output overlapping the input", with_request([](auto* w) {
         SetRef(w->mutable_placement()->mutable_output(), "main", 64,
                w->input().shared_memory().byte_size());
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "placement.output overlaps input.shared_memory"},
      {"two results overlapping", with_request([](auto* w) {
         SetRef(w->mutable_placement()->mutable_output(), "main", 262144, 4096);
         SetRef(w->mutable_placement()->mutable_input_grad(), "main", 262144 + 64, 4096);
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "placement.input_grad overlaps placement.output"},
      {"placed output of the wrong size", with_request([](auto* w) {
         SetRef(w->mutable_placement()->mutable_output(), "main", 262144, 64);
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "placement.output has 16 elements"},
      {"placed gradient not requested", with_request([](auto* w) {
         w->mutable_gradients()->set_skip_input(true);
         SetRef(w->mutable_placement()->mutable_input_grad(), "main", 262144, 4096);
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "input gradient is not requested"},
      {"placed output with skip_output", with_request([](auto* w) {
         w->set_skip_output(true);
         SetRef(w->mutable_placement()->mutable_output(), "main", 262144, 4096);
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "skip_output is set, but placement.output"},
      {"placement size not a float multiple", with_request([](auto* w) {
         SetRef(w->mutable_placement()->mutable_output(), "main", 262144, 6);
       }),
       grpc::StatusCode::INVALID_ARGUMENT, "placement.output.byte_size=6 must be a positive"},
      {"another token's region",
       [](SharedMemoryTest* t) {
         grad::v1::ComputeGradientsRequest wire = t->RequestWithSharedInput();
         grad::v1::ComputeGradientsResponse response;
         return Call(*t->server_->stub, wire, &response, kOtherToken);
       },
       grpc::StatusCode::NOT_FOUND, "input.shared_memory.region=\"main\" is not a registered"},
      {"unregistering an unknown name",
       [](SharedMemoryTest* t) { return Unregister(*t->server_->stub, "nope", nullptr, kToken); },
       grpc::StatusCode::NOT_FOUND, "\"nope\" is not registered"},
      {"no proof",
       [](SharedMemoryTest* t) {
         return Register(*t->server_->stub, "p1", t->object_->key(), 0, 4096, kToken, "");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "proof has 0 bytes"},
      {"a proof the object does not hold (a caller that cannot write it)",
       [](SharedMemoryTest* t) {
         return Register(*t->server_->stub, "p2", t->object_->key(), 0, 4096, kOtherToken,
                         std::string(32, 'g'));
       },
       grpc::StatusCode::PERMISSION_DENIED, "do not match the proof"},
      {"another token registering the same object",
       [](SharedMemoryTest* t) {
         return Register(*t->server_->stub, "mine", t->object_->key(), 0, 64, kOtherToken);
       },
       grpc::StatusCode::PERMISSION_DENIED, "registered by another caller"},
      {"a result overlapping an input through a second name for the object",
       [](SharedMemoryTest* t) {
         EXPECT_TRUE(
             Register(*t->server_->stub, "alias", t->object_->key(), 4096, 65536, kToken).ok());
         grad::v1::ComputeGradientsRequest wire = t->RequestWithSharedInput(8192);
         // alias + 4096 is main + 8192: the input's first bytes.
         SetRef(wire.mutable_placement()->mutable_output(), "alias", 4096, t->OutputBytes());
         grad::v1::ComputeGradientsResponse response;
         grpc::Status status = Call(*t->server_->stub, wire, &response, kToken);
         EXPECT_TRUE(Unregister(*t->server_->stub, "alias", nullptr, kToken).ok());
         return status;
       },
       grpc::StatusCode::INVALID_ARGUMENT, "placement.output overlaps input.shared_memory"},
      {"registering without a token",
       [](SharedMemoryTest* t) {
         return Register(*t->server_->stub, "x", t->object_->key(), 0, 64);
       },
       grpc::StatusCode::UNAUTHENTICATED, ""},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    const grpc::Status status = c.run(this);
    EXPECT_EQ(status.error_code(), c.code) << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), c.message)) << status.error_message();
    for (const std::string& key : SentKeys()) {
      EXPECT_FALSE(absl::StrContains(status.error_message(), key)) << "a key was echoed: " << key;
    }
  }
  for (const std::string& key : SentKeys()) {
    EXPECT_FALSE(absl::StrContains(log_.All(), key)) << "a key was logged: " << key;
  }
  // The server still serves, with the region intact.
  grad::v1::ComputeGradientsResponse response;
  EXPECT_TRUE(Call(*server_->stub, RequestWithSharedInput(), &response, kToken).ok());
}

TEST_F(SharedMemoryTest, ASymbolicLinkIsRefused) {
  const std::string link = absl::StrCat(gradwire::kSharedMemoryKeyPrefix, "test-link-", getpid());
  ASSERT_EQ(symlink("/etc/hostname", ("/dev/shm/" + link).c_str()), 0);
  const grpc::Status status = Register(*server_->stub, "link", link, 0, 64, kToken);
  unlink(("/dev/shm/" + link).c_str());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "symbolic link"));
  EXPECT_FALSE(absl::StrContains(status.error_message(), link));
}

TEST_F(SharedMemoryTest, LimitsOnRegionsAndMappedBytesAreResourceExhausted) {
  // "main" holds 1 of 4 regions and 1 of 8 MiB.
  TestObject big(8 * kRegionBytes);
  grpc::Status status = Register(*server_->stub, "big", big.key(), 0, 8 * kRegionBytes, kToken);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "max_shared_memory_mb"));
  for (const char* name : {"r2", "r3", "r4"}) {
    ASSERT_TRUE(Register(*server_->stub, name, object_->key(), 0, 4096, kToken).ok());
  }
  status = Register(*server_->stub, "r5", object_->key(), 0, 4096, kToken);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "max_shared_memory_regions"));
  int removed = 0;
  ASSERT_TRUE(Unregister(*server_->stub, "", &removed, kToken).ok());
  EXPECT_EQ(removed, 4);
  EXPECT_TRUE(Register(*server_->stub, "r5", object_->key(), 0, 4096, kToken).ok());
}

TEST_F(SharedMemoryTest, ATruncatedRegionFailsTheNextCallAndTheServerKeepsServing) {
  object_->Truncate(4096);  // shorter than the 1 MiB registered
  grad::v1::ComputeGradientsResponse response;
  const grpc::Status status = Call(*server_->stub, RequestWithSharedInput(), &response, kToken);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "\"main\" has shrunk to 4096 bytes"))
      << status.error_message();
  // A call without shared memory is answered as ever.
  grad::v1::ComputeGradientsRequest plain;
  gradwire::EncodeGradientRequest(case_.GradientRequest(ObjectiveKind::kMse), &plain);
  EXPECT_TRUE(Call(*server_->stub, plain, &response, kToken).ok());
}

TEST_F(SharedMemoryTest, UnregisteringWhileInUseKeepsTheMappingForThatCall) {
  // A call long enough (hundreds of ms) to unregister its region while it computes.
  const OwnedCase deep = DeepCase(/*layers=*/32, /*batch=*/8, /*channels=*/32, /*size=*/48);
  const gradengine::GradientRequest request = deep.GradientRequest(ObjectiveKind::kSum);
  TestObject big(static_cast<size_t>(request.input.size) * 4);
  ASSERT_TRUE(Register(*server_->stub, "big", big.key(), 0, request.input.size * 4, kToken).ok());
  std::copy(request.input.data, request.input.data + request.input.size, big.floats(0));
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(request, &wire);
  wire.mutable_input()->clear_data();
  SetRef(wire.mutable_input()->mutable_shared_memory(), "big", 0, request.input.size * 4);

  grpc::Status call_status;
  grad::v1::ComputeGradientsResponse response;
  std::atomic<bool> finished{false};
  std::thread call([&] {
    call_status = Call(*server_->stub, wire, &response, kToken);
    finished = true;
  });
  // Unregister as soon as the server reports the call using the region.
  bool seen_in_use = false;
  for (int i = 0; i < 5000 && !seen_in_use; ++i) {
    grad::v1::GetSharedMemoryStatusRequest status_request;
    status_request.set_name("big");
    grad::v1::GetSharedMemoryStatusResponse status_response;
    grpc::ClientContext context;
    context.AddMetadata("authorization", absl::StrCat("Bearer ", kToken));
    if (server_->stub->GetSharedMemoryStatus(&context, status_request, &status_response).ok() &&
        status_response.regions_size() == 1) {
      seen_in_use = status_response.regions(0).calls_in_progress() > 0;
    }
    if (!seen_in_use) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(seen_in_use) << "the call was never seen using the region";
  ASSERT_TRUE(Unregister(*server_->stub, "big", nullptr, kToken).ok());
  EXPECT_FALSE(finished) << "the call ended before the region was unregistered; make it longer";
  call.join();
  ASSERT_TRUE(call_status.ok()) << call_status.error_message();
  absl::StatusOr<gradengine::GradientResult> expected = engine_->ComputeGradients(request);
  ASSERT_TRUE(expected.ok());
  absl::StatusOr<gradengine::GradientResult> actual = gradwire::DecodeGradientResult(response);
  ASSERT_TRUE(actual.ok());
  EXPECT_TRUE(SameGradientResult(*actual, *expected));
  // Gone now: the next call is refused, and the server's mapping is released.
  EXPECT_EQ(Call(*server_->stub, wire, &response, kToken).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(MappingsOnceSettled(big.key(), 1), 1) << "only the test's own mapping is left";
}

TEST_F(SharedMemoryTest, ShutdownUnmapsEverything) {
  ASSERT_EQ(Mappings(object_->key()), 2);  // the test's and the server's
  server_->server->Shutdown();
  server_.reset();
  EXPECT_EQ(Mappings(object_->key()), 1);  // the server and its calls are gone
}

TEST(SharedMemoryDisabledTest, RegistrationAndReferencesAreFailedPrecondition) {
  gradserver::ServerOptions options;
  options.threads_per_request = 1;
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  TestObject object(4096);
  grpc::Status status = Register(*server->stub, "r", object.key(), 0, 4096);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "--allow_shared_memory"));
  status = Unregister(*server->stub, "");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  {
    grad::v1::GetSharedMemoryStatusRequest request;
    grad::v1::GetSharedMemoryStatusResponse response;
    grpc::ClientContext context;
    EXPECT_EQ(server->stub->GetSharedMemoryStatus(&context, request, &response).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
  }

  const OwnedCase c = SmallCase("conv_relu_conv_tanh");
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(c.GradientRequest(ObjectiveKind::kMse), &wire);
  wire.mutable_input()->clear_data();
  SetRef(wire.mutable_input()->mutable_shared_memory(), "r", 0, c.input.num_elements() * 4);
  grad::v1::ComputeGradientsResponse response;
  status = Call(*server->stub, wire, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "input.shared_memory names shared memory"))
      << status.error_message();

  absl::StatusOr<std::unique_ptr<gradclient::Client>> client =
      gradclient::Client::Create(server->target);
  ASSERT_TRUE(client.ok());
  absl::StatusOr<gradclient::ServerInfo> info = (*client)->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->shared_memory_allowed);
}

// A non-loopback address of this host, or empty if it has none.
std::string NonLoopbackAddress() {
  ifaddrs* addresses = nullptr;
  if (getifaddrs(&addresses) != 0) return "";
  std::string found;
  for (ifaddrs* a = addresses; a != nullptr && found.empty(); a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    char text[INET_ADDRSTRLEN];
    const auto* in = reinterpret_cast<const sockaddr_in*>(a->ifa_addr);
    if (inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text)) != nullptr &&
        !absl::StartsWith(text, "127.")) {
      found = text;
    }
  }
  freeifaddrs(addresses);
  return found;
}

TEST(SharedMemoryRemoteTest, CallersFromAnotherAddressAreRefused) {
  const std::string address = NonLoopbackAddress();
  if (address.empty()) GTEST_SKIP() << "this host has no non-loopback IPv4 address";
  gradserver::ServerOptions options;
  options.threads_per_request = 1;
  options.shared_memory.allowed = true;
  std::unique_ptr<TestServer> server = StartTestServer(options, false, address + ":0");
  ASSERT_NE(server, nullptr);
  auto stub = grad::v1::GradientService::NewStub(
      MakeChannel(absl::StrCat(address, ":", server->server->port())));
  TestObject object(4096);
  grpc::Status status = Register(*stub, "r", object.key(), 0, 4096);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "only for clients on the server's host"));

  const OwnedCase c = SmallCase("conv_relu_conv_tanh");
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(c.GradientRequest(ObjectiveKind::kMse), &wire);
  wire.mutable_input()->clear_data();
  SetRef(wire.mutable_input()->mutable_shared_memory(), "r", 0, c.input.num_elements() * 4);
  grad::v1::ComputeGradientsResponse response;
  status = Call(*stub, wire, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "only for clients on the server's host"));
}

TEST(SharedMemoryClientTest, RegionsUnregisterAndUnlinkWhenTheLastReferenceGoes) {
  gradserver::ServerOptions options;
  options.threads_per_request = 1;
  options.shared_memory.allowed = true;
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client =
      gradclient::Client::Create(server->target);
  ASSERT_TRUE(client.ok());
  absl::StatusOr<gradclient::ServerInfo> info = (*client)->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->shared_memory_allowed);
  EXPECT_EQ(info->max_shared_memory_regions, 64);

  const OwnedCase c = SmallCase("gelu_chain");
  std::string key;
  gradengine::Tensor output_kept;
  {
    absl::StatusOr<std::shared_ptr<gradclient::SharedMemoryRegion>> region =
        gradclient::SharedMemoryRegion::Create("results", 1 << 20);
    ASSERT_TRUE(region.ok()) << region.status();
    key = (*region)->key();
    ASSERT_TRUE((*client)->RegisterSharedMemory(*region).ok());
    EXPECT_EQ((*client)->RegisterSharedMemory(*region).code(),
              absl::StatusCode::kFailedPrecondition);
    gradclient::CallOptions call;
    call.result_region = *region;
    call.shards = 2;
    EXPECT_EQ((*client)->ComputeGradients(c.GradientRequest(), call).status().code(),
              absl::StatusCode::kInvalidArgument);
    call.shards = 1;
    absl::StatusOr<gradclient::GradientReply> reply =
        (*client)->ComputeGradients(c.GradientRequest(), call);
    ASSERT_TRUE(reply.ok()) << reply.status();
    output_kept = std::move(reply->result.output);  // holds the region alive
    absl::StatusOr<std::vector<gradclient::SharedMemoryStatus>> regions =
        (*client)->GetSharedMemoryStatus();
    ASSERT_TRUE(regions.ok());
    ASSERT_EQ(regions->size(), 1u);
    EXPECT_EQ((*regions)[0].name, "results");
  }
  EXPECT_EQ(Mappings(key), 2) << "a result in the region keeps the client's mapping";
  output_kept = gradengine::Tensor();
  EXPECT_EQ(MappingsOnceSettled(key, 0), 0) << "unmapped by the client and the server";
  EXPECT_NE(access(("/dev/shm/" + key).c_str(), F_OK), 0) << "unlinked";
  absl::StatusOr<std::vector<gradclient::SharedMemoryStatus>> regions =
      (*client)->GetSharedMemoryStatus();
  ASSERT_TRUE(regions.ok());
  EXPECT_TRUE(regions->empty()) << "unregistered from the server";
}

}  // namespace
}  // namespace gradservicetest
