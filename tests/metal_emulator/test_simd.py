"""simd_* operations against numpy, on full and partial simdgroups and odd threadgroup sizes."""

import mlx.core as mx
import numpy as np
import pytest

from ._testutil import SIZES, grid_for, lanes, me, run1

FLOAT_OPS = ["sum", "max", "min", "pinc", "pexc", "down", "up", "xr", "shuf", "bcast", "first", "rot"]
FLOAT_SRC = """
  uint gid = thread_position_in_grid.x;
  uint lane = thread_index_in_simdgroup;
  float v = inp[gid];
  sum[gid] = simd_sum(v);
  max[gid] = simd_max(v);
  min[gid] = simd_min(v);
  pinc[gid] = simd_prefix_inclusive_sum(v);
  pexc[gid] = simd_prefix_exclusive_sum(v);
  down[gid] = simd_shuffle_down(v, 3);
  up[gid] = simd_shuffle_up(v, 5);
  xr[gid] = simd_shuffle_xor(v, 6);
  shuf[gid] = simd_shuffle(v, (lane * 7) % 32);
  bcast[gid] = simd_broadcast(v, 2);
  first[gid] = simd_broadcast_first(v);
  rot[gid] = simd_shuffle_rotate_down(v, 9);
"""
_float_kernel = me.metal_kernel("simd_float_ops", ["inp"], FLOAT_OPS, FLOAT_SRC)


def _reference(v: np.ndarray, tg: int) -> dict:
    n = v.size
    gs, sg, lane, count, base = lanes(n, tg)
    ref = {k: np.empty(n, np.float32) for k in FLOAT_OPS}
    for t in range(n):
        c, b, ln = count[t], base[t], lane[t]
        act = v[b:b + c]

        def src(s):  # value of lane s, NaN (poison) when that lane is inactive
            return act[s] if s < c else np.nan

        ref["sum"][t] = act.sum()
        ref["max"][t] = act.max()
        ref["min"][t] = act.min()
        ref["pinc"][t] = act[:ln + 1].sum()
        ref["pexc"][t] = act[:ln].sum()
        ref["down"][t] = v[t] if ln + 3 >= 32 else src(ln + 3)
        ref["up"][t] = v[t] if ln < 5 else src(ln - 5)
        ref["xr"][t] = src(ln ^ 6)
        ref["shuf"][t] = src((ln * 7) % 32)
        ref["bcast"][t] = src(2)
        ref["first"][t] = act[0]
        ref["rot"][t] = src((ln + 9) % 32)
    return ref


@pytest.mark.parametrize("tg", SIZES)
def test_float_simd_ops_match_numpy(tg):
    n = grid_for(tg)
    rng = np.random.default_rng(tg)
    v = rng.integers(-50, 50, n).astype(np.float32)  # integers: sums are exact in any order
    got = run1(_float_kernel, [mx.array(v)], n, tg, out_dtypes=[mx.float32] * len(FLOAT_OPS))
    ref = _reference(v, tg)
    for name, g in zip(FLOAT_OPS, got):
        np.testing.assert_array_equal(g, ref[name], err_msg=f"{name} tg={tg}")


INT_OPS = ["and_", "or_", "xor_", "isum", "all_", "any_", "is_first", "prod"]
INT_SRC = """
  uint gid = thread_position_in_grid.x;
  uint v = inp[gid];
  and_[gid] = simd_and(v);
  or_[gid] = simd_or(v);
  xor_[gid] = simd_xor(v);
  isum[gid] = simd_sum(v);
  all_[gid] = simd_all(v % 3 != 0) ? 1u : 0u;
  any_[gid] = simd_any(v % 5 == 0) ? 1u : 0u;
  is_first[gid] = simd_is_first() ? 1u : 0u;
  float f = (v & 3u) == 0 ? 2.0f : (v & 3u) == 1 ? 0.5f : (v & 3u) == 2 ? -1.0f : 1.0f;
  prod[gid] = as_type<uint>(simd_product(f));
"""
_int_kernel = me.metal_kernel("simd_int_ops", ["inp"], INT_OPS, INT_SRC)


