// msl_shim.h -- the subset of the Metal Shading Language (MSL) that the metal_emulator
// supports, as C++17 for g++ >= 12 / clang >= 15 on the CPU. Included first in every
// emulated kernel translation unit; the kernel source follows (after the Python-side
// rewrites in _translate.py: `threadgroup` declarations, `[[...]]` attributes, `1.0h`).
//
// Rule: anything outside the subset must FAIL TO COMPILE with a clear message
// (static_assert "metal_emulator: ... is not supported"), never run with other semantics.
// See README.md for the list. Only <stdint.h>, <string.h>, <type_traits> and <limits>
// are included, so no C library math names leak into the global namespace: an
// unqualified `exp`, `abs` or `max` always resolves to metal:: below.
#pragma once
#include <limits>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>

#include "emu_rt.h"

#define EMU_SHIM_VERSION 1
#define EMU_INLINE inline __attribute__((always_inline))

namespace emu {
template <class... T>
constexpr bool always_false = false;
}  // namespace emu

// ------------------------------------------------------------------ scalar types ----
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;  // 64-bit in MSL and on LP64
typedef _Float16 half;
typedef half float16_t;

// bfloat (Metal 3.1) / MLX's bfloat16_t: storage struct, float arithmetic, RNE rounding.
struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  static constexpr bfloat from_bits(uint16_t b) { bfloat r{}; r.bits_ = b; return r; }
  constexpr bfloat(float f) : bits_(round_(f)) {}
  constexpr bfloat(double f) : bits_(round_(float(f))) {}
  bfloat(half h) : bits_(round_(float(h))) {}
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  constexpr bfloat(I i) : bits_(round_(float(i))) {}
  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits_) << 16); }
  static constexpr uint16_t round_(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return uint16_t(u >> 16);
  }
  bfloat& operator+=(float o) { return *this = bfloat(float(*this) + o); }
  bfloat& operator-=(float o) { return *this = bfloat(float(*this) - o); }
  bfloat& operator*=(float o) { return *this = bfloat(float(*this) * o); }
  bfloat& operator/=(float o) { return *this = bfloat(float(*this) / o); }
  bfloat operator-() const { return from_bits(uint16_t(bits_ ^ 0x8000u)); }
  bfloat operator+() const { return *this; }
};
typedef bfloat bfloat16_t;
// bfloat op bfloat -> bfloat; bfloat op float -> float; bfloat op integer -> bfloat.
#define EMU_BF_BINOP(op)                                                                  \
  inline bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); } \
  inline float operator op(bfloat a, float b) { return float(a) op b; }                  \
  inline float operator op(float a, bfloat b) { return a op float(b); }                  \
  inline float operator op(bfloat a, double b) { return float(a) op float(b); }          \
  inline float operator op(double a, bfloat b) { return float(a) op float(b); }          \
  inline float operator op(bfloat a, half b) { return float(a) op float(b); }            \
  inline float operator op(half a, bfloat b) { return float(a) op float(b); }            \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>              \
  inline bfloat operator op(bfloat a, I b) { return bfloat(float(a) op float(b)); }      \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>              \
  inline bfloat operator op(I a, bfloat b) { return bfloat(float(a) op float(b)); }
EMU_BF_BINOP(+) EMU_BF_BINOP(-) EMU_BF_BINOP(*) EMU_BF_BINOP(/)
#undef EMU_BF_BINOP
#define EMU_BF_CMP(op)                                                                   \
  inline bool operator op(bfloat a, bfloat b) { return float(a) op float(b); }          \
  inline bool operator op(bfloat a, float b) { return float(a) op b; }                  \
  inline bool operator op(float a, bfloat b) { return a op float(b); }                  \
  inline bool operator op(bfloat a, double b) { return float(a) op float(b); }          \
  inline bool operator op(double a, bfloat b) { return float(a) op float(b); }          \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>             \
  inline bool operator op(bfloat a, I b) { return float(a) op float(b); }               \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>             \
  inline bool operator op(I a, bfloat b) { return float(a) op float(b); }
