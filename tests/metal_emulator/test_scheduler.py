"""Barriers, threadgroup memory (fresh + poisoned), races, divergence and launch geometry."""

import mlx.core as mx
import numpy as np
import pytest

from ._testutil import SIZES, grid_for, lanes, me, run1

# Block sum through threadgroup memory: simd_sum -> shared[simdgroup] -> barrier -> simd_sum.
REDUCE_SRC = """
  threadgroup float partial[32];
  uint gid = thread_position_in_grid.x;
  uint sg = simdgroup_index_in_threadgroup, lane = thread_index_in_simdgroup;
  float v = simd_sum(inp[gid]);
  if (lane == 0) partial[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    uint nsg = (threads_per_threadgroup.x + 31) / 32;
    float w = lane < nsg ? partial[lane] : 0.0f;
    w = simd_sum(w);
    if (lane == 0) out[threadgroup_position_in_grid.x] = w;
  }
"""


@pytest.mark.parametrize("tg", SIZES)
def test_threadgroup_reduction_with_barrier_matches_numpy(tg):
    k = me.metal_kernel("tg_reduce", ["inp"], ["out"], REDUCE_SRC, race=True)
    n = grid_for(tg)
    v = np.random.default_rng(tg).integers(-100, 100, n).astype(np.float32)
    ngroups = -(-n // tg)
    (o,) = run1(k, [mx.array(v)], n, tg, out_shapes=[(ngroups,)])
    ref = np.add.reduceat(v, np.arange(0, n, tg))
    np.testing.assert_array_equal(o, ref)


MISSING_BARRIER_SRC = REDUCE_SRC.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")


def test_missing_barrier_gives_poisoned_result():
    # Without the barrier, simdgroup 0 reads the partial sums of later simdgroups before they are
    # written: the poison (NaN) shows up in the result instead of a plausible number.
    k = me.metal_kernel("tg_reduce_nobarrier", ["inp"], ["out"], MISSING_BARRIER_SRC, race=False)
    n, tg = 2048, 1024
    (o,) = run1(k, [mx.ones((n,))], n, tg, out_shapes=[(2,)])
    assert np.isnan(o).all()


def test_missing_barrier_is_reported_in_race_mode():
    k = me.metal_kernel("tg_reduce_nobarrier", ["inp"], ["out"], MISSING_BARRIER_SRC, race=True)
    with pytest.raises(RuntimeError, match=r"(?s)kernel `tg_reduce_nobarrier`.*threadgroup \(0,0,0\).*"
                                           r"threadgroup memory race on `partial`.*tg_reduce_nobarrier\.metal:\d+"):
        run1(k, [mx.ones((256,))], 256, 256, out_shapes=[(1,)])


def test_write_after_read_race_is_reported():
    # Classic reuse bug (as in an early mlx-lm KL kernel): slots read by others are overwritten
    # in the same barrier interval.
    src = """
      threadgroup float s[64];
      uint t = thread_index_in_threadgroup;
      s[t] = inp[t];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float a = s[(t + 1) % 64];
      s[t] = a * 2;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[t] = s[t];
    """
    k = me.metal_kernel("war_race", ["inp"], ["out"], src, race=True)
    with pytest.raises(RuntimeError, match=r"(?s)race on `s`.*reads? it"):
        run1(k, [mx.arange(64, dtype=mx.float32)], 64, 64)


def test_same_simdgroup_exchange_after_simd_op_is_not_a_race():
    src = """
      threadgroup float s[32];
      uint lane = thread_index_in_simdgroup;
      s[lane] = inp[lane];
      simdgroup_barrier(mem_flags::mem_threadgroup);
      out[lane] = s[31 - lane];
    """
    k = me.metal_kernel("sg_exchange", ["inp"], ["out"], src, race=True)
    v = np.arange(32, dtype=np.float32)
    (o,) = run1(k, [mx.array(v)], 32, 32)
    np.testing.assert_array_equal(o, v[::-1])


def test_uninitialised_threadgroup_read_is_poisoned_nan_and_ones():
    src = """
      threadgroup float f[4];
      threadgroup half h[4];
      threadgroup int i[4];
      uint t = thread_index_in_threadgroup;
      if (t == 0) { f[1] = 1.0f; h[1] = 1.0h; i[1] = 7; }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[t] = f[t % 4];
      outh[t] = float(h[t % 4]);
      outi[t] = i[t % 4];
    """
    k = me.metal_kernel("poison", ["inp"], ["out", "outh", "outi"], src)
    f, h, i = run1(k, [mx.zeros((8,))], 8, 8, out_dtypes=[mx.float32, mx.float32, mx.int32])
    np.testing.assert_array_equal(np.isnan(f), [True, False, True, True] * 2)
    np.testing.assert_array_equal(np.isnan(h), [True, False, True, True] * 2)
    np.testing.assert_array_equal(i, [-1, 7, -1, -1] * 2)
    assert f[1] == 1.0 and h[1] == 1.0


def test_threadgroup_memory_is_fresh_for_every_threadgroup():
    # Group 0 writes its slot; group 1 must not see group 0's value (only the poison).
    src = """
      threadgroup float s[1];
      uint g = threadgroup_position_in_grid.x;
      if (g == 0 && thread_index_in_threadgroup == 0) s[0] = 42.0f;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[thread_position_in_grid.x] = s[0];
    """
    k = me.metal_kernel("fresh_tg", ["inp"], ["out"], src)
    (o,) = run1(k, [mx.zeros((8,))], 64, 32)
    assert (o[:32] == 42).all() and np.isnan(o[32:]).all()


def test_divergent_barrier_is_reported_not_hung():
    src = """
      uint t = thread_index_in_threadgroup;
      if (t < 32) threadgroup_barrier(mem_flags::mem_threadgroup);
      out[t] = 1;
    """
    k = me.metal_kernel("divergent_barrier", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match=r"(?s)kernel `divergent_barrier`.*threadgroup \(0,0,0\).*"
                                           r"threadgroup_barrier at divergent_barrier\.metal:\d+: if \(t < 32\) threadgroup_barrier"):
        run1(k, [mx.zeros((8,))], 64, 64)


def test_barriers_at_different_call_sites_are_reported():
    src = """
      uint t = thread_index_in_threadgroup;
      if (t % 2) { threadgroup_barrier(mem_flags::mem_threadgroup); }
      else { threadgroup_barrier(mem_flags::mem_threadgroup); }
      out[t] = 1;
    """
    k = me.metal_kernel("two_barriers", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match="reached from different call sites"):
        run1(k, [mx.zeros((8,))], 64, 64)


def test_simd_op_reached_from_different_call_sites_is_reported():
    src = """
      uint t = thread_index_in_threadgroup;
      float v = 0;
      if (t % 2) v = simd_sum(1.0f);
      else v = simd_sum(2.0f);
      out[t] = v;
    """
    k = me.metal_kernel("divergent_simd", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match=r"(?s)simd operations reached from different call sites.*"
                                           r"simd_sum at divergent_simd\.metal:\d+: (if|else).*simd_sum at divergent_simd\.metal:\d+: (if|else)"):
        run1(k, [mx.zeros((8,))], 32, 32)


def test_simd_op_against_barrier_in_one_simdgroup_is_reported():
    src = """
      uint t = thread_index_in_threadgroup;
      float v = 0;
      if (t < 16) v = simd_sum(1.0f);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[t] = v;
    """
    k = me.metal_kernel("simd_vs_barrier", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match="lanes of one simdgroup diverged"):
        run1(k, [mx.zeros((8,))], 32, 32)


def test_simd_op_after_other_lanes_returned_uses_the_remaining_lanes():
    src = """
      uint t = thread_index_in_threadgroup;
      if (t >= 20) return;
      out[t] = simd_sum(1.0f);
    """
    k = me.metal_kernel("early_return_simd", ["inp"], ["out"], src)
    (o,) = run1(k, [mx.zeros((8,))], 32, 32, init_value=-1)
    np.testing.assert_array_equal(o, [20] * 20 + [-1] * 12)


def test_partial_threadgroups_report_their_size_and_positions():
    src = """
      uint3 p = thread_position_in_grid;
      uint i = (p.z * threads_per_grid.y + p.y) * threads_per_grid.x + p.x;
      out[i * 6 + 0] = threads_per_threadgroup.x;
      out[i * 6 + 1] = threads_per_threadgroup.y;
      out[i * 6 + 2] = threads_per_threadgroup.z;
      out[i * 6 + 3] = threadgroup_position_in_grid.x * 10000 + threadgroup_position_in_grid.y * 100 + threadgroup_position_in_grid.z;
      out[i * 6 + 4] = simdgroups_per_threadgroup;
      out[i * 6 + 5] = threadgroups_per_grid.x * 10000 + threadgroups_per_grid.y * 100 + threadgroups_per_grid.z;
    """
    k = me.metal_kernel("geometry", ["inp"], ["out"], src)
    grid, tg = (13, 7, 3), (4, 3, 2)
    n = int(np.prod(grid))
    outs = k(inputs=[mx.zeros((8,))], grid=grid, threadgroup=tg, output_shapes=[(n * 6,)],
             output_dtypes=[mx.uint32])
    o = np.array(outs[0]).reshape(grid[2], grid[1], grid[0], 6)
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                pos = (x // tg[0], y // tg[1], z // tg[2])
                size = [min(tg[d], grid[d] - pos[d] * tg[d]) for d in range(3)]
                exp = [*size, pos[0] * 10000 + pos[1] * 100 + pos[2], -(-int(np.prod(size)) // 32),
                       4 * 10000 + 3 * 100 + 2]
                np.testing.assert_array_equal(o[z, y, x], exp)


def test_threadgroup_larger_than_1024_is_rejected_like_metal():
    k = me.metal_kernel("too_big", ["inp"], ["out"], "out[0] = 1;")
    with pytest.raises(ValueError, match=r"Thread group size \(2048\) is greater than"):
        run1(k, [mx.zeros((8,))], 2048, 2048, out_shapes=[(1,)])


def test_threadgroup_is_clamped_to_the_grid_like_mlx():
    k = me.metal_kernel("clamped", ["inp"], ["out"], "out[thread_position_in_grid.x] = threads_per_threadgroup.x;")
    (o,) = run1(k, [mx.zeros((8,))], 40, 1024)
    np.testing.assert_array_equal(o, [40] * 40)


def test_threadgroup_memory_over_32k_is_an_error():
    k = me.metal_kernel("tg_32k", ["inp"], ["out"], "threadgroup float a[8192]; threadgroup float b[1]; "
                        "a[0] = 1; b[0] = 2; out[0] = a[0] + b[0];")
    with pytest.raises(RuntimeError, match="exceeds Metal's 32 KiB"):
        run1(k, [mx.zeros((8,))], 1, 1, out_shapes=[(1,)])


def test_atomic_outputs():
    src = """
      uint gid = thread_position_in_grid.x;
      atomic_fetch_add_explicit(&out[gid % 4], inp[gid], memory_order_relaxed);
    """
    k = me.metal_kernel("atomics", ["inp"], ["out"], src, atomic_outputs=True)
    v = np.arange(100, dtype=np.float32)
    (o,) = run1(k, [mx.array(v)], 100, 32, out_shapes=[(4,)], init_value=0)
    np.testing.assert_array_equal(o, [v[i::4].sum() for i in range(4)])
