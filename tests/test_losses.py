"""kl_metal.kl_div_loss semantics against a float64 numpy oracle (whatever path runs here)."""
from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kl_metal
from _oracle import as_mx, f64, row_terms

# Every test here runs on the fallback both in one piece and cut into row chunks (conftest.py).
pytestmark = pytest.mark.usefixtures("fallback_chunking")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
EPS = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}  # one ulp at 1.0


def oracle(inputs, targets, axis=-1, reduction="none", mask=None):
    """float64 loss per the spec: sum over axis of the term (-inf rule), weights, reductions."""
    x, t = np.broadcast_arrays(f64(inputs), f64(targets))
    loss = row_terms(x, t).sum(axis=axis)
    w = None if mask is None else np.broadcast_to(f64(mask), loss.shape)
    if w is not None:
        with np.errstate(invalid="ignore"):
            loss = np.where(w == 0, 0.0, w * loss)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if w is None:
            return loss.mean() if loss.size else np.nan
        return loss.sum() / w.sum() if w.sum() != 0 else 0.0
    return loss


def magnitude(inputs, targets, axis=-1):
    """sum over axis of |term|: the scale of float32 summation error for a row."""
    x, t = np.broadcast_arrays(f64(inputs), f64(targets))
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(np.abs(row_terms(x, t)), nan=0.0, posinf=0.0).sum(axis=axis)


def log_probs(rng, shape, axis=-1, dtype=mx.float32):
    logits = rng.standard_normal(shape).astype(np.float32) * 2
    logp = logits - np.log(np.exp(logits).sum(axis=axis, keepdims=True))
    return as_mx(logp, dtype)


def assert_float32_close(got, want, scale, length):
    """float32 summation of `length` terms: |error| <= (length + 8) eps32 * sum|term| (Higham's bound;
    8 ulps cover exp, the subtraction and the product per term)."""
    got = f64(got)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    tol = (length + 8) * 2.0**-23 * scale + 1e-30
    ok = np.isnan(want) | (got == want) | (np.abs(got - want) <= tol)
    assert np.all(ok), f"max error {np.nanmax(np.abs(got - want) - tol)} over tolerance"