EMU_BF_CMP(==) EMU_BF_CMP(!=) EMU_BF_CMP(<) EMU_BF_CMP(>) EMU_BF_CMP(<=) EMU_BF_CMP(>=)
#undef EMU_BF_CMP

namespace emu {
template <class T> struct is_fp : std::is_floating_point<T> {};
template <> struct is_fp<half> : std::true_type {};
template <> struct is_fp<bfloat> : std::true_type {};
template <class T> constexpr bool is_fp_v = is_fp<T>::value;
template <class T> constexpr bool is_scalar_v = std::is_integral<T>::value || is_fp_v<T>;
}  // namespace emu

// ------------------------------------------------------------------ vector types ----
namespace metal {
template <class T, int N> struct vec;
template <class T, int N> struct vec_base;
template <class T> struct alignas(2 * sizeof(T)) vec_base<T, 2> { T x, y; };
template <class T> struct alignas(4 * sizeof(T)) vec_base<T, 3> { T x, y, z; T pad_; };
template <class T> struct alignas(4 * sizeof(T)) vec_base<T, 4> { T x, y, z, w; };

template <class T, int N>
struct vec : vec_base<T, N> {
  static_assert(N >= 2 && N <= 4, "metal_emulator: vectors have 2, 3 or 4 components");
  using value_type = T;
  vec() = default;
  template <class S, std::enable_if_t<emu::is_scalar_v<S>, int> = 0>
  vec(S s) { for (int i = 0; i < N; ++i) (*this)[i] = T(s); }
  template <class A, class B, class... R, std::enable_if_t<sizeof...(R) + 2 == N, int> = 0>
  vec(A a, B b, R... r) {
    T v[N] = {T(a), T(b), T(r)...};
    for (int i = 0; i < N; ++i) (*this)[i] = v[i];
  }
  template <class U>
  explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]); }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
  vec operator-() const { vec r; for (int i = 0; i < N; ++i) r[i] = -(*this)[i]; return r; }
  vec operator+() const { return *this; }
#define EMU_VEC_ASSIGN(op)                                                       \
  vec& operator op##=(const vec& o) {                                            \
    for (int i = 0; i < N; ++i) (*this)[i] = T((*this)[i] op o[i]);              \
    return *this;                                                                \
  }                                                                              \
  template <class S, std::enable_if_t<emu::is_scalar_v<S>, int> = 0>            \
  vec& operator op##=(S s) {                                                     \
    for (int i = 0; i < N; ++i) (*this)[i] = T((*this)[i] op T(s));              \
    return *this;                                                                \
  }
  EMU_VEC_ASSIGN(+) EMU_VEC_ASSIGN(-) EMU_VEC_ASSIGN(*) EMU_VEC_ASSIGN(/)
