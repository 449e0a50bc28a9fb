// kl_logits.metal: KL(softmax(teacher / T) || softmax(student / T)) per row, straight from logits.
//
// Launched by kl_metal/logits.py (`_Fused.forward`, `_Fused.grad_student`, `_Fused.grad_teacher`;
// launch shapes from `plan_forward` / `plan_gradient`). Everything above the first "---- kernel:" line
// is a logits-only header section: logits.py passes `kl_common.h` followed by it as `header=`. Each
// section below, from its "---- kernel:" line to the next, is the body of one mx.fast.metal_kernel.
//
// Notation (all float32): a = student * inv_temperature, b = teacher * inv_temperature (one rounding
// each), lse_s = log sum exp(a), lse_t = log sum exp(b), p = exp(b - lse_t) (teacher), q = exp(a - lse_s)
// (student), kl = sum p (log p - log q).
//
// Inputs: student (S), teacher (T) rows of D logits (last axis, row-contiguous), w (float32 per-row
// weight, or a 1-element placeholder that is never read when WEIGHTED is false), inv_temperature (a
// float scalar, so a new temperature never recompiles). Template arguments: S, T (element types:
// float, float16_t, bfloat16_t), D (row length), N_READS (consecutive elements per thread per step),
// WEIGHTED.
//
// Conventions (the same as kl_metal/logits.py's composed-op fallback, which is the reference):
//   b == -inf (teacher probability 0): the element contributes 0 to kl and gets 0 gradients, whatever
//     the student holds there (a masked vocabulary entry is -inf in both).
//   a == -inf where b is finite: kl = +inf (the true KL); the student gradient stays finite.
//   teacher row all -inf (no distribution): kl = 0 (NaN if the student row holds a NaN), zero gradients.
//   student row all -inf, teacher not: kl = +inf.
//   NaN anywhere in a row: NaN kl (a NaN never becomes a silent 0); +inf logits give NaN.
//   kl is clamped at 0 from below (rounding can make a tiny KL negative; NaN stays NaN).
//
// Saved per row for the backward (`stats`, 3 floats): lse_s, lse_t and the unweighted kl, so the
// backward kernels are elementwise and read each logit once.
//   d kl / d student = (q - p) * inv_temperature
//   d kl / d teacher = p * ((b - lse_t) - (a - lse_s) - kl) * inv_temperature
// (the second is p * (d - E[d]) / T with d = (teacher - student) / T and E the expectation under p:
// E[d] = kl + lse_t - lse_s, so d - E[d] = log p - log q - kl).

// +inf and NaN as constants (MLX's utils.h spells infinity the same way).
constant constexpr float KL_INF = metal::numeric_limits<float>::infinity();
constant constexpr float KL_NAN = metal::numeric_limits<float>::quiet_NaN();

// One thread's running state over the elements it has read: the maxima of a and b seen so far and, relative
// to them, sum_s = sum exp(a - max_s), sum_t = sum exp(b - max_t), cross = sum exp(b - max_t) * (b - a).
// Each sum is rescaled by exp(old max - new max) whenever its maximum moves (online log-sum-exp).
struct KlLogitsState {
  float max_s;
  float sum_s;
  float max_t;
  float sum_t;
  float cross;
};

// exp(old_max - new_max), the factor that moves a sum onto a new maximum. Equal maxima give exactly 1
// (also -inf == -inf: nothing seen yet, where exp(-inf - -inf) would be NaN).
inline float kl_rescale(float old_max, float new_max) {
  return old_max == new_max ? 1.0f : metal::precise::exp(old_max - new_max);
}

// cross * factor, except that +inf (a teacher element with student -inf) stays +inf even when the
// factor underflows to 0.
inline float kl_scale_cross(float cross, float factor) {
  return cross == KL_INF ? cross : cross * factor;
}

// Fold N consecutive (a, b) pairs into the state: one maximum update per step, then N terms.
template <int N>
inline void kl_logits_accumulate(thread KlLogitsState& state, thread const float* a, thread const float* b) {
  float step_max_s = state.max_s;
  float step_max_t = state.max_t;
  for (int r = 0; r < N; ++r) {
    step_max_s = metal::max(step_max_s, a[r]);
    step_max_t = metal::max(step_max_t, b[r]);
  }
  state.sum_s *= kl_rescale(state.max_s, step_max_s);
  const float factor_t = kl_rescale(state.max_t, step_max_t);
  state.sum_t *= factor_t;
  state.cross = kl_scale_cross(state.cross, factor_t);
  state.max_s = step_max_s;
  state.max_t = step_max_t;
  for (int r = 0; r < N; ++r) {
    // A NaN a with b == -inf still reaches sum_s (and so the row's kl): never a silent 0.
    state.sum_s += a[r] == -KL_INF ? 0.0f : metal::precise::exp(a[r] - step_max_s);
    if (b[r] != -KL_INF) {
      const float e = metal::precise::exp(b[r] - step_max_t);
      state.sum_t += e;
      state.cross += a[r] == -KL_INF ? KL_INF : e * (b[r] - a[r]);
    }
  }
}

