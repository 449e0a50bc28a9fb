// emu_runtime.cpp -- runs an emulated Metal kernel on the CPU with GPU semantics.
//
// One threadgroup at a time; its threads are fibers on the calling OS thread, switched
// cooperatively at barriers and simd operations (hand-written x86-64 context switch,
// ucontext elsewhere). Compiled once (not instrumented) and linked into every kernel
// .so; the kernel translation unit is compiled with -fsanitize=kernel-address in
// "call" mode, so every load/store it makes arrives here as __asan_{load,store}N_noabort
// and is checked (bounds), counted (traffic) and race-checked (threadgroup memory).
// Errors never abort the process: the failing fiber is abandoned, the launch returns 1
// with a message naming the kernel, the threadgroup, the thread and the source line.
#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "emu_abi.h"
#include "emu_rt.h"

#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if EMU_ASM_SWITCH
// void emu_ctx_switch(void** save_sp, void* load_sp): saves callee-saved registers,
// MXCSR and the x87 control word on the current stack, stores the stack pointer in
// *save_sp, switches to load_sp and restores the same frame from there.
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp) EMU_HIDDEN;
extern "C" void emu_fiber_trampoline() EMU_HIDDEN;
asm(R"(
  .text
  .p2align 4
  .globl emu_ctx_switch
  .hidden emu_ctx_switch
  .type emu_ctx_switch,@function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_ctx_switch, .-emu_ctx_switch

  .p2align 4
  .globl emu_fiber_trampoline
  .hidden emu_fiber_trampoline
  .type emu_fiber_trampoline,@function
emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
#endif

namespace emu {
namespace rt {
namespace {

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kPage = 4096;
constexpr size_t kTgLimit = 32768;        // Metal's threadgroup memory limit
constexpr size_t kTgRedzone = 64;         // unallocated bytes between threadgroup arrays
constexpr size_t kArenaSize = 64 * 1024;
constexpr uint64_t kGuard = 1ull << 34;   // 16 GiB of PROT_NONE on each side of a checked buffer

const char* const kOpNames[OP_COUNT] = {
    "simdgroup_barrier", "simd_sum", "simd_product", "simd_max", "simd_min", "simd_and",
    "simd_or", "simd_xor", "simd_prefix_inclusive_sum", "simd_prefix_exclusive_sum",
    "simd_prefix_inclusive_product", "simd_prefix_exclusive_product", "simd_shuffle",
    "simd_shuffle_down", "simd_shuffle_up", "simd_shuffle_xor", "simd_shuffle_rotate_down",
    "simd_shuffle_rotate_up", "simd_broadcast", "simd_broadcast_first", "simd_all", "simd_any",
    "simd_is_first", "simd_shuffle_and_fill_down", "simd_shuffle_and_fill_up"};

enum class St : uint8_t { Runnable, WaitTg, WaitSg, Done };

struct Fiber {
  void* sp = nullptr;
#if !EMU_ASM_SWITCH
  ucontext_t uc;
#endif
  St st = St::Runnable;
  bool started = false;
  int op = -1;  // what it waits in: -2 threadgroup_barrier, >= 0 simd op
  unsigned line = 0, col = 0;
  ThreadCtx c;
};

struct SimdGroup {
  unsigned live = 0, arrived = 0, at_tg = 0, gen = 0;
  uint32_t arrived_mask = 0, active[2] = {0, 0};
  int op = -1;
  unsigned line = 0, col = 0, first_lane = 0;
  uint32_t epoch = 0;
  alignas(16) unsigned char slots[2][kSimdWidth * kSlotBytes];
};

struct TgAlloc {
  unsigned site;
  size_t off, size, elem;
  const char* name;
};

struct Shadow {  // per byte of threadgroup memory (race mode)
  uint64_t wep, rep;
  const void* wpc;
  const void* rpc;
  uint32_t wsgep, rsgep;
  uint16_t wtid, rtid;
  int16_t rsg;
  uint8_t rmulti;
};

struct BufState {
  emu_buffer* b = nullptr;
  unsigned char* ptr = nullptr;  // what the kernel sees
  void* map = nullptr;           // guarded copy (bounds mode)
  size_t map_len = 0;
  uint8_t* bits[2] = {nullptr, nullptr};  // coverage bitmaps: read, write
  size_t bits_len = 0;
  uint64_t nelem = 0;
};

struct Region {
  uintptr_t lo, hi, glo, ghi;
  int buf;
};

struct Stacks {
  unsigned char* base = nullptr;
  size_t stride = 0;
};
Stacks t_stacks;  // guarded by g_mutex

// Memory outside every buffer that the kernel TU may touch: the runtime's per-thread and
// per-simdgroup state (attributes, simd exchange slots) and the kernel .so's own image
// (program-scope constants). Anything else is a wild access (bounds mode), or at least must
// be mapped with the right protection (other modes): never let the kernel fault.
struct Span {
  uintptr_t lo, hi;
  bool r, w;
};

struct Launch {
  emu_launch* L = nullptr;
  const KernelMeta* meta = nullptr;
  BodyFn body = nullptr;
  uint32_t modes = 0;
  std::vector<BufState> bufs;
  std::vector<void*> ptrs;
  std::vector<Region> regions;
  uintptr_t span_lo = 0, span_hi = 0;
  uintptr_t stk_lo = 0, stk_hi = 0;  // every fiber stack (the kernel's thread-address-space memory)
  std::vector<Span> known;           // other memory the kernel may touch (see Span)
  bool image_added = false;
  bool in_kernel = false;
  // current threadgroup
  uint32_t gpos[3] = {0, 0, 0}, gsize[3] = {0, 0, 0}, dsize[3] = {0, 0, 0}, ngroups[3] = {0, 0, 0};
  unsigned n = 0, ndone = 0;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> sgs;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
#if !EMU_ASM_SWITCH
  ucontext_t sched_uc;
#endif
  unsigned tg_arrived = 0, tg_line = 0, tg_col = 0, tg_first = 0;
  unsigned char* arena = nullptr;
  size_t arena_used = 0, tg_bytes = 0;
  std::vector<TgAlloc> allocs;
  Shadow* shadow = nullptr;
  uint64_t epoch = 1;
  bool failed = false;
  std::string err;
  uint64_t switches = 0;
};
// The launch in progress. Launches of one kernel .so are serialised by g_mutex (a
// plain global, not thread_local: TLS would cost a __tls_get_addr call per access).
Launch* g = nullptr;
std::mutex g_mutex;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string source_line(unsigned line) {
  const KernelMeta* m = g->meta;
  if (!m || line == 0 || line >= m->nlines) return fmt("line %u", line);
  std::string t = m->source_lines[line];
  size_t a = t.find_first_not_of(" \t");
  t = a == std::string::npos ? std::string() : t.substr(a);
  if (t.size() > 160) t = t.substr(0, 157) + "...";
  return fmt("%s:%u: %s", m->source_file, line, t.c_str());
}

// Source location of a code address in the kernel .so (addr2line on the debug info).
std::string describe_pc(const void* pc) {
  if (!pc) return "unknown location";
  Dl_info info;
  if (!dladdr(pc, &info) || !info.dli_fname) return "unknown location";
  uintptr_t off = uintptr_t(pc) - uintptr_t(info.dli_fbase) - 1;
  std::string cmd = fmt("addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname, (unsigned long)off);
  std::string tu = info.dli_fname;
  size_t slash = tu.rfind('/');
  if (slash != std::string::npos) tu = tu.substr(slash + 1);
  if (tu.size() > 3 && tu.compare(tu.size() - 3, 3, ".so") == 0) tu = tu.substr(0, tu.size() - 3) + ".cpp:";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return "unknown location";
  char line[4096];
  std::string first, found;
  while (fgets(line, sizeof line, p)) {
    std::string s(line);
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    size_t d = s.find(" (discriminator");
    if (d != std::string::npos) s = s.substr(0, d);
    if (first.empty()) first = s;
    // The kernel's lines carry `#line` numbers of the generated source; depending on the GCC
    // version the file is reported as the .metal name or as the translation unit (k-*.cpp).
    if (found.empty() && g->meta && (strstr(s.c_str(), g->meta->source_file) || strstr(s.c_str(), tu.c_str())))
      found = s;
  }
  pclose(p);
  std::string use = found.empty() ? first : found;
  size_t colon = use.rfind(':');
  if (!found.empty() && colon != std::string::npos) {
    unsigned ln = unsigned(strtoul(use.c_str() + colon + 1, nullptr, 10));
    return source_line(ln);
  }
  return use.empty() ? "unknown location" : use;
}

std::string thread_desc(const Fiber& f) {
  const ThreadCtx& c = f.c;
  return fmt("thread (%u,%u,%u) [index %u: simdgroup %u, lane %u; thread_position_in_grid (%u,%u,%u)]",
             c.thread_position_in_threadgroup[0], c.thread_position_in_threadgroup[1],
             c.thread_position_in_threadgroup[2], c.thread_index_in_threadgroup,
             c.simdgroup_index_in_threadgroup, c.thread_index_in_simdgroup,
             c.thread_position_in_grid[0], c.thread_position_in_grid[1], c.thread_position_in_grid[2]);
}

std::string header() {
  const KernelMeta* m = g->meta;
  return fmt("[metal_emulator] kernel `%s` (%s), threadgroup (%u,%u,%u) of size (%u,%u,%u): ",
             m->display_name, m->name, g->gpos[0], g->gpos[1], g->gpos[2], g->gsize[0],
             g->gsize[1], g->gsize[2]);
}

void switch_to_scheduler(Fiber* f) {
  ++g->switches;
#if EMU_ASM_SWITCH
  emu_ctx_switch(&f->sp, g->sched_sp);
#else
  swapcontext(&f->uc, &g->sched_uc);
#endif
}

// Record an error for the running fiber and abandon it (never returns).
[[noreturn]] void fail_fiber(const std::string& what) {
  Launch* s = g;
  if (!s->failed) {
    s->failed = true;
    s->err = header() + what;
    if (s->cur) s->err += "\n  by " + thread_desc(*s->cur);
  }
  if (s->cur) {
    Fiber* f = s->cur;
    f->st = St::Done;
    s->in_kernel = false;
    switch_to_scheduler(f);
  }
  fprintf(stderr, "%s\n", s->err.c_str());
  abort();  // unreachable: errors are only raised from fibers
}

// ------------------------------------------------------------------ memory checks ----
void mark(BufState& b, int which, uintptr_t a, size_t n) {
  emu_buffer* eb = b.b;
  uint64_t e0 = (a - uintptr_t(b.ptr)) / eb->itemsize;
  uint64_t e1 = (a + n - 1 - uintptr_t(b.ptr)) / eb->itemsize;
  uint8_t* bits = b.bits[which];
  for (uint64_t e = e0; e <= e1; ++e) {
    uint8_t m = uint8_t(1u << (e & 7));
    if (!(bits[e >> 3] & m)) {
      bits[e >> 3] |= m;
      ++eb->stats[which ? EMU_STAT_WRITE_DISTINCT : EMU_STAT_READ_DISTINCT];
    }
  }
}

[[noreturn]] void fail_oob(BufState& b, uintptr_t a, size_t n, bool w, const void* pc) {
  emu_buffer* eb = b.b;
  long long off = (long long)(a - uintptr_t(b.ptr));
  long long idx = off >= 0 ? off / (long long)eb->itemsize : -((-off + eb->itemsize - 1) / (long long)eb->itemsize);
  fail_fiber(fmt("out-of-bounds %s of buffer `%s` at element %lld (%zu bytes at byte offset %lld; the buffer has %llu elements of %u bytes)\n  at ",
                 w ? "write" : "read", eb->name, idx, n, off, (unsigned long long)b.nelem, eb->itemsize) +
             describe_pc(pc));
}

std::string tid_desc(unsigned t) {
  return fmt("thread %u (simdgroup %u, lane %u)", t, t / kSimdWidth, t % kSimdWidth);
}

[[noreturn]] void fail_race(const TgAlloc& al, size_t off, bool w, const char* prev_kind,
                            const std::string& prev_who, const void* prev_pc, const void* pc) {
  Fiber* f = g->cur;
  size_t rel = off - al.off;
  fail_fiber(fmt("threadgroup memory race on `%s` element %zu (byte %zu): ", al.name, rel / al.elem, rel) +
             tid_desc(f->c.thread_index_in_threadgroup) + (w ? " writes" : " reads") + " at " +
             describe_pc(pc) + "\n  but " + prev_who + " " + prev_kind + " it at " + describe_pc(prev_pc) +
             "\n  with no threadgroup_barrier (or simd operation of a shared simdgroup) in between");
}

void race_check(const TgAlloc& al, size_t off, size_t n, bool w, const void* pc) {
  Launch* s = g;
  Fiber* f = s->cur;
  unsigned t = f->c.thread_index_in_threadgroup, sg = t / kSimdWidth;
  uint32_t sgep = s->sgs[sg].epoch;
  uint64_t E = s->epoch;
  auto ordered = [&](unsigned other, uint32_t other_sgep) {
    return other == t || (other / kSimdWidth == sg && other_sgep < sgep);
  };
  for (size_t o = off; o < off + n; ++o) {
    Shadow& sh = s->shadow[o];
    if (sh.wep == E && !ordered(sh.wtid, sh.wsgep))
      fail_race(al, o, w, "wrote", tid_desc(sh.wtid), sh.wpc, pc);
    if (w) {
      if (sh.rep == E) {
        if (sh.rmulti) {
          if (!(sh.rsg == int(sg) && sh.rsgep < sgep))
            fail_race(al, o, w, "read", "several threads including " + tid_desc(sh.rtid), sh.rpc, pc);
        } else if (!ordered(sh.rtid, sh.rsgep)) {
          fail_race(al, o, w, "read", tid_desc(sh.rtid), sh.rpc, pc);
        }
      }
      sh.wep = E;
      sh.wsgep = sgep;
      sh.wtid = uint16_t(t);
      sh.wpc = pc;
      sh.rep = 0;
    } else if (sh.rep != E) {
      sh.rep = E;
      sh.rtid = uint16_t(t);
      sh.rsgep = sgep;
      sh.rsg = int16_t(sg);
      sh.rmulti = 0;
      sh.rpc = pc;
    } else if (sh.rtid != t || sh.rmulti) {
      sh.rmulti = 1;
      if (sh.rsg != int(sg)) sh.rsg = -1;
      if (sgep > sh.rsgep) sh.rsgep = sgep;
    } else {
      sh.rsgep = sgep;
      sh.rpc = pc;
    }
  }
}

void tg_access(uintptr_t a, size_t n, bool w, const void* pc, bool atomic) {
  Launch* s = g;
  size_t off = a - uintptr_t(s->arena);
  const TgAlloc* al = nullptr;
  for (const TgAlloc& x : s->allocs)
    if (off >= x.off && off + n <= x.off + x.size) {
      al = &x;
      break;
    }
  if (!al) {
    if (s->modes & EMU_MODE_BOUNDS) {
      const TgAlloc* prev = nullptr;
      for (const TgAlloc& x : s->allocs)
        if (x.off <= off) prev = &x;
      std::string near = prev ? fmt(" (%zu bytes past the start of `%s`, which has %zu bytes)", off - prev->off,
                                    prev->name, prev->size)
                              : std::string(" (before the first threadgroup array)");
      fail_fiber(fmt("out-of-bounds %s of threadgroup memory", w ? "write" : "read") + near + "\n  at " +
                 describe_pc(pc));
    }
    return;
  }
  if ((s->modes & EMU_MODE_RACE) && !atomic) race_check(*al, off, n, w, pc);
}

void count(BufState& b, uintptr_t a, size_t n, bool w, bool atomic) {
  Launch* s = g;
  emu_buffer* eb = b.b;
  bool cov = s->modes & EMU_MODE_COVERAGE;
  if (atomic || !w) {
    eb->stats[EMU_STAT_READ_BYTES] += n;
    eb->stats[EMU_STAT_READ_OPS] += 1;
    if (cov) mark(b, 0, a, n);
  }
  if (atomic || w) {
    eb->stats[EMU_STAT_WRITE_BYTES] += n;
    eb->stats[EMU_STAT_WRITE_OPS] += 1;
    if (cov) mark(b, 1, a, n);
  }
}

// Mappings of this process with their protection (/proc/self/maps); empty if unreadable.
std::vector<Span> read_maps() {
  std::vector<Span> out;
  int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  std::string text;
  char buf[8192];
  for (;;) {
    ssize_t k = read(fd, buf, sizeof buf);
    if (k <= 0) break;
    text.append(buf, size_t(k));
  }
  close(fd);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const char* line = text.c_str() + pos;
    char* end = nullptr;
    unsigned long long lo = strtoull(line, &end, 16);
    if (end && *end == '-') {
      unsigned long long hi = strtoull(end + 1, &end, 16);
      if (end && *end == ' ' && end[1] && end[2])
        out.push_back(Span{uintptr_t(lo), uintptr_t(hi), end[1] == 'r', end[2] == 'w'});
    }
    pos = eol + 1;
  }
  return out;
}

// Does [a, a+n) lie in mappings (contiguous, from `maps`) that allow the access? If so, the
// covering ranges are appended to s->known so that the next accesses there stay cheap.
bool mapped_for(Launch* s, const std::vector<Span>& maps, uintptr_t a, size_t n, bool w) {
  uintptr_t p = a, end = a + n;
  size_t first = s->known.size();
  while (p < end) {
    const Span* hit = nullptr;
    for (const Span& m : maps)
      if (p >= m.lo && p < m.hi) {
        hit = &m;
        break;
      }
    if (!hit || !(w ? hit->w : hit->r)) {
      s->known.resize(first);
      return false;
    }
    s->known.push_back(*hit);
    p = hit->hi;
  }
  return true;
}

// Address range of the kernel .so this runtime copy is linked into (its PT_LOAD segments).
struct Image {
  uintptr_t lo = 0, hi = 0;
};
int image_cb(struct dl_phdr_info* info, size_t, void* data) {
  Dl_info self;
  if (!dladdr((void*)&read_maps, &self)) return 1;
  if (uintptr_t(info->dlpi_addr) != uintptr_t(self.dli_fbase)) return 0;
  Image* im = (Image*)data;
  for (int k = 0; k < info->dlpi_phnum; ++k) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[k];
    if (ph.p_type != PT_LOAD) continue;
    uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (!im->lo || lo < im->lo) im->lo = lo;
    if (hi > im->hi) im->hi = hi;
  }
  return 1;
}
Image image_range() {
  static Image im;  // guarded by g_mutex
  static bool done = false;
  if (!done) {
    dl_iterate_phdr(image_cb, &im);
    done = true;
  }
  return im;
}

[[noreturn]] void fail_wild(uintptr_t a, size_t n, bool w, const void* pc, const char* why) {
  // Which buffer the kernel meant is unknown here: give the index relative to each of them.
  Launch* s = g;
  std::string rel;
  unsigned shown = 0;
  for (const BufState& b : s->bufs) {
    const emu_buffer* eb = b.b;
    if (eb->flags & EMU_BUF_AUX) continue;
    if (++shown > 8) {
      rel += ", ...";
      break;
    }
    long long off = (long long)(a - uintptr_t(b.ptr));
    long long idx = off >= 0 ? off / (long long)eb->itemsize : -((-off + eb->itemsize - 1) / (long long)eb->itemsize);
    rel += fmt("%s`%s` element %lld (of %llu)", shown > 1 ? ", " : "", eb->name, idx, (unsigned long long)b.nelem);
  }
  fail_fiber(fmt("out-of-bounds %s of %zu bytes at wild address 0x%llx: %s (an overflowed or garbage index or "
                 "pointer?)\n  as an index into: %s\n  at ",
                 w ? "write" : "read", n, (unsigned long long)a, why, rel.c_str()) +
             describe_pc(pc));
}

// An access outside every buffer, threadgroup memory and the fiber stacks (cold path).
__attribute__((noinline)) void other_access(uintptr_t a, size_t n, bool w, const void* pc) {
  Launch* s = g;
  for (int pass = 0; pass < 2; ++pass) {
    for (const Span& k : s->known)
      if (a >= k.lo && a + n <= k.hi && (w ? k.w : k.r)) return;
    if (pass) break;
    if (s->modes & EMU_MODE_BOUNDS) {
      // Strict: besides buffers, stacks and the runtime's state, only the kernel .so's image.
      if (s->image_added) break;
      s->image_added = true;
      Image im = image_range();
      if (!im.hi) break;
      std::vector<Span> maps = read_maps();
      if (maps.empty()) {  // cannot tell the protection: allow the image as a whole
        s->known.push_back(Span{im.lo, im.hi, true, false});
        continue;
      }
      for (const Span& m : maps)
        if (m.hi > im.lo && m.lo < im.hi && m.r)
          s->known.push_back(Span{std::max(m.lo, im.lo), std::min(m.hi, im.hi), m.r, m.w});
      continue;
    }
    // Unchecked modes: any mapping that allows the access (so the kernel cannot fault).
    std::vector<Span> maps = read_maps();
    if (maps.empty() || mapped_for(s, maps, a, n, w)) return;
    fail_wild(a, n, w, pc, w ? "no writable memory there" : "no readable memory there");
  }
  fail_wild(a, n, w, pc, "outside every buffer, threadgroup memory and the thread's own memory");
}

// Every load/store of the kernel TU and every atomic operation comes here.
inline void on_access(uintptr_t a, size_t n, bool w, const void* pc, bool atomic) {
  Launch* s = g;
  if (!s || !s->in_kernel || n == 0) return;
  if (a >= s->stk_lo && a + n <= s->stk_hi) return;  // thread-local memory (fiber stacks)
  if (a < s->span_hi && a + n > s->span_lo) {
    if (a >= uintptr_t(s->arena) && a < uintptr_t(s->arena) + kArenaSize) return tg_access(a, n, w, pc, atomic);
    // In bounds of some buffer?
    for (const Region& r : s->regions) {
      if (a >= r.lo && a + n <= r.hi) {
        if (s->modes & EMU_MODE_TRAFFIC) count(s->bufs[r.buf], a, n, w, atomic);
        return;
      }
    }
    // Outside every buffer but within the guard zone of one: out of bounds.
    if (s->modes & EMU_MODE_BOUNDS)
      for (const Region& r : s->regions)
        if (a < r.ghi && a + n > r.glo) fail_oob(s->bufs[r.buf], a, n, w, pc);
  }
  const Span& k0 = s->known.front();  // the simd exchange slots: the most frequent other access
  if (a >= k0.lo && a + n <= k0.hi) return;
  other_access(a, n, w, pc);
}

// ------------------------------------------------------------------- scheduling ----
void fiber_main(void* arg);

// One mapping per kernel .so (no guard pages: vm.max_map_count is shared by every loaded
// kernel); overflow is detected with a canary at the bottom of each stack instead, and the
// pages are handed back (MADV_FREE) after each launch so idle kernels hold no memory.
constexpr uint64_t kCanary = 0x5afe57ac6b0770f1ull;
constexpr size_t kCanaryWords = 8;

void init_stacks() {
  if (t_stacks.base) return;
  void* p = mmap(nullptr, kStackSize * kMaxThreads, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "[metal_emulator] cannot map fiber stacks\n");
    abort();
  }
  t_stacks.base = (unsigned char*)p;
  t_stacks.stride = kStackSize;
}

void release_stacks() {
  if (!t_stacks.base) return;
#ifdef MADV_FREE
  if (madvise(t_stacks.base, kStackSize * kMaxThreads, MADV_FREE) == 0) return;
#endif
  madvise(t_stacks.base, kStackSize * kMaxThreads, MADV_DONTNEED);
}

bool stack_intact(unsigned i) {
  const uint64_t* w = (const uint64_t*)(t_stacks.base + i * t_stacks.stride);
  for (size_t k = 0; k < kCanaryWords; ++k)
    if (w[k] != kCanary) return false;
  return true;
}

void start_fiber(Fiber& f, unsigned i) {
  unsigned char* lo = t_stacks.base + i * t_stacks.stride;
  for (size_t k = 0; k < kCanaryWords; ++k) ((uint64_t*)lo)[k] = kCanary;
#if EMU_ASM_SWITCH
  uintptr_t top = (uintptr_t(lo) + kStackSize) & ~uintptr_t(15);
  uint64_t* sp = (uint64_t*)(top - 16 - 64);  // 16-aligned; after `ret`, rsp == top - 16
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*(uint16_t*)&csr[1]));
  csr[1] &= 0xffffu;
  memcpy(&sp[0], csr, 8);
  sp[1] = 0;                          // r15
  sp[2] = 0;                          // r14
  sp[3] = uint64_t(&fiber_main);      // r13: function
  sp[4] = uint64_t(&f);               // r12: argument
  sp[5] = 0;                          // rbx
  sp[6] = 0;                          // rbp
  sp[7] = uint64_t(&emu_fiber_trampoline);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = lo;
  f.uc.uc_stack.ss_size = kStackSize;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, (void (*)())(void (*)(int, int)) [](int hi, int lo32) {
    fiber_main((void*)((uintptr_t(unsigned(hi)) << 32) | uintptr_t(unsigned(lo32))));
  }, 2, int(uintptr_t(&f) >> 32), int(uintptr_t(&f) & 0xffffffffu));
