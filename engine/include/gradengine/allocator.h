// Process-wide memory allocation settings for programs that move large tensors.

#ifndef GRADENGINE_ALLOCATOR_H_
#define GRADENGINE_ALLOCATOR_H_

#include <cstdint>

namespace gradengine {

// Sets process-wide malloc options for programs that allocate and free large tensors over and
// over (the server, the client, benchmarks): glibc gives every allocation over 32 MiB, and
// threads' allocations over 64 MiB, their own fresh mapping, and returns freed memory to the
// kernel. Touching fresh pages costs a page fault per 4 KiB, which on virtual machines can be
// slower than computing with the data (64 MiB: 260 ms of faults against 4 ms of writes on the
// machine the benchmarks ran on). After this call all threads allocate from one heap
// (M_ARENA_MAX=1), never from separate mappings (M_MMAP_MAX=0), and up to 1 GiB of freed memory
// is kept for reuse (M_TRIM_THRESHOLD). Call it at the start of main, before other threads
// exist. Returns false if the C library rejected an option (then nothing is guaranteed).
bool KeepFreedMemoryForReuse();

// The process's resident memory in bytes (/proc/self/statm), or -1 if it cannot be read.
int64_t ResidentMemoryBytes();

}  // namespace gradengine

#endif  // GRADENGINE_ALLOCATOR_H_
