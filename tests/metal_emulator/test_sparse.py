"""Sparse launches: chosen threadgroups of a grid over more than 2^32 elements, on lazily materialised buffers."""

import mlx.core as mx
import numpy as np
import pytest

from ._testutil import me

ROWSUM = """
  uint row = threadgroup_position_in_grid.y;
  uint D = uint(x_shape[1]);
  float acc = 0.0f;
  for (uint c = thread_index_in_threadgroup; c < D; c += threads_per_threadgroup.x)
    acc += float(x[INDEX]);
  acc = simd_sum(acc);
  if (simdgroups_per_threadgroup == 1 && thread_index_in_simdgroup == 0) out[row] = acc;
"""
D = 4096
R = (1 << 20) + 2  # R * D = 2^32 + 8192 elements
TG = 32


def _inputs():
    x = me.SparseBuffer((R, D), mx.float16)
    rng = np.random.default_rng(0)
    rows = {0: None, R // 2: None, R - 1: None}
    for r in rows:
        rows[r] = rng.integers(-8, 8, D).astype(np.float16)  # exact in float32 sums
        x.array[r] = rows[r]
    return x, rows


def test_sparse_launch_beyond_2_pow_32_elements():
    assert R * D > 2**32
    x, rows = _inputs()
    k = me.metal_kernel("sparse_rowsum", ["x"], ["out"], ROWSUM.replace("INDEX", "size_t(row) * D + c"))
    (out,), rec = k.run_sparse(inputs=[x], output_shapes=[(R,)], output_dtypes=[mx.float32], grid=(TG, R, 1),
                               threadgroup=(TG, 1, 1), groups=[(0, r, 0) for r in rows])
    for r, v in rows.items():
        assert out.array[r] == v.astype(np.float64).sum()
    assert rec.groups_run == 3 and rec.threads_run == 3 * TG
    assert rec["x"].distinct_read == 3 * D and rec["x"].bytes_read == 3 * D * 2
    assert rec["out"].distinct_written == 3


def test_sparse_launch_exposes_32_bit_index_overflow():
    x, rows = _inputs()
    k = me.metal_kernel("sparse_rowsum_u32", ["x"], ["out"], ROWSUM.replace("INDEX", "row * D + c"))
    (out,), _ = k.run_sparse(inputs=[x], output_shapes=[(R,)], output_dtypes=[mx.float32], grid=(TG, R, 1),
                             threadgroup=(TG, 1, 1), groups=[(0, R - 1, 0)])
    # (R-1)*D wraps to 4096: the kernel silently sums row 1 (untouched, zeros) instead of row R-1.
    assert rows[R - 1].astype(np.float64).sum() != 0 and out.array[R - 1] == 0


def test_sparse_launch_errors_raise_emulator_error():
    k = me.metal_kernel("sparse_oob", ["x"], ["out"], "out[0] = x[uint(x_shape[0])];")
    x = me.SparseBuffer((100,), mx.float32)
    with pytest.raises(me.EmulatorError, match=r"out-of-bounds read of buffer `x` at element 100\b"):
        k.run_sparse(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1),
                     threadgroup=(1, 1, 1))
    with pytest.raises(ValueError, match="outside the grid"):
        k.run_sparse(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1),
                     threadgroup=(1, 1, 1), groups=[(0, 5, 0)])


# A middle-axis reduction over x of shape (outer, depth, inner) on a 3-D grid (inner, 1, outer), like
# kl_metal's strided kernels: `inner` and `depth` are scalar inputs used as values (`constant int&`).
STRIDED = """
  const size_t o = thread_position_in_grid.z;
  const size_t i = thread_position_in_grid.x;
  const size_t n_inner = size_t(inner);
  float acc = 0.0f;
  for (uint d = 0; d < uint(depth); ++d)
    acc += float(x[(o * size_t(depth) + d) * n_inner + i]);
  out[o * n_inner + i] = acc;
"""
S_DEPTH, S_INNER = 64, 1 << 16
S_OUTER = (1 << 32) // (S_DEPTH * S_INNER) + 1  # the last outer slice starts at element 2^32


def _strided_inputs():
    x = me.SparseBuffer((S_OUTER, S_DEPTH, S_INNER), mx.float16)
    rng = np.random.default_rng(1)
    cols = {(0, 0): None, (S_OUTER - 1, TG): None}  # (outer index, first column) of the groups run
    for o, c in cols:
        cols[o, c] = rng.integers(-8, 8, (S_DEPTH, TG)).astype(np.float16)
        x.array[o, :, c:c + TG] = cols[o, c]
    return x, cols