#endif
}

void resume(Fiber& f) {
  g->cur = &f;
  g->in_kernel = true;
  ++g->switches;
#if EMU_ASM_SWITCH
  emu_ctx_switch(&g->sched_sp, f.sp);
#else
  swapcontext(&g->sched_uc, &f.uc);
#endif
  g->in_kernel = false;
  g->cur = nullptr;
}

// Block the running fiber until the scheduler resumes it.
void block(St st, int op, unsigned line, unsigned col) {
  Fiber* f = g->cur;
  f->st = st;
  f->op = op;
  f->line = line;
  f->col = col;
  g->in_kernel = false;
  switch_to_scheduler(f);
  g->in_kernel = true;
}

void complete_simd(SimdGroup& s) {
  unsigned parity = s.gen & 1u;
  s.active[parity] = s.arrived_mask;
  for (unsigned l = 0; l < kSimdWidth; ++l) {
    if (!((s.arrived_mask >> l) & 1u)) continue;
    Fiber& f = g->fibers[(&s - g->sgs.data()) * kSimdWidth + l];
    if (f.st == St::WaitSg) f.st = St::Runnable;
  }
  s.arrived = 0;
  s.arrived_mask = 0;
  s.op = -1;
  ++s.gen;
  ++s.epoch;
}

std::string op_name(int op) {
  if (op == -2) return "threadgroup_barrier";
  if (op >= 0 && op < OP_COUNT) return kOpNames[op];
  return "?";
}

