// mlx_utils_subset.h -- the part of MLX's Metal `utils.h` (which MLX prepends to every
// metal_kernel source at compile time) that kernels of this project may use, written
// for the emulator (no copy of MLX's text). Semantics follow
// mlx/backend/metal/kernels/{utils.h,bf16.h,defines.h} of mlx 0.32.
// Anything of utils.h not listed here fails to compile (undeclared name).
#pragma once

// --- defines.h
static constexpr int MAX_REDUCE_SPECIALIZED_DIMS = 4;
static constexpr int REDUCE_N_READS = 4;
static constexpr int REDUCE_N_WRITES = 4;
static constexpr int SOFTMAX_N_READS = 4;
static constexpr int RMS_N_READS = 4;
static constexpr int RMS_LOOPED_LIMIT = 4096;
static constexpr int CROSS_ENTROPY_N_READS = 4;
#define MLX_MTL_PRAGMA_UNROLL

// --- bf16.h
inline uint16_t bfloat16_to_uint16(const bfloat16_t x) { return x.bits_; }
inline bfloat16_t uint16_to_bfloat16(const uint16_t x) { return bfloat16_t::from_bits(x); }

// --- utils.h
template <typename U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

// Limits<T>: max/min are +-inf for floating types, the integer range otherwise.
template <typename U, bool F = emu::is_fp_v<U>>
struct Limits {
  static constexpr U max = std::numeric_limits<U>::max();
  static constexpr U min = std::numeric_limits<U>::min();
  static constexpr U finite_max = std::numeric_limits<U>::max();
  static constexpr U finite_min = std::numeric_limits<U>::min();
};
template <>
struct Limits<float, true> {
  static constexpr float max = __builtin_inff();
  static constexpr float min = -__builtin_inff();
  static constexpr float finite_max = 3.40282346638528859812e+38f;
  static constexpr float finite_min = -3.40282346638528859812e+38f;
};
template <>
struct Limits<half, true> {
  static constexpr half max = half(__builtin_inff());
  static constexpr half min = half(-__builtin_inff());
  static constexpr half finite_max = half(65504.0f);
  static constexpr half finite_min = half(-65504.0f);
};
template <>
struct Limits<bfloat16_t, true> {
  static constexpr bfloat16_t max = bfloat16_t::from_bits(0x7f80);
  static constexpr bfloat16_t min = bfloat16_t::from_bits(0xff80);
  static constexpr bfloat16_t finite_max = bfloat16_t::from_bits(0x7f7f);
  static constexpr bfloat16_t finite_min = bfloat16_t::from_bits(0xff7f);
};
template <>
struct Limits<bool, false> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc_1(uint elem, const int64_t& stride) {
  return elem * IdxT(stride);
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc_2(uint2 elem, const int64_t strides[2]) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc_3(uint3 elem, const int64_t strides[3]) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}

template <typename T, typename U>
inline T ceildiv(T N, U M) {
  return (N + M - 1) / M;
}

inline float log1p(float x) {
  float xp1 = 1.0f + x;
  if (xp1 == Limits<float>::max) return Limits<float>::max;
  if (xp1 == 1.0f) return x;
  return x * (metal::log(xp1) / (xp1 - 1.0f));
}
inline bfloat16_t log1p(bfloat16_t x) { return bfloat16_t(log1p(float(x))); }

template <bool condition, typename T, typename U>
struct ConditionalType {
  using type = U;
};
template <typename T, typename U>
struct ConditionalType<true, T, U> {
  using type = T;
};

template <typename U, typename T>
inline U cast_to(T val) {
  return static_cast<U>(val);
}