@pytest.mark.parametrize("scalar", [int, np.int32, mx.array], ids=["int", "numpy-0d", "mx-0d"])
def test_sparse_3d_grid_with_scalar_inputs_beyond_2_pow_32(scalar):
    # Scalars must get MLX's `constant T&` signature: a 1-element copy would make them `constant T*`,
    # and `size_t(inner)` would then convert the pointer (a wild index, formerly a segfault).
    x, cols = _strided_inputs()
    k = me.metal_kernel("sparse_strided", ["x", "inner", "depth"], ["out"], STRIDED)
    ins = [x, scalar(S_INNER), scalar(S_DEPTH)]
    (out,), rec = k.run_sparse(inputs=ins, output_shapes=[(S_OUTER, S_INNER)], output_dtypes=[mx.float32],
                               grid=(S_INNER, 1, S_OUTER), threadgroup=(TG, 1, 1),
                               groups=[(c // TG, 0, o) for o, c in cols])
    assert (S_OUTER - 1) * S_DEPTH * S_INNER >= 2**32
    for (o, c), v in cols.items():
        np.testing.assert_array_equal(out.array[o, c:c + TG], v.astype(np.float64).sum(axis=0))
    assert rec.groups_run == 2 and rec.threads_run == 2 * TG
    assert rec["x"].distinct_read == 2 * TG * S_DEPTH == rec["x"].elements_read
    assert rec["out"].distinct_written == 2 * TG


def test_sparse_wild_pointer_index_raises_instead_of_crashing():
    # `inner` given as a 1-element array is a `constant int*`: size_t(inner) is its address, the index
    # lands far outside every buffer (and its guard zone). Formerly the process died of SIGSEGV.
    x, cols = _strided_inputs()
    k = me.metal_kernel("sparse_strided_ptr", ["x", "inner", "depth"], ["out"], STRIDED)
    with pytest.raises(me.EmulatorError, match=r"(?s)out-of-bounds read of 2 bytes at wild address 0x[0-9a-f]+.*"
                                               r"as an index into: `x` element -?\d+ \(of 4299161600\), `inner`.*sparse_strided_ptr\.metal:\d+: acc \+="):
        k.run_sparse(inputs=[x, np.array([S_INNER], np.int32), S_DEPTH], output_shapes=[(S_OUTER, S_INNER)],
                     output_dtypes=[mx.float32], grid=(S_INNER, 1, S_OUTER), threadgroup=(TG, 1, 1),
                     groups=[(0, 0, S_OUTER - 1)])


@pytest.mark.parametrize("bounds", [True, False])
def test_sparse_accesses_beyond_the_address_space_raise(bounds):
    far = "(size_t(1) << 46)"  # 2^48 bytes past the buffer: never mapped (x86-64 / arm64 user space)
    x = me.SparseBuffer((100,), mx.float32)
    run = dict(output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    k = me.metal_kernel("sparse_wild_read", ["x"], ["out"], f"out[0] = x[{far}];", bounds=bounds)
    with pytest.raises(me.EmulatorError, match=r"(?s)out-of-bounds read of 4 bytes at wild address .*"
                                               r"index into: `x` element 70368744177664 \(of 100\)"):
        k.run_sparse(inputs=[x], **run)
    k = me.metal_kernel("sparse_wild_write", ["x"], ["out"], f"out[{far}] = x[0];", bounds=bounds)
    with pytest.raises(me.EmulatorError, match=r"(?s)out-of-bounds write of 4 bytes at wild address.*"
                                               r"sparse_wild_write\.metal:\d+: out\["):
        k.run_sparse(inputs=[x], **run)


def test_sparse_bounds_mode_rejects_mapped_memory_outside_the_launch_buffers():
    # Another live buffer is mapped and readable, but not this launch's: an error in bounds mode only.
    x, other = me.SparseBuffer((100,), mx.float32), me.SparseBuffer((100,), mx.float32)
    other.array[5] = 42
    offset = np.array((other.ptr - x.ptr) // 4 + 5, np.int64)  # 0-d: `constant int64_t&`
    src = "out[0] = x[off];"
    run = dict(output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    k = me.metal_kernel("sparse_other_buffer", ["x", "off"], ["out"], src)
    with pytest.raises(me.EmulatorError, match=r"out-of-bounds read of 4 bytes at wild address 0x[0-9a-f]+: "
                                               r"outside every buffer"):
        k.run_sparse(inputs=[x, offset], **run)
    k = me.metal_kernel("sparse_other_buffer_unchecked", ["x", "off"], ["out"], src, bounds=False)
    (out,), _ = k.run_sparse(inputs=[x, offset], **run)
    assert out.array[0] == 42