void thread_exit(Fiber* f) {
  Launch* s = g;
  f->st = St::Done;
  ++s->ndone;
  SimdGroup& sg = s->sgs[f->c.simdgroup_index_in_threadgroup];
  --sg.live;
  if (s->tg_arrived > 0)
    fail_fiber(fmt("this thread returned while %u other thread(s) wait in threadgroup_barrier at ", s->tg_arrived) +
               source_line(s->tg_line) + "\n  (every thread of the group must reach each threadgroup_barrier)");
  if (sg.arrived > 0 && sg.arrived == sg.live) complete_simd(sg);
  s->in_kernel = false;
  switch_to_scheduler(f);
  abort();  // a finished fiber is never resumed
}

void fiber_main(void* arg) {
  Fiber* f = (Fiber*)arg;
  g->body(g->ptrs.data(), &f->c);
  thread_exit(f);
}

std::string describe_deadlock() {
  Launch* s = g;
  std::string out = "deadlock: no thread can make progress (divergent barrier or simd operation)";
  // Summarise consecutive threads in the same state at the same place.
  unsigned i = 0;
  while (i < s->n) {
    const Fiber& f = s->fibers[i];
    unsigned j = i + 1;
    while (j < s->n && s->fibers[j].st == f.st && s->fibers[j].op == f.op && s->fibers[j].line == f.line &&
           s->fibers[j].col == f.col)
      ++j;
    std::string what;
    if (f.st == St::Done)
      what = "returned";
    else if (f.st == St::Runnable)
      what = "runnable";
    else
      what = "wait in " + op_name(f.op) + " at " + source_line(f.line);
    out += fmt("\n  threads %u-%u: ", i, j - 1) + what;
    i = j;
  }
  return out;
}

