"""Float64 numpy oracle for the KL row primitive and its gradients, plus comparison helpers.

Independent of kl_metal: the formulas and special-value conventions are written out here again from
the specification (README / kernels/kl_common.h), never imported from the code under test.

Tolerances: test inputs are drawn in float32 and rounded to their dtype BEFORE the oracle sees them, so
the oracle computes on exactly the values the kernels read; all remaining error is float32 arithmetic
in the kernels plus the final rounding of a gradient to its dtype. See `assert_rows_close` and
`assert_grads_close` for the bounds used.
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

EPS32 = 2.0**-23
# Relative error of one float32 term exp(t) * (t - x): Metal's precise exp is specified within 4 ulp,
# the subtraction and the product add half an ulp each; 8 ulp leaves room.
TERM_ULPS = 8
# Unit roundoff of the gradient dtypes: rounding a float32 result once to the dtype (round to nearest)
# costs at most half an ulp, i.e. 2^-p relative for a p-bit significand (normal range) ...
ROUNDOFF = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}
# ... and at most half the spacing of subnormals below the normal range (float16 subnormals: 2^-24).
SUBNORMAL_HALF_SPACING = {mx.float32: 2.0**-150, mx.float16: 2.0**-25, mx.bfloat16: 2.0**-134}


def f64(a) -> np.ndarray:
    """An mx.array (any float dtype) as float64 numpy, exactly."""
    if isinstance(a, mx.array):
        if a.dtype == mx.float64:
            return np.array(a)
        return np.array(a.astype(mx.float32)).astype(np.float64)
    return np.asarray(a, dtype=np.float64)


def row_terms(x, t) -> np.ndarray:
    """term = exp(t) * (t - x); 0 where t == -inf unless x is NaN (then NaN). Shape of x/t."""
    x, t = f64(x), f64(t)
    with np.errstate(all="ignore"):
        term = np.exp(t) * (t - x)
        term = np.where(t == -np.inf, np.where(np.isnan(x), np.nan, 0.0), term)
    return term


def row_loss(x, t, w=None):
    """(loss, magnitude): loss[o, i] = w * sum_d term over axis 1 (w == 0 -> exactly 0, data ignored);
    magnitude = sum_d |term|, the scale of float32 summation error."""
    term = row_terms(x, t)
    with np.errstate(all="ignore"):
        loss = term.sum(axis=1)
        magnitude = np.abs(term).sum(axis=1)
        if w is not None:
            w = f64(w)
            loss = np.where(w == 0, 0.0, w * loss)
            magnitude = np.where(w == 0, 0.0, np.abs(w) * magnitude)
    return loss, magnitude


def grad_inputs(t, g):
    """(dx, scale): dx = -exp(t) * g, exactly 0 where t == -inf or g == 0; scale bounds |float32 error|/eps."""
    t, g = f64(t), f64(g)[:, None, :]
    with np.errstate(all="ignore"):
        value = -np.exp(t) * g
        zero = (t == -np.inf) | (g == 0)
        value = np.where(zero, 0.0, value)
        scale = np.where(zero, 0.0, np.abs(value))
    return value, scale


def grad_targets(x, t, g):
    """(dt, scale): dt = exp(t) * (t - x + 1) * g, exactly 0 where t == -inf or g == 0.

    scale: |exp(t) g| (|t - x| + 1), which bounds the float32 error of (t - x) + 1 (cancellation near
    t - x = -1) as well as of the products, in units of eps."""
    x, t, g = f64(x), f64(t), f64(g)[:, None, :]
    with np.errstate(all="ignore"):
        value = np.exp(t) * (t - x + 1.0) * g
        zero = (t == -np.inf) | (g == 0)
        value = np.where(zero, 0.0, value)
        scale = np.where(zero, 0.0, np.abs(np.exp(t) * g) * (np.abs(t - x) + 1.0))
    return value, scale


def _assert_special(got: np.ndarray, ref: np.ndarray, what: str):
    """NaN where (and only where) the oracle has NaN; infinities and exact zeros bit for bit."""
    nan = np.isnan(ref)
    bad = np.flatnonzero(np.isnan(got) != nan)
    assert bad.size == 0, f"{what}: NaN pattern differs at flat index {bad[:5]}: got {got.flat[bad[:5]]}, want {ref.flat[bad[:5]]}"
    inf = np.isinf(ref)
    bad = np.flatnonzero(inf & (got != ref))
    assert bad.size == 0, f"{what}: infinity differs at flat index {bad[:5]}: got {got.flat[bad[:5]]}, want {ref.flat[bad[:5]]}"


def assert_rows_close(got, ref: np.ndarray, magnitude: np.ndarray, chain: int, what: str = "loss"):
    """Compare a float32 per-row loss with the float64 oracle.

    Bound (Higham, summation in any order): |error| <= (L + TERM_ULPS) * eps32 * sum |term|, with L the
    longest chain of float32 additions a term goes through: `chain`, derived from the launch shape
    (elements one thread adds sequentially + the levels combining threads).
    """
    got = np.array(got).astype(np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    _assert_special(got, ref, what)
    exact_zero = ref == 0
    bad = np.flatnonzero(exact_zero & (magnitude == 0) & (got != 0))
    assert bad.size == 0, f"{what}: expected exact 0 at {bad[:5]}, got {got.flat[bad[:5]]}"
    finite = np.isfinite(ref)
    with np.errstate(all="ignore"):
        tol = np.where(finite, (chain + TERM_ULPS) * EPS32 * magnitude + 1e-30, np.inf)
        err = np.where(finite, np.abs(got - ref), 0.0)
    worst = np.argmax(err - tol) if err.size else 0
    assert np.all(err <= tol), (
        f"{what}: |error| {err.flat[worst]:.3e} > tolerance {tol.flat[worst]:.3e} at flat index {worst} "
        f"(got {got.flat[worst]!r}, want {ref.flat[worst]!r})")


def assert_grads_close(got: mx.array, ref: np.ndarray, scale: np.ndarray, what: str = "grad",
                       roundings: int = 1):
    """Compare a gradient in its dtype with the float64 oracle.

    Bound: float32 math error TERM_ULPS * eps32 * scale, then `roundings` roundings to the dtype, each
    ROUNDOFF[dtype] relative (normal range) or half a subnormal spacing (below it): one for the kernels,
    two for the fallback where it keeps exp(t) in bfloat16 (kl_metal/fallback.py, `saved_dtype`). Zeros the
    conventions demand (t == -inf, g == 0) must be exactly +0.0 or -0.0 ... and are checked to be 0.
    """
    dtype = got.dtype
    got64 = f64(got)
    assert got64.shape == ref.shape, f"{what}: shape {got64.shape} != {ref.shape}"
    _assert_special(got64, ref, what)
    demanded_zero = (scale == 0) & (ref == 0)
    bad = np.flatnonzero(demanded_zero & (got64 != 0))
    assert bad.size == 0, f"{what}: expected exactly 0 at flat index {bad[:5]}, got {got64.flat[bad[:5]]}"
    finite = np.isfinite(ref)
    with np.errstate(all="ignore"):
        math_error = TERM_ULPS * EPS32 * scale
        relative = (1.0 + ROUNDOFF[dtype]) ** roundings - 1.0
        tol = math_error + relative * (np.abs(ref) + math_error) + roundings * SUBNORMAL_HALF_SPACING[dtype]
        tol = np.where(finite, tol, np.inf)
        err = np.where(finite, np.abs(got64 - ref), 0.0)
    worst = int(np.argmax(err - tol)) if err.size else 0
    assert np.all(err <= tol), (
        f"{what} ({dtype}): |error| {err.flat[worst]:.3e} > tolerance {tol.flat[worst]:.3e} at flat "
        f"index {worst} (got {got64.flat[worst]!r}, want {ref.flat[worst]!r})")


def log_probabilities(rng: np.random.Generator, shape, axis: int = 1) -> np.ndarray:
    """float32 log-probabilities-like values along `axis`: N(-log D, 1), so exp sums are O(1)."""
    d = shape[axis]
    return (rng.standard_normal(shape) - math.log(max(d, 1))).astype(np.float32)


def as_mx(values: np.ndarray, dtype) -> mx.array:
    """float32 numpy -> mx array of `dtype` (rounded once, to nearest even)."""
    return mx.array(values.astype(np.float32)).astype(dtype)
