"""Types (float32/float16/bfloat16, vectors, as_type, literals, MLX utils) and device-memory checks:
out-of-bounds accesses and exact traffic counts."""

import mlx.core as mx
import numpy as np
import pytest

from ._testutil import bf16_round, me, run1

CAST_SRC = """
  uint i = thread_position_in_grid.x;
  T x = inp[i];
  float f = static_cast<float>(x);
  out[i] = static_cast<T>(f * 3.0f + 0.5f);
  as_f32[i] = f;
"""
_cast = me.metal_kernel("cast_roundtrip", ["inp"], ["out", "as_f32"], CAST_SRC)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_float_types_round_trip_like_mlx(dtype):
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal(1000).astype(np.float32) * 100).astype(dtype)
    outs = _cast(inputs=[x], template=[("T", dtype)], grid=(1000, 1, 1), threadgroup=(256, 1, 1),
                 output_shapes=[(1000,), (1000,)], output_dtypes=[dtype, mx.float32])
    out, f = outs
    xf = np.array(x.astype(mx.float32))
    np.testing.assert_array_equal(np.array(f), xf)  # exact widening
    expected = (mx.array(xf * np.float32(3.0) + np.float32(0.5))).astype(dtype)  # MLX's own rounding
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)))


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan_inf():
    src = """
      uint i = thread_position_in_grid.x;
      bfloat16_t b = static_cast<bfloat16_t>(inp[i]);
      out[i] = static_cast<float>(b);
    """
    k = me.metal_kernel("bf16_rne", ["inp"], ["out"], src)
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x7F7FFFFF, 0xFF800000, 0x7FC00001,
                     0x00000001, 0x80000000], dtype=np.uint32)
    x = bits.view(np.float32)
    (o,) = run1(k, [mx.array(x)], x.size, 32)
    ref = bf16_round(x)
    np.testing.assert_array_equal(o[:6], ref[:6])
    assert np.isnan(o[6]) and o[7] == 0.0 and o[8] == 0.0 and np.signbit(o[8])