bool run_group(const uint32_t gp[3]) {
  Launch* s = g;
  emu_launch* L = s->L;
  for (int d = 0; d < 3; ++d) {
    s->gpos[d] = gp[d];
    s->gsize[d] = std::min(s->dsize[d], L->grid[d] - gp[d] * s->dsize[d]);
  }
  unsigned n = s->gsize[0] * s->gsize[1] * s->gsize[2];
  unsigned nsg = (n + kSimdWidth - 1) / kSimdWidth;
  unsigned dn = s->dsize[0] * s->dsize[1] * s->dsize[2];
  s->n = n;
  s->ndone = 0;
  s->tg_arrived = 0;
  s->allocs.clear();
  s->arena_used = 0;
  s->tg_bytes = 0;
  ++s->epoch;
  for (unsigned k = 0; k < nsg; ++k) {
    SimdGroup& sg = s->sgs[k];
    sg.live = std::min(kSimdWidth, n - k * kSimdWidth);
    sg.arrived = sg.at_tg = 0;
    sg.arrived_mask = 0;
    sg.op = -1;
    sg.gen = 0;
    sg.epoch = 0;
  }
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = s->fibers[i];
    ThreadCtx& c = f.c;
    uint32_t p[3] = {i % s->gsize[0], (i / s->gsize[0]) % s->gsize[1], i / (s->gsize[0] * s->gsize[1])};
    for (int d = 0; d < 3; ++d) {
      c.thread_position_in_threadgroup[d] = p[d];
      c.threadgroup_position_in_grid[d] = gp[d];
      c.thread_position_in_grid[d] = gp[d] * s->dsize[d] + p[d];
      c.threads_per_threadgroup[d] = s->gsize[d];
      c.dispatch_threads_per_threadgroup[d] = s->dsize[d];
      c.threads_per_grid[d] = L->grid[d];
      c.threadgroups_per_grid[d] = s->ngroups[d];
    }
    c.thread_index_in_threadgroup = i;
    c.thread_index_in_simdgroup = i % kSimdWidth;
    c.simdgroup_index_in_threadgroup = i / kSimdWidth;
    c.simdgroups_per_threadgroup = nsg;
    c.dispatch_simdgroups_per_threadgroup = (dn + kSimdWidth - 1) / kSimdWidth;
    c.thread_index_in_quadgroup = i % 4;
    c.quadgroup_index_in_threadgroup = i / 4;
    c.quadgroups_per_threadgroup = (n + 3) / 4;
    c.dispatch_quadgroups_per_threadgroup = (dn + 3) / 4;
    f.st = St::Runnable;
    f.op = -1;
    f.line = f.col = 0;
    start_fiber(f, i);
  }
  for (;;) {
    bool ran = false;
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = s->fibers[i];
      if (f.st != St::Runnable) continue;
      ran = true;
      resume(f);
      if (s->failed) return false;
    }
    if (s->ndone == n) break;
    if (!ran) {
      s->failed = true;
      s->err = header() + describe_deadlock();
      return false;
    }
  }
  for (unsigned i = 0; i < n; ++i)
    if (!stack_intact(i)) {
      s->failed = true;
      s->err = header() + fmt("thread %u overflowed its %zu KiB emulator stack (huge local arrays?)", i,
                              kStackSize / 1024);
      return false;
    }
  L->threads_run += n;
  L->groups_run += 1;
  return true;
}

