// The memory limit a process's cgroups set, for the memory budget's default.

#ifndef SERVER_MEMORY_LIMIT_H_
#define SERVER_MEMORY_LIMIT_H_

#include <cstdint>
#include <string>

namespace gradserver {

// The lowest memory limit set on the process's cgroup or any cgroup above it: the cgroups are
// read from `proc_cgroup` (a /proc/PID/cgroup file: "0::/a/b" for cgroup v2, "4:memory:/a/b"
// for v1's memory controller) and their limits from under `cgroup_root` (/sys/fs/cgroup):
// v2's <root>/<path>/memory.max, v1's <root>/memory/<path>/memory.limit_in_bytes. "max", an
// unreadable file and a value that is not a positive number set no limit. 0 when none is set.
int64_t CgroupMemoryLimit(const std::string& proc_cgroup, const std::string& cgroup_root);

}  // namespace gradserver

#endif  // SERVER_MEMORY_LIMIT_H_