#undef EMU_VEC_ASSIGN
};
#define EMU_VEC_BINOP(op)                                                                \
  template <class T, int N>                                                              \
  vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) { return a op##= b; }          \
  template <class T, int N, class S, std::enable_if_t<emu::is_scalar_v<S>, int> = 0>   \
  vec<T, N> operator op(vec<T, N> a, S s) { return a op##= s; }                          \
  template <class T, int N, class S, std::enable_if_t<emu::is_scalar_v<S>, int> = 0>   \
  vec<T, N> operator op(S s, const vec<T, N>& b) { return vec<T, N>(s) op##= b; }
EMU_VEC_BINOP(+) EMU_VEC_BINOP(-) EMU_VEC_BINOP(*) EMU_VEC_BINOP(/)
#undef EMU_VEC_BINOP
#define EMU_VEC_CMP(op)                                                           \
  template <class T, int N>                                                       \
  vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {              \
    vec<bool, N> r;                                                               \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                              \
    return r;                                                                     \
  }
EMU_VEC_CMP(==) EMU_VEC_CMP(!=) EMU_VEC_CMP(<) EMU_VEC_CMP(>) EMU_VEC_CMP(<=) EMU_VEC_CMP(>=)
#undef EMU_VEC_CMP
template <int N> bool all(const vec<bool, N>& v) { bool r = true; for (int i = 0; i < N; ++i) r = r && v[i]; return r; }
template <int N> bool any(const vec<bool, N>& v) { bool r = false; for (int i = 0; i < N; ++i) r = r || v[i]; return r; }
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
}  // namespace metal
using metal::vec;

#define EMU_VEC_TYPEDEFS(T, n) \
  typedef metal::vec<T, 2> n##2; typedef metal::vec<T, 3> n##3; typedef metal::vec<T, 4> n##4;
EMU_VEC_TYPEDEFS(bool, bool) EMU_VEC_TYPEDEFS(char, char) EMU_VEC_TYPEDEFS(uchar, uchar)
EMU_VEC_TYPEDEFS(short, short) EMU_VEC_TYPEDEFS(ushort, ushort) EMU_VEC_TYPEDEFS(int, int)
EMU_VEC_TYPEDEFS(uint, uint) EMU_VEC_TYPEDEFS(long, long) EMU_VEC_TYPEDEFS(ulong, ulong)
EMU_VEC_TYPEDEFS(half, half) EMU_VEC_TYPEDEFS(float, float) EMU_VEC_TYPEDEFS(bfloat, bfloat)
#undef EMU_VEC_TYPEDEFS

namespace emu {
template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<metal::vec<T, N>> : std::true_type {};
}  // namespace emu

// ------------------------------------------------------------------------ math ----
// float via GCC builtins (correctly rounded libm, NOT the GPU's ulp behaviour);
// half and bfloat compute in float and round the result, as MLX's bf16_math.h does.
namespace metal {
#define EMU_MATH1(name, fn)                                                       \
  inline float name(float x) { return fn(x); }                                  \
  inline half name(half x) { return half(fn(float(x))); }                       \
  inline bfloat name(bfloat x) { return bfloat(fn(float(x))); }                 \
  template <class T, int N> vec<T, N> name(const vec<T, N>& v) {                \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = name(v[i]); return r;       \
  }
#define EMU_MATH2(name, fn)                                                       \
  inline float name(float x, float y) { return fn(x, y); }                      \
  inline half name(half x, half y) { return half(fn(float(x), float(y))); }     \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(fn(float(x), float(y))); } \
  template <class T, int N> vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = name(a[i], b[i]); return r; \
  }
inline float emu_rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float emu_exp10(float x) { return __builtin_powf(10.0f, x); }
inline float emu_fract(float x) { return __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f); }
inline float emu_sign(float x) {
  return x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : __builtin_isnan(x) ? 0.0f : x;
}
inline float emu_saturate(float x) { return __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f); }
#define EMU_MATH_ALL                                                                       \
  EMU_MATH1(exp, __builtin_expf) EMU_MATH1(exp2, __builtin_exp2f) EMU_MATH1(exp10, emu_exp10) \
  EMU_MATH1(log, __builtin_logf) EMU_MATH1(log2, __builtin_log2f)                          \
  EMU_MATH1(log10, __builtin_log10f) EMU_MATH1(sqrt, __builtin_sqrtf)                      \
  EMU_MATH1(rsqrt, emu_rsqrt) EMU_MATH1(sin, __builtin_sinf) EMU_MATH1(cos, __builtin_cosf) \
  EMU_MATH1(tan, __builtin_tanf) EMU_MATH1(asin, __builtin_asinf)                          \
  EMU_MATH1(acos, __builtin_acosf) EMU_MATH1(atan, __builtin_atanf)                        \
  EMU_MATH1(sinh, __builtin_sinhf) EMU_MATH1(cosh, __builtin_coshf)                        \
  EMU_MATH1(tanh, __builtin_tanhf) EMU_MATH1(asinh, __builtin_asinhf)                      \
  EMU_MATH1(acosh, __builtin_acoshf) EMU_MATH1(atanh, __builtin_atanhf)                    \
  EMU_MATH1(floor, __builtin_floorf) EMU_MATH1(ceil, __builtin_ceilf)                      \
  EMU_MATH1(round, __builtin_roundf) EMU_MATH1(rint, __builtin_rintf)                      \
  EMU_MATH1(trunc, __builtin_truncf) EMU_MATH1(fabs, __builtin_fabsf)                      \
  EMU_MATH1(fract, emu_fract) EMU_MATH1(sign, emu_sign) EMU_MATH1(saturate, emu_saturate)  \
  EMU_MATH2(pow, __builtin_powf) EMU_MATH2(powr, __builtin_powf)                           \
  EMU_MATH2(atan2, __builtin_atan2f) EMU_MATH2(fmod, __builtin_fmodf)                      \
  EMU_MATH2(fmax, __builtin_fmaxf) EMU_MATH2(fmin, __builtin_fminf)                        \
  EMU_MATH2(copysign, __builtin_copysignf) EMU_MATH2(fdim, __builtin_fdimf)
