"""kl_metal.kl_div_loss end to end on the fused path: values, explain(), gradients and transformations
(mx.grad, mx.value_and_grad, mx.vjp, mx.jvp, mx.vmap, mx.compile) with kernels inside.

On the GPU where MLX has Metal, else through the Metal-on-CPU emulator; every test checks that the
fused path was really taken (explain() and a count of kernel launches).
"""
from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

import _oracle as oracle
import kl_metal
from kl_metal import metal
from test_kernels import DTYPES, ENV_NAMES, fused_kernels


class Launches:
    """Kernel launches by kernel name: evaluated launches in the emulator; kernel calls (graph nodes,
    evaluated or not) on Metal, where `exact` is False."""

    def __init__(self, emulator):
        self.emulator = emulator
        self.calls: Counter = Counter()
        self.exact = emulator is not None

    def counts(self) -> Counter:
        if self.emulator is not None:
            return Counter(record.name for record in self.emulator.launches)
        return self.calls

    def __eq__(self, other):
        return self.counts() == Counter(other) if self.exact else set(self.counts()) >= set(other)

    def __getitem__(self, name):
        return self.counts()[name]

    def __repr__(self):
        return f"Launches({dict(self.counts())})"


@pytest.fixture
def launches(monkeypatch):
    for name in ENV_NAMES + ["KL_METAL_BACKEND"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KL_METAL_BACKEND", "fused")  # never silently the fallback in these tests
    with fused_kernels() as emulator:
        record = Launches(emulator)
        if emulator is None:  # count kernel calls through a wrapping factory
            real = metal.set_kernel_factory(None) or mx.fast.metal_kernel

            def factory(**kwargs):
                kernel = real(**kwargs)

                def launch(**call):
                    record.calls[kwargs["name"]] += 1
                    return kernel(**call)

                return launch

            metal.set_kernel_factory(factory)
        yield record


def rows_view(a: mx.array, axis: int) -> mx.array:
    """An N-d array as the oracle's (outer, D, inner)."""
    axis %= a.ndim
    outer = int(np.prod(a.shape[:axis]))
    inner = int(np.prod(a.shape[axis + 1:]))
    return a.reshape(outer, a.shape[axis], inner)


CASES = [
    # (x shape, t shape, axis, dtype pair, variant)
    ((4, 33), (4, 33), -1, "f32", "small"),
    ((2, 3, 300), (1, 3, 300), -1, "bf16-f32", "block"),  # broadcast teacher
    ((2, 4097), (2, 4097), -1, "f16", "looped"),
    ((3, 257, 5), (3, 257, 5), 1, "bf16", "strided"),
]


def inputs_for(x_shape, t_shape, pair, seed=0):
    rng = np.random.default_rng(seed)
    x = oracle.as_mx(oracle.log_probabilities(rng, x_shape, axis=-1), DTYPES[pair][0])
    t = oracle.as_mx(oracle.log_probabilities(rng, t_shape, axis=-1), DTYPES[pair][1])
    return x, t


@pytest.mark.parametrize("x_shape, t_shape, axis, pair, variant", CASES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_and_explain(launches, x_shape, t_shape, axis, pair, variant, reduction):
    x, t = inputs_for(x_shape, t_shape, pair)
    decision = kl_metal.explain(x, t, axis=axis, reduction=reduction)
    assert decision.path == "fused" and decision.launch.variant == variant, str(decision)
    loss = kl_metal.kl_div_loss(x, t, axis=axis, reduction=reduction)
    mx.eval(loss)
    assert launches == {decision.launch.kernel: 1}
    shape = mx.broadcast_shapes(x.shape, t.shape)
    xb, tb = (rows_view(mx.broadcast_to(a, shape), axis) for a in (x, t))
    ref, magnitude = oracle.row_loss(xb, tb)
    if reduction == "sum":
        ref, magnitude = ref.sum(), magnitude.sum()
    elif reduction == "mean":
        ref, magnitude = ref.mean(), magnitude.mean()
    out_dtype = mx.result_type(x.dtype, t.dtype)
    assert loss.dtype == out_dtype
    got = oracle.f64(loss).reshape(np.shape(ref))
    # float32 summation over D and over rows, then one rounding to the output dtype.
    tol = (shape[axis] + 64) * oracle.EPS32 * magnitude + oracle.ROUNDOFF[out_dtype] * np.abs(ref) * 2
    assert np.all(np.abs(got - ref) <= tol + 1e-30), (got, ref)


@pytest.mark.parametrize("x_shape, t_shape, axis, pair, variant", CASES)
def test_grad_with_mask(launches, x_shape, t_shape, axis, pair, variant):
    x, t = inputs_for(x_shape, t_shape, pair, seed=1)
    shape = mx.broadcast_shapes(x.shape, t.shape)
    row_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1:]
    rng = np.random.default_rng(2)
    mask = mx.array(rng.random(row_shape) < 0.7)

    def loss(a, b):
        return kl_metal.kl_div_loss(a, b, axis=axis, reduction="mean", mask=mask).astype(mx.float32)

    value, (dx, dt) = mx.value_and_grad(loss, argnums=(0, 1))(x, t)
    mx.eval(value, dx, dt)
    kernel = metal.plan(rows_view(mx.broadcast_to(x, shape), axis).shape, x.dtype, t.dtype, True).kernel
    assert launches == {kernel: 1, "kl_grad_inputs": 1, "kl_grad_targets": 1}
    assert dx.shape == x.shape and dt.shape == t.shape and dx.dtype == x.dtype and dt.dtype == t.dtype
    # The per-row cotangent: mask / sum(mask), after the cast of the loss to its output dtype.
    w = np.array(mask, dtype=np.float64)
    g = w / w.sum()
    out_dtype = mx.result_type(x.dtype, t.dtype)
    g = oracle.f64(mx.array(np.float32(1.0)).astype(out_dtype)) * g
    g_rows = g.reshape(-1, 1) if axis % len(shape) == len(shape) - 1 else g.reshape(shape[0], -1)
    xb, tb = (rows_view(mx.broadcast_to(a, shape), axis) for a in (x, t))
    want_dx, scale_dx = oracle.grad_inputs(tb, g_rows)
    want_dt, scale_dt = oracle.grad_targets(xb, tb, g_rows)
    if t.shape != shape:
        # A broadcast teacher's gradient is summed over the broadcast axis (MLX's broadcast vjp), in
        # float32 here (one more rounding: covered by doubling the error scale).
        t_rows = rows_view(t, axis).shape
        want_dt = want_dt.reshape(shape).sum(axis=0, keepdims=True).reshape(t_rows)
        scale_dt = 2 * scale_dt.reshape(shape).sum(axis=0, keepdims=True).reshape(t_rows)
    oracle.assert_grads_close(rows_view(dt, axis), want_dt, scale_dt, "dt")
    oracle.assert_grads_close(rows_view(dx, axis), want_dx, scale_dx, "dx")


def test_stop_gradient_teacher_launches_no_target_gradient(launches):
    x, t = inputs_for((8, 257), (8, 257), "bf16-f32", seed=3)
    loss = lambda a: kl_metal.kl_div_loss(a, mx.stop_gradient(t), reduction="sum")  # noqa: E731
    mx.eval(mx.grad(loss)(x))
    assert launches == {"kl_grad_inputs": 1}  # the loss value itself is not needed by mx.grad
    mx.eval(mx.value_and_grad(loss)(x))
    assert launches == {"kl_forward_row": 1, "kl_grad_inputs": 2}


def test_vjp_matches_fallback(launches, monkeypatch):
    x, t = inputs_for((6, 4097), (6, 4097), "f32", seed=4)
    cotangent = mx.array(np.random.default_rng(5).standard_normal(6).astype(np.float32))
    f = lambda a, b: [kl_metal.kl_div_loss(a, b)]  # noqa: E731
    (loss,), (dx, dt) = mx.vjp(f, [x, t], [cotangent])
    mx.eval(loss, dx, dt)
    monkeypatch.setenv("KL_METAL_BACKEND", "fallback")
    (ref_loss,), (ref_dx, ref_dt) = mx.vjp(f, [x, t], [cotangent])
    np.testing.assert_allclose(np.array(loss), np.array(ref_loss), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(dx), np.array(ref_dx), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.array(dt), np.array(ref_dt), rtol=1e-5, atol=1e-10)


def test_jvp(launches):
    x, t = inputs_for((5, 33), (5, 33), "f32", seed=6)
    rng = np.random.default_rng(7)
    tx, tt = (mx.array(rng.standard_normal((5, 33)).astype(np.float32)) for _ in range(2))
    (loss,), (tangent,) = mx.jvp(lambda a, b: [kl_metal.kl_div_loss(a, b)], [x, t], [tx, tt])
    mx.eval(loss, tangent)
    assert launches["kl_forward_small"] >= 1 and launches["kl_grad_inputs"] >= 1
    ones = np.ones((5, 1))
    dx, _ = oracle.grad_inputs(rows_view(t, -1), ones)
    dt, _ = oracle.grad_targets(rows_view(x, -1), rows_view(t, -1), ones)
    want = (dx[..., 0] * oracle.f64(tx) + dt[..., 0] * oracle.f64(tt)).sum(-1)
    np.testing.assert_allclose(np.array(tangent), want, rtol=1e-5, atol=1e-6)


# MLX 0.32's vmap transforms a custom_function's inner graph too: every node downstream of the batched
# inputs lands on its tape, the forward's kernel launch included (mx.stop_gradient does not cut vmap's
# tape as it cuts jvp's), and CustomKernel (like the emulator's kernel) has no vmap rule, so mx.vmap
# raises "[Primitive::vmap] Not implemented" before the custom vmap rule is reached.
def test_vmap_on_the_fused_path_is_refused_by_mlx(launches):
    """A documented MLX limitation (README, "Semantics"): if MLX ever vmaps through kernel launches this
    fails, and the fused path's vmap rule (shared with the fallback, tested in test_autograd.py) should
    then be tested here against the oracle."""
    x, t = inputs_for((3, 4, 33), (3, 4, 33), "bf16-f32", seed=8)
    with pytest.raises(ValueError, match=r"\[Primitive::vmap\] Not implemented"):
        mx.eval(mx.vmap(lambda a, b: kl_metal.kl_div_loss(a, b, reduction="sum"))(x, t))


def test_compile(launches):
    x, t = inputs_for((7, 257, 3), (7, 257, 3), "f16", seed=9)

    def step(a, b):
        return mx.value_and_grad(lambda u: kl_metal.kl_div_loss(u, b, axis=1, reduction="sum"))(a)

    eager = step(x, t)
    compiled = mx.compile(step)(x, t)
    mx.eval(eager, compiled)
    assert launches["kl_forward_strided"] >= 2 and launches["kl_grad_inputs"] >= 2
    np.testing.assert_array_equal(np.array(eager[1]), np.array(compiled[1]))
    np.testing.assert_allclose(float(eager[0]), float(compiled[0]), rtol=2**-10)


def test_settings_read_at_call_time(launches, monkeypatch):
    x, t = inputs_for((5, 257), (5, 257), "f32", seed=10)
    first = kl_metal.kl_div_loss(x, t)
    assert kl_metal.explain(x, t).launch.variant == "block"
    monkeypatch.setenv("KL_METAL_BLOCK_MAX_D", "100")
    monkeypatch.setenv("KL_METAL_THREADGROUP_SIZE", "96")
    decision = kl_metal.explain(x, t)
    assert decision.launch.variant == "looped" and decision.launch.threadgroup == (96, 1, 1)
    assert "KL_METAL_THREADGROUP_SIZE=96" in str(decision)
    second = kl_metal.kl_div_loss(x, t)
    np.testing.assert_allclose(np.array(first), np.array(second), rtol=1e-5)
    monkeypatch.setenv("KL_METAL_N_READS", "0")
    with pytest.raises(ValueError, match="KL_METAL_N_READS"):
        kl_metal.kl_div_loss(x, t)