// -------------------------------------------------------------------- buffers ----
void* map_bits(size_t len) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

bool setup_buffers(Launch* s) {
  emu_launch* L = s->L;
  s->bufs.resize(L->nbuf);
  s->ptrs.resize(L->nbuf);
  bool copy = s->modes & EMU_MODE_BOUNDS;
  for (uint32_t i = 0; i < L->nbuf; ++i) {
    BufState& b = s->bufs[i];
    emu_buffer* eb = &L->bufs[i];
    b.b = eb;
    for (int k = 0; k < EMU_NSTATS; ++k) eb->stats[k] = 0;
    if (eb->itemsize == 0) eb->itemsize = 1;
    b.nelem = eb->nbytes / eb->itemsize;
    b.ptr = (unsigned char*)eb->ptr;
    uint64_t guard = 0;
    if (copy && !(eb->flags & EMU_BUF_GUARDED)) {
      size_t body = (eb->nbytes + kPage - 1) / kPage * kPage;
      if (body == 0) body = kPage;
      size_t len = kGuard + body + kGuard;
      void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED || mprotect((unsigned char*)m + kGuard, body, PROT_READ | PROT_WRITE) != 0) {
        s->err = fmt("[metal_emulator] cannot map a guarded copy of buffer `%s`", eb->name);
        return false;
      }
      b.map = m;
      b.map_len = len;
      b.ptr = (unsigned char*)m + kGuard;
      if (eb->nbytes && eb->ptr) memcpy(b.ptr, eb->ptr, eb->nbytes);
      guard = kGuard;
    } else if (copy) {
      guard = kGuard;  // the caller made the guards (sparse buffers)
    }
    if ((s->modes & EMU_MODE_TRAFFIC) && (s->modes & EMU_MODE_COVERAGE) && b.nelem) {
      b.bits_len = (b.nelem + 7) / 8;
      for (int k = 0; k < 2; ++k) {
        b.bits[k] = (uint8_t*)map_bits(b.bits_len);
        if (!b.bits[k]) {
          s->err = fmt("[metal_emulator] cannot map coverage bits for `%s`", eb->name);
          return false;
        }
      }
    }
    s->ptrs[i] = b.ptr;
    Region r;
    r.lo = uintptr_t(b.ptr);
    r.hi = r.lo + eb->nbytes;
    r.glo = r.lo - std::min<uint64_t>(guard, r.lo);
    r.ghi = r.hi + guard;
    r.buf = int(i);
    s->regions.push_back(r);
  }
  return true;
}