EMU_MATH_ALL
// fast:: and precise:: variants: same results here (fast-math ulps are NOT modelled).
namespace fast { EMU_MATH_ALL }
namespace precise { EMU_MATH_ALL }

// abs / max / min / clamp for floating (fmax semantics: a NaN operand yields the other)
// and integer scalars and vectors.
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half(__builtin_fabsf(float(x))); }
inline bfloat abs(bfloat x) { return bfloat::from_bits(uint16_t(x.bits_ & 0x7fffu)); }
template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
inline I abs(I x) { return x < 0 ? I(-x) : x; }
EMU_MATH2(max, __builtin_fmaxf)
EMU_MATH2(min, __builtin_fminf)
template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
inline I max(I a, I b) { return a > b ? a : b; }
template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
inline I min(I a, I b) { return a < b ? a : b; }
template <class T, int N> vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = abs(v[i]); return r;
}
namespace fast {
using metal::abs; using metal::max; using metal::min;
}
namespace precise {
using metal::abs; using metal::max; using metal::min;
}
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, int N> vec<T, N> clamp(const vec<T, N>& x, T lo, T hi) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = clamp(x[i], lo, hi); return r;
}
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T> inline T mad(T a, T b, T c) { return fma(a, b, c); }
template <class T> inline T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T> inline T step(T edge, T x) { return x < edge ? T(0) : T(1); }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i]; return r;
}
template <class T, int N> T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T r = T(0); for (int i = 0; i < N; ++i) r += a[i] * b[i]; return r;
}
#define EMU_CLASSIFY(name, fn)                                                 \
  inline bool name(float x) { return fn(x); }                                 \
  inline bool name(half x) { return fn(float(x)); }                           \
  inline bool name(bfloat x) { return fn(float(x)); }                         \
  template <class T, int N> vec<bool, N> name(const vec<T, N>& v) {           \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r[i] = name(v[i]); return r;  \
  }
EMU_CLASSIFY(isnan, __builtin_isnan) EMU_CLASSIFY(isinf, __builtin_isinf)
EMU_CLASSIFY(isfinite, __builtin_isfinite) EMU_CLASSIFY(signbit, __builtin_signbit)
#undef EMU_CLASSIFY
#undef EMU_MATH_ALL
#undef EMU_MATH1
#undef EMU_MATH2

template <class To, class From>
EMU_INLINE To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "metal_emulator: as_type needs types of equal size");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

