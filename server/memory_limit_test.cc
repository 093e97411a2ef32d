#include "server/memory_limit.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace gradserver {
namespace {

// A throwaway /proc/self/cgroup and cgroup file system.
class FakeCgroups : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() /
            absl::StrCat("memory_limit_test.", getpid(), ".",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  void Write(const std::string& relative, const std::string& text) {
    const std::filesystem::path path = root_ / relative;
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << text;
  }
  int64_t Limit() {
    return CgroupMemoryLimit((root_ / "cgroup").string(), (root_ / "sys").string());
  }

  std::filesystem::path root_;
};

TEST_F(FakeCgroups, V2TakesTheLowestLimitOnTheWayToTheRoot) {
  Write("cgroup", "0::/system.slice/gradserver.service\n");
  Write("sys/memory.max", "max\n");
  Write("sys/system.slice/memory.max", "8589934592\n");
  Write("sys/system.slice/gradserver.service/memory.max", "max\n");
  EXPECT_EQ(Limit(), int64_t{8} << 30);
  Write("sys/system.slice/gradserver.service/memory.max", "4294967296\n");
  EXPECT_EQ(Limit(), int64_t{4} << 30);
}

TEST_F(FakeCgroups, V2InsideItsOwnNamespaceReadsTheRootFile) {
  Write("cgroup", "0::/\n");
  Write("sys/memory.max", "2147483648\n");
  EXPECT_EQ(Limit(), int64_t{2} << 30);
}

TEST_F(FakeCgroups, V1ReadsTheMemoryController) {
  Write("cgroup", "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n");
  Write("sys/memory/memory.limit_in_bytes", "9223372036854771712\n");
  Write("sys/memory/docker/abc/memory.limit_in_bytes", "1073741824\n");
  EXPECT_EQ(Limit(), int64_t{1} << 30);
}

TEST_F(FakeCgroups, NoLimitIsZero) {
  Write("cgroup", "0::/user.slice\n");
  Write("sys/memory.max", "max\n");
  Write("sys/user.slice/memory.max", "not a number\n");
  EXPECT_EQ(Limit(), 0);
  EXPECT_EQ(CgroupMemoryLimit((root_ / "missing").string(), (root_ / "sys").string()), 0);
}

}  // namespace
}  // namespace gradserver
