// emu_rt.h -- what the kernel translation unit (msl_shim.h + generated source +
// harness) may call in the runtime (emu_runtime.cpp). Plain C++17, no std headers
// beyond <stdint.h>, so that the kernel TU sees no C library names in the global
// namespace (MSL's `abs`, `max`, `exp` must resolve to metal::).
#pragma once
#include <stdint.h>
#include "emu_abi.h"

#if defined(__GNUC__)
#define EMU_HIDDEN __attribute__((visibility("hidden")))
#define EMU_NOSAN __attribute__((no_sanitize_address))
#else
#define EMU_HIDDEN
#define EMU_NOSAN
#endif

namespace emu {
namespace rt {

// Values for the [[attribute]] kernel parameters of one GPU thread.
struct ThreadCtx {
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threads_per_threadgroup[3];           // actual (partial edge groups are smaller)
  uint32_t dispatch_threads_per_threadgroup[3];  // as dispatched (clamped to the grid)
  uint32_t threads_per_grid[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
};

// simd operation kinds (names in emu_runtime.cpp: op_names)
enum SimdOp : int {
  OP_SIMDGROUP_BARRIER = 0, OP_SUM, OP_PRODUCT, OP_MAX, OP_MIN, OP_AND, OP_OR, OP_XOR,
  OP_PREFIX_INCLUSIVE_SUM, OP_PREFIX_EXCLUSIVE_SUM, OP_PREFIX_INCLUSIVE_PRODUCT,
  OP_PREFIX_EXCLUSIVE_PRODUCT, OP_SHUFFLE, OP_SHUFFLE_DOWN, OP_SHUFFLE_UP, OP_SHUFFLE_XOR,
  OP_SHUFFLE_ROTATE_DOWN, OP_SHUFFLE_ROTATE_UP, OP_BROADCAST, OP_BROADCAST_FIRST,
  OP_ALL, OP_ANY, OP_IS_FIRST, OP_SHUFFLE_AND_FILL_DOWN, OP_SHUFFLE_AND_FILL_UP,
  OP_COUNT
};

constexpr unsigned kSimdWidth = 32;
constexpr unsigned kSlotBytes = 32;  // per lane and exchange

// The data every lane published at one simd operation, valid until the lane's next one.
struct SimdView {
  const unsigned char* slots;  // kSimdWidth * kSlotBytes
  uint32_t active;             // bit i: lane i took part (active lanes of the simdgroup)
  uint32_t lane;               // caller's lane
};

EMU_HIDDEN const ThreadCtx* ctx();
EMU_HIDDEN void threadgroup_barrier(unsigned line, unsigned col);
EMU_HIDDEN SimdView simd_sync(int op, unsigned line, unsigned col, const void* value, unsigned size);
EMU_HIDDEN void* tg_alloc(unsigned site, unsigned long size, unsigned long align, unsigned long elem,
                         const char* name);
// Atomic accesses: checked (bounds), counted (traffic), never reported as races.
EMU_HIDDEN void atomic_access(const void* addr, unsigned size, int kind /*0 load 1 store 2 rmw*/);
[[noreturn]] EMU_HIDDEN void fail(const char* what);

using BodyFn = void (*)(void* const* bufs, const ThreadCtx* c);
struct KernelMeta {
  const char* name;           // MLX's kernel name (custom_kernel_...)
  const char* display_name;   // the `name=` given to metal_kernel
  unsigned nbuf;
  const char* const* buffer_names;
  const char* source_file;    // the #line file name of the generated source
  const char* const* source_lines;  // generated source, 1-based lines (index 0 unused)
  unsigned nlines;
};
EMU_HIDDEN int run(::emu_launch* launch, BodyFn body, const KernelMeta* meta);

}  // namespace rt
}  // namespace emu
