// kl_backward.metal: elementwise gradients of the per-row KL from a per-row cotangent g (float32,
// shape (outer, inner), the reduction's scale and mask weights already folded in):
//   dx = -exp(t) * g                 (kernel kl_grad_inputs: reads t only)
//   dt = exp(t) * (t - x + 1) * g    (kernel kl_grad_targets)
// both exactly 0 where t == -inf, and exactly 0 where g == 0 (those elements' t and x are not read).
//
// Launched by kl_metal/metal.py:grad_inputs and grad_targets, one launch per requested gradient, so
// a gradient nobody asks for costs nothing. Each section below, from its "---- kernel:" line to the
// next, is the body of one mx.fast.metal_kernel; helpers come from kl_common.h (header=).
// Template arguments: T (target element type), X (input element type, kl_grad_targets only), OUT
// (gradient element type), D (reduction length), N_READS (elements per thread), STRIDED (inner > 1).
//
// One thread: N_READS elements of one row; float32 math, rounded once to OUT on the store.
//   Last axis (STRIDED false): grid (ceil(D / N_READS), rows), thread (j, row) covers elements
//     j * N_READS ... of that row and reads g[row] once.
//   Strided (STRIDED true): grid (inner, ceil(D / N_READS), outer), thread (i, j, o) covers elements
//     d = j * N_READS ... of column (o, :, i) and reads g[o, i] once; threads of consecutive i touch
//     consecutive addresses at each step.
// One simdgroup / threadgroup: independent threads, no threadgroup memory, no simdgroup operations;
// any threadgroup shape works.
// Traffic per element: dx reads sizeof(T) and writes sizeof(OUT); dt reads sizeof(X) + sizeof(T)
// and writes sizeof(OUT); g is read once per thread (4 bytes per N_READS elements).
// Offsets are size_t: a launch over more than 2^32 elements is fine.

// ---- kernel: kl_grad_inputs ----
{
  const size_t n_inner = size_t(inner);
  if (STRIDED) {
    const size_t outer_index = thread_position_in_grid.z;
    const size_t column = thread_position_in_grid.x;
    const uint first = thread_position_in_grid.y * N_READS;
    const float gr = g[outer_index * n_inner + column];
    size_t offset = (outer_index * size_t(D) + first) * n_inner + column;
    for (uint r = 0; r < uint(N_READS); ++r) {
      if (first + r < uint(D)) {
        dx[offset] = static_cast<OUT>(gr == 0.0f ? 0.0f : kl_grad_inputs_value(float(t[offset]), gr));
      }
      offset += n_inner;
    }
  } else {
    const size_t row = thread_position_in_grid.y;
    const size_t first = size_t(thread_position_in_grid.x) * N_READS;
    const size_t base = row * size_t(D);
    const float gr = g[row];
    for (uint r = 0; r < uint(N_READS); ++r) {
      if (first + r < size_t(D)) {
        const size_t offset = base + first + r;
        dx[offset] = static_cast<OUT>(gr == 0.0f ? 0.0f : kl_grad_inputs_value(float(t[offset]), gr));
      }
    }
  }
}

// ---- kernel: kl_grad_targets ----
{
  const size_t n_inner = size_t(inner);
  if (STRIDED) {
    const size_t outer_index = thread_position_in_grid.z;
    const size_t column = thread_position_in_grid.x;
    const uint first = thread_position_in_grid.y * N_READS;
    const float gr = g[outer_index * n_inner + column];
    size_t offset = (outer_index * size_t(D) + first) * n_inner + column;
    for (uint r = 0; r < uint(N_READS); ++r) {
      if (first + r < uint(D)) {
        dt[offset] = static_cast<OUT>(
            gr == 0.0f ? 0.0f : kl_grad_targets_value(float(x[offset]), float(t[offset]), gr));
      }
      offset += n_inner;
    }
  } else {
    const size_t row = thread_position_in_grid.y;
    const size_t first = size_t(thread_position_in_grid.x) * N_READS;
    const size_t base = row * size_t(D);
    const float gr = g[row];
    for (uint r = 0; r < uint(N_READS); ++r) {
      if (first + r < size_t(D)) {
        const size_t offset = base + first + r;
        dt[offset] = static_cast<OUT>(
            gr == 0.0f ? 0.0f : kl_grad_targets_value(float(x[offset]), float(t[offset]), gr));
      }
    }
  }
}
