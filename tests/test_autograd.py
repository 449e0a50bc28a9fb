"""Gradients and transformations of kl_metal.kl_div_loss on the path that runs here."""
from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import kl_metal
from _oracle import as_mx, assert_grads_close, f64, grad_inputs, grad_targets

# Every test here runs on the fallback both in one piece and cut into row chunks (conftest.py).
pytestmark = pytest.mark.usefixtures("fallback_chunking")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def data(shape, dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return as_mx(logp, dtype)


def as_rows(a):
    """(rows, D) -> the oracle's (outer, D, inner=1) layout."""
    return a.reshape(a.shape[0], a.shape[1], 1)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("t_dtype", DTYPES)
def test_gradients_match_the_analytic_formula(x_dtype, t_dtype):
    x, t = data((6, 37), x_dtype, 1), data((6, 37), t_dtype, 2)
    cotangent = mx.array(np.random.default_rng(3).standard_normal(6).astype(np.float32))
    _, (dx, dt) = mx.vjp(lambda a, b: [kl_metal.kl_div_loss(a, b).astype(mx.float32)], [x, t], [cotangent])
    assert dx.dtype == x_dtype and dt.dtype == t_dtype
    # The cotangent reaches the primitive through the cast of the loss from its output dtype, so it
    # arrives rounded to that dtype: the oracle uses the same rounded cotangent.
    g = cotangent.astype(mx.result_type(x_dtype, t_dtype)).reshape(6, 1)
    # Tolerances: float32 math, then one rounding to each gradient's dtype (see _oracle); the fallback
    # keeps exp(t) in bfloat16 when both arguments are bfloat16, which is a second rounding of that size.
    on_fallback = kl_metal.explain(x, t).path == "fallback"
    roundings = 2 if on_fallback and x_dtype == t_dtype == mx.bfloat16 else 1
    want, scale = grad_inputs(as_rows(t), g)
    assert_grads_close(as_rows(dx), want, scale, "dx", roundings)
    want, scale = grad_targets(as_rows(x), as_rows(t), g)
    assert_grads_close(as_rows(dt), want, scale, "dt", roundings)


def test_gradients_match_mlx_reference_where_finite():
    x, t = data((5, 64), seed=4), data((5, 64), seed=5)
    loss = lambda f: (lambda a, b: f(a, b, reduction="mean"))  # noqa: E731
    ours = mx.grad(loss(kl_metal.kl_div_loss), argnums=(0, 1))(x, t)
    ref = mx.grad(loss(nn.losses.kl_div_loss), argnums=(0, 1))(x, t)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-8)


