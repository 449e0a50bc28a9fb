// kl_common.h: helpers shared by every kl_metal kernel, passed to mx.fast.metal_kernel as `header=`.
//
// One source of truth for the per-element math and its special cases (the same rules as
// kl_metal/fallback.py, bit for bit in the special cases):
//   term(x, t) = exp(t) * (t - x)        in float32, precise exp;
//     t == -inf            -> 0 (a zero-probability target contributes nothing, 0 * log 0 = 0),
//                             except that a NaN input stays NaN;
//     x == -inf, t finite  -> +inf;  NaN in x or t -> NaN (never a silent 0).
//   d/dx = -exp(t) * g,  d/dt = exp(t) * (t - x + 1) * g,  both exactly 0 where t == -inf.
//   Rows whose cotangent g is 0 are handled by the kernels themselves (they skip the loads).
//
// MLX prepends its utils.h (bfloat16_t, `using namespace metal;`) before this header.
// Only scalar loads, float accumulation and simd shuffles are used: no atomics, no vector types,
// no threadgroup pointers (threadgroup arrays live in the kernel bodies that own them).

// Apple GPUs execute 32 threads per simdgroup.
constant constexpr uint KL_SIMD_SIZE = 32;

// t == -inf: a target of probability zero.
inline bool kl_zero_probability(float t) {
  return metal::isinf(t) && t < 0.0f;
}

// One KL term in float32; see the conventions above.
inline float kl_term(float x, float t) {
  if (kl_zero_probability(t)) {
    return metal::isnan(x) ? x : 0.0f;
  }
  return metal::precise::exp(t) * (t - x);
}

// d loss / d inputs for one element with per-row cotangent g (g != 0 here).
inline float kl_grad_inputs_value(float t, float g) {
  return kl_zero_probability(t) ? 0.0f : -(metal::precise::exp(t) * g);
}

// d loss / d targets for one element with per-row cotangent g (g != 0 here).
inline float kl_grad_targets_value(float x, float t, float g) {
  return kl_zero_probability(t) ? 0.0f : metal::precise::exp(t) * (t - x + 1.0f) * g;
}

// Sum over WIDTH consecutive lanes (WIDTH a power of two <= 32, the segment aligned to WIDTH lanes).
// A butterfly of xor shuffles: every lane reads only lanes of its own segment, so a segment that is
// complete works in a partial simdgroup too, and a + b == b + a makes every lane's result identical.
template <int WIDTH>
inline float kl_segment_sum(float value) {
  for (ushort offset = WIDTH / 2; offset > 0; offset /= 2) {
    value += simd_shuffle_xor(value, offset);
  }
  return value;
}

// The loss written for a row: weight 0 gives exactly 0 (the row was not read), else weight * sum.
template <bool WEIGHTED>
inline float kl_weighted(float weight, float sum) {
  if (!WEIGHTED) {
    return sum;
  }
  return weight == 0.0f ? 0.0f : weight * sum;
}