// The row's kl from the threadgroup's combined state (all sums relative to the row maxima).
inline float kl_logits_row_value(float max_s, float sum_s, float max_t, float sum_t, float cross) {
  if (sum_t == 0.0f) {
    return metal::isnan(sum_s) ? sum_s : 0.0f;  // teacher row all -inf: defined as 0
  }
  if (sum_s == 0.0f) {
    return metal::isnan(sum_t) || metal::isnan(cross) ? KL_NAN : KL_INF;  // student row all -inf
  }
  // kl = E_p[b - a] - (lse_t - lse_s), grouped so that a common offset of a and b cancels first.
  const float kl = (cross / sum_t - (max_t - max_s)) + (metal::precise::log(sum_s) - metal::precise::log(sum_t));
  return kl < 0.0f ? 0.0f : kl;
}

// ---- kernel: kl_logits_forward ----
// One threadgroup per row: grid (threads, rows), threadgroup (threads, 1); threads from 1 to 1024 (a
// partial last simdgroup reduces only its own lanes).
// One thread: N_READS consecutive elements of both rows per step, stepping by threads * N_READS, folded
// into its KlLogitsState (one exp per element and row, plus one rescale per step whose maximum moved).
// One simdgroup: simd_max of the maxima, then simd_sum of the rescaled sums, into threadgroup slots.
// One threadgroup: the row maxima (barrier 1), then the sums (barrier 2); thread 0 writes loss[row]
// (= w * kl) and stats[row] = (lse_s, lse_t, kl).
// Traffic: each element of student and teacher read exactly once (rows with w == 0: not at all);
// 4 floats written per row.
{
  threadgroup float max_slots[2 * KL_SIMD_SIZE];
  threadgroup float sum_slots[3 * KL_SIMD_SIZE];
  const size_t row = threadgroup_position_in_grid.y;
  const uint thread_id = thread_index_in_threadgroup;
  const uint n_threads = threads_per_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint simdgroup = simdgroup_index_in_threadgroup;
  const uint n_simdgroups = (n_threads + KL_SIMD_SIZE - 1) / KL_SIMD_SIZE;
  const float weight = WEIGHTED ? float(w[row]) : 1.0f;
  if (weight == 0.0f) {
    // The whole threadgroup leaves together, before any barrier: the row is not read.
    if (thread_id == 0) {
      loss[row] = 0.0f;
      stats[3 * row + 0] = 0.0f;
      stats[3 * row + 1] = 0.0f;
      stats[3 * row + 2] = 0.0f;
    }
    return;
  }

  const size_t base = row * size_t(D);
  const float scale = inv_temperature;
  KlLogitsState state = {-KL_INF, 0.0f, -KL_INF, 0.0f, 0.0f};
  // Within a row, 32-bit indices suffice (D < 2^31); the row's base offset is 64-bit.
  for (uint i = thread_id * N_READS; i < uint(D); i += n_threads * N_READS) {
    float a[N_READS];
    float b[N_READS];
    for (uint r = 0; r < uint(N_READS); ++r) {
      const bool inside = i + r < uint(D);
      a[r] = inside ? float(student[base + i + r]) * scale : -KL_INF;
      b[r] = inside ? float(teacher[base + i + r]) * scale : -KL_INF;
    }
    kl_logits_accumulate<N_READS>(state, a, b);
  }

  // Row maxima: every simdgroup reads all slots, so every thread ends up with them.
  const float group_max_s = simd_max(state.max_s);
  const float group_max_t = simd_max(state.max_t);
  if (lane == 0) {
    max_slots[2 * simdgroup + 0] = group_max_s;
    max_slots[2 * simdgroup + 1] = group_max_t;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float max_s = simd_max(lane < n_simdgroups ? max_slots[2 * lane + 0] : -KL_INF);
  const float max_t = simd_max(lane < n_simdgroups ? max_slots[2 * lane + 1] : -KL_INF);

  // Move this thread's sums onto the row maxima, then sum them (separate slots: no reuse hazard).
  const float factor_t = kl_rescale(state.max_t, max_t);
  const float sum_s = simd_sum(state.sum_s * kl_rescale(state.max_s, max_s));
  const float sum_t = simd_sum(state.sum_t * factor_t);
  const float cross = simd_sum(kl_scale_cross(state.cross, factor_t));
  if (lane == 0) {
    sum_slots[3 * simdgroup + 0] = sum_s;
    sum_slots[3 * simdgroup + 1] = sum_t;
    sum_slots[3 * simdgroup + 2] = cross;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simdgroup == 0) {
    const bool has_slot = lane < n_simdgroups;
    const float row_sum_s = simd_sum(has_slot ? sum_slots[3 * lane + 0] : 0.0f);
    const float row_sum_t = simd_sum(has_slot ? sum_slots[3 * lane + 1] : 0.0f);
    const float row_cross = simd_sum(has_slot ? sum_slots[3 * lane + 2] : 0.0f);
    if (lane == 0) {
      const float kl = kl_logits_row_value(max_s, row_sum_s, max_t, row_sum_t, row_cross);
      loss[row] = kl_weighted<WEIGHTED>(weight, kl);
      stats[3 * row + 0] = max_s + metal::precise::log(row_sum_s);
      stats[3 * row + 1] = max_t + metal::precise::log(row_sum_t);
      stats[3 * row + 2] = kl;
    }
  }
}

// ---- kernel: kl_logits_grad_student ----
// Elementwise: grid (ceil(D / N_READS), rows), any threadgroup shape; no threadgroup memory.
// One thread: N_READS consecutive elements of one row; reads g[row] and the row's stats once.
// ds = (q - p) * g * inv_temperature, rounded once to S. Exactly 0 where g == 0 (the row's logits are
// not read) and on rows whose teacher is all -inf (lse_t == -inf).
// Traffic per element: one student and one teacher element read, one ds written.
{
  const size_t row = thread_position_in_grid.y;
  const size_t first = size_t(thread_position_in_grid.x) * N_READS;
  const size_t base = row * size_t(D);
  const float cotangent = g[row];
  const float inv_t = inv_temperature;
  const float scale = cotangent * inv_t;
  const float lse_s = stats[3 * row + 0];
  const float lse_t = stats[3 * row + 1];
  const bool zero_row = cotangent == 0.0f || lse_t == -KL_INF;
  for (uint r = 0; r < uint(N_READS); ++r) {
    if (first + r < size_t(D)) {
      const size_t offset = base + first + r;
      float value = 0.0f;
      if (!zero_row) {
        const float a = float(student[offset]) * inv_t;
        const float b = float(teacher[offset]) * inv_t;
        value = (metal::precise::exp(a - lse_s) - metal::precise::exp(b - lse_t)) * scale;
      }
      ds[offset] = static_cast<S>(value);
    }
  }
}

// ---- kernel: kl_logits_grad_teacher ----
// Elementwise, launched only when the teacher's gradient is asked for; same grid and rules as
// kl_logits_grad_student. dt = p * ((b - lse_t) - (a - lse_s) - kl) * g * inv_temperature, rounded once
// to T; exactly 0 where b == -inf, where g == 0 and on rows whose teacher is all -inf.
// Traffic per element: one student and one teacher element read, one dt written.
{
  const size_t row = thread_position_in_grid.y;
  const size_t first = size_t(thread_position_in_grid.x) * N_READS;
  const size_t base = row * size_t(D);
  const float cotangent = g[row];
  const float inv_t = inv_temperature;
  const float scale = cotangent * inv_t;
  const float lse_s = stats[3 * row + 0];
  const float lse_t = stats[3 * row + 1];
  const float kl = stats[3 * row + 2];
  const bool zero_row = cotangent == 0.0f || lse_t == -KL_INF;
  for (uint r = 0; r < uint(N_READS); ++r) {
    if (first + r < size_t(D)) {
      const size_t offset = base + first + r;
      float value = 0.0f;
      if (!zero_row) {
        const float b = float(teacher[offset]) * inv_t;
        if (b != -KL_INF) {
          const float a = float(student[offset]) * inv_t;
          const float log_p = b - lse_t;
          value = metal::precise::exp(log_p) * ((log_p - (a - lse_s)) - kl) * scale;
        }
      }
      dt[offset] = static_cast<T>(value);
    }
  }
}