def test_mlx_reference_example():
    # The values from MLX's own test of kl_div_loss.
    p = mx.log(mx.array([[0.5, 0.5], [0.8, 0.2]]))
    q = mx.log(mx.array([[0.5, 0.5], [0.2, 0.8]]))
    got = kl_metal.kl_div_loss(p, q)
    np.testing.assert_allclose(np.array(got), [0.0, 0.831777], atol=1e-6)
    np.testing.assert_allclose(np.array(kl_metal.kl_div_loss(p, q, reduction="mean")), 0.4158885, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_same_shape_and_dtype_as_reference(dtype, reduction):
    rng = np.random.default_rng(0)
    x, t = log_probs(rng, (3, 4, 7), dtype=dtype), log_probs(rng, (4, 7), dtype=dtype)
    for axis in (-1, 0, 1, 2, -3):
        ref = nn.losses.kl_div_loss(x, t, axis=axis, reduction=reduction)
        got = kl_metal.kl_div_loss(x, t, axis=axis, reduction=reduction)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        # The reference sums in the argument dtype: agree within a few of its roundings per term.
        np.testing.assert_allclose(f64(got), f64(ref), rtol=8 * 7 * EPS[dtype], atol=8 * 7 * EPS[dtype])


@pytest.mark.parametrize("dtypes", [(mx.bfloat16, mx.float32), (mx.float16, mx.bfloat16), (mx.float32, mx.float16)])
def test_mixed_dtypes_return_the_promoted_dtype(dtypes):
    rng = np.random.default_rng(1)
    x, t = log_probs(rng, (5, 33), dtype=dtypes[0]), log_probs(rng, (5, 33), dtype=dtypes[1])
    got = kl_metal.kl_div_loss(x, t)
    assert got.dtype == nn.losses.kl_div_loss(x, t).dtype == mx.result_type(*dtypes)
    want = oracle(x, t)
    # Result rounded once to the output dtype after float32 math: half an ulp plus float32 summation.
    tol = EPS[got.dtype] * np.abs(want) + 41 * 2.0**-23 * magnitude(x, t)
    assert np.all(np.abs(f64(got) - want) <= tol)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("length", [1000, 32000, 151936])
def test_half_precision_rows_are_within_one_rounding(dtype, length):
    """Accumulating in float32 keeps long half-precision rows within one rounding of the truth
    (the MLX reference, summing in bf16/fp16, does not)."""
    rng = np.random.default_rng(length)
    x, t = log_probs(rng, (4, length), dtype=dtype), log_probs(rng, (4, length), dtype=dtype)
    want = oracle(x, t)  # float64 truth on the very values the kernels read
    got = f64(kl_metal.kl_div_loss(x, t))
    assert np.all(np.abs(got - want) <= one_rounding(want, dtype, magnitude(x, t))), (got, want)


def one_rounding(want, dtype, scale):
    """One rounding to `dtype` (half its ulp at |want|) plus float32 summation error: 64 eps32 of
    sum |term| leaves room for any reasonable summation order and is far below half an ulp of the half
    types (2^-9 or 2^-12 relative) on these well-conditioned rows."""
    half_ulp = 0.5 * EPS[dtype] * 2.0 ** np.floor(np.log2(np.abs(want)))
    return half_ulp + 64 * 2.0**-23 * scale


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_half_precision_reductions_over_many_rows_are_within_one_rounding(dtype, reduction):
    rng = np.random.default_rng(7)
    x, t = log_probs(rng, (4096, 64), dtype=dtype), log_probs(rng, (4096, 64), dtype=dtype)
    want = float(oracle(x, t, reduction=reduction))
    got = float(f64(kl_metal.kl_div_loss(x, t, reduction=reduction)))
    scale = magnitude(x, t).sum() / (x.shape[0] if reduction == "mean" else 1)
    assert abs(got - want) <= one_rounding(np.float64(want), dtype, scale)


def test_zero_probability_targets_give_zero_terms_not_nan():
    x = mx.log(mx.array([[0.25, 0.25, 0.5], [0.1, 0.2, 0.7]]))
    t = mx.log(mx.array([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]))  # log 0 = -inf
    assert np.isnan(np.array(nn.losses.kl_div_loss(x, t))).all()  # the reference's NaN
    got = np.array(kl_metal.kl_div_loss(x, t))
    np.testing.assert_allclose(got, oracle(x, t), rtol=1e-6)
    assert np.isfinite(got).all()


def test_special_values():
    inf, nan = float("inf"), float("nan")
    x = mx.array([[-inf, -1.0], [-inf, -1.0], [nan, -1.0], [-1.0, -1.0], [nan, -1.0]])
    t = mx.array([[-1.0, -1.0], [-inf, -1.0], [-1.0, -1.0], [nan, -1.0], [-inf, -1.0]])
    got = np.array(kl_metal.kl_div_loss(x, t))
    assert got[0] == inf  # inputs -inf with finite targets: the true KL is +inf
    assert got[1] == 0.0  # -inf against -inf: 0 log 0 terms
    assert np.isnan(got[2]) and np.isnan(got[3])  # NaN anywhere: NaN, never a silent 0
    assert np.isnan(got[4])  # NaN input where the target is -inf stays NaN
    np.testing.assert_array_equal(np.isnan(got), np.isnan(oracle(x, t)))


def test_mask_weights_and_reductions():
    rng = np.random.default_rng(3)
    x, t = log_probs(rng, (2, 3, 10)), log_probs(rng, (2, 3, 10))
    weights = mx.array([[1.0, 0.0, 2.5], [0.5, 1.0, 0.0]])
    for mask in (weights, weights > 0, mx.array([1.0, 0.0, 2.0])):
        for reduction in ("none", "sum", "mean"):
            got = kl_metal.kl_div_loss(x, t, reduction=reduction, mask=mask)
            np.testing.assert_allclose(f64(got), oracle(x, t, reduction=reduction, mask=mask), rtol=1e-5, atol=1e-7)


def test_masked_rows_are_zero_even_when_they_hold_nan():
    x = mx.array([[float("nan"), 0.0], [-1.0, -1.0]])
    t = mx.log(mx.array([[0.5, 0.5], [0.5, 0.5]]))
    got = np.array(kl_metal.kl_div_loss(x, t, mask=mx.array([False, True])))
    assert got[0] == 0.0 and np.isfinite(got[1])


def test_mean_with_all_weights_zero_is_zero_not_nan():
    rng = np.random.default_rng(4)
    x, t = log_probs(rng, (3, 5)), log_probs(rng, (3, 5))
    assert float(kl_metal.kl_div_loss(x, t, reduction="mean", mask=mx.zeros((3,)))) == 0.0


def test_no_gradient_flows_into_mask():
    rng = np.random.default_rng(5)
    x, t = log_probs(rng, (3, 5)), log_probs(rng, (3, 5))
    g = mx.grad(lambda m: kl_metal.kl_div_loss(x, t, reduction="sum", mask=m))(mx.ones((3,)))
    np.testing.assert_array_equal(np.array(g), 0.0)


def test_empty_arrays_like_the_reference():
    x = mx.zeros((0, 5))
    assert kl_metal.kl_div_loss(x, x).shape == (0,)
    assert float(kl_metal.kl_div_loss(x, x, reduction="sum")) == 0.0
    assert np.isnan(float(kl_metal.kl_div_loss(x, x, reduction="mean")))
    assert np.isnan(float(nn.losses.kl_div_loss(x, x, reduction="mean")))
    z = mx.zeros((3, 0))  # an axis of length 0: every row sums nothing
    np.testing.assert_array_equal(np.array(kl_metal.kl_div_loss(z, z)), np.zeros(3))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(axis=2), ValueError, ["axis=2", "(3, 4)"]),
        (dict(axis=-3), ValueError, ["axis=-3"]),
        (dict(axis=1.0), TypeError, ["axis", "1.0"]),
        (dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
        (dict(mask=mx.array([1, 0, 1])), TypeError, ["mask", "int32"]),
        (dict(mask=mx.ones((4,))), ValueError, ["mask", "(4,)", "(3,)"]),
        (dict(mask=mx.ones((2, 3))), ValueError, ["mask", "(2, 3)"]),
        (dict(mask=[1.0, 0.0, 1.0]), TypeError, ["mask", "list"]),
    ],
)
def test_bad_arguments_are_named(kwargs, error, words):
    x = mx.zeros((3, 4))
    with pytest.raises(error) as info:
        kl_metal.kl_div_loss(x, x, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("bad, words", [
    (mx.zeros((3, 4), mx.int32), ["inputs", "int32"]),
    (mx.zeros((3, 4), mx.bool_), ["inputs", "bool"]),
    (mx.zeros((3, 4), mx.complex64), ["inputs", "complex64"]),
    (np.zeros((3, 4)), ["inputs", "ndarray"]),
])
def test_bad_input_types_are_named(bad, words):
    with pytest.raises(TypeError) as info:
        kl_metal.kl_div_loss(bad, mx.zeros((3, 4)))
    assert all(w in str(info.value) for w in words)
    with pytest.raises(TypeError, match="targets"):
        kl_metal.kl_div_loss(mx.zeros((3, 4)), bad)


def test_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"inputs shape \(3, 4\) and targets shape \(3, 5\)"):
        kl_metal.kl_div_loss(mx.zeros((3, 4)), mx.zeros((3, 5)))