// numeric_limits
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static half max() { return half(65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half lowest() { return half(-65504.0f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(__builtin_inff()); }
  static half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
};

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
}  // namespace metal
using metal::mem_flags;

// Metal's float constants (macros in metal_math too; replacing any the C library defined).
#undef INFINITY
#undef NAN
#undef HUGE_VALF
#undef MAXFLOAT
#undef FLT_MAX
#undef FLT_MIN
#undef FLT_EPSILON
#define INFINITY (metal::numeric_limits<float>::infinity())
#define NAN (metal::numeric_limits<float>::quiet_NaN())
#define HUGE_VALF INFINITY
#define MAXFLOAT (metal::numeric_limits<float>::max())
#define FLT_MAX MAXFLOAT
#define FLT_MIN (metal::numeric_limits<float>::min())
#define FLT_EPSILON (metal::numeric_limits<float>::epsilon())

// ----------------------------------------------------------------- barriers ----
// Call sites are identified by __builtin_LINE (and __builtin_COLUMN where the compiler has it).
#if defined(__has_builtin)
#if __has_builtin(__builtin_COLUMN)
#define EMU_COLUMN __builtin_COLUMN()
#endif
#endif
#ifndef EMU_COLUMN
#define EMU_COLUMN 0u
#endif
EMU_INLINE void threadgroup_barrier(mem_flags, unsigned line_ = __builtin_LINE(), unsigned col_ = EMU_COLUMN) {
  emu::rt::threadgroup_barrier(line_, col_);
}
EMU_INLINE void simdgroup_barrier(mem_flags, unsigned line_ = __builtin_LINE(), unsigned col_ = EMU_COLUMN) {
  emu::rt::simd_sync(emu::rt::OP_SIMDGROUP_BARRIER, line_, col_, nullptr, 0);
}

// ----------------------------------------------------------------- simd ops ----
// Every simd_* call is a convergence point of the active lanes of the simdgroup: each
// lane publishes its value, waits until all active lanes arrived at the SAME call site
// (else: error), then combines. Lanes of a partial simdgroup that do not exist and
// lanes that returned are inactive: reductions skip them, reading one (shuffle,
// broadcast) yields the poison pattern (all bits set: NaN for floats).
namespace emu {
template <class T> EMU_INLINE T lane_value(const rt::SimdView& x, unsigned lane) {
  T t;
  memcpy(&t, x.slots + lane * rt::kSlotBytes, sizeof(T));
  return t;
}
template <class T> EMU_INLINE T poison() {
  T t;
  memset(&t, 0xff, sizeof(T));
  return t;
}
template <class T> EMU_INLINE T lane_or_poison(const rt::SimdView& x, unsigned lane) {
  return lane < rt::kSimdWidth && ((x.active >> lane) & 1u) ? lane_value<T>(x, lane) : poison<T>();
}
template <class T> EMU_INLINE rt::SimdView publish(int op, const T& v, unsigned line, unsigned col) {
  static_assert(sizeof(T) <= rt::kSlotBytes, "metal_emulator: simd operand too large");
  static_assert(std::is_trivially_copyable<T>::value, "metal_emulator: simd operand must be trivially copyable");
  return rt::simd_sync(op, line, col, &v, sizeof(T));
}
template <class T> struct simd_type_ok {
  static constexpr bool value = is_scalar_v<T> || is_vec<T>::value;
};
template <class T> EMU_INLINE T op_max(T a, T b) { return metal::max(a, b); }
template <class T> EMU_INLINE T op_min(T a, T b) { return metal::min(a, b); }
template <class T, int N> EMU_INLINE metal::vec<T, N> op_max(metal::vec<T, N> a, metal::vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = metal::max(a[i], b[i]);
  return a;
}
template <class T, int N> EMU_INLINE metal::vec<T, N> op_min(metal::vec<T, N> a, metal::vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = metal::min(a[i], b[i]);
  return a;
}
}  // namespace emu

#define EMU_SITE unsigned line_ = __builtin_LINE(), unsigned col_ = EMU_COLUMN
#define EMU_CHECK_T(T) static_assert(emu::simd_type_ok<T>::value, "metal_emulator: unsupported simd operand type")

// Reductions over the active lanes, in lane order.
#define EMU_SIMD_REDUCE(fname, OP, init, combine)                                      \
  template <class T> T fname(T v, EMU_SITE) {                                          \
    EMU_CHECK_T(T);                                                                    \
    auto x = emu::publish(emu::rt::OP, v, line_, col_);                                \
    bool first = true; T acc = v;                                                      \
    for (unsigned i = 0; i < emu::rt::kSimdWidth; ++i) {                               \
      if (!((x.active >> i) & 1u)) continue;                                           \
      T o = emu::lane_value<T>(x, i);                                                  \
      if (first) { acc = o; first = false; } else { acc = combine; }                   \
    }                                                                                  \
    return acc;                                                                        \
  }
EMU_SIMD_REDUCE(simd_sum, OP_SUM, 0, T(acc + o))
EMU_SIMD_REDUCE(simd_product, OP_PRODUCT, 1, T(acc * o))
EMU_SIMD_REDUCE(simd_max, OP_MAX, 0, emu::op_max(acc, o))
EMU_SIMD_REDUCE(simd_min, OP_MIN, 0, emu::op_min(acc, o))
EMU_SIMD_REDUCE(simd_and, OP_AND, 0, T(acc & o))
EMU_SIMD_REDUCE(simd_or, OP_OR, 0, T(acc | o))
EMU_SIMD_REDUCE(simd_xor, OP_XOR, 0, T(acc ^ o))
#undef EMU_SIMD_REDUCE

#define EMU_SIMD_PREFIX(fname, OP, inclusive, one, combine)                            \
  template <class T> T fname(T v, EMU_SITE) {                                          \
    EMU_CHECK_T(T);                                                                    \
    auto x = emu::publish(emu::rt::OP, v, line_, col_);                                \
    T acc = T(one);                                                                    \
    unsigned end = x.lane + (inclusive ? 1u : 0u);                                     \
    for (unsigned i = 0; i < end; ++i)                                                 \
      if ((x.active >> i) & 1u) { T o = emu::lane_value<T>(x, i); acc = combine; }     \
    return acc;                                                                        \
  }
EMU_SIMD_PREFIX(simd_prefix_inclusive_sum, OP_PREFIX_INCLUSIVE_SUM, true, 0, T(acc + o))
EMU_SIMD_PREFIX(simd_prefix_exclusive_sum, OP_PREFIX_EXCLUSIVE_SUM, false, 0, T(acc + o))
EMU_SIMD_PREFIX(simd_prefix_inclusive_product, OP_PREFIX_INCLUSIVE_PRODUCT, true, 1, T(acc * o))
EMU_SIMD_PREFIX(simd_prefix_exclusive_product, OP_PREFIX_EXCLUSIVE_PRODUCT, false, 1, T(acc * o))
#undef EMU_SIMD_PREFIX

template <class T> T simd_shuffle(T v, ushort src, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE, v, line_, col_);
  return emu::lane_or_poison<T>(x, src);
}
template <class T> T simd_broadcast(T v, ushort src, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_BROADCAST, v, line_, col_);
  return emu::lane_or_poison<T>(x, src);
}
template <class T> T simd_shuffle_xor(T v, ushort mask, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_XOR, v, line_, col_);
  return emu::lane_or_poison<T>(x, x.lane ^ mask);
}
// The upper `delta` lanes keep their own value (MSL spec).
template <class T> T simd_shuffle_down(T v, ushort delta, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_DOWN, v, line_, col_);
  unsigned src = x.lane + delta;
  return src >= emu::rt::kSimdWidth ? v : emu::lane_or_poison<T>(x, src);
}
// The lower `delta` lanes keep their own value.
template <class T> T simd_shuffle_up(T v, ushort delta, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_UP, v, line_, col_);
  return delta > x.lane ? v : emu::lane_or_poison<T>(x, x.lane - delta);
}
template <class T> T simd_shuffle_rotate_down(T v, ushort delta, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_ROTATE_DOWN, v, line_, col_);
  return emu::lane_or_poison<T>(x, (x.lane + delta) % emu::rt::kSimdWidth);
}
template <class T> T simd_shuffle_rotate_up(T v, ushort delta, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_ROTATE_UP, v, line_, col_);
  return emu::lane_or_poison<T>(x, (x.lane + emu::rt::kSimdWidth - delta % emu::rt::kSimdWidth) % emu::rt::kSimdWidth);
}
namespace emu {
template <class T> struct FillPair { T data, fill; };
}
template <class T> T simd_shuffle_and_fill_down(T v, T fill, ushort delta, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_AND_FILL_DOWN, emu::FillPair<T>{v, fill}, line_, col_);
  unsigned src = x.lane + delta;
  auto p = src < emu::rt::kSimdWidth ? emu::lane_or_poison<emu::FillPair<T>>(x, src)
                                     : emu::lane_or_poison<emu::FillPair<T>>(x, src - emu::rt::kSimdWidth);
  return src < emu::rt::kSimdWidth ? p.data : p.fill;
}
template <class T> T simd_shuffle_and_fill_up(T v, T fill, ushort delta, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_SHUFFLE_AND_FILL_UP, emu::FillPair<T>{v, fill}, line_, col_);
  if (delta <= x.lane) return emu::lane_or_poison<emu::FillPair<T>>(x, x.lane - delta).data;
  return emu::lane_or_poison<emu::FillPair<T>>(x, x.lane + emu::rt::kSimdWidth - delta).fill;
}
template <class T> T simd_broadcast_first(T v, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_BROADCAST_FIRST, v, line_, col_);
  return emu::lane_value<T>(x, __builtin_ctz(x.active));
}
inline bool simd_all(bool b, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_ALL, b, line_, col_);
  for (unsigned i = 0; i < emu::rt::kSimdWidth; ++i)
    if (((x.active >> i) & 1u) && !emu::lane_value<bool>(x, i)) return false;
  return true;
}
inline bool simd_any(bool b, EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_ANY, b, line_, col_);
  for (unsigned i = 0; i < emu::rt::kSimdWidth; ++i)
    if (((x.active >> i) & 1u) && emu::lane_value<bool>(x, i)) return true;
  return false;
}
inline bool simd_is_first(EMU_SITE) {
  auto x = emu::publish(emu::rt::OP_IS_FIRST, true, line_, col_);
  return x.lane == unsigned(__builtin_ctz(x.active));
}
#undef EMU_SITE
#undef EMU_CHECK_T
namespace metal {  // MSL declares these in namespace metal
using ::simd_all; using ::simd_and; using ::simd_any; using ::simd_broadcast; using ::simd_broadcast_first;
using ::simd_is_first; using ::simd_max; using ::simd_min; using ::simd_or; using ::simd_prefix_exclusive_product;
using ::simd_prefix_exclusive_sum; using ::simd_prefix_inclusive_product; using ::simd_prefix_inclusive_sum;
using ::simd_product; using ::simd_shuffle; using ::simd_shuffle_and_fill_down; using ::simd_shuffle_and_fill_up;
using ::simd_shuffle_down; using ::simd_shuffle_rotate_down; using ::simd_shuffle_rotate_up; using ::simd_shuffle_up;
using ::simd_shuffle_xor; using ::simd_sum; using ::simd_xor; using ::threadgroup_barrier; using ::simdgroup_barrier;
}  // namespace metal

