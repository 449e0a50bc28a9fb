// kl_forward.metal: the per-row KL forward, loss[o, i] = w[o, i] * sum_d term(x[o, d, i], t[o, d, i]).
//
// Launched by kl_metal/metal.py:row_loss (variant chosen by kl_metal/metal.py:plan). Each section
// below, from its "---- kernel:" line to the next, is the body of one mx.fast.metal_kernel; MLX
// writes the signature around it (inputs x, t, w, inner; output loss; template arguments below).
// Helpers (kl_term, kl_segment_sum, kl_weighted) come from kl_common.h, passed as header=.
//
// Template arguments: X, T (input and target element types: float, float16_t, bfloat16_t),
// D (reduction length), N_READS (consecutive elements per thread per step), WEIGHTED (w is a real
// per-row weight; otherwise w is a 1-element placeholder that is never read), and for the small
// variant THREADS_PER_ROW.
//
// Traffic, every variant: each element of x and t is read exactly once (rows with w == 0: not at
// all), one float32 is written per row, w is read once or twice per row. Per element: sizeof(X) +
// sizeof(T) bytes read (4 + 4 for float32, 2 + 2 for half types), 4 / D bytes written.
// No atomics; the summation order depends only on the launch configuration, so results are bitwise
// reproducible.
//
// Offsets into x and t are size_t: a launch over more than 2^32 elements is fine.

// ---- kernel: kl_forward_small ----
// Small D, last axis. Threadgroup (THREADS_PER_ROW, rows per threadgroup), grid (THREADS_PER_ROW, rows).
// One thread: N_READS consecutive elements per step, stepping by THREADS_PER_ROW * N_READS.
// One row: THREADS_PER_ROW consecutive lanes (a power of two <= 32: never across two simdgroups),
// combined with xor shuffles; no threadgroup memory. One simdgroup: 32 / THREADS_PER_ROW rows.
// One threadgroup: rows-per-threadgroup rows (the last threadgroup of the grid may hold fewer).
{
  const uint lane = thread_position_in_threadgroup.x;
  const size_t row = thread_position_in_grid.y;
  const float weight = WEIGHTED ? float(w[row]) : 1.0f;
  float acc = 0.0f;
  if (weight != 0.0f) {
    const size_t base = row * size_t(D);
    for (uint i = lane * N_READS; i < uint(D); i += THREADS_PER_ROW * N_READS) {
      for (uint r = 0; r < uint(N_READS); ++r) {
        if (i + r < uint(D)) {
          acc += kl_term(float(x[base + i + r]), float(t[base + i + r]));
        }
      }
    }
  }
  acc = kl_segment_sum<THREADS_PER_ROW>(acc);
  if (lane == 0) {
    loss[row] = kl_weighted<WEIGHTED>(weight, acc);
  }
}

// ---- kernel: kl_forward_row ----
// Medium and large D, last axis ("block": one step per thread; "looped": several steps).
// Threadgroup (threads, 1), grid (threads, rows): one threadgroup per row.
// One thread: N_READS consecutive elements per step, stepping by threads * N_READS over the row.
// One simdgroup: simd_sum of its threads' partial sums into one threadgroup slot.
// One threadgroup: one row; simdgroup 0 sums the slots and thread 0 writes the row's loss.
// Any thread count from 1 to 1024 works: a partial last simdgroup sums only its own lanes.
{
  threadgroup float simdgroup_sums[32];
  const size_t row = threadgroup_position_in_grid.y;
  const uint thread_id = thread_index_in_threadgroup;
  const uint n_threads = threads_per_threadgroup.x;
  const float weight = WEIGHTED ? float(w[row]) : 1.0f;
  if (weight == 0.0f) {
    // The whole threadgroup leaves together, before any barrier: the row is not read.
    if (thread_id == 0) {
      loss[row] = 0.0f;
    }
    return;
  }
  const size_t base = row * size_t(D);
  float acc = 0.0f;
  // Within a row, 32-bit indices suffice (D < 2^31); the row's base offset is 64-bit.
  for (uint i = thread_id * N_READS; i < uint(D); i += n_threads * N_READS) {
    for (uint r = 0; r < uint(N_READS); ++r) {
      if (i + r < uint(D)) {
        acc += kl_term(float(x[base + i + r]), float(t[base + i + r]));
      }
    }
  }
  acc = simd_sum(acc);
  if (thread_index_in_simdgroup == 0) {
    simdgroup_sums[simdgroup_index_in_threadgroup] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simdgroup_index_in_threadgroup == 0) {
    const uint n_simdgroups = (n_threads + KL_SIMD_SIZE - 1) / KL_SIMD_SIZE;
    const uint lane = thread_index_in_simdgroup;
    const float total = simd_sum(lane < n_simdgroups ? simdgroup_sums[lane] : 0.0f);
    if (lane == 0) {
      loss[row] = kl_weighted<WEIGHTED>(weight, total);
    }
  }
}

// ---- kernel: kl_forward_strided ----
// Reduction axis not the last (inner > 1): x, t are (outer, D, inner), rows are (o, i) columns.
// Threadgroup (columns, depth), grid (inner, depth, outer): the grid covers inner exactly, so the
// threadgroups at the right edge are narrower.
// One thread: one column i, elements d = depth index, + depth, ... (one element per step): threads
// of consecutive i read consecutive addresses, so each step is a coalesced read across inner and no
// transposed copy is made.
// One threadgroup: its columns of one outer index; per-thread sums go to threadgroup memory, then
// each simdgroup sums whole columns (column c by simdgroup c mod simdgroups) and writes them.
{
  threadgroup float column_sums[1024];
  const uint column_in_group = thread_position_in_threadgroup.x;
  const uint depth_index = thread_position_in_threadgroup.y;
  const uint width = threads_per_threadgroup.x;
  const uint depth = threads_per_threadgroup.y;
  const size_t n_inner = size_t(inner);
  const size_t outer_index = thread_position_in_grid.z;
  const size_t column = thread_position_in_grid.x;
  const size_t row = outer_index * n_inner + column;
  const float weight = WEIGHTED ? float(w[row]) : 1.0f;
  float acc = 0.0f;
  if (weight != 0.0f) {
    size_t offset = (outer_index * size_t(D) + depth_index) * n_inner + column;
    const size_t step = size_t(depth) * n_inner;
    for (uint d = depth_index; d < uint(D); d += depth) {
      acc += kl_term(float(x[offset]), float(t[offset]));
      offset += step;
    }
  }
  column_sums[depth_index * width + column_in_group] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint n_threads = width * depth;
  const uint simdgroup = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint n_simdgroups = (n_threads + KL_SIMD_SIZE - 1) / KL_SIMD_SIZE;
  // Lanes present in this simdgroup (the last one of a threadgroup may be partial).
  const uint lanes = min(KL_SIMD_SIZE, n_threads - simdgroup * KL_SIMD_SIZE);
  const size_t first_row = outer_index * n_inner + (column - column_in_group);
  for (uint c = simdgroup; c < width; c += n_simdgroups) {
    float partial = 0.0f;
    for (uint k = lane; k < depth; k += lanes) {
      partial += column_sums[k * width + c];
    }
    const float total = simd_sum(partial);
    if (lane == 0) {
      const size_t out_row = first_row + c;
      loss[out_row] = kl_weighted<WEIGHTED>(WEIGHTED ? float(w[out_row]) : 1.0f, total);
    }
  }
}