@pytest.mark.parametrize("tg", [31, 33, 100])
def test_integer_and_boolean_simd_ops_match_numpy(tg):
    n = grid_for(tg)
    rng = np.random.default_rng(100 + tg)
    v = rng.integers(0, 2**31, n).astype(np.uint32)
    v[::7] = 15  # make all_/any_ vary between simdgroups
    got = run1(_int_kernel, [mx.array(v)], n, tg, out_dtypes=[mx.uint32] * len(INT_OPS))
    gs, sg, lane, count, base = lanes(n, tg)
    fmap = np.array([2.0, 0.5, -1.0, 1.0], np.float32)
    for t in range(n):
        act = v[base[t]:base[t] + count[t]]
        exp = {
            "and_": np.bitwise_and.reduce(act), "or_": np.bitwise_or.reduce(act),
            "xor_": np.bitwise_xor.reduce(act), "isum": np.uint32(act.astype(np.uint64).sum() % 2**32),
            "all_": int(np.all(act % 3 != 0)), "any_": int(np.any(act % 5 == 0)), "is_first": int(lane[t] == 0),
            "prod": np.float32(np.prod(fmap[act & 3])).view(np.uint32),
        }
        for name, g in zip(INT_OPS, got):
            assert g[t] == exp[name], (name, t, tg)


def test_shuffle_and_fill_and_vector_operands():
    src = """
      uint gid = thread_position_in_grid.x;
      float v = inp[gid];
      fd[gid] = simd_shuffle_and_fill_down(v, -v, 4);
      fu[gid] = simd_shuffle_and_fill_up(v, -v, 4);
      float4 q = float4(v, 2 * v, 3 * v, 4 * v);
      float4 s = simd_sum(q);
      vs[gid] = s.x + s.y * 10 + s.z * 100 + s.w * 1000;
    """
    k = me.metal_kernel("simd_fill_vec", ["inp"], ["fd", "fu", "vs"], src)
    n = 64
    v = np.arange(1, n + 1, dtype=np.float32)
    fd, fu, vs = run1(k, [mx.array(v)], n, 64, out_dtypes=[mx.float32] * 3)
    for t in range(n):
        b, ln = (t // 32) * 32, t % 32
        exp_d = v[b + ln + 4] if ln + 4 < 32 else -v[b + ln + 4 - 32]
        exp_u = v[b + ln - 4] if ln >= 4 else -v[b + ln + 32 - 4]
        assert fd[t] == exp_d and fu[t] == exp_u, t
        s = v[b:b + 32].sum()
        assert vs[t] == s * (1 + 20 + 300 + 4000)


def test_two_dimensional_threadgroup_lanes_are_linearised_x_fastest():
    src = """
      uint t = thread_index_in_threadgroup;
      uint3 p = thread_position_in_threadgroup;
      uint3 d = threads_per_threadgroup;
      uint idx = thread_position_in_grid.y * threads_per_grid.x + thread_position_in_grid.x;
      out[idx * 4 + 0] = t == p.x + p.y * d.x ? 1 : 0;
      out[idx * 4 + 1] = simd_sum(1u);
      out[idx * 4 + 2] = simdgroup_index_in_threadgroup * 32 + thread_index_in_simdgroup;
      out[idx * 4 + 3] = simd_broadcast(t, 0);
    """
    k = me.metal_kernel("simd_2d", ["inp"], ["out"], src)
    gx, gy = 23, 17
    outs = k(inputs=[mx.zeros((8,))], grid=(gx, gy, 1), threadgroup=(10, 10, 1), output_shapes=[(gx * gy * 4,)],
             output_dtypes=[mx.uint32])
    o = np.array(outs[0]).reshape(gy, gx, 4)
    assert (o[..., 0] == 1).all()
    for y in range(gy):
        for x in range(gx):
            sx, sy = min(10, gx - (x // 10) * 10), min(10, gy - (y // 10) * 10)
            t = (y % 10) * sx + (x % 10)
            assert o[y, x, 2] == t
            assert o[y, x, 1] == min(32, sx * sy - (t // 32) * 32)
            assert o[y, x, 3] == (t // 32) * 32