void teardown_buffers(Launch* s, bool ok) {
  for (BufState& b : s->bufs) {
    if (b.map) {
      if (ok && (b.b->flags & EMU_BUF_OUTPUT) && b.b->nbytes) memcpy(b.b->ptr, b.ptr, b.b->nbytes);
      munmap(b.map, b.map_len);
    }
    for (int k = 0; k < 2; ++k)
      if (b.bits[k]) munmap(b.bits[k], b.bits_len);
  }
}

int finish(Launch* s, int rc) {
  emu_launch* L = s->L;
  if (rc != 0 && L->err && L->errlen) {
    size_t n = std::min<size_t>(s->err.size(), L->errlen - 1);
    memcpy(L->err, s->err.data(), n);
    L->err[n] = 0;
  }
  L->switches = s->switches;
  return rc;
}

}  // namespace

// ------------------------------------------------------------- shim entry points ----
const ThreadCtx* ctx() { return &g->cur->c; }

void threadgroup_barrier(unsigned line, unsigned col) {
  Launch* s = g;
  Fiber* f = s->cur;
  SimdGroup& sg = s->sgs[f->c.simdgroup_index_in_threadgroup];
  if (sg.arrived > 0)
    fail_fiber("lanes of one simdgroup diverged: this lane reached threadgroup_barrier at " + source_line(line) +
               fmt("\n  while lane %u waits in ", sg.first_lane) + op_name(sg.op) + " at " + source_line(sg.line));
  if (s->tg_arrived == 0) {
    s->tg_line = line;
    s->tg_col = col;
    s->tg_first = f->c.thread_index_in_threadgroup;
  } else if (line != s->tg_line || col != s->tg_col) {
    fail_fiber("threadgroup_barrier reached from different call sites: this thread at " + source_line(line) +
               "\n  but " + tid_desc(s->tg_first) + " waits at " + source_line(s->tg_line));
  }
  if (s->ndone > 0)
    fail_fiber(std::string("threadgroup_barrier at ") + source_line(line) +
               fmt(" is reached after %u thread(s) of the group returned\n  (every thread of the group must reach each threadgroup_barrier)",
                   s->ndone));
  ++s->tg_arrived;
  ++sg.at_tg;
  if (s->tg_arrived == s->n) {
    for (unsigned i = 0; i < s->n; ++i)
      if (s->fibers[i].st == St::WaitTg) s->fibers[i].st = St::Runnable;
    for (SimdGroup& x : s->sgs) x.at_tg = 0;
    s->tg_arrived = 0;
    ++s->epoch;
    return;
  }
  block(St::WaitTg, -2, line, col);
}

