"""The logits kernels (kernels/kl_logits.metal via kl_metal.logits._Fused) against the float64 oracle in
tests/test_logits_oracle.py, on the GPU where MLX has Metal, else under the Metal-on-CPU emulator.

Forward and both gradients x dtype pairs x row lengths (block and looped launches, partial last
steps, partial simdgroups), temperatures, row weights, every -inf/NaN convention, launch settings,
traffic (each logit read once per pass) and the race checker; then the public function end to end.

Tolerances: the forward bound is Reference.loss_tolerance with the kernel's own summation chain
(`chain`), the gradients' Reference.grad_scales plus one rounding to their dtype (see the oracle).

Cost control (the emulator compiles each specialization once, ~1 s; D is a template argument): the
full length list runs for float32; the other dtype pairs cross each launch boundary with fewer lengths.
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from kl_metal import logits, metal
from _oracle import as_mx, assert_grads_close
from test_logits_oracle import INF, Reference, assert_loss_close, random_logits
from test_logits import DTYPES, check, edge_rows
from test_kernels import ON_METAL, fused, fused_kernels  # noqa: F401 (fused is a fixture)

D_ALL = [1, 3, 33, 1000, 4096, 4097, 32000, 151936]
D_FEW = [33, 4097, 151936]
ENV_NAMES = [var.name for var in metal.SETTINGS]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def chain(launch: metal.LaunchPlan, length: int) -> int:
    """Longest float32 chain a term goes through under `launch`: the elements one thread folds in
    sequence (ceil(D / threads) + N_READS), one rescaling per step, and the simd/threadgroup levels
    (at most 32 + 32)."""
    threads = launch.threadgroup[0]
    n_reads = dict(launch.template)["N_READS"]
    steps = math.ceil(length / (threads * n_reads))
    return math.ceil(length / threads) + n_reads + 2 * steps + 64


def rows_for(length: int) -> int:
    return 5 if length <= 4097 else 2


def run_primitive(s, t, w, T, g):
    """Forward, then both gradients with per-row cotangent g, through the fused backend."""
    inv = 1.0 / T
    loss, stats = logits._Fused.forward(s, t, w, inv)
    gw = g if w is None else g * w
    ds = logits._Fused.grad_student(s, t, stats, gw, inv)
    dt = logits._Fused.grad_teacher(s, t, stats, gw, inv)
    mx.eval(loss, stats, ds, dt)
    return loss, stats, ds, dt


def check_primitive(s, t, T=1.0, w=None, rows=None, what=""):
    rows_, length = s.shape
    launch = logits.plan_forward(rows_, length, s.dtype, t.dtype, w is not None)
    rng = np.random.default_rng(length)
    g = mx.array(rng.uniform(0.5, 2.0, rows_).astype(np.float32))
    loss, stats, ds, dt = run_primitive(s, t, w, T, g)
    assert loss.dtype == mx.float32 and loss.shape == (rows_,) and stats.shape == (rows_, logits.STATS)
    assert ds.dtype == s.dtype and dt.dtype == t.dtype
    ref = Reference(s, t, T)
    n = chain(launch, length)
    tol = ref.loss_tolerance(n)
    if w is not None:
        wn = np.array(w, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            tol = np.where(wn == 0, 0.0, np.abs(wn) * tol)
    assert_loss_close(loss, ref.loss(w), tol, f"{what} loss {launch.describe()}")
    gw = np.array(g) if w is None else np.array(g) * np.array(w)
    scale_s, scale_t = ref.grad_scales(gw, n)
    keep = slice(None) if rows is None else rows
    assert_grads_close(ds[keep], ref.grad_student(gw)[keep], scale_s[keep], f"{what} d/dstudent")
    assert_grads_close(dt[keep], ref.grad_teacher(gw)[keep], scale_t[keep], f"{what} d/dteacher")
    return loss, stats, ds, dt


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("length", D_ALL)
def test_float32_lengths(fused, clean_env, length):
    rng = np.random.default_rng(length)
    rows = rows_for(length)
    s = mx.array(random_logits(rng, (rows, length)))
    t = mx.array(random_logits(rng, (rows, length), offset=2.0))
    check_primitive(s, t, 1.0, what=f"f32 D={length}")


@pytest.mark.parametrize("pair", [k for k in DTYPES if k != "f32"])
@pytest.mark.parametrize("length", D_FEW)
def test_half_types_and_mixed(fused, clean_env, pair, length):
    rng = np.random.default_rng(length + 1)
    rows = rows_for(length)
    s = as_mx(random_logits(rng, (rows, length)), DTYPES[pair][0])
    t = as_mx(random_logits(rng, (rows, length), offset=-1.0), DTYPES[pair][1])
    check_primitive(s, t, 2.0, what=f"{pair} D={length}")


@pytest.mark.parametrize("T", [0.3, 1.0, 3.7])
def test_temperatures(fused, clean_env, T):
    rng = np.random.default_rng(11)
    s, t = mx.array(random_logits(rng, (3, 4097))), mx.array(random_logits(rng, (3, 4097)))
    check_primitive(s, t, T, what=f"T={T}")


def test_row_weights_skip_masked_rows(fused, clean_env):
    rng = np.random.default_rng(12)
    s_np, t_np = random_logits(rng, (6, 4097)), random_logits(rng, (6, 4097))
    w_np = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 1.0], np.float32)
    s_np[w_np == 0] = np.nan  # masked rows must not be read
    t_np[w_np == 0] = np.nan
    s, t, w = mx.array(s_np), mx.array(t_np), mx.array(w_np)
    check_primitive(s, t, 1.5, w, what="weighted")
    if fused is not None:
        record = fused.last("kl_logits_forward")
        row_elements = 4097 * int((w_np != 0).sum())
        assert record["student"].distinct_read == row_elements == record["teacher"].distinct_read
        assert record["student"].elements_read == row_elements


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_edge_rows(fused, clean_env, T):
    s_np, t_np = edge_rows()
    s, t = mx.array(s_np), mx.array(t_np)
    # Gradients are specified (finite or zero) on rows 0, 2, 7, 9 (teacher) and also 1 (student).
    _, _, ds, dt = check_primitive(s, t, T, rows=mx.array([0, 2, 7, 9]), what=f"edge T={T}")
    np.testing.assert_array_equal(np.array(ds)[0, 3:5], 0.0)
    np.testing.assert_array_equal(np.array(dt)[0, 3:5], 0.0)
    np.testing.assert_array_equal(np.array(ds)[2], 0.0)
    assert np.isfinite(np.array(ds)[1]).all()
    # Longer rows: the special values in different threads and steps (masked stretch, late maxima).
    rng = np.random.default_rng(13)
    s_np, t_np = random_logits(rng, (4, 5000)), random_logits(rng, (4, 5000))
    s_np[0, 100:3000] = t_np[0, 100:3000] = -INF  # masked vocabulary over many threads
    t_np[1, :4999] = -INF                          # the teacher's only mass in the last thread
    s_np[2, 4500] = -INF                           # student -inf under a finite teacher: +inf
    t_np[3, :] = -INF                              # no teacher distribution
    s_np[3, 17] = np.nan                           # ... and a NaN student: NaN
    loss, _, ds, _ = run_primitive(mx.array(s_np), mx.array(t_np), None, T, mx.ones((4,)))
    ref = Reference(s_np, t_np, T)
    loss = np.array(loss)
    assert loss[2] == INF and np.isnan(loss[3])
    np.testing.assert_allclose(loss[:2], ref.kl[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.array(ds)[0, 100:3000], 0.0)


def test_huge_magnitudes_stay_finite(fused, clean_env):
    rng = np.random.default_rng(14)
    s = mx.array(rng.uniform(-1e4, 1e4, (3, 4097)).astype(np.float32))
    t = mx.array(rng.uniform(-1e4, 1e4, (3, 4097)).astype(np.float32))
    loss, stats, ds, dt = check_primitive(s, t, 1.0, what="+-1e4")
    assert np.isfinite(np.array(loss)).all() and np.isfinite(np.array(ds)).all() and np.isfinite(np.array(dt)).all()
    # A large common offset cancels before it can cost precision.
    base = random_logits(rng, (2, 1000))
    check_primitive(mx.array(base + 1e4), mx.array(base[::-1] + 1e4), 1.0, what="offset 1e4")


# ----------------------------------------------------------------------------- launch settings


@pytest.mark.parametrize("config", [
    {"KL_METAL_THREADGROUP_SIZE": "100"},  # partial last simdgroup
    {"KL_METAL_THREADGROUP_SIZE": "32", "KL_METAL_N_READS": "1"},
    {"KL_METAL_N_READS": "3"},
    {"KL_METAL_THREADGROUP_SIZE": "1"},
])
def test_launch_settings(fused, clean_env, config):
    for name, value in config.items():
        clean_env.setenv(name, value)
    rng = np.random.default_rng(15)
    s, t = mx.array(random_logits(rng, (3, 777))), mx.array(random_logits(rng, (3, 777)))
    check_primitive(s, t, 1.3, what=str(config))


def test_plans(clean_env):
    block = logits.plan_forward(4, 1000, mx.float32, mx.float32, False)
    assert (block.variant, block.grid, block.threadgroup) == ("block", (256, 4, 1), (256, 1, 1))
    looped = logits.plan_forward(4, 151936, mx.bfloat16, mx.float32, True)
    assert (looped.variant, looped.grid, looped.threadgroup) == ("looped", (1024, 4, 1), (1024, 1, 1))
    assert dict(looped.template)["WEIGHTED"] is True and dict(looped.template)["S"] == mx.bfloat16
    grad = logits.plan_gradient("teacher", 4, 1000, mx.float32, mx.float16)
    assert (grad.kernel, grad.grid, grad.threadgroup) == ("kl_logits_grad_teacher", (250, 4, 1), (250, 1, 1))
    clean_env.setenv("KL_METAL_N_READS", "0")
    with pytest.raises(ValueError, match="KL_METAL_N_READS"):
        logits.plan_forward(4, 1000, mx.float32, mx.float32, False)


# ----------------------------------------------------------------------------- traffic and races


@pytest.mark.skipif(ON_METAL, reason="traffic and race modes exist only in the emulator")
def test_each_logit_read_once_per_pass(fused, clean_env):
    rng = np.random.default_rng(16)
    rows, length = 2, 32000
    s = as_mx(random_logits(rng, (rows, length)), mx.bfloat16)
    t = mx.array(random_logits(rng, (rows, length)))
    run_primitive(s, t, None, 2.0, mx.ones((rows,)))
    for name in ("kl_logits_forward", "kl_logits_grad_student", "kl_logits_grad_teacher"):
        record = fused.last(name)
        for buffer in ("student", "teacher"):
            traffic = record[buffer]
            assert traffic.bytes_read == traffic.nbytes, (name, buffer, traffic)
            assert traffic.distinct_read == rows * length, (name, buffer, traffic)
            assert traffic.bytes_written == 0
    forward = fused.last("kl_logits_forward")
    assert forward["loss"].elements_written == rows and forward["stats"].elements_written == rows * logits.STATS
    assert fused.last("kl_logits_grad_student")["ds"].distinct_written == rows * length
    assert fused.last("kl_logits_grad_student")["ds"].elements_written == rows * length


@pytest.mark.skipif(ON_METAL, reason="traffic and race modes exist only in the emulator")
def test_teacher_gradient_only_when_asked(fused, clean_env):
    rng = np.random.default_rng(17)
    s, t = mx.array(random_logits(rng, (2, 500))), mx.array(random_logits(rng, (2, 500)))
    ds = mx.grad(lambda a: logits.kl_div_from_logits(a, mx.stop_gradient(t), reduction="sum"))(s)
    mx.eval(ds)
    names = [record.name for record in fused.launches]
    assert names == ["kl_logits_forward", "kl_logits_grad_student"], names


@pytest.mark.skipif(ON_METAL, reason="traffic and race modes exist only in the emulator")
def test_no_races(clean_env):
    rng = np.random.default_rng(18)
    s, t = mx.array(random_logits(rng, (2, 5000))), mx.array(random_logits(rng, (2, 5000)))
    with fused_kernels(race=True):
        run_primitive(s, t, mx.array([1.0, 0.0]), 1.0, mx.ones((2,)))
        clean_env.setenv("KL_METAL_THREADGROUP_SIZE", "100")
        run_primitive(s, t, None, 1.0, mx.ones((2,)))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_public_function_end_to_end(fused, clean_env, reduction):
    rng = np.random.default_rng(19)
    s = as_mx(random_logits(rng, (2, 3, 3000)), mx.bfloat16)
    t = mx.array(random_logits(rng, (3, 3000)))
    mask = mx.array([[True, False, True], [True, True, False]])
    decision = logits.explain_from_logits(s, t, temperature=2.0, mask=mask)
    assert decision.path == "fused" and decision.launch.kernel == "kl_logits_forward"
    assert [plan.kernel for plan in decision.gradient_launches] == ["kl_logits_grad_student",
                                                                     "kl_logits_grad_teacher"]
    assert "kl_logits_grad_teacher" in str(decision) and "kl_grad_inputs" not in str(decision)
    check(s, t, 2.0, -1, reduction, mask, what="fused end to end")  # (the composed ops' looser chain)
    ds, dt = mx.grad(lambda a, b: logits.kl_div_from_logits(a, b, temperature=2.0, reduction=reduction,
                                                             mask=mask).astype(mx.float32).sum(), argnums=(0, 1))(s, t)
    assert ds.dtype == mx.bfloat16 and dt.dtype == mx.float32
    np.testing.assert_array_equal(np.array(ds.astype(mx.float32))[0, 1], 0.0)
    # The fused and the composed-op paths agree.
    clean_env.setenv("KL_METAL_BACKEND", "fallback")
    ds_ref, dt_ref = mx.grad(lambda a, b: logits.kl_div_from_logits(a, b, temperature=2.0, reduction=reduction,
                                                                     mask=mask).astype(mx.float32).sum(),
                             argnums=(0, 1))(s, t)
    np.testing.assert_allclose(np.array(ds.astype(mx.float32)), np.array(ds_ref.astype(mx.float32)),
                               rtol=2**-7, atol=1e-7)
    np.testing.assert_allclose(np.array(dt), np.array(dt_ref), rtol=1e-4, atol=1e-8)


def test_jvp_and_compile_on_the_fused_path(fused, clean_env):
    rng = np.random.default_rng(20)
    s = mx.array(random_logits(rng, (3, 2, 300)))
    t = mx.array(random_logits(rng, (2, 300)))
    fn = lambda a, b: logits.kl_div_from_logits(a, b, temperature=1.5)  # noqa: E731
    ref = Reference(np.array(s).reshape(6, 300), np.broadcast_to(np.array(t), (3, 2, 300)).reshape(6, 300), 1.5)
    tangent_s = mx.array(rng.standard_normal((3, 2, 300)).astype(np.float32))
    (_,), (tangent,) = mx.jvp(lambda a: fn(a, t), [s], [tangent_s])
    want = (ref.grad_student(np.ones(6)) * np.array(tangent_s).reshape(6, 300)).sum(-1)
    np.testing.assert_allclose(np.array(tangent).reshape(-1), want, rtol=1e-5, atol=1e-6)
    compiled = mx.compile(mx.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1)))
    ds, dt = compiled(s, t)
    np.testing.assert_allclose(np.array(ds).reshape(6, 300), ref.grad_student(np.ones(6)), atol=1e-7)
    np.testing.assert_allclose(np.array(dt), ref.grad_teacher(np.ones(6)).reshape(3, 2, 300).sum(0), atol=1e-6)


# MLX 0.32's vmap puts every node between a batched input and the custom function's outputs on its tape,
# including the forward's kernel node (an input of the CustomTransforms primitive through stop_gradient);
# CustomKernel has no vmap rule, so this raises "[Primitive::vmap] Not implemented" on Metal and in the
# emulator alike (the same limitation as kl_div_loss's fused path, tests/test_kernels_e2e.py).
def test_vmap_on_the_fused_path_is_refused_by_mlx(fused, clean_env):
    rng = np.random.default_rng(21)
    s = mx.array(random_logits(rng, (3, 2, 300)))
    t = mx.array(random_logits(rng, (2, 300)))
    fn = lambda a, b: logits.kl_div_from_logits(a, b, temperature=1.5)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[Primitive::vmap\] Not implemented"):
        mx.eval(mx.vmap(fn, in_axes=(0, None))(s, t))