def test_zero_probability_and_masked_rows_have_exactly_zero_gradients():
    x = data((3, 4), seed=6)
    t = mx.log(mx.array([[0.5, 0.0, 0.25, 0.25], [0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    mask = mx.array([True, True, False])
    dx, dt = mx.grad(lambda a, b: kl_metal.kl_div_loss(a, b, reduction="sum", mask=mask), argnums=(0, 1))(x, t)
    dx, dt, tt = np.array(dx), np.array(dt), np.array(t)
    zero = (tt == -np.inf) | ~np.array(mask)[:, None]
    assert np.all(dx[zero] == 0) and np.all(dt[zero] == 0)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dt)) and np.all(dx[~zero] != 0)


def test_broadcast_operand_gradient_is_summed():
    x, t = data((4, 9), seed=7), data((1, 9), seed=8)
    dt = mx.grad(lambda b: kl_metal.kl_div_loss(x, b, reduction="sum"), argnums=0)(t)
    want, _ = grad_targets(as_rows(x), as_rows(mx.broadcast_to(t, (4, 9))), mx.ones((4, 1)))
    np.testing.assert_allclose(np.array(dt), want.sum(0).reshape(1, 9), rtol=1e-5)


def test_value_and_grad_and_compile():
    x, t = data((4, 16), seed=9), data((4, 16), seed=10)
    f = lambda a, b: kl_metal.kl_div_loss(a, b, reduction="sum")  # noqa: E731
    value, (dx, dt) = mx.value_and_grad(f, argnums=(0, 1))(x, t)
    cvalue, (cdx, cdt) = mx.compile(mx.value_and_grad(f, argnums=(0, 1)))(x, t)
    np.testing.assert_allclose(float(value), float(nn.losses.kl_div_loss(x, t, reduction="sum")), rtol=1e-6)
    for a, b in ((value, cvalue), (dx, cdx), (dt, cdt)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)


def test_jvp_matches_finite_differences_of_the_oracle():
    x, t = data((3, 8), seed=11), data((3, 8), seed=12)
    rng = np.random.default_rng(13)
    vx, vt = (mx.array(rng.standard_normal((3, 8)).astype(np.float32)) for _ in range(2))
    _, (tangent,) = mx.jvp(lambda a, b: [kl_metal.kl_div_loss(a, b)], [x, t], [vx, vt])
    x64, t64, vx64, vt64 = f64(x), f64(t), f64(vx), f64(vt)
    want = (-np.exp(t64) * vx64 + np.exp(t64) * (t64 - x64 + 1) * vt64).sum(-1)
    np.testing.assert_allclose(np.array(tangent), want, rtol=1e-5, atol=1e-7)


def test_vmap_matches_a_loop_and_differentiates():
    xs, t = data((3, 4, 10), seed=14), data((4, 10), seed=15)
    f = lambda a: kl_metal.kl_div_loss(a, t)  # noqa: E731
    batched = mx.vmap(f)(xs)
    looped = mx.stack([f(xs[i]) for i in range(3)])
    np.testing.assert_allclose(np.array(batched), np.array(looped), rtol=1e-6)
    grads = mx.grad(lambda a: mx.vmap(f)(a).sum())(xs)
    want, _ = grad_inputs(as_rows(mx.broadcast_to(t, (3, 4, 10)).reshape(12, 10)), mx.ones((12, 1)))
    np.testing.assert_allclose(np.array(grads).reshape(12, 10), want.reshape(12, 10), rtol=1e-6)
    # ... and the other way round: gradients inside vmap, which read the forward's saved outputs.
    per_example = mx.vmap(mx.grad(lambda a: f(a).sum()))(xs)
    np.testing.assert_allclose(np.array(per_example).reshape(12, 10), want.reshape(12, 10), rtol=1e-6)
    # vmap over both operands, along a non-leading axis of one of them.
    ts = data((4, 3, 10), seed=16)
    both = mx.vmap(kl_metal.kl_div_loss, in_axes=(0, 1))(xs, ts)
    np.testing.assert_allclose(np.array(both), np.array(kl_metal.kl_div_loss(xs, ts.transpose(1, 0, 2))), rtol=1e-6)


def _ops_after_primitive(array, path):
    """Names of the graph's operations recorded after the KL primitive (its backward)."""
    mx.export_to_dot(str(path), array)
    labels = re.findall(r'label ="([^"]+)"', path.read_text())
    return labels[labels.index("CustomTransforms") + 1 :]


def test_unrequested_gradient_is_not_in_the_graph(tmp_path):
    """dx and dt are separate graph nodes: the graph of dx holds no dt computation (the "+ 1" of
    exp(t) * (t - x + 1)), so a teacher under stop_gradient costs no dt work."""
    path = tmp_path / "graph.dot"
    x, t = data((2, 8), seed=17), data((2, 8), seed=18)
    dx = mx.grad(lambda a: kl_metal.kl_div_loss(a, mx.stop_gradient(t), reduction="sum"))(x)
    dt = mx.grad(lambda b: kl_metal.kl_div_loss(x, b, reduction="sum"))(t)
    dx_ops, dt_ops = _ops_after_primitive(dx, path), _ops_after_primitive(dt, path)
    assert "Add" not in dx_ops and "Multiply" in dx_ops
    assert "Add" in dt_ops


@pytest.mark.parametrize("cotangent", [float("nan"), float("inf")])
def test_zero_probability_gradients_stay_zero_under_a_non_finite_cotangent(cotangent):
    x = mx.array([[-1.0, -0.5]])
    t = mx.array([[-float("inf"), 0.0]])
    _, (dx, dt) = mx.vjp(lambda a, b: [kl_metal.kl_div_loss(a, b)], [x, t], [mx.array([cotangent])])
    assert float(dx[0, 0]) == 0.0 and float(dt[0, 0]) == 0.0  # t == -inf: exactly 0, whatever g is
    assert not np.isfinite(np.array(dx)[0, 1])


def test_hessian_vector_product_in_the_inputs_is_zero():
    # Forward over reverse (a Hessian-vector product). The loss is linear in the inputs, so the product
    # is exactly 0, as for the MLX reference. The backward's chunks wait on each other through a custom
    # function whose tangent then comes only through that wait (a crash before it returned zeros).
    x, t = data((6, 37), seed=20), data((6, 37), seed=21)
    v = mx.array(np.random.default_rng(22).standard_normal((6, 37)).astype(np.float32))
    for loss in (kl_metal.kl_div_loss, nn.losses.kl_div_loss):
        grad = mx.grad(lambda a: loss(a, t, reduction="mean"))
        _, (hvp,) = mx.jvp(grad, [x], [v])
        assert np.array_equal(np.array(hvp), np.zeros((6, 37), np.float32))


def test_vmap_over_the_mask_alone_gives_per_example_gradients():
    x, t = data((4, 9), seed=23), data((4, 9), seed=24)
    masks = mx.array([[True, False, True, True], [False, True, False, True]])
    f = lambda a, m: kl_metal.kl_div_loss(a, t, reduction="sum", mask=m)  # noqa: E731
    batched = mx.vmap(mx.grad(f), in_axes=(None, 0))(x, masks)
    want = -np.exp(f64(t))[None] * np.array(masks)[:, :, None]  # d/dinputs = -exp(t) * w
    np.testing.assert_allclose(np.array(batched), want, rtol=1e-6, atol=0)


def test_second_derivatives_in_the_targets_match_the_formula():
    # With reduction="sum" (g = 1): dL/dx = -exp(t), so d/dt sum((dL/dx)^2) = 2 exp(2t); and
    # dL/dt = exp(t) (t - x + 1), whose derivative along v is exp(t) (t - x + 2) v. float64 formulas;
    # float32 math on values of size ~1: rtol 1e-5.
    x, t = data((5, 33), seed=25), data((5, 33), seed=26)
    v = mx.array(np.random.default_rng(27).standard_normal((5, 33)).astype(np.float32))
    loss = lambda a, b: kl_metal.kl_div_loss(a, b, reduction="sum")  # noqa: E731
    t64, x64 = f64(t), f64(x)
    got = mx.grad(lambda b: (mx.grad(loss)(x, b) ** 2).sum())(t)
    np.testing.assert_allclose(np.array(got), 2 * np.exp(2 * t64), rtol=1e-5, atol=0)
    _, (hvp,) = mx.jvp(lambda b: mx.grad(loss, argnums=1)(x, b), [t], [v])
    np.testing.assert_allclose(np.array(hvp), np.exp(t64) * (t64 - x64 + 2) * f64(v), rtol=1e-5, atol=1e-6)