SimdView simd_sync(int op, unsigned line, unsigned col, const void* value, unsigned size) {
  Launch* s = g;
  Fiber* f = s->cur;
  unsigned lane = f->c.thread_index_in_simdgroup;
  SimdGroup& sg = s->sgs[f->c.simdgroup_index_in_threadgroup];
  if (sg.at_tg > 0)
    fail_fiber("lanes of one simdgroup diverged: this lane reached " + op_name(op) + " at " + source_line(line) +
               "\n  while other lanes of its simdgroup wait in threadgroup_barrier at " + source_line(s->tg_line));
  if (sg.arrived == 0) {
    sg.op = op;
    sg.line = line;
    sg.col = col;
    sg.first_lane = lane;
  } else if (sg.op != op || sg.line != line || sg.col != col) {
    fail_fiber("simd operations reached from different call sites by lanes of one simdgroup: this lane calls " +
               op_name(op) + " at " + source_line(line) + fmt("\n  while lane %u waits in ", sg.first_lane) +
               op_name(sg.op) + " at " + source_line(sg.line));
  }
  unsigned parity = sg.gen & 1u;
  unsigned char* slots = sg.slots[parity];
  if (size) memcpy(slots + lane * kSlotBytes, value, size);
  sg.arrived_mask |= 1u << lane;
  ++sg.arrived;
  if (sg.arrived == sg.live)
    complete_simd(sg);
  else
    block(St::WaitSg, op, line, col);
  return SimdView{slots, sg.active[parity], lane};
}

void* tg_alloc(unsigned site, unsigned long size, unsigned long align, unsigned long elem, const char* name) {
  Launch* s = g;
  for (const TgAlloc& a : s->allocs)
    if (a.site == site) return s->arena + a.off;
  size_t off = (s->arena_used + kTgRedzone + align - 1) / align * align;
  if (s->tg_bytes + size > kTgLimit || off + size + kTgRedzone > kArenaSize)
    fail_fiber(fmt("threadgroup memory exceeds Metal's 32 KiB: `%s` needs %lu bytes after %zu already declared",
                   name, size, s->tg_bytes));
  memset(s->arena + off, 0xff, size);  // poison: NaN for every float type, all ones for ints
  if (s->shadow) memset(s->shadow + off, 0, size * sizeof(Shadow));
  s->allocs.push_back(TgAlloc{site, off, size, elem ? elem : 1, name});
  s->arena_used = off + size;
  s->tg_bytes += size;
  return s->arena + off;
}

