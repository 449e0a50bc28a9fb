"""The kernels under the emulator's checking modes: traffic (each element read once, one value written
per row), race (no threadgroup-memory race), bounds (no out-of-bounds access) on every variant, and
sparse launches over more than 2^32 elements (64-bit offsets).

These checks exist only in the Metal-on-CPU emulator (tests/metal_emulator); on a Mac with Metal the
numeric tests in test_kernels.py run on the GPU instead, and this module is skipped for that reason.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import _oracle as oracle
from kl_metal import metal
from test_kernels import DTYPES, ENV_NAMES, chain_length, fused_kernels, make_inputs

pytestmark = pytest.mark.skipif(mx.metal.is_available(), reason="emulator-only checks; Metal runs test_kernels.py")

VARIANT_SHAPES = {  # a shape per forward variant, with a partial last threadgroup where there can be one
    "small": (37, 33, 1),
    "block": (3, 257, 1),
    "looped": (2, 4097, 1),
    "strided": (3, 100, 37),
}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def recorder():
    from metal_emulator import LaunchRecorder

    return LaunchRecorder()


def run_all(shape, pair="bf16-f32", weighted=True, seed=0):
    """Forward, dx and dt for one shape; returns the inputs, the per-row cotangent and the results."""
    x, t, w = make_inputs(shape, DTYPES[pair], seed=seed, weighted=weighted)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((shape[0], shape[2])).astype(np.float32)
    g[rng.random(g.shape) < 0.3] = 0.0
    g = mx.array(g)
    loss, _ = metal.row_loss(x, t, w)
    dx = metal.grad_inputs(t, g, (), x.dtype)
    dt = metal.grad_targets(x, t, g, ())
    mx.eval(loss, dx, dt)
    return x, t, w, g, loss, dx, dt


# ------------------------------------------------------------------------------------ traffic


@pytest.mark.parametrize("variant", list(VARIANT_SHAPES))
def test_traffic_each_element_once(clean_env, variant):
    shape = VARIANT_SHAPES[variant]
    outer, d, inner = shape
    with fused_kernels(traffic=True, coverage=True), recorder() as rec:
        x, t, w, g, *_ = run_all(shape, weighted=True)
    rows = outer * inner
    live_rows = int(np.count_nonzero(np.array(w)))
    forward = rec.last(metal.plan(shape, x.dtype, t.dtype, True).kernel)
    for name in ("x", "t"):
        # every element of a weighted row read exactly once; rows of weight 0 not at all
        assert forward[name].elements_read == live_rows * d, (name, forward[name])
        assert forward[name].distinct_read == live_rows * d
        assert forward[name].bytes_written == 0
    assert forward["loss"].elements_written == rows and forward["loss"].distinct_written == rows
    assert forward["loss"].bytes_read == 0
    live = int(np.count_nonzero(np.array(g))) * d
    dx = rec.last("kl_grad_inputs")
    assert "x" not in dx.buffers  # dx never sees the inputs
    assert dx["t"].elements_read == live and dx["t"].distinct_read == live
    assert dx["dx"].elements_written == x.size and dx["dx"].distinct_written == x.size
    dt = rec.last("kl_grad_targets")
    for name in ("x", "t"):
        assert dt[name].elements_read == live and dt[name].distinct_read == live
    assert dt["dt"].elements_written == t.size and dt["dt"].distinct_written == t.size


def test_traffic_unweighted_reads_everything_once(clean_env):
    for shape in VARIANT_SHAPES.values():
        with fused_kernels(traffic=True, coverage=True), recorder() as rec:
            x, t, _ = make_inputs(shape, DTYPES["f16"], seed=1)
            mx.eval(metal.row_loss(x, t, None)[0])
        forward = rec.last(metal.plan(shape, x.dtype, t.dtype, False).kernel)
        assert forward["x"].elements_read == x.size and forward["t"].elements_read == t.size
        assert forward["w"].bytes_read == 0  # the placeholder weight is never read
        assert forward["x"].bytes_read == 2 * x.size  # float16: 2 bytes per element


# ------------------------------------------------------------------------------------ race and bounds


@pytest.mark.parametrize("variant", list(VARIANT_SHAPES))
@pytest.mark.parametrize("threads", [None, 100])
def test_race_and_bounds_clean(clean_env, variant, threads):
    """Threads + race detection and checked buffers on every kernel, at the default threadgroup size
    and at one that is not a multiple of 32 (partial simdgroups)."""
    if threads is not None:
        clean_env.setenv("KL_METAL_THREADGROUP_SIZE", str(threads))
        clean_env.setenv("KL_METAL_SMALL_ROWS_PER_THREADGROUP", "3")
    shape = VARIANT_SHAPES[variant]
    if variant == "looped":
        shape = (1, 4097, 1)  # one threadgroup is enough; threads mode is slow
    with fused_kernels(race=True, bounds=True):
        x, t, w, g, loss, dx, dt = run_all(shape, pair="f32", seed=3)
    ref, magnitude = oracle.row_loss(x, t, w)
    oracle.assert_rows_close(loss, ref, magnitude,
                             chain_length(metal.plan(shape, x.dtype, t.dtype, True), shape[1]))
    oracle.assert_grads_close(dx, *oracle.grad_inputs(t, g), "dx")
    oracle.assert_grads_close(dt, *oracle.grad_targets(x, t, g), "dt")


# ------------------------------------------------------------------------------------ > 2^32 elements


def _sparse(shape, dtype):
    from metal_emulator import SparseBuffer

    return SparseBuffer(shape, dtype)


def _fill(buffer, index, values: np.ndarray, dtype):
    """Write float32 `values` rounded to `dtype` into buffer.array[index] (bfloat16 as its bits)."""
    rounded = oracle.as_mx(values, dtype)
    if dtype == mx.bfloat16:
        buffer.array[index] = np.array(rounded.view(mx.uint16))
    else:
        buffer.array[index] = np.array(rounded)
    return rounded


def _read(buffer, index, dtype):
    raw = np.array(buffer.array[index])
    if dtype == mx.bfloat16:
        return mx.array(raw).view(mx.bfloat16)
    return mx.array(raw)


@pytest.mark.parametrize("d, rows_above", [(4096, 1), (151936, 1)])
def test_sparse_forward_beyond_2_32_elements(clean_env, d, rows_above):
    """Rows whose elements start past 2^32: a 32-bit offset would wrap onto row 0's data."""
    rows = (2**32) // d + 1 + rows_above
    shape = (rows, d, 1)
    dtypes = DTYPES["bf16-f32"]
    launch = metal.plan(shape, *dtypes, False)
    checked = [0, rows - 2, rows - 1]  # row 0 and rows past the 2^32 boundary
    assert (rows - 1) * d >= 2**32
    rng = np.random.default_rng(5)
    with fused_kernels(bounds=True):
        x, t = _sparse(shape, dtypes[0]), _sparse(shape, dtypes[1])
        xs, ts = [], []
        for r in checked:
            xs.append(_fill(x, r, oracle.log_probabilities(rng, (d, 1), axis=0), dtypes[0]))
            ts.append(_fill(t, r, oracle.log_probabilities(rng, (d, 1), axis=0), dtypes[1]))
        groups = [(0, r, 0) for r in checked]
        (loss,), record = metal.kernel(launch.kernel).run_sparse(
            inputs=[x, t, np.ones(1, np.float32), 1], output_shapes=[(rows, 1)],
            output_dtypes=[mx.float32], grid=launch.grid, threadgroup=launch.threadgroup,
            template=list(launch.template), groups=groups)
    assert record.groups_run == len(checked)
    for r, xr, tr in zip(checked, xs, ts):
        ref, magnitude = oracle.row_loss(xr.reshape(1, d, 1), tr.reshape(1, d, 1))
        oracle.assert_rows_close(loss.array[r:r + 1], ref, magnitude, chain_length(launch, d), f"row {r}")


