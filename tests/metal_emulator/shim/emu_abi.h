// emu_abi.h -- the C ABI between a compiled emulated kernel (.so), its runtime
// (emu_runtime.cpp, linked into every kernel .so) and the two callers: the MLX
// extension (ext/host_kernel.cpp) and the Python sparse entry point (ctypes).
// Keep in sync with _abi.py (ctypes mirror). Bump EMU_ABI_VERSION on any change.
#pragma once
#include <stdint.h>

#define EMU_ABI_VERSION 3

// emu_buffer.flags
#define EMU_BUF_INPUT 1u    // kernel input (const)
#define EMU_BUF_OUTPUT 2u   // kernel output: copied back after a checked launch
#define EMU_BUF_AUX 4u      // _shape / _strides / _ndim parameter made by the caller
#define EMU_BUF_GUARDED 8u  // already lives in guarded memory (sparse mode): never copied

// emu_launch.modes
#define EMU_MODE_BOUNDS 1u   // device/constant/threadgroup out-of-bounds accesses are errors
#define EMU_MODE_RACE 2u     // threadgroup-memory race detection (shadow memory)
#define EMU_MODE_TRAFFIC 4u  // count bytes read/written per buffer
#define EMU_MODE_COVERAGE 8u // also count distinct elements read/written (bitmaps)

// emu_buffer.stats indices
#define EMU_STAT_READ_BYTES 0
#define EMU_STAT_WRITE_BYTES 1
#define EMU_STAT_READ_DISTINCT 2   // distinct elements read (COVERAGE)
#define EMU_STAT_WRITE_DISTINCT 3  // distinct elements written (COVERAGE)
#define EMU_STAT_READ_OPS 4        // load instructions
#define EMU_STAT_WRITE_OPS 5       // store instructions
#define EMU_NSTATS 6

#ifdef __cplusplus
extern "C" {
#endif

typedef struct emu_buffer {
  void* ptr;          // first element
  uint64_t nbytes;    // extent the kernel may touch
  uint32_t itemsize;  // bytes per element
  uint32_t flags;     // EMU_BUF_*
  const char* name;   // parameter name, for reports
  uint64_t stats[EMU_NSTATS];  // out
} emu_buffer;

typedef struct emu_launch {
  uint32_t abi;         // EMU_ABI_VERSION
  uint32_t nbuf;        // number of [[buffer(i)]] parameters, in order
  emu_buffer* bufs;
  uint32_t grid[3];     // threads (dispatchThreads)
  uint32_t tg[3];       // threads per threadgroup (before clamping to grid)
  uint32_t modes;       // EMU_MODE_*
  uint32_t max_threads; // maxTotalThreadsPerThreadgroup (1024)
  const uint32_t* groups;  // optional list of threadgroup positions (x,y,z triples)
  uint64_t ngroups;        // number of triples in `groups`; 0 = the whole grid
  char* err;            // out: message on failure
  uint64_t errlen;
  uint64_t groups_run;  // out
  uint64_t threads_run; // out
  uint64_t switches;    // out: fiber context switches
} emu_launch;

// Exported by every kernel .so. 0 = ok, 1 = kernel error (err filled), 2 = bad launch.
int emu_kernel_launch(emu_launch* launch);
// Exported by every kernel .so: "name\nnbuf\n" + one "buffer-name\n" per buffer.
const char* emu_kernel_info(void);

#ifdef __cplusplus
}
#endif
