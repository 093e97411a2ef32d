#include "gradengine/allocator.h"

#include <malloc.h>
#include <unistd.h>

#include <fstream>

namespace gradengine {

bool KeepFreedMemoryForReuse() {
  // mallopt returns 1 on success.
  bool ok = mallopt(M_ARENA_MAX, 1) == 1;
  ok = mallopt(M_MMAP_MAX, 0) == 1 && ok;
  ok = mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 && ok;
  return ok;
}

int64_t ResidentMemoryBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t pages = 0;
  int64_t resident_pages = 0;
  if (!(statm >> pages >> resident_pages)) return -1;
  return resident_pages * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace gradengine