void atomic_access(const void* addr, unsigned size, int kind) {
  on_access(uintptr_t(addr), size, kind != 0, __builtin_return_address(0), true);
}

void fail(const char* what) { fail_fiber(what); }

int run(::emu_launch* L, BodyFn body, const KernelMeta* meta) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Launch state;
  Launch* s = &state;
  s->L = L;
  s->meta = meta;
  s->body = body;
  if (!L || L->abi != EMU_ABI_VERSION) {
    if (L && L->err && L->errlen) snprintf(L->err, L->errlen, "[metal_emulator] launch ABI mismatch");
    return 2;
  }
  s->modes = L->modes;
  L->groups_run = L->threads_run = L->switches = 0;
  auto bad = [&](const std::string& m) {
    s->err = m;
    return finish(s, 2);
  };
  if (L->nbuf != meta->nbuf)
    return bad(fmt("[metal_emulator] kernel `%s` takes %u buffers, the launch passes %u", meta->display_name,
                   meta->nbuf, L->nbuf));
  uint64_t tgn = uint64_t(L->tg[0]) * L->tg[1] * L->tg[2];
  unsigned maxt = L->max_threads ? std::min(L->max_threads, kMaxThreads) : kMaxThreads;
  if (tgn > maxt)
    return bad(fmt("Thread group size (%llu) is greater than  the maximum allowed threads per threadgroup (%u).",
                   (unsigned long long)tgn, maxt));
  if (tgn == 0) return bad("[metal_emulator] threadgroup size must be positive");
  for (int d = 0; d < 3; ++d) {
    if (L->grid[d] == 0) return finish(s, 0);  // empty dispatch
    s->dsize[d] = std::min(L->tg[d], L->grid[d]);
    s->ngroups[d] = (L->grid[d] + s->dsize[d] - 1) / s->dsize[d];
  }
  for (uint64_t k = 0; k < L->ngroups; ++k)
    for (int d = 0; d < 3; ++d)
      if (L->groups[3 * k + d] >= s->ngroups[d])
        return bad(fmt("[metal_emulator] kernel `%s`: requested threadgroup (%u,%u,%u) is outside the grid of (%u,%u,%u) threadgroups",
                       meta->display_name, L->groups[3 * k], L->groups[3 * k + 1], L->groups[3 * k + 2],
                       s->ngroups[0], s->ngroups[1], s->ngroups[2]));
  init_stacks();
  s->fibers.resize(kMaxThreads);
  s->sgs.resize(kMaxThreads / kSimdWidth);
  std::vector<unsigned char> arena(kArenaSize);
  s->arena = arena.data();
  std::vector<Shadow> shadow;
  if (s->modes & EMU_MODE_RACE) {
    shadow.resize(kArenaSize);
    s->shadow = shadow.data();
  }
  bool ok = setup_buffers(s);
  if (!ok) {
    teardown_buffers(s, false);
    return finish(s, 2);
  }
  s->span_lo = uintptr_t(s->arena);
  s->span_hi = uintptr_t(s->arena) + kArenaSize;
  for (const Region& r : s->regions) {
    s->span_lo = std::min(s->span_lo, r.glo);
    s->span_hi = std::max(s->span_hi, r.ghi);
  }
  s->stk_lo = uintptr_t(t_stacks.base);
  s->stk_hi = s->stk_lo + kStackSize * kMaxThreads;
  s->known.push_back(Span{uintptr_t(s->sgs.data()), uintptr_t(s->sgs.data() + s->sgs.size()), true, true});
  s->known.push_back(Span{uintptr_t(s->fibers.data()), uintptr_t(s->fibers.data() + s->fibers.size()), true, true});
  Launch* prev = g;
  g = s;
  if (L->ngroups) {
    for (uint64_t k = 0; k < L->ngroups && ok; ++k) ok = run_group(&L->groups[3 * k]);
  } else {
    uint32_t gp[3];
    for (gp[2] = 0; gp[2] < s->ngroups[2] && ok; ++gp[2])
      for (gp[1] = 0; gp[1] < s->ngroups[1] && ok; ++gp[1])
        for (gp[0] = 0; gp[0] < s->ngroups[0] && ok; ++gp[0]) ok = run_group(gp);
  }
  g = prev;
  release_stacks();
  teardown_buffers(s, ok);
  return finish(s, ok ? 0 : 1);
}

}  // namespace rt
}  // namespace emu

// ------------------------------------------- instrumentation callbacks (KASAN ABI) ----
extern "C" {
#define EMU_CB(n)                                                                           \
  EMU_HIDDEN void __asan_load##n##_noabort(uintptr_t a) {                                   \
    emu::rt::on_access(a, n, false, __builtin_return_address(0), false);                    \
  }                                                                                         \
  EMU_HIDDEN void __asan_store##n##_noabort(uintptr_t a) {                                  \
    emu::rt::on_access(a, n, true, __builtin_return_address(0), false);                     \
  }
EMU_CB(1) EMU_CB(2) EMU_CB(4) EMU_CB(8) EMU_CB(16)
#undef EMU_CB
EMU_HIDDEN void __asan_loadN_noabort(uintptr_t a, size_t n) {
  emu::rt::on_access(a, n, false, __builtin_return_address(0), false);
}
EMU_HIDDEN void __asan_storeN_noabort(uintptr_t a, size_t n) {
  emu::rt::on_access(a, n, true, __builtin_return_address(0), false);
}
EMU_HIDDEN void __asan_handle_no_return() {}
}