// ------------------------------------------------------------------- atomics ----
// One GPU thread runs at a time, so atomics are plain read-modify-writes; they are
// bounds-checked and counted, and never reported as races.
namespace metal {
enum memory_order { memory_order_relaxed = 0, memory_order_acquire, memory_order_release,
                    memory_order_acq_rel, memory_order_seq_cst };
enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
template <class T> struct atomic {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "metal_emulator: atomic<T> needs a 32/64-bit T");
  T value_;
};
}  // namespace metal
using metal::memory_order;
using metal::memory_order_relaxed;
typedef metal::atomic<int> atomic_int;
typedef metal::atomic<uint> atomic_uint;
typedef metal::atomic<float> atomic_float;
namespace metal {
template <class T> EMU_NOSAN T atomic_load_explicit(const atomic<T>* a, memory_order) {
  emu::rt::atomic_access(a, sizeof(T), 0);
  return a->value_;
}
template <class T, class U> EMU_NOSAN void atomic_store_explicit(atomic<T>* a, U v, memory_order) {
  emu::rt::atomic_access(a, sizeof(T), 1);
  a->value_ = T(v);
}
#define EMU_ATOMIC_RMW(name, expr)                                            \
  template <class T, class U> EMU_NOSAN T name(atomic<T>* a, U v_, memory_order) { \
    emu::rt::atomic_access(a, sizeof(T), 2);                                  \
    T old = a->value_, v = T(v_);                                             \
    a->value_ = (expr);                                                       \
    return old;                                                               \
  }
EMU_ATOMIC_RMW(atomic_fetch_add_explicit, T(old + v))
EMU_ATOMIC_RMW(atomic_fetch_sub_explicit, T(old - v))
EMU_ATOMIC_RMW(atomic_fetch_max_explicit, old > v ? old : v)
EMU_ATOMIC_RMW(atomic_fetch_min_explicit, old < v ? old : v)
EMU_ATOMIC_RMW(atomic_fetch_and_explicit, T(old & v))
EMU_ATOMIC_RMW(atomic_fetch_or_explicit, T(old | v))
EMU_ATOMIC_RMW(atomic_fetch_xor_explicit, T(old ^ v))
EMU_ATOMIC_RMW(atomic_exchange_explicit, v)
#undef EMU_ATOMIC_RMW
template <class T, class U>
EMU_NOSAN bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired,
                                                     memory_order, memory_order) {
  emu::rt::atomic_access(a, sizeof(T), 2);
  if (a->value_ == *expected) { a->value_ = T(desired); return true; }
  *expected = a->value_;
  return false;
}
}  // namespace metal

