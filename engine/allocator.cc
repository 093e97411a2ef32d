#include "gradengine/allocator.h"

#include <malloc.h>

namespace gradengine {

bool KeepFreedMemoryForReuse() {
  // mallopt returns 1 on success.
  bool ok = mallopt(M_ARENA_MAX, 1) == 1;
  ok = mallopt(M_MMAP_MAX, 0) == 1 && ok;
  ok = mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 && ok;
  return ok;
}

}  // namespace gradengine
