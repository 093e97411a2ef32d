#include "server/memory_limit.h"

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace gradserver {
namespace {

// Lowers `*limit` to the limit in `root`/`path`/`file` and in the same file of every cgroup
// above `path`.
void LowestOnTheWayUp(const std::string& root, std::string path, const std::string& file,
                      int64_t* limit) {
  while (true) {
    std::ifstream in(absl::StrCat(root, path == "/" ? "" : path, "/", file));
    std::string text;
    int64_t value = 0;
    if ((in >> text) && text != "max" && absl::SimpleAtoi(text, &value) && value > 0 &&
        (*limit == 0 || value < *limit)) {
      *limit = value;
    }
    const size_t slash = path.rfind('/');
    if (path.empty() || path == "/" || slash == std::string::npos) return;
    path = slash == 0 ? "/" : path.substr(0, slash);
  }
}

}  // namespace

int64_t CgroupMemoryLimit(const std::string& proc_cgroup, const std::string& cgroup_root) {
  std::ifstream cgroups(proc_cgroup);
  std::string line;
  std::string v2_path;
  std::string v1_path;
  while (std::getline(cgroups, line)) {
    // "0::/a/b" (v2) or "4:memory:/a/b", "4:cpu,memory:/a/b" (v1).
    const std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    if (parts[0] == "0" && parts[1].empty()) v2_path = parts[2];
    for (absl::string_view controller : absl::StrSplit(parts[1], ',')) {
      if (controller == "memory") v1_path = parts[2];
    }
  }
  int64_t limit = 0;
  if (!v2_path.empty()) LowestOnTheWayUp(cgroup_root, v2_path, "memory.max", &limit);
  if (!v1_path.empty()) {
    LowestOnTheWayUp(cgroup_root + "/memory", v1_path, "memory.limit_in_bytes", &limit);
  }
  return limit;
}

}  // namespace gradserver
