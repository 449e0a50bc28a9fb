"""kl_metal.kl_div_from_logits against the float64 oracle (tests/test_logits_oracle.py), on whatever path
runs here (composed MLX ops on Linux; the fused kernels under the emulator: tests/test_logits_kernels.py).

Tolerances: the oracle sees the logits after rounding to their dtype, so the bounds only cover float32
arithmetic (Reference.loss_tolerance / grad_scales, with the composed ops' summation chain taken as the
whole row: MLX does not specify its CPU summation order) plus one rounding of the result to its dtype
(_oracle.ROUNDOFF: 2^-24 f32, 2^-11 f16, 2^-8 bf16, relative).
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kl_metal import logits
from _oracle import EPS32, ROUNDOFF, as_mx, assert_grads_close, f64
from test_logits_oracle import INF, Reference, assert_loss_close, random_logits

kl_div_from_logits = logits.kl_div_from_logits

DTYPES = {
    "f32": (mx.float32, mx.float32),
    "f16": (mx.float16, mx.float16),
    "bf16": (mx.bfloat16, mx.bfloat16),
    "bf16-f32": (mx.bfloat16, mx.float32),  # bf16 student, f32 teacher
}


def composed_chain(length: int) -> int:
    """Longest float32 addition chain the composed ops may use for a row (any order: the row length)."""
    return length + 64


def rows_last(a: np.ndarray, axis: int, shape) -> np.ndarray:
    a = np.broadcast_to(a, shape)
    return np.moveaxis(a, axis, -1).reshape(-1, shape[axis])


def public_oracle(s, t, T, axis, reduction, mask, chain=composed_chain):
    """(value, tolerance, Reference, weights) for the public function's result in float64."""
    s64, t64 = f64(s), f64(t)
    shape = np.broadcast_shapes(s64.shape, t64.shape)
    axis %= len(shape)
    row_shape = shape[:axis] + shape[axis + 1:]
    ref = Reference(rows_last(s64, axis, shape), rows_last(t64, axis, shape), T)
    tol = ref.loss_tolerance(chain(shape[axis]))
    w = None if mask is None else np.broadcast_to(f64(mask), row_shape).reshape(-1)
    loss = ref.loss(w)
    if w is not None:
        with np.errstate(invalid="ignore"):
            tol = np.where(w == 0, 0.0, np.abs(w) * tol)
    with np.errstate(invalid="ignore"):
        if reduction == "none":
            return loss.reshape(row_shape), tol.reshape(row_shape), ref, w
        total, total_tol = loss.sum(), tol.sum() + len(loss) * EPS32 * np.abs(loss).sum()
        if reduction == "sum":
            return total, total_tol, ref, w
        if w is None:
            return (total / len(loss) if len(loss) else np.nan), total_tol / max(len(loss), 1), ref, w
        return (total / w.sum() if w.sum() != 0 else 0.0), total_tol / (abs(w.sum()) or 1.0), ref, w


def check(s, t, T=1.0, axis=-1, reduction="none", mask=None, what=""):
    got = kl_div_from_logits(s, t, temperature=T, axis=axis, reduction=reduction, mask=mask)
    out_dtype = mx.result_type(s.dtype, t.dtype)
    assert got.dtype == out_dtype
    want, tol, ref, _ = public_oracle(s, t, T, axis, reduction, mask)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    with np.errstate(invalid="ignore"):
        tol = tol + ROUNDOFF[out_dtype] * (np.abs(want) + tol) if out_dtype in ROUNDOFF else tol
    assert_loss_close(got, want, np.asarray(tol), f"{what} loss ({reduction})")
    return got, ref


# ----------------------------------------------------------------------------- values