# ------------------------------------------------------------------ property tests

@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    # Broadcasting: either operand may drop leading dims or have 1s.
    def operand_shape():
        lead = draw(st.integers(0, ndim - 1))
        return [1 if draw(st.booleans()) and i >= lead else s for i, s in enumerate(shape)][lead:]
    axis = draw(st.integers(-ndim, ndim - 1))
    dtypes = (draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES)))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    seed = draw(st.integers(0, 2**31))
    specials = draw(st.sampled_from(["none", "-inf targets", "-inf inputs", "nan"]))
    use_mask = draw(st.sampled_from([None, "bool", "float"]))
    return shape, operand_shape(), operand_shape(), axis, dtypes, reduction, seed, specials, use_mask


@settings(max_examples=150, deadline=None)
@given(problems())
def test_property_against_oracle(problem):
    shape, x_shape, t_shape, axis, dtypes, reduction, seed, specials, use_mask = problem
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal(x_shape).astype(np.float32) - 1
    ts = rng.standard_normal(t_shape).astype(np.float32) - 1
    if specials != "none" and ts.size and xs.size:
        target = ts if specials == "-inf targets" else xs
        flat = target.reshape(-1)
        flat[rng.integers(0, flat.size, size=max(1, flat.size // 4))] = np.nan if specials == "nan" else -np.inf
    x, t = as_mx(xs, dtypes[0]), as_mx(ts, dtypes[1])
    full = tuple(np.broadcast_shapes(tuple(x_shape), tuple(t_shape)))
    axis = axis if -len(full) <= axis < len(full) else -1
    row_shape = full[: axis % len(full)] + full[axis % len(full) + 1 :]
    mask = None
    if use_mask:
        m = rng.random(row_shape) < 0.6
        mask = mx.array(m) if use_mask == "bool" else mx.array((m * rng.random(row_shape) * 2).astype(np.float32))

    got = kl_metal.kl_div_loss(x, t, axis=axis, reduction=reduction, mask=mask)
    want = oracle(x, t, axis=axis, reduction=reduction, mask=mask)
    out_dtype = mx.result_type(*dtypes)
    assert got.dtype == out_dtype and got.shape == np.shape(want)
    got = f64(got)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    # float32 math over <= 6 terms per row and <= 216 rows, then one rounding to the output dtype;
    # weights up to 2 and 1/sum(w) scaling stay inside the same budget with the magnitude term.
    finite = np.isfinite(want)
    scale = magnitude(x, t, axis) * (2.0 if mask is not None else 1.0)
    scale = scale.sum() if reduction != "none" else scale
    tol = EPS[out_dtype] * np.abs(want) + 300 * 2.0**-23 * scale + 1e-6 * (reduction == "mean")
    with np.errstate(invalid="ignore"):
        error = np.abs(got - want)
    assert np.all(error[finite] <= np.broadcast_to(tol, np.shape(want))[finite])


def test_float64_keeps_its_precision():
    # float64 (CPU only in MLX) is computed in float64: a tiny KL between near-identical rows keeps its
    # digits (in float32 arithmetic, t - x ~ 1e-12 next to values near 1 is lost: 96% error).
    x = mx.array([[-1e-9, -300.0, -1.0]], dtype=mx.float64)
    t = mx.array([[-1e-9 + 1e-12, -200.0, -1.0 + 1e-10]], dtype=mx.float64)
    with mx.stream(mx.cpu):
        got = kl_metal.kl_div_loss(x, t)
        dx = mx.grad(lambda a: kl_metal.kl_div_loss(a, t, reduction="sum"))(x)
        p = mx.exp(t)
    assert got.dtype == mx.float64 and dx.dtype == mx.float64
    # MLX's own float64 exp on the CPU is only about float32-accurate (exp(-200) underflows to 0), so
    # the float64 oracle bounds the result by the terms' float32-size relative error, 1e-7 of each term,
    # a million times tighter than the float32 path's error here.
    want = oracle(x, t)
    assert abs(float(got[0]) - want[0]) <= 1e-7 * magnitude(x, t)[0]
    np.testing.assert_array_equal(np.array(dx), -np.array(p))  # exactly -exp(t), in float64


def test_infinite_inputs_without_nan_are_not_mistaken_for_nan():
    # +inf and -inf inputs under zero-probability targets: those terms are 0, the row is the last term.
    inf = float("inf")
    x = mx.array([[inf, -inf, -1.0]])
    t = mx.array([[-inf, -inf, 0.0]])
    np.testing.assert_allclose(np.array(kl_metal.kl_div_loss(x, t)), [1.0])