def test_vectors_literals_as_type_limits_and_math():
    src = """
      uint i = thread_position_in_grid.x;
      float4 v = reinterpret_cast<const device float4*>(inp)[i];
      half4 h = half4(v);
      float4 w = float4(h) * 2.0f + v;
      o0[i] = dot(w, float4(1.0f)) + float(1.5h);
      o1[i] = as_type<float>(as_type<uint>(v.x) ^ 0x80000000u);
      o2[i] = metal::max(v.y, Limits<float>::min) + (metal::isinf(Limits<float>::max) ? 1.0f : 0.0f);
      o3[i] = metal::precise::exp(v.z) - metal::fast::log(metal::abs(v.w) + 1.0f) + metal::clamp(v.x, -1.0f, 1.0f);
      o4[i] = select(v.x, v.y, v.x < v.y) + ceildiv(int(i) + 7, 4);
    """
    k = me.metal_kernel("misc_types", ["inp"], ["o0", "o1", "o2", "o3", "o4"], src)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    o0, o1, o2, o3, o4 = run1(k, [mx.array(x)], 64, 64, out_dtypes=[mx.float32] * 5)
    h = x.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(o0, (h * 2 + x).sum(1) + 1.5, rtol=1e-6)
    np.testing.assert_array_equal(o1, -x[:, 0])
    np.testing.assert_array_equal(o2, x[:, 1] + 1.0)
    np.testing.assert_allclose(o3, np.exp(x[:, 2]) - np.log(np.abs(x[:, 3]) + 1) + np.clip(x[:, 0], -1, 1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(o4, np.maximum(x[:, 0], x[:, 1]) + ((np.arange(64) + 7 + 3) // 4).astype(np.float32))


def test_unsupported_msl_fails_to_compile_with_a_clear_message():
    k = me.metal_kernel("uses_double", ["inp"], ["out"], "double d = inp[0]; out[0] = d;")
    with pytest.raises(me.EmulatorCompileError, match="double_is_not_supported_in_Metal"):
        run1(k, [mx.zeros((8,))], 1, 1, out_shapes=[(1,)])
    k = me.metal_kernel("uses_ballot", ["inp"], ["out"], "auto b = simd_ballot(true); out[0] = 0;")
    with pytest.raises(me.EmulatorCompileError, match="simd_ballot is not supported"):
        run1(k, [mx.zeros((8,))], 1, 1, out_shapes=[(1,)])
    k = me.metal_kernel("tg_init", ["inp"], ["out"], "threadgroup float s = 0; out[0] = s;")
    with pytest.raises(me.EmulatorCompileError, match="unsupported `threadgroup` declaration"):
        run1(k, [mx.zeros((8,))], 1, 1, out_shapes=[(1,)])


# ---------------------------------------------------------------- bounds ----
def test_out_of_bounds_read_names_kernel_buffer_index_and_threadgroup():
    src = """
      uint i = thread_position_in_grid.x;
      out[i] = inp[i + 1];
    """
    k = me.metal_kernel("oob_read", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match=r"(?s)kernel `oob_read`.*threadgroup \(1,0,0\).*out-of-bounds read of "
                                           r"buffer `inp` at element 64 .*the buffer has 64 elements"):
        run1(k, [mx.zeros((64,))], 64, 32)


def test_out_of_bounds_write_and_negative_index():
    src = """
      int i = int(thread_position_in_grid.x);
      out[i - 1] = inp[i];
    """
    k = me.metal_kernel("oob_write", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match=r"(?s)out-of-bounds write of buffer `out` at element -1\b.*"
                                           r"oob_write\.metal:\d+: out\[i - 1\] = inp\[i\];"):
        run1(k, [mx.zeros((64,))], 64, 32)


def test_far_out_of_bounds_and_threadgroup_overflow_are_caught():
    k = me.metal_kernel("oob_far", ["inp"], ["out"], "out[0] = inp[1u << 28];")
    with pytest.raises(RuntimeError, match=r"out-of-bounds read of buffer `inp` at element 268435456"):
        run1(k, [mx.zeros((64,))], 1, 1, out_shapes=[(1,)])
    k = me.metal_kernel("oob_tg", ["inp"], ["out"], """
      threadgroup float s[32];
      s[thread_index_in_threadgroup] = 1.0f;
      out[thread_index_in_threadgroup] = 0;""")
    with pytest.raises(RuntimeError, match=r"out-of-bounds write of threadgroup memory .*`s`, which has 128 bytes"):
        run1(k, [mx.zeros((64,))], 33, 33)


def test_wild_addresses_beyond_every_guard_zone_raise_instead_of_crashing():
    # 2^40 floats = 4 TiB past the buffer: beyond its 16 GiB guard zone (formerly unchecked: a segfault
    # where unmapped, silent corruption where mapped). Without bounds: an error where nothing is mapped.
    k = me.metal_kernel("oob_wild", ["inp"], ["out"], "out[0] = inp[size_t(1) << 40];")
    with pytest.raises(RuntimeError, match=r"(?s)out-of-bounds read of 4 bytes at wild address 0x[0-9a-f]+.*"
                                           r"index into: `inp` element 1099511627776 \(of 64\).*oob_wild\.metal"):
        run1(k, [mx.zeros((64,))], 1, 1, out_shapes=[(1,)])
    k = me.metal_kernel("oob_wild_unchecked", ["inp"], ["out"], "out[size_t(1) << 46] = inp[0];", bounds=False)
    with pytest.raises(RuntimeError, match=r"out-of-bounds write of 4 bytes at wild address .*no writable memory"):
        run1(k, [mx.zeros((64,))], 1, 1, out_shapes=[(1,)])


def test_outputs_not_written_are_poisoned_unless_init_value():
    k = me.metal_kernel("half_writer", ["inp"], ["out"], "uint i = thread_position_in_grid.x; "
                        "if (i % 2 == 0) out[i] = inp[i];")
    (o,) = run1(k, [mx.ones((64,))], 64, 64)
    assert (o[::2] == 1).all() and np.isnan(o[1::2]).all()
    (o,) = run1(k, [mx.ones((64,))], 64, 64, init_value=3)
    assert (o[::2] == 1).all() and (o[1::2] == 3).all()


# --------------------------------------------------------------- traffic ----
ROW_SRC = """
  // one threadgroup per row; reads every element once, writes one float per row
  threadgroup float partial[32];
  uint row = threadgroup_position_in_grid.y;
  uint D = uint(x_shape[1]);
  float acc = 0.0f;
  for (uint c = thread_index_in_threadgroup; c < D; c += threads_per_threadgroup.x)
    acc += static_cast<float>(x[size_t(row) * D + c]) * static_cast<float>(y[size_t(row) * D + c]);
  acc = simd_sum(acc);
  if (thread_index_in_simdgroup == 0) partial[simdgroup_index_in_threadgroup] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simdgroup_index_in_threadgroup == 0) {
    float v = thread_index_in_simdgroup < simdgroups_per_threadgroup ? partial[thread_index_in_simdgroup] : 0.0f;
    v = simd_sum(v);
    if (thread_index_in_simdgroup == 0) out[row] = v;
  }
"""


@pytest.mark.parametrize("dtype,tg", [(mx.float32, 256), (mx.bfloat16, 96)])
def test_traffic_counts_are_exact(dtype, tg):
    k = me.metal_kernel("rowdot", ["x", "y"], ["out"], ROW_SRC)
    rows, d = 5, 1000
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((rows, d)).astype(np.float32)).astype(dtype)
    y = mx.array(rng.standard_normal((rows, d)).astype(np.float32)).astype(dtype)
    with me.LaunchRecorder() as rec:
        (o,) = k(inputs=[x, y], grid=(tg, rows, 1), threadgroup=(tg, 1, 1), output_shapes=[(rows,)],
                 output_dtypes=[mx.float32])
        mx.eval(o)
    ref = (np.array(x.astype(mx.float32)).astype(np.float64) * np.array(y.astype(mx.float32))).sum(1)
    np.testing.assert_allclose(np.array(o), ref, rtol=1e-4, atol=1e-4)
    (r,) = rec.launches
    assert r.name == "rowdot" and r.groups_run == rows and r.threads_run == rows * tg
    for name in ("x", "y"):
        b = r[name]
        assert b.kind == "input" and b.size == rows * d and b.itemsize == dtype.size
        assert b.bytes_read == rows * d * dtype.size and b.elements_read == rows * d
        assert b.distinct_read == rows * d and b.read_ops == rows * d  # every element exactly once
        assert b.bytes_written == 0
    out = r["out"]
    assert out.kind == "output" and out.bytes_written == 4 * rows and out.distinct_written == rows
    assert out.write_ops == rows and out.bytes_read == 0
    assert r["x_shape"].kind == "aux" and r["x_shape"].distinct_read == 1  # only x_shape[1] is used


def test_traffic_counts_vector_loads_by_bytes():
    src = """
      uint i = thread_position_in_grid.x;
      float4 v = reinterpret_cast<const device float4*>(inp)[i];
      out[i] = v.x + v.y + v.z + v.w;
    """
    k = me.metal_kernel("vec_load", ["inp"], ["out"], src)
    run1(k, [mx.ones((64, 4))], 64, 64)
    r = me.last_launch("vec_load")
    assert r["inp"].bytes_read == 64 * 16 and r["inp"].distinct_read == 256 and r["inp"].elements_read == 256
    assert r["out"].distinct_written == 64


def test_metal_float_constants():
    src = """
      uint i = thread_position_in_grid.x;
      float c[7] = {INFINITY, -INFINITY, NAN, HUGE_VALF, MAXFLOAT, FLT_MIN, FLT_EPSILON};
      out[i] = c[i] + 0.0f * inp[i];
    """
    k = me.metal_kernel("float_constants", ["inp"], ["out"], src)
    (out,) = k(inputs=[mx.zeros((8,))], grid=(7, 1, 1), threadgroup=(7, 1, 1),
               output_shapes=[(7,)], output_dtypes=[mx.float32])
    f32 = np.finfo(np.float32)
    want = np.array([np.inf, -np.inf, np.nan, np.inf, f32.max, f32.tiny, f32.eps], dtype=np.float32)
    np.testing.assert_array_equal(np.array(out), want)