def test_known_values_and_composed_reference():
    # The example of MLX's kl_div_loss test, as logits: log-probabilities are valid logits.
    s = mx.log(mx.array([[0.5, 0.5], [0.8, 0.2]]))
    t = mx.log(mx.array([[0.5, 0.5], [0.2, 0.8]]))
    np.testing.assert_allclose(np.array(kl_div_from_logits(s, t)), [0.0, 0.831777], atol=1e-6)
    rng = np.random.default_rng(1)
    s, t = mx.array(random_logits(rng, (4, 300))), mx.array(random_logits(rng, (4, 300)))
    for T in (1.0, 2.0, 0.5):
        ref = nn.losses.kl_div_loss(nn.log_softmax(s / T), nn.log_softmax(t / T), reduction="none")
        np.testing.assert_allclose(np.array(kl_div_from_logits(s, t, temperature=T)), np.array(ref),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("length", [1, 7, 1000, 32000])
@pytest.mark.parametrize("T", [1.0, 0.7, 4.0])
def test_forward_and_gradients_against_oracle(dtypes, length, T):
    rng = np.random.default_rng(length)
    rows = 3 if length >= 32000 else 5
    s = as_mx(random_logits(rng, (rows, length)), dtypes[0])
    t = as_mx(random_logits(rng, (rows, length), offset=1.0), dtypes[1])
    _, ref = check(s, t, T, what=f"{dtypes} D={length} T={T}")
    # The cotangent reaches the primitive through the cast to the output dtype: draw it exactly
    # representable in every dtype (bfloat16 values in [0.5, 2] are), so that cast is exact.
    g = as_mx(rng.uniform(0.5, 2.0, rows).astype(np.float32), mx.bfloat16).astype(mx.float32)
    _, (ds, dt) = mx.vjp(lambda a, b: kl_div_from_logits(a, b, temperature=T).astype(mx.float32), [s, t], [g])
    assert ds.dtype == s.dtype and dt.dtype == t.dtype
    scale_s, scale_t = ref.grad_scales(g, composed_chain(length))
    assert_grads_close(ds, ref.grad_student(g), scale_s, "d/dstudent")
    assert_grads_close(dt, ref.grad_teacher(g), scale_t, "d/dteacher")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_axes_broadcasting_masks_and_reductions(reduction):
    rng = np.random.default_rng(2)
    s = mx.array(random_logits(rng, (2, 3, 50)))
    t = mx.array(random_logits(rng, (3, 50)))  # broadcast over the batch
    for axis in (-1, 2, 1, 0, -3):
        check(s, t, 1.5, axis, reduction, what=f"axis={axis}")
    mask = mx.array([[True, False, True], [False, False, True]])
    check(s, t, 1.5, -1, reduction, mask, what="bool mask")
    check(s, t, 1.5, -1, reduction, mx.array([0.5, 0.0, 2.0]), what="float weights, broadcast")
    zero = kl_div_from_logits(s, t, reduction=reduction, mask=mx.zeros((2, 3)))
    np.testing.assert_array_equal(np.array(zero), 0.0)


def test_shapes_and_dtypes():
    s = mx.zeros((2, 3, 8), mx.bfloat16)
    t = mx.zeros((8,), mx.float32)
    assert kl_div_from_logits(s, t).shape == (2, 3) and kl_div_from_logits(s, t).dtype == mx.float32
    assert kl_div_from_logits(s, s, axis=1).shape == (2, 8)
    assert kl_div_from_logits(s, s, reduction="mean").shape == ()
    assert kl_div_from_logits(mx.zeros((8,)), mx.zeros((8,))).shape == ()
    # Empty arrays: an axis of length 0 has no teacher distribution (loss 0); no rows: mean is NaN.
    np.testing.assert_array_equal(np.array(kl_div_from_logits(mx.zeros((3, 0)), mx.zeros((3, 0)))), 0.0)
    assert math.isnan(kl_div_from_logits(mx.zeros((0, 4)), mx.zeros((0, 4)), reduction="mean").item())
    with mx.stream(mx.cpu):  # float64 exists on the CPU only; it takes the composed ops (float32 math)
        f64_loss = kl_div_from_logits(mx.zeros((2, 4), mx.float64), mx.zeros((2, 4), mx.float32))
        assert f64_loss.dtype == mx.float64 and f64_loss.shape == (2,)


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, math.inf, -math.inf, math.nan, 1e-320])
def test_bad_temperature_values(temperature):
    s = mx.zeros((2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kl_div_from_logits(s, s, temperature=temperature)


@pytest.mark.parametrize("temperature", ["2", True, None, mx.array(2.0), 1 + 2j])
def test_bad_temperature_types(temperature):
    s = mx.zeros((2, 4))
    with pytest.raises(TypeError, match="temperature"):
        kl_div_from_logits(s, s, temperature=temperature)


def test_temperature_accepts_python_and_numpy_reals():
    s, t = mx.array([[0.0, 1.0]]), mx.array([[1.0, 0.0]])
    want = kl_div_from_logits(s, t, temperature=2.0).item()
    assert kl_div_from_logits(s, t, temperature=2).item() == want
    assert kl_div_from_logits(s, t, temperature=np.float32(2.0)).item() == want


def test_argument_errors_name_the_argument():
    s = mx.zeros((2, 4))
    with pytest.raises(TypeError, match="student_logits"):
        kl_div_from_logits(np.zeros((2, 4)), s)
    with pytest.raises(TypeError, match="teacher_logits"):
        kl_div_from_logits(s, mx.zeros((2, 4), mx.int32))
    with pytest.raises(ValueError, match="do not broadcast"):
        kl_div_from_logits(s, mx.zeros((3, 4)))
    with pytest.raises(ValueError, match="reduction"):
        kl_div_from_logits(s, s, reduction="batchmean")
    with pytest.raises(ValueError, match="axis"):
        kl_div_from_logits(s, s, axis=2)
    with pytest.raises(TypeError, match="axis"):
        kl_div_from_logits(s, s, axis=1.0)
    with pytest.raises(ValueError, match="mask"):
        kl_div_from_logits(s, s, mask=mx.ones((4,)))
    with pytest.raises(TypeError, match="mask"):
        kl_div_from_logits(s, s, mask=mx.ones((2,), mx.int32))
    with pytest.raises(ValueError, match=r"axis=-1 is out of range for the broadcast shape \(\)"):
        kl_div_from_logits(mx.array(1.0), mx.array(1.0))
    with pytest.raises(TypeError):
        kl_div_from_logits(s, s, 2.0)  # temperature is keyword only


def test_explain():
    s = mx.zeros((4, 100))
    decision = logits.explain_from_logits(s, s, temperature=2.0)
    assert decision.path in ("fused", "fallback")
    assert "path:" in str(decision)


# ----------------------------------------------------------------------------- edge cases


def edge_rows():
    """Rows exercising every convention, as (student, teacher) float32 numpy arrays of length 6."""
    s = np.array([
        [0.0, 1.0, 2.0, -INF, -INF, 0.5],    # 0: masked vocabulary (-inf in both at 3, 4)
        [0.0, 1.0, 2.0, -INF, 3.0, 0.5],     # 1: student -inf under a finite teacher: +inf
        [0.0, 1.0, 2.0, 3.0, 4.0, 0.5],      # 2: teacher all -inf: 0
        [-INF] * 6,                          # 3: student all -inf: +inf
        [0.0, np.nan, 2.0, 3.0, 4.0, 0.5],   # 4: NaN in the student where the teacher is -inf: NaN
        [0.0, 1.0, np.nan, 3.0, 4.0, 0.5],   # 5: NaN in the student, teacher all -inf: NaN
        [0.0, 1.0, 2.0, 3.0, 4.0, 0.5],      # 6: NaN in the teacher: NaN
        [1e4, -1e4, 5e3, 0.0, -3e3, 9e3],    # 7: huge magnitudes
        [0.0, 1.0, 2.0, INF, 4.0, 0.5],      # 8: +inf logit: NaN
        [-1e4, 1e4, 5e3, 0.0, -3e3, -9e3],   # 9: huge, against row 7's teacher reversed
    ], dtype=np.float32)
    t = np.array([
        [0.5, 2.0, 1.0, -INF, -INF, 0.0],
        [0.5, 2.0, 1.0, 1.0, 3.0, 0.0],
        [-INF] * 6,
        [0.0, 1.0, 2.0, 3.0, 4.0, 0.5],
        [0.0, -INF, 2.0, 3.0, 4.0, 0.5],
        [-INF] * 6,
        [0.0, 1.0, np.nan, 3.0, 4.0, 0.5],
        [9e3, 1e4, -1e4, 2e3, 0.0, 1e4],
        [0.0, 1.0, 2.0, 3.0, 4.0, 0.5],
        [-9e3, -1e4, 1e4, -2e3, 0.0, 1e3],
    ], dtype=np.float32)
    return s, t


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_edge_cases_against_oracle(T):
    s_np, t_np = edge_rows()
    s, t = mx.array(s_np), mx.array(t_np)
    got, ref = check(s, t, T, what="edge rows")
    got = np.array(got)
    assert got[0] == pytest.approx(Reference(s_np[:1, [0, 1, 2, 5]], t_np[:1, [0, 1, 2, 5]], T).kl[0], rel=1e-5)
    assert got[1] == INF and got[3] == INF and got[2] == 0.0
    assert np.isnan(got[[4, 5, 6, 8]]).all()
    assert np.isfinite(got[[7, 9]]).all() and got[7] > 0
    g = mx.ones((len(s_np),))
    ds, dt = mx.grad(lambda a, b: kl_div_from_logits(a, b, temperature=T).sum(), argnums=(0, 1))(s, t)
    scale_s, scale_t = ref.grad_scales(g, composed_chain(6))
    want_s, want_t = ref.grad_student(g), ref.grad_teacher(g)
    rows = [0, 1, 2, 7, 9]  # the rows whose gradients are specified as finite numbers or zeros
    assert_grads_close(ds[mx.array(rows)], want_s[rows], scale_s[rows], "d/dstudent edge rows")
    assert_grads_close(dt[mx.array([0, 2, 7, 9])], want_t[[0, 2, 7, 9]], scale_t[[0, 2, 7, 9]], "d/dteacher")
    # Masked vocabulary: exact zeros in both gradients; the masked-out columns change nothing.
    np.testing.assert_array_equal(np.array(ds)[0, 3:5], 0.0)
    np.testing.assert_array_equal(np.array(dt)[0, 3:5], 0.0)
    np.testing.assert_array_equal(np.array(ds)[2], 0.0)  # teacher all -inf: zero gradients
    np.testing.assert_array_equal(np.array(dt)[2], 0.0)
    assert np.isfinite(np.array(ds)[[1, 7, 9]]).all()


def test_masked_rows_are_ignored_even_when_nan():
    s_np, t_np = edge_rows()
    s, t = mx.array(s_np), mx.array(t_np)
    keep = np.array([1, 0, 1, 0, 0, 0, 0, 1, 0, 1], dtype=bool)
    loss, (ds, dt) = mx.value_and_grad(
        lambda a, b: kl_div_from_logits(a, b, reduction="mean", mask=mx.array(keep)), argnums=(0, 1))(s, t)
    want = Reference(s_np[keep], t_np[keep]).kl.mean()
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_array_equal(np.array(ds)[~keep], 0.0)
    np.testing.assert_array_equal(np.array(dt)[~keep], 0.0)


def test_bf16_accumulates_in_float32():
    # 151936 bf16 logits per row: a bf16 running sum would stall at 2^8 terms of similar size; the result
    # must be within the float32 bound of the oracle plus one bf16 rounding.
    rng = np.random.default_rng(3)
    s = as_mx(random_logits(rng, (2, 151936), scale=1.0), mx.bfloat16)
    t = as_mx(random_logits(rng, (2, 151936), scale=1.0), mx.bfloat16)
    check(s, t, 1.0, what="bf16 V=151936")
    mixed, _ = check(s, t.astype(mx.float32), 2.0, what="bf16/f32 V=151936")
    assert mixed.dtype == mx.float32


# ----------------------------------------------------------------------------- autograd and transformations


def _inputs(seed=4, shape=(3, 40)):
    rng = np.random.default_rng(seed)
    return mx.array(random_logits(rng, shape)), mx.array(random_logits(rng, shape))


def test_grad_value_and_grad_and_vjp_agree_with_oracle():
    s, t = _inputs()
    T = 2.0
    ref = Reference(s, t, T)
    ones = np.ones(3)
    fn = lambda a, b: kl_div_from_logits(a, b, temperature=T, reduction="sum")  # noqa: E731
    ds = mx.grad(fn)(s, t)
    dt = mx.grad(fn, argnums=1)(s, t)
    loss, (ds2, dt2) = mx.value_and_grad(fn, argnums=(0, 1))(s, t)
    scale_s, scale_t = ref.grad_scales(ones, composed_chain(40))
    for got_s in (ds, ds2):
        assert_grads_close(got_s, ref.grad_student(ones), scale_s, "d/dstudent")
    for got_t in (dt, dt2):
        assert_grads_close(got_t, ref.grad_teacher(ones), scale_t, "d/dteacher")
    assert loss.item() == pytest.approx(ref.kl.sum(), rel=1e-6)
    # "mean" scales the per-row cotangent by 1 / rows.
    dmean = mx.grad(lambda a: kl_div_from_logits(a, t, temperature=T, reduction="mean"))(s)
    np.testing.assert_allclose(np.array(dmean), np.array(ds) / 3, rtol=1e-6, atol=1e-9)
    # The student gradient of the T**2-scaled loss, at T: (q - p) * T.
    dscaled = mx.grad(lambda a: T**2 * kl_div_from_logits(a, mx.stop_gradient(t), temperature=T).sum())(s)
    np.testing.assert_allclose(np.array(dscaled), (ref.q - ref.p) * T, rtol=1e-5, atol=1e-7)


def test_jvp_matches_vjp():
    s, t = _inputs(5)
    rng = np.random.default_rng(6)
    ts = mx.array(rng.standard_normal(s.shape).astype(np.float32))
    tt = mx.array(rng.standard_normal(t.shape).astype(np.float32))
    fn = lambda a, b: kl_div_from_logits(a, b, temperature=1.5, mask=mx.array([1.0, 0.0, 2.0]))  # noqa: E731
    (_,), (tangent,) = mx.jvp(fn, [s, t], [ts, tt])
    ref = Reference(s, t, 1.5)
    w = np.array([1.0, 0.0, 2.0])
    want = (ref.grad_student(w) * f64(ts)).sum(-1) + (ref.grad_teacher(w) * f64(tt)).sum(-1)
    np.testing.assert_allclose(np.array(tangent), want, rtol=1e-5, atol=1e-6)
    (_,), (only_s,) = mx.jvp(lambda a: fn(a, t), [s], [ts])
    np.testing.assert_allclose(np.array(only_s), (ref.grad_student(w) * f64(ts)).sum(-1), rtol=1e-5, atol=1e-6)


def test_vmap_matches_loop_and_differentiates():
    rng = np.random.default_rng(7)
    s = mx.array(random_logits(rng, (4, 3, 20)))
    t = mx.array(random_logits(rng, (3, 20)))
    fn = lambda a, b: kl_div_from_logits(a, b, temperature=2.0)  # noqa: E731
    batched = mx.vmap(fn, in_axes=(0, None))(s, t)
    loop = mx.stack([fn(s[i], t) for i in range(4)])
    np.testing.assert_allclose(np.array(batched), np.array(loop), rtol=1e-6)
    moved = mx.vmap(fn, in_axes=(1, None))(mx.moveaxis(s, 0, 1), t)
    np.testing.assert_allclose(np.array(moved), np.array(loop), rtol=1e-6)
    grad_vmapped = mx.grad(lambda a: mx.vmap(fn, in_axes=(0, None))(a, t).sum())(s)
    np.testing.assert_allclose(np.array(grad_vmapped), np.array(mx.grad(lambda a: fn(a, t).sum())(s)), rtol=1e-6)
    # vmap of the gradient: per-example gradients.
    per_example = mx.vmap(mx.grad(lambda a, b: fn(a, b).sum()), in_axes=(0, None))(s, t)
    np.testing.assert_allclose(np.array(per_example), np.array(grad_vmapped), rtol=1e-6)


def test_compile():
    s, t = _inputs(8)
    fn = lambda a, b: kl_div_from_logits(a, b, temperature=3.0, reduction="mean")  # noqa: E731
    np.testing.assert_allclose(np.array(mx.compile(fn)(s, t)), np.array(fn(s, t)), rtol=1e-6)
    vg = mx.compile(mx.value_and_grad(fn, argnums=(0, 1)))
    (loss, (ds, dt)), (loss2, (ds2, dt2)) = vg(s, t), mx.value_and_grad(fn, argnums=(0, 1))(s, t)
    np.testing.assert_allclose(np.array(ds), np.array(ds2), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.array(dt), np.array(dt2), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    length=st.integers(1, 70),
    data=st.data(),
)
def test_property_against_oracle(shape, length, data):
    shape = tuple(shape) + (length,)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    T = data.draw(st.sampled_from([1.0, 0.5, 2.0, 7.3]))
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]))
    dtypes = data.draw(st.sampled_from(list(DTYPES.values())))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    s_np, t_np = random_logits(rng, shape), random_logits(rng, shape)
    # Masked vocabulary entries (-inf in both) and teacher-only zeros, at random.
    hole = rng.random(shape) < 0.2
    s_np[hole] = -INF
    t_np[hole | (rng.random(shape) < 0.1)] = -INF
    t_shape = shape[data.draw(st.integers(0, len(shape) - 1)):]  # the teacher may broadcast
    s, t = as_mx(s_np, dtypes[0]), as_mx(t_np[(0,) * (len(shape) - len(t_shape))], dtypes[1])
    mask = None
    if data.draw(st.booleans()):
        row_shape = list(np.broadcast_shapes(s.shape, t.shape))
        del row_shape[axis]
        mask = mx.array(rng.random(row_shape) < 0.7)
    check(s, t, T, axis, reduction, mask, what=f"shape={shape} axis={axis} T={T}")