def test_sparse_backward_beyond_2_32_elements(clean_env):
    d = 4096
    rows = (2**32) // d + 2
    shape = (rows, d, 1)
    x_dtype, t_dtype = DTYPES["bf16-f32"]
    rng = np.random.default_rng(6)
    checked = [0, rows - 1]
    g = np.zeros((rows, 1), np.float32)
    g[checked] = [[0.75], [-1.5]]
    with fused_kernels(bounds=True):
        x, t = _sparse(shape, x_dtype), _sparse(shape, t_dtype)
        values = {}
        for r in checked:
            values[r] = (_fill(x, r, oracle.log_probabilities(rng, (d, 1), axis=0), x_dtype),
                         _fill(t, r, oracle.log_probabilities(rng, (d, 1), axis=0), t_dtype))
        for op, out_dtype in (("grad_inputs", x_dtype), ("grad_targets", t_dtype)):
            launch = metal.plan(shape, x_dtype, t_dtype, False, op=op)
            per_row_groups = -(-launch.grid[0] // launch.threadgroup[0])
            groups = [(gx, r, 0) for r in checked for gx in range(per_row_groups)]
            inputs = [t, g, 1] if op == "grad_inputs" else [x, t, g, 1]
            (out,), record = metal.kernel(launch.kernel).run_sparse(
                inputs=inputs, output_shapes=[shape], output_dtypes=[out_dtype], grid=launch.grid,
                threadgroup=launch.threadgroup, template=list(launch.template), groups=groups)
            assert record.groups_run == len(groups)
            for r in checked:
                xr, tr = values[r]
                gr = mx.array(g[r:r + 1])
                got = _read(out, r, out_dtype).reshape(1, d, 1)
                if op == "grad_inputs":
                    want, scale = oracle.grad_inputs(tr.reshape(1, d, 1), gr)
                else:
                    want, scale = oracle.grad_targets(xr.reshape(1, d, 1), tr.reshape(1, d, 1), gr)
                oracle.assert_grads_close(got, want, scale, f"{op} row {r}")


def test_sparse_strided_beyond_2_32_elements(clean_env):
    """Middle-axis reduction whose last outer slice starts past 2^32."""
    d, inner = 4096, 1024
    outer = (2**32) // (d * inner) + 1  # 1025 slices... the last one starts at 2^32
    shape = (outer, d, inner)
    dtypes = DTYPES["f16"]
    launch = metal.plan(shape, *dtypes, False)
    rng = np.random.default_rng(7)
    last = outer - 1
    assert last * d * inner >= 2**32
    with fused_kernels(bounds=True):
        x, t = _sparse(shape, dtypes[0]), _sparse(shape, dtypes[1])
        # only the first columns' threadgroup of the last outer slice runs: fill those columns
        width = launch.threadgroup[0]
        xs = _fill(x, (last, slice(None), slice(0, width)),
                   oracle.log_probabilities(rng, (d, width), axis=0), dtypes[0])
        ts = _fill(t, (last, slice(None), slice(0, width)),
                   oracle.log_probabilities(rng, (d, width), axis=0), dtypes[1])
        (loss,), record = metal.kernel(launch.kernel).run_sparse(
            inputs=[x, t, np.ones(1, np.float32), inner], output_shapes=[(outer, inner)],
            output_dtypes=[mx.float32], grid=launch.grid, threadgroup=launch.threadgroup,
            template=list(launch.template), groups=[(0, 0, last)])
    ref, magnitude = oracle.row_loss(xs.reshape(1, d, width), ts.reshape(1, d, width))
    oracle.assert_rows_close(loss.array[last:last + 1, :width], ref, magnitude, chain_length(launch, d))


# ------------------------------------------------------------------------------------ launch splitting


def test_outer_split_into_several_launches(clean_env, monkeypatch):
    """Beyond 2^31 - 1 rows the grid no longer fits a C int: outer is split over several launches.
    Exercised here with the limits lowered."""
    monkeypatch.setattr(metal, "MAX_GRID", 6)
    monkeypatch.setattr(metal, "MAX_ROWS_PER_LAUNCH", 4)
    with fused_kernels(), recorder() as rec:
        for shape in [(11, 33, 1), (9, 5, 3)]:
            x, t, w, g, loss, dx, dt = run_all(shape, pair="f32", seed=8)
            launch = metal.plan(shape, x.dtype, t.dtype, True)
            assert launch.launches == 3
            ref, magnitude = oracle.row_loss(x, t, w)
            oracle.assert_rows_close(loss, ref, magnitude, chain_length(launch, shape[1]))
            oracle.assert_grads_close(dx, *oracle.grad_inputs(t, g), "dx")
            oracle.assert_grads_close(dt, *oracle.grad_targets(x, t, g), "dt")
    assert len(rec.launches) == 2 * 3 * 3