// ------------------------------------------------------- threadgroup memory ----
// _translate.py rewrites `threadgroup T name[N];` into
// `auto& name = ::emu::tg_alloc<T[N]>(site, "name");`: storage shared by the threads
// of the CURRENT threadgroup, fresh for each threadgroup, filled with 0xFF bytes
// (NaN for every float type, -1 / all-ones for integers) until written.
namespace emu {
template <class T> EMU_INLINE T& tg_alloc(unsigned site, const char* name) {
  static_assert(std::is_trivially_destructible<T>::value, "metal_emulator: threadgroup type must be trivial");
  return *static_cast<T*>(rt::tg_alloc(site, sizeof(T), alignof(T) < 16 ? 16 : alignof(T),
                                       sizeof(std::remove_all_extents_t<T>), name));
}
}  // namespace emu

// ------------------------------------------------- unsupported MSL features ----
#define EMU_UNSUPPORTED(fname)                                                                   \
  template <class... A> void fname(A&&...) {                                                     \
    static_assert(emu::always_false<A...>, "metal_emulator: " #fname " is not supported (README.md)"); \
  }
EMU_UNSUPPORTED(simd_ballot) EMU_UNSUPPORTED(simd_active_threads_mask) EMU_UNSUPPORTED(quad_sum)
EMU_UNSUPPORTED(quad_max) EMU_UNSUPPORTED(quad_min) EMU_UNSUPPORTED(quad_shuffle)
EMU_UNSUPPORTED(quad_shuffle_xor) EMU_UNSUPPORTED(quad_shuffle_down) EMU_UNSUPPORTED(quad_shuffle_up)
EMU_UNSUPPORTED(quad_broadcast) EMU_UNSUPPORTED(quad_ballot) EMU_UNSUPPORTED(simdgroup_load)
EMU_UNSUPPORTED(simdgroup_store) EMU_UNSUPPORTED(simdgroup_multiply_accumulate)
EMU_UNSUPPORTED(atomic_thread_fence) EMU_UNSUPPORTED(threadgroup_imageblock)
#undef EMU_UNSUPPORTED

using namespace metal;

// ------------------------------------------------ what MLX's utils.h provides ----
#include "mlx_utils_subset.h"

// ----------------------------------------- MSL keywords (after every include) ----
#define device
#define constant
#define thread
#define threadgroup
#define ray_data
#define object_data
#define METAL_FUNC inline
#define MTL_CONST
// Metal has no double: any use fails to compile with this name in the message.
#define double metal_emulator_error__double_is_not_supported_in_Metal
